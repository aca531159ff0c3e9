"""Show-and-Fool (Show-and-Fool, Chen et al. 2018): targeted-caption and targeted-keyword attacks on captioners.

Each image gets its own perturbation, found by minimising ``c * loss(x') + ||x' - x||_2^2`` over a tanh-space
variable (:mod:`modules.attacks.tanh_box`) with Adam (lr 0.005, 1000 iterations), for a per-image ``c`` searched
as in the paper: start at 1, multiply by 10 until the attack succeeds, then bisect between the largest failing and
the smallest succeeding ``c`` (5 rounds in all). Each round restarts from the clean image; the result is the
successful image of smallest distortion over all rounds.

Losses (``z_t`` are the teacher-forced next-token logits at position ``t``, ``kappa`` the confidence margin):

* ``logits`` (eq. 7), caption mode: ``sum_t max(-kappa, max_{k != S_t} z_t^k - z_t^{S_t})``. The sum runs over
  every target word **and the end token**: the generated caption must stop where the target stops.
* ``log_prob`` (eq. 5), caption mode: ``-sum_t log P(S_t | x', S_<t)``.
* keyword mode (eq. 8 with the collision gate of eq. 9): ``sum_j min_t g_tj(max(-kappa, max_{k != K_j} z_t^k -
  z_t^{K_j}))`` where ``g_tj`` replaces the term by ``gate_value`` when another keyword already is the top-1 word at
  position ``t``. The decoder input is the model's own current caption of ``x'``, re-inferred every
  ``reinfer_every`` iterations (T = 5), starting from the clean image's caption.

Distortion is measured in robucap's [0, 1] pixel units (Show-and-Fool's [-1, 1] images give twice the L2 norm).

Batching: all images of a batch are optimised together, each with its own ``c``, Adam state and bounds. An image
leaves the batch once its objective has stopped improving (Carlini & Wagner's abort-early rule: less than 0.01 %
lower than ``iterations / 10`` iterations before; in keyword mode only after its first success of the round, since
re-inference changes the objective), so late iterations only pay for the images still moving. An image's result
does not depend on the other images of its batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo
from modules.attacks.base import eval_mode
from modules.attacks.tanh_box import RowAdam, from_tanh_space, to_tanh_space
from modules.captioners.base import Captioner

MODES: tuple[str, ...] = ("caption", "keyword")
LOSSES: tuple[str, ...] = ("logits", "log_prob")
_NO_C = math.inf  # "no bound yet" for the c search, as in Carlini & Wagner's 1e10


@dataclass
class ShowAndFoolResult:
    """What a Show-and-Fool run found, per image.

    Attributes:
        adversarial: The successful image of smallest distortion, or for a failure the last iterate of the round
            with the largest ``c`` tried (what Show-and-Fool's failure statistics describe). Shape: ``(B, 3, H, W)``.
        success: The generated caption of ``adversarial`` is the target (caption mode) or contains every keyword.
            Shape: ``(B,)``.
        l2: ``||adversarial - x||_2`` in [0, 1] pixel units. Shape: ``(B,)``.
        c: The ``c`` of the returned image. Shape: ``(B,)``.
        tokens: Greedy caption of ``adversarial`` (no start token, pad after EOS). Shape: ``(B, T)``.
        iterations: Adam iterations spent on the image over all rounds. Shape: ``(B,)``.
    """

    adversarial: torch.Tensor
    success: torch.Tensor
    l2: torch.Tensor
    c: torch.Tensor
    tokens: torch.Tensor
    iterations: torch.Tensor


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < float(value) < math.inf):
        raise RobucapError(f"Show-and-Fool {name} must be a number > 0, got {value!r}")
    return float(value)


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RobucapError(f"Show-and-Fool {name} must be an integer >= 1, got {value!r}")
    return value


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


def log_prob_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Show-and-Fool eq. 5 per image: ``-log P(S | x)``, the summed token cross-entropy of the target caption.

    Shape:
        ``logits``: ``(B, T, V)``; ``labels``: ``(B, T)``, -100 on padding; returns ``(B,)``.
    """
    token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none"
    )
    return token.sum(1)


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


