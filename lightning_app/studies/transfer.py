"""``robucap study transfer``: transferability of adversarial images between captioners.

Following Liu et al. 2017 and Show-and-Fool (Chen et al. 2018).

Three captioners train on the same data (or come from ``--checkpoints``): ``vit_gpt2_s0`` and ``vit_gpt2_s1`` (tiny
ViT-GPT2, seeds 0 and 1: same architecture, different weights) and ``sat_s0`` (tiny Show-Attend-Tell, seed 0: another
architecture). On the first ``images`` test images:

1. **Single-model transfer** (Liu et al. 2017, Tables 1-2; Show-and-Fool, section 4.4). Per source model, a targeted
   Show-and-Fool caption attack (targets: Show-and-Fool's choice, the source's caption of another image) and a
   non-targeted optimisation attack (:class:`~modules.attacks.ensemble.EnsembleAttack` with the source alone: Adam in
   tanh space, lambda = 0, fixed iterations, as Liu et al. 2017 section 3.1). Every adversarial set is captioned by
   every model: ``transfer.matrix.targeted[source][model]`` and ``transfer.matrix.non_targeted[source][model]``.
2. **Leave-one-out ensembles** (Liu et al. 2017, section 5, Tables 3-4). For each model held out, the other models
   form an ensemble (eq. 6, equal weights) attacked with the optimisation, FG and FGS methods, targeted and not, and
   the images are evaluated on every model, the held-out one included. The FG / FGS budgets are matched to the RMSD of
   the optimisation attack of the same row (FGS: ``eps = RMSD / 255``; FG: ``eps = RMSD * sqrt(3 H W) / 255``), as
   Liu et al. 2017 matches the distortion of its methods. Targeted ensemble targets are chosen (Show-and-Fool's rule)
   from the clean captions of the **first ensemble member**: the held-out model is a black box, so its captions are
   not used.
   Each row also carries the single-model transfer to the held-out model from each ensemble member alone
   (``single_model_transfer``: mean and best over those sources), the honest baseline for the ensemble's gain.

Targets chosen from model captions need two images with different captions; when a (barely trained) model gives every
image the same caption, the first reference captions of the images are used instead (recorded as ``targets_from``).
Every attacked image is evaluated, successful on the source or not (Show-and-Fool, Chen et al. 2018 transfers only
white-box successes; the white-box success rate is recorded next to the matrix).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from lightning_app.report import Report
from lightning_app.training import train_captioner
from modules.attacks.ensemble import EnsembleAttack
from modules.attacks.show_and_fool import ShowAndFool
from modules.attacks.targets import choose_targets, target_caption_ids
from modules.captioners import ARCHITECTURES
from modules.captioning import CaptioningModule
from modules.evaluation import bleu_of, caption_batches, evaluation_loader
from modules.transfer import caption_images, rmsd_255, transfer_matrix

# (name, architecture, seed offset): two ViT-GPT2 of different seeds, one Show-Attend-Tell.
MODELS: tuple[tuple[str, str, int], ...] = (
    ("vit_gpt2_s0", "vit_gpt2", 0),
    ("vit_gpt2_s1", "vit_gpt2", 1),
    ("sat_s0", "show_attend_tell", 0),
)
FAST_METHODS = ("fg", "fgs")
ENSEMBLE_METHODS = ("optimization", *FAST_METHODS)
KINDS = ("targeted", "non_targeted")
_SUMMARY_KEYS = ("changed", "target_hit", "target_hit_clean", "bleu4_drop", "ori_bleu4", "tgt_bleu4", "rmsd")


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
    """Base seed: model seeds are ``seed + 0``, ``seed + 1``, ``seed + 0`` and targets are drawn with ``seed``."""
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
    """Adam iterations of the optimisation attacks (Liu et al. 2017: 100)."""
    opt_lr: float = 0.005
    """Adam learning rate of the optimisation attacks, in tanh space (sets the distortion with lambda = 0)."""
    distance_weight: float = 0.0
    """Lambda of the optimisation attacks (Liu et al. 2017: 0)."""
    fast_rmsd: float | None = None
    """RMSD (0-255) the FG / FGS budgets aim at; ``None``: that of the optimisation attack of the same row."""
    attack_batch_size: int = 64
    """Images attacked (and captioned) at once."""
    checkpoints: tuple[str, ...] | None = None
    """Existing robucap checkpoints (at least 3) to study instead of training the three default models."""
    wandb: bool = True
    """Log every training run to W&B (offline without an API key)."""
    models: tuple[tuple[str, str, int], ...] = field(default=MODELS)
    """Models trained when no checkpoints are given: ``(name, arch, seed offset)``."""

    def __post_init__(self) -> None:
        for name in ("epochs", "sf_iterations", "sf_search_rounds", "opt_iterations", "attack_batch_size"):
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
        if self.fast_rmsd is not None and not 0 < self.fast_rmsd <= 255:
            raise RobucapError(f"transfer study fast_rmsd must be in (0, 255] (0-255 scale), got {self.fast_rmsd}")
        if self.checkpoints is not None:
            self.checkpoints = tuple(str(c) for c in self.checkpoints)
            if len(self.checkpoints) < 3:
                raise RobucapError(
                    f"transfer study --checkpoints needs at least 3 captioners (one held out, an ensemble of the "
                    f"others), got {len(self.checkpoints)}: {list(self.checkpoints)}"
                )
        self.models = tuple(tuple(m) for m in self.models)
        if self.checkpoints is None and len(self.models) < 3:
            raise RobucapError(f"transfer study needs at least 3 models, got {len(self.models)}")
        for _, arch, _ in self.models:
            if arch not in ARCHITECTURES:
                raise RobucapError(f"transfer study model arch must be one of {list(ARCHITECTURES)}, got {arch!r}")


PROFILES: dict[str, dict[str, Any]] = {
    # Measured on 2 shared CPU cores (load ~3.3), 64 px shapes: 16 min 52 s wall, of which 9.5 min training (test
    # BLEU-4 0.58 / 0.58 / 0.64) and ~7 min attacking 50 images and evaluating.
    "full": {},
    # Measured 3 min 12 s on the same machine: one epoch on a third of the training images, 16 attacked images.
    "quick": {
        "epochs": 1,
        "train_images": 2000,
        "val_images": 200,
        "test_images": 300,
        "images": 16,
        "sf_iterations": 100,
        "sf_search_rounds": 2,
        "opt_iterations": 60,
    },
    # Plumbing only (tests): numbers are meaningless.
    "smoke": {
        "epochs": 1,
        "batch_size": 16,
        "warmup_steps": 2,
        "val_images": 8,
        "test_images": 8,
        "images": 4,
        "sf_iterations": 4,
        "sf_search_rounds": 1,
        "opt_iterations": 3,
    },
}


def study_settings(profile: str, **overrides: Any) -> TransferStudyConfig:
    """The study config of a profile, with overrides."""
    if profile not in PROFILES:
        raise RobucapError(f"unknown transfer study profile {profile!r}; expected one of {sorted(PROFILES)}")
    return TransferStudyConfig(**{**PROFILES[profile], **overrides})


# -- models ---------------------------------------------------------------------------------------------------------
def _checkpoint_names(paths: tuple[str, ...]) -> list[str]:
    """Readable unique names: the file stem, or the run directory for Lightning's ``best`` / ``last`` files."""
    names = []
    for path in map(Path, paths):
        names.append(path.parent.name if path.stem in ("best", "last") and path.parent.name else path.stem)
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _load_checkpoints(cfg: TransferStudyConfig, image_size: int) -> tuple[dict[str, CaptioningModule], list[dict]]:
    from lightning_app.export import load_module

    models, info = {}, []
    for name, path in zip(_checkpoint_names(cfg.checkpoints), cfg.checkpoints, strict=True):
        module = load_module(path)
        if module.hparams.image_size != image_size:
            raise RobucapError(
                f"checkpoint {path} takes {module.hparams.image_size} px images but the data is {image_size} px: "
                f"pass --image-size {module.hparams.image_size}"
            )
        models[name] = module.eval()
        info.append({"name": name, "arch": module.hparams.arch, "seed": None, "checkpoint": str(path)})
    return models, info


