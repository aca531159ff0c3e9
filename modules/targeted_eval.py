"""Run Show-and-Fool's targeted experiments on a set of images: targets, Show-and-Fool, per-image records, summary.

An experiment (a *mode*) is ``caption`` (targeted caption, section 4.2) or ``keyword_M`` (``M`` targeted keywords,
section 4.3). As in the paper, every image's target comes from the clean caption of another, randomly chosen image
of the same set (:func:`~modules.attacks.targets.paper_targets`), unless one fixed target is given for all images.
Clean captions and success checks use the same greedy decoding (the attack's ``max_new_tokens``).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from datamodules.errors import RobucapError
from modules.attacks.protocol import Objective
from modules.attacks.show_and_fool import ShowAndFool
from modules.attacks.targets import keyword_ids, paper_targets, target_caption_ids
from modules.captioning import CaptioningModule
from modules.captions import caption_images
from modules.metrics.targeted import summarize_targeted
from modules.records import CaptionedImage, Target, records_to_json
from modules.transfer import hits_target
from modules.victims.captioner import CaptionObjective, KeywordObjective

__all__ = [
    "MODE_NAMES",
    "ShowAndFoolRun",
    "TargetedLoss",
    "greedy_captions",
    "mode_keywords",
    "mode_name",
    "run_show_and_fool",
]

MODE_NAMES: tuple[str, ...] = ("caption", "keyword_1", "keyword_2", "keyword_3")
"""Show-and-Fool's four experiments (Table 1 rows); ``keyword_M`` works for any ``M >= 1``."""

_KEYWORD_MODE = re.compile(r"keyword_([1-9][0-9]*)")


def mode_name(n_keywords: int) -> str:
    """``caption`` for 0 keywords, else ``keyword_<n>``."""
    return "caption" if n_keywords == 0 else f"keyword_{n_keywords}"


def mode_keywords(mode: str) -> int:
    """The number of keywords of a mode name (0 for ``caption``).

    Raises:
        RobucapError: Not ``caption`` nor ``keyword_<M>`` with ``M >= 1``.
    """
    if mode == "caption":
        return 0
    match = _KEYWORD_MODE.fullmatch(mode)
    if match is None:
        raise RobucapError(f"unknown Show-and-Fool mode {mode!r}; expected one of {list(MODE_NAMES)} (or keyword_M)")
    return int(match.group(1))


