"""Tests for imret.images: every image is generated into tmp_path, except the
real-photo draft check, which reads the shared rparis6k-mini folder when present."""

from __future__ import annotations

import io
import os
import pickle
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from conftest import shared_dir
from imret import images
from imret.images import (
    DRAFT_MARGIN,
    IMAGE_EXTENSIONS,
    RESAMPLE,
    ImageError,
    list_images,
    load_image,
    new_size,
    open_image,
    to_tensor,
)

SHARED = shared_dir()
PHOTOS = SHARED / "data" / "rparis6k-mini" / "jpg"

# ----------------------------------------------------------------------------- helpers


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_bytes(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG built by hand: signature, IHDR, one IDAT holding ``idat`` verbatim, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _png16(pixels: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG (48-bit RGB: type 2, 64-bit RGBA: type 6) from ``(H, W, C)`` uint16."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return _png_bytes(width, height, 16, colour_type, zlib.compress(rows))


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _smooth(width: int, height: int) -> Image.Image:
    """Smooth colour content (gradients and slow waves), like a defocused photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127.5 + 127.5 * np.sin(x / 97.0) * np.cos(y / 131.0)
    g = 255.0 * x / width
    b = 127.5 + 127.5 * np.cos((x + y) / 173.0)
    return Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8))


def _mae(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _reference(path: Path, box=None, size=None) -> Image.Image:
    """PIL's own way: full decode, exif_transpose, convert, crop, then resize."""
    with Image.open(path) as src:
        img = ImageOps.exif_transpose(src).convert("RGB")
    if box is not None:
        img = img.crop(box)
    if size is not None and size != img.size:
        img = img.resize(size, RESAMPLE)
    return img


# ------------------------------------------------------------------------- ImageError


def test_image_error_message_attributes_and_pickle():
    err = ImageError(Path("/data/x.jpg"), "empty file (0 bytes)")
    assert isinstance(err, ValueError)
    assert err.path == "/data/x.jpg" and err.reason == "empty file (0 bytes)"
    assert str(err) == "cannot use image '/data/x.jpg': empty file (0 bytes)"
    back = pickle.loads(pickle.dumps(err))  # crosses process pools intact
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))


# ------------------------------------------------------------------------- bad inputs


def _zero_bytes(tmp: Path) -> Path:
    (tmp / "zero.jpg").write_bytes(b"")
    return tmp / "zero.jpg"


def _text_as_jpg(tmp: Path) -> Path:
    (tmp / "notes.jpg").write_text("this is not an image\n" * 20)
    return tmp / "notes.jpg"


