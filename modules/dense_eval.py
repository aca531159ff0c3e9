"""Dense Adversary Generation (Xie et al. 2017) on a captioner, scored: the evaluation behind ``robucap attack dag``.

DAG attacks a captioner token by token (:class:`~modules.victims.captioner_dense.TokenObjective`): the targets are
the content words of its clean greedy caption, each pushed to another word of its class (colour, shape, size on the
shapes data). :func:`attack_tokens` runs it over a set of images and reports

* ``token_flip_rate``: targets no longer the captioner's top-1 word on the adversarial image (teacher-forced on the
  clean caption, as DAG attacks them), over all targets;
* ``changed``: share of images whose greedy caption changed (normalised text); ``bleu4_clean`` / ``bleu4_adv`` /
  ``bleu4_drop``: corpus BLEU-4 of the greedy captions against the references;
* ``p``: Xie et al.'s perceptibility ``sqrt(1/K sum_k ||r_k||^2)`` in [0, 1] units, ``iterations``, ``linf`` (means
  over the images), ``success``: share of images left with no target classified as its true word;
* ``fgsm``: FGSM (untargeted, on the same clean greedy caption) at the L-infinity norm of DAG's mean perturbation,
  its ``changed`` and BLEU-4 drop: what a one-step attack of the same size does.

Captions are greedy whatever decoding the checkpoint is set for: DAG's targets come from the greedy caption, and a
flipped target then changes the greedy caption (decoding reaches the flipped position with the clean prefix, or
diverged before it). An image whose caption has no target (no content word of a permutable class) is not attacked
and not scored; it is counted in ``skipped``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from datamodules.errors import RobucapError
from datamodules.text import normalize_caption
from modules.attacks import build_attack
from modules.attacks.dag import DAG, perceptibility
from modules.attacks.protocol import eval_mode
from modules.captioning import CaptioningModule
from modules.captions import caption_images
from modules.evaluation import bleu_of
from modules.records import CaptionedImage
from modules.victims.captioner import CaptionObjective, caption_labels, greedy_ids
from modules.victims.captioner_dense import TokenObjective

__all__ = ["FgsmComparison", "NoTargetError", "TokenDagEvaluation", "TokenDagImage", "attack_tokens"]


class NoTargetError(RobucapError):
    """No image's greedy caption has a content word DAG can push to another word of its class."""


@dataclass(frozen=True)
class TokenDagImage:
    """One image under DAG on a captioner.

    Attributes:
        image_id: The dataset's id of the image.
        index: Its row in the images given to :func:`attack_tokens`.
        clean: The greedy caption of the clean image.
        adversarial: The greedy caption of the adversarial image.
        references: The dataset's captions of the image.
        targets: Content-word positions attacked (0: not attacked, see ``skipped``).
        fooled: Targets no longer classified as their true word on the adversarial image.
        iterations: DAG steps taken.
        success: No target left classified as its true word.
        changed: The greedy caption changed (normalised text).
        linf: ``||r||_inf`` in [0, 1] units.
        l2: ``||r||_2`` over all channels, [0, 1] units.
        p: Perceptibility ``l2 / sqrt(H * W)`` (Xie et al. 2017, section 3.5.3).
    """

    image_id: Hashable
    index: int
    clean: str
    adversarial: str
    references: list[str]
    targets: int
    fooled: int
    iterations: int
    success: bool
    changed: bool
    linf: float
    l2: float
    p: float

    def to_json(self) -> dict[str, Any]:
        """The record as ``results.json`` stores it."""
        return asdict(self)


@dataclass(frozen=True)
class FgsmComparison:
    """FGSM on the same images at DAG's mean L-infinity norm.

    Attributes:
        epsilon: FGSM's budget: the mean ``linf`` of DAG's perturbations, [0, 1] units.
        changed: Share of images whose greedy caption changed.
        bleu4_adv: Corpus BLEU-4 of the greedy captions of FGSM's images.
        bleu4_drop: ``bleu4_clean - bleu4_adv``.
        p: Mean perceptibility of FGSM's perturbations (a signed step moves every pixel, so it is larger than DAG's).
        captions: The greedy caption of every FGSM image (not part of :meth:`to_json`).
    """

    epsilon: float
    changed: float
    bleu4_adv: float
    bleu4_drop: float
    p: float
    captions: list[str] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """The figures without the captions."""
        return {k: v for k, v in asdict(self).items() if k != "captions"}


