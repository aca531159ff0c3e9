"""COCO instances (boxes, polygons) for the dense victims: a detector and a segmenter.

The built-in shapes data writes ``annotations/instances_{split}.json`` next to its captions (exact boxes and polygons
of five shape categories); any COCO-format root with instances files works the same way::

    root/annotations/instances_{split}.json   {"images": [{"id", "file_name", "width", "height"}],
                                               "annotations": [{"image_id", "category_id", "bbox": [x, y, w, h],
                                               "segmentation": polygons or RLE, "iscrowd"}],
                                               "categories": [{"id", "name"}]}
    root/images/{split}/<file_name>

Every image of the instances file is an item, also one without objects (a detector learns background from it).
Categories become labels ``1..K`` in the order of their ids (0 is the background); crowd annotations are kept
apart: the detector does not train on them and the mAP ignores detections on them, and their pixels are
:data:`IGNORE_INDEX` in the semantic mask. Images are resized to ``image_size`` × ``image_size`` (no crop), boxes
and polygons are scaled with them and the polygons are rasterised at that size with pycocotools.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torch.utils.data import DataLoader, Dataset

from datamodules.datasets import ImageStore
from datamodules.errors import DataError, RobucapError
from datamodules.formats._common import check_root, expect, fill, get, read_json, require_dir, require_file
from datamodules.images import image_orientation, resolve_inside
from datamodules.poisoning.regions import orient_boxes
from datamodules.records import Box, ImageRecord

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "InstanceBatch",
    "InstanceImage",
    "InstanceItem",
    "InstanceSplit",
    "InstancesDataModule",
    "collate_instances",
    "load_instances",
]

FORMATS = ("shapes", "coco")
SPLITS = ("train", "val", "test")
IGNORE_INDEX = 255
"""Semantic-mask value of crowd pixels: neither trained on nor scored (the VOC convention)."""
DEFAULT_INSTANCES_FILE = "annotations/instances_{split}.json"
DEFAULT_IMAGE_DIR = "images/{split}"
# Decoding a split into memory pays off for small data; above this many bytes images are read per step.
_AUTO_CACHE_BYTES = 2 * 1024**3
# PIL's transpose for each EXIF orientation, as ImageOps.exif_transpose applies it to the image.
_ORIENT_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class InstanceAnnotation:
    """One object of one image, in the stored pixel grid of the source image.

    Attributes:
        box: Its box (``x, y, w, h``), category name kept.
        label: 1..K (0 is the background).
        segmentation: COCO polygons (a list of flat ``[x0, y0, x1, y1, ...]`` lists) or an RLE dict; ``None``
            without one.
        crowd: A crowd region (``iscrowd: 1``).
    """

    box: Box
    label: int
    segmentation: list[list[float]] | dict[str, Any] | None
    crowd: bool


@dataclass(frozen=True)
class InstanceImage:
    """One image of a split with its objects.

    Attributes:
        image_id: COCO image id.
        path: Image file (inside the image root).
        width: Source width from the instances file.
        height: Source height from the instances file.
        objects: Its annotations, possibly none.
    """

    image_id: int
    path: Path
    width: int
    height: int
    objects: tuple[InstanceAnnotation, ...]


@dataclass(frozen=True)
class InstanceSplit:
    """A split of an instances file.

    Attributes:
        source: The instances file.
        categories: Category names; label ``i + 1`` is ``categories[i]``.
        images: Every image of the file, sorted by id.
    """

    source: Path
    categories: tuple[str, ...]
    images: tuple[InstanceImage, ...]

    @property
    def has_polygons(self) -> bool:
        """Whether some non-crowd object has a segmentation (the segmenter's training signal)."""
        return any(o.segmentation for image in self.images for o in image.objects if not o.crowd)


@dataclass
class InstanceItem:
    """One image ready for a dense victim (a dataclass rather than a frozen one: Lightning moves it in place).

    Attributes:
        image_id: COCO image id.
        image: The resized image in [0, 1].
        boxes: Non-crowd boxes ``x0, y0, x1, y1`` in resized pixels.
        labels: Their labels, 1..K.
        crowd_boxes: Crowd boxes, ``x0, y0, x1, y1``.
        crowd_labels: Their labels.
        mask: Semantic mask: label per pixel, 0 background, :data:`IGNORE_INDEX` on crowd regions.

    Shape:
        ``image``: ``(3, S, S)``; ``boxes``: ``(N, 4)``; ``labels``: ``(N,)``; ``crowd_boxes``: ``(M, 4)``;
        ``crowd_labels``: ``(M,)``; ``mask``: ``(S, S)``.
    """

    image_id: int
    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    crowd_boxes: torch.Tensor
    crowd_labels: torch.Tensor
    mask: torch.Tensor


@dataclass
class InstanceBatch:
    """A batch: images and semantic masks stacked (the segmenter), boxes and labels as lists (the detector).

    Attributes:
        image_ids: COCO image ids.
        images: Images in [0, 1].
        boxes: Per image, non-crowd boxes ``x0, y0, x1, y1``.
        labels: Per image, their labels 1..K.
        crowd_boxes: Per image, crowd boxes.
        crowd_labels: Per image, their labels.
        masks: Semantic masks (0 background, :data:`IGNORE_INDEX` ignored).

    Shape:
        ``images``: ``(B, 3, S, S)``; ``masks``: ``(B, S, S)``; ``boxes[i]``: ``(N_i, 4)``.
    """

    image_ids: list[int]
    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    crowd_boxes: list[torch.Tensor]
    crowd_labels: list[torch.Tensor]
    masks: torch.Tensor

    def targets(self) -> list[dict[str, torch.Tensor]]:
        """Torchvision detection targets (``boxes``, ``labels``) of the non-crowd objects."""
        return [{"boxes": b, "labels": lab} for b, lab in zip(self.boxes, self.labels, strict=True)]

    def __len__(self) -> int:
        return len(self.image_ids)

    def select(self, keep: Sequence[int]) -> InstanceBatch:
        """The batch's images ``keep``, in that order, with their annotations."""
        keep = list(keep)
        return InstanceBatch(
            image_ids=[self.image_ids[i] for i in keep],
            images=self.images[keep],
            boxes=[self.boxes[i] for i in keep],
            labels=[self.labels[i] for i in keep],
            crowd_boxes=[self.crowd_boxes[i] for i in keep],
            crowd_labels=[self.crowd_labels[i] for i in keep],
            masks=self.masks[keep],
        )


def collate_instances(items: Sequence[InstanceItem]) -> InstanceBatch:
    """Stack images and masks, list the boxes."""
    return InstanceBatch(
        image_ids=[item.image_id for item in items],
        images=torch.stack([item.image for item in items]),
        boxes=[item.boxes for item in items],
        labels=[item.labels for item in items],
        crowd_boxes=[item.crowd_boxes for item in items],
        crowd_labels=[item.crowd_labels for item in items],
        masks=torch.stack([item.mask for item in items]),
    )


# -- reading ---------------------------------------------------------------------------------------------------------
def load_instances(
    root: str | Path,
    split: str,
    *,
    instances_file: str = DEFAULT_INSTANCES_FILE,
    image_dir: str = DEFAULT_IMAGE_DIR,
    split_names: Mapping[str, str] | None = None,
) -> InstanceSplit:
    """Read one split of a COCO instances dataset.

    Args:
        root: Dataset root.
        split: ``train``, ``val`` or ``test``.
        instances_file: Instances JSON relative to ``root``; ``{split}`` becomes the split's file name.
        image_dir: Image folder relative to ``root``, same substitution.
        split_names: Maps ``train``/``val``/``test`` to the names in file paths (e.g. ``val2017``).

    Returns:
        The split, images sorted by id.

    Raises:
        DataError: A missing or malformed file, an annotation of an unknown image or category, an image path
            outside ``image_dir``, a missing image, or a file without images or categories.
    """
    base = check_root(root, "coco instances")
    name = (split_names or {}).get(split, split)
    path = require_file(base / fill(instances_file, name), "coco instances", f"the {split} instances file")
    image_root = require_dir(base / fill(image_dir, name), "coco instances", f"the {split} images")
    data = expect(read_json(path), dict, path, "the top-level JSON value")
    category_ids: dict[int, str] = {}
    for index, category in enumerate(get(data, "categories", list, path, "")):
        where = f"categories[{index}]"
        expect(category, dict, path, where)
        category_ids[get(category, "id", int, path, where)] = get(category, "name", str, path, where)
    if not category_ids:
        raise DataError(f"{path}: 'categories' is empty; an instances file must name its object categories")
    labels = {cid: i + 1 for i, cid in enumerate(sorted(category_ids))}
    objects: dict[int, list[InstanceAnnotation]] = {}
    images: dict[int, tuple[str, int, int]] = {}
    for index, image in enumerate(get(data, "images", list, path, "")):
        where = f"images[{index}]"
        expect(image, dict, path, where)
        image_id = get(image, "id", int, path, where)
        if image_id in images:
            raise DataError(f"{path}: {where} repeats image id {image_id}; image ids must be unique")
        width, height = get(image, "width", int, path, where), get(image, "height", int, path, where)
        if width < 1 or height < 1:
            raise DataError(f"{path}: {where} has size {width}x{height}; width and height must be >= 1")
        images[image_id] = (get(image, "file_name", str, path, where), width, height)
    for index, annotation in enumerate(get(data, "annotations", list, path, "")):
        image_id, item = _annotation(annotation, f"annotations[{index}]", path, images, category_ids, labels)
        objects.setdefault(image_id, []).append(item)
    if not images:
        raise DataError(f"{path}: split {split!r} lists no images; expected at least one")
    records = []
    for image_id in sorted(images):
        file_name, width, height = images[image_id]
        image_path = resolve_inside(image_root, file_name, path)
        if not image_path.is_file():
            raise DataError(f"{path}: image {file_name!r} (id {image_id}) is missing: no file {image_path}")
        records.append(InstanceImage(image_id, image_path, width, height, tuple(objects.get(image_id, ()))))
    names = tuple(category_ids[cid] for cid in sorted(category_ids))
    return InstanceSplit(source=path, categories=names, images=tuple(records))


def _annotation(
    annotation: Any,
    where: str,
    path: Path,
    images: Mapping[int, tuple[str, int, int]],
    categories: Mapping[int, str],
    labels: Mapping[int, int],
) -> tuple[int, InstanceAnnotation]:
    """One checked annotation and the id of its image."""
    expect(annotation, dict, path, where)
    image_id = get(annotation, "image_id", int, path, where)
    if image_id not in images:
        raise DataError(f"{path}: {where} refers to image_id {image_id}, which is not in 'images'")
    category_id = get(annotation, "category_id", int, path, where)
    if category_id not in categories:
        raise DataError(f"{path}: {where} has category_id {category_id}, which is not in 'categories'")
    bbox = get(annotation, "bbox", list, path, where)
    if len(bbox) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
        raise DataError(f"{path}: {where}.bbox must be four numbers [x, y, width, height], got {bbox}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise DataError(f"{path}: {where}.bbox has a negative width or height: {bbox}")
    crowd = annotation.get("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, bool):
        raise DataError(f"{path}: {where}.iscrowd must be 0 or 1, got {crowd!r}")
    segmentation = annotation.get("segmentation")
    if segmentation is not None and not _valid_segmentation(segmentation):
        raise DataError(
            f"{path}: {where}.segmentation must be a list of polygons [[x0, y0, x1, y1, x2, y2, ...], ...] or an "
            "RLE {'size': [h, w], 'counts': ...}"
        )
    box = Box(*(float(v) for v in bbox), category=categories[category_id])
    return image_id, InstanceAnnotation(box, labels[category_id], segmentation or None, bool(crowd))


def _valid_segmentation(value: Any) -> bool:
    if isinstance(value, dict):
        return isinstance(value.get("size"), list) and len(value["size"]) == 2 and "counts" in value
    if not isinstance(value, list):
        return False
    return all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(isinstance(v, int | float) for v in p)
        for p in value
    )


# -- items -----------------------------------------------------------------------------------------------------------
def semantic_mask(image: InstanceImage, size: int) -> torch.Tensor:
    """Rasterise an image's objects at ``size`` × ``size``: label per pixel, crowd pixels :data:`IGNORE_INDEX`.

    Polygons are scaled to the resized grid and rasterised there with pycocotools; an RLE is decoded at the source
    size and resized by nearest neighbour. Later objects are painted over earlier ones, crowds last. Objects
    without a segmentation leave no pixels.

    Shape:
        ``(size, size)``, ``torch.long``.
    """
    mask = np.zeros((size, size), dtype=np.int64)
    sx, sy = size / image.width, size / image.height
    for crowd_pass in (False, True):
        for obj in image.objects:
            if obj.crowd != crowd_pass or not obj.segmentation:
                continue
            if isinstance(obj.segmentation, dict):
                rle = obj.segmentation
                if isinstance(rle["counts"], list):
                    rle = coco_mask.frPyObjects(rle, *rle["size"])
                region = coco_mask.decode(rle)
                region = np.array(Image.fromarray(region).resize((size, size), Image.Resampling.NEAREST))
            else:
                scaled = [[v * (sx if k % 2 == 0 else sy) for k, v in enumerate(p)] for p in obj.segmentation]
                region = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(scaled, size, size)))
            mask[region.astype(bool)] = IGNORE_INDEX if obj.crowd else obj.label
    return torch.from_numpy(mask)


