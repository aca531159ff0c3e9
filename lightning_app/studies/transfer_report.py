"""The transfer study's report: model table, transfer matrices, leave-one-out rows, example images, summary line."""

from __future__ import annotations

import statistics
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
    report.paragraph(
        "Non-targeted (optimisation) transfer: changed % / BLEU-4 drop; ori = Show-and-Fool's BLEU-4 of the "
        "adversarial captions against the model's own clean captions (lower = more change)."
    )
    rows = []
    for source in names:
        cells = transfer["matrix"]["non_targeted"][source]
        rows.append(
            [source, _num(cells[names[0]]["rmsd"], 2)]
            + [f"{_pct(cells[t]['changed'])} / {_num(cells[t]['bleu4_drop'])} (ori {_num(cells[t]['ori_bleu4'])})"
               for t in names]
        )  # fmt: skip
    report.table(["source \\ evaluated on", "RMSD", *names], rows)

    report.heading("Leave-one-out ensembles (Liu et al. 2017, eq. 6)")
    report.paragraph(
        "Each row attacks the ensemble of all models but the held-out one (equal weights) and evaluates on the "
        f"held-out model (a black box). {ensemble['fast_budget_rule']}: FGS eps = RMSD / 255 (L-infinity), FG eps = "
        "RMSD * sqrt(3 H W) / 255 (L2), both in [0, 1] pixel units. Targeted ensemble targets come from the first "
        "member's clean captions. 'single-model' is the transfer to the held-out model of each member's own "
        "single-model attack (Show-and-Fool / optimisation): mean over the members, and the best member."
        + (f" Targeted rows skipped: {ensemble['targeted_skipped']}." if ensemble["targeted_skipped"] else "")
    )
    rows = []
    for r in ensemble["rows"]:
        key = "target_hit" if r["targeted"] else "changed"
        held, single = r["on_held_out"], r["single_model_transfer"]
        clean_hit = f" (clean {_pct(held['target_hit_clean'])})" if r["targeted"] else ""
        members = " / ".join(f"{_pct(c[key])}" for c in r["on_members"].values())
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.4f} ({r['epsilon_norm']})"
        rows.append(
            [r["held_out"], "+".join(r["members"]), r["method"], "targeted" if r["targeted"] else "non-targeted", eps,
             _num(r["rmsd"], 2), f"{_pct(held[key])}{clean_hit} / {_num(held['bleu4_drop'])}", members,
             f"{_pct(single['mean'][key])} / {_pct(single['best'][key])} ({single['best']['source']})"]
        )  # fmt: skip
    report.table(
        ["held out", "ensemble", "method", "kind", "eps", "RMSD", "held-out hit|changed % / BLEU-4 drop",
         "members hit|changed %", "single-model mean / best %"],
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
    for targeted, key, label in ((True, "target_hit", "targeted hit"), (False, "changed", "non-targeted changed")):
        chosen = [r for r in rows if r["targeted"] == targeted]
        if chosen:
            ensemble = statistics.fmean(r["on_held_out"][key] for r in chosen)
            single = statistics.fmean(r["single_model_transfer"]["mean"][key] or 0.0 for r in chosen)
            parts.append(f"ensemble on held-out {label} {_pct(ensemble)}% (single-model {_pct(single)}%)")
    return "; ".join(parts)
