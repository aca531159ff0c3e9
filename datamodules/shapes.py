"""The built-in procedural "shapes" captioning dataset, written in the COCO layout.

Every image shows one to three flat coloured shapes on a light, low-contrast textured background. Each
object is a (size, colour, shape) triple drawn from a small closed set, and the captions name all of them
together with their relative positions, e.g. ``"a large red circle to the left of a small blue square"``.
The vocabulary is deliberately tiny (see :func:`shapes_vocabulary`) so that a captioner with a hidden
size of 64 learns the task in minutes on a CPU.

Layout written under ``out``::

    images/{train,val,test}/{image_id:06d}.png    RGB, image_size x image_size
    annotations/captions_{split}.json             COCO captions
    annotations/instances_{split}.json            COCO instances: exact boxes and polygons per object
    meta.json                                     config, format version, vocabulary

Caption ``#0`` of every image is canonical (objects left to right, one template per object count);
captions ``#1..`` are seeded paraphrases. Every image is drawn by its own random generator, seeded by
``(seed, split, index within the split)``: images do not depend on one another, the val and test images do not
change with ``n_train``, and two runs with the same config write byte-identical files.

A dataset directory is written once, by one atomic rename of a finished scratch directory, and never rewritten
or deleted afterwards: asking for other settings in a directory that holds a dataset is refused with a message
naming each differing setting (see :func:`generate_shapes`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from datamodules.errors import DataError, RobucapError
from datamodules.scratch import scratch_tag, writer_is_gone

log = logging.getLogger(__name__)

__all__ = [
    "COLORS",
    "FORMAT_VERSION",
    "SHAPE_KINDS",
    "SIZES",
    "SPLITS",
    "ShapesConfig",
    "ShapesFlags",
    "generate_shapes",
    "shapes_ready",
    "shapes_vocabulary",
]

FORMAT_VERSION = 1
"""Bumped whenever the files written for a given config change; a dataset of another version is refused."""

SPLITS: tuple[str, ...] = ("train", "val", "test")

SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
"""Shape names; category ids in ``instances_*.json`` are the 1-based positions in this tuple."""

COLORS: dict[str, tuple[int, int, int]] = {
    # Hues roughly 60 degrees apart, all saturated: every colour has one channel <= 50, while the
    # background never goes below ~160 in any channel, so an object's pixels are never confused with it.
    "red": (220, 30, 30),
    "yellow": (235, 205, 20),
    "green": (30, 165, 45),
    "cyan": (20, 185, 205),
    "blue": (35, 65, 220),
    "purple": (150, 45, 200),
}

SIZES: dict[str, tuple[float, float]] = {
    # Extent of the object's bounding square as a fraction of image_size (uniform in the range): at
    # 64 px a small object spans ~12 px and a large one ~25 px, so the two never look alike.
    "small": (0.17, 0.21),
    "large": (0.36, 0.42),
}
# Floors in pixels so that tiny images still draw recognisable shapes and keep the two sizes apart.
_MIN_EXTENT = {"small": 4.0, "large": 7.0}

_CIRCLE_VERTICES = 32
_LAYOUT_TRIES = 50
_MAX_ATTRIBUTE_DRAWS = 1_000
_CANDIDATES = 32


@dataclass
class ShapesConfig:
    """What :func:`generate_shapes` writes. Validated on construction and again before generation."""

    n_train: int = 6000
    """Training images (at least 1)."""
    n_val: int = 1000
    """Validation images (0 or more)."""
    n_test: int = 1000
    """Test images (0 or more)."""
    image_size: int = 64
    """Width and height of every image in pixels (16 to 1024); object sizes scale with it."""
    seed: int = 0
    """Seed of the whole dataset (0 or more); image ``i`` of a split uses a generator seeded by ``(seed, split, i)``."""
    min_objects: int = 1
    """Fewest objects in one image (1 to 3)."""
    max_objects: int = 3
    """Most objects in one image (min_objects to 3)."""
    captions_per_image: int = 5
    """Reference captions per image (at least 1); caption #0 is the canonical one."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field.

        Raises:
            RobucapError: A field is not an integer or lies outside its allowed range; the message names
                the field and the range.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            # bool is an int subclass; "n_val: true" in a YAML file is a mistake, not 1.
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise RobucapError(f"ShapesConfig.{f.name} must be an integer, got {value!r}")
            if isinstance(value, np.integer):
                setattr(self, f.name, int(value))  # numpy ints (from sweeps) would not serialise to meta.json
        _check_range("n_train", self.n_train, 1, None)
        _check_range("n_val", self.n_val, 0, None)
        _check_range("n_test", self.n_test, 0, None)
        _check_range("image_size", self.image_size, 16, 1024)
        _check_range("seed", self.seed, 0, None)
        _check_range("min_objects", self.min_objects, 1, 3)
        _check_range("max_objects", self.max_objects, self.min_objects, 3, low_name="min_objects")
        _check_range("captions_per_image", self.captions_per_image, 1, None)

    def split_sizes(self) -> dict[str, int]:
        """Number of images per split, in :data:`SPLITS` order."""
        return {"train": int(self.n_train), "val": int(self.n_val), "test": int(self.n_test)}


