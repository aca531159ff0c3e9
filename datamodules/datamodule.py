"""The LightningDataModule for every caption dataset format."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from datamodules.collate import CaptionCollator
from datamodules.datasets import CaptionImages, CaptionPairs, ImageStore
from datamodules.errors import DataError, RobucapError
from datamodules.formats import load_split
from datamodules.images import load_image_uint8
from datamodules.poisoning.config import PoisonConfig
from datamodules.poisoning.poisoned import PoisonedSplit, check_cache_outside, poison_split
from datamodules.records import ImageRecord
from datamodules.tokenizer import build_word_tokenizer, load_tokenizer, unknown_words

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Decoding a split into memory pays off for small data; above this many bytes images are read per step.
_AUTO_CACHE_BYTES = 2 * 1024**3


class CaptionDataModule(L.LightningDataModule):
    """Caption data in any supported format, tokenized for a captioner.

    Args:
        format: ``shapes`` (the built-in procedural data, generated on first use), ``coco``, ``karpathy``,
            ``flickr8k`` or ``folder``.
        root: Dataset directory.
        image_size: Images are resized to ``image_size`` × ``image_size``.
        batch_size: Training batch size (pairs).
        eval_batch_size: Validation / test batch size (images); defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        tokenizer: Directory of a saved tokenizer to use; ``None`` builds a word-level one from training captions.
        min_freq: Minimum word count for the built tokenizer.
        max_tokens: Captions are cut to this many tokens, EOS included.
        extra_words: Words the built tokenizer must represent (e.g. a backdoor target caption).
        limit_train: Use only the first N training images (``None``: all).
        limit_val: Use only the first N validation images.
        limit_test: Use only the first N test images.
        cache_images: Keep decoded images in memory; ``None`` decides by size (under 2 GiB per split).
        format_options: Extra options of the format loader (e.g. ``{"image_dir": "Flicker8k_Dataset"}``).
        shapes: Generator options for ``format: shapes`` (see ``datamodules.shapes.ShapesConfig``).
        poison: Backdoor poisoning options (see :class:`~datamodules.poisoning.config.PoisonConfig`), or ``None``
            for clean data. Training and validation are poisoned at ``rate``; the test split gains a poisoned copy
            of every image the trigger can act on. The target caption's words join a built tokenizer.
        progress: Show progress bars while generating or decoding.
    """

    def __init__(
        self,
        format: str = "shapes",
        root: str = "data/shapes",
        image_size: int = 64,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        tokenizer: str | None = None,
        min_freq: int = 1,
        max_tokens: int = 32,
        extra_words: list[str] | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        cache_images: bool | None = None,
        format_options: dict[str, Any] | None = None,
        shapes: dict[str, Any] | None = None,
        poison: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if image_size < 8 or image_size > 4096:
            raise RobucapError(f"data.image_size must be between 8 and 4096 pixels, got {image_size}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise RobucapError("data.batch_size and data.eval_batch_size must be >= 1")
        if max_tokens < 2:
            raise RobucapError(f"data.max_tokens must be >= 2 (at least one word and EOS), got {max_tokens}")
        for name, value in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            if value is not None and value < 1:
                raise RobucapError(f"data.{name} must be >= 1 or null, got {value}")
        self.format = format
        self.root = Path(root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.tokenizer_dir = tokenizer
        self.min_freq = min_freq
        self.max_tokens = max_tokens
        self.extra_words = list(extra_words or [])
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.cache_images = cache_images
        self.format_options = dict(format_options or {})
        self.shapes_options = dict(shapes or {})
        self.poison = PoisonConfig.from_dict(poison) if poison is not None else None
        if self.poison is not None:
            check_cache_outside(self.poison.cache_dir, self.root)
        self.poisoned: dict[str, PoisonedSplit] = {}
        self.progress = progress
        self.tokenizer: PreTrainedTokenizerFast | None = None
        self.records: dict[str, list[ImageRecord]] = {}
        self.datasets: dict[str, Any] = {}

    # -- data ---------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the shapes data on first use (rank 0 only, as Lightning calls it)."""
        if self.format == "shapes":
            from datamodules.shapes import ShapesConfig, generate_shapes, shapes_ready

            config = ShapesConfig(**{"image_size": self.image_size, **self.shapes_options})
            if not shapes_ready(self.root, config):
                generate_shapes(self.root, config, progress=self.progress)
        if self.poison is not None:
            # Poisoned images are written once here (rank 0); other ranks read the finished cache in setup().
            for split in SPLITS:
                try:
                    self.load_records(split)
                except DataError:
                    if split == "train":
                        raise
                    log.warning("no %s split to poison", split)

    def load_records(self, split: str) -> list[ImageRecord]:
        """Records of one split, limited by ``limit_<split>``, loaded once."""
        if split not in self.records:
            records = load_split(self.format, self.root, split, **self.format_options)
            limit = self.limits[split]
            records = records[:limit] if limit else records
            if self.poison is not None:
                self.poisoned[split] = poison_split(
                    records, split, self.poison, self.image_size, self.root, progress=self.progress
                )
                records = self.poisoned[split].records
            self.records[split] = records
        return self.records[split]

    def _cache(self, records: list[ImageRecord]) -> bool:
        if self.cache_images is not None:
            return self.cache_images
        return len(records) * 3 * self.image_size**2 <= _AUTO_CACHE_BYTES

    def _store(self, split: str) -> ImageStore:
        records = self.load_records(split)
        return ImageStore(records, self.image_size, cache=self._cache(records), progress=self.progress)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits the stage needs and build (or load) the tokenizer."""
        if self.tokenizer is None:
            self.tokenizer = self.build_tokenizer()
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage, SPLITS) if stage else SPLITS:
            if split in self.datasets:
                continue
            store = self._store(split)
            self.datasets[split] = CaptionPairs(store) if split == "train" else CaptionImages(store)

    def eval_dataset(self, split: str) -> CaptionImages:
        """Any split as unique images with all their references (e.g. to score captions on training images)."""
        if split != "train":
            if split not in self.datasets:
                self.setup({"val": "validate", "test": "test"}[split])
            return self.datasets[split]
        if split not in self.datasets:
            self.setup("fit")
        return CaptionImages(self.datasets["train"].store)

    def poison_pairs(self, split: str = "val", n: int = 8) -> list[dict[str, Any]]:
        """Clean / poisoned versions of the first ``n`` poisoned images of a split (for example tables and figures).

        Args:
            split: ``train``, ``val`` or ``test``.
            n: Number of pairs.

        Returns:
            Dicts with ``image_id``, ``clean`` and ``poisoned`` (``torch.uint8``, ``(3, S, S)``); empty for clean data.
        """
        if self.poison is None:
            return []
        self.load_records(split)
        poisoned = self.poisoned[split]
        manifest = json.loads(poisoned.manifest.read_text(encoding="utf-8"))
        pairs = []
        for item in manifest["items"][:n]:
            pairs.append(
                {
                    "image_id": item["image_id"],
                    "clean": load_image_uint8(Path(item["source"]), self.image_size),
                    "poisoned": load_image_uint8(poisoned.manifest.parent / item["output"], self.image_size),
                }
            )
        return pairs

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        """Load ``tokenizer`` if given, else build a word-level tokenizer from the training captions."""
        if self.tokenizer_dir:
            tokenizer = load_tokenizer(self.tokenizer_dir)
            if self.poison is not None:
                check_target_caption(tokenizer, self.poison.target_caption, f"the tokenizer in {self.tokenizer_dir}")
            return tokenizer
        try:
            train = self.load_records("train")
        except DataError as err:
            raise DataError(
                f"cannot build a tokenizer without the training captions ({err}); pass data.tokenizer=<directory> "
                "or evaluate from a checkpoint, which carries its tokenizer"
            ) from err
        extra = list(self.extra_words) + ([self.poison.target_caption] if self.poison is not None else [])
        return build_word_tokenizer((c for r in train for c in r.captions), min_freq=self.min_freq, extra_words=extra)

    def describe(self) -> dict[str, Any]:
        """Name, split sizes (images) and image size, for results.json."""
        info: dict[str, Any] = {
            "name": self.format,
            "root": str(self.root),
            "splits": {s: len(self.records[s]) for s in SPLITS if s in self.records},
            "image_size": self.image_size,
        }
        if self.poison is not None:
            info["poison"] = {
                **self.poison.as_dict(),
                "splits": {
                    s: {
                        "n_images": p.n_images,
                        "n_poisoned": p.n_poisoned,
                        "n_skipped": p.n_skipped,
                        "manifest": str(p.manifest),
                    }
                    for s, p in self.poisoned.items()
                },
            }
        return info

    # -- loaders ------------------------------------------------------------------------------------------------
    def _collator(self) -> CaptionCollator:
        if self.tokenizer is None:
            raise RobucapError("the data module has no tokenizer yet: call setup() first")
        return CaptionCollator(self.tokenizer, self.max_tokens)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self._collator(),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)


def check_target_caption(tokenizer: PreTrainedTokenizerFast, target_caption: str, where: str) -> None:
    """Fail when a fixed tokenizer cannot represent the backdoor target caption.

    Args:
        tokenizer: The tokenizer the model will use.
        target_caption: The attacker's target caption.
        where: Names the tokenizer in the message (e.g. its directory or checkpoint).

    Raises:
        DataError: When a word of the target maps to the unknown token.
    """
    missing = unknown_words(tokenizer, target_caption)
    if missing:
        raise DataError(
            f"the backdoor target caption {target_caption!r} has words that {where} cannot represent: "
            f"{', '.join(sorted(set(missing)))}; choose a target made of known words or build the tokenizer from the "
            "poisoned data (leave data.tokenizer unset)"
        )