def _truncated_jpeg(tmp: Path) -> Path:
    data = io.BytesIO()
    _noise(200, 150).save(data, "JPEG", quality=90)
    (tmp / "cut.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    return tmp / "cut.jpg"


def _truncated_png(tmp: Path) -> Path:
    data = io.BytesIO()
    _noise(200, 150).save(data, "PNG")
    (tmp / "cut.png").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    return tmp / "cut.png"


def _random_with_jpeg_header(tmp: Path) -> Path:
    rng = np.random.default_rng(1)
    body = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (tmp / "random.jpg").write_bytes(b"\xff\xd8\xff\xe0" + body)
    return tmp / "random.jpg"


def _missing(tmp: Path) -> Path:
    return tmp / "missing.jpg"


def _directory(tmp: Path) -> Path:
    (tmp / "folder.jpg").mkdir()
    return tmp / "folder.jpg"


def _unsupported_mode(tmp: Path) -> Path:
    return _save(Image.new("LAB", (8, 8), (50, 0, 0)), tmp / "lab.tif")


@pytest.mark.parametrize(
    "make, reason, from_pil",
    [
        (_zero_bytes, "empty file (0 bytes)", False),
        (_text_as_jpg, "not a recognised image format", True),
        (_truncated_jpeg, "image file is truncated", True),
        (_truncated_png, "cannot decode", True),
        (_random_with_jpeg_header, "", True),
        (_missing, "no such file", False),
        (_directory, "is a directory", False),
        (_unsupported_mode, "unsupported colour mode 'LAB'", False),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_bad_files_raise_image_error_naming_the_file(tmp_path, make, reason, from_pil):
    path = make(tmp_path)
    with pytest.raises(ImageError) as info:
        load_image(path, image_size=64)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert reason in info.value.reason
    # PIL's own error is chained, never swallowed
    assert isinstance(info.value.__cause__, Exception) == from_pil


def test_decode_errors_are_chained_to_pils_error(tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(_truncated_jpeg(tmp_path))
    assert isinstance(info.value.__cause__, OSError)


def test_decompression_bomb_is_refused_fast_by_header(tmp_path):
    # 50000 x 50000 8-bit grey = 2.5 GB once decoded; the file is a few dozen bytes
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(50000, 50000, 8, 0, zlib.compress(b"\x00" * 64)))
    start = time.perf_counter()
    with pytest.raises(ImageError) as info:
        load_image(path, image_size=256)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(info.value)
    assert "decompression bomb" in info.value.reason
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


def test_pixel_limit_is_checked_on_the_header_before_decoding(tmp_path):
    # the header claims 3000 x 3000 but the pixel data is garbage: were it decoded,
    # the error would be a decode error, not the pixel limit
    path = tmp_path / "big.png"
    path.write_bytes(_png_bytes(3000, 3000, 8, 0, b"garbage, not zlib"))
    with pytest.raises(ImageError) as info:
        load_image(path, max_pixels=1_000_000)
    assert "9000000 pixels exceeds the limit of 1000000" in info.value.reason
    assert str(path) in str(info.value)
    with open_image(path, max_pixels=10_000_000) as img:  # header only: no error yet
        assert img.size == (3000, 3000)
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(path, max_pixels=10_000_000)


def test_max_pixels_on_a_valid_image(tmp_path):
    path = _save(_noise(100, 60), tmp_path / "ok.png")
    assert load_image(path, max_pixels=6000).size == (100, 60)
    with pytest.raises(ImageError, match="6000 pixels exceeds the limit of 5999"):
        load_image(path, max_pixels=5999)


def test_default_pixel_limit_is_read_at_call_time(tmp_path, monkeypatch):
    path = _save(_noise(20, 20), tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 399)
    with pytest.warns(Image.DecompressionBombWarning):  # PIL's own, from Image.open
        with pytest.raises(ImageError, match="exceeds the limit of 399"):
            load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    assert load_image(path).size == (20, 20)


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (-5, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_max_pixels_rejects_bad_values(tmp_path, bad, error):
    path = _save(_noise(8, 8), tmp_path / "a.png")
    with pytest.raises(error, match="max_pixels"):
        open_image(path, max_pixels=bad)


def test_no_global_pil_state_is_changed(tmp_path):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for make in (_truncated_jpeg, _truncated_png):
        with pytest.raises(ImageError):
            load_image(make(tmp_path))
    load_image(_save(_noise(64, 64), tmp_path / "ok.jpg"), image_size=16, max_pixels=10**9)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


# ------------------------------------------------------------------------- colour modes


def _palette(transparent: bool) -> Image.Image:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    img.paste(1, (4, 0, 8, 8))  # left half index 0 (red), right half index 1 (blue)
    if transparent:
        img.info["transparency"] = 0
    return img


def _grey16(value: int, dtype="<u2") -> Image.Image:
    return Image.fromarray(np.full((8, 8), value, dtype))


def _rgb16(*channels: int) -> bytes:
    """A 4x4 PNG of 16-bit samples: 3 channels = 48-bit RGB, 4 = 64-bit RGBA."""
    pixels = np.tile(np.array(channels, np.uint16), (4, 4, 1))
    return _png16(pixels, 2 if len(channels) == 3 else 6)


WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)

# name: (image or PNG bytes, file suffix, save options, pixel (x, y), expected RGB, tolerance)
COLOUR_CASES = {
    "1-bit": (Image.new("1", (8, 8), 1), ".png", {}, (3, 3), WHITE, 0),
    "L": (Image.new("L", (8, 8), 100), ".png", {}, (3, 3), (100, 100, 100), 0),
    "LA opaque": (Image.new("LA", (8, 8), (100, 255)), ".png", {}, (3, 3), (100,) * 3, 0),
    "LA transparent": (Image.new("LA", (8, 8), (0, 0)), ".png", {}, (3, 3), WHITE, 0),
    "LA half": (Image.new("LA", (8, 8), (0, 128)), ".png", {}, (3, 3), (127,) * 3, 1),
    "P": (_palette(False), ".png", {}, (1, 1), RED, 0),
    "P other index": (_palette(False), ".png", {}, (6, 1), BLUE, 0),
    "P transparent index": (_palette(True), ".png", {}, (1, 1), WHITE, 0),
    "P opaque index": (_palette(True), ".png", {}, (6, 1), BLUE, 0),
    "P gif transparent": (_palette(True), ".gif", {}, (1, 1), WHITE, 0),
    "RGBA transparent": (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), ".png", {}, (3, 3), WHITE, 0),
    "RGBA opaque": (Image.new("RGBA", (8, 8), (0, 0, 255, 255)), ".png", {}, (3, 3), BLUE, 0),
    "RGBA half": (Image.new("RGBA", (8, 8), (0, 0, 0, 128)), ".png", {}, (3, 3), (127,) * 3, 1),
    "RGB tRNS key": (
        Image.new("RGB", (8, 8), (1, 2, 3)), ".png", {"transparency": (1, 2, 3)}, (3, 3), WHITE, 0
    ),
    "CMYK tiff": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), ".tif", {}, (3, 3), RED, 0),
    "CMYK jpeg (Adobe inverted)": (
        Image.new("CMYK", (16, 16), (0, 255, 255, 0)), ".jpg", {"quality": 95}, (8, 8), RED, 3
    ),
    "CMYK jpeg blue": (
        Image.new("CMYK", (16, 16), (255, 255, 0, 0)), ".jpg", {"quality": 95}, (8, 8), BLUE, 3
    ),
    "YCbCr tiff": (Image.new("RGB", (8, 8), RED).convert("YCbCr"), ".tif", {}, (3, 3), RED, 3),
    "I;16 png": (_grey16(0x8000), ".png", {}, (3, 3), (128,) * 3, 0),
    "I;16 png max": (_grey16(0xFFFF), ".png", {}, (3, 3), WHITE, 0),
    "I;16 png low": (_grey16(1000), ".png", {}, (3, 3), (4, 4, 4), 0),
    "I;16B tiff": (_grey16(0x8000, ">u2"), ".tif", {}, (3, 3), (128,) * 3, 0),
    "I tiff": (_grey16(0x4000, np.int32), ".tif", {}, (3, 3), (64, 64, 64), 0),
    "F tiff": (_grey16(128.4, np.float32), ".tif", {}, (3, 3), (128,) * 3, 0),
    "F tiff clipped": (_grey16(300.0, np.float32), ".tif", {}, (3, 3), WHITE, 0),
    "RGB 48-bit png": (_rgb16(0xFFFF, 0x8000, 0), ".png", {}, (1, 1), (255, 128, 0), 0),
    "RGBA 64-bit png transparent": (_rgb16(0, 0, 0xFFFF, 0), ".png", {}, (1, 1), WHITE, 0),
    "RGBA 64-bit png opaque": (_rgb16(0, 0, 0xFFFF, 0xFFFF), ".png", {}, (1, 1), BLUE, 0),
}