def _xyxy(boxes: Sequence[Box]) -> torch.Tensor:
    return torch.tensor([[b.x, b.y, b.x + b.w, b.y + b.h] for b in boxes], dtype=torch.float32).reshape(-1, 4)


class InstanceImages(Dataset):
    """One item per image: the resized image, its scaled boxes and its semantic mask.

    Args:
        split: The split.
        store: Its images decoded at the output size (same order as ``split.images``).
    """

    def __init__(self, split: InstanceSplit, store: ImageStore) -> None:
        self.split = split
        self.store = store
        self._masks: dict[int, torch.Tensor] = {}
        self._orientations: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, index: int) -> InstanceItem:
        image = self.split.images[index]
        size = self.store.image_size
        pixels = self.store.image(index)
        if index not in self._masks:
            # Read once: EXIF needs a file open, and the mask costs a rasterisation.
            self._orientations[index] = image_orientation(image.path)
            self._masks[index] = _oriented_mask(semantic_mask(image, size), self._orientations[index])
        sx, sy = size / image.width, size / image.height
        scaled = [Box(o.box.x * sx, o.box.y * sy, o.box.w * sx, o.box.h * sy, o.box.category) for o in image.objects]
        orientation = self._orientations[index]
        if orientation != 1:
            # load_image turns the pixels upright; annotations refer to the stored grid and must turn with them.
            scaled = list(orient_boxes(scaled, orientation, size, size))
        crowd = [o.crowd for o in image.objects]
        plain = [box for box, c in zip(scaled, crowd, strict=True) if not c]
        crowds = [box for box, c in zip(scaled, crowd, strict=True) if c]
        return InstanceItem(
            image_id=image.image_id,
            image=pixels,
            boxes=_xyxy(plain),
            labels=torch.tensor([o.label for o in image.objects if not o.crowd], dtype=torch.long),
            crowd_boxes=_xyxy(crowds),
            crowd_labels=torch.tensor([o.label for o in image.objects if o.crowd], dtype=torch.long),
            mask=self._masks[index],
        )


