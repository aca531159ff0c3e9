"""The dense study's report: victims, Table 1, transfer, summed perturbation, into captioning, Fig. 1, summary line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_app.attack.dag_dense import FIGURE_GAIN, PAPER_TABLE1, dense_figure
from lightning_app.report import Report

if TYPE_CHECKING:
    from lightning_app.studies.dense import DenseOutcome

__all__ = ["report_dense_study", "summary"]

_METRIC = {"map50": "mAP@0.5", "miou": "mIoU"}
_EXAMPLES = 3


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _victims(report: Report, victims: dict[str, dict[str, Any]]) -> None:
    rows = []
    for role, info in victims.items():
        test = info.get("test") or {}
        scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(test.items()) if k in ("map50", "map", "miou", "bleu4"))
        trained = f"{info['train_seconds']:.0f} s" if "train_seconds" in info else "loaded"
        rows.append([role, info["arch"], "-" if info.get("seed") is None else info["seed"], trained, scores or "-"])
    report.table(["role", "architecture", "seed", "training", "test scores (whole test split used)"], rows)


def _table1(report: Report, dense: dict[str, Any]) -> None:
    rows = []
    for victim, metric in (("detector", "map50"), ("segmenter", "miou")):
        block = dense[victim]
        rows.append(
            [victim, _METRIC[metric], block["n"], _num(block[f"clean_{metric}"]), _num(block[f"adv_{metric}"]),
             _num(block[f"perm_{metric}"]), f"{block['iterations']:.1f} / {block['max_iterations']}",
             f"{block['p']:.2e}", f"{block['success']:.0%}", PAPER_TABLE1[victim]]
        )  # fmt: skip
    report.table(
        ["victim", "metric", "images", "clean", "DAG", "permuted", "iterations / M₀", "p", "success", "paper"], rows
    )


def _transfer(report: Report, rows: list[dict[str, Any]]) -> None:
    report.table(
        ["source r", "target", "relation", "metric", "clean", "x + r", "x + permuted r", "drop", "p"],
        [
            [r["source"], r["target"], r["relation"], _METRIC[r["metric"]], _num(r["clean"]), _num(r["perturbed"]),
             _num(r["permuted"]), _num(r["drop"]), f"{r['p']:.2e}"]
            for r in rows
        ],
    )  # fmt: skip


def _into_captioning(report: Report, rows: list[dict[str, Any]]) -> None:
    report.table(
        ["perturbation", "images", "p", "changed", "BLEU-4 clean", "BLEU-4 x + r", "drop",
         "noise p", "noise changed", "noise BLEU-4 drop"],
        [
            [r["perturbation"], r["n"], f"{r['p']:.2e}", f"{r['changed']:.0%}", _num(r["bleu4_clean"]),
             _num(r["bleu4_perturbed"]), _num(r["bleu4_drop"]), f"{r['noise_p']:.2e}", f"{r['noise_changed']:.0%}",
             _num(r["noise_bleu4_drop"])]
            for r in rows
        ],
    )  # fmt: skip


def _captioner(report: Report, block: dict[str, Any]) -> None:
    fgsm = block.get("fgsm") or {}
    report.table(
        ["images", "token flip rate", "changed", "BLEU-4 clean", "BLEU-4 DAG", "drop", "iterations", "p",
         "FGSM changed (same L∞)", "FGSM BLEU-4 drop"],
        [[block["n"], f"{block['token_flip_rate']:.1%}", f"{block['changed']:.0%}", _num(block["bleu4_clean"]),
          _num(block["bleu4_adv"]), _num(block["bleu4_drop"]), f"{block['iterations']:.1f}", f"{block['p']:.2e}",
          f"{fgsm['changed']:.0%}" if fgsm else "-", _num(fgsm.get("bleu4_drop"))]],
    )  # fmt: skip


def report_dense_study(report: Report, outcome: DenseOutcome) -> None:
    """Add the study's sections to ``report``."""
    dense = outcome.results["dense"]
    report.heading("Dense study: DAG (Xie et al. 2017) on detectors, segmenters and a captioner")
    report.paragraph(
        f"{dense['detector']['n']} test images with an object attacked; γ = {dense['detector']['gamma_255']:.2f}/255 "
        "per step in [0, 1] units. Detectors and segmenters see the images at "
        f"{outcome.results['config']['victim_image_size']} px; the captioner sees them resized to its own side."
    )
    _victims(report, dense["victims"])
    report.heading("Table 1: clean, DAG and permuted control")
    _table1(report, dense)
    report.paragraph(
        "Permuted: r with its rows and columns randomly permuted (3 draws averaged), the paper's control that keeps "
        "every value of r and destroys its structure. p = sqrt(1/K Σ‖r_k‖²) in [0, 1] units.",
        note=True,
    )
    report.heading("Transfer: a source's perturbation on other victims (the paper's Tables 3-5)")
    _transfer(report, dense["transfer"])
    report.paragraph(
        "training run: the same architecture trained with another seed; architecture: another segmentation network; "
        "task: detector ↔ segmenter; summed: r_det + r_seg (clipped to [0, 1]) on each victim, the held-out ones "
        "(detector_2, segmenter_2) included.",
        note=True,
    )
    report.heading("Into captioning: the captioner on images perturbed for the detector and the segmenter")
    _into_captioning(report, dense["into_captioning"])
    report.paragraph(
        "Noise: Gaussian noise with each image's L2 norm equal to its r's (at the victims' resolution), clipped; the "
        "captioner sees both resized to its side. Changed: greedy caption differs from the clean one.",
        note=True,
    )
    if "captioner" in dense:
        report.heading("DAG on the captioner: content words pushed to another word of their class")
        _captioner(report, dense["captioner"])
    shown = min(_EXAMPLES, outcome.detector.n, outcome.segmenter.n)
    if shown:
        report.heading("Examples (as the paper's Fig. 1)")
        for evaluation in (outcome.detector, outcome.segmenter):
            report.image(
                dense_figure(evaluation, outcome.categories, shown),
                f"{evaluation.victim}: output before and after DAG, perturbation ×{FIGURE_GAIN:g}",
            )


def summary(results: dict[str, Any]) -> str:
    """One line: Table 1's clean → DAG (permuted) for both victims, and the captioner's token flip rate."""
    dense = results["dense"]
    det, seg = dense["detector"], dense["segmenter"]
    line = (
        f"detector mAP@0.5 {det['clean_map50']:.3f} → DAG {det['adv_map50']:.3f} (permuted {det['perm_map50']:.3f}); "
        f"segmenter mIoU {seg['clean_miou']:.3f} → DAG {seg['adv_miou']:.3f} (permuted {seg['perm_miou']:.3f})"
    )
    if "captioner" in dense:
        line += f"; captioner token flip {dense['captioner']['token_flip_rate']:.1%}"
    return line
