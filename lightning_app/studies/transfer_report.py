"""The transfer study's report: model table, transfer matrices, leave-one-out rows, example images, summary line."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from callbacks.image_grid import caption_grid_png, difference_gain, difference_image, gain_label
from lightning_app.report import Report
from modules.captions import caption_images
from modules.transfer import rmsd_255

if TYPE_CHECKING:
    from lightning_app.studies.transfer import TransferOutcome

__all__ = ["examples_png", "report_transfer_study", "summary"]


# -- tables ---------------------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report_transfer_study(report: Report, block: dict[str, Any]) -> None:
    """Add the study's tables (models, transfer matrices, ensemble rows) to a report."""
    transfer, ensemble = block["transfer"], block["ensemble"]
    names = [m["name"] for m in transfer["models"]]
    report.heading("Transfer study (Liu et al. 2017 and Show-and-Fool): adversarial images across captioners")
    report.paragraph(
        f"{transfer['images']} test images attacked per source. Targeted: {transfer['attacks']['targeted']}, targets "
        "chosen as in Show-and-Fool (the source's caption of another image). Non-targeted: "
        f"{transfer['attacks']['non_targeted']} (Liu et al. 2017: lambda = 0, the distortion set by lr and "
        "iterations). "
        "RMSD: root-mean-square deviation on the 0-255 scale (Liu et al. 2017). Cells: target hit % (the caption is "
        "exactly the target), changed % (the caption differs from the model's clean caption), BLEU-4 drop against the "
        "references (clean - adversarial). Diagonal cells are white-box."
    )
    report.table(
        ["model", "arch", "seed", "test BLEU-4", "test images"],
        [[m["name"], m["arch"], "-" if m["seed"] is None else m["seed"], m["test_bleu4"], m["test_images"]]
         for m in transfer["models"]],
    )  # fmt: skip
    report.paragraph("Targeted (Show-and-Fool) transfer: hit % (hit % of the clean images: a target taken from the "
                     "source's captions may already be what another model says) / changed % / BLEU-4 drop; tgt = "
                     "Show-and-Fool's BLEU-4 of the adversarial captions against the targets.")  # fmt: skip
    white = transfer["white_box_show_and_fool"]
    rows = []
    for source in names:
        cells = transfer["matrix"]["targeted"][source]
        rows.append(
            [source, _num(cells[names[0]]["rmsd"], 2), _pct(white[source]["success"])]
            + [f"{_pct(cells[t]['target_hit'])} ({_pct(cells[t]['target_hit_clean'])}) / {_pct(cells[t]['changed'])}"
               f" / {_num(cells[t]['bleu4_drop'])} (tgt {_num(cells[t]['tgt_bleu4'])})" for t in names]
        )  # fmt: skip
    report.table(["source \\ evaluated on", "RMSD", "white-box success %", *names], rows)
    if "targeted_optimization" in transfer["matrix"]:
        report.paragraph(
            f"Targeted optimisation on each source alone ({transfer['attacks']['targeted_optimization']}; the same "
            "targets as Show-and-Fool's, the budget of the targeted ensembles: the matched single-model baseline): "
            "hit % (hit % of the clean images) / target words % (share of the target's content words in the caption; "
            "clean images in brackets) / changed %."
        )
        rows = _matrix_rows(
            transfer["matrix"]["targeted_optimization"], names,
            lambda c: f"{_pct(c['target_hit'])} ({_pct(c['target_hit_clean'])}) / {_pct(c['target_words'])} "
            f"({_pct(c['target_words_clean'])}) / {_pct(c['changed'])}",
        )  # fmt: skip
        report.table(["source \\ evaluated on", "RMSD", *names], rows)
    report.paragraph(
        "Non-targeted (optimisation) transfer: changed % / BLEU-4 drop; ori = Show-and-Fool's BLEU-4 of the "
        "adversarial captions against the model's own clean captions (lower = more change)."
    )
    rows = _matrix_rows(
        transfer["matrix"]["non_targeted"], names,
        lambda c: f"{_pct(c['changed'])} / {_num(c['bleu4_drop'])} (ori {_num(c['ori_bleu4'])})",
    )  # fmt: skip
    report.table(["source \\ evaluated on", "RMSD", *names], rows)

    report.heading("Leave-one-out ensembles (Liu et al. 2017)")
    objective = next((r["objective"] for r in ensemble["rows"] if r["targeted"]), None)
    report.paragraph(
        "Each row attacks the ensemble of all models but the held-out one (equal weights; targeted: the "
        f"{objective} objective, non-targeted: eq. 6's mixture) and evaluates on the held-out model (a black box) and "
        f"on every member (white-box). {ensemble['fast_budget_rule']}: FGS eps = RMSD / 255 (L-infinity), FG eps = "
        "RMSD * sqrt(3 H W) / 255 (L2), both in [0, 1] pixel units. Targeted ensemble targets come from the first "
        "member's clean captions. Targeted: 'every member' is the share of images whose caption is the target on "
        "every member; the held-out model's exact hit (clean images in brackets) and target words (partial "
        "transfer: share of the target's content words in its caption; clean in brackets). 'single-model' is the "
        "transfer to the held-out model of each member's own single-model attack (targeted: the same optimisation "
        "at the same budget; non-targeted: the optimisation): mean over the members, and the best member."
        + (f" Targeted rows skipped: {ensemble['targeted_skipped']}." if ensemble["targeted_skipped"] else "")
    )
    rows = []
    for r in (r for r in ensemble["rows"] if r["targeted"]):
        held, single, members = r["on_held_out"], r["single_model_transfer"], r["on_members"]
        per_member = " / ".join(_pct(c["target_hit"]) for c in members["models"].values())
        rows.append(
            [r["held_out"], r["method"], _num(r["rmsd"], 1), f"{_pct(members['target_hit'])} ({per_member})",
             f"{_pct(held['target_hit'])} ({_pct(held['target_hit_clean'])})",
             f"{_pct(held['target_words'])} ({_pct(held['target_words_clean'])})", _pct(held["changed"]),
             f"{_pct(single['mean']['target_hit'])} / {_pct(single['mean']['target_words'])} "
             f"(RMSD {_num(single['mean']['rmsd'], 1)})",
             f"{_pct(single['best']['target_hit'])} / {_pct(single['best']['target_words'])} "
             f"({single['best']['source']})"]
        )  # fmt: skip
    if rows:
        report.table(
            ["held out", "method", "RMSD", "every member hit % (each)", "held-out hit %", "held-out target words %",
             "held-out changed %", "single-model mean hit / words %", "single-model best hit / words %"],
            rows,
        )  # fmt: skip
    rows = []
    for r in (r for r in ensemble["rows"] if not r["targeted"]):
        held, single = r["on_held_out"], r["single_model_transfer"]
        per_member = " / ".join(_pct(c["changed"]) for c in r["on_members"]["models"].values())
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.4f} ({r['epsilon_norm']})"
        rows.append(
            [r["held_out"], r["method"], eps, _num(r["rmsd"], 1),
             f"{_pct(held['changed'])} / {_num(held['bleu4_drop'])}", f"{_pct(r['on_members']['changed'])} "
             f"({per_member})", f"{_pct(single['mean']['changed'])} / {_pct(single['best']['changed'])} "
             f"({single['best']['source']})"]
        )  # fmt: skip
    report.table(
        ["held out", "method", "eps", "RMSD", "held-out changed % / BLEU-4 drop", "every member changed % (each)",
         "single-model mean / best changed %"],
        rows,
    )  # fmt: skip


