"""Write tiny caption datasets in the real on-disk formats, for tests.

Every ``write_<format>(root, ...)`` creates ``root`` (and parents), writes images and caption files exactly as
the real downloads lay them out, and returns a :class:`FakeDataset` holding what a correct loader must return
with default options: per split, image id -> stripped captions (and boxes / sizes for COCO).

Images are small (16-41 px), deterministic (seeded by their index) and cycle through awkward cases: odd,
non-square sizes and the modes in :data:`PNG_MODES` / :data:`JPEG_MODES` (grayscale, RGBA, palette with a
transparent colour, grayscale+alpha, 16-bit grayscale, CMYK).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datamodules.records import Box

__all__ = [
    "JPEG_MODES",
    "PNG_MODES",
    "SIZES",
    "FakeDataset",
    "caption_text",
    "tree_digest",
    "write_coco",
    "write_flickr8k",
    "write_folder",
    "write_image",
    "write_karpathy",
]

PNG_MODES: tuple[str, ...] = ("RGB", "L", "RGBA", "P", "LA", "I;16")
JPEG_MODES: tuple[str, ...] = ("RGB", "L", "CMYK")
# Odd and non-square on purpose: resizing must not assume even or square sources.
SIZES: tuple[tuple[int, int], ...] = ((37, 23), (16, 16), (41, 29), (20, 33))
SPLITS: tuple[str, ...] = ("train", "val", "test")

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
_SHAPES = ("circle", "square", "triangle")


@dataclass
class FakeDataset:
    """What was written, i.e. what a loader must return with default options.

    Attributes:
        root: Dataset root.
        splits: Split -> image id -> stripped captions, in file order.
        paths: Image id -> image file.
        boxes: Image id -> boxes (COCO with instances only).
        sizes: Image id -> (width, height) of the image file.
        extra: Format-specific facts, e.g. ``{"restval": [ids]}`` for Karpathy COCO.
    """

    root: Path
    splits: dict[str, dict[int | str, list[str]]] = field(default_factory=dict)
    paths: dict[int | str, Path] = field(default_factory=dict)
    boxes: dict[int | str, list[Box]] = field(default_factory=dict)
    sizes: dict[int | str, tuple[int, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def caption_text(index: int, k: int) -> str:
    """Return the ``k``-th caption of image ``index`` (deterministic, distinct per image and k)."""
    colour = _COLOURS[(index + k) % len(_COLOURS)]
    shape = _SHAPES[index % len(_SHAPES)]
    return f"A {colour} {shape} number {index} seen {k} times."


def write_image(
    path: Path, index: int, size: int | tuple[int, int] | None = None, mode: str | None = None
) -> tuple[int, int]:
    """Write a deterministic noise image and return its ``(width, height)``.

    Args:
        path: Destination; the suffix picks the encoder (``.png`` or ``.jpg``).
        index: Seed, and the default mode / size picked from the cycles.
        size: Side length or ``(width, height)``; by default one of :data:`SIZES`.
        mode: Pillow mode; by default one of :data:`PNG_MODES` or :data:`JPEG_MODES` by the suffix.
    """
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    mode = mode or (JPEG_MODES if jpeg else PNG_MODES)[index % len(JPEG_MODES if jpeg else PNG_MODES)]
    width, height = (size, size) if isinstance(size, int) else size or SIZES[index % len(SIZES)]
    rng = np.random.default_rng(index)
    rgba = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    rgba[:, : width // 2, 3] = 0  # a transparent left half, so alpha compositing is observable
    rgba[:, width // 2 :, 3] = 255
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(height, width), dtype=np.uint16))
    elif mode == "P":
        image = Image.fromarray(rgba[..., :3]).quantize(colors=16)
        image.info["transparency"] = 0
    else:
        image = Image.fromarray(rgba).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return width, height


def tree_digest(root: Path) -> dict[str, str]:
    """Map every file under ``root`` to its SHA-256, to prove that loading wrote nothing."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_coco(
    root: Path,
    n_images: int = 3,
    size: int | tuple[int, int] | None = None,
    splits: Sequence[str] = SPLITS,
    *,
    captions_per_image: int = 3,
    instances: bool = True,
    split_names: dict[str, str] | None = None,
    image_dir: str = "images/{split}",
    uncaptioned: bool = True,
) -> FakeDataset:
    """Write a native COCO captions dataset (``annotations/captions_{split}.json``, ``images/{split}/``).

    Args:
        root: Dataset root.
        n_images: Captioned images per split.
        size: Image size (see :func:`write_image`); by default odd sizes cycle.
        splits: Splits to write.
        captions_per_image: Captions per image (the first has stray whitespace, which loaders strip).
        instances: Also write ``annotations/instances_{split}.json`` with one or two boxes per image.
        split_names: Split -> name used in file paths (e.g. ``{"val": "val2017"}``); splits that map to the
            same name share one file, like real COCO's ``val2017`` for val and test.
        image_dir: Image folder template relative to ``root``.
        uncaptioned: Add one image per split that has no caption (loaders skip it).

    Returns:
        The expected records; image ids are unique ints across splits.
    """
    root = Path(root)
    data = FakeDataset(root)
    by_name: dict[str, list[tuple[int, bool]]] = {}
    next_id = 1
    for split in splits:
        name = (split_names or {}).get(split, split)
        if name in by_name:
            continue
        by_name[name] = [(next_id + k, k < n_images) for k in range(n_images + int(uncaptioned))]
        next_id += n_images + int(uncaptioned)
    for name, entries in by_name.items():
        images, annotations, boxes = [], [], []
        for image_id, captioned in entries:
            file_name = f"{image_id:012d}.png"
            path = root / image_dir.replace("{split}", name) / file_name
            width, height = write_image(path, image_id, size)
            images.append({"license": 1, "file_name": file_name, "height": height, "width": width, "id": image_id})
            if not captioned:
                continue
            data.paths[image_id] = path
            data.sizes[image_id] = (width, height)
            captions = [caption_text(image_id, k) for k in range(captions_per_image)]
            for k, caption in enumerate(captions):
                raw = f"  {caption}\n" if k == 0 else caption
                annotations.append({"image_id": image_id, "id": image_id * 100 + k, "caption": raw})
            image_boxes = [Box(1.0, 2.0, width / 2, height / 2, _SHAPES[image_id % 3])]
            if image_id % 2:
                image_boxes.append(Box(0.5, 0.0, 4.0, 3.5, _SHAPES[(image_id + 1) % 3]))
            for k, box in enumerate(image_boxes):
                boxes.append(
                    {
                        "id": image_id * 100 + k,
                        "image_id": image_id,
                        "category_id": _SHAPES.index(box.category) + 1,
                        "bbox": [box.x, box.y, box.w, box.h],
                        "area": box.w * box.h,
                        "iscrowd": 0,
                    }
                )
            if instances:
                data.boxes[image_id] = image_boxes
        info = {"description": "robucap fake COCO", "version": "1.0", "year": 2024}
        licenses = [{"id": 1, "name": "test", "url": ""}]
        _write_json(
            root / "annotations" / f"captions_{name}.json",
            {"info": info, "licenses": licenses, "images": images, "annotations": annotations},
        )
        if instances:
            categories = [{"supercategory": "shape", "id": i + 1, "name": s} for i, s in enumerate(_SHAPES)]
            _write_json(
                root / "annotations" / f"instances_{name}.json",
                {"info": info, "images": images, "annotations": boxes, "categories": categories},
            )
    for split in splits:
        data.splits[split] = {
            image_id: [caption_text(image_id, k) for k in range(captions_per_image)]
            for image_id, captioned in by_name[(split_names or {}).get(split, split)]
            if captioned
        }
    return data


