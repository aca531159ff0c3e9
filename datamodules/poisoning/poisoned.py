"""Poisoned splits: seeded choice of images, triggered copies in a cache outside the dataset, and a manifest.

Li et al. 2022 resizes every image to the model's input size and only then inserts the trigger, so the trigger
intensity (α, patch size) is what the model sees. The same happens here: each source image is decoded at the
data module's ``image_size``, its boxes are scaled to that size, the trigger is applied to the 8-bit image and
the result is written as a lossless PNG. Reading it back at ``image_size`` returns exactly those pixels.

Layout of the cache (``PoisonConfig.cache_dir``)::

    <cache_dir>/<key>/<split>/images/<image>.png
    <cache_dir>/<key>/<split>/manifest.json

``<key>`` hashes everything the images depend on (dataset, split records, image size, trigger and its options,
rate, target caption, seed, region source), so a changed setting never reads a stale image. The manifest
lists every poisoned image with its source file, trigger, regions, seed and the SHA-256 of its PNG; it is written
last, after all images, and a complete manifest is reused instead of poisoning again. On reuse every image is
checked against its checksum: a missing or changed file is written again (the same bytes) with a warning naming
it. Two builds with the same settings give byte-identical images and manifests.

Every file is written under a temporary name tagged with the writing process and then renamed into place;
temporaries left by a killed process are removed by the next use of the split. Files get the permissions an
ordinary ``open()`` gives (``0o666`` less the umask), so a cache shared by a group stays readable.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datamodules.errors import DataError, RobucapError
from datamodules.images import image_orientation, load_image_uint8
from datamodules.poisoning.config import PoisonConfig
from datamodules.poisoning.regions import RegionSource, build_region_source, orient_boxes
from datamodules.poisoning.triggers import ObjectNoise, Trigger, scale_boxes
from datamodules.progress import progress_bar
from datamodules.records import ImageRecord
from datamodules.scratch import write_atomic, writer_is_gone

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POISONED_PREFIX = "poisoned:"
# Bump when the cache layout or the poisoning procedure changes, so old caches are never reused.
_VERSION = 2  # 2: EXIF orientation applied to images and their boxes
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_TEMPORARY = re.compile(r"^\.(?P<tag>.+)\.[0-9a-f]{8}\.tmp$")
# A temporary lives while one file is written, so one this old belongs to no live writer, whichever host it is on.
_STALE_TEMPORARY_SECONDS = 3600


@dataclass(frozen=True)
class PoisonedSplit:
    """A split after poisoning.

    Attributes:
        records: The records to train or evaluate on; poisoned ones have ``poisoned=True``, the target caption as
            every reference and a path inside the cache.
        n_images: Images of the clean split.
        n_poisoned: Poisoned images in ``records``.
        n_skipped: Images the trigger could not act on (no usable object region); in the test split these have no
            poisoned copy, in training and validation another image was chosen instead.
        manifest: Path of the manifest.
    """

    records: list[ImageRecord]
    n_images: int
    n_poisoned: int
    n_skipped: int
    manifest: Path


def poisoned_image_id(image_id: int | str) -> str:
    """Id of the poisoned copy of a test image (distinct from every clean id).

    Args:
        image_id: The clean image's id.

    Returns:
        ``"poisoned:<image_id>"``.
    """
    return f"{POISONED_PREFIX}{image_id}"


def check_cache_outside(cache_dir: str | Path, dataset_root: str | Path) -> None:
    """Refuse a cache directory inside the dataset: the source dataset is never written.

    Args:
        cache_dir: The poison cache directory.
        dataset_root: The dataset root.

    Raises:
        RobucapError: When ``cache_dir`` is (or lies inside) ``dataset_root``.
    """
    cache = os.path.realpath(cache_dir)
    root = os.path.realpath(dataset_root)
    if os.path.commonpath([cache, root]) == root:
        raise RobucapError(
            f"poison.cache_dir {cache} lies inside the dataset root {root}; poisoned images must be written "
            "outside the dataset (the source dataset is never modified): choose another directory"
        )


def poison_split(
    records: Sequence[ImageRecord],
    split: str,
    config: PoisonConfig,
    image_size: int,
    dataset_root: str | Path,
    regions: RegionSource | None = None,
    progress: bool = False,
) -> PoisonedSplit:
    """Poison one split (or load it from the cache).

    ``train`` and ``val`` are poisoned by replacement at ``config.rate``; ``test`` keeps every clean image and
    gains a poisoned copy (id :func:`poisoned_image_id`) of each image the trigger can act on.

    Args:
        records: The clean split (after any ``limit_<split>``).
        split: ``train``, ``val`` or ``test``.
        config: The poisoning settings.
        image_size: Side of the model's input; the trigger is applied at this size.
        dataset_root: The dataset root, identifies the dataset and must not contain the cache.
        regions: Region source for object triggers; built from ``config`` when ``None``.
        progress: Show a progress bar while poisoning.

    Returns:
        The poisoned split.

    Raises:
        RobucapError: Cache inside the dataset, or an unknown split.
        DataError: An object trigger on a split with no boxes and no detector, or an unreadable source image.
    """
    if split not in ("train", "val", "test"):
        raise RobucapError(f"poison_split: split must be train, val or test, got {split!r}")
    check_cache_outside(config.cache_dir, dataset_root)
    records = list(records)
    if config.uses_regions and regions is None:
        regions = build_region_source(config.regions, **config.detector)
    if config.uses_regions:
        assert regions is not None
        _check_regions(regions, records, split, config)
    key = _cache_key(records, split, config, image_size, dataset_root, regions)
    out = Path(config.cache_dir) / key / split
    _remove_stale_temporaries(out)
    manifest = _read_manifest(out)
    if manifest is not None:
        manifest = _verified(manifest, records, split, config, image_size, regions, out)
    if manifest is None:
        manifest = _build(records, split, config, image_size, regions, out, progress)
    return _apply_manifest(records, split, config, manifest, out)


def _check_regions(regions: RegionSource, records: list[ImageRecord], split: str, config: PoisonConfig) -> None:
    try:
        regions.check(records, split)
    except DataError as error:
        raise DataError(
            f"poison.trigger {config.trigger!r} acts inside object boxes, but {error}. Give boxes (COCO "
            "instances_*.json), or set poison.regions: detector with poison.detector.weights, or use "
            "poison.trigger: badnets"
        ) from None


def _region_identity(regions: RegionSource | None) -> str:
    if regions is None:
        return ""
    cache_dir = getattr(regions, "cache_dir", None)
    # A detector's cache directory name already hashes its architecture, weights file and threshold.
    return f"{type(regions).__name__}:{Path(cache_dir).name if cache_dir else ''}"


def _cache_key(
    records: list[ImageRecord],
    split: str,
    config: PoisonConfig,
    image_size: int,
    dataset_root: str | Path,
    regions: RegionSource | None,
) -> str:
    content = hashlib.sha256()
    for record in records:
        content.update(json.dumps([repr(record.image_id), str(record.path), list(record.captions)]).encode())
        content.update(json.dumps([[b.x, b.y, b.w, b.h] for b in record.boxes]).encode())
    identity = json.dumps(
        [
            _VERSION,
            os.path.realpath(dataset_root),
            split,
            image_size,
            config.trigger,
            config.trigger_options(),
            config.rate,
            config.target_caption,
            config.seed,
            _region_identity(regions),
            content.hexdigest(),
        ]
    )
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def _order(n: int, seed: int, split: str) -> list[int]:
    """Seeded visiting order of a split's images (independent per split)."""
    split_salt = int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")
    return np.random.default_rng([int(seed), split_salt]).permutation(n).tolist()


