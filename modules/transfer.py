"""Transferability of adversarial images: how images crafted on one captioner (or an ensemble) fool another.

Liu et al. 2017 measures transfer between classifiers by accuracy (non-targeted) and matching rate (targeted) at a given
distortion, the root-mean-square deviation on the 0-255 scale (RMSD). Captioners have no single correct label, so
a cell of a transfer matrix here holds, for the adversarial images of one source evaluated on one captioner:

* ``bleu4_clean`` / ``bleu4_adv`` / ``bleu4_drop``: corpus BLEU-4 of the captioner's captions of the clean and of
  the adversarial images against the dataset references, and their difference (clean - adversarial);
* ``changed``: share of images whose adversarial caption differs from the captioner's own clean caption
  (normalised text) — the non-targeted "accuracy" turned around: 1 means every image was fooled;
* ``target_hit``: share of images whose adversarial caption is the target caption (normalised, exact), or for
  keyword targets contains every keyword — Liu et al.'s (2017) matching rate; ``target_hit_clean`` is the same share
  for the clean captions, the baseline to compare with (a target chosen from the source's captions may already be what
  another captioner says for the clean image);
* ``target_words``: partial transfer, the keyword view of Show-and-Fool (section 4.3): per image the share of the
  target's content words (:func:`~modules.attacks.targets.content_words`; for keyword targets, the keywords) that the
  adversarial caption contains, averaged over the images; ``target_words_clean`` is the same for the clean captions;
* ``ori_bleu4`` / ``tgt_bleu4``: Show-and-Fool's transfer scores (section 4.4, Table 4): corpus BLEU-4 of the
  adversarial captions against the captioner's own clean captions (``ori``, lower = more change) and against the
  target captions (``tgt``, higher = the target transferred; caption targets only);
* ``rmsd``: the mean RMSD (0-255) of the adversarial images, the distortion the cell was bought with.

A cell is a :class:`TransferCell`; :meth:`TransferCell.to_json` gives the keys above as results.json stores them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from datamodules.errors import RobucapError
from datamodules.text import caption_tokens, normalize_caption
from modules.attacks.targets import content_words
from modules.captioning import CaptioningModule
from modules.captions import caption_images
from modules.evaluation import bleu_of
from modules.records import CaptionedImage, Target

__all__ = [
    "Target",
    "TransferCell",
    "TransferMatrix",
    "evaluate_transfer",
    "hits_target",
    "matrix_to_json",
    "rmsd_255",
    "target_word_share",
    "transfer_matrix",
]


def rmsd_255(clean: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
    """Liu et al.'s (2017) distortion: per image, ``sqrt(mean((x' - x)^2))`` with pixels on the 0-255 scale.

    Args:
        clean: Images in [0, 1]. Shape: ``(B, 3, H, W)``.
        adversarial: Images in [0, 1]. Shape: ``(B, 3, H, W)``.

    Returns:
        RMSD per image in 0-255 units. Shape: ``(B,)``.

    Raises:
        RobucapError: The two batches differ in shape.
    """
    if clean.shape != adversarial.shape or clean.dim() < 2:
        raise RobucapError(
            f"rmsd_255 expects clean and adversarial images of one shape (B, 3, H, W), got {tuple(clean.shape)} and "
            f"{tuple(adversarial.shape)}"
        )
    diff = (adversarial.detach().double() - clean.detach().double()) * 255.0
    return diff.flatten(1).pow(2).mean(1).sqrt().float()


def hits_target(caption: str, target: Target) -> bool:
    """The caption is the target caption or, for a keyword list, contains every keyword.

    Both sides go through the same PTB tokenisation (:func:`~datamodules.text.caption_tokens`), so a keyword that
    it splits (``y'all`` -> ``y' all``, ``at&t`` -> ``at & t``) is found as the run of tokens it becomes.
    """
    if isinstance(target, str):
        return normalize_caption(caption) == normalize_caption(target)
    tokens = caption_tokens(caption)
    return all(_contains(tokens, caption_tokens(k)) for k in target)


def target_word_share(caption: str, target: Target) -> float | None:
    """Share of the target's content words (a keyword list: its keywords) found in the caption; ``None`` if none.

    A caption target's words are its :func:`~modules.attacks.targets.content_words` (shapes, colours, sizes on the
    shapes data), each counted once; a word is found when it is one of the caption's tokens (a keyword that the PTB
    tokenisation splits, as a run of tokens).
    """
    words = content_words(target) if isinstance(target, str) else [k for k in target if caption_tokens(k)]
    if not words:
        return None
    tokens = caption_tokens(caption)
    return sum(_contains(tokens, caption_tokens(w)) for w in words) / len(words)


def _mean_share(captions: Sequence[str], targets: Sequence[Target]) -> float | None:
    """Mean :func:`target_word_share` over the images whose target has content words (``None`` if none has)."""
    shares = [target_word_share(c, t) for c, t in zip(captions, targets, strict=True)]
    known = [v for v in shares if v is not None]
    return sum(known) / len(known) if known else None


def _contains(tokens: Sequence[str], run: Sequence[str]) -> bool:
    """``run`` occurs in ``tokens`` as consecutive tokens (an empty run never does)."""
    n = len(run)
    return n > 0 and any(list(tokens[i : i + n]) == list(run) for i in range(len(tokens) - n + 1))


def _records(
    captions: Sequence[str], references: Sequence[Sequence[str]], image_ids: Sequence[Any]
) -> list[CaptionedImage]:
    return [
        CaptionedImage(image_id=i, prediction=c, references=list(r))
        for c, r, i in zip(captions, references, image_ids, strict=True)
    ]


def _check_lengths(n: int, references: Sequence, image_ids: Sequence, targets: Sequence | None) -> None:
    if len(references) != n or len(image_ids) != n:
        raise RobucapError(
            f"evaluate_transfer: {n} images need {n} reference lists and {n} image ids, got {len(references)} and "
            f"{len(image_ids)}"
        )
    if len(set(image_ids)) != n:
        raise RobucapError("evaluate_transfer: image_ids must be unique (BLEU counts each image id once)")
    if targets is not None and len(targets) != n:
        raise RobucapError(f"evaluate_transfer: expected one target per image ({n}), got {len(targets)}")


@dataclass(frozen=True)
class TransferCell:
    """One captioner's verdict on one source's adversarial images (a cell of a transfer matrix; module docstring).

    Attributes:
        bleu4_clean: Corpus BLEU-4 of the captioner's captions of the clean images against the references.
        bleu4_adv: The same for its captions of the adversarial images.
        bleu4_drop: ``bleu4_clean - bleu4_adv``.
        changed: Share of images whose adversarial caption differs from the clean one (normalised text).
        target_hit: Share of adversarial captions that meet their target; ``None`` without targets.
        target_hit_clean: The same share for the clean captions (the baseline); ``None`` without targets.
        target_words: Partial transfer: mean share of each target's content words (keywords) in the adversarial
            caption; ``None`` without targets.
        target_words_clean: The same share for the clean captions (the baseline); ``None`` without targets.
        ori_bleu4: Show-and-Fool's ``ori`` score: BLEU-4 of the adversarial captions against the clean ones.
        tgt_bleu4: Show-and-Fool's ``tgt`` score against the target captions; ``None`` unless every target is one.
        rmsd: Mean RMSD (0-255 scale) of the adversarial images (Liu et al. 2017).
        n: Images evaluated.
        clean_captions: The captioner's caption of each clean image (not part of :meth:`to_json`).
        adversarial_captions: Its caption of each adversarial image (not part of :meth:`to_json`).
    """

    bleu4_clean: float
    bleu4_adv: float
    bleu4_drop: float
    changed: float
    target_hit: float | None
    target_hit_clean: float | None
    target_words: float | None
    target_words_clean: float | None
    ori_bleu4: float
    tgt_bleu4: float | None
    rmsd: float
    n: int
    clean_captions: list[str] = field(default_factory=list, repr=False)
    adversarial_captions: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The scores as results.json stores a cell (every score key, ``None`` included; no captions)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _CAPTION_FIELDS}


_CAPTION_FIELDS = ("clean_captions", "adversarial_captions")

TransferMatrix = dict[str, dict[str, TransferCell]]
"""``matrix[source][model]``: the cell of the images crafted on ``source`` as captioned by ``model``."""


def matrix_to_json(matrix: Mapping[str, Mapping[str, TransferCell]]) -> dict[str, dict[str, dict[str, Any]]]:
    """:meth:`TransferCell.to_json` of every cell, keeping the ``[source][model]`` layout."""
    return {source: {model: cell.to_json() for model, cell in row.items()} for source, row in matrix.items()}


def evaluate_transfer(
    module: CaptioningModule,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Any],
    targets: Sequence[Target] | None = None,
    batch_size: int = 64,
    clean_captions: Sequence[str] | None = None,
) -> TransferCell:
    """Caption clean and adversarial images with ``module`` and score the change (see the module docstring).

    Args:
        module: The captioner the images are transferred to.
        clean: The clean images in [0, 1]. Shape: ``(N, 3, H, W)``.
        adversarial: Their adversarial versions in [0, 1]. Shape: ``(N, 3, H, W)``.
        references: All reference captions of every image.
        image_ids: One unique id per image.
        targets: The attack's target per image (a caption string, or a list of keywords), ``None`` for
            non-targeted attacks.
        batch_size: Images captioned at once.
        clean_captions: ``module``'s captions of ``clean`` if already known (skips captioning them again).

    Returns:
        The scores, with both caption lists.

    Raises:
        RobucapError: Images of different shapes, or references / ids / targets / clean captions not one per image.
    """
    if clean.shape != adversarial.shape or clean.dim() != 4:
        raise RobucapError(
            f"evaluate_transfer expects clean and adversarial images of one shape (N, 3, H, W), got "
            f"{tuple(clean.shape)} and {tuple(adversarial.shape)}"
        )
    n = clean.shape[0]
    _check_lengths(n, references, image_ids, targets)
    if n == 0:
        raise RobucapError("evaluate_transfer needs at least one image")
    if clean_captions is None:
        clean_captions = caption_images(module, clean, batch_size)
    elif len(clean_captions) != n:
        raise RobucapError(f"evaluate_transfer: expected {n} clean captions, got {len(clean_captions)}")
    clean_captions = list(clean_captions)
    adversarial_captions = caption_images(module, adversarial, batch_size)
    ids = list(image_ids)
    bleu_clean = bleu_of(_records(clean_captions, references, ids))["bleu4"]
    bleu_adv = bleu_of(_records(adversarial_captions, references, ids))["bleu4"]
    changed = [
        normalize_caption(a) != normalize_caption(c) for a, c in zip(adversarial_captions, clean_captions, strict=True)
    ]
    target_hit = target_hit_clean = target_words = target_words_clean = tgt_bleu4 = None
    if targets is not None:
        target_words = _mean_share(adversarial_captions, targets)
        target_words_clean = _mean_share(clean_captions, targets)
        target_hit = sum(hits_target(a, t) for a, t in zip(adversarial_captions, targets, strict=True)) / n
        target_hit_clean = sum(hits_target(c, t) for c, t in zip(clean_captions, targets, strict=True)) / n
        if all(isinstance(t, str) for t in targets):
            tgt_bleu4 = bleu_of(_records(adversarial_captions, [[t] for t in targets], ids))["bleu4"]
    return TransferCell(
        bleu4_clean=bleu_clean,
        bleu4_adv=bleu_adv,
        bleu4_drop=bleu_clean - bleu_adv,
        changed=sum(changed) / n,
        target_hit=target_hit,
        target_hit_clean=target_hit_clean,
        target_words=target_words,
        target_words_clean=target_words_clean,
        ori_bleu4=bleu_of(_records(adversarial_captions, [[c] for c in clean_captions], ids))["bleu4"],
        tgt_bleu4=tgt_bleu4,
        rmsd=float(rmsd_255(clean, adversarial).mean()),
        n=n,
        clean_captions=clean_captions,
        adversarial_captions=adversarial_captions,
    )


def transfer_matrix(
    sources: Mapping[str, torch.Tensor],
    models: Mapping[str, CaptioningModule],
    clean: torch.Tensor,
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Any],
    targets: Sequence[Target] | Mapping[str, Sequence[Target]] | None = None,
    batch_size: int = 64,
    clean_captions: Mapping[str, Sequence[str]] | None = None,
) -> TransferMatrix:
    """Evaluate every source's adversarial images on every model (Liu et al.'s (2017) transfer tables).

    Args:
        sources: Source name (the model or ensemble the images were crafted on) -> adversarial images of ``clean``.
            Shape: ``(N, 3, H, W)`` each.
        models: Model name -> captioner the images are evaluated on.
        clean: The clean images. Shape: ``(N, 3, H, W)``.
        references: All reference captions of every image.
        image_ids: One unique id per image.
        targets: ``None`` (non-targeted), one target list shared by all sources, or source name -> target list
            (each source attacked towards its own targets).
        batch_size: Images captioned at once.
        clean_captions: Model name -> its captions of ``clean``, where already known (each model's clean captions
            are computed once otherwise).

    Returns:
        ``matrix[source][model]``: the :func:`evaluate_transfer` cell of the source's images on the model.

    Raises:
        RobucapError: A target mapping without an entry for some source, and everything :func:`evaluate_transfer`
            rejects.
    """
    if isinstance(targets, Mapping):
        missing = [s for s in sources if s not in targets]
        if missing:
            raise RobucapError(f"transfer_matrix: no targets for sources {missing} (targets cover {list(targets)})")
    captions = {name: list(c) for name, c in (clean_captions or {}).items()}
    for name, module in models.items():
        if name not in captions:
            captions[name] = caption_images(module, clean, batch_size)
    matrix: TransferMatrix = {}
    for source, adversarial in sources.items():
        source_targets = targets[source] if isinstance(targets, Mapping) else targets
        matrix[source] = {
            name: evaluate_transfer(
                module, clean, adversarial, references, image_ids, source_targets, batch_size, captions[name]
            )
            for name, module in models.items()
        }
    return matrix
