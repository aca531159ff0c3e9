"""Region sources: where the object boxes that object-oriented triggers act on come from.

Two sources share one interface, ``check(records)`` once per split and ``regions(record) -> tuple[Box, ...]``
per image, with boxes in pixel coordinates of the *source* image as stored in its file (see
:class:`~datamodules.records.Box`), the grid COCO annotations and ``ImageRecord.width``/``height`` refer to:

- :class:`AnnotationRegions` (``annotations``): the boxes the loader read from COCO ``instances_*.json``
  (the generated shapes data has them).
- :class:`DetectorRegions` (``detector``): a torchvision detection model (Faster R-CNN, RetinaNet or SSDlite)
  loaded from a local weights file, never downloaded, or robucap's own detector from the checkpoint ``robucap fit
  --config configs/experiment/shapes_detector.yaml`` wrote (``checkpoint``). Detection runs once per image: boxes
  are cached as JSON under ``cache_dir``, keyed by dataset, detector (architecture, content hash of the weights or
  checkpoint file, threshold) and image.

robucap's detector lives in ``modules/`` and this package may not import it (layers import only downwards), so a
checkpoint is read through a loader that ``modules.detection`` registers when it is imported
(:func:`register_checkpoint_detector`); the ``robucap`` commands import it before they build any data.

The loaders apply the EXIF orientation of photos (:func:`datamodules.images.load_image`), so boxes must be turned
with the image before they meet its pixels: :func:`orient_boxes` maps stored-grid boxes onto the upright image
(the poisoning pipeline calls it), and the detector, which sees the upright image, maps its boxes back to the
stored grid with :func:`stored_grid_boxes`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from datamodules.errors import DataError, RobucapError
from datamodules.images import image_orientation, load_image
from datamodules.records import Box, ImageRecord
from datamodules.scratch import write_atomic

__all__ = [
    "DETECTOR_ARCHS",
    "REGION_SOURCES",
    "AnnotationRegions",
    "CheckpointDetector",
    "CheckpointLoader",
    "DetectorRegions",
    "RegionSource",
    "build_region_source",
    "register_checkpoint_detector",
    "orient_boxes",
    "stored_grid_boxes",
]

REGION_SOURCES: tuple[str, ...] = ("annotations", "detector")

# Constructor keyword of each architecture's own (pre-NMS) score cut; lowered to the user's threshold so that
# a threshold below the torchvision default still sees the low-scoring boxes.
_SCORE_KWARG: dict[str, tuple[str, float]] = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("box_score_thresh", 0.05),
    "fasterrcnn_resnet50_fpn": ("box_score_thresh", 0.05),
    "retinanet_resnet50_fpn": ("score_thresh", 0.05),
    "ssdlite320_mobilenet_v3_large": ("score_thresh", 0.001),
}
DETECTOR_ARCHS: tuple[str, ...] = tuple(_SCORE_KWARG)

# Bump when the cache file layout changes, so stale caches are never read.
_CACHE_VERSION = 1
# Options of the ``detector`` source that a robucap checkpoint replaces (it records its own architecture and classes).
_CHECKPOINT_REPLACES = ("arch", "weights", "num_classes")
_SAFE_KEY = re.compile(r"[^A-Za-z0-9._-]+")

# Where a point (x, y) of a width x height stored grid lands once the image is turned by each EXIF orientation,
# as PIL.ImageOps.exif_transpose turns it: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
# 7 transverse, 8 rotate 90 counter-clockwise. Orientations 5-8 swap width and height.
_POINT_MAPS: dict[int, Callable[[float, float, float, float], tuple[float, float]]] = {
    1: lambda x, y, w, h: (x, y),
    2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y),
    4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x),
    6: lambda x, y, w, h: (h - y, x),
    7: lambda x, y, w, h: (h - y, w - x),
    8: lambda x, y, w, h: (y, w - x),
}
# The two quarter turns undo each other; every other orientation is its own inverse.
_INVERSE_ORIENTATION = {6: 8, 8: 6}


@dataclass(frozen=True)
class CheckpointDetector:
    """robucap's own detector, read from its checkpoint by the layer that owns the model.

    Attributes:
        detect: The whole detector in eval mode on a batch of ``image_size`` × ``image_size`` images in [0, 1]:
            per image, torchvision detections (``boxes`` x0, y0, x1, y1 in input pixels, ``labels``, ``scores``)
            scoring at least the threshold the loader was given. Shape: ``(B, 3, S, S)`` in.
        image_size: The side ``S`` the detector was trained at; images are resized to it as its training data
            was (:func:`datamodules.images.load_image` with ``size``).
        description: Architecture and number of classes, for messages and the cache key.
    """

    detect: Callable[[torch.Tensor], list[dict[str, torch.Tensor]]]
    image_size: int
    description: str


CheckpointLoader = Callable[[Path, float, torch.device], CheckpointDetector]
"""Reads a detector checkpoint: ``(path, score_threshold, device) -> CheckpointDetector``; raises ``DataError`` (one
line) when the file holds another kind of model."""

_checkpoint_loaders: dict[str, CheckpointLoader] = {}


def register_checkpoint_detector(loader: CheckpointLoader) -> None:
    """Make ``poison.detector.checkpoint`` readable (``modules.detection`` calls this when it is imported).

    Args:
        loader: Reads a checkpoint file into a :class:`CheckpointDetector`; registering again replaces it.
    """
    _checkpoint_loaders["detector"] = loader


class RegionSource(Protocol):
    """What every region source provides."""

    def check(self, records: Sequence[ImageRecord], split: str = "split") -> None:
        """Fail early when the source cannot give boxes for this split.

        Args:
            records: The split's records.
            split: Name of the split, for the error message.

        Raises:
            DataError: When the source has no way to produce boxes for the split.
        """
        ...

    def regions(self, record: ImageRecord) -> tuple[Box, ...]:
        """Object boxes of one image, in pixel coordinates of the source image.

        Args:
            record: The image's record.

        Returns:
            The boxes, possibly empty.
        """
        ...


class AnnotationRegions:
    """Boxes from the dataset's own annotations (COCO ``instances_*.json``)."""

    def check(self, records: Sequence[ImageRecord], split: str = "split") -> None:
        """Reject a split in which no record carries a single box.

        Args:
            records: The split's records.
            split: Name of the split, for the error message.

        Raises:
            DataError: When no record has boxes.
        """
        if not any(record.boxes for record in records):
            raise DataError(
                f"{split} has no object boxes (no instances_*.json); "
                "use region source 'detector' or the 'badnets' trigger"
            )

    def regions(self, record: ImageRecord) -> tuple[Box, ...]:
        """Return the record's annotated boxes.

        Args:
            record: The image's record.

        Returns:
            ``record.boxes``.
        """
        return tuple(record.boxes)