@pytest.mark.parametrize("name", list(COLOUR_CASES))
def test_colour_modes_convert_to_correct_rgb(tmp_path, name):
    source, suffix, options, xy, expected, tolerance = COLOUR_CASES[name]
    path = tmp_path / f"image{suffix}"
    if isinstance(source, bytes):
        path.write_bytes(source)
    else:
        source.save(path, **options)
    img = load_image(path)
    assert img.mode == "RGB"
    got = np.array(img.getpixel(xy), dtype=int)
    assert np.abs(got - np.array(expected)).max() <= tolerance, (name, tuple(got), expected)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
    img = load_image(_save(Image.fromarray(ramp), tmp_path / "ramp.png"))
    np.testing.assert_array_equal(np.asarray(img)[..., 0], np.arange(256).reshape(16, 16))


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("RGBX", (10, 20, 30, 0), (10, 20, 30)),
        ("PA", (0, 0), (255, 255, 255)),
        ("I;16L", 0x8000, (128,) * 3),
    ],
)
def test_in_memory_only_modes(mode, value, expected):
    img = Image.new(mode, (4, 4), value)
    if mode == "PA":
        img.putpalette([9, 9, 9] * 256)
    out = images._to_rgb(img)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == expected


def test_colour_after_resize_keeps_flat_colour(tmp_path):
    path = _save(Image.new("RGBA", (300, 200), (0, 255, 0, 0)), tmp_path / "a.png")
    img = load_image(path, image_size=50)
    assert img.size == (50, 33)
    assert np.all(np.asarray(img) == 255)


# -------------------------------------------------------------------- EXIF orientation

# where the stored top-left and top-right corners are displayed, per orientation
CORNERS = {
    1: ("TL", "TR"),
    2: ("TR", "TL"),
    3: ("BR", "BL"),
    4: ("BL", "BR"),
    5: ("TL", "BL"),
    6: ("TR", "BR"),
    7: ("BR", "TR"),
    8: ("BL", "TL"),
}


def _marked(width: int, height: int, block: int) -> Image.Image:
    """Grey image with a red block at the stored top-left, green at the top-right."""
    img = Image.new("RGB", (width, height), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, block, block))
    img.paste((0, 255, 0), (width - block, 0, width, block))
    return img


def _corner_colour(img: Image.Image, corner: str, inset: int) -> tuple[int, ...]:
    x = inset if corner[1] == "L" else img.width - 1 - inset
    y = inset if corner[0] == "T" else img.height - 1 - inset
    return img.getpixel((x, y))


