"""``robucap attack dag --victim detector|segmenter``: DAG (Xie et al. 2017) and the paper's Table 1 on our victims.

The runners load the victim from its checkpoint, the first ``--images`` images of the split from the checkpoint's
own data settings (or ``--data_config`` / ``--data_root`` / ``--format``), run DAG
(:func:`modules.dense_victims_eval.attack_detector` / :func:`~modules.dense_victims_eval.attack_segmenter`) and write
``results.json`` (``dense.detector`` or ``dense.segmenter``) and ``report.html``: the clean / adversarial / permuted
table and a figure like the paper's Fig. 1 (image, detections or segmentation before and after, perturbation × 10).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.utils import draw_bounding_boxes

from callbacks.image_grid import caption_grid_png, difference_image
from datamodules.errors import DataError, RobucapError
from datamodules.instances import InstanceBatch, InstancesDataModule
from lightning_app.attack.data import resolve_device
from lightning_app.attack.output import write_outputs
from lightning_app.attack.settings import DagSettings, settings_block
from lightning_app.inputs import checkpoint_path, data_options
from lightning_app.report import Report, fmt
from modules.attacks.dag import DAG
from modules.dense import DenseVictimModule
from modules.dense_victims_eval import PERMUTATION_DRAWS, DenseDagEvaluation, attack_detector, attack_segmenter
from modules.detection import DetectionModule
from modules.segmentation import SegmentationModule

__all__ = ["FIGURE_GAIN", "PAPER_TABLE1", "dense_figure", "run_detector", "run_segmenter"]

FIGURE_GAIN = 10.0
"""The perturbation's magnification in the figure, as in the paper's Fig. 1 and 2."""

PAPER_TABLE1: dict[str, str] = {
    "detector": (
        "FR-ZF-07 on VOC 2007 test: 58.70 → 3.61 mAP@0.5, a negligible drop when permuted; p 2.4 × 10⁻³, "
        "47.05 iterations"
    ),
    "segmenter": (
        "FCN-VGG on VOC 2012 val: 65.5 → 4.1 mIoU, a negligible drop when permuted; p 2.9 × 10⁻³, 54.02 iterations"
    ),
}
"""The paper's Table 1 rows our victims are compared with (its own networks and data)."""

# A colour per class for the segmentation maps: background black, then distinct hues.
_PALETTE = torch.tensor(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=torch.uint8,
)  # fmt: skip


def _data_settings(settings: DagSettings, checkpoint: Path) -> dict[str, Any]:
    """The data module's options: ``--data_config``'s ``data:`` section, else the checkpoint's own; then the flags.

    Raises:
        RobucapError: No data settings anywhere, or a data directory that does not exist.
    """
    if settings.data_config:
        options = data_options(Path(settings.data_config), settings.data_root)
        options.pop("tokenizer", None)
        options = dict(options.get("init_args", options))  # a LightningCLI section: class_path + init_args
        if settings.data_root:
            options["root"] = settings.data_root
    else:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        hparams = saved.get("datamodule_hyper_parameters") or {}
        options = {k: hparams[k] for k in ("format", "root", "format_options", "shapes") if hparams.get(k) is not None}
        if settings.data_root:
            # Another root: its layout is no longer the saved one unless --format says so.
            options = {"format": options.get("format", "coco"), "root": settings.data_root}
    if settings.format is not None:
        options["format"] = settings.format
    root = options.get("root")
    if root is None:
        raise RobucapError(f"no data: give --data_root or --data_config; checkpoint {checkpoint} records no data root")
    if not Path(root).is_dir():
        raise RobucapError(f"data directory {root} does not exist (give --data_root: a COCO instances root)")
    return {k: v for k, v in options.items() if k != "image_size"}


def load_instance_batches(
    settings: DagSettings, module: DenseVictimModule, checkpoint: Path
) -> tuple[list[InstanceBatch], tuple[str, ...], dict[str, Any]]:
    """The first ``--images`` images of the split at the victim's input size, with the category names.

    Raises:
        RobucapError: ``--image_size`` other than the victim's, bad data options, an empty split, or (a segmenter)
            instances without polygons.
    """
    size = int(module.hparams.image_size)
    if settings.image_size is not None and settings.image_size != size:
        raise RobucapError(f"--image_size is {settings.image_size} px but checkpoint {checkpoint} takes {size} px")
    options = _data_settings(settings, checkpoint)
    try:
        datamodule = InstancesDataModule(
            **options, image_size=size, eval_batch_size=settings.batch_size, progress=False,
            **{f"limit_{settings.split}": settings.images},
        )  # fmt: skip
    except TypeError as error:
        raise RobucapError(f"bad data options for a {module.victim} ({error})") from error
    split = datamodule.load_split(settings.split)
    if not split.images:
        raise RobucapError(f"the {settings.split} split of {options['root']} has no images")
    if module.victim == "segmenter" and not split.has_polygons:
        raise DataError(f"{split.source}: no annotation has a segmentation (polygons or RLE); a segmenter needs masks")
    loader = datamodule.test_dataloader() if settings.split == "test" else datamodule.val_dataloader()
    description = {
        "format": options.get("format"),
        "root": str(options["root"]),
        "config": settings.data_config,
        "split": settings.split,
        "image_size": size,
        "n_images": len(split.images),
    }
    return list(loader), split.categories, description