@dataclass
class TokenDagEvaluation:
    """DAG on a captioner over a set of images (see the module docstring for each figure).

    Attributes:
        token_flip_rate: ``fooled / targets`` summed over the attacked images.
        changed: Share of attacked images whose greedy caption changed.
        bleu4_clean: Corpus BLEU-4 of the clean greedy captions of the attacked images.
        bleu4_adv: The same on their adversarial images.
        bleu4_drop: ``bleu4_clean - bleu4_adv``.
        p: Mean perceptibility, [0, 1] units.
        iterations: Mean DAG steps per attacked image.
        success: Share of attacked images with no target left classified as its true word.
        linf: Mean ``||r||_inf``, [0, 1] units.
        targets: Targets over all attacked images.
        fooled: Of them, flipped on the adversarial images.
        n: Images attacked.
        skipped: Images not attacked: their clean caption has no target.
        fgsm: The FGSM comparison; ``None`` when not asked for.
        images: One record per image given, skipped ones included (``targets == 0``).
        clean_images: The images given, on the CPU. Shape: ``(N, 3, H, W)``.
        adversarial: DAG's adversarial images, on the CPU (a skipped image unchanged). Shape: ``(N, 3, H, W)``.
    """

    token_flip_rate: float
    changed: float
    bleu4_clean: float
    bleu4_adv: float
    bleu4_drop: float
    p: float
    iterations: float
    success: float
    linf: float
    targets: int
    fooled: int
    n: int
    skipped: int
    fgsm: FgsmComparison | None
    images: list[TokenDagImage] = field(repr=False)
    clean_images: torch.Tensor = field(repr=False)
    adversarial: torch.Tensor = field(repr=False)

    def scores(self) -> dict[str, Any]:
        """The figures, JSON-ready: no records, no images; ``fgsm`` as its own block."""
        skip = {"images", "clean_images", "adversarial", "fgsm"}
        out = {k: v for k, v in asdict(self).items() if k not in skip}
        out["fgsm"] = None if self.fgsm is None else self.fgsm.to_json()
        return out

    @property
    def attacked(self) -> list[TokenDagImage]:
        """The records of the attacked images."""
        return [r for r in self.images if r.targets > 0]


@dataclass
class _Crafted:
    """DAG's raw output over all images, before captioning and scoring."""

    ids: list[list[int]]
    adversarial: torch.Tensor
    targets: torch.Tensor
    fooled: torch.Tensor
    iterations: torch.Tensor
    success: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor


def _craft(
    module: CaptioningModule, images: torch.Tensor, attack: DAG, seed: int, batch_size: int, shrink_only: bool
) -> _Crafted:
    """Run DAG chunk by chunk; image ``k``'s word permutation is seeded with ``seed + k`` whatever its chunk."""
    device = next(module.parameters()).device
    captioner, max_new_tokens = module.captioner, int(module.hparams.max_new_tokens)
    keys = ("adv", "targets", "fooled", "iter", "success", "linf", "l2")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    ids: list[list[int]] = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        with eval_mode(captioner):
            own = greedy_ids(captioner, x, max_new_tokens)
        seeds = [seed + start + i for i in range(x.shape[0])]
        objective = TokenObjective(captioner, module.tokenizer, own, seeds=seeds, shrink_only=shrink_only)
        result = attack(objective, x)
        with eval_mode(captioner):
            fooled = objective.fooled_counts(result.adversarial)
        ids += own
        parts["adv"].append(result.adversarial.detach().cpu())
        parts["targets"].append(objective.target_counts())
        parts["fooled"].append(fooled)
        parts["iter"].append(result.iterations.cpu())
        parts["success"].append(result.success.cpu())
        parts["linf"].append(result.linf.double().cpu())
        parts["l2"].append(result.l2.double().cpu())
    joined = {k: torch.cat(v) for k, v in parts.items()}
    return _Crafted(
        ids, joined["adv"], joined["targets"], joined["fooled"], joined["iter"], joined["success"], joined["linf"],
        joined["l2"],
    )  # fmt: skip


def _bleu4(captions: Sequence[str], references: Sequence[Sequence[str]], image_ids: Sequence[Hashable]) -> float:
    records = [
        CaptionedImage(image_id=i, prediction=c, references=list(r))
        for c, r, i in zip(captions, references, image_ids, strict=True)
    ]
    return bleu_of(records)["bleu4"]


def _changed(before: Sequence[str], after: Sequence[str]) -> list[bool]:
    return [normalize_caption(a) != normalize_caption(b) for a, b in zip(after, before, strict=True)]


def _fgsm(
    module: CaptioningModule,
    images: torch.Tensor,
    ids: Sequence[Sequence[int]],
    epsilon: float,
    batch_size: int,
) -> torch.Tensor:
    """FGSM against each image's clean greedy caption (raise its cross-entropy) at ``epsilon``; on the CPU.

    Shape:
        ``images``: ``(n, 3, H, W)``; returns the same.
    """
    device = next(module.parameters()).device
    attack = build_attack("fgsm", epsilon)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        labels = caption_labels(ids[start : start + x.shape[0]], module.captioner.vocab.eos_token_id, device)
        objective = CaptionObjective(module.captioner, labels, max_new_tokens=int(module.hparams.max_new_tokens))
        out.append(attack(objective, x).adversarial.detach().cpu())
    return torch.cat(out)


