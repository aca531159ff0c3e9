"""Attack a set of images and score what the captioners make of them: the evaluation behind ``robucap attack``.

* :func:`attack_images` runs an untargeted attack (FGSM, FGSM-RS, PGD, FG; Rashid & Rivas 2024) over a loader's
  batches, white-box against one captioner and each image's first reference caption;
* :func:`run_ensemble` runs Liu et al.'s (2017) ensemble attack crafted on some captioners and evaluates the same
  adversarial images on every captioner (the held-out one plays the black box);
* :func:`evaluate_attack` captions clean and adversarial images with one captioner
  (:func:`~modules.transfer.evaluate_transfer`) and returns the scores with one :class:`CaptionedImage` per image.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from datamodules.errors import RobucapError
from datamodules.text import normalize_caption
from modules.attacks.protocol import Attack
from modules.attacks.targets import choose_targets, target_caption_ids
from modules.captioning import CaptioningModule
from modules.captions import attack_references
from modules.records import CaptionedImage
from modules.targeted_eval import greedy_captions
from modules.transfer import evaluate_transfer, hits_target, rmsd_255
from modules.victims.captioner import caption_ensemble

__all__ = ["AttackEvaluation", "EnsembleRun", "attack_images", "ensemble_targets", "evaluate_attack", "run_ensemble"]


@dataclass
class AttackEvaluation:
    """One captioner's captions of clean and adversarial images, scored.

    Attributes:
        bleu4_clean: Corpus BLEU-4 of the clean images' captions against the references.
        bleu4_adv: The same for the adversarial images' captions.
        changed: Share of images whose caption changed (normalised text).
        rmsd: Mean RMSD of the adversarial images, 0-255 scale (Liu et al. 2017).
        target_rate: Share of adversarial captions that meet their target; ``None`` when untargeted.
        n: Images evaluated.
        records: One per image: clean and adversarial caption, references, ``changed``, ``rmsd``, ``linf``, ``l2``
            and, when targeted, ``target`` and ``success``.
    """

    bleu4_clean: float
    bleu4_adv: float
    changed: float
    rmsd: float
    target_rate: float | None
    n: int
    records: list[CaptionedImage] = field(repr=False)

    def scores(self) -> dict[str, Any]:
        """The figures without the records, JSON-ready."""
        return {k: v for k, v in asdict(self).items() if k != "records"}


def attack_images(
    module: CaptioningModule, batches: Iterable[dict[str, Any]], attack: Attack, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an untargeted attack on every batch, against each image's first reference caption.

    Args:
        module: The white-box captioner.
        batches: Collated batches with ``pixel_values`` and ``labels``.
        attack: The attack.
        limit: Stop after this many images (``None``: all).

    Returns:
        The clean and the adversarial images, on the CPU.

    Shape:
        Both ``(N, 3, H, W)`` in [0, 1].
    """
    device = next(module.parameters()).device
    clean: list[torch.Tensor] = []
    adversarial: list[torch.Tensor] = []
    for batch in batches:
        images = batch["pixel_values"].to(device)
        adversarial.append(attack_references(module, attack, images, batch["labels"]).cpu())
        clean.append(images.cpu())
    if not clean:
        raise RobucapError("attack_images: no images to attack")
    return torch.cat(clean)[:limit], torch.cat(adversarial)[:limit]


def evaluate_attack(
    module: CaptioningModule,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Hashable],
    targets: Sequence[str] | None = None,
    batch_size: int = 64,
) -> AttackEvaluation:
    """Caption ``clean`` and ``adversarial`` with ``module`` and score the change.

    Args:
        module: The captioner evaluated (white box or black box alike).
        clean: Clean images in [0, 1]. Shape: ``(N, 3, H, W)``.
        adversarial: Their adversarial versions. Shape: ``(N, 3, H, W)``.
        references: The reference captions of every image.
        image_ids: One unique id per image.
        targets: One target caption per image for a targeted attack, else ``None``.
        batch_size: Images captioned at once.

    Raises:
        RobucapError: What :func:`~modules.transfer.evaluate_transfer` rejects.
    """
    cell = evaluate_transfer(module, clean, adversarial, references, image_ids, targets, batch_size=batch_size)
    delta = (adversarial.double() - clean.double()).flatten(1)
    rmsd = rmsd_255(clean, adversarial).tolist()
    linf, l2 = delta.abs().amax(1).tolist(), delta.norm(dim=1).tolist()
    records = []
    for k, (image_id, refs) in enumerate(zip(image_ids, references, strict=True)):
        before, after = cell.clean_captions[k], cell.adversarial_captions[k]
        target = None if targets is None else targets[k]
        records.append(
            CaptionedImage(
                image_id=image_id,
                prediction=after,
                references=list(refs),
                clean=before,
                target=target,
                success=None if target is None else hits_target(after, target),
                changed=normalize_caption(before) != normalize_caption(after),
                rmsd=rmsd[k],
                linf=linf[k],
                l2=l2[k],
                index=k,
            )
        )
    return AttackEvaluation(
        bleu4_clean=cell.bleu4_clean,
        bleu4_adv=cell.bleu4_adv,
        changed=cell.changed,
        rmsd=cell.rmsd,
        target_rate=cell.target_hit,
        n=cell.n,
        records=records,
    )