def _target_boxes(record: ImageRecord, regions: RegionSource | None, image_size: int) -> tuple:
    if regions is None:
        return ()
    boxes = regions.regions(record)
    if not boxes:
        return ()
    width, height = record.width, record.height
    if width <= 0 or height <= 0:
        try:
            with Image.open(record.path) as image:
                width, height = image.size
        except OSError as error:
            raise DataError(f"{record.path} is not a readable image: {error}") from error
    # The loaded image is upright (EXIF orientation applied); boxes refer to the stored grid, so they turn with it.
    # Turning the image_size square after scaling equals scaling the turned image: the resize keeps no aspect.
    scaled = scale_boxes(boxes, width, height, image_size, image_size)
    return orient_boxes(scaled, image_orientation(record.path), image_size, image_size)


def _file_name(index: int, image_id: int | str) -> str:
    # The index keeps names unique when two ids sanitise to the same string.
    return f"{index:06d}-{_SAFE.sub('_', str(image_id))[:64]}.png"


def _build(
    records: list[ImageRecord],
    split: str,
    config: PoisonConfig,
    image_size: int,
    regions: RegionSource | None,
    out: Path,
    progress: bool,
) -> dict[str, Any]:
    trigger = config.build_trigger()
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    if split == "test":
        order, wanted = list(range(len(records))), len(records)
    else:
        order, wanted = _order(len(records), config.seed, split), round(config.rate * len(records))
    items: list[dict[str, Any]] = []
    skipped = 0
    # progress_bar ends the bar's line before a decoding error propagates, so its message starts a line.
    with progress_bar(total=wanted, desc=f"poisoning {split}", disable=not progress, leave=False) as bar:
        for index in order:
            if len(items) >= wanted:
                break
            record = records[index]
            item = _poison_one(record, index, trigger, config, image_size, regions, images_dir)
            if item is None:
                skipped += 1
                continue
            items.append(item)
            bar.update(1)
    if split != "test" and len(items) < wanted:
        log.warning(
            "poisoning %s: only %d of %d images have a usable object region, so %d instead of %d are poisoned",
            split,
            len(items),
            len(records),
            len(items),
            wanted,
        )
    manifest = {
        "version": _VERSION,
        "split": split,
        "trigger": config.trigger,
        "trigger_options": config.trigger_options(),
        "rate": config.rate if split != "test" else 1.0,
        "target_caption": config.target_caption,
        "seed": config.seed,
        "image_size": image_size,
        "region_source": config.regions if config.uses_regions else None,
        "n_images": len(records),
        "n_poisoned": len(items),
        "n_skipped": skipped,
        # Sorted by source index so the manifest reads in dataset order, whatever order images were visited in.
        "items": sorted(items, key=lambda item: item["index"]),
    }
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def _poison_one(
    record: ImageRecord,
    index: int,
    trigger: Trigger,
    config: PoisonConfig,
    image_size: int,
    regions: RegionSource | None,
    images_dir: Path,
) -> dict[str, Any] | None:
    boxes = _target_boxes(record, regions, image_size) if config.uses_regions else ()
    clean = load_image_uint8(record.path, image_size)
    poisoned, used = trigger.apply(clean, boxes, seed=config.seed, key=record.image_id)
    if not used:
        return None
    name = _file_name(index, record.image_id)
    png = _png_bytes(poisoned)
    write_atomic(images_dir / name, png)
    used_regions = (
        [list(r) for r in trigger.regions(boxes, image_size, image_size)] if isinstance(trigger, ObjectNoise) else []
    )
    return {
        "index": index,
        "image_id": record.image_id,
        "source": str(record.path),
        "output": f"images/{name}",
        "regions": used_regions,
        "boxes": [[round(b.x, 3), round(b.y, 3), round(b.w, 3), round(b.h, 3)] for b in boxes],
        "key": str(record.image_id),
        "sha256": hashlib.sha256(png).hexdigest(),
    }


