"""Ensemble attacks (Liu et al. 2017, section 5): one perturbation against several captioners at once.

Liu et al. 2017 attacks the ensemble ``sum_i alpha_i J_i`` of k white-box models (eq. 6, targeted):
``argmin_x' -log((sum_i alpha_i J_i(x')) . 1_y*) + lambda d(x, x')``. For captioners the class probability becomes
the probability of a whole caption, ``P_i(S | x') = exp(-nll_i(S))`` with ``nll_i`` the summed token cross-entropy
of the caption (its end token included) under member ``i``, so the objective per image is

* targeted: ``-log(sum_i alpha_i P_i(S | x')) + lambda ||x' - x||_2^2``, with ``S`` the target caption;
* non-targeted (the "counterpart derived similarly" of Liu et al. 2017, from its eq. 3):
  ``log(sum_i alpha_i P_i(y_i | x')) + lambda ||x' - x||_2^2``, with ``y_i`` member ``i``'s **own** greedy caption of
  the clean image. Members may caption the clean image differently; each is pushed away from what it says itself,
  which is what "fooling member i" means without ground-truth labels.

Both are computed stably as a ``logsumexp`` over ``log alpha_i - nll_i``.

Methods:

* ``optimization``: Adam (:class:`~modules.attacks.tanh_box.RowAdam`) on a tanh-space variable
  (:mod:`modules.attacks.tanh_box`), so every iterate stays in [0, 1], for ``iterations`` steps; the last iterate is
  returned. There is no ``c`` search: Liu et al. 2017 sets ``lambda = 0`` and controls the distortion with the learning
  rate and the number of iterations (section 3.1), so ``distance_weight`` defaults to 0. Liu et al. 2017 sums the Adam
  updates of the members; here Adam runs on the gradient of eq. 6 itself (the exact ensemble objective).
* ``fg`` / ``fgs``: one step of the fast gradient (L2-normalised) / fast gradient sign method on the same objective
  at the clean image (Liu et al. 2017, section 2.2): ``x' = clip(x - eps * g / ||g||_2)`` and
  ``x' = clip(x - eps * sign(g))`` with ``g`` the gradient of the objective. ``epsilon`` is an L2 budget for ``fg``
  (as :class:`~modules.attacks.fg.FG`) and an L-infinity budget for ``fgs``, both in [0, 1] pixel units.

All members must take images of the same size (images are not resized: a resize would be part of the attacked
function and change what is measured), and a targeted ensemble must share one vocabulary, since a target is one
sequence of token ids for every member. Only what the captioners know of their tokenizer is compared (size and special
ids, :class:`~datamodules.tokenizer.VocabInfo`): the caller builds targeted ensembles from models trained with one
tokenizer. A non-targeted ensemble may mix vocabularies: each member is scored on its own caption.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch

from datamodules.errors import RobucapError
from modules.attacks.base import _is_real, check_epsilon, eval_mode
from modules.attacks.show_and_fool import caption_ids
from modules.attacks.tanh_box import RowAdam, from_tanh_space, to_tanh_space
from modules.captioners.base import Captioner

METHODS: tuple[str, ...] = ("optimization", "fg", "fgs")
# A zero gradient gives no direction: the image stays unchanged (as in FG).
_TINY = 1e-12


def ensemble_log_likelihood(nll: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``log(sum_i alpha_i exp(-nll_i))`` per image, computed with ``logsumexp``.

    Args:
        nll: Summed token cross-entropy of each member's caption. Shape: ``(K, B)``.
        weights: Ensemble weights ``alpha_i`` (> 0, summing to 1). Shape: ``(K,)``.

    Returns:
        The log-probability of the caption under the ensemble. Shape: ``(B,)``.
    """
    log_weights = weights.to(device=nll.device, dtype=nll.dtype).log()
    return torch.logsumexp(log_weights.unsqueeze(1) - nll, dim=0)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-log P(caption | image)``: the token cross-entropy summed over the non-padding positions.

    Shape:
        ``logits``: ``(B, T, V)``; ``labels``: ``(B, T)`` with -100 on padding; returns ``(B,)``.
    """
    token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none"
    )
    return token.sum(1)


def caption_labels(captions: Sequence[Sequence[int]], eos: int, device: torch.device) -> torch.Tensor:
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


class EnsembleAttack:
    """Liu et al.'s (2017) ensemble attack (eq. 6) on captioners, targeted or not.

    Args:
        members: The white-box captioners (not DDP wrappers). One member gives the single-model attack.
        weights: Ensemble weights ``alpha_i`` (> 0), normalised to sum to 1; ``None``: equal weights.
        targeted: Make every member say the target caption (eq. 6) instead of moving it away from its clean caption.
        method: ``optimization`` (Adam in tanh space), ``fg`` (one L2-normalised step) or ``fgs`` (one signed step).
        epsilon: Budget of ``fg`` (L2 per image, [0, 1] pixel units, any value >= 0 up to ``sqrt(3 H W)``) and ``fgs``
            (L-infinity, in [0, 1]); required by them, must stay ``None`` for ``optimization``, whose distortion is
            set by ``lr``, ``iterations`` and ``distance_weight``.
        iterations: Adam iterations of ``optimization``.
        lr: Adam learning rate of ``optimization`` (in tanh space).
        distance_weight: ``lambda``, the weight of ``||x' - x||_2^2`` (Liu et al. 2017 uses 0; see the module
            docstring).
        max_new_tokens: Longest clean caption generated for the non-targeted objective, EOS included.
        use_eval_mode: Differentiate the members in eval mode (no dropout), restoring their modes afterwards.

    Raises:
        RobucapError: No members, a member that is not a :class:`~modules.captioners.base.Captioner`, a weights list
            of the wrong length or with a weight <= 0, members with different image sizes, a targeted ensemble whose
            members have different vocabularies, an unknown method, ``iterations`` < 1, ``lr`` not > 0,
            ``distance_weight`` < 0, or ``epsilon`` missing, out of range or given to ``optimization``.

    Example:
        >>> attack = EnsembleAttack([model_a.captioner, model_b.captioner], targeted=True)
        >>> adversarial = attack(images, [target_caption_ids(tokenizer, "a red circle")] * len(images))
        ... # doctest: +SKIP
    """

    def __init__(
        self,
        members: Sequence[Captioner],
        weights: Sequence[float] | None = None,
        targeted: bool = False,
        method: str = "optimization",
        epsilon: float | None = None,
        iterations: int = 300,
        lr: float = 0.005,
        distance_weight: float = 0.0,
        max_new_tokens: int = 32,
        use_eval_mode: bool = True,
    ) -> None:
        members = list(members)
        if not members:
            raise RobucapError("EnsembleAttack needs at least one member captioner, got none")
        for i, member in enumerate(members):
            if not isinstance(member, Captioner):
                hint = " (pass module.captioner, not the CaptioningModule)" if hasattr(member, "captioner") else ""
                raise RobucapError(f"EnsembleAttack member {i} must be a Captioner, got {type(member).__name__}{hint}")
        self.members = members
        self.weights = self._check_weights(weights, len(members))
        self.targeted = bool(targeted)
        sizes = [int(m.image_size) for m in members]
        if len(set(sizes)) > 1:
            first = next(i for i, s in enumerate(sizes) if s != sizes[0])
            raise RobucapError(
                f"EnsembleAttack members must take images of one size (images are not resized): member 0 takes "
                f"{sizes[0]} px, member {first} takes {sizes[first]} px"
            )
        self.image_size = sizes[0]
        if self.targeted:
            for i, member in enumerate(members[1:], start=1):
                if member.vocab != members[0].vocab:
                    raise RobucapError(
                        "a targeted EnsembleAttack needs members with one shared vocabulary (the target is one "
                        f"sequence of token ids): member 0 has {members[0].vocab}, member {i} has {member.vocab}"
                    )
        if method not in METHODS:
            raise RobucapError(f"EnsembleAttack method must be one of {list(METHODS)}, got {method!r}")
        self.method = method
        self.epsilon = self._check_epsilon(method, epsilon)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise RobucapError(f"EnsembleAttack iterations must be an integer >= 1, got {iterations!r}")
        self.iterations = iterations
        if not _is_real(lr) or not (0 < float(lr) < math.inf):
            raise RobucapError(f"EnsembleAttack lr must be a number > 0, got {lr!r}")
        self.lr = float(lr)
        if not _is_real(distance_weight) or not (0 <= float(distance_weight) < math.inf):
            raise RobucapError(f"EnsembleAttack distance_weight (lambda) must be >= 0, got {distance_weight!r}")
        self.distance_weight = float(distance_weight)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise RobucapError(f"EnsembleAttack max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        self.use_eval_mode = bool(use_eval_mode)

    @staticmethod
    def _check_weights(weights: Sequence[float] | None, k: int) -> torch.Tensor:
        if weights is None:
            return torch.full((k,), 1.0 / k, dtype=torch.float64)
        values = list(weights)
        if len(values) != k:
            raise RobucapError(f"EnsembleAttack weights: expected one weight per member ({k}), got {len(values)}")
        if not all(_is_real(w) and 0 < float(w) < math.inf for w in values):
            raise RobucapError(f"EnsembleAttack weights must all be numbers > 0, got {values!r}")
        total = sum(float(w) for w in values)
        return torch.tensor([float(w) / total for w in values], dtype=torch.float64)

    @staticmethod
    def _check_epsilon(method: str, epsilon: float | None) -> float | None:
        if method == "optimization":
            if epsilon is not None:
                raise RobucapError(
                    "EnsembleAttack epsilon is the budget of fg / fgs; the optimization method has none (its "
                    f"distortion is set by lr, iterations and distance_weight): leave epsilon None, got {epsilon!r}"
                )
            return None
        if epsilon is None:
            raise RobucapError(f"EnsembleAttack method {method!r} needs epsilon (its budget in [0, 1] pixel units)")
        if method == "fgs":
            return check_epsilon(epsilon, "EnsembleAttack fgs epsilon (an L-infinity budget)")
        if not _is_real(epsilon) or not (0.0 <= float(epsilon) < math.inf):
            raise RobucapError(
                f"EnsembleAttack fg epsilon is an L2 budget and must be a number >= 0 (pixel units, per image), got "
                f"{epsilon!r}"
            )
        return float(epsilon)

    def __repr__(self) -> str:
        # Logged next to results: every option that changes the attack shows up (members by type only).
        options = {
            "members": [type(m).__name__ for m in self.members],
            "weights": [round(float(w), 6) for w in self.weights],
            **{k: v for k, v in vars(self).items() if k not in ("members", "weights")},
        }
        return "EnsembleAttack(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"

    # -- objective ------------------------------------------------------------------------------------------------
    def member_labels(
        self, pixel_values: torch.Tensor, targets: Sequence[Sequence[int]] | None = None
    ) -> list[torch.Tensor]:
        """The caption each member is scored on: the target (targeted) or the member's own clean greedy caption.

        Args:
            pixel_values: Clean images in [0, 1]. Shape: ``(B, 3, H, W)``.
            targets: Targeted: per image the target caption's token ids without EOS; non-targeted: ``None``.

        Returns:
            One label tensor per member (caption + EOS, -100 on padding). Shape: ``(B, T_i)`` each.
        """
        self._check_call(pixel_values, targets)
        device = pixel_values.device
        if self.targeted:
            labels = caption_labels(targets, self.members[0].vocab.eos_token_id, device)
            return [labels] * len(self.members)
        out = []
        with torch.no_grad(), ExitStack() as stack:
            for member in self.members:
                stack.enter_context(eval_mode(member, self.use_eval_mode))
            for member in self.members:
                tokens = member.generate(pixel_values, max_new_tokens=self.max_new_tokens)
                out.append(caption_labels(caption_ids(tokens, member.vocab), member.vocab.eos_token_id, device))
        return out

    def member_nll(self, adversarial: torch.Tensor, labels: Sequence[torch.Tensor]) -> torch.Tensor:
        """``nll_i = -log P_i(caption_i | x')`` of every member (differentiable in ``adversarial``).

        Shape:
            ``adversarial``: ``(B, 3, H, W)``; ``labels``: ``K`` tensors ``(B, T_i)``; returns ``(K, B)``.
        """
        rows = []
        for member, y in zip(self.members, labels, strict=True):
            rows.append(sequence_nll(member(adversarial, y).logits, y))
        return torch.stack(rows)

    def objective(
        self, adversarial: torch.Tensor, labels: Sequence[torch.Tensor], clean: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Eq. 6 per image (lower is better for the attacker), differentiable in ``adversarial``.

        Targeted: ``-log(sum_i alpha_i P_i(S | x'))``; non-targeted: ``log(sum_i alpha_i P_i(y_i | x'))``; plus
        ``lambda ||x' - x||_2^2`` when ``clean`` is given.

        Args:
            adversarial: Images ``x'`` in [0, 1]. Shape: ``(B, 3, H, W)``.
            labels: From :meth:`member_labels`. ``K`` tensors of shape ``(B, T_i)``.
            clean: The clean images ``x`` for the distance term. Shape: ``(B, 3, H, W)``.

        Returns:
            Shape: ``(B,)``.
        """
        log_p = ensemble_log_likelihood(self.member_nll(adversarial, labels), self.weights)
        value = -log_p if self.targeted else log_p
        if clean is not None and self.distance_weight > 0:
            value = value + self.distance_weight * (adversarial - clean).flatten(1).pow(2).sum(1)
        return value

    # -- the attack -----------------------------------------------------------------------------------------------
    def _check_call(self, pixel_values: torch.Tensor, targets: Sequence[Sequence[int]] | None) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise RobucapError(f"EnsembleAttack expects pixel_values (B, 3, H, W), got {tuple(pixel_values.shape)}")
        h, w = pixel_values.shape[-2:]
        if h != self.image_size or w != self.image_size:
            raise RobucapError(
                f"EnsembleAttack members take {self.image_size}x{self.image_size} images, got {h}x{w} (images are not "
                "resized)"
            )
        if not self.targeted:
            if targets is not None:
                raise RobucapError(
                    "a non-targeted EnsembleAttack takes no targets (each member is moved away from its own clean "
                    "caption): pass targets=None, or build the attack with targeted=True"
                )
            return
        if targets is None:
            raise RobucapError(
                "a targeted EnsembleAttack needs targets: per image the target caption's token ids without EOS "
                "(see modules.attacks.targets.target_caption_ids)"
            )
        if len(targets) != pixel_values.shape[0]:
            raise RobucapError(
                f"EnsembleAttack: expected one target per image ({pixel_values.shape[0]}), got {len(targets)}"
            )
        vocab_size = self.members[0].vocab.vocab_size
        for i, target in enumerate(targets):
            ids = list(target)
            if not ids:
                raise RobucapError(f"EnsembleAttack: the target of image {i} is empty (expected caption token ids)")
            if not all(isinstance(t, numbers.Integral) and 0 <= int(t) < vocab_size for t in ids):
                raise RobucapError(
                    f"EnsembleAttack: the target of image {i} must be token ids in [0, {vocab_size}), got {ids}"
                )

    def __call__(self, pixel_values: torch.Tensor, targets: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Adversarial images against the whole ensemble.

        Works under ``torch.inference_mode`` and ``no_grad`` callers; parameters' ``.grad`` are never touched.

        Args:
            pixel_values: Clean images in [0, 1]. Shape: ``(B, 3, H, W)``.
            targets: Targeted: per image the target caption's token ids without EOS (see
                :func:`~modules.attacks.targets.target_caption_ids`); non-targeted: ``None``.

        Returns:
            The adversarial images, detached, in [0, 1]. Shape: ``(B, 3, H, W)``.
        """
        with self._prepared(pixel_values, targets) as (x, labels):
            if self.method == "optimization":
                return self._optimize(x, labels).detach()
            return (x + self._fast_gradient_step(x, labels)).clamp(0.0, 1.0).detach()

    def perturbation(self, pixel_values: torch.Tensor, targets: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """The fast-gradient step ``x' - x`` before clipping to [0, 1] (``fg`` / ``fgs`` only; for inspection).

        Its L2 norm (``fg``) or L-infinity norm (``fgs``) is ``epsilon`` for every image with a non-zero gradient.

        Shape:
            ``pixel_values``: ``(B, 3, H, W)``; returns ``(B, 3, H, W)``.
        """
        if self.method == "optimization":
            raise RobucapError("EnsembleAttack.perturbation is defined for the fg and fgs methods only")
        with self._prepared(pixel_values, targets) as (x, labels):
            return self._fast_gradient_step(x, labels).detach()

    @contextmanager
    def _prepared(
        self, pixel_values: torch.Tensor, targets: Sequence[Sequence[int]] | None
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Checked inputs, members in eval mode and autograd on: yields the images and each member's labels."""
        self._check_call(pixel_values, targets)
        with torch.inference_mode(False), ExitStack() as stack:
            for member in self.members:
                stack.enter_context(eval_mode(member, self.use_eval_mode))
            # Tensors created under inference_mode cannot join autograd: clone them outside it.
            x = pixel_values.detach().clone()
            yield x, [y.clone() for y in self.member_labels(x, targets)]

    def _optimize(self, x: torch.Tensor, labels: list[torch.Tensor]) -> torch.Tensor:
        y = to_tanh_space(x)
        w = torch.zeros_like(x)
        adam = RowAdam(w, self.lr)
        rows = torch.arange(x.shape[0], device=x.device)
        for _ in range(self.iterations):
            w_var = w.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                objective = self.objective(from_tanh_space(y, w_var), labels, clean=x)
                # Each image's objective depends only on its own image (eval mode): one backward serves the batch.
                (grad,) = torch.autograd.grad(objective.sum(), [w_var])
            adam.step(grad.detach(), rows)
        return from_tanh_space(y, w).clamp(0.0, 1.0)

    def _fast_gradient_step(self, x: torch.Tensor, labels: list[torch.Tensor]) -> torch.Tensor:
        """``-eps * g / ||g||_2`` (fg) or ``-eps * sign(g)`` (fgs), ``g`` the objective's gradient at ``x``.

        Shape:
            ``x``: ``(B, 3, H, W)``; returns ``(B, 3, H, W)``.
        """
        diameter = math.sqrt(x[0].numel())
        if self.method == "fg" and self.epsilon > diameter:
            h, w = x.shape[-2:]
            raise RobucapError(
                f"EnsembleAttack fg epsilon {self.epsilon} (an L2 budget in [0, 1] pixel units) exceeds "
                f"sqrt(3*{h}*{w}) = {diameter:.1f}, the largest distance between two {h}x{w} images; was it given in "
                "0-255 units?"
            )
        x_var = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            # The distance term has zero gradient at x' = x: only the ensemble term gives the direction.
            (grad,) = torch.autograd.grad(self.objective(x_var, labels).sum(), [x_var])
        grad = grad.detach()
        if self.method == "fgs":
            return -self.epsilon * grad.sign()
        norm = grad.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, 1, 1, 1)
        # Descend the objective: towards the target (targeted), away from the clean captions (non-targeted).
        return -self.epsilon * grad / norm
