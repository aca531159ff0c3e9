"""Test-time caption scores with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L and CIDEr (never SPICE).

Captions go through pycocoevalcap's Stanford PTB tokenizer (Java) and punctuation filter, exactly as
``COCOEvalCap`` does, then through its scorers. Without Java the captions are tokenised with
:func:`datamodules.text.caption_tokens`, robucap's reproduction of that tokenizer and filter (the tokenisation of
training and validation too), and METEOR, which is a Java program, is skipped with a warning.

Call it once on the full, de-duplicated set (see :func:`modules.metrics.gather.gather_unique` under DDP).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Hashable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from datamodules.errors import RobucapError
from datamodules.text import normalize_caption

__all__ = ["COCO_KEYS", "coco_caption_scores", "java_available", "ptb_tokenize"]

COCO_KEYS: tuple[str, ...] = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")

# Java's PTB lexer starts a new line at any of these; one caption must stay one line or the output misaligns.
_LINE_BREAKS = re.compile("[\r\n\u2028\u2029\x0b\x0c\x85]")
_JAVA_TIMEOUT_S = 600.0


def java_available() -> bool:
    """Whether a ``java`` executable is on ``PATH`` (needed for the PTB tokenizer and METEOR)."""
    return shutil.which("java") is not None


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenise captions with pycocoevalcap's Stanford PTB tokenizer and drop its punctuation tokens.

    Same jar, options and punctuation list as ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer``, but the
    temporary file lives in the system temp directory (not inside site-packages, which may be read-only),
    input and output are explicitly UTF-8, Java's chatter on stderr is captured, and the output is checked to
    hold one line per caption.

    Args:
        captions: Raw captions.

    Returns:
        One lower-case, space-separated token string per caption.

    Raises:
        RuntimeError: If Java fails or returns fewer lines than captions.
    """
    if not captions:
        return []
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    text = "\n".join(_LINE_BREAKS.sub(" ", caption) for caption in captions)
    with tempfile.TemporaryDirectory(prefix="robucap-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text(text, encoding="utf-8")
        cmd = [
            "java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines", "-lowerCase", "-encoding", "utf-8", str(path),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, timeout=_JAVA_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(captions):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(captions)} captions")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines[: len(captions)]]


class _Meteor(Meteor):
    """pycocoevalcap's METEOR wrapper with a deterministic :meth:`close`.

    The original ``__del__`` takes a lock that ``compute_score`` leaves held when it raises, which deadlocks the
    garbage collector, and leaves the Java process to the mercy of garbage collection otherwise.
    """

    def close(self) -> None:
        """Close the pipes and make sure the Java process has exited; safe to call more than once."""
        proc: subprocess.Popen[bytes] | None = getattr(self, "meteor_p", None)
        if proc is None:
            return
        self.meteor_p = None
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with suppress(OSError):
                    stream.close()
        if proc.poll() is None:
            proc.kill()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)

    def __enter__(self) -> _Meteor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with suppress(Exception):
            self.close()


def _start_meteor() -> _Meteor | None:
    """Launch the METEOR JVM, or return ``None`` (with a warning) when it cannot be started."""
    try:
        return _Meteor()
    except OSError as err:
        warnings.warn(f"METEOR skipped: the Java scorer could not start ({err!r})", RuntimeWarning, stacklevel=3)
        return None


def _meteor_score(meteor: _Meteor, gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]) -> float | None:
    """METEOR over the corpus, or ``None`` (with a warning) when the Java scorer fails."""
    # "|||" separates fields in METEOR's stdin protocol; the wrapper strips it from hypotheses only.
    gts = {k: [ref.replace("|||", " ") for ref in refs] for k, refs in gts.items()}
    try:
        score, _ = meteor.compute_score(gts, res)
        return float(score)
    except (OSError, ValueError) as err:
        # A dead JVM (e.g. no memory for its 2 GB heap) shows up as an empty line that fails to parse.
        warnings.warn(f"METEOR skipped: the Java scorer failed ({err!r})", RuntimeWarning, stacklevel=4)
        return None


