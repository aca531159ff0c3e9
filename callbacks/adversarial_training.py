"""Adversarial training of a captioner (Rashid & Rivas 2024, phases 2-5): attack every training batch before the step.

Three modes:

* ``adversarial``: the batch's clean images are replaced by adversarial ones, crafted against the current weights
  (training on adversarial examples only, Rashid & Rivas 2024 phase 2, done on the fly).
* ``mixed``: clean and adversarial images in the same step (Rashid & Rivas 2024 phase 3, "adversarial
  training"). The batch is
  doubled: adversarial images are appended after the clean ones and every other per-sample field (``input_ids``,
  ``attention_mask``, ``labels``, ``image_id``, ...) is repeated, so the module's token-mean loss is the mean of the
  clean and the adversarial loss.
* ``static``: adversarial images are computed once, before training, against a fixed checkpoint and cached on disk
  (outside the dataset) — the literal reading of phase 2, "adversarial examples for the training set". Training
  then substitutes the cached adversarial image for every clean one.

Combine with :class:`~callbacks.freeze.FreezeEncoder` / :class:`~callbacks.freeze.FreezeDecoder` for phases 4 and 5.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from datamodules.datasets import CaptionPairs
from datamodules.errors import RobucapError
from modules.attacks import BudgetAttack, build_attack, check_epsilon
from modules.metrics.bleu import image_key
from modules.victims.captioner import CaptionObjective

__all__ = ["MODES", "AdversarialTraining"]

MODES: tuple[str, ...] = ("adversarial", "mixed", "static")
CACHE_DTYPE = torch.float16
MANIFEST = "manifest.json"


class AdversarialTraining(L.Callback):
    """Replace or extend every training batch with adversarial examples (Rashid & Rivas 2024).

    Online modes (``adversarial``, ``mixed``) attack ``pl_module.captioner`` itself, never the DDP wrapper: the attack
    differentiates with respect to the images only, so no gradient reaches the parameters and DDP never syncs during
    the attack. Each rank attacks its own batch.

    Logs ``train/adv_epsilon`` (the budget of the step, after warm-up) every step.

    Args:
        mode: ``adversarial``, ``mixed`` or ``static`` (see the module docstring).
        attack: Attack name from :mod:`modules.attacks`: ``fgsm`` (Rashid & Rivas 2024), ``fgsm_rs`` (FGSM with random
            start:
            "fast" adversarial training, Wong et al. 2020), ``pgd`` or ``fg``.
        epsilon: Budget in [0, 1] pixel units (Rashid & Rivas's (2024) 0.1 on ViT's [-1, 1] input = 0.05 here).
        attack_kwargs: Options of the attack, e.g. ``{"steps": 3}`` for PGD.
        epsilon_warmup_steps: Ramp the budget linearly from 0 to ``epsilon`` over the first N optimizer steps
            (``epsilon * min(1, global_step / N)``); 0 disables it. Online modes only.
        checkpoint: ``static`` mode: the robucap checkpoint whose captioner the cached examples are crafted against.
        cache_dir: ``static`` mode: where the cached examples go (one float16 ``.pt`` file per training image, named
            by its image id, and ``manifest.json``). Default ``<trainer.default_root_dir>/adversarial_cache/<hash>``,
            the hash covering dataset, checkpoint, attack and budget, so other settings never reuse the files; an
            explicit ``cache_dir`` holding other settings is refused. Must lie outside the dataset directory. Each
            image is attacked once, against its first caption; ranks share the work. The directory actually used is
            :attr:`cache_path`.

    Raises:
        RobucapError: Unknown mode or attack, invalid attack options, ``epsilon`` outside [0, 1], ``static`` without a
            checkpoint, or a warm-up in ``static`` mode. At train start (static): a missing checkpoint, one with
            another tokenizer, or a cache directory inside the dataset or holding other settings.

    Example:
        ``robucap fit ... --trainer.callbacks+=callbacks.AdversarialTraining --trainer.callbacks.mode=mixed``
    """

    def __init__(
        self,
        mode: str = "mixed",
        attack: str = "fgsm",
        epsilon: float = 0.05,
        attack_kwargs: dict[str, Any] | None = None,
        epsilon_warmup_steps: int = 0,
        checkpoint: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise RobucapError(f"AdversarialTraining mode must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.epsilon = check_epsilon(epsilon, "AdversarialTraining epsilon")
        self.attack_name = attack
        self.attack_kwargs = dict(attack_kwargs or {})
        # Build once now so a bad name or option fails when the callback is created, not at the first step.
        self._attack = build_attack(attack, self.epsilon, **self.attack_kwargs)
        if isinstance(epsilon_warmup_steps, bool) or not isinstance(epsilon_warmup_steps, int):
            raise RobucapError(f"epsilon_warmup_steps must be an integer >= 0, got {epsilon_warmup_steps!r}")
        if epsilon_warmup_steps < 0:
            raise RobucapError(f"epsilon_warmup_steps must be >= 0, got {epsilon_warmup_steps}")
        self.epsilon_warmup_steps = epsilon_warmup_steps
        if mode == "static":
            if not checkpoint:
                raise RobucapError(
                    "static mode needs a checkpoint to craft the adversarial examples against: "
                    "AdversarialTraining(mode='static', checkpoint='path/to/model.ckpt')"
                )
            if epsilon_warmup_steps:
                raise RobucapError("epsilon_warmup_steps does not apply to static mode (examples are computed once)")
        self.checkpoint = checkpoint
        self.cache_dir: Path | None = Path(cache_dir) if cache_dir else None
        # Where the static cache of the current fit lives (``cache_dir`` or the default under default_root_dir).
        self.cache_path: Path | None = None

    # -- budget ---------------------------------------------------------------------------------------------------
    def current_epsilon(self, global_step: int) -> float:
        """The budget at optimizer step ``global_step`` (after the linear warm-up)."""
        if self.epsilon_warmup_steps <= 0:
            return self.epsilon
        return self.epsilon * min(1.0, global_step / self.epsilon_warmup_steps)

    def _attack_at(self, epsilon: float) -> BudgetAttack:
        if epsilon != self._attack.epsilon:
            # Rebuilt rather than mutated: step sizes derived from epsilon (PGD, FGSM-RS) must follow it.
            self._attack = build_attack(self.attack_name, epsilon, **self.attack_kwargs)
        return self._attack

    # -- hooks ----------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.mode == "static":
            self._build_cache(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Any], batch_idx: int
    ) -> None:
        images = batch["pixel_values"]
        if self.mode == "static":
            epsilon = self.epsilon
            adversarial = self._load_cached(batch["image_id"]).to(device=images.device, dtype=images.dtype)
            if adversarial.shape != images.shape:
                raise RobucapError(
                    f"cached adversarial images in {self.cache_path} have shape {tuple(adversarial.shape[1:])}, the "
                    f"training images {tuple(images.shape[1:])}: delete the cache or use another cache_dir"
                )
        else:
            epsilon = self.current_epsilon(trainer.global_step)
            adversarial = self._attack_at(epsilon)(
                CaptionObjective(pl_module.captioner, batch["labels"]), images
            ).adversarial
        pl_module.log("train/adv_epsilon", epsilon, on_step=True, on_epoch=False, batch_size=1)
        if self.mode == "mixed":
            double_batch(batch, adversarial)
        else:
            batch["pixel_values"] = adversarial

    # -- static mode ----------------------------------------------------------------------------------------------
    def _fingerprint(self, trainer: L.Trainer) -> dict[str, Any]:
        path = Path(str(self.checkpoint)).resolve()
        if not path.is_file():
            raise RobucapError(f"AdversarialTraining checkpoint {path} does not exist")
        stat = path.stat()
        data_root = getattr(getattr(trainer, "datamodule", None), "root", None)
        return {
            "dataset": None if data_root is None else str(Path(data_root).resolve()),
            "checkpoint": str(path),
            "checkpoint_bytes": stat.st_size,
            "checkpoint_mtime_ns": stat.st_mtime_ns,
            "attack": self.attack_name,
            "epsilon": self.epsilon,
            "attack_kwargs": self.attack_kwargs,
            "key": "image_id (first caption of each image)",
            "dtype": str(CACHE_DTYPE),
        }

    def _resolve_cache_dir(self, trainer: L.Trainer, fingerprint: dict[str, Any]) -> Path:
        if self.cache_dir is None:
            digest = hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
            cache_dir = (Path(trainer.default_root_dir) / "adversarial_cache" / digest).resolve()
        else:
            cache_dir = self.cache_dir.resolve()
        data_root = fingerprint["dataset"]
        if data_root is not None and cache_dir.is_relative_to(data_root):
            raise RobucapError(
                f"AdversarialTraining cache_dir {cache_dir} lies inside the dataset directory {data_root}; "
                "nothing may be written there: choose a cache_dir outside it"
            )
        manifest = cache_dir / MANIFEST
        if manifest.is_file():
            stored = json.loads(manifest.read_text(encoding="utf-8"))
            if stored != json.loads(json.dumps(fingerprint)):
                raise RobucapError(
                    f"AdversarialTraining cache_dir {cache_dir} holds adversarial images made with other settings "
                    f"({manifest}); delete it or choose another cache_dir"
                )
        return cache_dir

    def _build_cache(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Attack every training image once against the fixed checkpoint; ranks share the work, then wait."""
        from modules.captioning import CaptioningModule

        fingerprint = self._fingerprint(trainer)
        cache_dir = self.cache_path = self._resolve_cache_dir(trainer, fingerprint)
        cache_dir.mkdir(parents=True, exist_ok=True)
        fixed = CaptioningModule.load_from_checkpoint(fingerprint["checkpoint"], map_location="cpu", weights_only=True)
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is not None and fixed.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise RobucapError(
                f"AdversarialTraining checkpoint {self.checkpoint} uses another tokenizer than the model being "
                "trained; its attack would target the wrong caption tokens"
            )
        captioner = fixed.captioner.to(pl_module.device).eval()
        attack = build_attack(self.attack_name, self.epsilon, **self.attack_kwargs)
        loader = _sequential_loader(trainer.train_dataloader)
        rank, world = trainer.global_rank, trainer.world_size
        progress = tqdm(
            desc="adversarial cache",
            unit="img",
            disable=trainer.progress_bar_callback is None or not trainer.is_global_zero,
            leave=False,
        )
        with torch.inference_mode(False):
            for keys, images, labels in _first_captions(loader, rank, world, cache_dir):
                objective = CaptionObjective(captioner, labels.to(pl_module.device))
                adversarial = attack(objective, images.to(pl_module.device)).adversarial
                for key, image in zip(keys, adversarial.to("cpu", CACHE_DTYPE), strict=True):
                    _atomic_save(image.clone(), _cache_file(cache_dir, key))
                progress.update(len(keys))
        progress.close()
        del fixed, captioner
        trainer.strategy.barrier("adversarial_cache")
        if trainer.is_global_zero:
            (cache_dir / MANIFEST).write_text(json.dumps(fingerprint, indent=2, sort_keys=True), encoding="utf-8")

    def _load_cached(self, image_ids: Any) -> torch.Tensor:
        """Stack the cached adversarial images of a batch. Shape: ``(B, 3, H, W)``."""
        assert self.cache_path is not None, "the static cache is built in on_train_start"
        ids = image_ids.reshape(-1).tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)
        images = []
        for image_id in ids:
            path = _cache_file(self.cache_path, image_key(image_id))
            if not path.is_file():
                raise RobucapError(
                    f"no cached adversarial image for image_id {image_id!r} in {self.cache_path}: the training set "
                    "changed since the cache was built; delete the cache directory"
                )
            images.append(torch.load(path, map_location="cpu", weights_only=True))
        return torch.stack(images)