def _is(colour, expected, tolerance=40) -> bool:
    return max(abs(a - b) for a, b in zip(colour, expected)) <= tolerance


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("image_size, draft", [(None, False), (100, True), (100, False)])
def test_exif_orientation_jpeg(tmp_path, orientation, image_size, draft):
    width, height, block = 800, 400, 160  # 100 px target: draft decodes at 1/4
    marked = _marked(width, height, block)
    path = _save(marked, tmp_path / "o.jpg", exif=_exif(orientation), quality=95)
    img = load_image(path, image_size=image_size, draft=draft)
    swapped = orientation >= 5
    shown = (height, width) if swapped else (width, height)
    assert img.size == (shown if image_size is None else new_size(*shown, image_size))
    inset = 2 if image_size is not None else 20
    red_at, green_at = CORNERS[orientation]
    assert _is(_corner_colour(img, red_at, inset), (255, 0, 0)), (orientation, red_at)
    assert _is(_corner_colour(img, green_at, inset), (0, 255, 0)), (orientation, green_at)
    # upright pixels and no orientation left to apply a second time
    assert ImageOps.exif_transpose(img).size == img.size
    assert 0x0112 not in img.getexif()


# --------------------------------------------------------------------------- bbox crop


@pytest.mark.parametrize("orientation", range(1, 9))
def test_bbox_is_in_displayed_orientation(tmp_path, orientation):
    path = _save(_noise(60, 40, seed=orientation), tmp_path / "n.png", exif=_exif(orientation))
    box = (5.3, 7.9, 31.2, 22.0)
    crop = (5, 7, 32, 22)  # rounded outward
    img = load_image(path, bbox=box)
    expected = _reference(path, crop)
    assert img.size == (27, 15)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(expected))


@pytest.mark.parametrize("orientation", [1, 3, 6, 7])
def test_bbox_then_resize_matches_pil_reference(tmp_path, orientation):
    path = _save(_smooth(300, 200), tmp_path / "s.png", exif=_exif(orientation))
    box = (20, 10, 180, 130)
    img = load_image(path, bbox=box, image_size=64, crop_resize="crop")
    assert img.size == (64, 48)
    expected = _reference(path, box, (64, 48))
    diff = np.abs(np.asarray(img, int) - np.asarray(expected, int))
    assert diff.max() <= 1  # we resize before transposing: only rounding may differ


def test_bbox_is_clamped_to_the_image(tmp_path):
    path = _save(_noise(50, 30), tmp_path / "n.png")
    img = load_image(path, bbox=(-10.5, -3, 1000, 25.5))
    np.testing.assert_array_equal(np.asarray(img), np.asarray(_reference(path, (0, 0, 50, 26))))


@pytest.mark.parametrize(
    "box, error, message",
    [
        ((10, 10, 10, 20), ValueError, "empty or inverted"),
        ((10, 20, 30, 5), ValueError, "empty or inverted"),
        ((1, 2, 3), ValueError, "4 numbers"),
        ((0, 0, float("nan"), 5), ValueError, "finite"),
        ((50, 0, 70, 10), ImageError, "does not overlap"),
        ((-20, -20, -1, -1), ImageError, "does not overlap"),
    ],
)
def test_bad_bbox(tmp_path, box, error, message):
    path = _save(_noise(50, 30), tmp_path / "n.png")
    with pytest.raises(error, match=message) as info:
        load_image(path, bbox=box)
    assert str(box[0]) in str(info.value)
    if error is ImageError:
        assert str(path) in str(info.value)


def test_bbox_outside_uses_displayed_size(tmp_path):
    # stored 60 x 40, displayed 40 x 60 (orientation 6): x = 45 is outside the display
    path = _save(_noise(60, 40), tmp_path / "n.png", exif=_exif(6))
    with pytest.raises(ImageError, match="40x60"):
        load_image(path, bbox=(45, 0, 55, 10))
    assert load_image(path, bbox=(0, 45, 10, 55)).size == (10, 10)


# ---------------------------------------------------------------------------- resizing


@pytest.mark.parametrize(
    "size, image_size, expected",
    [
        ((1024, 683, 256), None, (256, 171)),  # 170.75 -> 171
        ((683, 1024, 256), None, (171, 256)),
        ((8, 5, 4), None, (4, 3)),  # 2.5 rounds half up (Python's round would give 2)
        ((1000, 2, 250), None, (250, 1)),  # 0.5 -> 1, and never below 1
        ((10000, 1, 100), None, (100, 1)),
        ((500, 500, 100), None, (100, 100)),
        ((100, 50, 512), None, (100, 50)),  # never upscaled
        ((512, 300, 512), None, (512, 300)),
    ],
)
def test_new_size_examples(size, image_size, expected):
    assert new_size(*size) == expected


