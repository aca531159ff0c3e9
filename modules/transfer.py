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
* ``ori_bleu4`` / ``tgt_bleu4``: Show-and-Fool's transfer scores (section 4.4, Table 4): corpus BLEU-4 of the
  adversarial captions against the captioner's own clean captions (``ori``, lower = more change) and against the
  target captions (``tgt``, higher = the target transferred; caption targets only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from datamodules.errors import RobucapError
from datamodules.text import caption_tokens, normalize_caption
from modules.captioning import CaptioningModule
from modules.evaluation import bleu_of

Target = str | Sequence[str]


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


def caption_images(module: CaptioningModule, images: torch.Tensor, batch_size: int = 64) -> list[str]:
    """Greedy captions of ``images`` by ``module``, in batches on the module's device.

    Shape:
        ``images``: ``(N, 3, H, W)`` in [0, 1].
    """
    if batch_size < 1:
        raise RobucapError(f"batch_size must be >= 1, got {batch_size}")
    module.eval()
    device = next(module.parameters()).device
    captions: list[str] = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            captions += module.caption(images[start : start + batch_size].to(device))
    return captions


def hits_target(caption: str, target: Target) -> bool:
    """The caption is the target caption (normalised, exact) or, for a keyword list, contains every keyword."""
    if isinstance(target, str):
        return normalize_caption(caption) == normalize_caption(target)
    words = set(caption_tokens(caption))
    return all(normalize_caption(k) in words for k in target)


def _records(captions: Sequence[str], references: Sequence[Sequence[str]], image_ids: Sequence[Any]) -> list[dict]:
    return [
        {"image_id": i, "prediction": c, "references": list(r)}
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


def evaluate_transfer(
    module: CaptioningModule,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Any],
    targets: Sequence[Target] | None = None,
    batch_size: int = 64,
    clean_captions: Sequence[str] | None = None,
    return_captions: bool = False,
) -> dict[str, Any]:
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
        return_captions: Also return ``clean_captions`` and ``adversarial_captions``.

    Returns:
        ``{"bleu4_clean", "bleu4_adv", "bleu4_drop", "changed", "target_hit", "target_hit_clean", "ori_bleu4",
        "tgt_bleu4", "n"}``; ``target_hit`` and ``target_hit_clean`` are ``None`` without targets, ``tgt_bleu4`` is
        ``None`` unless every target is a caption.

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
    adversarial_captions = caption_images(module, adversarial, batch_size)
    ids = list(image_ids)
    bleu_clean = bleu_of(_records(clean_captions, references, ids))["bleu4"]
    bleu_adv = bleu_of(_records(adversarial_captions, references, ids))["bleu4"]
    changed = [
        normalize_caption(a) != normalize_caption(c) for a, c in zip(adversarial_captions, clean_captions, strict=True)
    ]
    cell: dict[str, Any] = {
        "bleu4_clean": bleu_clean,
        "bleu4_adv": bleu_adv,
        "bleu4_drop": bleu_clean - bleu_adv,
        "changed": sum(changed) / n,
        "target_hit": None,
        "target_hit_clean": None,
        "ori_bleu4": bleu_of(_records(adversarial_captions, [[c] for c in clean_captions], ids))["bleu4"],
        "tgt_bleu4": None,
        "n": n,
    }
    if targets is not None:
        cell["target_hit"] = sum(hits_target(a, t) for a, t in zip(adversarial_captions, targets, strict=True)) / n
        cell["target_hit_clean"] = sum(hits_target(c, t) for c, t in zip(clean_captions, targets, strict=True)) / n
        if all(isinstance(t, str) for t in targets):
            cell["tgt_bleu4"] = bleu_of(_records(adversarial_captions, [[t] for t in targets], ids))["bleu4"]
    if return_captions:
        cell["clean_captions"] = list(clean_captions)
        cell["adversarial_captions"] = adversarial_captions
    return cell


def transfer_matrix(
    sources: Mapping[str, torch.Tensor],
    models: Mapping[str, CaptioningModule],
    clean: torch.Tensor,
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Any],
    targets: Sequence[Target] | Mapping[str, Sequence[Target]] | None = None,
    batch_size: int = 64,
    clean_captions: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
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
        ``matrix[source][model]``: the :func:`evaluate_transfer` cell plus ``rmsd``, the mean RMSD (0-255) of the
        source's images.

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
    matrix: dict[str, dict[str, dict[str, Any]]] = {}
    for source, adversarial in sources.items():
        source_targets = targets[source] if isinstance(targets, Mapping) else targets
        rmsd = float(rmsd_255(clean, adversarial).mean())
        matrix[source] = {}
        for name, module in models.items():
            cell = evaluate_transfer(
                module, clean, adversarial, references, image_ids, source_targets, batch_size, captions[name]
            )
            matrix[source][name] = {**cell, "rmsd": rmsd}
    return matrix
