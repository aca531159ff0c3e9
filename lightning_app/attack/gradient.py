"""``robucap attack fgsm|pgd|...``: a budgeted attack, untargeted on the first reference caption (Rashid & Rivas 2024).

Runs every registered budgeted attack (:func:`~lightning_app.attack.settings.gradient_attacks`) with its own options.

Reports BLEU-4 clean and under attack, the share of changed captions and the RMSD (Liu et al. 2017, 0-255 scale).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from callbacks.image_grid import difference_gain, gain_label
from lightning_app.attack.data import check_common, load_eval_images, load_module, resolve_device
from lightning_app.attack.output import Example, example_grid, write_outputs
from lightning_app.attack.settings import GradientSettings, settings_block
from lightning_app.report import Report, fmt
from modules.attack_eval import AttackEvaluation, attack_images, evaluate_attack
from modules.attacks import build_attack
from modules.records import records_to_json

__all__ = ["run_gradient_attack"]


def run_gradient_attack(name: str, settings: GradientSettings) -> int:
    """Attack, evaluate and report; returns the exit status.

    Raises:
        RobucapError: Bad settings, checkpoint or data.
    """
    start = time.perf_counter()
    check_common(settings)
    attack = build_attack(name, settings.epsilon, **settings.options)  # checks them before any loading
    module = load_module(settings.ckpt, resolve_device(settings.device))
    data = load_eval_images(settings, module, settings.ckpt)
    torch.manual_seed(settings.seed)
    clean, adversarial = attack_images(module, data.batches, attack)
    evaluation = evaluate_attack(module, clean, adversarial, data.references, data.image_ids, None, settings.batch_size)
    block = {"name": name, "attack": repr(attack), "epsilon": attack.epsilon, "epsilon_255": attack.epsilon * 255}
    # The options as the attack resolved them (pgd's default step_size is 2.5 epsilon / steps).
    block.update({option: getattr(attack, option, value) for option, value in settings.options.items()})
    block.update(evaluation.scores(), records=records_to_json(evaluation.records))
    results = {
        "command": f"attack {name}",
        "checkpoint": str(settings.ckpt),
        "data": data.description,
        "settings": settings_block(settings),
        "attack": block,
    }
    report = _report(name, settings, block, evaluation, clean, adversarial)
    path = write_outputs(Path(settings.out), results, report, start)
    print(
        f"robucap attack {name} done: BLEU-4 {evaluation.bleu4_clean:.3f} -> {evaluation.bleu4_adv:.3f}, "
        f"{evaluation.changed:.1%} captions changed, RMSD {evaluation.rmsd:.2f}; report: {path}"
    )
    return 0


def _report(
    name: str,
    settings: GradientSettings,
    block: dict[str, Any],
    evaluation: AttackEvaluation,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
) -> Report:
    norm = "L2" if name == "fg" else "L∞"
    report = Report(f"robucap attack {name}")
    report.heading(f"{name.upper()}: untargeted {norm} attack on the first reference caption")
    steps = f", {block['steps']} steps." if "steps" in block else "."
    report.paragraph(
        f"Checkpoint {settings.ckpt}; {evaluation.n} {settings.split} images. ε = {fmt(block['epsilon'])} in [0, 1] "
        f"pixel units ({block['epsilon_255']:.1f} / 255){steps}"
    )
    report.table(
        ["attack", "ε", "ε × 255", "BLEU-4 clean", "BLEU-4 attacked", "captions changed", "RMSD (0-255)"],
        [[name, block["epsilon"], block["epsilon_255"], evaluation.bleu4_clean, evaluation.bleu4_adv,
          f"{evaluation.changed:.1%}", evaluation.rmsd]],
    )  # fmt: skip
    shown = evaluation.records[: settings.examples]
    if shown:
        # An L-infinity budget sets the scale; fg's L2 budget is no pixel bound, so its largest change does.
        gain = difference_gain(
            adversarial[: len(shown)] - clean[: len(shown)], None if name == "fg" else block["epsilon"]
        )
        examples = [
            Example(
                clean[r.index],
                adversarial[r.index],
                (
                    f"original: {r.clean}",
                    f"adversarial: {r.prediction}",
                    f"{gain_label(gain)}, RMSD = {r.rmsd:.2f} / 255",
                ),
            )
            for r in shown
            if r.index is not None
        ]
        report.heading("Examples")
        report.image(example_grid(examples, gain), "original, adversarial, difference")
    return report