def _load(cls: type[DenseVictimModule], settings: DagSettings) -> tuple[Any, Path]:
    checkpoint = checkpoint_path(settings.ckpt)
    module = cls.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    return module.to(resolve_device(settings.device)).eval(), checkpoint


def run_detector(settings: DagSettings, attack: DAG, start: float) -> int:
    """DAG on a Faster R-CNN: mAP clean / adversarial / permuted; writes results.json and the report."""
    module, checkpoint = _load(DetectionModule, settings)
    batches, categories, data = load_instance_batches(settings, module, checkpoint)
    evaluation = attack_detector(
        module, batches, attack, settings.seed, settings.batch_size, settings.shrink_only, settings.reselect_every,
        settings.margin,
    )  # fmt: skip
    return _write(settings, attack, evaluation, categories, data, start)


def run_segmenter(settings: DagSettings, attack: DAG, start: float) -> int:
    """DAG on a segmenter's foreground pixels: mIoU clean / adversarial / permuted; writes results.json and report."""
    module, checkpoint = _load(SegmentationModule, settings)
    batches, categories, data = load_instance_batches(settings, module, checkpoint)
    evaluation = attack_segmenter(
        module, batches, attack, settings.seed, settings.batch_size, settings.shrink_only, settings.margin
    )
    return _write(settings, attack, evaluation, categories, data, start)


def _write(
    settings: DagSettings,
    attack: DAG,
    evaluation: DenseDagEvaluation | None,
    categories: tuple[str, ...],
    data: dict[str, Any],
    start: float,
) -> int:
    if evaluation is None:
        raise RobucapError(
            f"none of the {data['n_images']} {settings.split} images of {data['root']} has a ground-truth object to "
            "attack; attack more images (--images) or another split"
        )
    block = {
        "victim": settings.victim,
        "attack": repr(attack),
        "gamma": attack.gamma,
        "gamma_255": attack.gamma * 255,
        "max_iterations": attack.max_iterations,
        "margin": settings.margin,
        "permutation_draws": PERMUTATION_DRAWS,
        **evaluation.scores(),
        "records": [r.to_json() for r in evaluation.images],
    }
    results = {
        "command": "attack dag",
        "checkpoint": str(settings.ckpt),
        "data": data,
        "settings": settings_block(settings),
        "dense": {settings.victim: block},
    }
    path = write_outputs(Path(settings.out), results, _report(settings, block, evaluation, categories), start)
    metric = "map50" if settings.victim == "detector" else "miou"
    print(
        f"robucap attack dag done: {metric} clean {evaluation.clean[metric]:.3f}, DAG "
        f"{evaluation.adversarial[metric]:.3f}, permuted {evaluation.permuted[metric]:.3f}; p {evaluation.p:.2e}, "
        f"{evaluation.iterations:.1f} iterations, {evaluation.n} images ({evaluation.skipped} skipped); report: {path}"
    )
    return 0


_UNDER_ROWS = {
    "detector": (("recall50", "objects found by a detection of their class (IoU ≥ 0.5)"),
                 ("top1_50", "objects whose best detection is of their class")),
    "segmenter": (("iou_background", "IoU of the background"), ("miou_foreground", "mean IoU of the object classes")),
}  # fmt: skip
_UNDER = {
    "detector": "mAP ranks detections: an object whose own class is still detected at a lower score than a wrong "
    "class counts once the wrong detections above it are passed. DAG flips the best class (top-1); recall at any "
    "kept score shows what mAP still finds.",
    "segmenter": "DAG keeps background pixels as they are, so mIoU (background included, as in the paper) cannot fall "
    "below about the background's IoU divided by the number of classes.",
}