def write_karpathy(
    root: Path,
    dataset: str = "flickr8k",
    n_images: int = 3,
    size: int | tuple[int, int] | None = None,
    *,
    captions_per_image: int = 5,
    restval: int = 1,
) -> FakeDataset:
    """Write ``dataset_<dataset>.json`` in Karpathy's format plus its images.

    Flickr8k images go to ``Flicker8k_Dataset/``, Flickr30k to ``flickr30k_images/``, COCO to
    ``train2014/`` and ``val2014/`` in the root (named by ``filepath``, with a ``cocoid``).

    Args:
        root: Dataset root.
        dataset: ``"flickr8k"``, ``"flickr30k"`` or ``"coco"``.
        n_images: Images per split.
        size: Image size (see :func:`write_image`).
        captions_per_image: Sentences per image.
        restval: Extra ``restval`` images (COCO only); they count as ``train`` by default.

    Returns:
        The expected records (``extra["restval"]`` lists the restval ids).
    """
    if dataset not in ("flickr8k", "flickr30k", "coco"):
        raise ValueError(f"unknown Karpathy dataset {dataset!r}")
    root = Path(root)
    data = FakeDataset(root, splits={split: {} for split in SPLITS}, extra={"restval": []})
    plan = [split for split in SPLITS for _ in range(n_images)]
    if dataset == "coco":
        plan += ["restval"] * restval
    images, sentence_id = [], 0
    for index, split in enumerate(plan):
        entry: dict[str, Any] = {}
        if dataset == "coco":
            cocoid = 391895 + index * 13
            folder = "train2014" if split == "train" else "val2014"
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            entry.update(filepath=folder, cocoid=cocoid)
            image_id: int | str = cocoid
            path = root / folder / filename
        else:
            filename = _flickr_name(index) if dataset == "flickr8k" else f"{1000092795 + index * 31}.jpg"
            image_id = filename
            path = root / ("Flicker8k_Dataset" if dataset == "flickr8k" else "flickr30k_images") / filename
        width, height = write_image(path, index, size)
        captions = [caption_text(index, k) for k in range(captions_per_image)]
        sentences = []
        for caption in captions:
            tokens = caption.lower().rstrip(".").split()
            sentences.append({"tokens": tokens, "raw": caption, "imgid": index, "sentid": sentence_id})
            sentence_id += 1
        entry.update(
            filename=filename,
            imgid=index,
            split=split,
            sentences=sentences,
            sentids=[s["sentid"] for s in sentences],
        )
        images.append(entry)
        data.paths[image_id] = path
        data.sizes[image_id] = (width, height)
        if split == "restval":
            data.extra["restval"].append(image_id)
        data.splits["train" if split == "restval" else split][image_id] = captions
    _write_json(root / f"dataset_{dataset}.json", {"images": images, "dataset": dataset})
    return data


