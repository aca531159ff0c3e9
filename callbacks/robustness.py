"""Caption quality under attack, every validation epoch: BLEU-1..4 of captions of adversarial validation images."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from datamodules.errors import RobucapError
from modules.attacks import Attack, build_attack, check_epsilon
from modules.captioners.base import Captioner
from modules.metrics import CaptionBLEU
from modules.metrics.bleu import BLEU_KEYS, image_key
from modules.victims.captioner import CaptionObjective

__all__ = ["RobustnessEvaluation", "metric_suffix"]

# Seeds the per-image random starts of fgsm_rs / PGD (see RobustnessEvaluation), mixed with each image's key.
_SEED = 0x5EED


def metric_suffix(attack: str, epsilon: float) -> str:
    """``fgsm_0.05``: the suffix of the per-(attack, epsilon) metric names."""
    return f"{attack}_{epsilon:g}"


class RobustnessEvaluation(L.Callback):
    """BLEU-1..4 of captions generated from adversarial versions of the validation images, every validation epoch.

    White-box and untargeted: each attack raises the loss of the image's first reference caption (``batch["labels"]``)
    under the current weights. The work happens in ``on_validation_batch_end`` on the batches validation already
    loads. Attacks re-enable autograd locally, so this works under ``inference_mode`` (single process) and ``no_grad``
    (what Lightning uses with gloo DDP) alike.

    Numbers are exact under DDP and identical for any number of processes: one :class:`~modules.metrics.CaptionBLEU`
    per (attack, epsilon) keeps per-image statistics and de-duplicates the images ``DistributedSampler`` repeats; with
    ``max_images`` the subset is the first N images in dataset order, whatever rank sees them; attacks with a random
    start (``fgsm_rs``, PGD's default) run image by image, seeded by the image id, so the noise does not depend on
    how the images are batched (this makes them slower than batched attacks).

    Logged at the end of every validation epoch (not during the sanity check):

    * ``val/adv_bleu1`` .. ``val/adv_bleu4``: the first (attack, epsilon) pair;
    * ``val/adv_bleu1@fgsm_0.05`` .. ``val/adv_bleu4@fgsm_0.05``: every pair (attack name, then ``epsilon`` as ``%g``).

    Args:
        attacks: Attack names from :mod:`modules.attacks` (``fgsm``, ``fgsm_rs``, ``pgd``, ``fg``).
        epsilons: Budgets in [0, 1] pixel units; every attack runs at every budget.
        attack_kwargs: Options per attack name, e.g. ``{"pgd": {"steps": 5}}``.
        max_images: Evaluate only the first N validation images (dataset order); ``None``: all of them. Needs an
            unshuffled validation loader (Lightning's default).

    Raises:
        RobucapError: No attack or budget, an unknown attack or option, a budget outside [0, 1], ``max_images`` < 1,
            or ``max_images`` with a shuffled validation loader.

    Example:
        ``robucap validate ... --trainer.callbacks+=callbacks.RobustnessEvaluation
        --trainer.callbacks.attacks='[fgsm, pgd]' --trainer.callbacks.epsilons='[0.01, 0.05]'``
    """

    def __init__(
        self,
        attacks: list[str] | None = None,
        epsilons: list[float] | None = None,
        attack_kwargs: dict[str, dict[str, Any]] | None = None,
        max_images: int | None = None,
    ) -> None:
        super().__init__()
        attacks = ["fgsm"] if attacks is None else list(attacks)
        epsilons = [0.05] if epsilons is None else list(epsilons)
        if not attacks or not epsilons:
            raise RobucapError("RobustnessEvaluation needs at least one attack and one epsilon")
        if max_images is not None and (isinstance(max_images, bool) or max_images < 1):
            raise RobucapError(f"RobustnessEvaluation max_images must be >= 1 or null, got {max_images!r}")
        kwargs = dict(attack_kwargs or {})
        unknown = set(kwargs) - set(attacks)
        if unknown:
            raise RobucapError(
                f"RobustnessEvaluation attack_kwargs names attacks that are not in attacks={attacks}: {sorted(unknown)}"
            )
        self.max_images = max_images
        self.attacks: dict[str, Attack] = {}
        self.metrics: dict[str, CaptionBLEU] = {}
        for name in attacks:
            for epsilon in epsilons:
                epsilon = check_epsilon(epsilon, "RobustnessEvaluation epsilon")
                suffix = metric_suffix(name, epsilon)
                self.attacks[suffix] = build_attack(name, epsilon, **kwargs.get(name, {}))
                self.metrics[suffix] = CaptionBLEU()
        self._seen: dict[int, int] = {}
        self.last_scores: dict[str, float] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen = {}
        for metric in self.metrics.values():
            metric.reset()
            # Not a submodule of pl_module, so Lightning does not move it; NCCL gathers need it on the device.
            metric.to(pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        images = batch["pixel_values"]
        rows = list(range(images.shape[0]))
        if self.max_images is not None:
            start = self._seen.get(dataloader_idx, 0)
            self._seen[dataloader_idx] = start + len(rows)
            indices = _dataset_indices(trainer, dataloader_idx, start, len(rows))
            rows = [row for row, index in zip(rows, indices, strict=True) if index < self.max_images]
            if not rows:
                return
        ids = _ids(batch["image_id"])
        ids = [ids[row] for row in rows]
        references = [batch["references"][row] for row in rows]
        select = torch.tensor(rows, device=images.device)
        images, labels = images.index_select(0, select), batch["labels"].index_select(0, select)
        for suffix, attack in self.attacks.items():
            adversarial = _run_attack(attack, pl_module.captioner, images, labels, ids)
            self.metrics[suffix].update(pl_module.caption(adversarial), references, ids)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        scores: dict[str, torch.Tensor] = {}
        for index, (suffix, metric) in enumerate(self.metrics.items()):
            if metric.update_count == 0:
                # A rank that evaluated no image (max_images) still joins the gather, without torchmetrics' warning.
                metric.update([], [], [])
            # Every rank calls compute (a collective); CaptionBLEU then holds the same exact numbers everywhere.
            values = metric.compute()
            metric.reset()
            for key in BLEU_KEYS:
                scores[f"val/adv_{key}@{suffix}"] = values[key].float()
                if index == 0:
                    scores[f"val/adv_{key}"] = values[key].float()
        self.last_scores = {key: float(value) for key, value in scores.items()}
        for key, value in scores.items():
            # The values are already identical on every rank; max keeps them bit for bit for any world size.
            pl_module.log(key, value, prog_bar=key == "val/adv_bleu4", sync_dist=True, reduce_fx="max")


def _ids(image_ids: Any) -> list[Any]:
    return image_ids.reshape(-1).tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)


def _run_attack(
    attack: Attack, captioner: Captioner, images: torch.Tensor, labels: torch.Tensor, ids: list[Any]
) -> torch.Tensor:
    """Adversarial images; random starts are drawn per image from a generator seeded by the image id.

    Shape:
        ``images``: ``(B, 3, H, W)``; ``labels``: ``(B, T)``; returns ``(B, 3, H, W)``.
    """
    if not getattr(attack, "random_start", False):
        return attack(CaptionObjective(captioner, labels), images).adversarial
    # manual_seed reseeds every CUDA device, so fork_rng must restore all of them.
    devices = list(range(torch.cuda.device_count())) if images.device.type == "cuda" else []
    rows = []
    for row, image_id in enumerate(ids):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((_SEED ^ image_key(image_id)) & 0x7FFFFFFFFFFFFFFF)
            rows.append(attack(CaptionObjective(captioner, labels[row : row + 1]), images[row : row + 1]).adversarial)
    return torch.cat(rows)


def _dataset_indices(trainer: L.Trainer, dataloader_idx: int, start: int, count: int) -> list[int]:
    """Dataset indices of the ``count`` samples after the first ``start`` of this rank's validation loader."""
    loaders = trainer.val_dataloaders
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    loader = loaders[dataloader_idx] if isinstance(loaders, list | tuple) else loaders
    sampler = getattr(loader, "sampler", None)
    positions = range(start, start + count)
    if isinstance(sampler, DistributedSampler) and not sampler.shuffle:
        # DistributedSampler (unshuffled) gives rank r the positions r, r + W, ... of range(N) padded by wrapping.
        size = len(sampler.dataset)
        return [(i * sampler.num_replicas + sampler.rank) % size for i in positions]
    if isinstance(sampler, SequentialSampler):
        return list(positions)
    raise RobucapError(
        "RobustnessEvaluation(max_images=...) needs an unshuffled validation loader (SequentialSampler or "
        f"DistributedSampler(shuffle=False)), got {type(sampler).__name__}"
    )