def double_batch(batch: dict[str, Any], adversarial: torch.Tensor) -> None:
    """Append adversarial images to a batch in place and repeat every other per-sample field once.

    Tensors whose first dimension is the batch size are concatenated with themselves, lists and tuples of that
    length are repeated; anything else (e.g. scalars) is left alone.

    Shape:
        ``batch["pixel_values"]``: ``(B, 3, H, W)`` → ``(2B, 3, H, W)``; ``adversarial``: ``(B, 3, H, W)``.
    """
    clean = batch["pixel_values"]
    size = clean.shape[0]
    for key, value in list(batch.items()):
        if key == "pixel_values":
            batch[key] = torch.cat([clean, adversarial.to(clean.dtype)])
        elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == size:
            batch[key] = torch.cat([value, value])
        elif isinstance(value, list | tuple) and len(value) == size:
            batch[key] = type(value)(list(value) + list(value))


def _cache_file(cache_dir: Path, key: int) -> Path:
    # Process-independent key (BLAKE2b for string ids), as unsigned hex so negative ids give valid names.
    return cache_dir / f"{key & 0xFFFFFFFFFFFFFFFF:016x}.pt"


def _atomic_save(tensor: torch.Tensor, path: Path) -> None:
    # A crash mid-write must not leave a truncated file that a later run would trust.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(tensor, tmp)
    os.replace(tmp, path)