@dataclass
class EnsembleRun:
    """Liu et al.'s (2017) ensemble attack on a set of images, evaluated on every captioner.

    Attributes:
        adversarial: The adversarial images, on the CPU. Shape: ``(N, 3, H, W)``.
        targets: The target caption of every image; ``None`` when untargeted.
        models: One evaluation per captioner, in the order given.
    """

    adversarial: torch.Tensor
    targets: list[str] | None
    models: list[AttackEvaluation]


def ensemble_targets(
    module: CaptioningModule, images: torch.Tensor, target: str | None, seed: int, max_new_tokens: int
) -> list[str]:
    """One target caption per image: ``target`` for all, else Show-and-Fool-style targets from ``module``'s captions.

    Raises:
        RobucapError: A target the vocabulary cannot express, or no paper-style target for some image.
    """
    if target is not None:
        target_caption_ids(module.tokenizer, target)
        return [target] * images.shape[0]
    clean = greedy_captions(module, images, max_new_tokens)
    return [str(t) for t in choose_targets(clean, 0, seed)]


def run_ensemble(
    modules: Sequence[CaptioningModule],
    members: Sequence[int],
    attack: Attack,
    images: torch.Tensor,
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Hashable],
    targets: Sequence[str] | None = None,
    batch_size: int = 32,
    objective: str = "mixture",
    margin: float = 1.0,
) -> EnsembleRun:
    """Craft adversarial images on the ensemble of ``members`` and evaluate them on every one of ``modules``.

    Args:
        modules: Every captioner (members and held-out ones); the first member's tokenizer encodes the targets.
        members: Indices of the captioners the attack is crafted on (the ensemble).
        attack: Liu et al.'s (2017) method: ``optimization``, ``fg`` or ``fgs`` (:func:`~modules.attacks.build_attack`),
            run on the members' ensemble objective (:func:`~modules.victims.captioner.caption_ensemble`).
        images: Clean images in [0, 1]. Shape: ``(N, 3, H, W)``.
        references: The reference captions of every image.
        image_ids: One unique id per image.
        targets: One target caption per image for a targeted attack.
        batch_size: Images attacked (and captioned) at once.
        objective: How the members combine (``mixture``, ``sum_loglik``, ``sum_margin``; :func:`caption_ensemble`).
        margin: Confidence ``kappa`` of the ``sum_margin`` members.

    Raises:
        RobucapError: Targets not one per image, a target the vocabulary cannot express, or what
            :func:`evaluate_attack` rejects.
    """
    if targets is not None and len(targets) != images.shape[0]:
        raise RobucapError(f"run_ensemble: expected one target per image ({images.shape[0]}), got {len(targets)}")
    first = modules[members[0]]
    captioners = [modules[i].captioner for i in members]
    device = next(first.parameters()).device
    adversarial = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        ids = (
            None
            if targets is None
            else [target_caption_ids(first.tokenizer, t) for t in targets[start : start + len(x)]]
        )
        goal = caption_ensemble(
            captioners, x, ids, max_new_tokens=first.hparams.max_new_tokens, objective=objective, margin=margin
        )
        adversarial.append(attack(goal, x).adversarial.cpu())
    adv = torch.cat(adversarial)
    evaluations = [evaluate_attack(m, images, adv, references, image_ids, targets, batch_size) for m in modules]
    return EnsembleRun(adversarial=adv, targets=None if targets is None else list(targets), models=evaluations)
