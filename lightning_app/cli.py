"""The ``robucap`` command (also ``python -m lightning_app``).

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (LightningCLI), ``data``, ``export``, ``demo``, ``study``,
``poison-scan``, ``attack``.
Bad input ends with one line ``robucap: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from datamodules.errors import RobucapError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _cmd_data(argv: list[str]) -> int:
    from datamodules.shapes import ShapesConfig, generate_shapes

    parser = argparse.ArgumentParser(prog="robucap data", description="Write a built-in dataset.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    shapes = sub.add_parser("shapes", help="the procedural shapes captioning dataset (COCO layout)")
    shapes.add_argument("--out", required=True, help="output directory")
    defaults = ShapesConfig()
    for field in ("n_train", "n_val", "n_test", "image_size", "seed", "min_objects", "max_objects"):
        shapes.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    args = parser.parse_args(argv)
    config = ShapesConfig(
        **{
            f: getattr(args, f)
            for f in ("n_train", "n_val", "n_test", "image_size", "seed", "min_objects", "max_objects")
        }
    )
    summary = generate_shapes(args.out, config, progress=True)
    sizes = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    print(f"shapes dataset written to {args.out} ({sizes} images at {config.image_size} px)")
    return 0


def _cmd_export(argv: list[str]) -> int:
    from lightning_app.export import export_checkpoint

    parser = argparse.ArgumentParser(
        prog="robucap export", description="Write a transformers directory (model + tokenizer + image processor)."
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by robucap fit")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.ckpt, args.out)
    print(f"exported to {out}: load with VisionEncoderDecoderModel.from_pretrained or pipeline('image-to-text')")
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
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS or argv[:1] in (["-h"], ["--help"]) or not argv:
            if not argv or argv[0] in ("-h", "--help"):
                _print_help()
                return 0
            from lightning_app.lightning_cli import run_lightning_cli

            run_lightning_cli(None if args is None else argv)
            return 0
        raise RobucapError(
            f"unknown command {argv[0]!r}; expected one of {', '.join(LIGHTNING_SUBCOMMANDS + tuple(COMMANDS))}"
        )
    except RobucapError as err:
        print(f"robucap: error: {err}", file=sys.stderr)
        return 2


def _print_help() -> None:
    print(
        "usage: robucap {fit,validate,test,predict,data,export,demo,study,poison-scan,attack} ...\n\n"
        "  fit|validate|test|predict  LightningCLI over CaptioningModule + CaptionDataModule (--help for options)\n"
        "  data shapes --out DIR      write the procedural shapes dataset\n"
        "  export --ckpt X --out DIR  write a transformers directory (pipeline('image-to-text') loads it)\n"
        "  demo --out DIR             train, test and report the tiny baseline on shapes\n"
        "  study freeze --out DIR     paper 002's five phases: adversarial training, encoder / decoder frozen\n"
        "  study backdoor --out DIR   paper 001's Table 2: benign, BadNets and object-noise backdoored captioners\n"
        "  study transfer --out DIR   papers 000/004: transfer matrix and leave-one-out ensembles over 3 captioners\n"
        "  poison-scan --ckpt X --config Y --out DIR  rank training images by a spectral-signature poisoning score\n"
        "  attack {show-and-fool,fgsm,pgd,ensemble} --ckpt X --data-root D --out DIR  attack a captioner, report it\n"
    )


def console_main() -> None:
    """``sys.exit`` wrapper used by ``python -m lightning_app``."""
    sys.exit(main())
