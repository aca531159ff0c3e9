"""A small Flickr8k download as a new user has it: the native layout, real-world captions and camera photos.

Captions carry what Flickr8k and COCO captions carry (hyphens, apostrophes, numbers, accents, an emoji, the
" ." ending and trailing spaces of ``Flickr8k.token.txt``); images are JPEGs with EXIF orientation tags,
grayscale and CMYK JPEGs, and a transparent PNG, at sizes unlike the model's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = (
    "A black-and-white dog jumps over a log .",
    "A man in a t-shirt rides a bike down the hill .",
    "Two children play in the water at the beach .",
    "A girl's pink dress blows in the wind .",
    "A dog doesn't want to let go of the stick .",
    "Three people sit at a café table outside .",
    "A boy in a red jacket is climbing a rock-wall .",
    "A woman with a piñata at a birthday party 🎉 .",
    "2 dogs run through the snow .",
    "A skier goes down a 45-degree slope .",
)
_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _photo(index: int, size: tuple[int, int]) -> Image.Image:
    """A smooth colour gradient with a bright disc (photo-like, compresses as JPEG should)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(index)
    base = rng.uniform(40, 200, size=3)
    image = np.stack([base[c] + 40 * np.sin((x + 7 * c + index) / 9) + 30 * np.cos(y / 11) for c in range(3)], -1)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    image[(x - cx) ** 2 + (y - cy) ** 2 < (min(width, height) / 5) ** 2] = 240
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _save(index: int, path: Path) -> None:
    """Cycle through the image kinds a photo collection holds."""
    kind = index % 5
    image = _photo(index, (60, 44) if index % 2 else (44, 52))
    if kind == 0:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90° clockwise to display, as phones write portrait photos
        image.save(path, "JPEG", quality=90, exif=exif.tobytes())
    elif kind == 1:
        image.convert("L").save(path, "JPEG", quality=90)
    elif kind == 2:
        image.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == 3:
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.new("L", rgba.size, 128))
        rgba.save(path, "PNG")  # a .jpg name holding a PNG: Pillow reads by content, as real downloads need
    else:
        image.save(path, "JPEG", quality=90)


def write_messy_flickr8k(root: Path, n_train: int = 24, n_val: int = 6, n_test: int = 6) -> dict[str, list[str]]:
    """Write ``root/Flickr8k_text/`` and ``root/Flicker8k_Dataset/`` as the official zips unpack.

    Returns:
        Split -> image file names.
    """
    root = Path(root)
    images = root / "Flicker8k_Dataset"
    text = root / "Flickr8k_text"
    images.mkdir(parents=True, exist_ok=True)
    text.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    lines: list[str] = []
    index = 0
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for _ in range(count):
            name = f"{1000268201 + 7919 * index}_{index:010x}.jpg"
            _save(index, images / name)
            names[split].append(name)
            lines += [f"{name}#{k}\t{CAPTIONS[(index + 3 * k) % len(CAPTIONS)]} " for k in range(5)]
            index += 1
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, file in _SPLIT_FILES.items():
        (text / file).write_text("\n".join(names[split]) + "\n", encoding="utf-8")
    return names