def _sequential_loader(train_dataloader: Any) -> DataLoader:
    """The training data in dataset order, unsharded, batched and collated like the real loader."""
    if not isinstance(train_dataloader, DataLoader):
        raise RobucapError(
            f"AdversarialTraining static mode needs a single training DataLoader, got {type(train_dataloader).__name__}"
        )
    dataset: Dataset = train_dataloader.dataset
    if isinstance(dataset, CaptionPairs):
        # One (image, caption) pair per image is enough: the first caption of each image.
        dataset = Subset(dataset, [k for k, (_, caption) in enumerate(dataset.index) if caption == 0])
    return DataLoader(
        dataset, batch_size=train_dataloader.batch_size or 1, shuffle=False, collate_fn=train_dataloader.collate_fn
    )


def _first_captions(
    loader: DataLoader, rank: int, world: int, cache_dir: Path
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Batches of (keys, images, labels) to attack: each image once, with the first caption seen for it.

    Images are dealt round-robin to the ranks in dataset order; images already cached are skipped, so an
    interrupted cache build resumes.

    Shape:
        images ``(N, 3, H, W)``, labels ``(N, T)`` padded with -100.
    """
    batch_size = loader.batch_size or 1
    seen: set[int] = set()
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for batch in loader:
        for row, image_id in enumerate(_ids(batch["image_id"])):
            key = image_key(image_id)
            if key in seen:
                continue
            seen.add(key)
            if (len(seen) - 1) % world != rank or _cache_file(cache_dir, key).is_file():
                continue
            labels = batch["labels"][row]
            pending.append((key, batch["pixel_values"][row], labels[labels.ne(-100)]))
            if len(pending) == batch_size:
                yield _stack(pending)
                pending = []
    if pending:
        yield _stack(pending)


def _ids(image_ids: Any) -> list[Any]:
    return image_ids.reshape(-1).tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)


def _stack(rows: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    keys = [key for key, _, _ in rows]
    images = torch.stack([image for _, image, _ in rows])
    labels = pad_sequence([label for _, _, label in rows], batch_first=True, padding_value=-100)
    return keys, images, labels
