"""A captioner as a victim: the caption objectives every attack on a captioner minimises.

* :class:`CaptionObjective`: one caption per image, scored by the mean token cross-entropy (the loss adversarial
  training and robustness evaluation attack, Rashid & Rivas 2024), the summed one ``-log P(S | x)`` (Show-and-Fool,
  Chen et al. 2018, eq. 5; the members of Liu et al. 2017's ensembles) or Show-and-Fool's margin on the logits
  (eq. 7). Untargeted, the caption is the reference (or the model's own clean caption) and the attack raises its loss
  (the objective is its negative); targeted, the caption is the target and the attack lowers its loss.
* :class:`KeywordObjective`: Show-and-Fool's targeted-keyword loss (eq. 8 with the collision gate of eq. 9), whose
  decoder input is the model's own current caption, re-inferred in ``refresh``.
* :func:`caption_ensemble`: Liu et al. 2017's ensemble objective over several captioners: eq. 6's mixture, or a sum
  of the members' log-likelihood or margin losses that holds only when every member is fooled (``objective``).

Losses (``z_t`` are the teacher-forced next-token logits at position ``t``, ``kappa`` the confidence margin):

* ``logits`` (eq. 7): ``sum_t max(-kappa, max_{k != S_t} z_t^k - z_t^{S_t})``. The sum runs over every target word
  **and the end token**: the generated caption must stop where the target stops.
* ``log_prob`` (eq. 5): ``-sum_t log P(S_t | x', S_<t)``.
* ``cross_entropy``: the same, divided by the caption's length in tokens (end token included).
* keywords (eq. 9): ``sum_j min_t g_tj(max(-kappa, max_{k != K_j} z_t^k - z_t^{K_j}))`` where ``g_tj`` replaces
  the term by ``gate_value`` when another keyword already is the top-1 word at position ``t``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo
from modules.attacks.base import check_count, check_positive
from modules.attacks.protocol import eval_mode
from modules.captioners.base import Captioner, caption_loss
from modules.victims.base import LikelihoodObjective
from modules.victims.ensemble import EnsembleObjective, SumEnsembleObjective, check_ensemble_objective

LOSSES: tuple[str, ...] = ("cross_entropy", "log_prob", "logits")


# -- helpers ---------------------------------------------------------------------------------------------------------
def caption_labels(captions: Sequence[Sequence[int]], eos: int, device: torch.device | str) -> torch.Tensor:
    """Captions (token ids without EOS) + EOS, right-padded with -100.

    Shape:
        returns ``(B, T)`` with ``T`` the longest caption + 1.
    """
    longest = max(len(c) for c in captions) + 1
    labels = torch.full((len(captions), longest), -100, dtype=torch.long, device=device)
    for i, caption in enumerate(captions):
        if caption:
            labels[i, : len(caption)] = torch.tensor(list(caption), dtype=torch.long, device=device)
        labels[i, len(caption)] = eos
    return labels


def caption_ids(tokens: torch.Tensor, vocab: VocabInfo) -> list[list[int]]:
    """Generated tokens up to (not including) the first EOS, padding dropped, as lists.

    Shape:
        ``tokens``: ``(B, T)``.
    """
    out = []
    for row in tokens.tolist():
        words = []
        for token in row:
            if token == vocab.eos_token_id:
                break
            words.append(token)
        out.append([w for w in words if w != vocab.pad_token_id])
    return out


def greedy_ids(captioner: Captioner, images: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy captions of ``images`` as token ids up to EOS, in the model's current mode, without gradients.

    Shape:
        ``images``: ``(B, 3, H, W)`` in [0, 1].
    """
    with torch.no_grad():
        tokens = captioner.generate(images.detach(), max_new_tokens=max_new_tokens)
    return caption_ids(tokens, captioner.vocab)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-log P(caption | image)``: the token cross-entropy summed over the non-padding positions (eq. 5).

    Shape:
        ``logits``: ``(B, T, V)``; ``labels``: ``(B, T)`` with -100 on padding; returns ``(B,)``.
    """
    token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none"
    )
    return token.sum(1)


def _margin_terms(logits: torch.Tensor, wanted: torch.Tensor, margin: float) -> torch.Tensor:
    """``max(-margin, max_{k != wanted} z^k - z^wanted)`` for every position (eq. 7's summand).

    Shape:
        ``logits``: ``(B, T, V)``; ``wanted``: ``(B, T)`` ids (any valid id on padding); returns ``(B, T)``.
    """
    wanted_logit = logits.gather(-1, wanted.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, wanted.unsqueeze(-1), float("-inf")).amax(-1)
    return torch.clamp(others - wanted_logit, min=-margin)


def logits_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Show-and-Fool eq. 7 per image: the margin terms summed over the target positions (labels != -100).

    A position whose target logit beats every other by ``margin`` sits at ``-margin`` and gives no gradient.

    Shape:
        ``logits``: ``(B, T, V)``; ``labels``: ``(B, T)``, -100 on padding; returns ``(B,)``.
    """
    mask = labels.ne(-100)
    terms = _margin_terms(logits.float(), labels.clamp_min(0), margin)
    return (terms * mask).sum(1)


def keyword_loss(
    logits: torch.Tensor,
    positions: torch.Tensor,
    keywords: torch.Tensor,
    keyword_mask: torch.Tensor,
    margin: float,
    gate_value: float,
) -> torch.Tensor:
    """Show-and-Fool eq. 9 per image: each keyword's best position, with colliding positions gated off.

    Args:
        logits: Teacher-forced logits on the current caption. Shape: ``(B, T, V)``.
        positions: Which positions exist (the caption's words and its end). Shape: ``(B, T)`` bool.
        keywords: Keyword ids, padded with any valid id. Shape: ``(B, M)``.
        keyword_mask: Which keyword slots are real. Shape: ``(B, M)`` bool.
        margin: Confidence margin ``kappa``.
        gate_value: The gate's ``A``, far above any logit gap.

    Returns:
        Shape: ``(B,)``.
    """
    logits = logits.float()
    b, t, _ = logits.shape
    m = keywords.shape[1]
    # (B, M, T): the margin term of keyword j at position t.
    wanted = keywords.unsqueeze(-1).expand(b, m, t)
    expanded = logits.unsqueeze(1).expand(b, m, t, logits.shape[-1])
    terms = _margin_terms(expanded.reshape(b * m, t, -1), wanted.reshape(b * m, t), margin).view(b, m, t)
    top1 = logits.argmax(-1)  # (B, T)
    is_keyword = top1.unsqueeze(1).eq(keywords.unsqueeze(-1)) & keyword_mask.unsqueeze(-1)  # (B, M, T): top1 == K_i
    other_keyword_top = is_keyword.any(1, keepdim=True) & ~is_keyword  # top-1 is a keyword, and not K_j itself
    gated = torch.where(other_keyword_top, torch.full_like(terms, gate_value), terms)
    gated = gated.masked_fill(~positions.unsqueeze(1), float("inf"))
    best = gated.amin(-1)  # (B, M)
    return (best * keyword_mask).sum(1)


def check_token_ids(targets: Sequence[Sequence[int]], vocab: VocabInfo, what: str = "target") -> list[list[int]]:
    """Validate per-image target token ids against a vocabulary.

    Raises:
        RobucapError: An empty target, or ids that are not integers in ``[0, vocab_size)``.
    """
    out = []
    for i, target in enumerate(targets):
        ids = list(target)
        if not ids:
            raise RobucapError(f"the {what} of image {i} is empty (expected token ids of the captioner's vocabulary)")
        if not all(isinstance(t, numbers.Integral) and 0 <= int(t) < vocab.vocab_size for t in ids):
            raise RobucapError(f"the {what} of image {i} must be token ids in [0, {vocab.vocab_size}), got {ids}")
        out.append([int(t) for t in ids])
    return out


def different_vocabularies(tokenizers: Sequence[PreTrainedTokenizerBase]) -> list[int]:
    """Indices of the tokenizers whose vocabulary differs from the first one's (a targeted ensemble needs none)."""
    first = tokenizers[0].get_vocab()
    return [i for i, t in enumerate(tokenizers) if i and t.get_vocab() != first]


def _rows_list(rows: torch.Tensor | None, n: int) -> list[int]:
    return list(range(n)) if rows is None else [int(r) for r in rows.tolist()]


def _select(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The selected rows of a -100-padded label tensor, trimmed to their longest caption when a subset is taken.

    The clone keeps tensors built under ``torch.inference_mode`` out of autograd's saved tensors.
    """
    if rows is None:
        return tensor.clone()
    picked = tensor[rows.to(tensor.device)]
    return picked[:, : max(1, int(picked.ne(-100).sum(1).max()))].clone()


class _CaptionerObjective(LikelihoodObjective):
    """What the captioner objectives share: the model, greedy generation for the final verdict."""

    def __init__(self, captioner: Captioner, max_new_tokens: int) -> None:
        if not isinstance(captioner, Captioner):
            hint = " (pass module.captioner, not the CaptioningModule)" if hasattr(captioner, "captioner") else ""
            raise RobucapError(f"a caption objective needs a Captioner, got {type(captioner).__name__}{hint}")
        self.module = captioner
        self.captioner = captioner
        self.max_new_tokens = check_count(max_new_tokens, "max_new_tokens")

    def generated(self, images: torch.Tensor) -> list[list[int]]:
        """Greedy captions of ``images`` (token ids up to EOS), in the model's current mode, without gradients."""
        return greedy_ids(self.captioner, images, self.max_new_tokens)


class CaptionObjective(_CaptionerObjective):
    """One caption per image, scored by ``loss``; untargeted the attack raises the loss, targeted it lowers it.

    Args:
        captioner: The white-box model (not a DDP wrapper).
        labels: Caption tokens + EOS per image, -100 on padding (a batch's ``labels``). Shape: ``(B, T)``.
        targeted: ``labels`` are the target (lower its loss) rather than the caption to move away from.
        loss: ``cross_entropy`` (mean per token), ``log_prob`` (summed, eq. 5) or ``logits`` (eq. 7; targeted only).
        margin: Confidence margin ``kappa`` of the ``logits`` loss (paper: 1).
        max_new_tokens: Longest caption generated when judging a targeted attack's success.

    Raises:
        RobucapError: ``labels`` not ``(B, T)``, an unknown loss, ``logits`` untargeted, ``margin`` not > 0.
    """

    def __init__(
        self,
        captioner: Captioner,
        labels: torch.Tensor,
        targeted: bool = False,
        loss: str = "cross_entropy",
        margin: float = 1.0,
        max_new_tokens: int = 32,
    ) -> None:
        super().__init__(captioner, max_new_tokens)
        if labels.dim() != 2:
            raise RobucapError(f"caption labels must have shape (B, T), got {tuple(labels.shape)}")
        if loss not in LOSSES:
            raise RobucapError(f"caption objective loss must be one of {list(LOSSES)}, got {loss!r}")
        self.targeted = bool(targeted)
        if loss == "logits" and not self.targeted:
            raise RobucapError("the logits loss (Show-and-Fool eq. 7) is a targeted loss; use it with targeted=True")
        self.labels = labels.detach()
        self.loss_name = loss
        self.margin = check_positive(margin, "margin")
        self.size = labels.shape[0]

    @property
    def margin_loss(self) -> bool:
        """The loss is eq. 7's margin, floored at ``-margin`` (what a ``sum_margin`` ensemble sums)."""
        return self.loss_name == "logits"

    @classmethod
    def targeting(
        cls,
        captioner: Captioner,
        targets: Sequence[Sequence[int]],
        loss: str = "log_prob",
        margin: float = 1.0,
        max_new_tokens: int = 32,
        device: torch.device | str | None = None,
    ) -> CaptionObjective:
        """A targeted objective from per-image target token ids without EOS (see
        :func:`~modules.attacks.targets.target_caption_ids`).

        Raises:
            RobucapError: No targets, an empty target or ids outside the captioner's vocabulary.
        """
        if len(targets) == 0:
            raise RobucapError("a targeted caption objective needs one target per image, got none")
        ids = check_token_ids(targets, captioner.vocab)
        device = device if device is not None else next(captioner.parameters()).device
        labels = caption_labels(ids, captioner.vocab.eos_token_id, device)
        return cls(captioner, labels, targeted=True, loss=loss, margin=margin, max_new_tokens=max_new_tokens)

    @classmethod
    def own_captions(
        cls,
        captioner: Captioner,
        pixel_values: torch.Tensor,
        loss: str = "log_prob",
        max_new_tokens: int = 32,
        use_eval_mode: bool = True,
    ) -> CaptionObjective:
        """An untargeted objective that moves the captioner away from its own greedy caption of the clean images.

        Liu et al. 2017's non-targeted ensemble scores each member on what it says itself, which is what "fooling
        member i" means without ground-truth labels.

        Shape:
            ``pixel_values``: ``(B, 3, H, W)`` in [0, 1].
        """
        with eval_mode(captioner, use_eval_mode):
            own = greedy_ids(captioner, pixel_values, check_count(max_new_tokens, "max_new_tokens"))
        labels = caption_labels(own, captioner.vocab.eos_token_id, pixel_values.device)
        return cls(captioner, labels, loss=loss, max_new_tokens=max_new_tokens)

    def _logits(self, images: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        labels = _select(self.labels, rows).to(images.device)
        return self.captioner(images, labels).logits, labels

    def _value(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "logits":
            return logits_loss(logits, labels, self.margin)
        if self.loss_name == "log_prob":
            value = sequence_nll(logits, labels)
        else:
            value = caption_loss(logits, labels, reduction="none")
        return value if self.targeted else -value

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The chosen loss of the caption, negated when untargeted. Shape: ``(R,)``."""
        return self._value(*self._logits(images, rows))

    def loss_and_success(
        self, images: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss and, targeted, whether every teacher-forced top-1 word is the target's. Shapes: ``(R,)``."""
        logits, labels = self._logits(images, rows)
        if not self.targeted:
            return self._value(logits, labels), None
        checked = (logits.argmax(-1).eq(labels) | labels.eq(-100)).all(1).cpu()
        return self._value(logits, labels), checked

    def log_likelihood(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``log P(caption | image)``, the summed token log-probability. Shape: ``(R,)``."""
        logits, labels = self._logits(images, rows)
        return -sequence_nll(logits, labels)

    def success(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Targeted: the greedy caption is exactly the target; untargeted: ``None``. Shape: ``(R,)`` bool."""
        if not self.targeted:
            return None
        targets = caption_ids(self.labels.clamp_min(0), self.captioner.vocab)
        wanted = [targets[r] for r in _rows_list(rows, self.labels.shape[0])]
        return torch.tensor([g == t for g, t in zip(self.generated(images), wanted, strict=True)], dtype=torch.bool)


class KeywordObjective(_CaptionerObjective):
    """Show-and-Fool's targeted keywords (eq. 9): a caption that contains every keyword, anywhere.

    The decoder input is the model's own current caption of the image, re-inferred in :meth:`refresh` (Show-and-Fool
    uses T = 5 iterations; :class:`~modules.attacks.show_and_fool.ShowAndFool`'s ``reinfer_every``); before the first
    refresh it is inferred on the images the loss is asked about.

    Args:
        captioner: The white-box model (not a DDP wrapper).
        keywords: Per image, the keyword ids (see :func:`~modules.attacks.targets.keyword_ids`).
        margin: Confidence margin ``kappa`` (paper: 1).
        gate_value: The collision gate's ``A``.
        max_new_tokens: Longest caption generated.

    Raises:
        RobucapError: No images, an empty keyword list or ids outside the vocabulary, ``margin``/``gate_value``
            not > 0.
    """

    moving_target = True
    margin_loss = True  # eq. 9 is a sum of margins floored at -kappa

    def __init__(
        self,
        captioner: Captioner,
        keywords: Sequence[Sequence[int]],
        margin: float = 1.0,
        gate_value: float = 1e4,
        max_new_tokens: int = 32,
    ) -> None:
        super().__init__(captioner, max_new_tokens)
        if len(keywords) == 0:
            raise RobucapError("a keyword objective needs one keyword list per image, got none")
        self.keywords = check_token_ids(keywords, captioner.vocab, "keyword list")
        self.margin = check_positive(margin, "margin")
        self.gate_value = check_positive(gate_value, "gate_value")
        self.targeted = True
        self.size = len(self.keywords)
        device = next(captioner.parameters()).device
        m = max(len(k) for k in self.keywords)
        self.keyword_ids = torch.zeros((self.size, m), dtype=torch.long, device=device)
        self.keyword_mask = torch.zeros((self.size, m), dtype=torch.bool, device=device)
        for i, k in enumerate(self.keywords):
            self.keyword_ids[i, : len(k)] = torch.tensor(k, dtype=torch.long, device=device)
            self.keyword_mask[i, : len(k)] = True
        self.inputs: torch.Tensor | None = None  # the current caption of every row, -100-padded

    def _contains(self, generated: list[list[int]], rows: list[int]) -> torch.Tensor:
        return torch.tensor(
            [set(self.keywords[r]) <= set(g) for g, r in zip(generated, rows, strict=True)], dtype=torch.bool
        )

    def refresh(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Re-infer the decoder input of the rows from their images; whether each caption has every keyword.

        Shape:
            ``images``: ``(R, 3, H, W)``; returns ``(R,)`` bool on the CPU.
        """
        generated = self.generated(images)
        new = caption_labels(generated, self.captioner.vocab.eos_token_id, self.keyword_ids.device)
        width = max(new.shape[1], 0 if self.inputs is None else self.inputs.shape[1])
        full = torch.full((self.size, width), -100, dtype=torch.long, device=new.device)
        if self.inputs is not None:
            full[:, : self.inputs.shape[1]] = self.inputs
        index = torch.arange(self.size, device=new.device) if rows is None else rows.to(new.device)
        full[index] = -100
        full[index, : new.shape[1]] = new
        self.inputs = full
        return self._contains(generated, _rows_list(rows, self.size))

    def _logits(self, images: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inputs is None:
            self.refresh(images, rows)
        assert self.inputs is not None  # noqa: S101 - set by refresh, for the type checker
        labels = _select(self.inputs, rows).to(images.device)
        return self.captioner(images, labels).logits, labels

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 9 on the current decoder input. Shape: ``(R,)``."""
        logits, labels = self._logits(images, rows)
        index = slice(None) if rows is None else rows.to(self.keyword_ids.device)
        return keyword_loss(
            logits, labels.ne(-100), self.keyword_ids[index], self.keyword_mask[index], self.margin, self.gate_value
        )

    def log_likelihood(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``-loss``: eq. 9 is no probability, but its negative rises as the keywords become likelier."""
        return -self.loss(images, rows)

    def success(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The greedy caption contains every keyword. Shape: ``(R,)`` bool."""
        return self._contains(self.generated(images), _rows_list(rows, self.size))


def caption_ensemble(
    captioners: Sequence[Captioner],
    pixel_values: torch.Tensor,
    targets: Sequence[Sequence[int]] | None = None,
    weights: Sequence[float] | None = None,
    max_new_tokens: int = 32,
    objective: str = "mixture",
    margin: float = 1.0,
) -> EnsembleObjective:
    """Liu et al. 2017's ensemble objective over captioners, for one batch.

    Targeted (``targets`` given), every member is scored on the target caption; non-targeted, each member on its own
    greedy caption of the clean images. ``mixture`` and ``sum_loglik`` members score ``log P(caption | x')`` (the
    summed token log-probability); ``sum_margin`` members Show-and-Fool's margin loss (eq. 7, confidence ``margin``).

    Args:
        captioners: The white-box members (not DDP wrappers). One member gives the single-model attack.
        pixel_values: The clean images. Shape: ``(B, 3, H, W)`` in [0, 1].
        targets: Per image the target caption's token ids without EOS; ``None``: non-targeted.
        weights: Ensemble weights (> 0); ``None``: equal.
        max_new_tokens: Longest caption generated (clean captions, success).
        objective: ``mixture`` (eq. 6), ``sum_loglik`` or ``sum_margin`` (targeted only): see
            :mod:`modules.victims.ensemble`.
        margin: Confidence ``kappa`` of the ``sum_margin`` members' margin loss (> 0).

    Raises:
        RobucapError: An unknown objective, ``sum_margin`` without targets, ``margin`` not > 0, no members, a member
            that is not a Captioner, members with different image sizes or images of another size (images are not
            resized: a resize would be part of the attacked function), a targeted ensemble whose members have
            different vocabularies (a target is one sequence of token ids), or targets that are not one valid
            token-id list per image.
    """
    check_ensemble_objective(objective)
    if objective == "sum_margin" and targets is None:
        raise RobucapError(
            "the sum_margin ensemble objective is targeted only (a margin towards a target caption); use mixture or "
            "sum_loglik for a non-targeted ensemble"
        )
    margin = check_positive(margin, "ensemble margin (kappa)")
    members = list(captioners)
    if not members:
        raise RobucapError("an ensemble needs at least one member captioner, got none")
    for i, member in enumerate(members):
        if not isinstance(member, Captioner):
            hint = " (pass module.captioner, not the CaptioningModule)" if hasattr(member, "captioner") else ""
            raise RobucapError(f"ensemble member {i} must be a Captioner, got {type(member).__name__}{hint}")
    sizes = [int(m.image_size) for m in members]
    if len(set(sizes)) > 1:
        first = next(i for i, s in enumerate(sizes) if s != sizes[0])
        raise RobucapError(
            f"ensemble members must take images of one size (images are not resized): member 0 takes {sizes[0]} px, "
            f"member {first} takes {sizes[first]} px"
        )
    h, w = pixel_values.shape[-2:]
    if pixel_values.dim() != 4 or h != sizes[0] or w != sizes[0]:
        raise RobucapError(
            f"the ensemble's members take (B, 3, {sizes[0]}, {sizes[0]}) images, got {tuple(pixel_values.shape)} "
            "(images are not resized)"
        )
    if targets is None:
        parts = [CaptionObjective.own_captions(m, pixel_values, max_new_tokens=max_new_tokens) for m in members]
        return _combine(parts, weights, objective)
    for i, member in enumerate(members[1:], start=1):
        if member.vocab != members[0].vocab:
            raise RobucapError(
                "a targeted ensemble needs members with one shared vocabulary (the target is one sequence of token "
                f"ids): member 0 has {members[0].vocab}, member {i} has {member.vocab}"
            )
    if len(targets) != pixel_values.shape[0]:
        raise RobucapError(f"ensemble: expected one target per image ({pixel_values.shape[0]}), got {len(targets)}")
    loss = "logits" if objective == "sum_margin" else "log_prob"
    parts = [
        CaptionObjective.targeting(
            m, targets, loss=loss, margin=margin, max_new_tokens=max_new_tokens, device=pixel_values.device
        )
        for m in members
    ]
    return _combine(parts, weights, objective)


def _combine(parts: Sequence[CaptionObjective], weights: Sequence[float] | None, objective: str) -> EnsembleObjective:
    """Eq. 6's mixture, or the members' losses summed."""
    if objective == "mixture":
        return EnsembleObjective(parts, weights)
    return SumEnsembleObjective(parts, weights, objective)
