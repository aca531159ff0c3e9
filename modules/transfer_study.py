"""The attacks and evaluation of the transfer study (Liu et al. 2017; Show-and-Fool, Chen et al. 2018).

Given trained captioners and a batch of test images: single-model attacks (targeted Show-and-Fool, the targeted
optimisation attack of the ensembles run on the source alone, and a non-targeted optimisation attack per source)
captioned by every model, then leave-one-out ensembles (optimisation, FG and FGS, targeted and not) evaluated on the
held-out model and on every member. ``lightning_app.studies.transfer`` trains or loads the
models and writes the report; this file holds no I/O.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from datamodules.errors import RobucapError
from datamodules.text import normalize_caption
from modules.attacks import ENSEMBLE_METHODS, Attack, ShowAndFool, build_attack
from modules.attacks.targets import choose_targets, target_caption_ids
from modules.captioners import ARCHITECTURES
from modules.captioning import CaptioningModule
from modules.transfer import TransferCell, TransferMatrix, hits_target, rmsd_255, transfer_matrix
from modules.victims.captioner import CaptionObjective, caption_ensemble, different_vocabularies
from modules.victims.ensemble import EnsembleObjectiveName, check_ensemble_objective

__all__ = [
    "ENSEMBLE_METHODS",
    "KINDS",
    "MODELS",
    "AttackedImages",
    "EnsembleRows",
    "SingleModelAttacks",
    "StudyCaptioner",
    "TransferStudyConfig",
    "attack_descriptions",
    "leave_one_out_ensembles",
    "on_members",
    "optimization_attack",
    "show_and_fool_attack",
    "single_model_attacks",
    "targeted_optimization_attack",
]


@dataclass(frozen=True)
class StudyCaptioner:
    """One captioner the study trains (``--study.models``: a list of ``{name, arch, seed_offset, overrides}``).

    Attributes:
        name: Its name in the tables and results.json.
        arch: ``vit_gpt2`` or ``show_attend_tell`` (:data:`~modules.captioners.ARCHITECTURES`).
        seed_offset: Added to the study's ``seed`` for its initialisation and data order.
        overrides: Fields changed in the study's ``preset`` (the captioner's ``overrides``: for ViT-GPT2
            ``{"encoder": {...}, "decoder": {...}}``), ``None``: the preset as it is. Sizes differ through these.
    """

    name: str
    arch: str
    seed_offset: int = 0
    overrides: dict[str, Any] | None = None


# A ViT-GPT2 half again as wide as the tiny preset (hidden 96 instead of 64 in both parts): another size.
WIDE_VIT_GPT2: dict[str, Any] = {
    "encoder": {"hidden_size": 96, "intermediate_size": 192},
    "decoder": {"n_embd": 96},
}
# Five captioners, two architectures: ViT-GPT2 of two seeds and two sizes, Show-Attend-Tell of two seeds, so that
# every held-out model has a sibling of its architecture among the four members of its ensemble.
MODELS: tuple[StudyCaptioner, ...] = (
    StudyCaptioner("vit_gpt2_s0", "vit_gpt2", 0),
    StudyCaptioner("vit_gpt2_s1", "vit_gpt2", 1),
    StudyCaptioner("vit_gpt2_wide_s2", "vit_gpt2", 2, WIDE_VIT_GPT2),
    StudyCaptioner("sat_s0", "show_attend_tell", 0),
    StudyCaptioner("sat_s1", "show_attend_tell", 1),
)
FAST_METHODS = ENSEMBLE_METHODS[1:]  # fg, fgs
# targeted: Show-and-Fool; targeted_optimization: the targeted ensembles' optimisation on one source (the matched
# single-model baseline); non_targeted: the optimisation on the source's own captions.
KINDS = ("targeted", "targeted_optimization", "non_targeted")
_SUMMARY_KEYS = (
    "changed", "target_hit", "target_hit_clean", "target_words", "target_words_clean", "bleu4_drop", "ori_bleu4",
    "tgt_bleu4", "rmsd",
)  # fmt: skip


@dataclass
class TransferStudyConfig:
    """Settings of the transfer study."""

    epochs: int = 2
    """Training epochs of every model."""
    preset: str = "tiny"
    """Preset of the trained captioners."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    batch_size: int = 64
    """Training batch size."""
    train_images: int | None = None
    """Training images used (the first N; ``None``: all)."""
    val_images: int | None = 500
    """Validation images used for model selection (the first N)."""
    test_images: int | None = None
    """Test images scored for each model's clean BLEU-4 (the first N; ``None``: the whole split)."""
    images: int = 50
    """Attacked test images (the first N of the test split; at least 2, targets come from other images)."""
    seed: int = 0
    """Base seed: each model's seed is ``seed`` plus its ``seed_offset``, and targets are drawn with ``seed``."""
    sf_iterations: int = 200
    """Show-and-Fool Adam iterations per round of the c search (the paper: 1000; fewer here to fit the time budget)."""
    sf_search_rounds: int = 3
    """Show-and-Fool rounds of the c search (Show-and-Fool, Chen et al. 2018: 5; fewer here to fit the time budget)."""
    sf_lr: float = 0.005
    """Show-and-Fool Adam learning rate (Show-and-Fool, Chen et al. 2018: 0.005)."""
    sf_initial_c: float = 1.0
    """Show-and-Fool first c (Show-and-Fool, Chen et al. 2018: 1)."""
    margin: float = 1.0
    """Show-and-Fool confidence margin kappa (the paper: 1; its section 4.4 shows a larger kappa transfers better)."""
    opt_iterations: int = 100
    """Adam iterations of the non-targeted optimisation attacks, single-model and ensemble (Liu et al. 2017: 100)."""
    opt_lr: float = 0.005
    """Adam learning rate of the non-targeted optimisation attacks, in tanh space (sets the distortion with
    lambda = 0)."""
    targeted_iterations: int = 800
    """Adam iterations of the targeted optimisation attacks: the targeted ensembles and the same attack on each
    source alone (the matched single-model baseline). 800 with lr 0.05 is the tuned setting of docs/attacks.md."""
    targeted_lr: float = 0.05
    """Adam learning rate of the targeted optimisation attacks, in tanh space."""
    stop_on_success: bool = True
    """Targeted optimisation attacks: an image whose every member already gives the target (teacher-forced check)
    keeps that iterate and leaves the batch (saves time, spends no more distortion than the success needed)."""
    distance_weight: float = 0.0
    """Lambda of the optimisation attacks (Liu et al. 2017: 0)."""
    ensemble_objective: EnsembleObjectiveName = "sum_margin"
    """How the targeted leave-one-out ensembles combine their members: ``sum_margin`` (the members' Show-and-Fool margin
    losses added up, confidence ``margin``: every member must give the target; the best member hit and the least
    distortion measured, docs/attacks.md), ``sum_loglik`` (their target log-likelihood losses added up) or ``mixture``
    (Liu et al. 2017's eq. 6, satisfied by the easiest member). The non-targeted ensembles always use the mixture."""
    fast_rmsd: float | None = None
    """RMSD (0-255) the FG / FGS budgets aim at; ``None``: that of the optimisation attack of the same row."""
    attack_batch_size: int = 64
    """Images attacked (and captioned) at once."""
    checkpoints: tuple[str, ...] | None = None
    """Existing robucap checkpoints (at least 3) to study instead of training ``models``."""
    wandb: bool = True
    """Log every training run to W&B (offline without an API key)."""
    models: tuple[StudyCaptioner, ...] | None = None
    """Models trained when no checkpoints are given (at least 3), each ``{name, arch, seed_offset, overrides}``;
    ``None``: the five of :data:`MODELS` (ViT-GPT2 seeds 0 and 1, a wider ViT-GPT2, Show-Attend-Tell seeds 0 and 1)."""

    def __post_init__(self) -> None:
        counts = ("epochs", "sf_iterations", "sf_search_rounds", "opt_iterations", "targeted_iterations",
                  "attack_batch_size")  # fmt: skip
        for name in ("opt_lr", "targeted_lr"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < math.inf:
                raise RobucapError(f"transfer study {name} must be > 0, got {value!r}")
        for name in counts:
            if getattr(self, name) < 1:
                raise RobucapError(f"transfer study {name} must be >= 1, got {getattr(self, name)}")
        if self.images < 2:
            raise RobucapError(
                f"transfer study images must be >= 2 (targets come from other images), got {self.images}"
            )
        for name in ("train_images", "val_images", "test_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RobucapError(f"transfer study {name} must be >= 1 or null, got {value}")
        check_ensemble_objective(self.ensemble_objective, "transfer study ensemble_objective")
        if self.fast_rmsd is not None and not 0 < self.fast_rmsd <= 255:
            raise RobucapError(f"transfer study fast_rmsd must be in (0, 255] (0-255 scale), got {self.fast_rmsd}")
        if self.checkpoints is not None:
            self.checkpoints = tuple(str(c) for c in self.checkpoints)
            if len(self.checkpoints) < 3:
                raise RobucapError(
                    f"transfer study checkpoints needs at least 3 captioners (one held out, an ensemble of the "
                    f"others), got {len(self.checkpoints)}: {list(self.checkpoints)}"
                )
        given = MODELS if self.models is None else self.models
        self.models = tuple(m if isinstance(m, StudyCaptioner) else StudyCaptioner(**m) for m in given)
        if self.checkpoints is None and len(self.models) < 3:
            raise RobucapError(f"transfer study needs at least 3 models, got {len(self.models)}")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise RobucapError(f"transfer study model names must be unique, got {names}")
        for model in self.models:
            if model.arch not in ARCHITECTURES:
                raise RobucapError(
                    f"transfer study model arch must be one of {list(ARCHITECTURES)}, got {model.arch!r}"
                )


# -- helpers --------------------------------------------------------------------------------------------------------
def choose_study_targets(captions: list[str], references: list[list[str]], seed: int) -> tuple[list[str], str]:
    """Show-and-Fool's targets from model captions, else (all captions alike) from the images' first references."""
    try:
        return [str(t) for t in choose_targets(captions, seed=seed)], "model_captions"
    except RobucapError:
        return [str(t) for t in choose_targets([r[0] for r in references], seed=seed)], "references"


def batched(images: torch.Tensor, size: int, fn: Any, *per_image: list) -> torch.Tensor:
    """Apply ``fn(images, *lists)`` to batches of ``size`` images; concatenate the results."""
    parts = []
    for start in range(0, images.shape[0], size):
        parts.append(fn(images[start : start + size], *(p[start : start + size] for p in per_image)))
    return torch.cat(parts)


def fast_budgets(rmsd: float, image: torch.Tensor) -> dict[str, float]:
    """FG (L2) and FGS (L-infinity) budgets in [0, 1] units whose unclipped perturbation has RMSD ``rmsd`` (0-255)."""
    return {"fg": rmsd / 255 * math.sqrt(image[0].numel()), "fgs": min(1.0, rmsd / 255)}


def show_and_fool_attack(cfg: TransferStudyConfig) -> ShowAndFool:
    """The targeted single-model attack (its objective: Show-and-Fool's logit margin ``cfg.margin``)."""
    return ShowAndFool(
        iterations=cfg.sf_iterations, lr=cfg.sf_lr, initial_c=cfg.sf_initial_c, search_rounds=cfg.sf_search_rounds
    )


def optimization_attack(cfg: TransferStudyConfig) -> Attack:
    """Liu et al.'s (2017) optimisation attack (Adam in tanh space), single-model and ensemble rows alike."""
    return build_attack(
        "optimization", iterations=cfg.opt_iterations, lr=cfg.opt_lr, distance_weight=cfg.distance_weight
    )


def targeted_optimization_attack(cfg: TransferStudyConfig) -> Attack:
    """The targeted optimisation attack: the targeted ensembles' and, on one source, their matched baseline."""
    return build_attack(
        "optimization", iterations=cfg.targeted_iterations, lr=cfg.targeted_lr, distance_weight=cfg.distance_weight,
        stop_on_success=cfg.stop_on_success,
    )  # fmt: skip


def attack_descriptions(cfg: TransferStudyConfig) -> dict[str, str]:
    """What results.json records under ``transfer.attacks``: each single-model attack and its objective."""
    return {
        "targeted": f"{show_and_fool_attack(cfg)!r} on CaptionObjective.targeting(loss='logits', margin={cfg.margin})",
        "targeted_optimization": f"{targeted_optimization_attack(cfg)!r} on caption_ensemble([source], "
        f"objective={cfg.ensemble_objective!r}, margin={cfg.margin})",
        "non_targeted": f"{optimization_attack(cfg)!r} on caption_ensemble([source])",
    }


def _mean_cells(cells: dict[str, TransferCell]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in _SUMMARY_KEYS:
        values = [getattr(c, key) for c in cells.values() if getattr(c, key) is not None]
        out[key] = statistics.fmean(values) if values else None
    return out


def _summary_scores(cell: TransferCell) -> dict[str, float | None]:
    return {k: getattr(cell, k) for k in _SUMMARY_KEYS}


def single_model_transfer(
    matrix: TransferMatrix, sources: list[str], held_out: str, targeted: bool, attack: str = "optimization"
) -> dict[str, Any]:
    """Transfer to ``held_out`` of each source's own single-model attack: per source, mean, and best (JSON).

    The best source is the one with the highest target hit (targeted; ties: the larger share of target words) or
    changed share (non-targeted; ties: the larger BLEU-4 drop).
    """
    cells = {s: matrix[s][held_out] for s in sources}
    if targeted:
        best = max(cells, key=lambda s: (cells[s].target_hit or 0.0, cells[s].target_words or 0.0))
    else:
        best = max(cells, key=lambda s: (cells[s].changed, cells[s].bleu4_drop))
    return {
        "attack": attack,
        "sources": list(sources),
        "per_source": {s: _summary_scores(cells[s]) for s in sources},
        "mean": _mean_cells(cells),
        "best": {"source": best, **_summary_scores(cells[best])},
    }


@dataclass
class AttackedImages:
    """The test images every attack starts from, with what the evaluation compares against.

    Attributes:
        pixels: Images in [0, 1]. Shape: ``(N, 3, H, W)``.
        references: Each image's reference captions.
        image_ids: Each image's id.
        clean: Each model's greedy caption of each image, by model name.
    """

    pixels: torch.Tensor
    references: list[list[str]]
    image_ids: list[Any]
    clean: dict[str, list[str]]


@dataclass
class SingleModelAttacks:
    """Each source's own attacks and their transfer matrices.

    Attributes:
        targeted: Show-and-Fool images per source. Shape of each: ``(N, 3, H, W)``.
        targeted_optimization: The targeted ensembles' optimisation attack run on each source alone, towards the same
            targets as its Show-and-Fool images. Shape of each: ``(N, 3, H, W)``.
        non_targeted: Optimisation-attack images per source. Shape of each: ``(N, 3, H, W)``.
        targets: The target caption of each image, per source.
        targets_from: ``model_captions`` or ``references``, per source.
        white_box: Show-and-Fool's white-box ``success`` rate, mean ``l2`` and ``rmsd``, per source.
        matrix: ``targeted`` / ``targeted_optimization`` / ``non_targeted`` -> source -> evaluated model -> cell.
    """

    targeted: dict[str, torch.Tensor]
    targeted_optimization: dict[str, torch.Tensor]
    non_targeted: dict[str, torch.Tensor]
    targets: dict[str, list[str]]
    targets_from: dict[str, str]
    white_box: dict[str, dict[str, float]]
    matrix: dict[str, TransferMatrix]


@dataclass
class EnsembleRows:
    """The leave-one-out ensemble rows.

    Attributes:
        rows: One JSON row per (held-out model, method, targeted).
        images: The adversarial images of each row, by ``(held_out, method, targeted)``. Shape: ``(N, 3, H, W)``.
        targets: Per held-out model, the member the targets came from, how, and the target captions.
        shared_vocabulary: Whether the models share one vocabulary (targeted rows need it).
    """

    rows: list[dict[str, Any]]
    images: dict[tuple[str, str, bool], torch.Tensor] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    shared_vocabulary: bool = True


def _shared_vocabulary(models: dict[str, CaptioningModule]) -> bool:
    return not different_vocabularies([m.tokenizer for m in models.values()])


def _on_ensemble(
    attack: Attack, captioners: list[Any], max_new_tokens: int, objective: str = "mixture", margin: float = 1.0
) -> Any:
    """``fn(images, targets=None)`` for :func:`batched`: ``attack``'s images against the captioners' ensemble
    objective (``objective``: Liu et al. 2017's eq. 6 mixture or a sum over the members; targeted when target ids are
    given)."""

    def run(images: torch.Tensor, targets: list[list[int]] | None = None) -> torch.Tensor:
        goal = caption_ensemble(
            captioners, images, targets, max_new_tokens=max_new_tokens, objective=objective, margin=margin
        )
        return attack(goal, images).adversarial

    return run


def single_model_attacks(
    models: dict[str, CaptioningModule], images: AttackedImages, cfg: TransferStudyConfig
) -> SingleModelAttacks:
    """Attack each model alone and caption with every model.

    Per source: targeted Show-and-Fool, the targeted ensembles' optimisation attack on the source alone (same targets;
    the single-model baseline at the ensembles' budget) when the models share one vocabulary, and the non-targeted
    optimisation attack.
    """
    x, size = images.pixels, cfg.attack_batch_size
    targeted_sets, opt_sets, nt_sets, targets, targets_from, white_box = {}, {}, {}, {}, {}, {}
    shared = _shared_vocabulary(models)
    for index, (name, module) in enumerate(models.items(), start=1):
        print(f"[transfer study] single-model attacks {index}/{len(models)} on {name}")
        targets[name], targets_from[name] = choose_study_targets(images.clean[name], images.references, cfg.seed)
        ids = [target_caption_ids(module.tokenizer, t) for t in targets[name]]
        show_and_fool = show_and_fool_attack(cfg)
        goals = [
            CaptionObjective.targeting(
                module.captioner, ids[s : s + size], loss="logits", margin=cfg.margin,
                max_new_tokens=module.hparams.max_new_tokens,
            )
            for s in range(0, len(ids), size)
        ]  # fmt: skip
        starts = range(0, len(ids), size)
        results = [show_and_fool(goal, x[s : s + size]) for goal, s in zip(goals, starts, strict=True)]
        targeted_sets[name] = torch.cat([r.adversarial for r in results])
        success = torch.cat([r.success for r in results]).float()
        white_box[name] = {
            "success": float(success.mean()),
            "l2": float(torch.cat([r.l2 for r in results]).mean()),
            "rmsd": float(rmsd_255(x, targeted_sets[name]).mean()),
        }
        length = module.hparams.max_new_tokens
        if shared:  # the matched baseline of the targeted ensemble rows, which need one vocabulary
            attack = targeted_optimization_attack(cfg)
            run = _on_ensemble(attack, [module.captioner], length, cfg.ensemble_objective, cfg.margin)
            opt_sets[name] = batched(x, size, run, ids)
        attack = optimization_attack(cfg)
        nt_sets[name] = batched(x, size, _on_ensemble(attack, [module.captioner], length))
    print("[transfer study] evaluating single-model transfer")
    common = (models, x, images.references, images.image_ids)
    matrix = {
        "targeted": transfer_matrix(targeted_sets, *common, targets, size, images.clean),
        "targeted_optimization": transfer_matrix(opt_sets, *common, targets, size, images.clean),
        "non_targeted": transfer_matrix(nt_sets, *common, None, size, images.clean),
    }
    return SingleModelAttacks(targeted_sets, opt_sets, nt_sets, targets, targets_from, white_box, matrix)


def leave_one_out_ensembles(
    models: dict[str, CaptioningModule], images: AttackedImages, single: SingleModelAttacks, cfg: TransferStudyConfig
) -> EnsembleRows:
    """For each model held out, attack the ensemble of the others (optimisation, FG, FGS; targeted and not)."""
    names = list(models)
    result = EnsembleRows(rows=[], shared_vocabulary=_shared_vocabulary(models))
    for held_out in names:
        members = [n for n in names if n != held_out]
        print(f"[transfer study] ensemble of {'+'.join(members)} (held out: {held_out})")
        for targeted in (True, False):
            if targeted and not result.shared_vocabulary:
                continue  # a target is one sequence of token ids for every member: needs one vocabulary
            _ensemble_row(models, images, single, cfg, held_out, targeted, result)
    return result


def _ensemble_row(
    models: dict[str, CaptioningModule],
    images: AttackedImages,
    single: SingleModelAttacks,
    cfg: TransferStudyConfig,
    held_out: str,
    targeted: bool,
    result: EnsembleRows,
) -> None:
    """Attack one leave-one-out ensemble with the three methods; append its rows to ``result``."""
    x, size = images.pixels, cfg.attack_batch_size
    members = [n for n in models if n != held_out]
    captioners = [models[n].captioner for n in members]
    row_targets, extra = None, []
    if targeted:
        # Targets from the first member's clean captions: the held-out model is a black box.
        row_targets, source = choose_study_targets(images.clean[members[0]], images.references, cfg.seed)
        result.targets[held_out] = {"from_member": members[0], "from": source, "captions": row_targets}
        extra = [[target_caption_ids(models[members[0]].tokenizer, t) for t in row_targets]]
    length = max(models[n].hparams.max_new_tokens for n in members)
    objective = cfg.ensemble_objective if targeted else "mixture"

    def crafted(attack: Attack) -> torch.Tensor:
        return batched(x, size, _on_ensemble(attack, captioners, length, objective, cfg.margin), *extra)

    sets = {"optimization": crafted(targeted_optimization_attack(cfg) if targeted else optimization_attack(cfg))}
    reference_rmsd = float(rmsd_255(x, sets["optimization"]).mean()) if cfg.fast_rmsd is None else cfg.fast_rmsd
    budgets = fast_budgets(reference_rmsd, x)
    for method in FAST_METHODS:
        attack = build_attack(method, budgets[method])
        sets[method] = crafted(attack)
    cells = transfer_matrix(sets, models, x, images.references, images.image_ids, row_targets, size, images.clean)
    if targeted:
        # The matched baseline: the same optimisation on each member alone (its own targets, the same rule).
        transfer = single_model_transfer(single.matrix["targeted_optimization"], members, held_out, True)
        show_and_fool = single_model_transfer(single.matrix["targeted"], members, held_out, True, "show_and_fool")
    else:
        transfer = single_model_transfer(single.matrix["non_targeted"], members, held_out, False)
    for method in ENSEMBLE_METHODS:
        result.images[(held_out, method, targeted)] = sets[method]
        result.rows.append(
            {
                "held_out": held_out,
                "members": members,
                "method": method,
                "targeted": targeted,
                "objective": objective,
                "epsilon": budgets.get(method),
                "epsilon_norm": {"fg": "l2", "fgs": "linf"}.get(method),
                "rmsd": cells[method][held_out].rmsd,
                "on_held_out": cells[method][held_out].to_json(),
                "on_members": on_members({m: cells[method][m] for m in members}, row_targets),
                "single_model_transfer": transfer,
                **({"single_model_show_and_fool": show_and_fool} if targeted else {}),
            }
        )


def on_members(cells: dict[str, TransferCell], targets: list[str] | None) -> dict[str, Any]:
    """The white-box verdict of an ensemble's members on its images (JSON).

    ``target_hit``: share of images whose caption is the target on EVERY member (``None`` non-targeted), the success
    the targeted ensemble objectives aim at; ``changed``: share whose caption changed on every member;
    ``target_words``: the members' mean share of the target's content words; ``models``: each member's own cell.
    """
    first = next(iter(cells.values()))
    n = first.n
    every_changed = [
        all(
            normalize_caption(c.adversarial_captions[i]) != normalize_caption(c.clean_captions[i])
            for c in cells.values()
        )
        for i in range(n)
    ]
    hit = None
    if targets is not None:
        hit = sum(all(hits_target(c.adversarial_captions[i], targets[i]) for c in cells.values()) for i in range(n)) / n
    words = [c.target_words for c in cells.values() if c.target_words is not None]
    return {
        "target_hit": hit,
        "changed": sum(every_changed) / n,
        "target_words": statistics.fmean(words) if words else None,
        "models": {m: c.to_json() for m, c in cells.items()},
    }
