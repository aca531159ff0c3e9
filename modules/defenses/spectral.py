"""Spectral signatures (Tran et al., NeurIPS 2018): poisoned samples stand out along the top singular direction of
the learned representation.

A backdoored model must represent "carries the trigger" somewhere in its encoder features; with enough poisoned
samples that direction dominates the centred feature covariance. Each sample's score is its squared projection on
the top right singular vector of the centred feature matrix; the highest scores are the suspects.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from datamodules.errors import RobucapError
from modules.captioners.base import Captioner


def _as_tensor(output: Any) -> Tensor:
    """The feature tensor inside an encoder's output (a tensor, a tuple, or a transformers ModelOutput)."""
    if isinstance(output, Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise RobucapError(f"cannot read features from an encoder output of type {type(output).__name__}")


@torch.no_grad()
def encoder_features(captioner: Captioner, batches: Iterable[dict[str, Any]]) -> tuple[Tensor, list[Any]]:
    """Mean-pooled encoder features of every image, read with a forward hook on ``captioner.encoder``.

    Args:
        captioner: Any captioner (the hook works for ViT-GPT2 and Show-Attend-Tell alike).
        batches: Batches with ``pixel_values``, ``labels`` and ``image_id``.

    Returns:
        Features and the image ids in order.

    Shape:
        features: ``(N, D)``, float32 on the CPU.
    """
    captured: list[Tensor] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        features = _as_tensor(output).float()
        # (B, L, D) token / grid features or (B, C, H, W) maps: average over positions.
        captured.append(features.mean(dim=(2, 3)) if features.dim() == 4 else features.mean(dim=1))

    was_training = captioner.training
    captioner.eval()
    device = next(captioner.parameters()).device
    handle = captioner.encoder.register_forward_hook(hook)
    ids: list[Any] = []
    try:
        for batch in batches:
            captured_before = len(captured)
            captioner(batch["pixel_values"].to(device), batch["labels"].to(device))
            if len(captured) != captured_before + 1:
                raise RobucapError("the captioner's encoder ran more or less than once per forward pass")
            ids.extend(batch["image_id"])
    finally:
        handle.remove()
        captioner.train(was_training)
    return torch.cat(captured).cpu(), ids


def spectral_signature_scores(features: Tensor) -> Tensor:
    """Outlier score of every sample: squared projection of its centred features on the top singular vector.

    Args:
        features: One row per sample. Shape: ``(N, D)``.

    Returns:
        Scores, higher = more suspicious. Shape: ``(N,)``.

    Raises:
        RobucapError: Fewer than 2 samples or not a 2-D tensor.
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise RobucapError(f"spectral signatures need a (N >= 2, D) feature matrix, got shape {tuple(features.shape)}")
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]).pow(2).float()


def ranking_quality(scores: Tensor, is_poisoned: Tensor, k: int) -> dict[str, float]:
    """Precision and recall of the ``k`` highest scores at finding the poisoned samples, and the ROC AUC.

    Args:
        scores: Higher = more suspicious. Shape: ``(N,)``.
        is_poisoned: Ground truth. Shape: ``(N,)``, bool.
        k: Number of samples flagged.

    Returns:
        ``{"k", "precision", "recall", "auroc", "n", "n_poisoned"}``.
    """
    n, positives = int(scores.numel()), int(is_poisoned.sum())
    k = max(0, min(int(k), n))
    flagged = torch.zeros(n, dtype=torch.bool)
    flagged[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    hits = int((flagged & is_poisoned).sum())
    negatives = n - positives
    # torchmetrics counts ties as half a win (the Mann-Whitney U statistic); with one class only AUC is undefined.
    auroc = float(binary_auroc(scores.double(), is_poisoned.long())) if positives and negatives else float("nan")
    return {
        "k": k,
        "precision": hits / k if k else 0.0,
        "recall": hits / positives if positives else 0.0,
        "auroc": auroc,
        "n": n,
        "n_poisoned": positives,
    }
