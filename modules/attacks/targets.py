"""Targets of targeted caption attacks: encoding them with the captioner's vocabulary and choosing them.

Targets are chosen as Show-and-Fool (Chen et al. 2018) does.

Show-and-Fool (section 4.2) takes as target caption the caption the model generates for another, randomly chosen test
image, so the target is one the model can produce; target keywords (section 4.3) are the content words (nouns,
verbs, adjectives, adverbs) of such a caption. robucap has no part-of-speech tagger, so a content word is any word
outside :data:`FUNCTION_WORDS` (articles, prepositions, conjunctions, pronouns, auxiliaries, numbers spelled out).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from datamodules.errors import RobucapError
from datamodules.text import caption_tokens, normalize_caption
from datamodules.tokenizer import unknown_words

FUNCTION_WORDS: frozenset[str] = frozenset(
    """a an the this that these those some any each every other another and or but nor so yet of in on at to from by
    with without into onto over under above below near next behind between among beside besides through across
    along around against toward towards up down out off about after before during while than as is are was were be
    been being am do does did has have had having it its it's he she they them their his her him we us our you
    your i me my 's 're n't not no there here what which who whom whose one two three four five six seven eight
    nine ten left right top bottom front back side middle""".split()
)
"""Words never chosen as keywords. Position words (``left``, ``top``...) are function words here: on the shapes
data they belong to the relation templates, not to what is in the image."""


def content_words(caption: str) -> list[str]:
    """The caption's content words, in order, without repeats."""
    seen: list[str] = []
    for word in caption_tokens(caption):
        if word not in FUNCTION_WORDS and not word.isdigit() and word not in seen:
            seen.append(word)
    return seen


def _word_id(tokenizer: PreTrainedTokenizerBase, word: str) -> int | None:
    """The single token id of ``word`` (plain or, for byte-level BPE, with a leading space), else ``None``."""
    unk = tokenizer.unk_token_id
    for form in (word, " " + word):
        ids = tokenizer.encode(form, add_special_tokens=False)
        if len(ids) == 1 and ids[0] != unk:
            return int(ids[0])
    return None


def target_caption_ids(tokenizer: PreTrainedTokenizerBase, caption: str) -> list[int]:
    """Token ids of a target caption (EOS not included).

    Raises:
        RobucapError: The caption is empty, or has words the vocabulary does not hold (all of them are named).
    """
    if not isinstance(caption, str) or not normalize_caption(caption):
        raise RobucapError(f"the target caption must be a non-empty sentence, got {caption!r}")
    unknown = unknown_words(tokenizer, caption)
    if unknown:
        raise RobucapError(
            f"the target caption {caption!r} has words outside the captioner's vocabulary: {unknown}; the model "
            "cannot generate them (choose a caption the model can produce, e.g. one it generates for another image)"
        )
    # A word-level vocabulary holds normalised words; byte-level BPE encodes the text as written.
    text = " ".join(caption_tokens(caption)) if tokenizer.unk_token_id is not None else caption.strip()
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [int(i) for i in ids]


def keyword_ids(tokenizer: PreTrainedTokenizerBase, keywords: Sequence[str]) -> list[int]:
    """One token id per keyword.

    Raises:
        RobucapError: No keyword, a repeated keyword, or keywords that are not one token of the vocabulary (all of
            them are named).
    """
    words = [str(k).strip().lower() for k in keywords]
    if not words or not all(words):
        raise RobucapError(f"targeted-keyword attacks need at least one non-empty keyword, got {list(keywords)!r}")
    if len(set(words)) != len(words):
        raise RobucapError(f"target keywords must be distinct, got {words}")
    ids = {w: _word_id(tokenizer, w) for w in words}
    missing = [w for w, i in ids.items() if i is None]
    if missing:
        raise RobucapError(
            f"target keywords {missing} are not words of the captioner's vocabulary (each keyword must be one token "
            "the model can generate)"
        )
    return [int(ids[w]) for w in words]


@dataclass(frozen=True)
class PaperTarget:
    """A paper-style target and where it came from.

    Attributes:
        source: Index of the other image whose clean caption gave the target.
        caption: That image's clean caption.
        value: The target: the caption itself (caption mode) or the chosen keywords (keyword mode).
    """

    source: int
    caption: str
    value: str | list[str]


def paper_targets(
    clean_captions: Sequence[str], n_keywords: int = 0, seed: int = 0, max_tries: int = 100
) -> list[PaperTarget | None]:
    """Show-and-Fool's targets: for each image, the clean caption of another, randomly chosen image.

    With ``n_keywords == 0`` the target is that caption, and it must differ from the image's own caption. With
    ``n_keywords = M >= 1`` the target is ``M`` content words of that caption (a seeded choice, in caption order)
    that the image's own caption does not already contain, so a success is always caused by the attack.

    Args:
        clean_captions: The model's caption of every image of the attacked set.
        n_keywords: 0 for targeted-caption attacks, else the number of keywords.
        seed: Seed of the random choices.
        max_tries: Images drawn per image before giving up on it.

    Returns:
        One target per image, or ``None`` for an image that no other image offers a target to (for example when a
        weak model gives every image the same caption); callers skip those images and say so.

    Raises:
        RobucapError: Fewer than 2 images, or ``n_keywords`` < 0.
    """
    if len(clean_captions) < 2:
        raise RobucapError("choosing targets needs at least 2 images (each target comes from another image)")
    if n_keywords < 0:
        raise RobucapError(f"n_keywords must be >= 0, got {n_keywords}")
    rng = random.Random(seed)
    targets: list[PaperTarget | None] = []
    for i, own in enumerate(clean_captions):
        own_words = set(caption_tokens(own))
        chosen: PaperTarget | None = None
        for _ in range(max_tries):
            j = rng.randrange(len(clean_captions) - 1)
            j += j >= i
            other = clean_captions[j]
            if n_keywords == 0:
                if normalize_caption(other) and normalize_caption(other) != normalize_caption(own):
                    chosen = PaperTarget(j, other, other)
                    break
                continue
            fresh = [w for w in content_words(other) if w not in own_words]
            if len(fresh) >= n_keywords:
                picked = sorted(rng.sample(range(len(fresh)), n_keywords))
                chosen = PaperTarget(j, other, [fresh[k] for k in picked])
                break
        targets.append(chosen)
    return targets


def choose_targets(
    clean_captions: Sequence[str], n_keywords: int = 0, seed: int = 0, max_tries: int = 100
) -> list[str | list[str]]:
    """The values of :func:`paper_targets`, for sets where every image must get one.

    Raises:
        RobucapError: As :func:`paper_targets`, and when an image gets no target.
    """
    targets = paper_targets(clean_captions, n_keywords, seed, max_tries)
    for i, target in enumerate(targets):
        if target is None:
            what = "a different caption" if n_keywords == 0 else f"{n_keywords} new content words"
            raise RobucapError(
                f"no other image offers {what} as a target for image {i} (caption {clean_captions[i]!r})"
            )
    return [t.value for t in targets if t is not None]
