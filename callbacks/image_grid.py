"""Render images with captions under them into one PNG (for CSV runs and reports)."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import torch


def caption_grid_png(images: list[torch.Tensor], captions: list[str], columns: int = 4, scale: float = 2.2) -> bytes:
    """PNG bytes of a grid of images, each with its caption underneath.

    Args:
        images: uint8 or [0, 1] float images. Shape: ``(3, H, W)`` each.
        captions: One caption per image.
        columns: Images per row.
        scale: Inches per image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    wrapped = ["\n".join(line for part in c.split("\n") for line in textwrap.wrap(part, 34)) for c in captions]
    # Room under each image for its longest caption, so text never overlaps the row below.
    text_inches = 0.13 * max(w.count("\n") + 1 for w in wrapped) + 0.1
    fig, axes = plt.subplots(rows, columns, figsize=(columns * scale, rows * (scale + text_inches)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, wrapped, strict=False):
        array = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        ax.imshow(array.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.text(0.5, -0.03, caption, transform=ax.transAxes, ha="center", va="top", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def save_caption_grid(images: list[torch.Tensor], captions: list[str], path: Path, columns: int = 4) -> Path:
    """Write :func:`caption_grid_png` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(caption_grid_png(images, captions, columns))
    return path
