"""The demo's Show-and-Fool stage (Chen et al. 2018): targeted caption and 1-3 keyword attacks on the baseline.

Each mode's targets are decided before the attack runs (:func:`mode_targets`): a mode that no image can be given a
target for is recorded as skipped with the reason; an attack that fails raises, and the demo stops naming the stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from datamodules.datamodule import CaptionDataModule
from lightning_app.demo.context import DemoContext
from lightning_app.training import TrainedCaptioner

__all__ = ["SHOW_AND_FOOL_MODES", "ModeTargets", "mode_targets", "stage_show_and_fool"]

SHOW_AND_FOOL_MODES: tuple[str, ...] = ("caption", "keyword_1", "keyword_2", "keyword_3")


@dataclass(frozen=True)
class ModeTargets:
    """How one Show-and-Fool mode of the demo gets its targets, decided before the attack runs.

    Attributes:
        options: Extra ``robucap attack show-and-fool`` options (``--target`` or ``--keywords``); empty for
            paper-style targets.
        skip: Why the mode cannot run (no image can be given a target), else ``None``.
    """

    options: list[str] = field(default_factory=list)
    skip: str | None = None


def mode_targets(
    clean: list[str],
    references: list[list[str]],
    tokenizer: PreTrainedTokenizerBase,
    n_keywords: int,
    source: str,
    seed: int,
) -> ModeTargets:
    """The targets of one mode, checked against the baseline's clean captions of the attacked images.

    Args:
        clean: The baseline's greedy caption of each attacked image.
        references: Each image's reference captions.
        tokenizer: The baseline's tokenizer (a fixed target must be words it knows).
        n_keywords: 0 for the targeted-caption mode, else the number of target keywords.
        source: ``paper`` (another image's clean caption, as the attack chooses them) or ``references`` (one fixed
            target from the reference captions, that some clean caption does not already meet).
        seed: The attack's seed (paper-style targets are drawn with it).

    Returns:
        The options to pass, or why the mode has nothing to attack.
    """
    from datamodules.text import caption_tokens, normalize_caption
    from datamodules.tokenizer import unknown_words
    from modules.attacks.targets import content_words, paper_targets

    what = "a different caption" if n_keywords == 0 else f"{n_keywords} new content words"
    if source == "paper":
        if any(t is not None for t in paper_targets(clean, n_keywords, seed)):
            return ModeTargets()
        return ModeTargets(skip=f"no image gets a paper-style target: no other image's clean caption offers {what}")
    if source != "references":
        raise ValueError(f"unknown Show-and-Fool target source {source!r}")
    for own, refs in zip(clean, references, strict=True):
        for ref in refs:
            if unknown_words(tokenizer, ref):
                continue
            if n_keywords == 0:
                if normalize_caption(ref) != normalize_caption(own):
                    return ModeTargets(["--target", ref])
                continue
            own_words = set(caption_tokens(own))
            fresh = [w for w in content_words(ref) if w not in own_words]
            if len(fresh) >= n_keywords:
                return ModeTargets(["--keywords", ",".join(fresh[:n_keywords])])
    return ModeTargets(skip=f"no reference caption offers {what} that a clean caption lacks")


def _clean_captions(ctx: DemoContext, n_images: int) -> tuple[list[str], list[list[str]]]:
    """The baseline's greedy captions and the references of the first ``n_images`` test images (those attacked)."""
    from modules.evaluation import evaluation_loader
    from modules.targeted_eval import greedy_captions

    module = ctx.state["baseline"].module
    datamodule: CaptionDataModule = ctx.state["datamodule"]
    batches = list(evaluation_loader(module, datamodule.eval_dataset("test"), n_images, n_images))
    images = torch.cat([b["pixel_values"] for b in batches])
    training = module.training
    module.eval()  # as the attack captions them: dropout off
    clean = greedy_captions(module, images, int(module.hparams.max_new_tokens))  # the length the attack uses
    module.train(training)
    return clean, [list(r) for b in batches for r in b["references"]]


def stage_show_and_fool(ctx: DemoContext) -> str | None:
    """Show-and-Fool's (Chen et al. 2018) targeted caption and 1-3 keyword attacks on the demo's baseline."""
    from lightning_app.attack import attack_main

    base: TrainedCaptioner = ctx.state["baseline"]
    s = ctx.show_and_fool
    clean, references = _clean_captions(ctx, s.images)
    blocks: dict[str, Any] = {}
    for n_keywords, mode in enumerate(SHOW_AND_FOOL_MODES):
        targets = mode_targets(clean, references, base.module.tokenizer, n_keywords, s.targets, ctx.seed)
        if targets.skip is not None:
            blocks[mode] = {"success_rate": None, "mean_l2": None, "n": 0, "skipped": targets.skip}
            continue
        out = ctx.out / "show_and_fool" / mode
        attack_main(
            ["show-and-fool", "--ckpt", str(base.checkpoint), "--data-root", str(ctx.data_root), "--images",
             str(s.images), "--modes", mode, "--iterations", str(s.iterations), "--rounds", str(s.rounds),
             "--seed", str(ctx.seed), "--out", str(out), "--no-meteor", *targets.options]
        )  # fmt: skip
        block = json.loads((out / "results.json").read_text(encoding="utf-8"))["show_and_fool"][mode]
        blocks[mode] = {k: v for k, v in block.items() if k not in ("records", "skipped")}
        blocks[mode]["report"] = str(out / "report.html")
        if targets.options:
            blocks[mode]["target"] = targets.options[1]
    ctx.results["show_and_fool"] = {**blocks, "settings": asdict(s)}
    ctx.report.heading("Show-and-Fool (Chen et al. 2018) on the baseline")
    chosen = (
        "each image's target is another image's clean caption (or content words of it), as in the paper"
        if s.targets == "paper"
        else "fixed targets from the reference captions (the barely trained baseline captions every image alike)"
    )
    ctx.report.paragraph(
        f"{s.images} test images, {s.iterations} Adam iterations x {s.rounds} rounds of the c search "
        f"(paper: 1000 x 5); {chosen}. Mean L2 over successes, in [0, 1] pixel units. Examples and failure "
        f"statistics: the reports under {ctx.out / 'show_and_fool'}."
    )
    ctx.report.table(
        ["mode", "success rate", "mean L2", "n", "not run because"],
        [[m, b["success_rate"], b["mean_l2"], b["n"], b.get("skipped", "")] for m, b in blocks.items()],
    )
    skipped = [f"{m}: {b['skipped']}" for m, b in blocks.items() if "skipped" in b]
    return "; ".join(skipped) if len(skipped) == len(blocks) else None