def _png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    # Fixed settings and no metadata, so the same pixels always give the same bytes.
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporaries that killed writers left in a split's cache directory.

    A temporary is stale when its tag names a process of this host that is gone, when it is older than an hour
    (it lives only while one file is written), or when it has no tag (older robucap versions did not tag them).
    A concurrent writer's temporaries are kept.
    """
    for directory in (out, out / "images"):
        if not directory.is_dir():
            continue
        for path in directory.glob(".*.tmp"):
            match = _TEMPORARY.match(path.name)
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # its writer renamed or removed it meanwhile
            if match is None or writer_is_gone(match["tag"]) or age > _STALE_TEMPORARY_SECONDS:
                log.info("removing %s, left by a killed poisoning run", path)
                path.unlink(missing_ok=True)


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _valid_item(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("index"), int)
        and isinstance(item.get("output"), str)
        and isinstance(item.get("sha256"), str)
    )


def _read_manifest(out: Path) -> dict[str, Any] | None:
    """A complete manifest of this version with a checksum per image, else ``None`` (then the split is poisoned
    again)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("poison cache: %s is unreadable (%s); poisoning the split again", out / MANIFEST, error)
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != _VERSION:
        return None
    items = manifest.get("items")
    if not isinstance(items, list) or not all(_valid_item(item) for item in items):
        # Manifests of older robucap versions have no checksums: their images cannot be trusted as they are.
        log.warning("poison cache: %s has no checksums or is malformed; poisoning the split again", out / MANIFEST)
        return None
    return manifest


