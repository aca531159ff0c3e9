"""Data for pretraining a captioner's parts apart: shapes images with attribute labels (encoder) and caption text
alone (decoder).

Neither data module ever reads the test split: the parts they pretrain are later fine-tuned and tested as a
captioner on that split.

* :class:`ShapesAttributesDataModule`: every image of the shapes data with what it shows, read from the generator's
  ``annotations/instances_{split}.json`` (category = shape, ``attributes.color``, ``attributes.size``, ``bbox``),
  never from the captions: a multi-hot vector over :data:`ATTRIBUTE_LABELS` (which shapes, colours and sizes occur,
  which (colour, shape) pairs occur, how many objects there are) and a region map (per pixel, the shape, colour and
  size of the object whose box holds it, or background).
* :class:`CaptionTextDataModule`: the captions of any caption dataset as token sequences for causal language
  modelling, with the word-level tokenizer the captioner would build from the same training captions.

:func:`generated_shapes_options` recognises a generated shapes dataset by its ``meta.json`` whatever format a caller
reads it as (the demo reads it as ``coco``), so both modules can pretrain on it with the settings it was made with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerFast

from datamodules.datasets import ImageStore
from datamodules.errors import DataError, RobucapError
from datamodules.formats import load_split
from datamodules.formats._common import expect, get, read_json, require_file
from datamodules.records import ImageRecord
from datamodules.shapes import COLORS, SHAPE_KINDS, SIZES, ShapesConfig, ShapesFlags, generate_shapes, shapes_ready
from datamodules.tokenizer import VocabInfo, build_word_tokenizer, load_tokenizer

__all__ = [
    "ATTRIBUTE_LABELS",
    "REGION_CLASSES",
    "AttributeBatch",
    "CaptionTextDataModule",
    "ShapeObject",
    "ShapesAttributesDataModule",
    "TextBatch",
    "attribute_labels",
    "attribute_vector",
    "generated_shapes_options",
    "read_attributes",
    "region_map",
]

MAX_OBJECTS = 3
"""Most objects in a shapes image (``ShapesConfig.max_objects`` is at most 3)."""


def attribute_labels() -> tuple[str, ...]:
    """Names of the encoder pretraining labels, in vector order.

    ``shape:<kind>`` (5), ``color:<name>`` (6), ``size:<name>`` (2), ``pair:<color> <kind>`` (30) and
    ``count:<n>`` for n = 1..3 (exactly one of these is on).
    """
    names = [f"shape:{kind}" for kind in SHAPE_KINDS]
    names += [f"color:{color}" for color in COLORS]
    names += [f"size:{size}" for size in SIZES]
    names += [f"pair:{color} {kind}" for color in COLORS for kind in SHAPE_KINDS]
    names += [f"count:{n}" for n in range(1, MAX_OBJECTS + 1)]
    return tuple(names)


ATTRIBUTE_LABELS: tuple[str, ...] = attribute_labels()
_LABEL_INDEX = {name: i for i, name in enumerate(ATTRIBUTE_LABELS)}


@dataclass
class AttributeBatch:
    """A batch of images with their attribute labels.

    Attributes:
        pixel_values: Images in [0, 1]. Shape: ``(B, 3, S, S)``.
        labels: Multi-hot targets over :data:`ATTRIBUTE_LABELS` (float 0 / 1). Shape: ``(B, L)``.
        regions: Per pixel, the shape, colour and size class of the object whose box holds it (0: background, else
            1 + the position in ``SHAPE_KINDS`` / ``COLORS`` / ``SIZES``). Shape: ``(B, 3, S, S)``, int64.
    """

    pixel_values: torch.Tensor
    labels: torch.Tensor
    regions: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class TextBatch:
    """A batch of captions for causal language modelling, laid out as the captioner's decoder sees them.

    Attributes:
        input_ids: ``<bos>`` then the caption's tokens, padded with the pad id. Shape: ``(B, T)``.
        attention_mask: 1 on real positions. Shape: ``(B, T)``.
        labels: The caption's tokens then ``<eos>``, -100 on padding (``input_ids`` shifted left). Shape: ``(B, T)``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


