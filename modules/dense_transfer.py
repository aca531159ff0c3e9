"""Where a DAG perturbation goes besides its own victim (Xie et al. 2017, section 4): transfer and into captioning.

* :func:`transfer_row`: a source's perturbations ``r`` (one per image) added to the clean images and scored by
  another victim, with the permuted control (``r``'s rows and columns permuted, the same draws as Table 1). The
  paper's Tables 3-5 measure transfer across training data, architectures and tasks this way.
* :func:`summed_perturbation`: the paper's heterogeneous perturbation, ``r_det + r_seg`` (section 4.3), clipped so
  the image stays in [0, 1].
* :func:`caption_shift`: do a dense victim's perturbations change a captioner's captions? The captioner captions
  the clean images and the perturbed ones (both resized to its input side with the same antialiased resampling),
  next to a **noise control**: Gaussian noise scaled per image to the L2 norm of ``r`` (at the dense victims'
  resolution), clipped alike. Beyond the paper: it asks whether the structure DAG puts into ``r`` matters to a
  model of another task than the one it was made for.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F

from datamodules.errors import RobucapError
from datamodules.text import normalize_caption
from modules.attacks.dag import perceptibility
from modules.captioning import CaptioningModule
from modules.captions import caption_images
from modules.dense_victims_eval import PERMUTATION_DRAWS, Scorer, permute_rows_columns
from modules.evaluation import bleu_of
from modules.records import CaptionedImage

__all__ = [
    "RELATIONS",
    "CaptionShift",
    "TransferRow",
    "caption_shift",
    "noise_like",
    "resize_images",
    "summed_perturbation",
    "transfer_row",
]

RELATIONS = ("white-box", "training run", "architecture", "task", "summed")
"""How a transfer row's target relates to its source: itself, another training run (seed) of the same architecture,
another architecture of the same task, the other task, or a summed perturbation on a model it was not made on."""


@dataclass(frozen=True)
class TransferRow:
    """A source's DAG perturbations scored by a target victim.

    Attributes:
        source: The victim (or ``+``-joined victims, summed) that made ``r``.
        target: The victim scored.
        relation: One of :data:`RELATIONS`.
        metric: ``map50`` (detector) or ``miou`` (segmenter).
        clean: The target's score on the clean images.
        perturbed: Its score on ``clip(x + r)``.
        permuted: Its score on ``clip(x + P(r))``, averaged over :data:`PERMUTATION_DRAWS` draws.
        n: Images scored.
        p: Mean perceptibility of ``r`` (Xie et al. 2017, section 3.5.3), [0, 1] units.
    """

    source: str
    target: str
    relation: str
    metric: str
    clean: float
    perturbed: float
    permuted: float
    n: int
    p: float

    @property
    def drop(self) -> float:
        """``clean - perturbed``."""
        return self.clean - self.perturbed

    def to_json(self) -> dict[str, Any]:
        """The row as ``results.json`` stores it (``drop`` included)."""
        return {**asdict(self), "drop": self.drop}


def summed_perturbation(clean: torch.Tensor, *perturbations: torch.Tensor) -> torch.Tensor:
    """``clip(x + sum r_i) - x``: perturbations of several victims added, the image kept in [0, 1].

    Shape:
        ``clean`` and each perturbation: ``(N, 3, H, W)``; returns ``(N, 3, H, W)``.

    Raises:
        RobucapError: No perturbation, or one of another shape than the images.
    """
    if not perturbations or any(r.shape != clean.shape for r in perturbations):
        raise RobucapError(
            f"summed perturbations need one or more perturbations shaped like the images {tuple(clean.shape)}, got "
            f"{[tuple(r.shape) for r in perturbations]}"
        )
    return (clean + sum(perturbations)).clamp(0.0, 1.0) - clean


def _mean_p(r: torch.Tensor) -> float:
    l2 = r.double().flatten(1).norm(dim=1)
    return float(perceptibility(l2, r.shape[-2] * r.shape[-1]).mean())


def transfer_row(
    source: str,
    target: str,
    relation: str,
    clean: torch.Tensor,
    r: torch.Tensor,
    score: Scorer,
    metric: str,
    seed: int = 0,
) -> TransferRow:
    """Score ``target`` on the clean images, on ``clip(x + r)`` and on the permuted control.

    Args:
        source: Name of the victim(s) that made ``r``.
        target: Name of the victim ``score`` scores.
        relation: One of :data:`RELATIONS`.
        clean: Clean images in [0, 1], in the order of the scorer's ground truth. Shape: ``(N, 3, H, W)``.
        r: The perturbations. Shape: ``(N, 3, H, W)``.
        score: The target's scorer (:func:`~modules.dense_victims_eval.detector_scorer` or ``segmenter_scorer``).
        metric: The scorer's metric reported (``map50`` or ``miou``).
        seed: Seed of the permutation draws (the same seed gives Table 1's draws).

    Raises:
        RobucapError: An unknown relation, or ``r`` not shaped like the images.
    """
    if relation not in RELATIONS:
        raise RobucapError(f"transfer relation must be one of {', '.join(RELATIONS)}, got {relation!r}")
    if r.shape != clean.shape:
        raise RobucapError(f"perturbations {tuple(r.shape)} must be shaped like the images {tuple(clean.shape)}")
    clean_score = score(clean)[0][metric]
    perturbed = score((clean + r).clamp(0.0, 1.0))[0][metric]
    generator = torch.Generator().manual_seed(int(seed))
    draws = [
        score((clean + permute_rows_columns(r, generator)).clamp(0.0, 1.0))[0][metric] for _ in range(PERMUTATION_DRAWS)
    ]
    return TransferRow(
        source, target, relation, metric, clean_score, perturbed, sum(draws) / len(draws), clean.shape[0], _mean_p(r)
    )


def noise_like(r: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise with each image's L2 norm equal to that of ``r`` (zero where ``r`` is zero).

    Shape:
        ``r``: ``(N, C, H, W)``; returns ``(N, C, H, W)``.
    """
    noise = torch.randn(r.shape, generator=generator, dtype=torch.float64)
    scale = r.double().flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1).clamp_min(1e-12)
    return (noise * scale.view(-1, *([1] * (r.dim() - 1)))).to(r.dtype).to(r.device)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images resampled to ``size`` × ``size`` (bilinear, antialiased when shrinking), kept in [0, 1].

    Shape:
        ``images``: ``(N, 3, H, W)``; returns ``(N, 3, size, size)``.
    """
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized.clamp(0.0, 1.0)


@dataclass(frozen=True)
class CaptionShift:
    """What a perturbation made for a dense victim does to a captioner, next to noise of the same L2 norm.

    Attributes:
        perturbation: Which victim(s) made it (``detector``, ``segmenter``, ``detector+segmenter``).
        n: Images captioned.
        p: Mean perceptibility of the perturbation at the dense victims' resolution, [0, 1] units.
        changed: Share of greedy captions that changed (normalised text) on the perturbed images.
        bleu4_clean: Corpus BLEU-4 of the clean captions against the references.
        bleu4_perturbed: The same on the perturbed images.
        noise_p: Mean perceptibility of the noise control after clipping.
        noise_changed: Share of captions changed by the noise control.
        noise_bleu4: BLEU-4 on the noise control.
    """

    perturbation: str
    n: int
    p: float
    changed: float
    bleu4_clean: float
    bleu4_perturbed: float
    noise_p: float
    noise_changed: float
    noise_bleu4: float

    @property
    def bleu4_drop(self) -> float:
        """``bleu4_clean - bleu4_perturbed``."""
        return self.bleu4_clean - self.bleu4_perturbed

    @property
    def noise_bleu4_drop(self) -> float:
        """``bleu4_clean - noise_bleu4``."""
        return self.bleu4_clean - self.noise_bleu4

    def to_json(self) -> dict[str, Any]:
        """The row as ``results.json`` stores it (the drops included)."""
        return {**asdict(self), "bleu4_drop": self.bleu4_drop, "noise_bleu4_drop": self.noise_bleu4_drop}


def _bleu4(captions: Sequence[str], references: Sequence[Sequence[str]], ids: Sequence[Hashable]) -> float:
    records = [
        CaptionedImage(image_id=i, prediction=c, references=list(r))
        for i, c, r in zip(ids, captions, references, strict=True)
    ]
    return bleu_of(records)["bleu4"]


def _changed(before: Sequence[str], after: Sequence[str]) -> float:
    return sum(normalize_caption(a) != normalize_caption(b) for a, b in zip(before, after, strict=True)) / len(before)


def caption_shift(
    module: CaptioningModule,
    perturbation: str,
    clean: torch.Tensor,
    r: torch.Tensor,
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Hashable],
    seed: int = 0,
    batch_size: int = 64,
    clean_captions: Sequence[str] | None = None,
) -> CaptionShift:
    """Greedy captions of the clean, perturbed and noise-control images, compared.

    Args:
        module: The captioner (its ``image_size`` is the side the images are resized to).
        perturbation: Name of the perturbation's maker.
        clean: Clean images at the dense victims' resolution, in [0, 1]. Shape: ``(N, 3, H, W)``.
        r: The perturbations. Shape: ``(N, 3, H, W)``.
        references: Reference captions of each image.
        image_ids: One unique id per image.
        seed: Seed of the noise control.
        batch_size: Images captioned at once.
        clean_captions: The captioner's greedy captions of ``clean`` when already known (several perturbations of
            the same images), else they are made here.

    Raises:
        RobucapError: No images, references or ids not one per image, or ``r`` not shaped like the images.
    """
    n = clean.shape[0]
    if n == 0 or len(references) != n or len(set(image_ids)) != n or len(image_ids) != n:
        raise RobucapError(
            f"caption_shift needs images with one reference list and one unique id each; got {n} images, "
            f"{len(references)} reference lists and {len(set(image_ids))} distinct ids"
        )
    if r.shape != clean.shape:
        raise RobucapError(f"perturbations {tuple(r.shape)} must be shaped like the images {tuple(clean.shape)}")
    side = int(module.hparams.image_size)
    perturbed = (clean + r).clamp(0.0, 1.0)
    noisy = (clean + noise_like(r, torch.Generator().manual_seed(int(seed)))).clamp(0.0, 1.0)

    def captions(images: torch.Tensor) -> list[str]:
        return caption_images(module, resize_images(images, side), batch_size, num_beams=1)

    before = list(clean_captions) if clean_captions is not None else captions(clean)
    after, noise = captions(perturbed), captions(noisy)
    return CaptionShift(
        perturbation=perturbation,
        n=n,
        p=_mean_p(perturbed - clean),
        changed=_changed(before, after),
        bleu4_clean=_bleu4(before, references, image_ids),
        bleu4_perturbed=_bleu4(after, references, image_ids),
        noise_p=_mean_p(noisy - clean),
        noise_changed=_changed(before, noise),
        noise_bleu4=_bleu4(noise, references, image_ids),
    )
