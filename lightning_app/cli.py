"""The ``robucap`` command (also ``python -m lightning_app``).

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (LightningCLI), ``data``, ``export``, ``demo``, ``study``,
``poison-scan``, ``attack``.
Bad input ends with one line ``robucap: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

from datamodules.errors import RobucapError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Words that can name a (sub)command, and so a help-cache file.
_COMMAND_WORD = re.compile(r"[a-z][a-z0-9_-]{0,40}")


def _cmd_data(argv: list[str]) -> int:
    from datamodules.shapes import ShapesConfig, ShapesFlags, generate_shapes, shapes_ready

    parser = argparse.ArgumentParser(prog="robucap data", description="Write a built-in dataset.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    shapes = sub.add_parser("shapes", help="the procedural shapes captioning dataset (COCO layout)")
    shapes.add_argument("--out", required=True, help="output directory (absent or empty; never rewritten)")
    defaults = ShapesConfig()
    names = ("n_train", "n_val", "n_test", "image_size", "seed", "min_objects", "max_objects", "captions_per_image")
    for field in names:
        shapes.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    args = parser.parse_args(argv)
    config = ShapesConfig(**{f: getattr(args, f) for f in names})
    already = shapes_ready(args.out, config)
    flags = ShapesFlags("--out", {f: f"--{f.replace('_', '-')}" for f in names})
    summary = generate_shapes(args.out, config, progress=not already, flags=flags)
    sizes = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    if already:
        print(f"shapes dataset already in {args.out} ({sizes} images at {config.image_size} px): nothing written")
    else:
        print(f"shapes dataset written to {args.out} ({sizes} images at {config.image_size} px)")
    return 0


def _cmd_export(argv: list[str]) -> int:
    from lightning_app.export import export_checkpoint

    parser = argparse.ArgumentParser(
        prog="robucap export", description="Write a transformers directory (model + tokenizer + image processor)."
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by robucap fit")
    parser.add_argument(
        "--out", required=True, help="output directory: new, empty, or a previous export (only its files are replaced)"
    )
    args = parser.parse_args(argv)
    out = export_checkpoint(args.ckpt, args.out)
    print(
        f"exported to {out}: load with pipeline('image-to-text', model='{out}', trust_remote_code=True) "
        "(exact preprocessing and training loss) or VisionEncoderDecoderModel.from_pretrained"
    )
    return 0


def _cmd_demo(argv: list[str]) -> int:
    from lightning_app.demo import demo_main

    return demo_main(argv)


def _cmd_study(argv: list[str]) -> int:
    from lightning_app.studies import study_main

    return study_main(argv)


def _cmd_poison_scan(argv: list[str]) -> int:
    from lightning_app.poison_scan import poison_scan_main

    return poison_scan_main(argv)


def _cmd_attack(argv: list[str]) -> int:
    from lightning_app.attack import attack_main

    return attack_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "data": _cmd_data,
    "export": _cmd_export,
    "demo": _cmd_demo,
    "study": _cmd_study,
    "poison-scan": _cmd_poison_scan,
    "attack": _cmd_attack,
}


def main(args: list[str] | None = None) -> int:
    """Entry point of the ``robucap`` console script.

    Args:
        args: Command-line arguments without the program name (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit status (0 on success).
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            _print_help()
            return 0
        name = _help_request(argv)
        if name is not None:
            # Served from a cache keyed by the code and library versions: building the parsers imports torch,
            # Lightning and transformers (15-20 s), the text does not change between calls.
            from lightning_app.help_cache import cached_help

            print(cached_help(name, lambda: _dispatch(argv, from_sys_argv=args is None)), end="")
            return 0
        if argv[0] in COMMANDS or argv[0] in LIGHTNING_SUBCOMMANDS:
            return _dispatch(argv, from_sys_argv=args is None)
        raise RobucapError(
            f"unknown command {argv[0]!r}; expected one of {', '.join(LIGHTNING_SUBCOMMANDS + tuple(COMMANDS))}"
        )
    except RobucapError as err:
        print(f"robucap: error: {err}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str], from_sys_argv: bool) -> int:
    """Run one command; LightningCLI reads ``sys.argv`` itself when the program was started from the shell."""
    if argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    _run_lightning(None if from_sys_argv else argv)
    return 0


def _help_request(argv: list[str]) -> str | None:
    """The cache name of a plain help request such as ``fit --help`` or ``attack fgsm -h``, else ``None``.

    Only command words followed by the help flag qualify: with other options (``--config``) the text can differ.
    """
    *words, flag = argv
    if flag not in ("-h", "--help") or not words or words[0] not in (*COMMANDS, *LIGHTNING_SUBCOMMANDS):
        return None
    if not all(_COMMAND_WORD.fullmatch(word) for word in words):
        return None
    return "-".join(words)


def _run_lightning(argv: list[str] | None) -> None:
    from lightning_app.lightning_cli import run_lightning_cli

    run_lightning_cli(argv)


def _print_help() -> None:
    print(
        "usage: robucap {fit,validate,test,predict,data,export,demo,study,poison-scan,attack} ...\n\n"
        "  fit|validate|test|predict  LightningCLI over CaptioningModule + CaptionDataModule (--help for options);\n"
        "                             predict writes predictions.jsonl for a split or --data.predict_images DIR;\n"
        "                             a config whose model.class_path is a detector or a segmenter (configs/\n"
        "                             experiment/shapes_detector.yaml, shapes_segmenter.yaml) trains that instead,\n"
        "                             and so does a part-pretraining one (shapes_pretrain_{encoder,decoder}.yaml)\n"
        "  data shapes --out DIR      write the procedural shapes dataset\n"
        "  export --ckpt X --out DIR  write a transformers directory (pipeline('image-to-text', model=DIR,\n"
        "                             trust_remote_code=True) loads it)\n"
        "  demo --out DIR [--profile quick|full|smoke] [--STAGE.FIELD V]  train, test and report the tiny\n"
        "                             baseline on shapes, then the studies (--print_config / --config FILE, as fit)\n"
        "  study NAME --out DIR [--profile full|quick|smoke] [--data.FIELD V] [--study.FIELD V]  --profile P is\n"
        "                             --config configs/study/NAME_P.yaml (--print_config prints the settings)\n"
        "  study freeze --out DIR     Rashid & Rivas 2024's five phases: adversarial training, encoder / decoder\n"
        "                             frozen (--study.start baseline|pretrained)\n"
        "  study backdoor --out DIR   Li et al. 2022's Table 2: benign, BadNets and object-noise backdoored\n"
        "                             captioners\n"
        "  study transfer --out DIR   Show-and-Fool (Chen et al. 2018), Liu et al. 2017: transfer matrix and\n"
        "                             leave-one-out ensembles over 3 captioners\n"
        "  study dense --out DIR      Xie et al. 2017's DAG: Table 1 on a detector and a segmenter, transfer,\n"
        "                             summed perturbation, into captioning, DAG on a captioner\n"
        "  poison-scan --ckpt X --config Y --out DIR  rank training images by a spectral-signature poisoning score\n"
        "  attack NAME --ckpt X --data_root D --out DIR  attack a captioner and report it; robucap attack --help\n"
        "                             lists the attacks (--print_config / --config configs/attack/NAME.yaml)\n"
    )


def console_main() -> None:
    """``sys.exit`` wrapper used by ``python -m lightning_app``."""
    sys.exit(main())