def examples_png(outcome: TransferOutcome, n_images: int = 2) -> bytes:
    """Original / adversarial / difference x10 around grey, with every model's captions.

    Rows: the targeted Show-and-Fool images of the first model, then the targeted (or, without a shared vocabulary,
    non-targeted) optimisation images of the ensemble that holds out the last model.
    """
    models, x = outcome.models, outcome.images.pixels
    names = list(models)
    transfer = outcome.results["transfer"]
    held_out = names[-1]
    targeted = (held_out, "optimization", True) in outcome.ensembles.images
    ensemble_targets = outcome.ensembles.targets.get(held_out, {}).get("captions") if targeted else None
    attacks = [
        (f"Show-and-Fool on {names[0]}", outcome.single.targeted[names[0]], transfer["targets"][names[0]]),
        (
            f"ensemble {'+'.join(n for n in names if n != held_out)}",
            outcome.ensembles.images[(held_out, "optimization", targeted)],
            ensemble_targets,
        ),
    ]
    images, captions = [], []
    n = min(n_images, x.shape[0])
    clean_text = ["\n".join(f"{m}: {transfer['clean_captions'][m][i]}" for m in names) for i in range(n)]
    # No L-infinity budget (Show-and-Fool, the optimisation attack): the figure's largest change sets the gain.
    gain = difference_gain([adversarial[:n] - x[:n] for _, adversarial, _ in attacks])
    for title, adversarial, targets in attacks:
        adv_text = {m: caption_images(models[m], adversarial[:n]) for m in names}
        rmsd = rmsd_255(x[:n], adversarial[:n])
        for i in range(n):
            target = f"target: {targets[i]}\n" if targets is not None else "non-targeted\n"
            images += [x[i], adversarial[i], difference_image(x[i], adversarial[i], gain)]
            captions += [
                f"original\n{clean_text[i]}",
                f"{title}\n{target}" + "\n".join(f"{m}: {adv_text[m][i]}" for m in names),
                f"difference {gain_label(gain)}\nRMSD {float(rmsd[i]):.1f} / 255",
            ]
    return caption_grid_png(images, captions, columns=3)


