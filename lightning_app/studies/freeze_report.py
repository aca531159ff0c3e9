"""The freeze study's report: the table beside Rashid & Rivas's (2024) Table 2, parameter groups, charts, examples."""

from __future__ import annotations

from typing import Any

from callbacks.image_grid import caption_grid_png, difference_gain, difference_image, figure_png, pyplot
from datamodules.datamodule import CaptionDataModule
from lightning_app.report import Report
from modules.attacks import FGSM
from modules.captioning import CaptioningModule
from modules.evaluation import evaluation_loader
from modules.victims.captioner import CaptionObjective

__all__ = ["PAPER_002_FLICKR8K", "example_grid_png", "freeze_chart_png", "report_freeze_study"]

# Rashid & Rivas 2024, Table 2 (Flickr8k, BLEU, train / test); the paper gives one BLEU figure per cell.
PAPER_002_FLICKR8K = {
    "baseline": (0.285, 0.232),
    "adversarial_only": (0.164, 0.143),
    "adversarial_training": (0.217, 0.215),
    "freeze_encoder": (0.200, 0.181),
    "freeze_decoder": (0.060, 0.050),
}


def _cell(row: dict[str, Any], split: str, kind: str) -> str:
    value = row[split][kind]["bleu4"]
    if row["trials"] < 2:
        return f"{value:.4f}"
    return f"{value:.4f} ± {row['std'][split][kind]['bleu4']:.4f}"


def report_freeze_study(report: Report, block: dict[str, Any]) -> None:
    """Add the study's table, parameter groups, bar chart and notes to a report."""
    eps = block["epsilon"]
    start = block["config"]["start"]
    report.heading("Freeze study (Rashid & Rivas 2024): adversarial training with the encoder or the decoder frozen")
    origin = (
        "Every phase starts from the pretrained parts (new cross-attention), as the paper starts from ViT and GPT-2."
        if start == "pretrained"
        else "Phases 2-5 fine-tune the baseline."
    )
    report.paragraph(
        f"FGSM epsilon = {eps} in [0, 1] pixel units = {eps * 255:.1f}/255 = {eps * 2:.2f} on ViT's [-1, 1] input "
        f"(Rashid & Rivas 2024 used 0.1 on that input). Regime: {start}. {origin} Attacks are white-box against each "
        "row's own model, untargeted against the first reference caption. BLEU is pycocoevalcap's corpus BLEU."
    )
    columns = ["phase", "trials", "train clean B4", "train FGSM B4", "test clean B4", "test FGSM B4", "test B1",
               "trainable params", "train s", "Rashid & Rivas 2024 train / test"]  # fmt: skip
    rows = []
    for r in block["rows"]:
        paper = PAPER_002_FLICKR8K.get(r["name"])
        rows.append(
            [r["name"], r["trials"], r["train"]["clean"]["bleu4"], r["train"]["adversarial"]["bleu4"],
             _cell(r, "test", "clean"), _cell(r, "test", "adversarial"), r["test"]["clean"]["bleu1"],
             r["trainable_params"], r["train_seconds"], f"{paper[0]:.3f} / {paper[1]:.3f}" if paper else ""]
        )  # fmt: skip
    report.table(columns, rows)
    regime = block["regimes"][start]
    groups = list(regime["rows"][0]["parameter_groups"])
    report.table(
        ["phase", *[f"{g} trainable / all" + (" (new)" if g in regime["new_groups"] else "") for g in groups]],
        [[r["name"], *[f"{c['trainable']:,} / {c['params']:,}" for c in r["parameter_groups"].values()]]
         for r in regime["rows"]],
    )  # fmt: skip
    parts = regime.get("parts")
    if parts:
        made = "made here by the pretraining tasks" if parts["made_here"] else "given"
        report.paragraph(f"Pretrained parts ({made}): encoder {parts['encoder_dir']}, decoder {parts['decoder_dir']}.")
    report.paragraph(
        "Rashid & Rivas 2024's figures are Flickr8k BLEU with pretrained ViT + GPT-2 (its Table 2 does not say "
        "which BLEU order); they are context, not the same experiment.",
        note=True,
    )
    report.image(freeze_chart_png(block), "freeze study bar chart")


def freeze_chart_png(block: dict[str, Any]) -> bytes:
    """Grouped bars of test BLEU-4, clean and FGSM, per phase (error bars = std over trials)."""
    plt = pyplot()
    names = [r["name"] for r in block["rows"]]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for offset, kind, color in ((-0.2, "clean", "#4C72B0"), (0.2, "adversarial", "#DD8452")):
        values = [r["test"][kind]["bleu4"] for r in block["rows"]]
        errors = [r["std"]["test"][kind]["bleu4"] for r in block["rows"]]
        ax.bar([i + offset for i in x], values, 0.4, yerr=errors, label=f"test {kind}", color=color, capsize=3)
    ax.set_xticks(list(x), [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylabel("BLEU-4")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"Test BLEU-4, clean vs FGSM (eps = {block['epsilon']}, start: {block['config']['start']})")
    return figure_png(fig)


def example_grid_png(block: dict[str, Any], datamodule: CaptionDataModule, n_images: int = 3) -> bytes:
    """Original / FGSM / amplified difference for a few test images, baseline vs adversarially trained (Table 1)."""
    rows = {r["name"]: r for r in block["rows"]}
    dataset = datamodule.datasets["test"]
    images, captions = [], []
    for name in ("baseline", "adversarial_training"):
        module = CaptioningModule.load_from_checkpoint(rows[name]["checkpoint"], map_location="cpu", weights_only=True)
        module.eval()
        batch = next(iter(evaluation_loader(module, dataset, n_images, batch_size=n_images)))
        clean = batch["pixel_values"]
        adversarial = FGSM(block["epsilon"])(CaptionObjective(module.captioner, batch["labels"]), clean).adversarial
        clean_captions, adversarial_captions = module.caption(clean), module.caption(adversarial)
        amplified = difference_image(clean, adversarial, difference_gain(adversarial - clean, block["epsilon"]))
        for i in range(clean.shape[0]):
            images += [clean[i], adversarial[i], amplified[i]]
            captions += [f"{name}: {clean_captions[i]}", f"FGSM: {adversarial_captions[i]}", "difference (±ε)"]
    return caption_grid_png(images, captions, columns=3)
