"""``robucap attack ensemble``: Liu et al.'s (2017) ensemble attack, crafted on several checkpoints, evaluated on all.

With ``--held_out i`` checkpoint ``i`` is left out of the ensemble and plays the black box. ``--objective`` says how
the members combine (:mod:`modules.victims.ensemble`): eq. 6's mixture, or the sum of the members' target
log-likelihood or margin losses, which holds only when every member says the target. ``results.json`` records, for a
targeted attack, ``ensemble.on_members.target_hit`` (share of images on which EVERY member gives the exact target) and
``ensemble.on_held_out.target_hit``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from callbacks.image_grid import difference_gain, gain_label
from datamodules.errors import RobucapError
from lightning_app.attack.data import check_common, load_eval_images, load_module, resolve_device
from lightning_app.attack.output import Example, example_grid, write_outputs
from lightning_app.attack.settings import EnsembleSettings, settings_block
from lightning_app.report import Report
from modules.attack_eval import EnsembleRun, ensemble_targets, run_ensemble
from modules.attacks import ENSEMBLE_METHODS, build_attack
from modules.attacks.base import check_positive
from modules.captioning import CaptioningModule
from modules.records import records_to_json
from modules.victims.captioner import different_vocabularies

__all__ = ["ensemble_objective", "members_target_hit", "run_ensemble_command"]


def _check(settings: EnsembleSettings) -> None:
    check_common(settings)
    n = len(settings.ckpt)
    if n < 2:
        raise RobucapError(f"the ensemble attack needs at least 2 checkpoints (--ckpt A B ...), got {n}")
    if settings.held_out is not None and not 0 <= settings.held_out < n:
        raise RobucapError(f"--held_out must be a checkpoint index in [0, {n - 1}], got {settings.held_out}")
    if settings.method not in ENSEMBLE_METHODS:
        raise RobucapError(f"--method must be one of {', '.join(ENSEMBLE_METHODS)}, got {settings.method!r}")
    if settings.target is not None and not settings.targeted:
        raise RobucapError("--target needs --targeted")
    if settings.objective == "sum_margin" and not settings.targeted:
        raise RobucapError(
            "--objective sum_margin needs --targeted (a margin towards a target caption); use mixture or sum_loglik"
        )
    check_positive(settings.margin, "--margin (kappa)")


def ensemble_objective(settings: EnsembleSettings) -> str:
    """The objective the attack runs on: ``--objective``, else ``sum_margin`` (measured best on the members,
    docs/attacks.md) targeted and ``mixture`` non-targeted."""
    if settings.objective is not None:
        return settings.objective
    return "sum_margin" if settings.targeted else "mixture"


def members_target_hit(run: EnsembleRun, members: Sequence[int]) -> float | None:
    """Share of images whose adversarial caption is the target for EVERY member; ``None`` when untargeted."""
    if run.targets is None:
        return None
    verdicts = [[bool(r.success) for r in run.models[i].records] for i in members]
    return sum(all(column) for column in zip(*verdicts, strict=True)) / len(verdicts[0])


def _same_vocabulary(modules: Sequence[CaptioningModule], paths: Sequence[str]) -> None:
    different = [paths[i] for i in different_vocabularies([m.tokenizer for m in modules])]
    if different:
        raise RobucapError(
            f"targeted ensemble attacks need one vocabulary for every checkpoint; {different} differ from {paths[0]}"
        )


def run_ensemble_command(settings: EnsembleSettings) -> int:
    """Craft on the members, evaluate on every checkpoint, write ``results.json`` and the report.

    Raises:
        RobucapError: Bad settings, checkpoints, targets or data.
    """
    start = time.perf_counter()
    _check(settings)
    paths = list(settings.ckpt)
    device = resolve_device(settings.device)
    modules = [load_module(p, device) for p in paths]
    members = [i for i in range(len(paths)) if i != settings.held_out]
    reference = settings.held_out if settings.held_out is not None else 0  # whose captions the records show
    if settings.targeted:
        _same_vocabulary(modules, paths)
    names = ("iterations", "lr", "distance_weight")
    options = {k: getattr(settings, k) for k in names if getattr(settings, k) is not None}
    objective = ensemble_objective(settings)
    attack = build_attack(settings.method, settings.epsilon, **options)
    # Sizes may differ between checkpoints: the data follows the reference model and the attack checks the rest.
    data = load_eval_images(settings, modules[reference], paths[reference])
    images = data.images
    torch.manual_seed(settings.seed)
    targets = None
    if settings.targeted:
        # Paper-style targets from the first member's captions, as the transfer study picks them: a held-out model
        # is a black box, and a caption it says may be one the members cannot say.
        length = int(modules[members[0]].hparams.max_new_tokens)
        targets = ensemble_targets(modules[members[0]], images, settings.target, settings.seed, length)
    run = run_ensemble(
        modules, members, attack, images, data.references, data.image_ids, targets, settings.batch_size,
        objective=objective, margin=settings.margin,
    )  # fmt: skip
    rows = [
        {"index": i, "checkpoint": p, "role": "member" if i in members else "held_out", **e.scores()}
        for i, (p, e) in enumerate(zip(paths, run.models, strict=True))
    ]
    block = {
        "method": settings.method,
        "attack": repr(attack),
        "targeted": settings.targeted,
        "epsilon": settings.epsilon,
        "iterations": getattr(attack, "iterations", None),
        "lr": getattr(attack, "lr", None),
        "distance_weight": getattr(attack, "distance_weight", None),
        "objective": objective,
        "margin": settings.margin if objective == "sum_margin" else None,
        "checkpoints": paths,
        "targets_from": paths[members[0]] if settings.targeted else None,
        "members": members,
        "held_out": settings.held_out,
        "n": int(images.shape[0]),
        "rmsd": run.models[reference].rmsd,
        "models": rows,
        "held_out_result": rows[settings.held_out] if settings.held_out is not None else None,
        "on_members": {"target_hit": members_target_hit(run, members)},
        "on_held_out": None if settings.held_out is None else {"target_hit": rows[settings.held_out]["target_rate"]},
        "records": records_to_json(run.models[reference].records),
    }
    results = {
        "command": "attack ensemble",
        "checkpoint": paths,
        "data": data.description,
        "settings": settings_block(settings),
        "reference": reference,
        "ensemble": block,
    }
    report = _report(settings, block, run, images, reference)
    path = write_outputs(Path(settings.out), results, report, start)
    focus = rows[reference]
    print(
        f"robucap attack ensemble done: on {paths[reference]} BLEU-4 {focus['bleu4_clean']:.3f} -> "
        f"{focus['bleu4_adv']:.3f}, {focus['changed']:.1%} captions changed; report: {path}"
    )
    return 0


def _report(
    settings: EnsembleSettings, block: dict[str, Any], run: EnsembleRun, images: torch.Tensor, reference: int
) -> Report:
    paths, held_out = block["checkpoints"], settings.held_out
    report = Report("robucap attack ensemble")
    report.heading("Ensemble attack (Liu et al. 2017)")
    crafted = ", ".join(paths[i] for i in block["members"])
    held = f"; held out (black box): {paths[held_out]}" if held_out is not None else ""
    report.paragraph(
        f"{'Targeted' if settings.targeted else 'Untargeted'} {settings.method} attack crafted on {crafted}{held}; "
        f"{block['n']} {settings.split} images; mean RMSD {block['rmsd']:.2f} / 255; objective {block['objective']}. "
        "Every checkpoint captions the same adversarial images."
    )
    if block["on_members"]["target_hit"] is not None:
        report.paragraph(
            f"Every member gives the exact target on {block['on_members']['target_hit']:.1%} of the images."
        )
    targeted = run.targets is not None
    report.table(
        ["checkpoint", "role", "BLEU-4 clean", "BLEU-4 attacked", "captions changed"]
        + (["target rate"] if targeted else []),
        [
            [r["checkpoint"], r["role"], r["bleu4_clean"], r["bleu4_adv"], f"{r['changed']:.1%}"]
            + ([f"{r['target_rate']:.1%}"] if targeted else [])
            for r in block["models"]
        ],
    )
    shown = run.models[reference].records[: settings.examples]
    if shown:
        adversarial = run.adversarial
        # fgs has an L-infinity budget; fg's is L2 and optimization has none, so their largest change sets the scale.
        budget = settings.epsilon if settings.method == "fgs" else None
        gain = difference_gain(adversarial[: len(shown)] - images[: len(shown)], budget)
        examples = [
            Example(
                images[k],
                adversarial[k],
                (
                    f"original: {r.clean}",
                    f"adversarial: {r.prediction}",
                    f"{gain_label(gain)}, RMSD = {r.rmsd:.2f} / 255",
                ),
            )
            for k, r in enumerate(shown)
        ]
        report.heading(f"Examples (captions of {paths[reference]})")
        report.image(example_grid(examples, gain), "original, adversarial, difference")
    return report
