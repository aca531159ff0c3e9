"""A captioner as a dense victim (beyond Xie et al. 2017): DAG's targets are the content words of its caption.

DAG attacks every pixel of a segmenter and every proposal of a detector; a captioner classifies every position of
its caption over the vocabulary, so the same algorithm attacks it token by token:

* **Targets**: the positions of the clean greedy caption that hold a content word (a vocabulary token that is a
  word by itself, letters only, outside :data:`~modules.attacks.targets.FUNCTION_WORDS`) of a permutable class.
* ``f(X, t_n)``: the teacher-forced next-token logits at that position, the decoder reading the **clean** caption
  (the prefix is fixed, as a detector's proposals are).
* **Adversarial tokens**: per image a seeded permutation without fixed point **within word classes**:

  - on the shapes data (a vocabulary made of the generator's words only) the classes are colours, shapes and sizes
    (:data:`SHAPES_WORD_CLASSES`): ``red -> blue``, ``circle -> cross``, ``small -> large``; template words
    (``image``, ``shows``) are no target;
  - on any other vocabulary every content token is one class (tokens with a byte-level BPE space marker ``Ġ`` or a
    SentencePiece ``▁`` are permuted among themselves, and those without among themselves), so a content word goes
    to another content word, never to a function word or a word piece of punctuation;
  - or the classes the caller gives (``word_classes``); a word alone in its class is no target.

The token flip rate is :meth:`~modules.victims.dense.DenseObjective.fooled_counts` over ``target_counts``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from datamodules.errors import RobucapError
from datamodules.shapes import COLORS, SHAPE_KINDS, SIZES, shapes_vocabulary
from modules.attacks.base import check_count
from modules.attacks.protocol import eval_mode
from modules.attacks.targets import FUNCTION_WORDS
from modules.captioners.base import Captioner
from modules.victims.captioner import caption_labels, check_token_ids, greedy_ids
from modules.victims.dense import DenseObjective, derangement, image_seeds

SHAPES_WORD_CLASSES: tuple[tuple[str, ...], ...] = (tuple(COLORS), tuple(SHAPE_KINDS), tuple(SIZES))
"""The shapes data's word classes: colours, shapes, sizes."""

_SPACE_MARKERS = ("Ġ", "▁")


def _split_marker(token: str) -> tuple[str, str]:
    """A vocabulary token as (space marker, word): ``"Ġred"`` is ``("Ġ", "red")``, ``"red"`` is ``("", "red")``."""
    for marker in _SPACE_MARKERS:
        if token.startswith(marker):
            return marker, token[len(marker) :]
    return "", token


def _is_content(word: str) -> bool:
    return word.isascii() and word.isalpha() and word.lower() not in FUNCTION_WORDS


def word_classes(tokenizer: PreTrainedTokenizerBase, classes: Sequence[Sequence[str]] | None = None) -> list[list[int]]:
    """The vocabulary's token classes within which adversarial tokens are drawn (see the module docstring).

    Args:
        tokenizer: The captioner's tokenizer.
        classes: Word classes to use; ``None``: the shapes classes on a shapes vocabulary, else all content words.

    Returns:
        Token ids per class, in id order; classes of fewer than two tokens are dropped (nothing to swap with).
    """
    special = set(tokenizer.all_special_tokens)
    vocabulary = {t: i for t, i in tokenizer.get_vocab().items() if t not in special}
    if classes is None and set(vocabulary) <= set(shapes_vocabulary()):
        classes = SHAPES_WORD_CLASSES
    groups: dict[tuple[int, str], list[int]] = {}
    lookup = None if classes is None else {w: k for k, words in enumerate(classes) for w in words}
    for token, token_id in vocabulary.items():
        marker, word = _split_marker(token)
        if not _is_content(word):
            continue
        key = 0 if lookup is None else lookup.get(word)
        if key is not None:
            groups.setdefault((key, marker), []).append(int(token_id))
    return [sorted(ids) for _, ids in sorted(groups.items()) if len(ids) >= 2]


def token_permutation(classes: Sequence[Sequence[int]], seed: int) -> dict[int, int]:
    """One image's adversarial token map: a seeded permutation without fixed point within each class."""
    generator = torch.Generator().manual_seed(int(seed))
    mapping: dict[int, int] = {}
    for ids in classes:
        order = derangement(len(ids), generator).tolist()
        mapping.update({ids[k]: ids[order[k]] for k in range(len(ids))})
    return mapping


