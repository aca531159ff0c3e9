"""``robucap attack show-and-fool``: Show-and-Fool's (Chen et al. 2018) targeted caption and keyword attacks.

Tables 1-3: success rate, mean ``||delta||_2`` of the successes, caption scores of the failures against their
target, keywords found among the failures; an example grid per mode (original, adversarial, difference).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from callbacks.image_grid import difference_gain, gain_label
from datamodules.errors import RobucapError
from lightning_app.attack.data import check_common, load_eval_images, load_module, resolve_device
from lightning_app.attack.output import Example, example_grid, write_outputs
from lightning_app.attack.settings import ShowAndFoolSettings, settings_block
from lightning_app.report import Report
from modules.attacks.show_and_fool import ShowAndFool
from modules.attacks.targets import keyword_ids, target_caption_ids
from modules.metrics.targeted import FAILURE_SCORES
from modules.records import records_to_json
from modules.targeted_eval import ShowAndFoolRun, TargetedLoss, mode_keywords, run_show_and_fool

__all__ = ["run_show_and_fool_command"]


def _parse_keywords(text: str | None) -> list[str] | None:
    if text is None:
        return None
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise RobucapError(f"--keywords needs at least one keyword (comma-separated, e.g. dog,frisbee), got {text!r}")
    return words


def _parse_modes(settings: ShowAndFoolSettings, keywords: list[str] | None) -> list[str]:
    if settings.modes is None:
        modes = ["caption"] if settings.target is not None or keywords is None else []
        modes += [f"keyword_{len(keywords)}"] if keywords else []
    else:
        modes = list(dict.fromkeys(m.strip() for m in settings.modes.split(",") if m.strip()))
        if not modes:
            raise RobucapError(
                f"--modes needs at least one of caption, keyword_1, keyword_2, keyword_3, got {settings.modes!r}"
            )
    counts = [mode_keywords(m) for m in modes]
    if keywords is not None:
        wrong = [m for m, k in zip(modes, counts, strict=True) if k and k != len(keywords)]
        if wrong:
            raise RobucapError(f"--keywords gives {len(keywords)} keywords {keywords} but --modes asks for {wrong}")
        if not any(counts):
            raise RobucapError(f"--keywords are the targets of keyword_{len(keywords)}, which --modes does not run")
    if settings.target is not None and "caption" not in modes:
        raise RobucapError("--target is the target of the caption mode, which --modes does not run")
    return modes


def _attack(settings: ShowAndFoolSettings) -> tuple[ShowAndFool, TargetedLoss]:
    """The search and the targeted-caption scoring; bad values fail here, before any loading."""
    if not settings.margin > 0:
        raise RobucapError(f"--margin (Show-and-Fool's kappa) must be > 0, got {settings.margin}")
    attack = ShowAndFool(
        iterations=settings.iterations, lr=settings.lr, initial_c=settings.c, search_rounds=settings.rounds,
        lr_growth=settings.lr_growth,
    )  # fmt: skip
    return attack, TargetedLoss(loss=settings.loss, margin=settings.margin)


def run_show_and_fool_command(settings: ShowAndFoolSettings) -> int:
    """Run every requested experiment, then write ``results.json`` and the report; returns the exit status.

    Raises:
        RobucapError: Bad settings, targets, checkpoint or data.
    """
    start = time.perf_counter()
    check_common(settings)
    keywords = _parse_keywords(settings.keywords)
    modes = _parse_modes(settings, keywords)
    attack, scoring = _attack(settings)
    module = load_module(settings.ckpt, resolve_device(settings.device))
    if settings.target is not None:
        target_caption_ids(module.tokenizer, settings.target)
    if keywords is not None:
        keyword_ids(module.tokenizer, keywords)
    data = load_eval_images(settings, module, settings.ckpt)
    images = data.images
    torch.manual_seed(settings.seed)

    blocks: dict[str, dict[str, Any]] = {}
    examples: dict[str, bytes] = {}
    for mode in modes:
        n_keywords = mode_keywords(mode)
        run = run_show_and_fool(
            module, images, data.image_ids, data.references, attack, n_keywords=n_keywords, seed=settings.seed,
            batch_size=settings.batch_size, target=keywords if n_keywords else settings.target,
            meteor=settings.meteor, progress=True, scoring=scoring,
        )  # fmt: skip
        blocks[mode] = {**run.summary, "records": records_to_json(run.records), "skipped": run.skipped}
        if settings.examples and run.records:
            examples[mode] = _examples(run, images, settings.examples)

    results = {
        "command": "attack show-and-fool",
        "checkpoint": str(settings.ckpt),
        "data": data.description,
        "settings": settings_block(settings),
        "modes": modes,
        "keywords": keywords,
        "show_and_fool": blocks,
    }
    report = _show_and_fool_report(settings, blocks, examples, data.description)
    path = write_outputs(Path(settings.out), results, report, start)
    summary = "; ".join(
        f"{mode} success {block['success_rate']:.1%}"
        + (f" (mean L2 {block['mean_l2']:.3f})" if block["mean_l2"] is not None else "")
        for mode, block in blocks.items()
    )
    print(f"robucap attack show-and-fool done: {summary}; report: {path}")
    return 0


def _examples(run: ShowAndFoolRun, images: torch.Tensor, count: int) -> bytes:
    """The first ``count`` attacked images of a mode as a grid; Show-and-Fool has no L-infinity budget."""
    shown = run.records[:count]
    clean = [images[r.index] for r in shown if r.index is not None]
    gain = difference_gain([a - c for a, c in zip(run.adversarial, clean, strict=False)])
    rows = []
    for k, record in enumerate(shown):
        target = record.target if isinstance(record.target, str) else ", ".join(record.target or [])
        verdict = "success" if record.success else "failure"
        rows.append(
            Example(
                clean[k],
                run.adversarial[k],
                (
                    f"original: {record.clean}",
                    f"target: {target}\nadversarial ({verdict}): {record.prediction}",
                    f"{gain_label(gain)}, ‖δ‖₂ = {record.l2 or 0.0:.3f}",
                ),
            )
        )
    return example_grid(rows, gain)


def _show_and_fool_report(
    settings: ShowAndFoolSettings, blocks: dict[str, dict[str, Any]], examples: dict[str, bytes], data: dict[str, Any]
) -> Report:
    report = Report("robucap attack show-and-fool")
    report.heading("Show-and-Fool (Show-and-Fool, Chen et al. 2018): targeted caption and targeted keyword attacks")
    targets = (
        "fixed targets (--target / --keywords)"
        if settings.target is not None or settings.keywords is not None
        else "paper-style targets: for each image, the clean caption (or content words of it) of another randomly "
        "chosen image of the set"
    )
    s = settings
    report.paragraph(
        f"Checkpoint {s.ckpt}; {data['n_images']} {data['split']} images of {data['root']}; {targets}. Adam "
        f"(lr {s.lr}) for {s.iterations} iterations per round, {s.rounds} round(s) of the binary search on c "
        f"from c = {s.c}, margin κ = {s.margin}, {s.loss} loss for targeted captions (keywords: eq. 9)."
    )
    report.paragraph(
        "‖δ‖₂ is in [0, 1] pixel units; Show-and-Fool's images are in [-1, 1], so its figures are twice ours for the "
        "same perturbation. Images whose clean caption already met a fixed target were not attacked.",
        note=True,
    )
    report.heading("Table 1: success rate and distortion")
    report.table(
        ["experiment", "images", "success rate", "avg ‖δ‖₂ (successes)", "avg ‖δ‖₂ on Show-and-Fool's scale"],
        [
            [
                mode,
                b["n"],
                f"{b['success_rate']:.1%}",
                b["mean_l2"] if b["mean_l2"] is not None else "-",
                2 * b["mean_l2"] if b["mean_l2"] is not None else "-",
            ]
            for mode, b in blocks.items()
        ],
    )
    report.heading("Table 2: failed examples against their target")
    report.paragraph(
        "Caption scores (pycocoevalcap, corpus level) of the failed adversarial examples' captions with the target "
        "caption as the single reference; for keyword modes the reference is the caption the keywords came from.",
        note=True,
    )
    names = {"rouge_l": "ROUGE-L", "meteor": "METEOR", **{f"bleu{n}": f"BLEU-{n}" for n in range(1, 5)}}
    report.table(
        ["experiment", "failed", "scored", "avg ‖δ‖₂ (failures)"] + [names[k] for k in FAILURE_SCORES],
        [
            [mode, f["n"], f["n_scored"], _or_dash(f["mean_l2"])] + [_or_dash(f[k]) for k in FAILURE_SCORES]
            for mode, b in blocks.items()
            for f in [b["failures"]]
        ],
    )
    keyword_modes = {m: b for m, b in blocks.items() if "keywords_found_histogram" in b}
    if keyword_modes:
        report.heading("Table 3: partial success of the failed keyword attacks")
        width = max(len(b["keywords_found_histogram"]) for b in keyword_modes.values())
        report.table(
            ["experiment", "failed", "M' ≥ 1", "avg M'"] + [f"M' = {m}" for m in range(width)],
            [
                [mode, b["failures"]["n"], _percent(b["keywords_found_any"]), _or_dash(b["keywords_found_mean"])]
                + [b["keywords_found_histogram"].get(m, "-") for m in range(width)]
                for mode, b in keyword_modes.items()
            ],
        )
    for mode, png in examples.items():
        report.heading(f"Examples: {mode}")
        report.image(png, f"{mode}: original, adversarial, amplified difference")
    return report


def _or_dash(value: Any) -> Any:
    return "-" if value is None else value


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