def _train_models(
    datamodule: CaptionDataModule, out: Path, cfg: TransferStudyConfig
) -> tuple[dict[str, CaptioningModule], list[dict]]:
    models, info = {}, []
    for index, (name, arch, offset) in enumerate(cfg.models, start=1):
        seed = cfg.seed + offset
        L.seed_everything(seed, workers=True)
        module = CaptioningModule.with_tokenizer(
            datamodule.tokenizer, arch=arch, preset=cfg.preset, image_size=datamodule.image_size, lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
        )  # fmt: skip
        print(f"[transfer study] {index}/{len(cfg.models)} {name}: {cfg.epochs} epochs of {arch}/{cfg.preset}")
        run = train_captioner(datamodule, module, out, name, cfg.epochs, wandb=cfg.wandb, test=False)
        models[name] = run.module.eval()
        info.append(
            {
                "name": name,
                "arch": arch,
                "seed": seed,
                "checkpoint": str(run.checkpoint),
                "train_seconds": round(run.train_seconds, 1),
            }
        )
    return models, info


def _shared_vocabulary(models: dict[str, CaptioningModule]) -> bool:
    vocabularies = [m.tokenizer.get_vocab() for m in models.values()]
    return all(v == vocabularies[0] for v in vocabularies[1:])


# -- attacks --------------------------------------------------------------------------------------------------------
def _choose(captions: list[str], references: list[list[str]], seed: int) -> tuple[list[str], str]:
    """Show-and-Fool's targets from model captions, else (all captions alike) from the images' first references."""
    try:
        return [str(t) for t in choose_targets(captions, seed=seed)], "model_captions"
    except RobucapError:
        return [str(t) for t in choose_targets([r[0] for r in references], seed=seed)], "references"


