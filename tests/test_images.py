"""Image decoding to [0, 1] RGB tensors and the image-root containment check."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.fake_datasets import JPEG_MODES, PNG_MODES, write_image
from PIL import Image

from datamodules.errors import DataError
from datamodules.image_decode import EXIF_ORIENTATION_TAG
from datamodules.images import image_orientation, load_image, load_image_uint8, resolve_inside


@pytest.mark.parametrize(
    ("mode", "suffix"), [(m, ".png") for m in PNG_MODES] + [(m, ".jpg") for m in JPEG_MODES if m != "RGB"]
)
@pytest.mark.parametrize("source_size", [(37, 23), (16, 16), (5, 41)])
def test_every_mode_and_odd_size_loads_as_rgb_square(tmp_path: Path, mode: str, suffix: str, source_size) -> None:
    path = tmp_path / f"image{suffix}"
    write_image(path, 3, source_size, mode)
    image = load_image(path, 24)
    assert image.shape == (3, 24, 24)
    assert image.dtype == torch.float32
    assert 0.0 <= image.min().item() <= image.max().item() <= 1.0


def test_without_size_keeps_source_shape(tmp_path: Path) -> None:
    path = tmp_path / "odd.png"
    write_image(path, 0, (37, 23), "L")
    assert load_image(path, None).shape == (3, 23, 37)


def test_float_and_uint8_agree(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    write_image(path, 1, (33, 17), "RGBA")
    as_uint8 = load_image_uint8(path, 16)
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == (3, 16, 16)
    assert torch.equal(load_image(path, 16), as_uint8.float() / 255)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    write_image(path, 2, (8, 8), "L")
    image = load_image(path, None)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "alpha.png"
    # write_image makes the left half fully transparent.
    write_image(path, 4, (10, 6), mode)
    image = load_image(path, None)
    if mode == "P":
        # Only palette index 0 is transparent; those pixels must be white, wherever they are.
        index = np.asarray(Image.open(path))
        assert torch.all(image[:, torch.from_numpy(index == 0)] == 1.0)
    else:
        assert torch.all(image[:, :, :5] == 1.0)
        assert not torch.all(image[:, :, 5:] == 1.0)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(path)
    values = load_image(path, None)[0, 0]
    assert values.tolist() == pytest.approx([0.0, 128 / 255, 1.0])


def test_cmyk_jpeg_loads(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (9, 7), (0, 0, 0, 0)).save(path)
    image = load_image(path, None)
    assert image.shape == (3, 7, 9)
    assert image.min().item() > 0.9  # no ink is white


# What a viewer shows for each EXIF orientation, as an operation on the stored (H, W, C) array.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "I;16"])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, mode: str) -> None:
    """A photo is loaded upright, as its EXIF orientation says, by every loader."""
    path = tmp_path / "photo.png"
    write_image(path, 5, (13, 7), mode)
    stored = load_image_uint8(path).permute(1, 2, 0).numpy()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    with Image.open(path) as image:
        image.save(path, exif=exif)
    assert image_orientation(path) == orientation
    upright = load_image_uint8(path)
    assert np.array_equal(upright.permute(1, 2, 0).numpy(), UPRIGHT[orientation](stored))
    assert torch.equal(load_image(path), upright.float() / 255)
    # Resizing happens after turning: the square is the upright image squeezed, not the stored one.
    assert torch.equal(load_image_uint8(path, 9), load_image_uint8(_upright_copy(path, tmp_path), 9))


def _upright_copy(path: Path, tmp_path: Path) -> Path:
    """The file's decoded upright pixels saved without EXIF."""
    copy = tmp_path / "upright.png"
    Image.fromarray(load_image_uint8(path).permute(1, 2, 0).numpy()).save(copy)
    return copy


def test_exif_rotated_jpeg_is_upright(tmp_path: Path) -> None:
    """The common case, a JPEG from a phone held upright (orientation 6)."""
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    array = np.zeros((10, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # the left half of the sensor is the top of the scene
    Image.fromarray(array).save(path, exif=exif, quality=95)
    image = load_image(path, None)
    assert image.shape == (3, 40, 10)
    assert image[:, :20].mean().item() > 0.9 and image[:, 20:].mean().item() < 0.1


@pytest.mark.parametrize("value", [0, 9, 1000])
def test_invalid_exif_orientation_is_ignored(tmp_path: Path, value: int) -> None:
    path = tmp_path / "odd.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = value
    Image.new("RGB", (8, 4), (10, 20, 30)).save(path, exif=exif)
    assert image_orientation(path) == 1
    assert load_image(path, None).shape == (3, 4, 8)


def test_image_orientation_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "gone.jpg"
    with pytest.raises(DataError, match=re.escape(f"{missing} is not a readable image: the file does not exist")):
        image_orientation(missing)
    text = tmp_path / "text.jpg"
    text.write_text("not an image\n")
    with pytest.raises(DataError, match=re.escape(f"{text} is not a readable image: ")):
        image_orientation(text)


def test_resize_is_not_a_crop(tmp_path: Path) -> None:
    path = tmp_path / "halves.png"
    array = np.zeros((10, 40, 3), dtype=np.uint8)
    array[:, 20:] = 255  # left half black, right half white: a crop would lose one of them
    Image.fromarray(array).save(path)
    image = load_image(path, 8)
    assert image[:, :, 0].max().item() < 0.05 and image[:, :, -1].min().item() > 0.95


@pytest.mark.parametrize("content", ["random", "truncated", "text", "empty"])
def test_unreadable_image_names_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "broken.jpg"
    if content == "random":
        path.write_bytes(bytes(range(256)) * 4)
    elif content == "truncated":
        good = tmp_path / "good.jpg"
        write_image(good, 0, (64, 64), "RGB")
        path.write_bytes(good.read_bytes()[:400])
    elif content == "text":
        path.write_text("not an image\n")
    else:
        path.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{path} is not a readable image: ")):
        load_image(path, 16)


def test_missing_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.png"
    with pytest.raises(DataError, match=re.escape(f"{path} is not a readable image: the file does not exist")):
        load_image(path, 16)


def test_bad_size(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    write_image(path, 0, 4, "RGB")
    with pytest.raises(DataError, match="image size must be a positive number of pixels, got 0"):
        load_image(path, 0)


def test_resolve_inside_accepts_paths_and_links_inside(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"")
    os.symlink(root / "sub" / "a.png", root / "link.png")
    assert resolve_inside(root, "sub/a.png", "caps.json") == (root / "sub" / "a.png").resolve()
    assert resolve_inside(root, "sub/../sub/a.png", "caps.json") == (root / "sub" / "a.png").resolve()
    assert resolve_inside(root, "link.png", "caps.json") == (root / "sub" / "a.png").resolve()
    assert resolve_inside(root, "not/yet/there.png", "caps.json") == (root / "not/yet/there.png").resolve()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "root"])
def test_resolve_inside_rejects_escapes(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "images"
    root.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"")
    os.symlink(outside, root / "link.png")
    relative = {"dotdot": "../secret.png", "absolute": str(outside), "symlink": "link.png", "root": "."}[kind]
    expected = "does not name a file" if kind == "root" else "outside the image root"
    with pytest.raises(DataError, match=rf"^captions\.json: image path '{re.escape(relative)}' .*{expected}"):
        resolve_inside(root, relative, "captions.json")