def _oriented_mask(mask: torch.Tensor, orientation: int) -> torch.Tensor:
    """A mask in the stored grid turned like ``load_image`` turns the pixels (labels fit in uint8)."""
    if orientation == 1:
        return mask
    turned = Image.fromarray(mask.numpy().astype(np.uint8)).transpose(_ORIENT_OPS[orientation])
    return torch.from_numpy(np.array(turned).astype(np.int64))


# -- the data module -------------------------------------------------------------------------------------------------
class InstancesDataModule(L.LightningDataModule):
    """COCO instances for a detector or a segmenter.

    Args:
        format: ``shapes`` (the built-in procedural data, generated on first use with its own settings, so the
            captioners' folder is shared) or ``coco`` (any COCO-format root with instances files).
        root: Dataset directory.
        image_size: Images (and their boxes and polygons) are resized to ``image_size`` × ``image_size``; 128
            upsamples the 64 px shapes, which keeps the small objects above the detector's smallest anchors.
        batch_size: Training batch size (images).
        eval_batch_size: Validation / test batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        limit_train: Use only the first N training images (``None``: all).
        limit_val: Use only the first N validation images.
        limit_test: Use only the first N test images.
        cache_images: Keep decoded images in memory; ``None`` decides by size (under 2 GiB per split).
        format_options: Options of the coco reader: ``instances_file``, ``image_dir`` (``{split}`` is replaced)
            and ``split_names`` (e.g. ``{"test": "val2017"}``).
        shapes: Generator options for ``format: shapes`` (see ``datamodules.shapes.ShapesConfig``); its
            ``image_size`` is the generated size (64 by default), not ``image_size``.
        progress: Show progress bars while generating or decoding.
    """

    def __init__(
        self,
        format: str = "shapes",
        root: str = "data/shapes",
        image_size: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        cache_images: bool | None = None,
        format_options: dict[str, Any] | None = None,
        shapes: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if format not in FORMATS:
            raise RobucapError(f"data.format must be one of {', '.join(FORMATS)} for a dense victim, got {format!r}")
        if image_size < 16 or image_size > 4096:
            raise RobucapError(f"data.image_size must be between 16 and 4096 pixels, got {image_size}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise RobucapError("data.batch_size and data.eval_batch_size must be >= 1")
        for name, value in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            if value is not None and value < 1:
                raise RobucapError(f"data.{name} must be >= 1 or null, got {value}")
        unknown = sorted(set(format_options or {}) - {"instances_file", "image_dir", "split_names"})
        if unknown:
            raise RobucapError(
                f"data.format_options has unknown option(s) {', '.join(unknown)}; expected instances_file, "
                "image_dir, split_names"
            )
        self.format = format
        self.root = Path(root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.cache_images = cache_images
        self.format_options = dict(format_options or {})
        self.shapes_options = dict(shapes or {})
        self.progress = progress
        self.splits: dict[str, InstanceSplit] = {}
        self.datasets: dict[str, InstanceImages] = {}

    def prepare_data(self) -> None:
        """Generate the shapes data on first use (rank 0 only, as Lightning calls it).

        Raises:
            DataError: ``root`` holds something other than the shapes dataset these settings describe.
        """
        if self.format != "shapes":
            return
        from datamodules.shapes import ShapesConfig, ShapesFlags, generate_shapes

        flags = ShapesFlags("--data.root", {f.name: f"--data.shapes.{f.name}" for f in fields(ShapesConfig)})
        generate_shapes(self.root, ShapesConfig(**self.shapes_options), progress=self.progress, flags=flags)

    def load_split(self, split: str) -> InstanceSplit:
        """One split, limited by ``limit_<split>``, loaded once.

        Raises:
            DataError: See :func:`load_instances`.
        """
        if split not in self.splits:
            loaded = load_instances(self.root, split, **self.format_options)
            limit = self.limits[split]
            if limit:
                loaded = InstanceSplit(loaded.source, loaded.categories, loaded.images[:limit])
            self.splits[split] = loaded
        return self.splits[split]

    @property
    def categories(self) -> tuple[str, ...]:
        """Category names of the first split available (label ``i + 1`` is ``categories[i]``)."""
        for split in SPLITS:
            if split in self.splits:
                return self.splits[split].categories
        return self.load_split("train").categories

    def setup(self, stage: str | None = None) -> None:
        """Load the splits the stage needs."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage, SPLITS) if stage else SPLITS:
            if split in self.datasets:
                continue
            loaded = self.load_split(split)
            records = [ImageRecord(image.image_id, image.path, ()) for image in loaded.images]
            cache = self.cache_images
            if cache is None:
                cache = len(records) * 3 * self.image_size**2 <= _AUTO_CACHE_BYTES
            store = ImageStore(records, self.image_size, cache=cache, progress=self.progress)
            self.datasets[split] = InstanceImages(loaded, store)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        # Shuffled by torch's global generator, which seed_everything seeds (and DDP replaces by a seeded sampler).
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_instances,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