def test_new_size_closed_form():
    rng = np.random.default_rng(0)
    for width, height, image_size in rng.integers(1, 3000, (2000, 3)).tolist():
        w, h = new_size(width, height, image_size)
        long_side, short_side = max(width, height), min(width, height)
        if long_side <= image_size:
            assert (w, h) == (width, height)
            continue
        exact = Fraction(short_side * image_size, long_side)
        short_new = max(1, int(exact + Fraction(1, 2)))
        assert (w, h) == ((image_size, short_new) if width >= height else (short_new, image_size))
        assert max(w, h) == image_size and min(w, h) <= image_size


@pytest.mark.parametrize("args", [(0, 10, 10), (10, -1, 10), (10, 10, 0)])
def test_new_size_rejects_non_positive(args):
    with pytest.raises(ValueError, match=">= 1"):
        new_size(*args)


def test_new_size_rejects_non_int():
    with pytest.raises(TypeError, match="image_size"):
        new_size(10, 10, 5.0)


def test_load_never_upscales_and_keeps_aspect(tmp_path):
    path = _save(_noise(120, 80), tmp_path / "n.png")
    assert load_image(path, image_size=1000).size == (120, 80)
    img = load_image(path, image_size=60)
    assert img.size == (60, 40)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(_reference(path, size=(60, 40))))
    with pytest.raises(ValueError, match="image_size"):
        load_image(path, image_size=0)


# ------------------------------------------------------------------------------- draft


def test_draft_factor_rule():
    assert DRAFT_MARGIN == 2
    assert images._draft_factor(1024, 512, 768) == 1  # would decode at the target size
    assert images._draft_factor(1024, 256, 768) == 2
    assert images._draft_factor(1023, 256, 768) == 1
    assert images._draft_factor(4000, 256, 3000) == 4
    assert images._draft_factor(4096, 256, 3000) == 8
    assert images._draft_factor(4096, 256, 3) == 2  # a 3-pixel side cannot be divided by 4


@pytest.fixture
def draft_scales(monkeypatch):
    """Records the scale of every JPEG draft that load_image asks for."""
    scales: list[float] = []
    original = JpegImageFile.draft

    def spy(self, mode, size):
        width = self.size[0]
        result = original(self, mode, size)
        if result is not None:
            scales.append(width / result[1][2])
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    return scales


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("large") / "smooth.jpg"
    return _save(_smooth(3000, 2000), path, quality=90)


@pytest.mark.parametrize("image_size, scale", [(256, 4), (512, 2), (1000, 1)])
def test_draft_matches_full_decode_on_large_jpeg(large_jpeg, draft_scales, image_size, scale):
    fast = load_image(large_jpeg, image_size=image_size)
    assert draft_scales == ([scale] if scale > 1 else [])
    full = load_image(large_jpeg, image_size=image_size, draft=False)
    assert len(draft_scales) <= 1
    assert fast.size == full.size == new_size(3000, 2000, image_size)
    assert _mae(fast, full) < 0.5  # smooth content: measured ~0.1


def test_draft_with_bbox_and_rotation(tmp_path, draft_scales):
    path = _save(_smooth(3000, 2000), tmp_path / "r.jpg", exif=_exif(6), quality=90)
    box = (100.5, 900.2, 1700.0, 2950.0)  # displayed image is 2000 x 3000
    fast = load_image(path, image_size=200, bbox=box, crop_resize="crop")
    assert draft_scales == [4]  # crop long side 2051 >= 4 * 2 * 200
    full = load_image(path, image_size=200, bbox=box, draft=False, crop_resize="crop")
    assert fast.size == full.size == new_size(1600, 2051, 200)
    assert _mae(fast, full) < 0.5
    assert _mae(full, _reference(path, (100, 900, 1700, 2950), full.size)) < 0.5


def _photo_sample() -> list[Path]:
    photos = sorted(PHOTOS.glob("*.jpg"))
    sample = photos[::12]
    worst = PHOTOS / "paris_louvre_000047.jpg"  # the largest draft error when measured
    if worst.exists() and worst not in sample:
        sample.append(worst)
    return sample


@pytest.mark.realdata
@pytest.mark.skipif(
    not PHOTOS.is_dir(), reason=f"real photos not found at {PHOTOS} (set IMRET_SHARED)"
)
@pytest.mark.parametrize("image_size", [256, 384, 512])
def test_draft_matches_full_decode_on_real_photos(image_size):
    # measured on all 250 photos at 256 px (1/2 decode): mean 0.57, worst 1.77 grey levels;
    # at 384 and 512 px the 2x margin rules out draft for 1024 px photos: identical
    errors = []
    for path in _photo_sample():
        fast = load_image(path, image_size=image_size)
        full = load_image(path, image_size=image_size, draft=False)
        assert fast.size == full.size, path
        errors.append(_mae(fast, full))
    assert max(errors) < 2.0, max(errors)
    assert float(np.mean(errors)) < 1.0
    if image_size > 256:
        assert max(errors) == 0.0