def _shapes_config(options: dict[str, Any], image_size: int | None) -> tuple[ShapesConfig, ShapesFlags]:
    """The generator settings of ``data.shapes`` (and ``data.image_size`` when given) and the flags naming them."""
    names = {f.name for f in fields(ShapesConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise RobucapError(f"data.shapes has no option {unknown[0]!r}; expected some of {', '.join(sorted(names))}")
    values = dict(options)
    flags = {name: f"--data.shapes.{name}" for name in names}
    if image_size is not None and "image_size" not in values:
        values["image_size"] = image_size
        flags["image_size"] = "--data.image_size"
    return ShapesConfig(**values), ShapesFlags("--data.root", flags)


def generated_shapes_options(root: str | Path) -> dict[str, int] | None:
    """The generator settings of the complete shapes dataset at ``root``, or ``None`` when it holds none.

    Read from the ``meta.json`` the generator writes and checked with :func:`~datamodules.shapes.shapes_ready`, so
    passing them as ``shapes`` to :class:`ShapesAttributesDataModule` or :class:`CaptionTextDataModule` reads that
    dataset as it is (its generation is never asked for with other settings, which would be refused).

    Args:
        root: A directory that may hold a generated shapes dataset (read as ``shapes`` or as ``coco``).
    """
    try:
        meta = json.loads((Path(root) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    recorded = meta.get("config") if isinstance(meta, dict) and meta.get("name") == "shapes" else None
    if not isinstance(recorded, dict):
        return None
    try:
        config = ShapesConfig(**recorded)
    except (TypeError, RobucapError):  # unknown fields or values out of range: not a dataset this generator made
        return None
    return asdict(config) if shapes_ready(root, config) else None


def _check_limits(**limits: int | None) -> None:
    for name, value in limits.items():
        if value is not None and value < 1:
            raise RobucapError(f"data.{name} must be >= 1 or null, got {value}")


def _check_batch_sizes(batch_size: int, eval_batch_size: int | None) -> None:
    if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
        raise RobucapError("data.batch_size and data.eval_batch_size must be >= 1")


@dataclass(frozen=True)
class ShapeObject:
    """One object of a shapes image.

    Attributes:
        shape: A name of ``SHAPE_KINDS``.
        color: A name of ``COLORS``.
        size: A name of ``SIZES``.
        box: ``x, y, w, h`` as fractions of the image's width and height.
    """

    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]


REGION_CLASSES: tuple[int, int, int] = (len(SHAPE_KINDS) + 1, len(COLORS) + 1, len(SIZES) + 1)
"""Classes of the shape, colour and size region maps (background included)."""


def _objects(data: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    """The list ``data[key]``, every item a JSON object."""
    return [expect(item, dict, path, f"{key}[{i}]") for i, item in enumerate(get(data, key, list, path, ""))]


def read_attributes(path: Path) -> dict[int, list[ShapeObject]]:
    """The objects of every image of a shapes instances file.

    Args:
        path: ``annotations/instances_{split}.json`` written by the shapes generator.

    Raises:
        DataError: The file is missing or corrupt, or an object lacks a known shape, colour or size.
    """
    data = read_json(require_file(path, "shapes", "an instances file"))
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object with images, annotations and categories")
    categories = {get(c, "id", int, path, "a category"): get(c, "name", str, path, "a category") for c in
                  _objects(data, "categories", path)}  # fmt: skip
    sides = {
        get(image, "id", int, path, "an image"): (
            get(image, "width", int, path, "an image"),
            get(image, "height", int, path, "an image"),
        )
        for image in _objects(data, "images", path)
    }
    objects: dict[int, list[ShapeObject]] = {image_id: [] for image_id in sides}
    for ann in _objects(data, "annotations", path):
        image_id = get(ann, "image_id", int, path, "an annotation")
        attributes = ann.get("attributes")
        shape = categories.get(ann.get("category_id"))
        color = attributes.get("color") if isinstance(attributes, dict) else None
        size = attributes.get("size") if isinstance(attributes, dict) else None
        if shape not in SHAPE_KINDS or color not in COLORS or size not in SIZES:
            raise DataError(
                f"{path}: annotation {ann.get('id')!r} has shape {shape!r}, color {color!r}, size {size!r}; expected "
                "the shapes generator's categories with attributes.color and attributes.size (robucap data shapes)"
            )
        if image_id not in objects:
            raise DataError(f"{path}: annotation {ann.get('id')!r} names image {image_id}, which the file lacks")
        x, y, w, h = (float(v) for v in get(ann, "bbox", list, path, "an annotation"))
        width, height = sides[image_id]
        objects[image_id].append(ShapeObject(shape, color, size, (x / width, y / height, w / width, h / height)))
    return objects


def attribute_vector(objects: Sequence[ShapeObject]) -> torch.Tensor:
    """The multi-hot label vector of one image's objects.

    Shape:
        ``(len(ATTRIBUTE_LABELS),)``, float 0 / 1.

    Raises:
        DataError: No object, or more than :data:`MAX_OBJECTS`.
    """
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise DataError(f"a shapes image has 1 to {MAX_OBJECTS} objects, this one has {len(objects)}")
    vector = torch.zeros(len(ATTRIBUTE_LABELS))
    for o in objects:
        for name in (f"shape:{o.shape}", f"color:{o.color}", f"size:{o.size}", f"pair:{o.color} {o.shape}"):
            vector[_LABEL_INDEX[name]] = 1.0
    vector[_LABEL_INDEX[f"count:{len(objects)}"]] = 1.0
    return vector


def region_map(objects: Sequence[ShapeObject], size: int) -> torch.Tensor:
    """Per pixel, the classes of the object whose box holds the pixel's centre (the generator's boxes never overlap).

    Shape:
        ``(3, size, size)``, int64: shape, colour and size class, 0 on the background.
    """
    regions = torch.zeros(3, size, size, dtype=torch.long)
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    kinds, colors, sizes = list(SHAPE_KINDS), list(COLORS), list(SIZES)
    for o in objects:
        x, y, w, h = o.box
        cols = (centres >= x) & (centres < x + w)
        rows = (centres >= y) & (centres < y + h)
        inside = rows[:, None] & cols[None, :]
        for channel, index in enumerate((kinds.index(o.shape), colors.index(o.color), sizes.index(o.size))):
            regions[channel][inside] = index + 1
    return regions


class _AttributeImages(Dataset):
    """Images of one split with their label vectors and region maps."""

    def __init__(self, store: ImageStore, objects: list[list[ShapeObject]]) -> None:
        self.store = store
        self.objects = objects
        self.labels = torch.stack([attribute_vector(o) for o in objects])

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        regions = region_map(self.objects[index], self.store.image_size)
        return self.store.image(index), self.labels[index], regions


def collate_attributes(items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> AttributeBatch:
    """Stack ``(image, labels, regions)`` items into an :class:`AttributeBatch`."""
    images, labels, regions = zip(*items, strict=True)
    return AttributeBatch(torch.stack(images), torch.stack(labels), torch.stack(regions))


class ShapesAttributesDataModule(L.LightningDataModule):
    """Shapes images labelled with the attributes of their objects, for pretraining an image encoder.

    Trains on the ``train`` split and validates on ``val``; the ``test`` split is never read. The labels come from
    the instances files, not from the captions.

    Args:
        root: A shapes dataset (generated there on first use, never rewritten).
        image_size: Images are resized to ``image_size`` × ``image_size``; also the generator's size.
        batch_size: Training batch size (images).
        eval_batch_size: Validation batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        limit_train: Use only the first N training images (``None``: all).
        limit_val: Use only the first N validation images.
        shapes: Generator options (see ``datamodules.shapes.ShapesConfig``).
        progress: Show progress bars while generating or decoding.
    """

    def __init__(
        self,
        root: str = "data/shapes",
        image_size: int = 64,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        limit_train: int | None = None,
        limit_val: int | None = None,
        shapes: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_batch_sizes(batch_size, eval_batch_size)
        _check_limits(limit_train=limit_train, limit_val=limit_val)
        self.root = Path(root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.limits = {"train": limit_train, "val": limit_val}
        self.config, self.flags = _shapes_config(dict(shapes or {}), image_size)
        self.progress = progress
        self.datasets: dict[str, _AttributeImages] = {}

    @property
    def label_names(self) -> tuple[str, ...]:
        """The label of each target position."""
        return ATTRIBUTE_LABELS

    def prepare_data(self) -> None:
        """Generate the shapes data on first use (rank 0 only)."""
        generate_shapes(self.root, self.config, progress=self.progress, flags=self.flags)

    def _split(self, split: str) -> _AttributeImages:
        records: list[ImageRecord] = load_split("shapes", self.root, split)
        limit = self.limits[split]
        records = records[:limit] if limit else records
        objects = read_attributes(self.root / "annotations" / f"instances_{split}.json")
        missing = [r.image_id for r in records if r.image_id not in objects]
        if missing:
            raise DataError(f"{self.root}: image {missing[0]} of the {split} captions is not in its instances file")
        store = ImageStore(records, self.image_size, cache=True, progress=self.progress)
        return _AttributeImages(store, [objects[int(r.image_id)] for r in records])

    def setup(self, stage: str | None = None) -> None:
        """Load the training and validation images (the test split is never read)."""
        for split in ("train", "val"):
            if split not in self.datasets:
                self.datasets[split] = self._split(split)

    def label_prior(self) -> torch.Tensor:
        """How often each label is on in the training split: the chance-level prediction.

        Shape:
            ``(L,)``.
        """
        self.setup("fit")
        return self.datasets["train"].labels.mean(0)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        self.setup("fit")
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_attributes,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)


class _Captions(Dataset):
    """Every caption of a split as token ids (no special tokens)."""

    def __init__(self, token_ids: list[list[int]]) -> None:
        self.token_ids = token_ids

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int) -> list[int]:
        return self.token_ids[index]


class TextCollator:
    """Pad token sequences into a :class:`TextBatch`: ``<bos> w1 .. wn`` predicts ``w1 .. wn <eos>``.

    Args:
        bos: Decoder start id.
        eos: End-of-caption id.
        pad: Padding id.
        max_tokens: Captions are cut to this many tokens, EOS included (as the captioner's collator does).
    """

    def __init__(self, bos: int, eos: int, pad: int, max_tokens: int) -> None:
        self.bos, self.eos, self.pad, self.max_tokens = bos, eos, pad, max_tokens

    def __call__(self, items: Sequence[list[int]]) -> TextBatch:
        targets = [list(ids[: self.max_tokens - 1]) + [self.eos] for ids in items]
        length = max(len(t) for t in targets)
        input_ids = torch.full((len(items), length), self.pad, dtype=torch.long)
        labels = torch.full((len(items), length), -100, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, target in enumerate(targets):
            n = len(target)
            input_ids[row, :n] = torch.tensor([self.bos] + target[:-1], dtype=torch.long)
            labels[row, :n] = torch.tensor(target, dtype=torch.long)
            mask[row, :n] = 1
        return TextBatch(input_ids, mask, labels)


class CaptionTextDataModule(L.LightningDataModule):
    """The captions of a caption dataset, without images, for pretraining a language-model decoder.

    Trains on every caption of the ``train`` split, validates on those of ``val``; the ``test`` split is never read.
    The tokenizer is the one :class:`~datamodules.datamodule.CaptionDataModule` builds from the same training
    captions (or a saved one), so a captioner trained on this data uses the same ids.

    Args:
        format: ``shapes`` (generated on first use), ``coco``, ``karpathy``, ``flickr8k`` or ``folder``.
        root: Dataset directory.
        batch_size: Training batch size (captions).
        eval_batch_size: Validation batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        tokenizer: Directory of a saved tokenizer to use; ``None`` builds a word-level one from training captions.
        min_freq: Minimum word count for the built tokenizer.
        max_tokens: Captions are cut to this many tokens, EOS included.
        limit_train: Use only the captions of the first N training images (``None``: all).
        limit_val: Use only the captions of the first N validation images.
        format_options: Extra options of the format loader (e.g. ``{"image_dir": "Flicker8k_Dataset"}``).
        shapes: Generator options for ``format: shapes`` (see ``datamodules.shapes.ShapesConfig``).
        progress: Show a progress bar while generating.
    """

    def __init__(
        self,
        format: str = "shapes",
        root: str = "data/shapes",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        tokenizer: str | None = None,
        min_freq: int = 1,
        max_tokens: int = 32,
        limit_train: int | None = None,
        limit_val: int | None = None,
        format_options: dict[str, Any] | None = None,
        shapes: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_batch_sizes(batch_size, eval_batch_size)
        _check_limits(limit_train=limit_train, limit_val=limit_val)
        if max_tokens < 2:
            raise RobucapError(f"data.max_tokens must be >= 2 (at least one word and EOS), got {max_tokens}")
        if min_freq < 1:
            raise RobucapError(f"data.min_freq must be >= 1, got {min_freq}")
        self.format = format
        self.root = Path(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.tokenizer_dir = tokenizer
        self.min_freq = min_freq
        self.max_tokens = max_tokens
        self.limits = {"train": limit_train, "val": limit_val}
        self.format_options = dict(format_options or {})
        self.shapes_config = _shapes_config(dict(shapes or {}), None) if format == "shapes" else None
        self.progress = progress
        self.tokenizer: PreTrainedTokenizerFast | None = None
        self.datasets: dict[str, _Captions] = {}

    def prepare_data(self) -> None:
        """Generate the shapes data on first use (rank 0 only)."""
        if self.shapes_config is not None:
            config, flags = self.shapes_config
            generate_shapes(self.root, config, progress=self.progress, flags=flags)

    def _captions(self, split: str) -> list[str]:
        records = load_split(self.format, self.root, split, **self.format_options)
        limit = self.limits[split]
        return [caption for record in (records[:limit] if limit else records) for caption in record.captions]

    def setup(self, stage: str | None = None) -> None:
        """Build (or load) the tokenizer and tokenize the training and validation captions."""
        if self.datasets:
            return
        train = self._captions("train")
        if self.tokenizer is None:
            if self.tokenizer_dir:
                self.tokenizer = load_tokenizer(self.tokenizer_dir)
            else:
                self.tokenizer = build_word_tokenizer(train, min_freq=self.min_freq)
        for split, captions in (("train", train), ("val", self._captions("val"))):
            self.datasets[split] = _Captions(self.tokenizer(captions, add_special_tokens=False)["input_ids"])

    def collator(self) -> TextCollator:
        """The batch layout of the captioner's decoder (needs :meth:`setup` first)."""
        if self.tokenizer is None:
            raise RobucapError("the data module has no tokenizer yet: call setup() first")
        vocab = VocabInfo.from_tokenizer(self.tokenizer)
        return TextCollator(vocab.bos_token_id, vocab.eos_token_id, vocab.pad_token_id, self.max_tokens)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        self.setup("fit")
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collator(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)
