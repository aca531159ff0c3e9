"""``robucap attack dag``: Dense Adversary Generation (Xie et al. 2017) on a captioner, detector or segmenter.

``--victim captioner``: DAG on the content words of the captioner's greedy caption
(:func:`modules.dense_eval.attack_tokens`), reported as the token flip rate, the share of changed captions, BLEU-4
clean and attacked, perceptibility ``p`` and the average iterations, next to FGSM at DAG's mean L-infinity norm.
``--victim detector|segmenter``: the paper's Table 1 on the victim (:mod:`lightning_app.attack.dag_dense`): mAP or
mIoU clean, after DAG and with the permuted perturbation, average iterations and ``p``.

The checkpoint must hold the victim ``--victim`` names (a dense victim's checkpoint records which it is:
:func:`modules.dense.read_victim`; a captioner's carries its tokenizer). Each victim has one runner in
:data:`RUNNERS`; a victim without one is refused with one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from callbacks.image_grid import difference_gain, gain_label
from datamodules.errors import RobucapError
from lightning_app.attack.dag_dense import run_detector, run_segmenter
from lightning_app.attack.data import check_common, load_eval_images, load_module, resolve_device
from lightning_app.attack.output import Example, example_grid, write_outputs
from lightning_app.attack.settings import DAG_VICTIMS, DagSettings, settings_block
from lightning_app.inputs import checkpoint_path
from lightning_app.report import Report, fmt
from modules.attacks.dag import DAG
from modules.checkpoint import read_checkpoint_info
from modules.dense import read_victim
from modules.dense_eval import TokenDagEvaluation, attack_tokens

__all__ = ["DEFAULT_ITERATIONS", "RUNNERS", "checkpoint_victim", "run_dag_command"]

DEFAULT_ITERATIONS: dict[str, int] = {"detector": 150, "segmenter": 200, "captioner": 200}
"""The paper's ``M_0`` per victim (150 detection, 200 segmentation); a captioner, dense per token like a segmenter
per pixel, gets the segmentation budget."""


def checkpoint_victim(path: str) -> str:
    """What a checkpoint holds: ``captioner``, or the dense victim its marker names (``detector``, ``segmenter``).

    Raises:
        RobucapError: No file, or a file that is neither a dense victim's checkpoint nor a robucap captioner's.
    """
    checkpoint = checkpoint_path(path)
    dense = read_victim(checkpoint)
    if dense is not None:
        return dense.victim
    read_checkpoint_info(checkpoint)  # a captioner's checkpoint carries its tokenizer; anything else is refused
    return "captioner"


def check_dag_settings(settings: DagSettings) -> DAG:
    """Check the settings before any loading and build the attack.

    Raises:
        RobucapError: An unknown victim, ``gamma`` not > 0, ``max_iterations`` below 1, or a common setting out of
            range (:func:`~lightning_app.attack.data.check_common`).
    """
    check_common(settings)
    if settings.victim not in DAG_VICTIMS:
        raise RobucapError(f"--victim must be one of {', '.join(DAG_VICTIMS)}, got {settings.victim!r}")
    if not settings.gamma > 0:
        raise RobucapError(f"--gamma (DAG's step, [0, 1] pixel units) must be > 0, got {settings.gamma}")
    iterations = settings.max_iterations
    if iterations is not None and iterations < 1:
        raise RobucapError(f"--max_iterations must be >= 1, got {iterations}")
    if settings.reselect_every < 0:
        every = settings.reselect_every
        raise RobucapError(f"--reselect_every must be >= 0 (0: the paper's fixed proposals), got {every}")
    if settings.reselect_every and settings.victim != "detector":
        raise RobucapError(f"--reselect_every re-selects a detector's proposals; --victim {settings.victim} has none")
    if not settings.margin >= 0:
        raise RobucapError(f"--margin must be >= 0 (0: the paper's rule), got {settings.margin}")
    if settings.margin and settings.victim == "captioner":
        raise RobucapError("--margin applies to --victim detector and segmenter; the captioner's DAG has none")
    return DAG(gamma=settings.gamma, max_iterations=iterations or DEFAULT_ITERATIONS[settings.victim])


def run_dag_command(settings: DagSettings) -> int:
    """Check the settings and the checkpoint's kind, then run the victim's runner; returns the exit status.

    Raises:
        RobucapError: Bad settings, a checkpoint of another kind than ``--victim``, a victim without a runner, or
            bad data.
    """
    start = time.perf_counter()
    attack = check_dag_settings(settings)
    held = checkpoint_victim(settings.ckpt)
    if held != settings.victim:
        # Only a victim DAG can attack is worth suggesting (a part-pretraining checkpoint is none).
        hint = f" or --victim {held}" if held in DAG_VICTIMS else ""
        raise RobucapError(
            f"--ckpt {settings.ckpt} holds a {held}, not a {settings.victim}; give a {settings.victim} checkpoint{hint}"
        )
    runner = RUNNERS.get(settings.victim)
    if runner is None:
        raise RobucapError(
            f"robucap attack dag --victim {settings.victim} has no runner; victims available: {', '.join(RUNNERS)}"
        )
    return runner(settings, attack, start)


def run_captioner(settings: DagSettings, attack: DAG, start: float) -> int:
    """DAG on a captioner's content words, with FGSM at the same L-infinity norm; writes results.json and the report.

    Raises:
        RobucapError: Bad data, or no image whose caption has a word to attack.
    """
    module = load_module(settings.ckpt, resolve_device(settings.device))
    data = load_eval_images(settings, module, settings.ckpt)
    evaluation = attack_tokens(
        module, data.images, data.references, data.image_ids, attack, seed=settings.seed,
        batch_size=settings.batch_size, shrink_only=settings.shrink_only, compare_fgsm=settings.fgsm,
    )  # fmt: skip
    block = {
        "victim": "captioner",
        "attack": repr(attack),
        "gamma": attack.gamma,
        "gamma_255": attack.gamma * 255,
        "max_iterations": attack.max_iterations,
        **evaluation.scores(),
        "records": [r.to_json() for r in evaluation.images],
    }
    results = {
        "command": "attack dag",
        "checkpoint": str(settings.ckpt),
        "data": data.description,
        "settings": settings_block(settings),
        "dense": {"captioner": block},
    }
    path = write_outputs(Path(settings.out), results, _captioner_report(settings, block, evaluation), start)
    print(
        f"robucap attack dag done: token flip rate {evaluation.token_flip_rate:.1%}, {evaluation.changed:.1%} "
        f"captions changed, BLEU-4 {evaluation.bleu4_clean:.3f} -> {evaluation.bleu4_adv:.3f}, "
        f"p {evaluation.p:.2e}, {evaluation.iterations:.1f} iterations; report: {path}"
    )
    return 0


RUNNERS: dict[str, Callable[[DagSettings, DAG, float], int]] = {
    "captioner": run_captioner,
    "detector": run_detector,
    "segmenter": run_segmenter,
}
"""The runner of each victim: it loads the checkpoint and the data, attacks, and writes the outputs."""


def _captioner_report(settings: DagSettings, block: dict[str, Any], evaluation: TokenDagEvaluation) -> Report:
    report = Report("robucap attack dag")
    report.heading("DAG (Xie et al. 2017) on a captioner: every content word of its caption pushed to another word")
    report.paragraph(
        f"Checkpoint {settings.ckpt}; {evaluation.n} {settings.split} images attacked, {evaluation.skipped} skipped "
        f"(no content word in the clean caption); {evaluation.targets} target words. γ = {fmt(block['gamma'], 6)} in "
        f"[0, 1] pixel units ({block['gamma_255']:.2f} / 255), at most {block['max_iterations']} iterations; "
        "adversarial words by a seeded permutation within word classes (colour, shape, size on the shapes data)."
    )
    report.paragraph(
        "Greedy captions. Token flip rate: targets no longer the top-1 word, teacher-forced on the clean caption. "
        "p = sqrt(1/K Σ‖r_k‖²) in [0, 1] units (paper: 1.5-2.9 × 10⁻³ on segmenters and detectors). FGSM attacks the "
        "same clean caption at ε = DAG's mean L∞.",
        note=True,
    )
    columns = ["attack", "L∞ (mean)", "p", "iterations", "token flip rate", "captions changed", "BLEU-4 clean",
               "BLEU-4 attacked", "BLEU-4 drop"]  # fmt: skip
    rows: list[list[Any]] = [
        ["DAG", evaluation.linf, f"{evaluation.p:.2e}", evaluation.iterations, f"{evaluation.token_flip_rate:.1%}",
         f"{evaluation.changed:.1%}", evaluation.bleu4_clean, evaluation.bleu4_adv, evaluation.bleu4_drop],
    ]  # fmt: skip
    if evaluation.fgsm is not None:
        f = evaluation.fgsm
        rows.append(["FGSM", f.epsilon, f"{f.p:.2e}", 1, "-", f"{f.changed:.1%}", evaluation.bleu4_clean,
                     f.bleu4_adv, f.bleu4_drop])  # fmt: skip
    report.table(columns, rows)
    shown = evaluation.attacked[: settings.examples]
    if shown:
        clean, adversarial = evaluation.clean_images, evaluation.adversarial
        gain = difference_gain([adversarial[r.index] - clean[r.index] for r in shown])
        examples = [
            Example(
                clean[r.index],
                adversarial[r.index],
                (
                    f"original: {r.clean}",
                    f"adversarial: {r.adversarial}",
                    f"{gain_label(gain)}; {r.fooled}/{r.targets} words flipped, {r.iterations} it., p = {r.p:.2e}",
                ),
            )
            for r in shown
        ]
        report.heading("Examples")
        report.image(example_grid(examples, gain), "original, adversarial, amplified difference")
    return report