def _check_range(name: str, value: int, low: int, high: int | None, low_name: str | None = None) -> None:
    if value >= low and (high is None or value <= high):
        return
    low_text = f"{low_name} ({low})" if low_name else str(low)
    expected = f"between {low_text} and {high}" if high is not None else f">= {low_text}"
    raise RobucapError(f"ShapesConfig.{name} must be {expected}, got {value}")


# --------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Object:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    extent: float

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


def _polygon(shape: str, cx: float, cy: float, d: float) -> np.ndarray:
    """Outline of a shape centred on (cx, cy) that fits a d x d square, as a (V, 2) array of x, y."""
    h = d / 2
    if shape == "circle":
        # Offset by half a step so the extremes are flat edges, not vertices that rasterise as 1-pixel nubs.
        t = (np.arange(_CIRCLE_VERTICES) + 0.5) * (2 * math.pi / _CIRCLE_VERTICES)
        pts = np.stack([cx + h * np.cos(t), cy + h * np.sin(t)], axis=1)
    elif shape == "square":
        # A little smaller than the extent so its area is close to the circle's: size stays a fair cue.
        s = 0.9 * h
        pts = np.array([[cx - s, cy - s], [cx + s, cy - s], [cx + s, cy + s], [cx - s, cy + s]])
    elif shape == "triangle":
        pts = np.array([[cx, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    elif shape == "diamond":
        pts = np.array([[cx, cy - h], [cx + h, cy], [cx, cy + h], [cx - h, cy]])
    elif shape == "cross":
        a = h / 3  # arm half-thickness: arms a third of the extent wide stay visible on small crosses
        pts = np.array(
            [
                [cx - a, cy - h], [cx + a, cy - h], [cx + a, cy - a], [cx + h, cy - a],
                [cx + h, cy + a], [cx + a, cy + a], [cx + a, cy + h], [cx - a, cy + h],
                [cx - a, cy + a], [cx - h, cy + a], [cx - h, cy - a], [cx - a, cy - a],
            ]
        )  # fmt: skip
    else:  # pragma: no cover - SHAPE_KINDS is closed
        raise ValueError(shape)
    # Rasterise the rounded vertices, i.e. exactly the polygon that goes into the json.
    return np.round(pts, 2)


def _rasterise(poly: np.ndarray, image_size: int) -> tuple[np.ndarray, int, int]:
    """Pixels whose centre lies inside ``poly`` (even-odd rule), as a local mask and its top-left corner.

    Pixel (i, j) covers [i, i+1) x [j, j+1), the COCO convention, so its centre is (i + 0.5, j + 0.5).
    Doing this by hand rather than with ImageDraw makes the drawn pixels, the box and the polygon agree
    exactly: PIL's polygon fill uses its own, edge-inclusive convention.
    """
    x0 = max(int(math.floor(poly[:, 0].min())), 0)
    y0 = max(int(math.floor(poly[:, 1].min())), 0)
    x1 = min(int(math.ceil(poly[:, 0].max())), image_size)
    y1 = min(int(math.ceil(poly[:, 1].max())), image_size)
    px = np.arange(x0, x1, dtype=np.float64)[None, :, None] + 0.5
    py = np.arange(y0, y1, dtype=np.float64)[:, None, None] + 0.5
    ax, ay = poly[:, 0], poly[:, 1]
    nxt = np.r_[1 : len(poly), 0]
    bx, by = ax[nxt], ay[nxt]
    crosses = (ay > py) != (by > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = ax + (py - ay) * (bx - ax) / (by - ay)
    inside = np.logical_and(crosses, px < x_at).sum(axis=-1) % 2 == 1
    return inside, x0, y0


@functools.lru_cache(maxsize=4)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy.flags.writeable = xx.flags.writeable = False  # shared between images: must never be modified in place
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light, low-saturation texture (smooth noise, stripes or a gradient) as float (H, W, 3)."""
    base = rng.uniform(200.0, 232.0) + rng.uniform(-8.0, 8.0, size=3)
    yy, xx = _unit_grid(size)
    kind = int(rng.integers(3))
    if kind == 0:
        cells = int(rng.integers(3, 7))
        grid = rng.standard_normal((cells, cells)).astype(np.float32)
        field = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR), np.float64)
        field /= max(float(np.abs(field).max()), 1e-6)
        texture = rng.uniform(8.0, 16.0) * field
    elif kind == 1:
        angle = rng.uniform(0.0, math.pi)
        freq = rng.uniform(2.0, 6.0)
        phase = rng.uniform(0.0, 2 * math.pi)
        texture = rng.uniform(5.0, 10.0) * np.sin(
            2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase
        )
    else:
        angle = rng.uniform(0.0, 2 * math.pi)
        ramp = xx * math.cos(angle) + yy * math.sin(angle)
        ramp = ramp - ramp.mean()
        texture = rng.uniform(20.0, 36.0) * ramp
    grain = rng.uniform(-2.0, 2.0, size=(size, size))
    return base[None, None, :] + (texture + grain)[:, :, None]


def _layout(rng: np.random.Generator, config: ShapesConfig) -> list[_Object]:
    """Sample the objects of one image: distinct descriptions, non-overlapping boxes, clear left-right order."""
    s = config.image_size
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    gap = max(1.0, s / 32)  # free pixels between boxes, so every box holds exactly one object
    min_dx = max(2.0, 0.12 * s)  # centres this far apart horizontally, so "left of" is always visible
    for _ in range(_MAX_ATTRIBUTE_DRAWS):
        attrs: list[tuple[str, str, str]] = []
        while len(attrs) < n:
            # Identical descriptions would make captions like "a red circle next to a red circle" ambiguous.
            a = (
                SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))],
                list(COLORS)[int(rng.integers(len(COLORS)))],
                list(SIZES)[int(rng.integers(len(SIZES)))],
            )
            if a not in attrs:
                attrs.append(a)
        extents = [max(_MIN_EXTENT[size], s * rng.uniform(*SIZES[size])) for _, _, size in attrs]
        for _ in range(_LAYOUT_TRIES):
            placed: list[tuple[float, float, float]] = []
            for d in extents:
                # A batch of candidate centres per draw: one vectorised test instead of a Python loop per try.
                cand = rng.uniform(d / 2, s - d / 2, size=(_CANDIDATES, 2))
                ok = np.ones(_CANDIDATES, dtype=bool)
                for px, py, pd in placed:
                    apart = (d + pd) / 2 + gap
                    ok &= (np.abs(cand[:, 0] - px) >= apart) | (np.abs(cand[:, 1] - py) >= apart)
                    ok &= np.abs(cand[:, 0] - px) >= min_dx
                hits = np.flatnonzero(ok)
                if hits.size == 0:
                    break  # this partial layout leaves no room: start the layout again
                cx, cy = cand[hits[0]]
                placed.append((float(cx), float(cy), d))
            if len(placed) == n:
                objects = [
                    _Object(shape=sh, color=co, size=si, cx=cx, cy=cy, extent=d)
                    for (sh, co, si), (cx, cy, d) in zip(attrs, placed, strict=True)
                ]
                return sorted(objects, key=lambda o: o.cx)
        # Three large objects barely fit in the smallest images: draw new attributes (sizes) rather than fail.
    raise RuntimeError(f"could not place {n} shapes in a {s}px image")  # pragma: no cover - never seen


# --------------------------------------------------------------------------------------------- captions


def _where(o: _Object, image_size: int) -> str:
    """Coarse position of one object in a 3 x 3 grid, e.g. "in the top left" or "on the right"."""
    col = min(int(3 * o.cx / image_size), 2)
    row = min(int(3 * o.cy / image_size), 2)
    h = ("left", "", "right")[col]
    v = ("top", "", "bottom")[row]
    if h and v:
        return f"in the {v} {h}"
    if h:
        return f"on the {h}"
    if v:
        return f"at the {v}"
    return "in the middle"


def _captions(objects: Sequence[_Object], rng: np.random.Generator, config: ShapesConfig) -> list[str]:
    """Caption #0 canonical, the rest paraphrases drawn without replacement (then cycled) from a pool."""
    p = [o.phrase for o in objects]  # left to right
    n = len(objects)
    if n == 1:
        (a,) = p
        canonical = a
        pool = [
            f"there is {a}",
            f"{a} {_where(objects[0], config.image_size)}",
            f"the image shows {a}",
            f"a picture of {a}",
            f"only one shape {a}",
            f"there is one shape {a}",
        ]
    elif n == 2:
        a, b = p
        canonical = f"{a} to the left of {b}"
        pool = [
            f"there are two shapes {a} and {b}",
            f"two shapes {b} and {a}",
            f"{a} next to {b}",
            f"{b} next to {a}",
            f"the image shows {a} and {b}",
        ]
        if abs(objects[0].cy - objects[1].cy) > abs(objects[0].cx - objects[1].cx):
            top, bottom = (a, b) if objects[0].cy < objects[1].cy else (b, a)
            pool += [f"{top} above {bottom}", f"{bottom} below {top}", f"{bottom} is below {top}"]
        else:
            pool += [f"{b} to the right of {a}", f"{b} is to the right of {a}", f"{a} is to the left of {b}"]
    else:
        a, b, c = p
        shuffled = [p[i] for i in rng.permutation(3)]
        canonical = f"three shapes from left to right {a} {b} and {c}"
        pool = [
            f"there are three shapes {a} {b} and {c}",
            f"{a} {b} and {c}",
            f"from right to left {c} {b} and {a}",
            f"three shapes {shuffled[0]} {shuffled[1]} and {shuffled[2]}",
            f"{a} on the left {b} in the middle and {c} on the right",
            f"the image shows {a} {b} and {c}",
            f"{a} to the left of {b} and {c}",
        ]
    order = rng.permutation(len(pool))
    return [canonical] + [pool[int(order[i % len(pool)])] for i in range(config.captions_per_image - 1)]


def shapes_vocabulary() -> list[str]:
    """Every word any shapes caption can contain, sorted.

    Returns:
        The closed vocabulary of the generator (42 words with the default shapes, colours and sizes).
    """
    words = set(SHAPE_KINDS) | set(COLORS) | set(SIZES)
    templates = (
        "a there is the image shows picture of only one shape in top bottom left right at on middle "
        "to next and two three shapes above below are from"
    )
    words |= set(templates.split())
    return sorted(words)


# --------------------------------------------------------------------------------------------- rendering


def _render(config: ShapesConfig, split: str, index: int, path: Path) -> dict[str, Any]:
    """Draw and save image ``index`` of ``split``; return its captions and instance annotations (without ids)."""
    # Seeded by the position within the split, not the global image id: the val and test images then stay
    # the same when only n_train changes, so studies over the training-set size share one test set.
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    s = config.image_size
    canvas = _background(rng, s)
    objects = _layout(rng, config)
    instances = []
    for o in objects:
        poly = _polygon(o.shape, o.cx, o.cy, o.extent)
        mask, x0, y0 = _rasterise(poly, s)
        ys, xs = np.nonzero(mask)
        canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = COLORS[o.color]
        instances.append(
            {
                "category_id": SHAPE_KINDS.index(o.shape) + 1,
                "bbox": [
                    x0 + int(xs.min()),
                    y0 + int(ys.min()),
                    int(xs.max() - xs.min()) + 1,
                    int(ys.max() - ys.min()) + 1,
                ],
                "area": int(mask.sum()),
                "segmentation": [[float(v) for v in poly.reshape(-1)]],
                "iscrowd": 0,
                "attributes": {"color": o.color, "size": o.size},
            }
        )
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)  # 2.5x faster than 6, 15% larger
    return {"captions": _captions(objects, rng, config), "instances": instances}


# --------------------------------------------------------------------------------------------- files

_OWN_ENTRIES = frozenset({"images", "annotations", "meta.json", "meta.json.tmp"})
"""What generate_shapes writes (``meta.json.tmp``: left by an interrupted generation of older versions)."""


@dataclass(frozen=True)
class ShapesFlags:
    """How the user of a command sets the output directory and each :class:`ShapesConfig` field.

    Only used to word refusals, so that they say exactly what to pass.

    Attributes:
        out: The option that chooses the directory, e.g. ``--data.root``; empty for the Python API.
        fields: :class:`ShapesConfig` field name -> option, e.g. ``{"seed": "--data.shapes.seed"}``; a field
            without an option is shown as ``name=value``.
    """

    out: str = ""
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _read_meta(out: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("name") == "shapes" else None


def _annotations_present(out: Path) -> bool:
    return all(
        (out / "annotations" / f"{kind}_{split}.json").is_file()
        for kind in ("captions", "instances")
        for split in SPLITS
    )


def _settings(values: Mapping[str, Any], names: Sequence[str]) -> str:
    return ", ".join(f"{name}={values.get(name, 'unset')}" for name in names)


def _check_existing(out: Path, config: ShapesConfig, flags: ShapesFlags) -> bool:
    """Whether ``out`` already holds the wanted dataset; refuse every directory that cannot be used as it is.

    Returns:
        True when ``out`` holds a complete shapes dataset made with ``config`` (files of the user's next to it
        do not matter, they are not touched); False when ``out`` is absent or an empty directory.

    Raises:
        DataError: ``out`` is a file; a non-empty directory that is not a shapes dataset; an incomplete shapes
            dataset or one of another format version; or a shapes dataset made with other settings. The message
            names ``out`` and, for other settings, each differing setting with both values.
    """
    if not os.path.lexists(out):
        return False
    if not out.is_dir():
        raise DataError(f"shapes output {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return False
    another = f"choose another {flags.out}" if flags.out else "choose another directory"
    meta = _read_meta(out)
    if meta is None:
        others = [name for name in entries if name not in _OWN_ENTRIES]
        if others:
            raise DataError(
                f"shapes output {out} is not empty and is not a shapes dataset (it contains {', '.join(others[:5])})"
                f"; nothing in it is written or deleted: {another} (an empty or new one)"
            )
        raise DataError(
            f"shapes output {out} is not empty and is not a shapes dataset (it has no shapes meta.json; an older "
            f"robucap leaves this after an interrupted generation): delete it to generate the data there, or {another}"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{out} holds a shapes dataset of format {version}, but this robucap writes format {FORMAT_VERSION}: "
            f"delete it to generate the data again, or {another}"
        )
    recorded = meta.get("config")
    if meta.get("complete") is not True or not isinstance(recorded, dict) or not _annotations_present(out):
        raise DataError(
            f"{out} holds an incomplete shapes dataset (an older robucap leaves this after an interrupted "
            f"generation): delete it to generate the data again, or {another}"
        )
    wanted = asdict(config)
    differing = [name for name in wanted if recorded.get(name) != wanted[name]]
    if not differing:
        return True
    if all(name in flags.fields for name in differing):
        use = "pass " + " ".join(f"{flags.fields[name]} {recorded.get(name)}" for name in differing) + " to use it"
    else:
        use = f"ask for {_settings(recorded, differing)} to use it"
    raise DataError(
        f"{out} holds a shapes dataset made with {_settings(recorded, differing)}; this run asks for "
        f"{_settings(wanted, differing)}: {use}, or {another}; an existing dataset is never rewritten"
    )


_SCRATCH = ".{name}.partial.{tag}.{token}"
"""Name of the directory a generation writes into, next to ``out``, before renaming it to ``out``."""


def _scratch_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.partial\.(?P<tag>.+)\.(?P<token>[0-9a-f]{{8}})$")


def _remove_stale_scratch(target: Path) -> None:
    """Delete scratch directories of earlier generations of ``target`` whose process was killed.

    Scratch of a live process (a concurrent first use) is kept, and so is scratch written on another host,
    whose process cannot be checked from here: the next generation on that host removes it.
    """
    pattern = _scratch_pattern(target.name)
    for path in target.parent.iterdir():
        match = pattern.match(path.name)
        if match is not None and writer_is_gone(match["tag"]):
            log.info("removing %s, left by a killed shapes generation", path)
            shutil.rmtree(path, ignore_errors=True)  # a concurrent generation may be removing it too


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")), encoding="utf-8")


def _meta(config: ShapesConfig, complete: bool) -> dict[str, Any]:
    return {
        "name": "shapes",
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "config": asdict(config),
        "splits": config.split_sizes(),
        "categories": list(SHAPE_KINDS),
        "colors": {k: list(v) for k, v in COLORS.items()},
        "sizes": list(SIZES),
        "vocabulary": shapes_vocabulary(),
    }


def _write_dataset(out: Path, config: ShapesConfig, progress: bool) -> None:
    """Write every file of the dataset into the empty directory ``out``."""
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True)
    (out / "annotations").mkdir()
    sizes = config.split_sizes()
    s = config.image_size
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_KINDS)]
    # One process on purpose: measured on 2 cores, a Pool of 2 was no faster (PNG writing and result
    # transfer dominate) and spawn-based pools break callers that lack an `if __name__ == "__main__"` guard.
    bar = tqdm(total=sum(sizes.values()), desc="shapes dataset", unit="img", disable=not progress, dynamic_ncols=True)
    image_id = 1  # unique across splits, as in COCO
    with bar:
        for split, count in sizes.items():
            images: list[dict[str, Any]] = []
            captions: list[dict[str, Any]] = []
            instances: list[dict[str, Any]] = []
            for index in range(count):
                file_name = f"{image_id:06d}.png"
                r = _render(config, split, index, out / "images" / split / file_name)
                images.append({"id": image_id, "file_name": file_name, "width": s, "height": s})
                # Ids derived from the image id stay unique across splits without a shared counter.
                first_caption = (image_id - 1) * config.captions_per_image + 1
                captions += [
                    {"id": first_caption + k, "image_id": image_id, "caption": c} for k, c in enumerate(r["captions"])
                ]
                first_instance = (image_id - 1) * 3 + 1
                instances += [
                    {"id": first_instance + k, "image_id": image_id, **inst} for k, inst in enumerate(r["instances"])
                ]
                image_id += 1
                bar.update()
            info = {
                "description": f"robucap procedural shapes, {split} split",
                "version": str(FORMAT_VERSION),
                "contributor": "robucap",
                "seed": config.seed,
            }
            _write_json(
                out / "annotations" / f"captions_{split}.json",
                {"info": info, "licenses": [], "images": images, "annotations": captions},
            )
            _write_json(
                out / "annotations" / f"instances_{split}.json",
                {"info": info, "licenses": [], "images": images, "annotations": instances, "categories": categories},
            )
    # Still written last and marked complete, so that older robucap versions accept the directory too.
    _write_json(out / "meta.json", _meta(config, complete=True))


def _publish(scratch: Path, target: Path, out: Path, config: ShapesConfig, flags: ShapesFlags) -> None:
    """Rename the finished ``scratch`` directory to ``target`` (the resolved ``out``), or accept a winner's.

    ``rename`` is atomic and replaces only an absent name or an empty directory, so readers never see half a
    dataset, and of concurrent first uses exactly one wins; the others find its dataset in place and accept
    it when it was made with their settings.
    """
    for _ in range(3):
        try:
            os.rename(scratch, target)
            return
        except OSError as error:
            if error.errno in (errno.EBUSY, errno.EXDEV):
                raise DataError(
                    f"cannot put the shapes dataset in place at {out} ({error.strerror}; is it a mount point?): "
                    f"choose a new directory inside it, e.g. {out / 'shapes'}"
                ) from None
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
        if _check_existing(out, config, flags):
            return  # a concurrent generation with the same settings finished first: use its dataset
    # Emptied or removed again after each of our checks: something else keeps changing this directory.
    raise DataError(f"shapes output {out} keeps changing while the dataset is put in place; try again")


def _summary(out: Path, config: ShapesConfig) -> dict[str, Any]:
    return {
        "name": "shapes",
        "splits": config.split_sizes(),
        "image_size": config.image_size,
        "seed": config.seed,
        "path": str(out),
    }


def generate_shapes(
    out: str | Path,
    config: ShapesConfig = ShapesConfig(),
    progress: bool = True,
    flags: ShapesFlags | None = None,
) -> dict[str, Any]:
    """Write the shapes dataset in the COCO layout (see the module docstring), unless it is already there.

    An existing dataset is never rewritten or deleted: the files are written into a hidden scratch directory
    next to ``out`` (``.<name>.partial.<host>-<pid>.<token>``), which is then renamed to ``out`` in one atomic
    step. So a killed generation leaves no partial ``out`` (its scratch is removed by the next generation on the
    same host once its process is gone), and of two concurrent first uses one writes ``out`` while the other
    uses that dataset.

    Args:
        out: Output directory: absent, empty, or already holding this exact dataset (then nothing is written).
            Its parent must be writable.
        config: What to generate.
        progress: Show a tqdm progress bar.
        flags: How the caller's user spells the options, to word refusals (default: field names).

    Returns:
        ``{"name": "shapes", "splits": {"train": n, "val": n, "test": n}, "image_size": ..., "seed": ...,
        "path": str(out)}``.

    Raises:
        RobucapError: The config is invalid.
        DataError: ``out`` is a file, a non-empty directory that is not a shapes dataset, an incomplete shapes
            dataset or one made with other settings (the message names each differing setting), or its parent
            is not writable.
    """
    config.validate()
    out = Path(out)
    flags = flags or ShapesFlags()
    if _check_existing(out, config, flags):
        return _summary(out, config)
    # Through symlinks, so that the rename lands where the user's link points (e.g. onto a bigger disk).
    target = out.resolve()
    scratch = target.parent / _SCRATCH.format(name=target.name, tag=scratch_tag(), token=secrets.token_hex(4))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_scratch(target)
        scratch.mkdir()  # honours the umask like any directory, unlike tempfile.mkdtemp's 0700
    except PermissionError as error:
        raise DataError(
            f"cannot write the shapes dataset {out}: no permission to create {error.filename} (the data is "
            "written next to it first, then renamed into place): choose a directory you can write"
        ) from None
    try:
        _write_dataset(scratch, config, progress)
        _publish(scratch, target, out, config, flags)
    finally:
        if scratch.exists():  # an error, or a concurrent generation won: nothing of ours may stay behind
            shutil.rmtree(scratch, ignore_errors=True)
    return _summary(out, config)


def shapes_ready(out: str | Path, config: ShapesConfig) -> bool:
    """Whether ``out`` holds a complete shapes dataset generated with exactly ``config``.

    Args:
        out: Directory that :func:`generate_shapes` wrote (or may not have written yet).
        config: The config the caller wants.

    Returns:
        True when ``out/meta.json`` records this config and format version and the generation finished,
        so the caller can skip generating; False otherwise (missing, partial, stale or unreadable).
    """
    out = Path(out)
    meta = _read_meta(out)
    if meta is None or meta.get("complete") is not True or meta.get("format_version") != FORMAT_VERSION:
        return False
    if meta.get("config") != asdict(config):
        return False
    return _annotations_present(out)