# --------------------------------------------------------------------------- to_tensor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_to_tensor_values_shape_dtype():
    pixels = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = to_tensor(Image.fromarray(pixels), MEAN, STD)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32 and x.is_contiguous()
    for c in range(3):
        for i in range(5):
            for j in range(7):
                ref = (pixels[i, j, c] / 255.0 - MEAN[c]) / STD[c]
                assert abs(float(x[c, i, j]) - ref) < 1e-5


def test_to_tensor_is_bitwise_the_float32_closed_form():
    """Every value is float32(x) * float32(1 / (255 std)) - float32(mean / std), rounded as the plain
    whole-array numpy formula rounds it: descriptors of stored collections do not move."""
    pixels = np.random.default_rng(4).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
    std, mean = np.asarray(STD), np.asarray(MEAN)
    ref = pixels.astype(np.float32) * (1.0 / (255.0 * std)).astype(np.float32) - (mean / std).astype(np.float32)
    x = to_tensor(Image.fromarray(pixels), MEAN, STD)
    assert x.shape == (3, 37, 53) and x.is_contiguous()
    assert np.array_equal(x.numpy(), ref.transpose(2, 0, 1))


def test_to_tensor_identity_normalisation():
    img = Image.new("RGB", (3, 2), (0, 51, 255))
    x = to_tensor(img, (0, 0, 0), (1, 1, 1))
    assert torch.allclose(x[:, 1, 2], torch.tensor([0.0, 0.2, 1.0]), atol=1e-6)


@pytest.mark.parametrize(
    "img, mean, std, error",
    [
        (Image.new("L", (2, 2)), MEAN, STD, "mode 'RGB'"),
        (Image.new("RGB", (2, 2)), (0.5, 0.5), STD, "mean"),
        (Image.new("RGB", (2, 2)), MEAN, (0.2, 0.0, 0.2), "std must be positive"),
    ],
)
def test_to_tensor_rejects_bad_input(img, mean, std, error):
    with pytest.raises(ValueError, match=error):
        to_tensor(img, mean, std)


# ------------------------------------------------------------------------- list_images


def test_list_images(tmp_path):
    names = ["b.JPG", "a.png", "notes.txt", "sub/c.jpeg", "sub/deep/d.TIFF"]
    hidden = [".hidden.jpg", "._a.jpg", ".cache/e.jpg"]
    for rel in names + hidden:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "dir.jpg").mkdir()  # a folder with an image name is not an image
    got = list_images(tmp_path)
    rel = [os.path.relpath(p, tmp_path).replace(os.sep, "/") for p in got]
    assert rel == ["a.png", "b.JPG", "sub/c.jpeg", "sub/deep/d.TIFF"]
    assert all(isinstance(p, str) and os.path.isfile(p) for p in got)
    flat = list_images(str(tmp_path), recursive=False)
    assert [os.path.basename(p) for p in flat] == ["a.png", "b.JPG"]
    assert ".jpg" in IMAGE_EXTENSIONS and ".png" in IMAGE_EXTENSIONS


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(NotADirectoryError, match="nope"):
        list_images(tmp_path / "nope")


# ------------------------------------------------------------------------ thread safety


def test_parallel_loads_match_serial(tmp_path):
    paths = [
        _save(_smooth(600 + 40 * i, 400), tmp_path / f"{i}.jpg", exif=_exif(1 + i % 8), quality=85)
        for i in range(8)
    ]
    paths.append(_truncated_jpeg(tmp_path))

    def run(path):
        try:
            return np.asarray(load_image(path, image_size=128, bbox=(10, 20, 300, 390)))
        except ImageError as e:
            return e.path

    serial = [run(p) for p in paths]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(run, paths * 3))
    for i, got in enumerate(parallel):
        want = serial[i % len(paths)]
        if isinstance(want, str):
            assert got == want
        else:
            np.testing.assert_array_equal(got, want)


def test_crop_resize_modes(tmp_path):
    """'image' scales the crop by the whole image's factor (revisitop/cirtorch); 'crop' fits the crop."""
    p = tmp_path / "big.png"
    Image.new("RGB", (400, 300), (10, 200, 30)).save(p)
    box = (100, 50, 300, 250)  # a 200 x 200 crop
    assert load_image(p, image_size=200, bbox=box).size == (100, 100)  # factor 200/400
    assert load_image(p, image_size=200, bbox=box, crop_resize="crop").size == (200, 200)
    assert load_image(p, image_size=100, bbox=box, crop_resize="crop").size == (100, 100)
    assert load_image(p, image_size=800, bbox=box).size == (200, 200)  # never upscaled
    with pytest.raises(ValueError, match="unknown crop_resize 'fit'"):
        load_image(p, image_size=200, bbox=box, crop_resize="fit")