def _batched(images: torch.Tensor, size: int, fn: Any, *per_image: list) -> torch.Tensor:
    """Apply ``fn(images, *lists)`` to batches of ``size`` images; concatenate the results."""
    parts = []
    for start in range(0, images.shape[0], size):
        parts.append(fn(images[start : start + size], *(p[start : start + size] for p in per_image)))
    return torch.cat(parts)


def _fast_budgets(rmsd: float, image: torch.Tensor) -> dict[str, float]:
    """FG (L2) and FGS (L-infinity) budgets in [0, 1] units whose unclipped perturbation has RMSD ``rmsd`` (0-255)."""
    return {"fg": rmsd / 255 * math.sqrt(image[0].numel()), "fgs": min(1.0, rmsd / 255)}


def _mean_cells(cells: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in _SUMMARY_KEYS:
        values = [c[key] for c in cells.values() if c.get(key) is not None]
        out[key] = statistics.fmean(values) if values else None
    return out


def _single_model_transfer(
    matrix: dict[str, dict[str, dict[str, Any]]], sources: list[str], held_out: str, targeted: bool
) -> dict[str, Any]:
    """Transfer to ``held_out`` of each source's own single-model attack: per source, mean, and best."""
    cells = {s: matrix[s][held_out] for s in sources}
    key = "target_hit" if targeted else "changed"
    best = max(cells, key=lambda s: (cells[s][key] or 0.0, cells[s]["bleu4_drop"]))
    return {
        "attack": "show_and_fool" if targeted else "optimization",
        "sources": list(sources),
        "per_source": {s: {k: cells[s].get(k) for k in _SUMMARY_KEYS} for s in sources},
        "mean": _mean_cells(cells),
        "best": {"source": best, **{k: cells[best].get(k) for k in _SUMMARY_KEYS}},
    }


def run_transfer_study(data: dict[str, Any], out: Path, cfg: TransferStudyConfig) -> dict[str, Any]:
    """Train (or load) the models, attack, evaluate; return the study block (``dataset``, ``transfer``, ...).

    Args:
        data: :class:`~datamodules.datamodule.CaptionDataModule` arguments (``format``, ``root``, ``image_size``...).
        out: Directory for logs and checkpoints.
        cfg: Study settings.
    """
    out = Path(out)
    datamodule = CaptionDataModule(
        **data, batch_size=cfg.batch_size, limit_train=cfg.train_images, limit_val=cfg.val_images,
        limit_test=cfg.test_images,
    )  # fmt: skip
    datamodule.prepare_data()
    if cfg.checkpoints is None:
        datamodule.setup("fit")
    datamodule.setup("test")
    test_set = datamodule.datasets["test"]
    if cfg.images > len(test_set):
        raise RobucapError(
            f"transfer study images ({cfg.images}) exceeds the {len(test_set)} test images; lower --images"
        )
    if cfg.checkpoints is None:
        models, info = _train_models(datamodule, out, cfg)
    else:
        models, info = _load_checkpoints(cfg, datamodule.image_size)
    names = list(models)
    for row in info:
        records = caption_batches(models[row["name"]], evaluation_loader(models[row["name"]], test_set, None, 64))
        row["test_bleu4"] = bleu_of(records)["bleu4"]
        row["test_images"] = len(records)

    batch = next(iter(evaluation_loader(models[names[0]], test_set, cfg.images, cfg.images)))
    x, references, image_ids = batch["pixel_values"], [list(r) for r in batch["references"]], list(batch["image_id"])
    clean = {n: caption_images(m, x, cfg.attack_batch_size) for n, m in models.items()}
    size = cfg.attack_batch_size

    # 1. Single-model attacks.
    targeted_sets, nt_sets, targets, targets_from, white_box = {}, {}, {}, {}, {}
    for index, name in enumerate(names, start=1):
        module = models[name]
        print(f"[transfer study] single-model attacks {index}/{len(names)} on {name}")
        targets[name], targets_from[name] = _choose(clean[name], references, cfg.seed)
        ids = [target_caption_ids(module.tokenizer, t) for t in targets[name]]
        show_and_fool = ShowAndFool(
            mode="caption", iterations=cfg.sf_iterations, lr=cfg.sf_lr, initial_c=cfg.sf_initial_c,
            search_rounds=cfg.sf_search_rounds, margin=cfg.margin, max_new_tokens=module.hparams.max_new_tokens,
        )  # fmt: skip
        results = [
            show_and_fool(module.captioner, x[s : s + size], ids[s : s + size]) for s in range(0, len(ids), size)
        ]
        targeted_sets[name] = torch.cat([r.adversarial for r in results])
        success = torch.cat([r.success for r in results]).float()
        white_box[name] = {
            "success": float(success.mean()),
            "l2": float(torch.cat([r.l2 for r in results]).mean()),
            "rmsd": float(rmsd_255(x, targeted_sets[name]).mean()),
        }
        attack = EnsembleAttack(
            [module.captioner], targeted=False, method="optimization", iterations=cfg.opt_iterations, lr=cfg.opt_lr,
            distance_weight=cfg.distance_weight, max_new_tokens=module.hparams.max_new_tokens,
        )  # fmt: skip
        nt_sets[name] = _batched(x, size, attack)
    print("[transfer study] evaluating single-model transfer")
    matrix = {
        "targeted": transfer_matrix(targeted_sets, models, x, references, image_ids, targets, size, clean),
        "non_targeted": transfer_matrix(nt_sets, models, x, references, image_ids, None, size, clean),
    }

    # 2. Leave-one-out ensembles.
    shared = _shared_vocabulary(models)
    rows: list[dict[str, Any]] = []
    ensemble_sets: dict[tuple[str, str, bool], torch.Tensor] = {}
    ensemble_targets: dict[str, dict[str, Any]] = {}
    for held_out in names:
        members = [n for n in names if n != held_out]
        captioners = [models[n].captioner for n in members]
        max_new_tokens = max(models[n].hparams.max_new_tokens for n in members)
        print(f"[transfer study] ensemble of {'+'.join(members)} (held out: {held_out})")
        for targeted in (True, False):
            kind = KINDS[0] if targeted else KINDS[1]
            if targeted and not shared:
                continue  # a target is one sequence of token ids for every member: needs one vocabulary
            row_targets, ids = None, None
            if targeted:
                row_targets, source = _choose(clean[members[0]], references, cfg.seed)
                ensemble_targets[held_out] = {"from_member": members[0], "from": source, "captions": row_targets}
                ids = [target_caption_ids(models[members[0]].tokenizer, t) for t in row_targets]
            common = {"targeted": targeted, "max_new_tokens": max_new_tokens}
            optimization = EnsembleAttack(
                captioners, method="optimization", iterations=cfg.opt_iterations, lr=cfg.opt_lr,
                distance_weight=cfg.distance_weight, **common,
            )  # fmt: skip
            sets = {"optimization": _batched(x, size, optimization, *([ids] if targeted else []))}
            reference_rmsd = float(rmsd_255(x, sets["optimization"]).mean()) if cfg.fast_rmsd is None else cfg.fast_rmsd
            budgets = _fast_budgets(reference_rmsd, x)
            for method in FAST_METHODS:
                attack = EnsembleAttack(captioners, method=method, epsilon=budgets[method], **common)
                sets[method] = _batched(x, size, attack, *([ids] if targeted else []))
            cells = transfer_matrix(sets, models, x, references, image_ids, row_targets, size, clean)
            single = _single_model_transfer(matrix[kind], members, held_out, targeted)
            for method in ENSEMBLE_METHODS:
                ensemble_sets[(held_out, method, targeted)] = sets[method]
                rows.append(
                    {
                        "held_out": held_out,
                        "members": members,
                        "method": method,
                        "targeted": targeted,
                        "epsilon": budgets.get(method),
                        "epsilon_norm": {"fg": "l2", "fgs": "linf"}.get(method),
                        "rmsd": cells[method][held_out]["rmsd"],
                        "on_held_out": cells[method][held_out],
                        "on_members": {m: cells[method][m] for m in members},
                        "single_model_transfer": single,
                    }
                )
    rmsd = {kind: {s: matrix[kind][s][names[0]]["rmsd"] for s in names} for kind in KINDS}
    return {
        "dataset": {**datamodule.describe(), "format": data.get("format")},
        "transfer": {
            "models": info,
            "images": cfg.images,
            "image_ids": image_ids,
            "matrix": matrix,
            "rmsd": rmsd,
            "white_box_show_and_fool": white_box,
            "targets": targets,
            "targets_from": targets_from,
            "clean_captions": clean,
            "attacks": {
                "targeted": f"ShowAndFool(mode='caption', loss='logits', iterations={cfg.sf_iterations}, "
                f"search_rounds={cfg.sf_search_rounds}, lr={cfg.sf_lr}, initial_c={cfg.sf_initial_c}, "
                f"margin={cfg.margin})",
                "non_targeted": f"EnsembleAttack([source], method='optimization', iterations={cfg.opt_iterations}, "
                f"lr={cfg.opt_lr}, distance_weight={cfg.distance_weight})",
            },
        },
        "ensemble": {
            "rows": rows,
            "weights": "equal",
            "targets": ensemble_targets,
            "targeted_skipped": None
            if shared
            else "the models do not share one vocabulary: targeted ensembles need one (targets are token ids)",
            "fast_budget_rule": "FG / FGS budgets matched to the RMSD r of the optimisation attack of the same row"
            if cfg.fast_rmsd is None
            else f"FG / FGS budgets matched to RMSD {cfg.fast_rmsd}",
        },
        "config": asdict(cfg),
        "_models": models,
        "_clean": x,
        "_targeted_sets": targeted_sets,
        "_ensemble_sets": ensemble_sets,
    }


# -- report ---------------------------------------------------------------------------------------------------------
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
                     "source's captions may already be what another model says) / changed % / BLEU-4 drop; tgt = paper "
                     "000's BLEU-4 of the adversarial captions against the targets.")  # fmt: skip
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