def _validate(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> None:
    if set(predictions) != set(references):
        missing_refs = [k for k in predictions if k not in references]
        missing_preds = [k for k in references if k not in predictions]
        parts = [f"{len(predictions)} predictions vs {len(references)} references"]
        if missing_refs:
            parts.append(f"{len(missing_refs)} image ids without references, e.g. {missing_refs[:5]}")
        if missing_preds:
            parts.append(f"{len(missing_preds)} image ids without a prediction, e.g. {missing_preds[:5]}")
        raise RobucapError(
            "coco_caption_scores: predictions and references must cover the same image ids: " + "; ".join(parts)
        )
    for image_id, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise RobucapError(
                f"coco_caption_scores: prediction for image id {image_id!r} must be a str, "
                f"got {type(prediction).__name__}"
            )
    for image_id, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise RobucapError(
                f"coco_caption_scores: references for image id {image_id!r} must be a list of captions, "
                f"got {type(refs).__name__}"
            )
        if len(refs) == 0:
            raise RobucapError(f"coco_caption_scores: image id {image_id!r} has an empty reference list")
        if not all(isinstance(r, str) for r in refs):
            raise RobucapError(f"coco_caption_scores: references for image id {image_id!r} must all be str")


def coco_caption_scores(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    meteor: bool = True,
) -> dict[str, float]:
    """Score captions with pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L and CIDEr.

    Args:
        predictions: Image id -> predicted caption (raw text), one per image.
        references: Image id -> all reference captions of that image (raw text); same ids as ``predictions``.
        meteor: Compute METEOR (a Java subprocess, a few seconds of start-up). Ignored without Java.

    Returns:
        ``bleu1``..``bleu4``, ``meteor``, ``rouge_l``, ``cider`` as floats, on pycocoevalcap's scale (fractions;
        CIDEr can exceed 1). ``meteor`` is absent when it was not requested, Java is missing (a warning says so)
        or the METEOR process failed (warning). With no images every score is 0.

    Raises:
        RobucapError: If the id sets differ, or an image has no references or a non-string caption.
    """
    _validate(predictions, references)
    have_java = java_available()
    if not have_java and meteor:
        warnings.warn(
            "METEOR skipped: Java not found on PATH (install a JRE to get METEOR and the PTB tokenizer); "
            "captions are tokenised with robucap's normaliser instead",
            RuntimeWarning,
            stacklevel=2,
        )
    use_meteor = meteor and have_java
    if not predictions:
        keys = [k for k in COCO_KEYS if k != "meteor" or use_meteor]
        return dict.fromkeys(keys, 0.0)

    # METEOR's JVM needs ~10 s to load its paraphrase table: start it now so that it loads while the PTB
    # tokenizer and the Python scorers run, and close it whatever happens.
    meteor_proc = _start_meteor() if use_meteor else None
    try:
        return _score(predictions, references, have_java, meteor_proc)
    finally:
        if meteor_proc is not None:
            meteor_proc.close()


def _score(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    have_java: bool,
    meteor_proc: _Meteor | None,
) -> dict[str, float]:
    ids = list(predictions)
    raw_preds = [predictions[i] for i in ids]
    raw_refs = [list(references[i]) for i in ids]
    flat = raw_preds + [ref for refs in raw_refs for ref in refs]
    # One tokenizer run for predictions and references: the JVM start-up dominates its cost.
    tokens: list[str] | None = None
    if have_java:
        try:
            tokens = ptb_tokenize(flat)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
            warnings.warn(
                f"PTB tokenizer failed ({err}); captions are tokenised with robucap's normaliser instead",
                RuntimeWarning,
                stacklevel=3,
            )
    if tokens is None:
        tokens = [normalize_caption(c) for c in flat]

    # Positional keys: pycocoevalcap only needs hashable, distinct keys, and ids may be of mixed types.
    res: dict[Hashable, list[str]] = {}
    gts: dict[Hashable, list[str]] = {}
    offset = len(ids)
    for index, refs in enumerate(raw_refs):
        res[index] = [tokens[index]]
        gts[index] = tokens[offset : offset + len(refs)]
        offset += len(refs)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float] = {f"bleu{n}": float(value) for n, value in enumerate(bleu, start=1)}
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    if meteor_proc is not None:
        value = _meteor_score(meteor_proc, gts, res)
        if value is not None:
            scores["meteor"] = value
    scores["rouge_l"] = float(rouge)
    scores["cider"] = float(cider)
    return scores