def _report(
    settings: DagSettings, block: dict[str, Any], evaluation: DenseDagEvaluation, categories: tuple[str, ...]
) -> Report:
    victim = settings.victim
    report = Report("robucap attack dag")
    report.heading(f"DAG (Xie et al. 2017) on a {victim}: the paper's Table 1 on this victim")
    what = "dense proposals (RPN NMS 0.9, up to 3000)" if victim == "detector" else "foreground pixels"
    report.paragraph(
        f"Checkpoint {settings.ckpt}; {evaluation.n} {settings.split} images attacked, {evaluation.skipped} skipped "
        f"(no ground-truth object). Targets: {what}. γ = {fmt(block['gamma'], 6)} in [0, 1] pixel units "
        f"({block['gamma_255']:.2f} / 255), at most {block['max_iterations']} iterations."
        + (
            f" Beyond the paper: a target stays active until its true class is {settings.margin:g} logits below the "
            "best other class (the paper stops at the top class)."
            if settings.margin
            else ""
        )
    )
    report.paragraph(
        f"Permuted: r with its rows and columns randomly permuted, {PERMUTATION_DRAWS} draws averaged. "
        "p = sqrt(1/K Σ‖r_k‖²), K pixels, r_k the RGB perturbation in [0, 1] units, averaged over the images. "
        f"Paper: {PAPER_TABLE1[victim]}.",
        note=True,
    )
    metrics = ["map50", "map"] if victim == "detector" else ["miou"]
    names = {"map50": "mAP@0.5", "map": "mAP", "miou": "mIoU"}
    columns = ["images", *(f"{names[m]} {kind}" for m in metrics for kind in ("clean", "DAG", "permuted"))]
    columns += ["iterations", "p", "L∞ (mean)", "success"]
    row: list[Any] = [evaluation.n]
    for m in metrics:
        row += [evaluation.clean[m], evaluation.adversarial[m], evaluation.permuted[m]]
    row += [evaluation.iterations, f"{evaluation.p:.2e}", evaluation.linf, f"{evaluation.success:.1%}"]
    report.table(columns, [row])
    report.paragraph(_UNDER[victim], note=True)
    under = [
        [label, evaluation.clean[k], evaluation.adversarial[k], evaluation.permuted[k]]
        for k, label in _UNDER_ROWS[victim]
    ]
    report.table(["under the score", "clean", "DAG", "permuted"], under)
    shown = min(settings.examples, evaluation.n)
    if shown:
        report.heading("Examples (as the paper's Fig. 1)")
        report.image(dense_figure(evaluation, categories, shown), "image and output before and after, perturbation ×10")
    return report


def dense_figure(evaluation: DenseDagEvaluation, categories: tuple[str, ...], shown: int) -> bytes:
    """The paper's Fig. 1 for the first ``shown`` attacked images: image, output before and after, perturbation."""
    images: list[torch.Tensor] = []
    captions: list[str] = []
    done = [r for r in evaluation.images if r.objects > 0]
    for k in range(shown):
        clean, adversarial = evaluation.clean_images[k], evaluation.adversarial_images[k]
        before, after = evaluation.clean_outputs[k], evaluation.adversarial_outputs[k]
        if evaluation.victim == "detector":
            images += [_boxes(clean, before, categories), _boxes(adversarial, after, categories)]
            captions += ["clean detections", "adversarial detections"]
        else:
            images += [clean, _colours(before), _colours(after)]
            captions += ["clean image", "clean segmentation", "adversarial segmentation"]
        images.append(difference_image(clean, adversarial, FIGURE_GAIN))
        captions.append(f"perturbation ×{FIGURE_GAIN:g}; {done[k].iterations} it., p = {done[k].p:.2e}")
    return caption_grid_png(images, captions, columns=3 if evaluation.victim == "detector" else 4)


def _boxes(image: torch.Tensor, found: dict[str, torch.Tensor], categories: tuple[str, ...]) -> torch.Tensor:
    """Detections with score ≥ 0.5 drawn on the image. Shape: ``image`` ``(3, H, W)`` in [0, 1]; returns uint8."""
    keep = found["scores"] >= 0.5
    labels = [
        f"{categories[int(c) - 1] if 0 < int(c) <= len(categories) else int(c)} {float(s):.2f}"
        for c, s in zip(found["labels"][keep], found["scores"][keep], strict=True)
    ]
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if not labels:
        return pixels
    return draw_bounding_boxes(pixels, found["boxes"][keep], labels=labels, colors="red", width=1)


def _colours(mask: torch.Tensor) -> torch.Tensor:
    """A class map in the palette's colours. Shape: ``mask`` ``(H, W)``; returns ``(3, H, W)`` uint8."""
    return _PALETTE[mask.long() % len(_PALETTE)].permute(2, 0, 1)