# ------------------------------------------------------------ header size vs pixel data


def _jpeg_with_size(path: Path, width: int, height: int, *, progressive: bool = False,
                    subsampling: int = 0) -> Path:
    """A real 60x40 JPEG whose start-of-frame header is patched to claim ``width x height``."""
    buf = io.BytesIO()
    _noise(60, 40).save(buf, "JPEG", quality=90, progressive=progressive, subsampling=subsampling)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    assert struct.unpack(">HH", data[sof + 5:sof + 9]) == (40, 60)  # height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("image_size", [None, 1024, 64])  # 1024 and 64 decode in draft mode
def test_jpeg_header_claiming_more_pixels_than_its_data_is_refused(tmp_path, progressive, image_size):
    # libjpeg pads the missing 9000x9000 with grey and PIL reports no error: the file
    # used to be indexed as a grey image of the header's size
    path = _jpeg_with_size(tmp_path / "huge.jpg", 9000, 9000, progressive=progressive)
    with Image.open(path) as im:
        assert im.size == (9000, 9000)
    with pytest.raises(ImageError) as info:
        load_image(path, image_size=image_size, max_pixels=10**9)
    assert info.value.path == str(path)
    assert "ends before the 9000x9000 pixels its header declares" in info.value.reason


@pytest.mark.parametrize("subsampling, size, refused", [
    (0, (60, 48), True),    # one 8-pixel block row more than the data holds
    (0, (68, 40), True),    # one block column more
    (2, (60, 56), True),    # 4:2:0: one 16-pixel MCU row more
    (2, (60, 48), False),   # 4:2:0: 48 rows fit in the 3 MCU rows the data holds (40 -> 48)
    (0, (60, 40), False),   # the true size
])
def test_baseline_jpeg_size_check_is_exact_to_the_block_row(tmp_path, subsampling, size, refused):
    path = _jpeg_with_size(tmp_path / "p.jpg", *size, subsampling=subsampling)
    if refused:
        with pytest.raises(ImageError, match="pixels its header declares"):
            load_image(path)
    else:
        assert load_image(path).size == size


def _jpeg_variant(tmp: Path, name: str) -> Path:
    rng = np.random.default_rng(7)
    photo = Image.fromarray(rng.integers(0, 256, (75, 97, 3), dtype=np.uint8))
    variants = {
        "444": dict(subsampling=0),
        "422": dict(subsampling=1),
        "420": dict(subsampling=2),
        "restart-markers": dict(restart_marker_blocks=1),
        "optimized-huffman": dict(optimize=True),
        "progressive": dict(progressive=True),
        "low-quality": dict(quality=5),
        "exif-rotated": dict(exif=_exif(6)),
    }
    path = tmp / f"{name}.jpg"
    if name == "grey":
        photo.convert("L").save(path, quality=80)
    elif name == "cmyk":
        photo.convert("CMYK").save(path, quality=80)
    elif name == "one-pixel":
        Image.new("RGB", (1, 1), (200, 10, 30)).save(path)
    elif name == "flat":  # nearly no entropy-coded data at all
        Image.new("RGB", (640, 480), (90, 90, 90)).save(path, quality=50)
    elif name == "mpo":
        photo.save(path, "MPO", save_all=True, append_images=[photo.rotate(90)])
    else:
        photo.save(path, **{"quality": 85, **variants[name]})
    return path


@pytest.mark.parametrize("name", ["444", "422", "420", "restart-markers", "optimized-huffman", "progressive",
                                  "low-quality", "exif-rotated", "grey", "cmyk", "one-pixel", "flat", "mpo"])
def test_valid_jpegs_decode_exactly_as_pil_decodes_them(tmp_path, name):
    # the size check decodes single-scan JPEGs from their data without the end marker:
    # every pixel must come out as PIL's own full decode of the file
    path = _jpeg_variant(tmp_path, name)
    want = _reference(path)
    got = load_image(path, draft=False)
    assert got.size == want.size
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decoding_leaves_no_file_open(tmp_path):
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc/self/fd to count open files")
    good = _save(_noise(64, 48), tmp_path / "a.jpg")
    png = _save(_noise(64, 48), tmp_path / "a.png")
    gif = _save(_noise(64, 48).convert("P"), tmp_path / "a.gif", save_all=True,
                append_images=[_noise(64, 48, 1).convert("P")])
    bad = _jpeg_with_size(tmp_path / "huge.jpg", 9000, 9000)
    before = len(list(fds.iterdir()))
    for _ in range(20):
        for p in (good, png, gif):
            load_image(p, image_size=32)
            open_image(p).close()
        with pytest.raises(ImageError):
            load_image(bad, max_pixels=10**9)
    assert len(list(fds.iterdir())) == before