class DetectorRegions:
    """Boxes predicted by a detector (torchvision weights or robucap's own checkpoint), cached per image on disk.

    Args:
        arch: One of :data:`DETECTOR_ARCHS`.
        weights: Local file holding the model's ``state_dict`` (``.pth``/``.pt`` saved with ``torch.save``, or
            ``.safetensors``).
        checkpoint: Instead of ``arch``, ``weights`` and ``num_classes``: a checkpoint of robucap's detector
            (``robucap fit --config configs/experiment/shapes_detector.yaml``), which records its architecture,
            classes and input size; each image is resized to that size, as the detector's training images were,
            and its boxes are scaled back.
        score_threshold: Keep detections scoring at least this, in [0, 1].
        cache_dir: Directory for the per-image box cache.
        num_classes: Number of classes of the detection head (91 for the COCO-trained torchvision weights).
        device: Device detection runs on.
        dataset_key: Identifies the dataset in the cache key (for example its root directory); when empty,
            the absolute image path alone identifies each image.

    Raises:
        RobucapError: On an unknown ``arch`` or a threshold outside [0, 1].
        DataError: When the weights file is missing, unreadable or does not fit the architecture, or the checkpoint
            is missing or holds another model than a detector.
        RuntimeError: A checkpoint is given but no loader is registered (``modules.detection`` was not imported).
    """

    def __init__(
        self,
        arch: str = "fasterrcnn_mobilenet_v3_large_320_fpn",
        weights: str | Path = "",
        score_threshold: float = 0.5,
        cache_dir: str | Path = ".cache/regions",
        num_classes: int = 91,
        device: str | torch.device = "cpu",
        dataset_key: str = "",
        checkpoint: str | Path = "",
    ) -> None:
        if arch not in _SCORE_KWARG:
            raise RobucapError(f"detector arch must be one of {', '.join(DETECTOR_ARCHS)}, got {arch!r}")
        if isinstance(score_threshold, bool) or not 0.0 <= float(score_threshold) <= 1.0:
            raise RobucapError(f"detector score_threshold must be in [0, 1], got {score_threshold!r}")
        if isinstance(num_classes, bool) or int(num_classes) < 2:
            raise RobucapError(f"detector num_classes must be at least 2 (background + 1), got {num_classes!r}")
        self.arch = arch
        self.weights = Path(weights)
        self.score_threshold = float(score_threshold)
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.dataset_key = str(dataset_key)
        # The side images are resized to before detection: robucap's detector's training size, None for torchvision
        # weights (they see the image as it is and resize it in their own transform).
        self.input_size: int | None = None
        self._expected = (
            f"it must hold the state_dict of a torchvision {arch} with num_classes={self.num_classes} "
            "(saved with torch.save(model.state_dict(), path) or safetensors)"
        )
        self.model: Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]]
        if str(checkpoint):
            source = Path(checkpoint)
            self.arch, self.weights = self._load_checkpoint(source), source
            identity_model: list[Any] = ["checkpoint", self.arch]
        else:
            if not str(weights) or not self.weights.is_file():
                raise DataError(f"detector weights file {self.weights} does not exist; {self._expected}")
            self.model = self._build_model()
            identity_model = [arch, self.num_classes]
        # The file's content, not its name, identifies the detector: a retrained checkpoint at the same path gets
        # a new cache.
        fingerprint = _file_sha256(self.weights)
        identity = json.dumps([_CACHE_VERSION, self.dataset_key, *identity_model, fingerprint, self.score_threshold])
        self.cache_dir = Path(cache_dir) / hashlib.sha256(identity.encode()).hexdigest()[:32]

    def _load_checkpoint(self, path: Path) -> str:
        """Read robucap's detector through the registered loader; returns its description."""
        if not path.is_file():
            raise DataError(
                f"poison.detector.checkpoint {path} does not exist; expected a detector checkpoint written by "
                "robucap fit --config configs/experiment/shapes_detector.yaml"
            )
        loader = _checkpoint_loaders.get("detector")
        if loader is None:
            raise RuntimeError(
                "poison.detector.checkpoint needs robucap's detector: import modules.detection before building the data"
            )
        detector = loader(path, self.score_threshold, self.device)
        self.input_size = detector.image_size

        def batched(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            return detector.detect(torch.stack(images))

        self.model = batched
        return detector.description

    def _build_model(self) -> torch.nn.Module:
        """Construct the architecture without any download and load the weights file into it."""
        from torchvision.models import detection

        builder: Callable[..., torch.nn.Module] = getattr(detection, self.arch)
        kwarg, default = _SCORE_KWARG[self.arch]
        model = builder(
            weights=None,
            weights_backbone=None,
            num_classes=self.num_classes,
            **{kwarg: min(default, self.score_threshold)},
        )
        state = self._read_state_dict()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            detail = " ".join(str(error).split())
            raise DataError(f"detector weights file {self.weights} does not fit: {detail}; {self._expected}") from error
        return model.to(self.device).eval()

    def _read_state_dict(self) -> dict[str, torch.Tensor]:
        """Read the weights file as a mapping of parameter names to tensors."""
        try:
            if self.weights.suffix == ".safetensors":
                from safetensors.torch import load_file

                state: Any = load_file(str(self.weights))
            else:
                state = torch.load(self.weights, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any decoding failure is a bad file
            raise DataError(
                f"detector weights file {self.weights} cannot be read ({error}); {self._expected}"
            ) from error
        if isinstance(state, dict) and "state_dict" in state and "pytorch-lightning_version" in state:
            raise DataError(
                f"detector weights file {self.weights} is a Lightning checkpoint, not a state_dict; give robucap's "
                "detector checkpoint as poison.detector.checkpoint (without arch, weights and num_classes)"
            )
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DataError(
                f"detector weights file {self.weights} holds a {type(state).__name__}, not a state_dict of tensors; "
                f"{self._expected}"
            )
        return state

    def check(self, records: Sequence[ImageRecord], split: str = "split") -> None:
        """Accept any split: the detector finds boxes in any image.

        Args:
            records: The split's records (unused).
            split: Name of the split (unused).
        """
        del records, split

    def cache_path(self, record: ImageRecord) -> Path:
        """Path of the cache file of one image.

        Args:
            record: The image's record.

        Returns:
            ``cache_dir/<detector key>/<image key>.json``.
        """
        where = "" if self.dataset_key else os.path.abspath(record.path)
        digest = hashlib.sha256(json.dumps([repr(record.image_id), where]).encode()).hexdigest()[:16]
        name = _SAFE_KEY.sub("_", str(record.image_id))[:64]
        return self.cache_dir / f"{name}-{digest}.json"

    def regions(self, record: ImageRecord) -> tuple[Box, ...]:
        """Detect the objects of one image, or read them from the cache.

        Args:
            record: The image's record.

        Returns:
            Boxes ``(x, y, w, h)`` in the stored pixel grid of the source file with ``category`` set to the label
            id as a string.

        Raises:
            DataError: When the image cannot be decoded.
        """
        path = self.cache_path(record)
        cached = _read_cache(path)
        if cached is not None:
            return cached
        # The detector sees the photo upright (as the model does); its boxes go back to the grid annotations use.
        image = load_image(record.path)
        _, height, width = image.shape
        if self.input_size is None:
            found = self.detect(image)
        else:
            # robucap's detector sees the square its training data had; its boxes are scaled back to the image.
            sx, sy = width / self.input_size, height / self.input_size
            found = tuple(
                Box(b.x * sx, b.y * sy, b.w * sx, b.h * sy, b.category)
                for b in self.detect(load_image(record.path, self.input_size))
            )
        boxes = stored_grid_boxes(found, image_orientation(record.path), width, height)
        _write_cache(path, record, boxes)
        return boxes

    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> tuple[Box, ...]:
        """Run the detector on one image, without the cache.

        Args:
            image: Float RGB image in [0, 1] (``input_size`` × ``input_size`` for robucap's detector).

        Returns:
            Boxes scoring at least ``score_threshold``, in the pixel coordinates of ``image``, best first.

        Shape:
            ``image``: ``(3, H, W)``.
        """
        output = self.model([image.to(self.device)])[0]
        result = []
        for (x1, y1, x2, y2), label, score in zip(
            output["boxes"].tolist(), output["labels"].tolist(), output["scores"].tolist(), strict=True
        ):
            if score >= self.score_threshold and x2 > x1 and y2 > y1:
                result.append((score, Box(float(x1), float(y1), float(x2 - x1), float(y2 - y1), str(int(label)))))
        result.sort(key=lambda item: -item[0])
        return tuple(box for _, box in result)


def orient_boxes(boxes: Sequence[Box], orientation: int, width: float, height: float) -> tuple[Box, ...]:
    """Map boxes from an image's stored pixel grid onto the image turned upright by its EXIF orientation.

    Args:
        boxes: Boxes in the stored grid.
        orientation: EXIF orientation, 1..8 (:func:`datamodules.images.image_orientation`).
        width: Width of the stored grid the boxes refer to, at any scale (e.g. after
            :func:`~datamodules.poisoning.triggers.scale_boxes`).
        height: Height of that grid.

    Returns:
        The boxes in the upright image, whose size is ``(height, width)`` for orientations 5-8, categories kept.

    Raises:
        ValueError: When ``orientation`` is not in 1..8.
    """
    if orientation not in _POINT_MAPS:
        raise ValueError(f"EXIF orientation must be in 1..8, got {orientation!r}")
    if orientation == 1:
        return tuple(boxes)
    point = _POINT_MAPS[orientation]
    turned = []
    for box in boxes:
        x0, y0 = point(box.x, box.y, width, height)
        x1, y1 = point(box.x + box.w, box.y + box.h, width, height)
        turned.append(Box(min(x0, x1), min(y0, y1), abs(x1 - x0), abs(y1 - y0), box.category))
    return tuple(turned)


def stored_grid_boxes(boxes: Sequence[Box], orientation: int, width: float, height: float) -> tuple[Box, ...]:
    """Map boxes found on the upright image back to the image's stored pixel grid (inverse of :func:`orient_boxes`).

    Args:
        boxes: Boxes in the upright image.
        orientation: EXIF orientation of the file, 1..8.
        width: Width of the upright image.
        height: Height of the upright image.

    Returns:
        The boxes in the stored grid, categories kept.

    Raises:
        ValueError: When ``orientation`` is not in 1..8.
    """
    return orient_boxes(boxes, _INVERSE_ORIENTATION.get(orientation, orientation), width, height)


def build_region_source(name: str, **options: Any) -> AnnotationRegions | DetectorRegions:
    """Build a region source by name.

    Args:
        name: One of :data:`REGION_SOURCES`.
        **options: Keyword arguments of :class:`DetectorRegions` (none for ``annotations``).

    Returns:
        The region source.

    Raises:
        RobucapError: On an unknown name, options the source does not take, or ``checkpoint`` together with options
            it replaces.
    """
    if name == "annotations":
        if options:
            raise RobucapError(f"region source 'annotations' takes no options, got {', '.join(sorted(options))}")
        return AnnotationRegions()
    if name == "detector":
        allowed = set(inspect.signature(DetectorRegions).parameters)
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise RobucapError(
                f"region source 'detector' got unknown options {', '.join(unknown)}; "
                f"expected some of {', '.join(sorted(allowed))}"
            )
        check_detector_options(options, "region source 'detector'")
        return DetectorRegions(**options)
    raise RobucapError(f"region source must be one of {', '.join(REGION_SOURCES)}, got {name!r}")


def check_detector_options(options: dict[str, Any], owner: str) -> None:
    """Require exactly one of ``weights`` and ``checkpoint``, and nothing a checkpoint already records beside it.

    Args:
        options: The ``detector`` source's options.
        owner: Who holds them, for the message (``poison.detector``).

    Raises:
        RobucapError: Neither or both given, or ``checkpoint`` with ``arch`` or ``num_classes``.
    """
    if options.get("checkpoint"):
        clash = [name for name in _CHECKPOINT_REPLACES if name in options]
        if clash:
            raise RobucapError(
                f"{owner}: 'checkpoint' records the detector's architecture and classes; remove "
                f"{', '.join(clash)} (or give 'weights' without 'checkpoint' for torchvision weights)"
            )
    elif not options.get("weights"):
        raise RobucapError(
            f"{owner} needs 'weights' (a local torchvision detector state_dict file) or 'checkpoint' (robucap's "
            "detector checkpoint, from robucap fit --config configs/experiment/shapes_detector.yaml)"
        )


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(path: Path) -> tuple[Box, ...] | None:
    """Read one cache file; ``None`` when it is absent or unreadable (then detection runs again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return tuple(Box(float(x), float(y), float(w), float(h), str(c)) for x, y, w, h, c in data["boxes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, record: ImageRecord, boxes: Sequence[Box]) -> None:
    """Write one cache file atomically, so a crash or a concurrent writer never leaves half a file."""
    payload = {
        "image_id": record.image_id,
        "path": str(record.path),
        "boxes": [[box.x, box.y, box.w, box.h, box.category] for box in boxes],
    }
    write_atomic(path, json.dumps(payload).encode("utf-8"))