class TokenObjective(DenseObjective):
    """DAG's objective on a captioner: the content-word positions of a caption, each pushed to another word.

    Args:
        captioner: The captioner (not the ``CaptioningModule``).
        tokenizer: Its tokenizer (to tell content words and their classes).
        captions: Per image, the caption's token ids without EOS (usually its own clean greedy caption:
            :meth:`greedy`); the decoder reads it teacher-forced.
        seeds: Seeds of the per-image token permutations (:func:`~modules.victims.dense.image_seeds`).
        classes: Word classes (:func:`word_classes`); ``None``: the documented default.
        shrink_only: A position that left the active set never comes back (default: recomputed each iteration).

    Attributes:
        positions: Per image, the target positions in the caption. Shape: ``(N_i,)`` each.
        captions: The captions (token ids + EOS, -100 padding). Shape: ``(B, T)``.

    Raises:
        RobucapError: A captioner that is no ``Captioner``, or captions that are not token ids of its vocabulary.
    """

    def __init__(
        self,
        captioner: Captioner,
        tokenizer: PreTrainedTokenizerBase,
        captions: Sequence[Sequence[int]],
        seeds: int | Sequence[int] = 0,
        classes: Sequence[Sequence[str]] | None = None,
        shrink_only: bool = False,
    ) -> None:
        if not isinstance(captioner, Captioner):
            hint = " (pass module.captioner, not the CaptioningModule)" if hasattr(captioner, "captioner") else ""
            raise RobucapError(f"a token objective needs a Captioner, got {type(captioner).__name__}{hint}")
        if not len(captions):
            raise RobucapError("a token objective needs one caption per image, got none")
        # An empty caption (the model stopped at once) is valid here: it has no target.
        nonempty = [i for i, c in enumerate(captions) if len(c)]
        checked = dict(
            zip(nonempty, check_token_ids([captions[i] for i in nonempty], captioner.vocab, "caption"), strict=True)
        )
        ids = [checked.get(i, []) for i in range(len(captions))]
        self.captioner = captioner
        self.classes = word_classes(tokenizer, classes)
        device = next(captioner.parameters()).device
        self.captions = caption_labels(ids, captioner.vocab.eos_token_id, device)
        self.positions: list[torch.Tensor] = []
        true, adversarial = [], []
        for caption, seed in zip(ids, image_seeds(seeds, len(ids)), strict=True):
            mapping = token_permutation(self.classes, seed)
            where = [t for t, token in enumerate(caption) if token in mapping]
            self.positions.append(torch.tensor(where, dtype=torch.long, device=device))
            true.append(torch.tensor([caption[t] for t in where], dtype=torch.long, device=device))
            adversarial.append(torch.tensor([mapping[caption[t]] for t in where], dtype=torch.long, device=device))
        super().__init__(captioner, true, adversarial, shrink_only=shrink_only)

    @classmethod
    def greedy(
        cls,
        captioner: Captioner,
        tokenizer: PreTrainedTokenizerBase,
        pixel_values: torch.Tensor,
        seeds: int | Sequence[int] = 0,
        classes: Sequence[Sequence[str]] | None = None,
        max_new_tokens: int = 32,
        shrink_only: bool = False,
        use_eval_mode: bool = True,
    ) -> TokenObjective:
        """The objective on the captioner's own greedy captions of the clean images.

        Shape:
            ``pixel_values``: ``(B, 3, H, W)`` in [0, 1].
        """
        with eval_mode(captioner, use_eval_mode):
            own = greedy_ids(captioner, pixel_values, check_count(max_new_tokens, "max_new_tokens"))
        return cls(captioner, tokenizer, own, seeds, classes, shrink_only=shrink_only)

    def target_logits(self, images: torch.Tensor, rows: list[int], subsets: list[torch.Tensor]) -> list[torch.Tensor]:
        """Teacher-forced next-token logits at the chosen positions of each row. Shape: ``(n_i, V)`` each."""
        labels = self.captions[torch.tensor(rows, device=self.captions.device)]
        labels = labels[:, : max(1, int(labels.ne(-100).sum(1).max()))].clone().to(images.device)
        logits = self.captioner(images, labels).logits
        return [logits[j, self.positions[r][subset]] for j, (r, subset) in enumerate(zip(rows, subsets, strict=True))]