def _verified(
    manifest: dict[str, Any],
    records: list[ImageRecord],
    split: str,
    config: PoisonConfig,
    image_size: int,
    regions: RegionSource | None,
    out: Path,
) -> dict[str, Any] | None:
    """Check every cached image against its checksum and write missing or changed ones again.

    Poisoning is deterministic, so an image written again has the recorded bytes; when it does not (or its
    manifest entry does not match the records), ``None`` is returned and the whole split is poisoned again.
    """
    bad = [item for item in manifest["items"] if _file_sha256(out / item["output"]) != item["sha256"]]
    if not bad:
        return manifest
    trigger = config.build_trigger()
    for item in bad:
        path = out / item["output"]
        problem = "is missing" if not path.exists() else "does not match the checksum in its manifest"
        log.warning("poison cache: %s %s; writing it again", path, problem)
        index = item["index"]
        again = (
            _poison_one(records[index], index, trigger, config, image_size, regions, out / "images")
            if 0 <= index < len(records)
            else None
        )
        if again != item:
            log.warning("poison cache: %s came out differently when written again; poisoning %s again", path, split)
            return None
    return manifest


def _apply_manifest(
    records: list[ImageRecord], split: str, config: PoisonConfig, manifest: dict[str, Any], out: Path
) -> PoisonedSplit:
    def poisoned(record: ImageRecord, item: dict[str, Any], image_id: int | str) -> ImageRecord:
        n_refs = len(record.captions) if split != "test" else 1
        return replace(
            record,
            image_id=image_id,
            path=(out / item["output"]).resolve(),
            captions=(config.target_caption,) * n_refs,
            boxes=(),
            width=int(manifest["image_size"]),
            height=int(manifest["image_size"]),
            poisoned=True,
        )

    by_index = {int(item["index"]): item for item in manifest["items"]}
    if split == "test":
        result = list(records) + [
            poisoned(records[i], by_index[i], poisoned_image_id(records[i].image_id)) for i in sorted(by_index)
        ]
    else:
        result = [poisoned(r, by_index[i], r.image_id) if i in by_index else r for i, r in enumerate(records)]
    return PoisonedSplit(
        records=result,
        n_images=len(records),
        n_poisoned=len(by_index),
        n_skipped=int(manifest["n_skipped"]),
        manifest=out / MANIFEST,
    )
