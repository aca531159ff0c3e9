"""``robucap attack``: attack a trained captioner on a dataset split and report it.

Subcommands (each writes ``OUT/results.json`` and ``OUT/report.html``):

* ``show-and-fool``: Show-and-Fool's targeted caption and targeted keyword attacks (Tables 1-3: success rate, mean
  ``||delta||_2`` of the successes, caption scores of the failures against their target, keywords found among the
  failures), with an example grid per mode: original, adversarial and ``0.5 + 10 * delta``.
* ``fgsm`` / ``pgd``: untargeted L-infinity attacks on the first reference caption (Rashid & Rivas 2024): BLEU-4 clean
  and under attack, share of changed captions, RMSD (Liu et al. 2017, 0-255 scale).
* ``ensemble``: Liu et al.'s (2017) ensemble attack, crafted on several checkpoints and evaluated on all of them; with
  ``--held-out i`` checkpoint ``i`` is left out of the ensemble and plays the black box.

Distances are in [0, 1] pixel units unless a key or a column says otherwise (``rmsd`` is on the 0-255 scale, as in
Liu et al. 2017).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import DataError, RobucapError
from datamodules.formats import FORMATS
from datamodules.formats.detect import detect_format
from datamodules.text import normalize_caption
from lightning_app.inputs import checkpoint_path, data_options
from lightning_app.report import Report, fmt
from modules.attacks import build_attack
from modules.attacks.show_and_fool import ShowAndFool
from modules.attacks.targets import choose_targets, keyword_ids, target_caption_ids
from modules.captioning import CaptioningModule
from modules.checkpoint import read_checkpoint_info
from modules.evaluation import bleu_of, evaluation_loader
from modules.metrics.targeted import FAILURE_SCORES
from modules.targeted_eval import mode_keywords, run_show_and_fool
from modules.transfer import rmsd_255

__all__ = ["SUBCOMMANDS", "amplified_delta", "attack_main", "build_parser"]

SUBCOMMANDS: tuple[str, ...] = ("show-and-fool", "fgsm", "pgd", "ensemble")
DIFFERENCE_GAIN = 10.0  # the examples show 0.5 + 10 * delta: Show-and-Fool's perturbations are invisible at 1x
ENSEMBLE_METHODS: tuple[str, ...] = ("optimization", "fg", "fgs")


# -- helpers ------------------------------------------------------------------------------------------------------
def amplified_delta(clean: torch.Tensor, adversarial: torch.Tensor, gain: float = DIFFERENCE_GAIN) -> torch.Tensor:
    """``0.5 + gain * (adversarial - clean)`` clamped to [0, 1]: grey where nothing changed.

    A fixed gain (not a per-image stretch) keeps perturbations of different sizes comparable across the grid.

    Shape:
        ``clean`` and ``adversarial``: ``(..., 3, H, W)``; returns the same shape.
    """
    return (0.5 + gain * (adversarial.float() - clean.float())).clamp(0.0, 1.0)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RobucapError(f"--device {name}: no CUDA device is available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise RobucapError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from error


def _load_module(path: str, device: torch.device) -> CaptioningModule:
    checkpoint = checkpoint_path(path)
    # A missing, truncated, corrupt or foreign file is bad input, named in one line here; once the file is known to
    # be a robucap checkpoint, an exception while building the model from it is a bug and keeps its traceback.
    read_checkpoint_info(checkpoint)
    module = CaptioningModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    # Eval mode: dropout would make clean captions, targets and success checks random.
    return module.to(device).eval()


def _check_common(args: argparse.Namespace) -> None:
    if args.images < 1:
        raise RobucapError(f"--images must be >= 1, got {args.images}")
    if args.batch_size < 1:
        raise RobucapError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.examples < 0:
        raise RobucapError(f"--examples must be >= 0, got {args.examples}")


@dataclass
class EvalImages:
    """The first ``--images`` images of the split, as loaded batches.

    Attributes:
        batches: Collated batches (``pixel_values``, ``labels`` for the first reference, ``image_id``, ``references``).
        description: What was loaded, for ``results.json``.
    """

    batches: list[dict[str, Any]]
    description: dict[str, Any]

    @property
    def images(self) -> torch.Tensor:
        """All images. Shape: ``(N, 3, H, W)`` in [0, 1]."""
        return torch.cat([b["pixel_values"] for b in self.batches])

    @property
    def image_ids(self) -> list[Any]:
        """One id per image."""
        return [i for b in self.batches for i in b["image_id"]]

    @property
    def references(self) -> list[list[str]]:
        """The reference captions of every image."""
        return [list(r) for b in self.batches for r in b["references"]]


# Data settings a checkpoint's own data module carries over to an attack; the rest (batching, poisoning, the
# training tokenizer, split limits) concern training only.
_CARRIED_DATA_SETTINGS: tuple[str, ...] = ("format", "root", "format_options", "max_tokens")
# Formats that read the same files, so format options saved for one apply to the other.
_COCO_LAYOUTS = frozenset({"coco", "shapes"})


def saved_data_settings(checkpoint: str | Path) -> dict[str, Any] | None:
    """The data settings that ``robucap fit`` saved in a checkpoint, or ``None`` for an older or foreign one.

    Lightning stores the data module's ``save_hyperparameters()`` under ``datamodule_hyper_parameters``; only
    :data:`_CARRIED_DATA_SETTINGS` are returned, and only when a format and a root are recorded.

    Raises:
        RobucapError: The file cannot be read as a checkpoint.
    """
    try:
        # mmap: the weights are not read again, only the small dictionaries around them.
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError) as error:  # torch.load's errors for a truncated or foreign file
        raise RobucapError(f"cannot read checkpoint {checkpoint}: {error}") from error
    hparams = saved.get("datamodule_hyper_parameters") if isinstance(saved, dict) else None
    if not isinstance(hparams, Mapping) or not all(isinstance(hparams.get(k), str) for k in ("format", "root")):
        return None
    return {k: hparams[k] for k in _CARRIED_DATA_SETTINGS if hparams.get(k) is not None}


def _checkpoint_data_options(args: argparse.Namespace, checkpoint: str) -> tuple[dict[str, Any], str]:
    """Data options without ``--config``: the checkpoint's own settings, ``--data-root`` and ``--format``.

    The checkpoint's format is used for its own root; another root (``--data-root``) is read in the format its files
    show (:func:`~datamodules.formats.detect.detect_format`) unless ``--format`` names one. The saved format options
    apply only to the saved format's layout.

    Returns:
        The options, and where the format came from (``--format``, ``checkpoint`` or ``detected``).

    Raises:
        RobucapError: No data at all, a missing data directory, or a directory of no (or several) known layouts.
    """
    saved = saved_data_settings(checkpoint)
    root = args.data_root or (saved["root"] if saved else None)
    if root is None:
        raise RobucapError(
            f"no data: give --data-root (a dataset directory) or --config (a YAML file with a data: section); "
            f"checkpoint {checkpoint} records no data settings"
        )
    if not Path(root).is_dir():
        if args.data_root:
            raise RobucapError(f"data directory {root} does not exist (expected a dataset root)")
        raise RobucapError(
            f"data directory {root}, recorded in checkpoint {checkpoint}, does not exist; give --data-root (where "
            "the dataset is now) or --config"
        )
    if args.format is not None:
        fmt, source = args.format, "--format"
    elif saved is not None and not args.data_root:
        fmt, source = saved["format"], "checkpoint"
    else:
        try:
            fmt, source = detect_format(root), "detected"
        except DataError as error:
            raise DataError(f"{error}; give --format or --config") from error
    options: dict[str, Any] = {"format": fmt, "root": str(root), "tokenizer": None}
    if saved is not None:
        same_layout = fmt == saved["format"] or {fmt, saved["format"]} <= _COCO_LAYOUTS
        options.update({k: v for k, v in saved.items() if k not in ("format", "root", "format_options")})
        if same_layout and "format_options" in saved:
            options["format_options"] = saved["format_options"]
    return options, source


def load_eval_images(args: argparse.Namespace, module: CaptioningModule, checkpoint: str) -> EvalImages:
    """Load the images an attack command works on, tokenized with ``module``'s tokenizer.

    Data settings come from ``--config`` when given, else from the checkpoint's own data module (its format for its
    own root, the detected format for another ``--data-root``); ``--format`` overrides either. Images are always
    resized to the captioner's input size: a config's ``data.image_size`` is a training choice, and a different
    ``--image-size`` is refused.

    Args:
        args: ``config``, ``data_root``, ``format``, ``image_size``, ``split``, ``images``, ``batch_size``.
        module: Its tokenizer labels the batches; its input size is the images' size.
        checkpoint: The checkpoint ``module`` was loaded from (for its data settings).

    Raises:
        RobucapError: No or bad data options, a missing dataset or split, an unknown layout, an empty split, or an
            ``--image-size`` other than the checkpoint's.
    """
    model_size = int(module.hparams.image_size)
    if args.image_size is not None and args.image_size != model_size:
        raise RobucapError(
            f"--image-size is {args.image_size} px but checkpoint {checkpoint}'s captioner takes {model_size} px "
            "images (leave --image-size out to use the checkpoint's size)"
        )
    config = Path(args.config) if args.config else None
    if config is not None:
        options = data_options(config, args.data_root)
        source = "config"
        if args.format is not None and args.format != options.get("format"):
            # The config's format options describe its own layout, not the one --format names.
            options = {**options, "format": args.format, "format_options": None}
            source = "--format"
    else:
        options, source = _checkpoint_data_options(args, checkpoint)
    options["image_size"] = model_size
    options.setdefault("progress", False)
    try:
        datamodule = CaptionDataModule(**options)
    except TypeError as error:
        raise RobucapError(f"config file {args.config}: bad data: options ({error})") from error
    if config is not None:
        # Only a config may ask for generated data; a bare --data-root is read, never written.
        datamodule.prepare_data()
    datamodule.tokenizer = module.tokenizer
    dataset = datamodule.eval_dataset(args.split)
    if len(dataset) == 0:
        raise RobucapError(f"the {args.split} split of {options.get('root')} has no images")
    batches = list(evaluation_loader(module, dataset, args.images, args.batch_size))
    description = {
        "format": options.get("format"),
        "format_from": source,
        "root": str(options.get("root")),
        "config": args.config,
        "split": args.split,
        "image_size": options["image_size"],
        "n_images": sum(len(b["image_id"]) for b in batches),
    }
    return EvalImages(batches, description)


def _write(out: Path, results: dict[str, Any], report: Report, start: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["report"] = str(out / "report.html")
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str), encoding="utf-8")
    return report.write(out / "report.html")


def _grid(rows: list[tuple[torch.Tensor, torch.Tensor, list[str]]]) -> bytes:
    """One row per example: original, adversarial, amplified difference, each with its caption."""
    from callbacks.image_grid import caption_grid_png

    images: list[torch.Tensor] = []
    captions: list[str] = []
    for clean, adversarial, texts in rows:
        images += [clean, adversarial, amplified_delta(clean, adversarial)]
        captions += texts
    return caption_grid_png(images, captions, columns=3)


# -- show-and-fool ------------------------------------------------------------------------------------------------
def _parse_keywords(text: str | None) -> list[str] | None:
    if text is None:
        return None
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise RobucapError(f"--keywords needs at least one keyword (comma-separated, e.g. dog,frisbee), got {text!r}")
    return words


def _parse_modes(args: argparse.Namespace, keywords: list[str] | None) -> list[str]:
    if args.modes is None:
        modes = ["caption"] if args.target is not None or keywords is None else []
        modes += [f"keyword_{len(keywords)}"] if keywords else []
    else:
        modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
        if not modes:
            raise RobucapError(
                f"--modes needs at least one of caption, keyword_1, keyword_2, keyword_3, got {args.modes!r}"
            )
    counts = [mode_keywords(m) for m in modes]
    if keywords is not None:
        wrong = [m for m, k in zip(modes, counts, strict=True) if k and k != len(keywords)]
        if wrong:
            raise RobucapError(f"--keywords gives {len(keywords)} keywords {keywords} but --modes asks for {wrong}")
        if not any(counts):
            raise RobucapError(f"--keywords are the targets of keyword_{len(keywords)}, which --modes does not run")
    if args.target is not None and "caption" not in modes:
        raise RobucapError("--target is the target of the caption mode, which --modes does not run")
    return modes


def _show_and_fool_attacks(args: argparse.Namespace, modes: list[str]) -> dict[str, ShowAndFool]:
    attacks = {}
    for mode in modes:
        keyword = mode_keywords(mode) > 0
        attacks[mode] = ShowAndFool(
            mode="keyword" if keyword else "caption",
            loss="logits" if keyword else args.loss,  # keyword mode has only eq. 9's logits loss
            iterations=args.iterations,
            lr=args.lr,
            initial_c=args.c,
            search_rounds=args.rounds,
            margin=args.margin,
        )
    return attacks


def _show_and_fool(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _check_common(args)
    keywords = _parse_keywords(args.keywords)
    modes = _parse_modes(args, keywords)
    attacks = _show_and_fool_attacks(args, modes)  # bad options fail before any loading
    module = _load_module(args.ckpt, _device(args.device))
    if args.target is not None:
        target_caption_ids(module.tokenizer, args.target)
    if keywords is not None:
        keyword_ids(module.tokenizer, keywords)
    data = load_eval_images(args, module, args.ckpt)
    images, ids, refs = data.images, data.image_ids, data.references
    torch.manual_seed(args.seed)

    blocks: dict[str, dict[str, Any]] = {}
    examples: dict[str, bytes] = {}
    for mode, attack in attacks.items():
        n_keywords = mode_keywords(mode)
        fixed = keywords if n_keywords else args.target
        run = run_show_and_fool(
            module, images, ids, refs, attack, n_keywords=n_keywords, seed=args.seed, batch_size=args.batch_size,
            target=fixed, meteor=not args.no_meteor, progress=True,
        )  # fmt: skip
        blocks[mode] = {**run["summary"], "records": run["records"], "skipped": run["skipped"]}
        shown = run["records"][: args.examples]
        if shown:
            rows = []
            for k, record in enumerate(shown):
                target = record["target"] if isinstance(record["target"], str) else ", ".join(record["target"])
                verdict = "success" if record["success"] else "failure"
                rows.append(
                    (
                        images[record["index"]],
                        run["adversarial"][k],
                        [
                            f"original: {record['clean']}",
                            f"target: {target}\nadversarial ({verdict}): {record['prediction']}",
                            f"0.5 + {DIFFERENCE_GAIN:g}·δ, ‖δ‖₂ = {record['l2']:.3f}",
                        ],
                    )
                )
            examples[mode] = _grid(rows)

    settings = {
        "modes": modes,
        "loss": args.loss,
        "iterations": args.iterations,
        "rounds": args.rounds,
        "lr": args.lr,
        "c": args.c,
        "margin": args.margin,
        "target": args.target,
        "keywords": keywords,
        "seed": args.seed,
        "meteor": not args.no_meteor,
    }
    results = {
        "command": "attack show-and-fool",
        "checkpoint": str(args.ckpt),
        "data": data.description,
        "settings": settings,
        "show_and_fool": blocks,
    }
    report = _show_and_fool_report(args, blocks, examples, data.description)
    out = Path(args.out)
    path = _write(out, results, report, start)
    summary = "; ".join(
        f"{mode} success {block['success_rate']:.1%}"
        + (f" (mean L2 {block['mean_l2']:.3f})" if block["mean_l2"] is not None else "")
        for mode, block in blocks.items()
    )
    print(f"robucap attack show-and-fool done: {summary}; report: {path}")
    return 0


def _show_and_fool_report(
    args: argparse.Namespace, blocks: dict[str, dict[str, Any]], examples: dict[str, bytes], data: dict[str, Any]
) -> Report:
    report = Report("robucap attack show-and-fool")
    report.heading("Show-and-Fool (Show-and-Fool, Chen et al. 2018): targeted caption and targeted keyword attacks")
    targets = (
        "fixed targets (--target / --keywords)"
        if args.target is not None or args.keywords is not None
        else "paper-style targets: for each image, the clean caption (or content words of it) of another randomly "
        "chosen image of the set"
    )
    report.paragraph(
        f"Checkpoint {args.ckpt}; {data['n_images']} {data['split']} images of {data['root']}; {targets}. Adam "
        f"(lr {args.lr}) for {args.iterations} iterations per round, {args.rounds} round(s) of the binary search on c "
        f"from c = {args.c}, margin κ = {args.margin}, {args.loss} loss for targeted captions (keywords: eq. 9)."
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


# -- fgsm / pgd ---------------------------------------------------------------------------------------------------
def _caption_records(
    module: CaptioningModule, images: torch.Tensor, batch: dict[str, Any], adversarial: torch.Tensor
) -> list[dict[str, Any]]:
    with torch.no_grad():
        clean = module.caption(images)
        attacked = module.caption(adversarial)
    distortion = rmsd_255(images, adversarial).tolist()
    return [
        {
            "image_id": image_id,
            "clean": c,
            "prediction": a,
            "references": list(refs),
            "changed": normalize_caption(c) != normalize_caption(a),
            "rmsd": d,
        }
        for image_id, c, a, refs, d in zip(
            batch["image_id"], clean, attacked, batch["references"], distortion, strict=True
        )
    ]


def _scores(records: list[dict[str, Any]]) -> dict[str, Any]:
    """BLEU-4 clean and attacked, changed captions and RMSD of caption records."""
    clean = [{**r, "prediction": r["clean"]} for r in records]
    return {
        "bleu4_clean": bleu_of(clean)["bleu4"],
        "bleu4_adv": bleu_of(records)["bleu4"],
        "changed": sum(r["changed"] for r in records) / len(records),
        "rmsd": sum(r["rmsd"] for r in records) / len(records),
        "n": len(records),
    }


def _example_rows(
    records: list[dict[str, Any]], clean: list[torch.Tensor], adversarial: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    return [
        (
            x,
            a,
            [
                f"original: {r['clean']}",
                f"adversarial: {r['prediction']}",
                f"0.5 + {DIFFERENCE_GAIN:g}·δ, RMSD = {r['rmsd']:.2f} / 255",
            ],
        )
        for r, x, a in zip(records, clean, adversarial, strict=False)
    ]


def _gradient_attack(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _check_common(args)
    name = args.method
    options = {"steps": args.steps} if name == "pgd" else {}
    attack = build_attack(name, args.epsilon, **options)  # checks epsilon and steps before any loading
    module = _load_module(args.ckpt, _device(args.device))
    data = load_eval_images(args, module, args.ckpt)
    torch.manual_seed(args.seed)
    device = next(module.parameters()).device
    records: list[dict[str, Any]] = []
    shown_clean: list[torch.Tensor] = []
    shown_adv: list[torch.Tensor] = []
    for batch in tqdm(data.batches, desc=f"attack {name}", leave=False, disable=None):
        images = batch["pixel_values"].to(device)
        adversarial = attack(module.captioner, images, batch["labels"].to(device))
        records += _caption_records(module, images, batch, adversarial)
        room = max(0, args.examples - len(shown_clean))
        shown_clean += list(images[:room].cpu())
        shown_adv += list(adversarial[:room].cpu())
    block = {
        "name": name,
        "epsilon": attack.epsilon,
        "epsilon_255": attack.epsilon * 255,
        **({"steps": attack.steps, "step_size": attack.step_size} if name == "pgd" else {}),
        **_scores(records),
        "records": records,
    }
    results = {
        "command": f"attack {name}",
        "checkpoint": str(args.ckpt),
        "data": data.description,
        "settings": {"seed": args.seed, "target": "untargeted, first reference caption"},
        "attack": block,
    }
    report = Report(f"robucap attack {name}")
    report.heading(f"{name.upper()}: untargeted L∞ attack on the first reference caption")
    report.paragraph(
        f"Checkpoint {args.ckpt}; {block['n']} {args.split} images. ε = {fmt(block['epsilon'])} in [0, 1] pixel units "
        f"({block['epsilon_255']:.1f} / 255)" + (f", {block['steps']} steps." if name == "pgd" else ".")
    )
    report.table(
        ["attack", "ε", "ε × 255", "BLEU-4 clean", "BLEU-4 attacked", "captions changed", "RMSD (0-255)"],
        [[name, block["epsilon"], block["epsilon_255"], block["bleu4_clean"], block["bleu4_adv"],
          f"{block['changed']:.1%}", block["rmsd"]]],
    )  # fmt: skip
    if shown_clean:
        report.heading("Examples")
        report.image(_grid(_example_rows(records, shown_clean, shown_adv)), "original, adversarial, difference")
    path = _write(Path(args.out), results, report, start)
    print(
        f"robucap attack {name} done: BLEU-4 {block['bleu4_clean']:.3f} -> {block['bleu4_adv']:.3f}, "
        f"{block['changed']:.1%} captions changed, RMSD {block['rmsd']:.2f}; report: {path}"
    )
    return 0


# -- ensemble -----------------------------------------------------------------------------------------------------
def _same_vocabulary(modules: Sequence[CaptioningModule], paths: Sequence[str]) -> None:
    vocab = modules[0].tokenizer.get_vocab()
    different = [p for m, p in zip(modules[1:], paths[1:], strict=True) if m.tokenizer.get_vocab() != vocab]
    if different:
        raise RobucapError(
            f"targeted ensemble attacks need one vocabulary for every checkpoint; {different} differ from {paths[0]}"
        )


def _ensemble(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _check_common(args)
    paths = list(args.ckpt)
    if len(paths) < 2:
        raise RobucapError(f"the ensemble attack needs at least 2 checkpoints (--ckpt A B ...), got {len(paths)}")
    if args.held_out is not None and not 0 <= args.held_out < len(paths):
        raise RobucapError(f"--held-out must be a checkpoint index in [0, {len(paths) - 1}], got {args.held_out}")
    if args.target is not None and not args.targeted:
        raise RobucapError("--target needs --targeted")
    try:
        from modules.attacks.ensemble import EnsembleAttack
    except ImportError as error:
        raise RobucapError(f"the ensemble attack is not available in this installation ({error})") from error

    device = _device(args.device)
    modules = [_load_module(p, device) for p in paths]
    members = [i for i in range(len(paths)) if i != args.held_out]
    reference = args.held_out if args.held_out is not None else 0  # whose captions pick targets and examples
    if args.targeted:
        _same_vocabulary(modules, paths)
        if args.target is not None:
            target_caption_ids(modules[reference].tokenizer, args.target)
    options: dict[str, Any] = {"method": args.method, "targeted": args.targeted}
    for key in ("epsilon", "iterations", "lr"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    attack = EnsembleAttack([modules[i].captioner for i in members], **options)
    # Sizes may differ between checkpoints: the data follows the reference model and the attack checks the rest.
    data = load_eval_images(args, modules[reference], paths[reference])
    images = data.images
    torch.manual_seed(args.seed)

    targets: list[str] | None = None
    if args.targeted:
        clean = [c for b in data.batches for c in modules[reference].caption(b["pixel_values"].to(device))]
        targets = [args.target] * len(clean) if args.target is not None else choose_targets(clean, 0, args.seed)
    adversarial: list[torch.Tensor] = []
    for s in tqdm(range(0, images.shape[0], args.batch_size), desc="ensemble attack", leave=False, disable=None):
        x = images[s : s + args.batch_size].to(device)
        ids = None
        if targets is not None:
            ids = [target_caption_ids(modules[reference].tokenizer, t) for t in targets[s : s + args.batch_size]]
        adversarial.append(attack(x, ids).detach().cpu())
    adv = torch.cat(adversarial)

    rows = []
    per_model_records: list[list[dict[str, Any]]] = []
    for index, (path, module) in enumerate(zip(paths, modules, strict=True)):
        records: list[dict[str, Any]] = []
        offset = 0
        for batch in data.batches:
            x = batch["pixel_values"].to(device)
            records += _caption_records(module, x, batch, adv[offset : offset + x.shape[0]].to(device))
            offset += x.shape[0]
        if targets is not None:
            for record, target in zip(records, targets, strict=True):
                record["target"] = target
                record["success"] = normalize_caption(record["prediction"]) == normalize_caption(target)
        row = {"index": index, "checkpoint": path, "role": "member" if index in members else "held_out"}
        row.update({k: v for k, v in _scores(records).items() if k != "rmsd"})  # the images' RMSD is the block's
        if targets is not None:
            row["target_rate"] = sum(r["success"] for r in records) / len(records)
        rows.append(row)
        per_model_records.append(records)

    block = {
        "method": attack.method,
        "targeted": attack.targeted,
        "epsilon": attack.epsilon,
        "iterations": attack.iterations,
        "lr": attack.lr,
        "checkpoints": paths,
        "members": members,
        "held_out": args.held_out,
        "n": int(images.shape[0]),
        "rmsd": float(rmsd_255(images, adv).mean()),
        "models": rows,
        "held_out_result": rows[args.held_out] if args.held_out is not None else None,
        "records": per_model_records[reference],
    }
    results = {
        "command": "attack ensemble",
        "checkpoint": paths,
        "data": data.description,
        "settings": {"seed": args.seed, "target": args.target, "reference": reference},
        "ensemble": block,
    }
    report = Report("robucap attack ensemble")
    report.heading("Ensemble attack (Liu et al. 2017)")
    crafted = ", ".join(paths[i] for i in members)
    held = f"; held out (black box): {paths[args.held_out]}" if args.held_out is not None else ""
    report.paragraph(
        f"{'Targeted' if args.targeted else 'Untargeted'} {args.method} attack crafted on {crafted}{held}; "
        f"{block['n']} {args.split} images; mean RMSD {block['rmsd']:.2f} / 255. Every checkpoint captions the same "
        "adversarial images."
    )
    columns = ["checkpoint", "role", "BLEU-4 clean", "BLEU-4 attacked", "captions changed"]
    columns += ["target rate"] if targets is not None else []
    report.table(
        columns,
        [
            [r["checkpoint"], r["role"], r["bleu4_clean"], r["bleu4_adv"], f"{r['changed']:.1%}"]
            + ([f"{r['target_rate']:.1%}"] if targets is not None else [])
            for r in rows
        ],
    )
    shown = per_model_records[reference][: args.examples]
    if shown:
        report.heading(f"Examples (captions of {paths[reference]})")
        report.image(
            _grid(_example_rows(shown, list(images[: len(shown)]), list(adv[: len(shown)]))),
            "original, adversarial, difference",
        )
    path = _write(Path(args.out), results, report, start)
    focus = rows[reference]
    print(
        f"robucap attack ensemble done: on {paths[reference]} BLEU-4 {focus['bleu4_clean']:.3f} -> "
        f"{focus['bleu4_adv']:.3f}, {focus['changed']:.1%} captions changed; report: {path}"
    )
    return 0


# -- argument parsing ---------------------------------------------------------------------------------------------
def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    data = common.add_argument_group("data and output")
    data.add_argument("--config", default=None, help="YAML with a data: section (as for robucap fit)")
    data.add_argument(
        "--data-root", default=None, help="dataset directory (default: the checkpoint's); overrides data.root"
    )
    data.add_argument(
        "--format",
        choices=sorted(FORMATS),
        default=None,
        help="dataset format (default: the config's, else the checkpoint's for its own root, else detected)",
    )
    data.add_argument(
        "--image-size", type=int, default=None, help="input size in px (default and only valid value: the checkpoint's)"
    )
    data.add_argument("--split", choices=("test", "val"), default="test", help="split to attack (default test)")
    data.add_argument("--images", type=int, default=50, help="attack the first N images of the split (default 50)")
    data.add_argument("--batch-size", type=int, default=32, help="images attacked together (default 32)")
    data.add_argument("--seed", type=int, default=0, help="seed of targets and random starts (default 0)")
    data.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    data.add_argument("--out", required=True, help="output directory (results.json, report.html)")
    data.add_argument("--examples", type=int, default=4, help="images in the report's example grids (default 4)")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``robucap attack`` parser with its four subcommands."""
    parser = argparse.ArgumentParser(
        prog="robucap attack", description="Attack a trained captioner on a dataset split; write results and a report."
    )
    sub = parser.add_subparsers(dest="method", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    common = _common_options()

    sf = sub.add_parser(
        "show-and-fool", parents=[common], help="Show-and-Fool's targeted caption / keyword attacks (Tables 1-3)"
    )
    sf.add_argument("--ckpt", required=True, help="checkpoint written by robucap fit")
    sf.add_argument("--modes", default=None, help="comma-separated: caption, keyword_1, keyword_2, keyword_3")
    sf.add_argument("--iterations", type=int, default=1000, help="Adam iterations per round (paper: 1000)")
    sf.add_argument("--rounds", type=int, default=5, help="rounds of the binary search on c (paper: 5)")
    sf.add_argument("--lr", type=float, default=0.005, help="Adam learning rate (paper: 0.005)")
    sf.add_argument("--c", type=float, default=1.0, help="initial c (paper: 1)")
    sf.add_argument("--margin", type=float, default=1.0, help="confidence margin kappa (paper: 1)")
    sf.add_argument("--loss", choices=("logits", "log_prob"), default="logits", help="targeted-caption loss")
    sf.add_argument("--target", default=None, help="one fixed target caption for every image")
    sf.add_argument("--keywords", default=None, help="fixed target keywords, comma-separated (mode keyword_M)")
    sf.add_argument("--no-meteor", action="store_true", help="skip METEOR in the failure statistics (faster)")
    sf.set_defaults(run=_show_and_fool)

    for name, text in (
        ("fgsm", "one signed gradient step (Rashid & Rivas 2024)"),
        ("pgd", "iterated FGSM with projection"),
    ):
        gradient = sub.add_parser(name, parents=[common], help=f"untargeted L-infinity attack: {text}")
        gradient.add_argument("--ckpt", required=True, help="checkpoint written by robucap fit")
        gradient.add_argument("--epsilon", type=float, default=0.05, help="L-inf budget in [0, 1] (default 0.05)")
        if name == "pgd":
            gradient.add_argument("--steps", type=int, default=10, help="gradient steps (default 10)")
        gradient.set_defaults(run=_gradient_attack)

    ens = sub.add_parser(
        "ensemble", parents=[common], help="Liu et al.'s (2017) ensemble attack over several checkpoints"
    )
    ens.add_argument("--ckpt", nargs="+", required=True, help="two or more checkpoints")
    ens.add_argument("--held-out", type=int, default=None, help="index of the checkpoint left out as the black box")
    ens.add_argument("--method", choices=ENSEMBLE_METHODS, default="optimization", help="attack method")
    ens.add_argument("--targeted", action="store_true", help="targeted (paper-style targets unless --target)")
    ens.add_argument("--target", default=None, help="with --targeted: one fixed target caption for every image")
    ens.add_argument("--epsilon", type=float, default=None, help="budget in [0, 1] pixel units (attack default)")
    ens.add_argument("--iterations", type=int, default=None, help="optimization iterations (attack default)")
    ens.add_argument("--lr", type=float, default=None, help="optimization learning rate (attack default)")
    ens.set_defaults(run=_ensemble)
    return parser


def attack_main(argv: list[str]) -> int:
    """``robucap attack`` entry point.

    Returns:
        The exit status (0 on success); bad input raises :class:`RobucapError` for the CLI to print.
    """
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