def attack_tokens(
    module: CaptioningModule,
    images: torch.Tensor,
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Hashable],
    attack: DAG,
    seed: int = 0,
    batch_size: int = 32,
    shrink_only: bool = False,
    compare_fgsm: bool = True,
) -> TokenDagEvaluation:
    """DAG on ``module``'s captioner over ``images``, scored (see the module docstring), with FGSM next to it.

    Args:
        module: The white-box captioner.
        images: Clean images in [0, 1]. Shape: ``(N, 3, H, W)``.
        references: The reference captions of every image.
        image_ids: One unique id per image.
        attack: The DAG attack (its ``gamma`` and ``max_iterations``).
        seed: Image ``k``'s adversarial words are drawn with seed ``seed + k``.
        batch_size: Images attacked and captioned at once.
        shrink_only: Targets that left the active set never come back (default: the paper's Algorithm 1).
        compare_fgsm: Also run FGSM at DAG's mean L-infinity norm.

    Raises:
        RobucapError: No images, references or ids not one per image, or repeated ids.
        NoTargetError: No image whose caption has a target.
    """
    n = images.shape[0]
    if n == 0 or len(references) != n or len(image_ids) != n or len(set(image_ids)) != n:
        raise RobucapError(
            f"attack_tokens needs at least one image and one reference list and one unique id per image; got {n} "
            f"images, {len(references)} reference lists and {len(set(image_ids))} distinct ids"
        )
    crafted = _craft(module, images, attack, seed, batch_size, shrink_only)
    attacked = [k for k in range(n) if int(crafted.targets[k]) > 0]
    if not attacked:
        raise NoTargetError(
            f"none of the {n} images' greedy captions has a content word to attack (the captioner says nothing "
            "a word class can change); attack more images or a trained checkpoint"
        )
    max_new_tokens = int(module.hparams.max_new_tokens)
    clean_captions = caption_images(module, images, batch_size, num_beams=1, max_new_tokens=max_new_tokens)
    adversarial_captions = caption_images(
        module, crafted.adversarial, batch_size, num_beams=1, max_new_tokens=max_new_tokens
    )
    changed = _changed(clean_captions, adversarial_captions)
    pixels = images.shape[-2] * images.shape[-1]
    p = perceptibility(crafted.l2, pixels)
    records = [
        TokenDagImage(
            image_id=image_ids[k],
            index=k,
            clean=clean_captions[k],
            adversarial=adversarial_captions[k],
            references=list(references[k]),
            targets=int(crafted.targets[k]),
            fooled=int(crafted.fooled[k]),
            iterations=int(crafted.iterations[k]),
            success=bool(crafted.success[k]),
            changed=changed[k],
            linf=float(crafted.linf[k]),
            l2=float(crafted.l2[k]),
            p=float(p[k]),
        )
        for k in range(n)
    ]
    picked = torch.tensor(attacked)
    refs, ids = [list(references[k]) for k in attacked], [image_ids[k] for k in attacked]
    bleu_clean = _bleu4([clean_captions[k] for k in attacked], refs, ids)
    bleu_adv = _bleu4([adversarial_captions[k] for k in attacked], refs, ids)
    linf = float(crafted.linf[picked].mean())
    fgsm = None
    if compare_fgsm and linf > 0:
        fgsm_images = _fgsm(module, images[picked], [crafted.ids[k] for k in attacked], linf, batch_size)
        fgsm_captions = caption_images(module, fgsm_images, batch_size, num_beams=1, max_new_tokens=max_new_tokens)
        fgsm_bleu = _bleu4(fgsm_captions, refs, ids)
        fgsm_l2 = (fgsm_images.double() - images[picked].cpu().double()).flatten(1).norm(dim=1)
        fgsm = FgsmComparison(
            epsilon=linf,
            changed=sum(_changed([clean_captions[k] for k in attacked], fgsm_captions)) / len(attacked),
            bleu4_adv=fgsm_bleu,
            bleu4_drop=bleu_clean - fgsm_bleu,
            p=float(perceptibility(fgsm_l2, pixels).mean()),
            captions=fgsm_captions,
        )
    targets, fooled = int(crafted.targets.sum()), int(crafted.fooled.sum())
    return TokenDagEvaluation(
        token_flip_rate=fooled / targets,
        changed=sum(changed[k] for k in attacked) / len(attacked),
        bleu4_clean=bleu_clean,
        bleu4_adv=bleu_adv,
        bleu4_drop=bleu_clean - bleu_adv,
        p=float(p[picked].mean()),
        iterations=float(crafted.iterations[picked].double().mean()),
        success=float(crafted.success[picked].double().mean()),
        linf=linf,
        targets=targets,
        fooled=fooled,
        n=len(attacked),
        skipped=n - len(attacked),
        fgsm=fgsm,
        images=records,
        clean_images=images.detach().cpu(),
        adversarial=crafted.adversarial,
    )
