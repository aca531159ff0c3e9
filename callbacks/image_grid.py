"""Render images with captions under them into one PNG (for CSV runs and reports), and draw perturbations.

Every figure of robucap (the training callback, ``robucap attack``, the studies, the demo) draws a perturbation with
one gain rule, so difference images read the same everywhere. A difference image shows ``0.5 + gain * (adversarial -
clean)`` clamped to [0, 1]: grey where nothing changed, brighter where a pixel went up, darker where it went down.
The gain follows one rule (:func:`difference_gain`):

* with an L-infinity budget ``epsilon`` (FGSM, PGD, the ensemble's fast gradients), ``gain = 0.5 / epsilon``, so a
  change of the full budget reaches white or black and images attacked at one budget share one scale;
* without one (Show-and-Fool's L2 objective, FG's L2 budget, a backdoor's trigger noise), ``gain = 0.5 / max |delta|``
  over every image of the figure: the largest change in the figure reaches white or black. One gain per figure
  (never a per-image stretch) keeps small and large perturbations comparable side by side.

The captions name the gain (:func:`gain_label`), so a reader can turn a shade back into pixel units.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "caption_grid_png",
    "difference_gain",
    "difference_image",
    "figure_png",
    "gain_label",
    "pyplot",
    "save_caption_grid",
]

_SMALLEST_CHANGE = 1.0 / 255  # below one 8-bit level nothing is visible; avoids dividing by zero for no change


def difference_gain(deltas: Sequence[torch.Tensor] | torch.Tensor, epsilon: float | None = None) -> float:
    """The gain of a figure's difference images (see the module docstring for the rule).

    Args:
        deltas: The figure's perturbations ``adversarial - clean``, [0, 1] pixel units.
        epsilon: The attack's L-infinity budget in [0, 1] pixel units, if it has one.

    Returns:
        ``0.5 / epsilon``, else ``0.5 / max |delta|`` (at least one 8-bit level).
    """
    if epsilon is not None and epsilon > 0:
        return 0.5 / float(epsilon)
    largest = max((float(d.detach().abs().max()) for d in deltas if d.numel()), default=0.0)
    return 0.5 / max(largest, _SMALLEST_CHANGE)


def difference_image(clean: torch.Tensor, adversarial: torch.Tensor, gain: float) -> torch.Tensor:
    """``0.5 + gain * (adversarial - clean)`` clamped to [0, 1]: grey where nothing changed.

    Shape:
        ``clean`` and ``adversarial``: ``(..., 3, H, W)``; returns the same shape.
    """
    return (0.5 + gain * (adversarial.float() - clean.float())).clamp(0.0, 1.0)


def gain_label(gain: float) -> str:
    """How a figure caption names the drawing, e.g. ``0.5 + 6.4·δ``."""
    return f"0.5 + {gain:.3g}·δ"


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend: figures are written to PNG, never shown.

    Imported on first use: matplotlib costs a second at start-up that commands without figures should not pay.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of a finished figure (laid out tight, 90 dpi, as every robucap report image); closes it."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    pyplot().close(fig)
    return buffer.getvalue()


def caption_grid_png(images: list[torch.Tensor], captions: list[str], columns: int = 4, scale: float = 2.2) -> bytes:
    """PNG bytes of a grid of images, each with its caption underneath.

    Args:
        images: uint8 or [0, 1] float images. Shape: ``(3, H, W)`` each.
        captions: One caption per image.
        columns: Images per row.
        scale: Inches per image.
    """
    plt = pyplot()
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
    return figure_png(fig)


def save_caption_grid(images: list[torch.Tensor], captions: list[str], path: Path, columns: int = 4) -> Path:
    """Write :func:`caption_grid_png` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(caption_grid_png(images, captions, columns))
    return path