def greedy_captions(
    module: CaptioningModule, images: torch.Tensor, max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy captions of at most ``max_new_tokens`` tokens, whatever decoding the module is configured for.

    Greedy rather than the module's configured beam search: Show-and-Fool judges success on greedy captions, so the
    targets (other images' clean captions) must be captions greedy decoding produces.

    Shape:
        ``images``: ``(N, 3, H, W)`` in [0, 1].
    """
    return caption_images(module, images, batch_size, num_beams=1, max_new_tokens=max_new_tokens)


@dataclass
class ShowAndFoolRun:
    """One Show-and-Fool experiment on a set of images.

    Attributes:
        summary: Tables 1-3 (:func:`~modules.metrics.targeted.summarize_targeted`).
        records: One per attacked image: ``index`` in the images, ``clean``, ``target``, ``target_caption``
            (keyword mode: the caption the keywords came from; ``None`` for fixed keywords), ``prediction``,
            ``success``, ``l2``, ``c``, ``iterations``.
        adversarial: The attacked images' adversarial versions on the CPU, in record order. Shape: ``(n, 3, H, W)``.
        skipped: Ids of the images not attacked.
    """

    summary: dict[str, Any]
    records: list[CaptionedImage]
    adversarial: torch.Tensor
    skipped: list[Hashable]


def _encode(module: CaptioningModule, target: str | Sequence[str]) -> list[int]:
    if isinstance(target, str):
        return target_caption_ids(module.tokenizer, target)
    return keyword_ids(module.tokenizer, target)


@dataclass(frozen=True)
class TargetedLoss:
    """How a targeted caption is scored (keyword targets always use eq. 9's logits loss).

    Attributes:
        loss: ``logits`` (eq. 7) or ``log_prob`` (eq. 5).
        margin: Confidence margin kappa (paper: 1).
        max_new_tokens: Longest caption generated (clean captions, success checks); ``None``: the module's.
    """

    loss: str = "logits"
    margin: float = 1.0
    max_new_tokens: int | None = None


def _objective(
    module: CaptioningModule, targets: list[list[int]], keywords: bool, scoring: TargetedLoss, length: int
) -> Objective:
    if keywords:
        return KeywordObjective(module.captioner, targets, margin=scoring.margin, max_new_tokens=length)
    return CaptionObjective.targeting(
        module.captioner, targets, loss=scoring.loss, margin=scoring.margin, max_new_tokens=length
    )


def run_show_and_fool(
    module: CaptioningModule,
    images: torch.Tensor,
    image_ids: Sequence[Hashable],
    references: Sequence[Sequence[str]],
    attack: ShowAndFool,
    n_keywords: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    target: str | Sequence[str] | None = None,
    meteor: bool = True,
    progress: bool = False,
    scoring: TargetedLoss | None = None,
) -> ShowAndFoolRun:
    """One of Show-and-Fool's experiments: targets, Show-and-Fool on every image, records and Tables 1-3.

    Images whose clean caption already meets a fixed ``target`` are not attacked (a success there would not be
    the attack's doing), nor are images that no other image offers a paper-style target to; their ids are listed
    under ``skipped``.

    Args:
        module: The white-box captioner (switched to eval mode).
        images: Clean images in [0, 1]. Shape: ``(N, 3, H, W)``.
        image_ids: One id per image.
        references: The dataset's reference captions of every image (kept in the records).
        attack: The Show-and-Fool search (iterations, rounds of the ``c`` search, learning rate).
        n_keywords: 0 for targeted captions, ``M >= 1`` for ``M`` targeted keywords.
        seed: Seed of the target choice.
        batch_size: Images attacked together.
        target: One fixed target for every image instead of paper-style random targets: a caption (caption mode)
            or a list of ``n_keywords`` keywords (keyword mode).
        meteor: Compute METEOR for the failures' statistics.
        progress: Show a progress bar over batches.
        scoring: The targeted-caption loss, margin and caption length (default: :class:`TargetedLoss`).

    Returns:
        The summary, the attacked images' records and adversarial versions, and the ids not attacked.

    Raises:
        RobucapError: Mismatched lengths, an ``n_keywords`` / ``target`` mismatch, a target the vocabulary
            cannot express, no possible paper-style target, or every image already meeting the fixed target.
    """
    n = images.shape[0] if images.dim() == 4 else -1
    if n < 1 or len(image_ids) != n or len(references) != n:
        raise RobucapError(
            f"run_show_and_fool expects images (N, 3, H, W) with N >= 1 and one id and reference list per image, got "
            f"{tuple(images.shape)}, {len(image_ids)} ids and {len(references)} reference lists"
        )
    if isinstance(n_keywords, bool) or not isinstance(n_keywords, int) or n_keywords < 0:
        raise RobucapError(f"n_keywords must be an integer >= 0, got {n_keywords!r}")
    if batch_size < 1:
        raise RobucapError(f"batch_size must be >= 1, got {batch_size}")
    if target is not None:
        if n_keywords and (isinstance(target, str) or len(target) != n_keywords):
            raise RobucapError(
                f"the fixed target of keyword_{n_keywords} must be {n_keywords} keywords, got {target!r}"
            )
        if not n_keywords and not isinstance(target, str):
            raise RobucapError(f"the fixed target of caption mode must be a caption string, got {target!r}")
        target = target if isinstance(target, str) else [str(k) for k in target]
        _encode(module, target)  # bad targets fail before any image is captioned

    module.eval()
    scoring = scoring or TargetedLoss()
    length = scoring.max_new_tokens or int(module.hparams.max_new_tokens)
    clean = greedy_captions(module, images, length, batch_size)
    if target is not None:
        targets: list[Target | None] = [target] * n
        sources: list[str | None] = [None] * n
        attacked = [i for i in range(n) if not hits_target(clean[i], target)]
    else:
        # Images no other image offers a target to (e.g. every caption alike) are skipped, not fatal.
        chosen = paper_targets(clean, n_keywords, seed)
        targets = [None if t is None else t.value for t in chosen]
        sources = [None if t is None else t.caption for t in chosen]
        attacked = [i for i in range(n) if chosen[i] is not None]
    skipped = [image_ids[i] for i in sorted(set(range(n)) - set(attacked))]
    if not attacked:
        what = f"already meets the target {target!r}" if target is not None else "offers no paper-style target"
        raise RobucapError(f"every image's clean caption {what}: there is nothing to attack")

    device = next(module.parameters()).device
    records: list[CaptionedImage] = []
    adversarial: list[torch.Tensor] = []
    starts = range(0, len(attacked), batch_size)
    for start in tqdm(
        starts, desc=f"show-and-fool {mode_name(n_keywords)}", leave=False, disable=None if progress else True
    ):
        rows = attacked[start : start + batch_size]
        objective = _objective(module, [_encode(module, targets[i]) for i in rows], n_keywords > 0, scoring, length)
        result = attack(objective, images[rows].to(device))
        predictions = greedy_captions(module, result.adversarial, length, batch_size)
        adversarial.append(result.adversarial.cpu())
        records += [
            CaptionedImage(
                image_id=image_ids[i],
                prediction=predictions[k],
                references=list(references[i]),
                clean=clean[i],
                target=targets[i],
                target_caption=sources[i] if n_keywords else None,
                success=result.success is not None and bool(result.success[k]),
                l2=float(result.l2[k]),
                c=float(result.c[k]),
                iterations=int(result.iterations[k]),
                index=i,
            )
            for k, i in enumerate(rows)
        ]
    return ShowAndFoolRun(
        summary=summarize_targeted(records_to_json(records), meteor=meteor),
        records=records,
        adversarial=torch.cat(adversarial),
        skipped=skipped,
    )