def _off_diagonal_mean(matrix: dict[str, dict[str, dict[str, Any]]], key: str) -> float | None:
    values = [cell[key] for s, row in matrix.items() for t, cell in row.items() if s != t and cell[key] is not None]
    return statistics.fmean(values) if values else None


def summary(block: dict[str, Any]) -> str:
    """One line: single-model transfer off the diagonal, and the ensembles' transfer to the held-out models."""
    matrix = block["transfer"]["matrix"]
    parts = [
        f"single-model transfer: targeted hit {_pct(_off_diagonal_mean(matrix['targeted'], 'target_hit'))}%, "
        f"non-targeted changed {_pct(_off_diagonal_mean(matrix['non_targeted'], 'changed'))}%"
    ]
    rows = [r for r in block["ensemble"]["rows"] if r["method"] == "optimization"]
    targeted = [r for r in rows if r["targeted"]]
    if targeted:
        members = statistics.fmean(r["on_members"]["target_hit"] for r in targeted)
        parts.append(f"targeted ensemble on every member {_pct(members)}%")
    for want, key, label in ((True, "target_hit", "targeted hit"), (False, "changed", "non-targeted changed")):
        chosen = [r for r in rows if r["targeted"] == want]
        if chosen:
            ensemble = statistics.fmean(r["on_held_out"][key] for r in chosen)
            single = statistics.fmean(r["single_model_transfer"]["mean"][key] or 0.0 for r in chosen)
            parts.append(f"ensemble on held-out {label} {_pct(ensemble)}% (single-model {_pct(single)}%)")
    if targeted:
        words = [r["on_held_out"]["target_words"] for r in targeted if r["on_held_out"]["target_words"] is not None]
        if words:
            parts.append(f"held-out target words {_pct(statistics.fmean(words))}%")
    return "; ".join(parts)


def _matrix_rows(
    matrix: dict[str, dict[str, Any]], names: list[str], cell: Callable[[dict[str, Any]], str]
) -> list[Any]:
    """One row per source: its name, its RMSD, then ``cell`` of each evaluated model's figures."""
    return [
        [source, _num(matrix[source][names[0]]["rmsd"], 2), *(cell(matrix[source][t]) for t in names)]
        for source in names
    ]
