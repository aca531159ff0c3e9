"""The LightningDataModule for every caption dataset format."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from datamodules.collate import CaptionCollator
from datamodules.datasets import CaptionImages, CaptionPairs, ImageStore
from datamodules.errors import DataError, MissingSplitError, RobucapError
from datamodules.formats import load_split
from datamodules.images import load_image_uint8
from datamodules.poisoning.config import PoisonConfig
from datamodules.poisoning.poisoned import PoisonedSplit, check_cache_outside, poison_split
from datamodules.predict import PredictImages, collate_predict, folder_items, split_items
from datamodules.records import ImageRecord
from datamodules.sampler import ResumableDataLoader, training_sampler
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
        predict_split: The split ``robucap predict`` captions (``train``, ``val`` or ``test``).
        predict_images: A folder of image files to caption instead of a split (searched recursively).
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
        predict_split: str = "test",
        predict_images: str | None = None,
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
        if predict_split not in SPLITS:
            raise RobucapError(f"data.predict_split must be one of {', '.join(SPLITS)}, got {predict_split!r}")
        self.predict_split = predict_split
        self.predict_images = predict_images
        self.tokenizer: PreTrainedTokenizerFast | None = None
        self.records: dict[str, list[ImageRecord]] = {}
        self.datasets: dict[str, Any] = {}

    # -- data ---------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the shapes data on first use (rank 0 only, as Lightning calls it).

        Raises:
            DataError: ``root`` holds something other than the shapes dataset these settings describe (another
                dataset, other settings, an incomplete one); it is never rewritten.
        """
        if self.format == "shapes":
            from dataclasses import fields

            from datamodules.shapes import ShapesConfig, ShapesFlags, generate_shapes

            config = ShapesConfig(**{"image_size": self.image_size, **self.shapes_options})
            # image_size comes from data.image_size unless the shapes options set it themselves.
            options = {f.name: f"--data.shapes.{f.name}" for f in fields(ShapesConfig)}
            if "image_size" not in self.shapes_options:
                options["image_size"] = "--data.image_size"
            # Writes only an absent or empty root (atomically, safe for concurrent first uses); returns at once
            # when the root already holds this dataset, and refuses one made with other settings.
            generate_shapes(self.root, config, progress=self.progress, flags=ShapesFlags("--data.root", options))
        if self.poison is not None:
            # Poisoned images are written once here (rank 0); other ranks read the finished cache in setup().
            for split in SPLITS:
                try:
                    self.load_records(split)
                except MissingSplitError:
                    # Only an absent split may be skipped: a corrupt one must stop the run, not pass as missing.
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
        if stage == "predict":
            self._setup_predict()
            return
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in needed.get(stage, SPLITS) if stage else SPLITS:
            if split in self.datasets:
                continue
            store = self._store(split)
            self.datasets[split] = CaptionPairs(store) if split == "train" else CaptionImages(store)

    def _setup_predict(self) -> None:
        if "predict" in self.datasets:
            return
        if self.predict_images is not None:
            items = folder_items(self.predict_images)
        else:
            items = split_items(self.load_records(self.predict_split))
        self.datasets["predict"] = PredictImages(items, self.image_size)

    def use_tokenizer(self, tokenizer: PreTrainedTokenizerFast, source: str) -> None:
        """Use a given tokenizer (e.g. a checkpoint's) instead of building one from the training captions.

        Args:
            tokenizer: The tokenizer the model was trained with.
            source: Names it in error messages (e.g. ``"checkpoint runs/x/best.ckpt"``).

        Raises:
            DataError: A poisoned configuration's target caption has words the tokenizer cannot represent.
        """
        if self.poison is not None:
            check_target_caption(tokenizer, self.poison.target_caption, source)
        self.tokenizer = tokenizer

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
        """Load ``tokenizer`` if given, else build a word-level tokenizer from the training captions.

        Raises:
            DataError: When the data has no training split (with advice to pass a tokenizer), or from loading
                the training split (unchanged: a corrupt file or missing image is not fixed by a tokenizer).
        """
        if self.tokenizer_dir:
            tokenizer = load_tokenizer(self.tokenizer_dir)
            if self.poison is not None:
                check_target_caption(tokenizer, self.poison.target_caption, f"the tokenizer in {self.tokenizer_dir}")
            return tokenizer
        try:
            train = self.load_records("train")
        except MissingSplitError as err:
            # Only a genuinely absent train split is fixed by a saved tokenizer; other errors pass through.
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

    # The training loader in use, and the position a resumed checkpoint gives the next one (load_state_dict).
    _train_loader: ResumableDataLoader | None = None
    _train_position: dict[str, Any] | None = None

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        """A loader over one split; the training one (shuffled) is resumable (``datamodules/sampler.py``)."""
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        dataset = self.datasets[split]
        options: dict[str, Any] = {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "collate_fn": self._collator(),
            "persistent_workers": self.num_workers > 0,
            "drop_last": False,
        }
        if not shuffle:
            return DataLoader(dataset, shuffle=False, **options)
        # The order depends on (seed, epoch) only and the loader's place in the epoch is checkpointed, so a run
        # resumed mid-epoch continues the interrupted epoch's batches (datamodules/sampler.py).
        loader = ResumableDataLoader(dataset, sampler=training_sampler(dataset, self.trainer), **options)
        position, self._train_position = self._train_position, None
        if position is not None:
            loader.load_state_dict(position)
        self._train_loader = loader
        return loader

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (Lightning saves it in checkpoints under the class name)."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's training-loader position for the training loader created next.

        Lightning restores a stateful loader itself too, but drops the state when the model read
        ``trainer.estimated_stepping_batches`` before the restore (Lightning issue #20550), as
        ``CaptioningModule.configure_optimizers`` does; the data module's copy arrives either way. Only a resumed
        ``fit`` keeps it: ``validate`` / ``test`` restore checkpoints too, and must not move a later fit's data.
        """
        fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        self._train_position = state_dict.get("train_loader") if fitting else None

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        self._setup_predict()
        return DataLoader(
            self.datasets["predict"],
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_predict,
            persistent_workers=self.num_workers > 0,
        )


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