def examples_png(block: dict[str, Any], n_images: int = 2) -> bytes:
    """Original / adversarial / difference x10 around grey, with every model's captions.

    Rows: the targeted Show-and-Fool images of the first model, then the targeted (or, without a shared vocabulary,
    non-targeted) optimisation images of the ensemble that holds out the last model.
    """
    from callbacks.image_grid import caption_grid_png

    models, x = block["_models"], block["_clean"]
    names = list(models)
    transfer = block["transfer"]
    held_out = names[-1]
    targeted = (held_out, "optimization", True) in block["_ensemble_sets"]
    ensemble_targets = block["ensemble"]["targets"].get(held_out, {}).get("captions") if targeted else None
    attacks = [
        (f"Show-and-Fool on {names[0]}", block["_targeted_sets"][names[0]], transfer["targets"][names[0]]),
        (
            f"ensemble {'+'.join(n for n in names if n != held_out)}",
            block["_ensemble_sets"][(held_out, "optimization", targeted)],
            ensemble_targets,
        ),
    ]
    images, captions = [], []
    n = min(n_images, x.shape[0])
    clean_text = ["\n".join(f"{m}: {transfer['clean_captions'][m][i]}" for m in names) for i in range(n)]
    for title, adversarial, targets in attacks:
        adv_text = {m: caption_images(models[m], adversarial[:n]) for m in names}
        rmsd = rmsd_255(x[:n], adversarial[:n])
        for i in range(n):
            target = f"target: {targets[i]}\n" if targets is not None else "non-targeted\n"
            images += [x[i], adversarial[i], ((adversarial[i] - x[i]) * 10 + 0.5).clamp(0, 1)]
            captions += [
                f"original\n{clean_text[i]}",
                f"{title}\n{target}" + "\n".join(f"{m}: {adv_text[m][i]}" for m in names),
                f"difference x10 around grey\nRMSD {float(rmsd[i]):.1f} / 255",
            ]
    return caption_grid_png(images, captions, columns=3)


def public_block(block: dict[str, Any]) -> dict[str, Any]:
    """The block without the in-memory models and images (what goes into results.json)."""
    return {k: v for k, v in block.items() if not k.startswith("_")}


def run_and_report(data: dict[str, Any], out: Path, cfg: TransferStudyConfig, report: Report) -> dict[str, Any]:
    """Run the study, add it to ``report`` and return its results block."""
    start = time.perf_counter()
    block = run_transfer_study(data, out, cfg)
    block["seconds"] = round(time.perf_counter() - start, 1)
    report_transfer_study(report, block)
    report.paragraph("Example images: original, adversarial and their difference, with the captions of every model.")
    report.image(examples_png(block), "transfer examples")
    return public_block(block)


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