# ------------------------------------------------------------------- supported types


def test_image_extensions_are_exactly_what_pillow_decodes_here():
    from PIL import features

    registered = Image.registered_extensions()  # extension -> format, every plugin loaded
    assert IMAGE_EXTENSIONS == tuple(sorted(IMAGE_EXTENSIONS))
    for ext in IMAGE_EXTENSIONS:
        assert ext.startswith(".") and ext == ext.lower()
        assert registered.get(ext) in Image.OPEN, ext  # Pillow opens it
    has_avif = "avif" in features.modules and features.check_module("avif")
    assert (".avif" in IMAGE_EXTENSIONS) == bool(has_avif)
    assert (".webp" in IMAGE_EXTENSIONS) == bool(features.check_module("webp"))
    assert (".heic" in IMAGE_EXTENSIONS) == ("HEIF" in Image.OPEN)
    for ext in (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".ppm"):
        assert ext in IMAGE_EXTENSIONS


def test_check_image_type_names_the_type_and_the_supported_ones(tmp_path):
    images.check_image_type(tmp_path / "A.JPG")  # case-insensitive, no file needed
    for name, shown in (("notes.xyz", "'.xyz'"), ("README", "(no extension)"), ("x.jpg.bak", "'.bak'")):
        with pytest.raises(ImageError) as info:
            images.check_image_type(tmp_path / name)
        assert info.value.reason.startswith(f"unsupported image type {shown}; supported: ")
        assert ".jpg" in info.value.reason and ".png" in info.value.reason
        assert info.value.path == str(tmp_path / name)


def test_list_images_and_evaluation_list_the_same_files(tmp_path):
    from imret.evaluation import IMAGE_EXTENSIONS as eval_extensions
    from imret.evaluation import load_labelled_folder

    assert eval_extensions is IMAGE_EXTENSIONS  # one definition, not a copy
    files = ["cat/a.jpg", "cat/b.PNG", "cat/c.ppm", "cat/d.gif", "cat/sub/e.jpeg", "dog/f.bmp",
             "dog/g.tif", "dog/h.webp", "dog/i.pgm", "dog/.hidden.jpg", "dog/notes.txt"]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    listed = list_images(tmp_path)
    paths, labels, classes = load_labelled_folder(tmp_path)
    assert [str(p) for p in paths] == listed
    assert classes == ["cat", "dog"] and list(labels) == [0, 0, 0, 0, 0, 1, 1, 1, 1] == [
        classes.index(os.path.relpath(p, tmp_path).split(os.sep)[0]) for p in listed]


def test_avif_is_listed_by_every_listing_and_decoded(tmp_path):
    from imret.evaluation import load_labelled_folder

    from PIL import features

    if not ("avif" in features.modules and features.check_module("avif")):
        pytest.skip("this Pillow has no AVIF plugin, so .avif is not a supported type here")
    Image.init()  # load every plugin, so Image.SAVE is complete
    if "AVIF" not in Image.SAVE:
        pytest.skip("this Pillow's AVIF plugin cannot encode, so no test file can be made")
    (tmp_path / "cls").mkdir()
    _smooth(80, 60).save(tmp_path / "cls" / "photo.avif", quality=90)
    _noise(80, 60, 1).save(tmp_path / "cls" / "other.jpg")
    listed = list_images(tmp_path)
    assert [os.path.basename(p) for p in listed] == ["other.jpg", "photo.avif"]
    assert [str(p) for p in load_labelled_folder(tmp_path)[0]] == listed
    images.check_image_type(listed[1])
    img = load_image(listed[1])
    assert img.size == (80, 60) and img.mode == "RGB"
    assert _mae(img, _smooth(80, 60)) < 8  # lossy, but the same picture


def test_expand_image_inputs_replaces_folders_and_reports_empty_ones(tmp_path):
    from imret.images import expand_image_inputs

    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for name in ("a/2.jpg", "a/1.png", "a/sub/3.jpg", "a/notes.txt", "a/.hidden.jpg"):
        (tmp_path / name).write_bytes(b"x")
    files, empty = expand_image_inputs([tmp_path / "a", str(tmp_path / "missing.jpg"), tmp_path / "empty"])
    assert files == [str(tmp_path / "a" / "1.png"), str(tmp_path / "a" / "2.jpg"), str(tmp_path / "a" / "sub" / "3.jpg"),
                     str(tmp_path / "missing.jpg")]
    assert empty == [str(tmp_path / "empty")]
    assert expand_image_inputs([]) == ([], [])