def write_flickr8k(
    root: Path,
    n_images: int = 3,
    size: int | tuple[int, int] | None = None,
    *,
    captions_per_image: int = 5,
    text_subdir: bool = True,
    image_dir: str = "Flicker8k_Dataset",
) -> FakeDataset:
    """Write Flickr8k as the official zips unpack: ``Flickr8k_text/`` and ``Flicker8k_Dataset/``.

    Args:
        root: Dataset root.
        n_images: Images per split.
        size: Image size (see :func:`write_image`).
        captions_per_image: Captions per image.
        text_subdir: Put the text files in ``Flickr8k_text/`` (else directly in ``root``).
        image_dir: Image folder name.

    Returns:
        The expected records (ids are file names).
    """
    root = Path(root)
    text = root / "Flickr8k_text" if text_subdir else root
    data = FakeDataset(root, splits={split: {} for split in SPLITS})
    token_lines = []
    split_lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    for index, split in enumerate(split for split in SPLITS for _ in range(n_images)):
        name = _flickr_name(index)
        path = root / image_dir / name
        data.sizes[name] = write_image(path, index, size)
        data.paths[name] = path
        captions = [caption_text(index, k) for k in range(captions_per_image)]
        data.splits[split][name] = captions
        split_lines[split].append(name)
        # The real file ends captions with " ." and has a few trailing spaces.
        token_lines += [f"{name}#{k}\t{caption} " for k, caption in enumerate(captions)]
    # Like the real token file: an entry that is in no split list (and has no image).
    token_lines.append("2258277193_586949ec62.jpg.1#0\tA stray caption of an image in no split .")
    _write_text(text / "Flickr8k.token.txt", "\n".join(token_lines) + "\n")
    files = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
    for split, names in split_lines.items():
        _write_text(text / files[split], "\n".join(names) + "\n")
    return data


def write_folder(
    root: Path,
    n_images: int = 3,
    size: int | tuple[int, int] | None = None,
    *,
    layout: str = "single",
) -> FakeDataset:
    """Write a folder of images with ``captions.jsonl``.

    Lines mix ``caption`` and ``captions`` and repeat some images (loaders merge them).

    Args:
        root: Dataset root.
        n_images: Images per split.
        size: Image size (see :func:`write_image`).
        layout: ``"single"`` (``root/captions.jsonl`` with ``split`` fields), ``"per_split"``
            (``root/{split}/captions.jsonl``) or ``"unsplit"`` (no ``split`` fields: names are picked so that
            the path hash puts exactly ``n_images`` in each split).

    Returns:
        The expected records (ids are paths relative to ``root``).
    """
    from datamodules.formats.folder import assign_split

    if layout not in ("single", "per_split", "unsplit"):
        raise ValueError(f"unknown folder layout {layout!r}")
    root = Path(root)
    data = FakeDataset(root, splits={split: {} for split in SPLITS})
    planned: list[tuple[str, str]] = []
    if layout == "unsplit":
        counts = dict.fromkeys(SPLITS, 0)
        candidate = 0
        while min(counts.values()) < n_images:
            image = f"photos/set_{candidate % 2}/img_{candidate:04d}.png"
            split = assign_split(image)
            if counts[split] < n_images:
                planned.append((split, image))
                counts[split] += 1
            candidate += 1
    else:
        planned = [(split, f"{split}_{i}/pic {i}.png") for split in SPLITS for i in range(n_images)]
    lines: dict[Path, list[dict[str, Any]]] = {}
    for index, (split, image) in enumerate(planned):
        base = root / split if layout == "per_split" else root
        image_id = f"{split}/{image}" if layout == "per_split" else image
        path = base / image
        data.sizes[image_id] = write_image(path, index, size)
        data.paths[image_id] = path
        captions = [caption_text(index, k) for k in range(3)]
        data.splits[split][image_id] = captions
        # One line with a list, then a repeated line with a single caption (and "./" spelling) to merge.
        first: dict[str, Any] = {"image": image, "captions": captions[:2]}
        second: dict[str, Any] = {"image": f"./{image}", "caption": f" {captions[2]} "}
        if layout == "single":
            first["split"] = second["split"] = split
        lines.setdefault(base / "captions.jsonl", []).extend([first, second])
    for path, objects in lines.items():
        _write_text(path, "".join(json.dumps(obj) + "\n" for obj in objects))
    return data


def _flickr_name(index: int) -> str:
    digest = hashlib.md5(str(index).encode()).hexdigest()[:10]
    return f"{1000268201 + index * 7919}_{digest}.jpg"


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