def caption_ids(tokens: torch.Tensor, vocab: VocabInfo) -> list[list[int]]:
    """Generated tokens up to (not including) the first EOS, as lists.

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


def _labels(sequences: Sequence[Sequence[int]], eos: int, device: torch.device) -> torch.Tensor:
    """Captions + EOS, right-padded with -100. Shape: ``(B, T)``."""
    longest = max(len(s) for s in sequences) + 1
    labels = torch.full((len(sequences), longest), -100, dtype=torch.long, device=device)
    for i, seq in enumerate(sequences):
        labels[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long, device=device)
        labels[i, len(seq)] = eos
    return labels


class ShowAndFool:
    """Show-and-Fool's targeted attack, batched with a per-image ``c``.

    Args:
        mode: ``caption`` (generate exactly the target) or ``keyword`` (generate a caption containing every keyword).
        loss: ``logits`` (eq. 7, the paper's default) or ``log_prob`` (eq. 5); keyword mode uses eq. 9 (logits).
        iterations: Adam iterations per round of the ``c`` search.
        lr: Adam learning rate.
        initial_c: First ``c``.
        search_rounds: Rounds of the ``c`` search (1 = a single run at ``initial_c``).
        margin: Confidence margin ``kappa`` of the logits losses (paper: 1).
        reinfer_every: Keyword mode re-infers the decoder input every this many iterations (paper: T = 5).
        gate_value: The collision gate's ``A``.
        abort_early: Drop an image from its round once its objective stops improving.
        max_new_tokens: Longest caption generated when checking success.
        use_eval_mode: Differentiate the model in eval mode (no dropout), restoring its mode afterwards.

    Raises:
        RobucapError: An unknown mode or loss, ``log_prob`` with keywords, ``iterations``/``search_rounds``/
            ``reinfer_every`` < 1, or ``lr``/``initial_c``/``margin`` not > 0.

    Example:
        >>> attack = ShowAndFool(mode="caption")
        >>> result = attack(captioner, images, [target_caption_ids(tokenizer, "a red circle")] * len(images))
        ... # doctest: +SKIP
    """

    def __init__(
        self,
        mode: str = "caption",
        loss: str = "logits",
        iterations: int = 1000,
        lr: float = 0.005,
        initial_c: float = 1.0,
        search_rounds: int = 5,
        margin: float = 1.0,
        reinfer_every: int = 5,
        gate_value: float = 1e4,
        abort_early: bool = True,
        max_new_tokens: int = 32,
        use_eval_mode: bool = True,
    ) -> None:
        if mode not in MODES:
            raise RobucapError(f"Show-and-Fool mode must be one of {list(MODES)}, got {mode!r}")
        if loss not in LOSSES:
            raise RobucapError(f"Show-and-Fool loss must be one of {list(LOSSES)}, got {loss!r}")
        if mode == "keyword" and loss != "logits":
            raise RobucapError(
                "Show-and-Fool keyword mode uses the logits loss (eq. 9); its log-prob form is only in Show-and-Fool's "
                "supplementary material and is not implemented"
            )
        self.mode, self.loss = mode, loss
        self.iterations = _count(iterations, "iterations")
        self.search_rounds = _count(search_rounds, "search_rounds")
        self.reinfer_every = _count(reinfer_every, "reinfer_every")
        self.max_new_tokens = _count(max_new_tokens, "max_new_tokens")
        self.lr = _positive(lr, "lr")
        self.initial_c = _positive(initial_c, "c (initial_c)")
        self.margin = _positive(margin, "margin")
        self.gate_value = _positive(gate_value, "gate_value")
        self.abort_early = bool(abort_early)
        self.use_eval_mode = bool(use_eval_mode)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"ShowAndFool({options})"

    # -- success --------------------------------------------------------------------------------------------------
    def succeeded(self, generated: list[list[int]], targets: Sequence[Sequence[int]]) -> list[bool]:
        """Caption mode: the caption equals the target; keyword mode: it contains every keyword."""
        if self.mode == "caption":
            return [list(g) == list(t) for g, t in zip(generated, targets, strict=True)]
        return [set(t) <= set(g) for g, t in zip(generated, targets, strict=True)]

    def _generate(self, captioner: Captioner, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return captioner.generate(images, max_new_tokens=self.max_new_tokens)

    # -- the attack -----------------------------------------------------------------------------------------------
    def __call__(
        self, captioner: Captioner, pixel_values: torch.Tensor, targets: Sequence[Sequence[int]]
    ) -> ShowAndFoolResult:
        """Attack a batch of images, each towards its own target.

        Args:
            captioner: The white-box model (not a DDP wrapper).
            pixel_values: Clean images in [0, 1]. Shape: ``(B, 3, H, W)``.
            targets: Per image, the target caption's token ids without EOS (caption mode; see
                :func:`~modules.attacks.targets.target_caption_ids`) or the keyword ids (keyword mode; see
                :func:`~modules.attacks.targets.keyword_ids`).

        Returns:
            The per-image result; every tensor is detached.
        """
        if pixel_values.dim() != 4 or pixel_values.shape[0] != len(targets):
            raise RobucapError(
                f"Show-and-Fool expects pixel_values (B, 3, H, W) and one target per image, got "
                f"{tuple(pixel_values.shape)} and {len(targets)} targets"
            )
        if any(len(t) == 0 for t in targets):
            raise RobucapError("Show-and-Fool: every image needs a non-empty target (caption ids or keyword ids)")
        with torch.inference_mode(False), eval_mode(captioner, self.use_eval_mode):
            return self._attack(captioner, pixel_values.detach().clone(), [list(t) for t in targets])

    def _attack(self, captioner: Captioner, x: torch.Tensor, targets: list[list[int]]) -> ShowAndFoolResult:
        b, device = x.shape[0], x.device
        vocab = captioner.vocab
        y = to_tanh_space(x)
        c = torch.full((b,), self.initial_c, dtype=torch.float64)
        lower = torch.zeros(b, dtype=torch.float64)
        upper = torch.full((b,), _NO_C, dtype=torch.float64)
        best_l2 = torch.full((b,), math.inf)
        best = x.clone()
        best_c = torch.full((b,), math.nan, dtype=torch.float64)
        fallback, fallback_c = x.clone(), torch.full((b,), -math.inf, dtype=torch.float64)
        spent = torch.zeros(b, dtype=torch.long)
        labels_all = _labels(targets, vocab.eos_token_id, device) if self.mode == "caption" else None
        keywords, keyword_mask = self._keyword_tensors(targets, device)

        for _ in range(self.search_rounds):
            found, last, used = self._round(
                captioner, x, y, c, labels_all, keywords, keyword_mask, (best, best_l2, best_c)
            )
            spent += used
            success = found < math.inf
            # The failure example comes from the largest c tried: the paper's failure statistics describe it.
            larger = c >= fallback_c
            fallback[larger] = last[larger]
            fallback_c = torch.where(larger, c, fallback_c)
            # Show-and-Fool / Carlini & Wagner: x10 until the first success, then bisect.
            upper = torch.where(success, torch.minimum(upper, c), upper)
            lower = torch.where(success, lower, torch.maximum(lower, c))
            c = torch.where(upper < _NO_C, (lower + upper) / 2, c * 10)

        won = best_l2.isfinite()
        adversarial = torch.where(won.view(-1, 1, 1, 1), best, fallback)
        tokens = self._generate(captioner, adversarial)
        # Success is judged on the returned image's generated caption, not on the teacher-forced check alone.
        confirmed = torch.tensor(self.succeeded(caption_ids(tokens, vocab), targets), dtype=torch.bool)
        return ShowAndFoolResult(
            adversarial=adversarial.detach(),
            success=confirmed,
            l2=(adversarial - x).flatten(1).norm(dim=1).detach().cpu(),
            c=torch.where(won, best_c, fallback_c).float(),
            tokens=tokens.detach(),
            iterations=spent,
        )

    def _keyword_tensors(
        self, targets: list[list[int]], device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.mode != "keyword":
            return None, None
        m = max(len(t) for t in targets)
        keywords = torch.zeros((len(targets), m), dtype=torch.long, device=device)
        mask = torch.zeros((len(targets), m), dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            keywords[i, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
            mask[i, : len(t)] = True
        return keywords, mask

    def _round(
        self,
        captioner: Captioner,
        x: torch.Tensor,
        y: torch.Tensor,
        c: torch.Tensor,
        labels_all: torch.Tensor | None,
        keywords: torch.Tensor | None,
        keyword_mask: torch.Tensor | None,
        best_so_far: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One round of the ``c`` search from the clean images.

        Updates ``best_so_far = (images, l2, c)`` in place where a success beats the image's best L2 so far.

        Returns:
            ``(found_l2, last, iterations)``: per image the smallest L2 of a success in this round (inf if none),
            the last iterate, and the iterations run. Shapes: ``(B,)``, ``(B, 3, H, W)``, ``(B,)``.
        """
        b, device = x.shape[0], x.device
        vocab = captioner.vocab
        best, best_l2, best_c = best_so_far
        w = torch.zeros_like(x)
        adam = RowAdam(w, self.lr)
        active = torch.arange(b, device=device)
        found = torch.full((b,), math.inf)
        used = torch.zeros(b, dtype=torch.long)
        check_every = max(1, self.iterations // 10)
        previous = torch.full((b,), math.inf, dtype=torch.float64)
        c_dev = c.to(device=device, dtype=torch.float32)
        inputs: torch.Tensor | None = None  # keyword mode: the current caption, re-inferred every T iterations

        for it in range(self.iterations):
            if active.numel() == 0:
                break
            rows = active.cpu()
            w_a = w[active].requires_grad_(True)
            with torch.enable_grad():
                x_adv = from_tanh_space(y[active], w_a)
                success_now = torch.zeros(rows.numel(), dtype=torch.bool)
                if self.mode == "keyword" and it % self.reinfer_every == 0:
                    # Success is only known where the caption was just generated: on the other iterations of keyword
                    # mode the current iterate is never recorded.
                    generated = caption_ids(self._generate(captioner, x_adv.detach()), vocab)
                    inputs = self._scatter_inputs(inputs, _labels(generated, vocab.eos_token_id, device), active, b)
                    wanted = [keywords[r][keyword_mask[r]].tolist() for r in active.tolist()]
                    success_now = torch.tensor(self.succeeded(generated, wanted), dtype=torch.bool)
                labels = labels_all[active] if self.mode == "caption" else inputs[active]
                labels = labels[:, : int(labels.ne(-100).sum(1).max())]
                logits = captioner(x_adv, labels).logits
                if self.mode == "caption":
                    loss = (
                        logits_loss(logits, labels, self.margin)
                        if self.loss == "logits"
                        else log_prob_loss(logits, labels)
                    )
                    predicted = logits.argmax(-1)
                    success_now = (predicted.eq(labels) | labels.eq(-100)).all(1).cpu()
                else:
                    loss = keyword_loss(
                        logits, labels.ne(-100), keywords[active], keyword_mask[active], self.margin, self.gate_value
                    )
                distortion = (x_adv - x[active]).flatten(1).pow(2).sum(1)
                objective = c_dev[active] * loss + distortion
                (grad,) = torch.autograd.grad(objective.sum(), [w_a])

            # Record successes of the current iterate (before the step), smallest distortion first.
            l2 = distortion.detach().sqrt().cpu()
            better = success_now & (l2 < found[rows]) & (l2 < best_l2[rows])
            found[rows] = torch.where(success_now, torch.minimum(found[rows], l2), found[rows])
            if better.any():
                keep = rows[better]
                best[keep.to(device)] = x_adv.detach()[better.to(device)]
                best_l2[keep] = l2[better]
                best_c[keep] = c[keep]
            adam.step(grad.detach(), active)
            used[rows] += 1

            if self.abort_early and (it + 1) % check_every == 0:
                value = objective.detach().double().cpu()
                stalled = value > previous[rows] - 1e-4 * previous[rows].abs()
                if self.mode == "keyword":
                    # The objective jumps whenever the decoder input is re-inferred, so a stall before the first
                    # success says nothing: keyword images only stop once they have succeeded in this round.
                    stalled &= found[rows] < math.inf
                previous[rows] = value
                active = active[~stalled.to(device)]

        last = from_tanh_space(y, w.detach())
        return found, last, used

    @staticmethod
    def _scatter_inputs(inputs: torch.Tensor | None, new: torch.Tensor, active: torch.Tensor, b: int) -> torch.Tensor:
        """Store re-inferred captions of the active rows in a full-batch tensor (widening it when needed)."""
        width = max(new.shape[1], 0 if inputs is None else inputs.shape[1])
        full = torch.full((b, width), -100, dtype=torch.long, device=new.device)
        if inputs is not None:
            full[:, : inputs.shape[1]] = inputs
        full[active] = -100
        full[active, : new.shape[1]] = new
        return full
