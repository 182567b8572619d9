"""Image decoding for descriptor extraction: the bad-file policy, EXIF orientation,
colour modes, bounding-box crops and resizing.

Every function here is pure and thread-safe: it touches no process-wide state (in
particular it never sets ``PIL.Image.MAX_IMAGE_PIXELS`` or
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``), so the extractor may call it from a thread
pool while PIL decodes with the GIL released.

Conventions
-----------
* Sizes are ``(width, height)`` in pixels, as in PIL; tensors are ``(3, H, W)``.
* A bounding box is ``(x1, y1, x2, y2)`` in pixels of the *displayed* image (after the
  EXIF orientation) at its *original* resolution, as the revisitop ``bbx`` field.
* Any file that cannot be used raises :class:`ImageError`, which names the file.
* Besides files, extraction and search take images already in memory
  (:data:`IMAGE_INPUTS`): a ``PIL.Image.Image`` or an ``H x W x 3`` uint8 RGB numpy array,
  prepared by :func:`prepare_image` exactly as :func:`load_image` prepares a file's pixels,
  except that no EXIF orientation is applied (the pixels are used as they are).
* A file type is supported exactly when Pillow on this install can decode it;
  :data:`IMAGE_EXTENSIONS` lists them, and every imret listing (:func:`list_images`,
  the labelled folders of :mod:`imret.evaluation`, the server's uploads) uses it.
* Files are opened non-blocking and checked to be regular files before a byte is read,
  so a FIFO, a device (a link to ``/dev/zero``) or a folder named ``x.jpg`` is refused at
  once instead of hanging or reading without end.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import struct
from collections.abc import Iterable, Sequence
from numbers import Real

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DRAFT_MARGIN",
    "IMAGE_EXTENSIONS",
    "IMAGE_INPUTS",
    "RESAMPLE",
    "ImageError",
    "check_image_input",
    "check_image_type",
    "crop_geometry",
    "image_label",
    "image_list",
    "is_single_image",
    "exif_orientation",
    "expand_image_inputs",
    "list_images",
    "load_image",
    "open_regular_file",
    "new_size",
    "open_image",
    "prepare_image",
    "to_tensor",
    "upright_size",
]


def _pillow_module(name: str) -> bool:
    """Whether Pillow's optional module ``name`` (``"webp"``, ``"avif"``) is built in.

    Older Pillow releases do not know every name (AVIF arrived in 11.2): unknown means no.
    """
    from PIL import features

    return name in features.modules and bool(features.check_module(name))


def _decodable_extensions() -> tuple[str, ...]:
    """The extensions of the image types this Pillow install decodes, lower case, sorted.

    Computed from Pillow's build information only (no file is read): JPEG needs libjpeg,
    PNG zlib, WebP libwebp, AVIF libavif (Pillow >= 11.2); PPM/PGM/PBM, BMP, GIF and TIFF
    are decoded by Pillow itself. HEIC/HEIF come from a plugin (pillow-heif): they are in
    when that plugin has registered its opener with Pillow before imret.images is imported.
    """
    from PIL import features

    groups: list[tuple[tuple[str, ...], bool]] = [
        ((".jpg", ".jpeg"), bool(features.check_codec("jpg"))),
        ((".png",), bool(features.check_codec("zlib"))),
        ((".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff"), True),
        ((".webp",), _pillow_module("webp")),
        ((".avif", ".avifs"), _pillow_module("avif")),
        ((".heic", ".heif"), "HEIF" in Image.OPEN),
    ]
    return tuple(sorted(ext for exts, ok in groups if ok for ext in exts))


IMAGE_EXTENSIONS: tuple[str, ...] = _decodable_extensions()
"""The file extensions (lower case, with the dot) of the image types this install
decodes: the one rule for what imret treats as an image. :func:`list_images` lists
files with these extensions, :mod:`imret.evaluation` lists labelled folders with it,
and :func:`check_image_type` refuses any other type. Extensions compare lower-cased.
``.avif``/``.avifs`` are in only when Pillow has its AVIF plugin, ``.heic``/``.heif``
only when a HEIF plugin is registered with Pillow."""

RESAMPLE = Image.Resampling.LANCZOS
"""The filter used for every downscale.

Lanczos (a=3) is PIL's sharpest antialiasing filter and what cirtorch's ``imresize``
uses (``thumbnail(..., Image.ANTIALIAS)``), so descriptors of the published GeM/R-MAC
networks are computed on the images they were trained and evaluated on. It is applied
without ``reducing_gap`` so the result is the exact convolution, not a box-reduced
approximation."""

DRAFT_MARGIN = 2
"""JPEG draft (libjpeg DCT scaling by 1/2, 1/4, 1/8) is used only while the decoded
crop stays at least ``DRAFT_MARGIN`` times the final size in both directions.

Measured on the 250 rparis6k-mini photos (1024 px long side), against a full decode
followed by the same Lanczos resize, mean absolute error in grey levels (0..255):
decoding at exactly the target size (1/4 then to 256 px, 1/2 then to 512 px) gives a
mean of 1.7 and a worst image of 6-7; decoding at twice the target (1/2 then to
256 px) gives a mean of 0.57 and a worst image of 1.8; at four times, 0.22 / 0.57.
The DCT-scaled decode is blurrier and block-aligned, and the error shrinks as the
final Lanczos pass has more pixels to work with. A margin of 2 (also PIL's default
``reducing_gap`` in ``Image.thumbnail``) keeps every image under 2 grey levels while
still decoding 1/4 of the pixels or fewer whenever it applies: 6.4 instead of 11.9 ms
for those photos at 256 px, 18 instead of 85 ms for a 3000x2000 JPEG at 256 px."""

_ORIENTATION_TAG = 0x0112

# EXIF orientation -> the transpose that turns the stored pixels into the displayed ones.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_ALPHA_MODES = ("LA", "PA", "RGBA")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_SUPPORTED_MODES = frozenset(
    ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "F")
    + _ALPHA_MODES
    + _SIXTEEN_BIT_MODES
)


class ImageError(ValueError):
    """A file that cannot be used as an image; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        path = os.fspath(path)
        super().__init__(path, reason)  # args stay (path, reason), so it pickles
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot use image {self.path!r}: {self.reason}"


def new_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """The size ``(w, h)`` after fitting ``(width, height)`` into ``image_size``.

    The long side becomes ``image_size`` if it is larger (never upscaled); the short
    side keeps the aspect ratio, ``round(short * image_size / long)`` rounded half up
    and at least 1. Images that already fit are returned unchanged.
    """
    for name, value in (("width", width), ("height", height), ("image_size", image_size)):
        _check_positive_int(name, value)
    width, height, image_size = int(width), int(height), int(image_size)
    long_side, short_side = max(width, height), min(width, height)
    if long_side <= image_size:
        return width, height
    # round half up in exact integer arithmetic: floor(short * size / long + 1/2)
    short_new = max(1, (2 * short_side * image_size + long_side) // (2 * long_side))
    return (image_size, short_new) if width >= height else (short_new, image_size)


def open_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> Image.Image:
    """Open ``path`` lazily (header only) and check it before any pixel is decoded.

    Args:
        path: an image file.
        max_pixels: refuse images with more than this many pixels (width * height, from
            the header, so a decompression bomb costs nothing). ``None`` means
            ``PIL.Image.MAX_IMAGE_PIXELS`` as it is at call time (no limit if that is
            ``None``). PIL itself refuses anything above ``2 * MAX_IMAGE_PIXELS`` inside
            ``Image.open``, so a larger ``max_pixels`` cannot lift that limit, and PIL
            warns (``DecompressionBombWarning``) between 1x and 2x.

    Returns:
        The unloaded PIL image in its file's mode; the caller closes it (or uses
        :func:`load_image`).

    Raises:
        ImageError: missing, not a regular file (a folder, FIFO, device or socket, also
            behind a symbolic link: checked before anything is read, and the file is
            opened non-blocking so a FIFO swapped in meanwhile cannot hang it), empty,
            unreadable, not an image, too many pixels, or a colour mode
            :func:`load_image` cannot convert.
    """
    path = _check_path(path)
    limit = _pixel_limit(max_pixels)
    fp = open_regular_file(path)
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:
        fp.close()
        raise ImageError(path, f"decompression bomb refused by PIL: {e}") from e
    except UnidentifiedImageError as e:
        fp.close()
        raise ImageError(path, "not a recognised image format") from e
    except Exception as e:  # the file boundary: anything PIL or the OS raises
        fp.close()
        raise ImageError(path, f"cannot open ({type(e).__name__}: {e})") from e
    # the image owns the file, as when PIL opens a path itself: PIL closes it after
    # loading single-frame images, and close() closes it in every case
    img._exclusive_fp = True

    width, height = img.size
    if limit is not None and width * height > limit:
        img.close()
        raise ImageError(
            path,
            f"{width}x{height} = {width * height} pixels exceeds the limit of {limit} "
            "pixels (possible decompression bomb); not decoded",
        )
    if img.mode not in _SUPPORTED_MODES:
        mode = img.mode
        img.close()
        raise ImageError(
            path, f"unsupported colour mode {mode!r}; supported: {sorted(_SUPPORTED_MODES)}"
        )
    return img


def load_image(
    path: str | os.PathLike,
    *,
    image_size: int | None = None,
    bbox: Sequence[float] | None = None,
    draft: bool = True,
    max_pixels: int | None = None,
    crop_resize: str = "image",
) -> Image.Image:
    """Decode ``path`` into a fully loaded RGB image, upright, cropped and downscaled.

    Steps: header checks (:func:`open_image`); JPEG draft decoding when it is exact
    enough (see :data:`DRAFT_MARGIN`); EXIF orientation (all 8 values; the pixels come
    back in displayed orientation and no metadata is carried over, so nothing can
    rotate them twice); conversion to RGB (alpha composited onto white, 16-bit grey
    scaled 0..65535 -> 0..255 (its transparency ignored), float ``F`` read as 0..255
    and clipped, CMYK (Adobe-inverted JPEGs included) and YCbCr as PIL converts them,
    ICC profiles not applied); crop to ``bbox``; resize so the long side is
    ``image_size`` (:func:`new_size`, :data:`RESAMPLE`). Multi-frame files give their
    first frame.

    A file whose pixel data ends before the size its header declares is refused, not
    padded: PIL raises for truncated files of every format, but libjpeg fills what is
    missing with grey when the end-of-image marker comes early (a JPEG cut and closed, or
    a header patched to claim more pixels than the data holds). Single-scan JPEGs
    (baseline and extended sequential, most camera photos) are therefore decoded without
    their end marker, so that data ending early is an error (exact to the 8 or 16 pixel
    block row, whatever the draft scale); multi-scan (progressive) JPEGs are checked
    against a lower bound of one bit per 8x8 block in each DC scan, which catches
    headers that overstate the size grossly. (All of this holds while
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its default, False: imret never sets
    it, and a process that does makes PIL pad truncated files of every format.)

    Args:
        path: an image file.
        image_size: the largest allowed long side in pixels, or ``None`` for no resize.
            Images (or crops) that are smaller are never upscaled.
        bbox: ``(x1, y1, x2, y2)`` in pixels of the displayed image at original
            resolution. Rounded outward to whole pixels (a partly covered pixel is
            kept) and clamped to the image.
        draft: allow JPEG DCT-domain downscaling while decoding; the output size is the
            same either way, and the pixels differ from a full decode by under 1 grey
            level on average and under 2 for every image measured (:data:`DRAFT_MARGIN`).
        max_pixels: see :func:`open_image`.
        crop_resize: how a ``bbox`` crop is resized. ``"image"`` (default): by the factor
            that brings the whole image's long side to ``image_size``, so the object keeps
            the scale it has in uncropped database images (cnnimageretrieval-pytorch and
            the revisited Oxford/Paris evaluation do this); ``"crop"``: so that the crop's
            own long side is ``image_size``. Never upscales either way.

    Returns:
        A loaded ``"RGB"`` image; without a bbox of size ``new_size(w, h, image_size)``.

    Raises:
        ImageError: the file cannot be used (see :func:`open_image`), its data cannot be
            decoded (corrupt, or it ends before the pixels its header declares), or
            ``bbox`` lies outside the image.
        ValueError: ``bbox`` is malformed, empty or inverted, or ``image_size`` is not
            a positive integer.
    """
    if image_size is not None:
        _check_positive_int("image_size", image_size)
    if not isinstance(draft, bool):
        raise TypeError(f"draft must be a bool, got {draft!r}")
    if crop_resize not in ("image", "crop"):
        raise ValueError(f"unknown crop_resize {crop_resize!r}; available: 'image', 'crop'")
    box = None if bbox is None else _check_bbox(bbox)
    src = open_image(path, max_pixels=max_pixels)
    path = os.fspath(path)
    try:
        if src.format in ("JPEG", "MPO"):
            src = _checked_jpeg(src, path)
        return _decode(src, path, image_size, box, draft, crop_resize)
    finally:
        src.close()


IMAGE_INPUTS = "a path (str or os.PathLike), a PIL.Image.Image, or an H x W x 3 uint8 numpy array (RGB)"
"""The kinds of image extraction and search take, in words (for error messages)."""


def is_single_image(x: object) -> bool:
    """Whether ``x`` is one image (a path, a PIL image, an ``H x W x 3`` array; a 2-D array
    counts as one, to be refused as such) rather than a sequence of them."""
    return isinstance(x, (str, os.PathLike, Image.Image)) or (isinstance(x, np.ndarray) and x.ndim in (2, 3))


def image_list(images: object, name: str = "images") -> list:
    """``images`` as a list, refusing one image given alone (a ``str`` would otherwise be
    taken character by character as paths)."""
    if is_single_image(images):
        raise TypeError(f"{name} must be a sequence of images, got a single {type(images).__name__}; "
                        "wrap it in a list")
    if isinstance(images, np.ndarray):
        return list(images)  # (N, H, W, 3): N arrays
    try:
        return list(images)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of images ({IMAGE_INPUTS}), got {type(images).__name__}") from None


def check_image_input(image: object, index: int | None = None):
    """``image`` as extraction takes it: a path as a ``str``; a PIL image or an ``H x W x 3``
    uint8 array as it is.

    Raises:
        TypeError: anything else (the message names the accepted kinds), or an array of
            another dtype.
        ValueError: an array of another shape.
    """
    where = "" if index is None else f"image {index}: "
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not isinstance(path, str):
            raise TypeError(f"{where}a path must be a str or os.PathLike of str, got {type(path).__name__} {path!r}")
        return path
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"{where}an image array must be uint8 (H x W x 3, RGB, 0..255), got dtype {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"{where}an image array must be H x W x 3 (RGB), got shape {image.shape}")
        return image
    raise TypeError(f"{where}expected {IMAGE_INPUTS}; got {type(image).__module__}.{type(image).__qualname__}")


def image_label(image: object, index: int | None = None) -> str:
    """How an input is named in results and reports: a path as it is; an image in memory
    as ``<PIL image #3 from q.jpg: 640x480 RGB>`` or ``<array image #3: 480x640x3>``."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)  # type: ignore[return-value]
    number = "" if index is None else f" #{index}"
    if isinstance(image, Image.Image):
        source = getattr(image, "filename", "") or ""
        source = f" from {os.path.basename(source)}" if isinstance(source, str) and source else ""
        return f"<PIL image{number}{source}: {image.size[0]}x{image.size[1]} {image.mode}>"
    if isinstance(image, np.ndarray):
        return f"<array image{number}: {'x'.join(map(str, image.shape))}>"
    return f"<{type(image).__name__}{number}>"


def prepare_image(
    image: Image.Image | np.ndarray,
    *,
    image_size: int | None = None,
    bbox: Sequence[float] | None = None,
    crop_resize: str = "image",
    name: str | None = None,
) -> Image.Image:
    """An image in memory as :func:`load_image` gives a file: RGB, cropped, downscaled.

    ``image`` is a ``PIL.Image.Image`` (any mode :func:`load_image` converts) or an
    ``H x W x 3`` uint8 RGB array. Its pixels are used as they are: no EXIF orientation is
    applied (a PIL image opened from a photo keeps its stored orientation; apply
    ``PIL.ImageOps.exif_transpose`` first, or pass the file's path), and ``bbox`` is in
    pixels of the image as given. The caller's image is not changed (a lazily opened PIL
    image is loaded). ``name`` labels errors (default :func:`image_label`).

    Raises:
        ImageError: an unsupported colour mode, pixel data that cannot be loaded, or a
            ``bbox`` outside the image.
        TypeError, ValueError: not an image of the accepted kinds; bad arguments as in
            :func:`load_image`.
    """
    image = check_image_input(image)
    if isinstance(image, str):
        raise TypeError(f"prepare_image takes an image in memory; for a file use load_image({image!r})")
    if image_size is not None:
        _check_positive_int("image_size", image_size)
    if crop_resize not in ("image", "crop"):
        raise ValueError(f"unknown crop_resize {crop_resize!r}; available: 'image', 'crop'")
    name = name or image_label(image)
    box = None if bbox is None else _check_bbox(bbox)
    src = Image.fromarray(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if src.mode not in _SUPPORTED_MODES:
        raise ImageError(name, f"unsupported colour mode {src.mode!r}; supported: {sorted(_SUPPORTED_MODES)}")
    if min(src.size) < 1:
        raise ImageError(name, f"empty image ({src.size[0]}x{src.size[1]} pixels)")
    return _decode(src, name, image_size, box, draft=False, crop_resize=crop_resize, orient=False)


def to_tensor(
    img: Image.Image, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """An RGB image as a normalised float32 tensor ``(x / 255 - mean) / std``.

    Args:
        img: a PIL image in mode ``"RGB"`` of size ``(W, H)``.
        mean: per-channel mean, 3 values on the 0..1 scale.
        std: per-channel standard deviation, 3 positive values on the 0..1 scale.

    Returns:
        A contiguous float32 tensor of shape ``(3, H, W)``.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"img must be a PIL image, got {type(img).__name__}")
    if img.mode != "RGB":
        raise ValueError(f"img must be in mode 'RGB', got {img.mode!r}; use load_image()")
    mean_arr = _channel_values("mean", mean)
    std_arr = _channel_values("std", std)
    if not np.all(std_arr > 0):
        raise ValueError(f"std must be positive, got {list(std)}")
    scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
    offset = (mean_arr / std_arr).astype(np.float32)
    pixels = np.asarray(img)  # (H, W, 3) uint8, read-only view of the image
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    # one channel at a time, straight into the planar layout: ~3x faster than converting, scaling and
    # transposing the whole float image (BENCHMARKS.md), with the same float32 operations, so the same values
    for c in range(3):
        np.multiply(pixels[:, :, c], scale[c], out=out[c], dtype=np.float32)
        out[c] -= offset[c]
    return torch.from_numpy(out)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an open image; 1 when missing, unreadable or out of range
    (as PIL's ``exif_transpose`` reads it). The one place imret reads it."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # the file boundary: a corrupt EXIF block reads as "no rotation" here
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def upright_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an open image as displayed, after its EXIF orientation
    (orientations 5-8 swap the sides), from the header alone."""
    w, h = img.size
    return (h, w) if exif_orientation(img) in (5, 6, 7, 8) else (w, h)


def image_size_of(image: object) -> tuple[int, int]:
    """``(width, height)`` of an image input as imret shows it: a file upright (its EXIF
    orientation applied; only the header is read), a PIL image or an ``H x W x 3`` array as
    given. Positions in original pixels (query boxes, keypoints, localised boxes) refer to it."""
    if isinstance(image, (str, os.PathLike)):
        img = open_image(image)
        try:
            return upright_size(img)
        finally:
            img.close()
    if isinstance(image, Image.Image):
        return int(image.size[0]), int(image.size[1])
    arr = np.asarray(image)
    if arr.ndim < 2:
        raise TypeError(f"expected a path, a PIL image or an H x W x 3 array, got {type(image).__name__}")
    return int(arr.shape[1]), int(arr.shape[0])


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Paths of the image files in ``folder``, sorted.

    A file counts as an image when its extension, lower-cased, is in
    :data:`IMAGE_EXTENSIONS`. Hidden files and folders (name starting with ``.``, such
    as macOS ``._IMG.jpg`` resource forks) are skipped.

    Args:
        folder: the folder to scan.
        recursive: also scan sub-folders (symlinked folders are not followed).

    Returns:
        ``os.path.join(folder, relative_path)`` strings in sorted order.
    """
    folder = _check_path(folder, name="folder")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"image folder {folder!r} is not a directory")
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        found.extend(
            os.path.join(root, name)
            for name in files
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(found)


def expand_image_inputs(items: Iterable[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """The image files named by ``items``: each folder replaced by its images
    (:func:`list_images`, sorted), each other item kept as given (a missing or unreadable file
    is the reader's to report). Returns ``(files, empty_folders)``: the folders that hold no
    image, for the caller to refuse or to report."""
    files: list[str] = []
    empty: list[str] = []
    for item in items:
        p = os.fspath(item)
        if os.path.isdir(p):
            found = list_images(p)
            files.extend(found)
            if not found:
                empty.append(p)
        else:
            files.append(p)
    return files, empty


# ---------------------------------------------------------------------------- helpers


def crop_geometry(
    width: int,
    height: int,
    box: tuple[float, float, float, float] | None,
    image_size: int | None,
    crop_resize: str = "image",
    path: str = "<image>",
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Where :func:`load_image` crops an upright ``width x height`` image and what size the
    crop is resized to: ``((x1, y1, x2, y2), (target_w, target_h))``, the box rounded outward
    to whole pixels (the whole image without one), then sized by ``image_size`` and
    ``crop_resize`` (see :func:`load_image`). Decoders other than Pillow (the GPU path) use it
    to give the same input sizes. Raises :class:`ImageError` for a box outside the image."""
    crop = (0, 0, width, height) if box is None else _round_box(box, width, height, path)
    crop_w, crop_h = crop[2] - crop[0], crop[3] - crop[1]
    if image_size is None:
        target = (crop_w, crop_h)
    elif box is None or crop_resize == "crop":
        target = new_size(crop_w, crop_h, image_size)
    else:  # the whole image's factor applied to the crop
        factor = min(1.0, image_size / max(width, height))
        target = (max(1, round(crop_w * factor)), max(1, round(crop_h * factor)))
    return crop, target


def _decode(
    src: Image.Image,
    path: str,
    image_size: int | None,
    box: tuple[float, float, float, float] | None,
    draft: bool,
    crop_resize: str = "image",
    orient: bool = True,
) -> Image.Image:
    """The body of :func:`load_image` once the header is accepted (and of
    :func:`prepare_image`, with ``orient=False``: no EXIF orientation).

    Crop and resize happen in the stored orientation and the (small) result is
    transposed last: the same crop as transposing first, and the same resize up to
    rounding of the filter weights (at most 1 grey level).
    """
    stored_w, stored_h = src.size
    # JPEG keeps EXIF in its header, so the orientation (and with it the draft size) is
    # known before decoding; other formats may keep it after the pixels (PNG eXIf), and
    # reading it decodes, so they are decoded first and decode errors read as such
    draftable = draft and src.format in ("JPEG", "MPO")
    if not draftable:
        _load(src, path, (stored_w, stored_h))
    try:
        orientation = src.getexif().get(_ORIENTATION_TAG, 1) if orient else 1
    except Exception as e:  # the file boundary: a corrupt EXIF block
        raise ImageError(path, f"cannot read EXIF ({type(e).__name__}: {e})") from e
    transpose = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if transpose is None:
        orientation = 1  # missing, 1, or out of range (as PIL's exif_transpose reads it)
    swapped = transpose in (
        Image.Transpose.TRANSPOSE,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
    )
    shown_w, shown_h = (stored_h, stored_w) if swapped else (stored_w, stored_h)

    # the crop at original resolution, displayed then stored coordinates
    crop, (target_w, target_h) = crop_geometry(shown_w, shown_h, box, image_size, crop_resize, path)
    crop_w, crop_h = crop[2] - crop[0], crop[3] - crop[1]
    x1, y1, x2, y2 = _shown_to_stored(crop, orientation, shown_w, shown_h)
    if swapped:
        target_w, target_h = target_h, target_w

    # DCT scaling is uniform, so the factor depends only on the long sides
    scale = 1.0  # original pixels per decoded pixel
    factor = _draft_factor(
        max(crop_w, crop_h), max(target_w, target_h), min(stored_w, stored_h)
    )
    if draftable and factor > 1:
        drafted = src.draft("RGB", (stored_w // factor, stored_h // factor))
        if drafted is not None:  # (mode, (0, 0, width / scale, height / scale))
            scale = stored_w / drafted[1][2]
    _load(src, path, (stored_w, stored_h))

    # the crop in decoded pixels: an integer crop that covers it, then the exact
    # sub-pixel box inside that crop for the resize
    fx1, fy1, fx2, fy2 = x1 / scale, y1 / scale, x2 / scale, y2 / scale
    ix1, iy1 = max(0, math.floor(fx1)), max(0, math.floor(fy1))
    ix2, iy2 = min(src.size[0], math.ceil(fx2)), min(src.size[1], math.ceil(fy2))
    img = src
    if (ix1, iy1, ix2, iy2) != (0, 0, *src.size):
        img = img.crop((ix1, iy1, ix2, iy2))
    img = _to_rgb(img)
    exact = scale == 1.0 and (ix2 - ix1, iy2 - iy1) == (target_w, target_h)
    if not exact:
        sub_box = (fx1 - ix1, fy1 - iy1, fx2 - ix1, fy2 - iy1)
        img = img.resize((target_w, target_h), RESAMPLE, box=sub_box)
    if transpose is not None:
        img = img.transpose(transpose)
    if img is src:
        img = src.copy()  # detach from the file, which the caller closes
    img.info = {}  # EXIF/XMP orientation would rotate the upright pixels again
    return img


def _load(img: Image.Image, path: str, declared: tuple[int, int]) -> None:
    """Decode the pixels of ``img`` (a no-op once done); ``declared`` is the header's
    ``(width, height)``, named when the data ends too early."""
    try:
        img.load()
    except Exception as e:  # the file boundary: truncated or corrupt pixel data
        reason = f"cannot decode ({type(e).__name__}: {e})"
        if "truncated" in str(e):
            # PIL's byte count would include the padding of _checked_jpeg: not shown
            said = re.sub(r" \(\d+ bytes not processed\)", "", str(e))
            reason = (f"cannot decode: the image data ends before the {declared[0]}x{declared[1]} "
                      "pixels its header declares (a truncated file, or a header that overstates "
                      f"the size; {type(e).__name__}: {said})")
        raise ImageError(path, reason) from e


# ------------------------------------------------------------------------ file opening


def _file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def open_regular_file(path: str | os.PathLike) -> io.BufferedReader:
    """``path`` opened for binary reading once it is known to be a non-empty regular file.

    The bad-file policy for anything that reads image files (decoding here, hashing in
    the store): ``stat`` (which follows symbolic links) comes first, so a folder, FIFO or
    device is refused without being opened (opening some devices has side effects); the
    open is non-blocking, so a FIFO swapped in after the check cannot block it, and
    ``fstat`` on the open file checks again what was actually opened. Reads are then
    bounded by the file's size.

    Raises:
        ImageError: no such file, a broken symbolic link, a directory, a FIFO, a device, a
            socket, an empty file, or the OS refused (the reason says which).
    """
    path = _check_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        reason = "a broken symbolic link" if os.path.islink(path) else "no such file"
        raise ImageError(path, reason) from None
    except NotADirectoryError:
        raise ImageError(path, "no such file (a parent in the path is not a directory)") from None
    except OSError as e:
        raise ImageError(path, f"cannot read ({e.strerror or e})") from None
    _check_regular(path, st)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageError(path, f"cannot read ({e.strerror or e})") from None
    try:
        _check_regular(path, os.fstat(fd))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: ordinary reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_regular(path: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(path, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(path, f"is {_file_kind(st.st_mode)}, not a regular file")
    if st.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")


def check_image_type(path: str | os.PathLike) -> None:
    """Refuse ``path`` unless its extension is in :data:`IMAGE_EXTENSIONS`.

    The same rule :func:`list_images` applies to folders, for files named one by one
    (command lines, list files, the store): a type this install cannot decode (``.avif``
    without Pillow's AVIF plugin, ``.heic`` without a HEIF plugin, ``.txt``) is refused by
    name, before the file is opened.

    Raises:
        ImageError: ``unsupported image type '.xyz'; supported: .bmp, .gif, ...``.
    """
    path = _check_path(path)
    ext = os.path.splitext(path)[1]
    if ext.lower() not in IMAGE_EXTENSIONS:
        shown = f"{ext!r}" if ext else "(no extension)"
        raise ImageError(
            path, f"unsupported image type {shown}; supported: {', '.join(IMAGE_EXTENSIONS)}"
        )


# ------------------------------------------------------------------------ JPEG data check

# the end of an entropy-coded segment: 0xFF followed by anything but a stuffed zero or a
# restart marker (RST0..RST7 sit inside the segment)
_JPEG_SEGMENT_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
# start-of-frame markers with Huffman coding: 0xC0/0xC1 sequential, 0xC2 progressive,
# 0xC3 lossless (arithmetic-coded frames, 0xC9..0xCB, are not checked)
_SOF_SEQUENTIAL = (0xC0, 0xC1)
_SOF_HUFFMAN = (0xC0, 0xC1, 0xC2, 0xC3)
_SOF_ALL = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
# stuffed 0xFF bytes (all one bits: no valid Huffman code) after a single scan's data, so
# that libjpeg's read-ahead at the last block finds bytes instead of suspending, while a
# scan whose data runs out decodes at most a couple of blocks from them, then runs dry
_JPEG_PAD = b"\xff\x00" * 16


def _jpeg_layout(data: bytes | bytearray):
    """The frame and scans of the first image in JPEG ``data``, or None when the markers
    cannot be followed (PIL then judges the file alone).

    Returns ``(sof_marker, width, height, components, scans)``: ``components`` maps a
    component id to its ``(h, v)`` sampling factors; each scan is
    ``(component_ids, spectral_start, approx_high, data_start, data_end)``.
    """
    try:
        if data[:2] != b"\xff\xd8":
            return None
        pos, frame, scans = 2, None, []
        while pos + 1 < len(data):
            if data[pos] != 0xFF:
                return None
            while pos + 1 < len(data) and data[pos + 1] == 0xFF:  # fill bytes
                pos += 1
            marker = data[pos + 1]
            pos += 2
            if marker == 0xD9:  # EOI
                break
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
                continue
            (length,) = struct.unpack_from(">H", data, pos)
            if length < 2:
                return None
            segment = data[pos + 2:pos + length]
            pos += length
            if marker in _SOF_ALL:
                if frame is not None:
                    return None
                height, width, count = struct.unpack_from(">HHB", segment, 1)
                components = {}
                for k in range(count):
                    cid, hv = segment[6 + 3 * k], segment[7 + 3 * k]
                    components[cid] = (hv >> 4, hv & 15)
                frame = (marker, width, height, components)
            elif marker == 0xDA:  # SOS: the entropy-coded data follows the header
                count = segment[0]
                ids = tuple(segment[1 + 2 * k] for k in range(count))
                ss, ah = segment[1 + 2 * count], segment[3 + 2 * count] >> 4
                end = _JPEG_SEGMENT_END.search(data, pos)
                stop = len(data) if end is None else end.start()
                scans.append((ids, ss, ah, pos, stop))
                pos = stop
        if frame is None or not scans:
            return None
        return (*frame, scans)
    except (IndexError, struct.error):
        return None


def _jpeg_blocks(width: int, height: int, components: dict, cid: int) -> int:
    """8x8 blocks of component ``cid`` in a ``width x height`` frame (without MCU padding)."""
    hmax = max(h for h, _ in components.values())
    vmax = max(v for _, v in components.values())
    h, v = components[cid]
    cw, ch = -(-width * h // hmax), -(-height * v // vmax)
    return -(-cw // 8) * -(-ch // 8)


def _checked_jpeg(src: Image.Image, path: str) -> Image.Image:
    """``src`` (a JPEG opened by :func:`open_image`) reopened over its data in memory,
    arranged so that pixel data ending before the header's size is an error (see
    :func:`load_image`); ``src`` is closed. Files whose markers cannot be followed are
    left to PIL as they are."""
    width, height = src.size
    try:
        fp = src.fp
        fp.seek(0)
        data = bytearray(fp.read())  # a regular file (open_image checked): its size bounds this
    except Exception as e:  # the file boundary
        src.close()
        raise ImageError(path, f"cannot read ({type(e).__name__}: {e})") from e
    src.close()
    layout = _jpeg_layout(data)
    if layout is not None:
        marker, w, h, components, scans = layout
        ids = set(components)
        if h > 0 and all(set(scan[0]) <= ids for scan in scans):
            if marker in _SOF_SEQUENTIAL and len(scans) == 1 and set(scans[0][0]) == ids:
                # one scan holds every block: without the end marker after it, libjpeg
                # stops with "truncated" if the data ends early instead of padding grey
                del data[scans[0][4]:]
                data += _JPEG_PAD
            elif marker in _SOF_HUFFMAN:
                for k, (scan_ids, ss, ah, start, stop) in enumerate(scans):
                    if marker == 0xC2 and (ss != 0 or ah != 0):
                        continue  # progressive AC and refinement scans can code runs of blocks
                    need = sum(_jpeg_blocks(w, h, components, c) for c in scan_ids)  # bits
                    have = 8 * (stop - start)
                    if have < need:
                        raise ImageError(
                            path,
                            f"the image data ends before the {width}x{height} pixels its header "
                            f"declares: scan {k + 1} holds {stop - start} bytes, and its "
                            f"{need} blocks need at least {-(-need // 8)} (a truncated file, or "
                            "a header that overstates the size)",
                        )
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=["JPEG"])  # the JPEG plugin opens MPO too
    except Exception as e:  # the file boundary
        raise ImageError(path, f"cannot open ({type(e).__name__}: {e})") from e
    if img.size != (width, height):  # cannot happen: the same header
        img.close()
        raise ImageError(path, f"header size changed on reopening ({width}x{height} -> {img.size})")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img`` (any supported mode) as ``"RGB"``; alpha is composited onto white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit grey (mode I is how older PIL opens 16-bit PNG/TIFF): 0..65535 -> 0..255
        # rounded half up, in exact integer arithmetic; values outside 0..65535 clip.
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        # PIL's convention for float images is the 0..255 range of "L"; NaN reads as 0
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        grey = np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _draft_factor(crop_long: int, target_long: int, stored_short: int) -> int:
    """The largest JPEG DCT scale 1/k (k in 8, 4, 2) that keeps the decoded crop at
    least :data:`DRAFT_MARGIN` times the target; 1 when none does."""
    for factor in (8, 4, 2):
        if factor * DRAFT_MARGIN * target_long <= crop_long and factor <= stored_short:
            return factor
    return 1


def _shown_to_stored(
    box: tuple[int, int, int, int], orientation: int, shown_w: int, shown_h: int
) -> tuple[int, int, int, int]:
    """A box in displayed coordinates mapped into the stored (pre-EXIF) image."""

    def point(u: int, v: int) -> tuple[int, int]:
        return {
            1: (u, v),
            2: (shown_w - u, v),
            3: (shown_w - u, shown_h - v),
            4: (u, shown_h - v),
            5: (v, u),
            6: (v, shown_w - u),
            7: (shown_h - v, shown_w - u),
            8: (shown_h - v, u),
        }[orientation]

    (ax, ay), (bx, by) = point(box[0], box[1]), point(box[2], box[3])
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def _round_box(
    box: tuple[float, float, float, float], width: int, height: int, path: str
) -> tuple[int, int, int, int]:
    """``box`` rounded outward to whole pixels and clamped to ``width x height``."""
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    if x2 <= x1 or y2 <= y1:
        raise ImageError(
            path,
            f"bbox {tuple(box)} does not overlap the image of {width}x{height} pixels "
            "(displayed orientation)",
        )
    return x1, y1, x2, y2


def _check_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """``bbox`` as 4 finite floats with ``x1 < x2`` and ``y1 < y2``."""
    try:
        values = tuple(bbox)
    except TypeError:
        raise TypeError(f"bbox must be a sequence (x1, y1, x2, y2), got {bbox!r}") from None
    if len(values) != 4 or not all(
        isinstance(v, Real) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"bbox must be 4 numbers (x1, y1, x2, y2), got {bbox!r}")
    x1, y1, x2, y2 = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"bbox must be finite, got {bbox!r}")
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bbox {bbox!r} is empty or inverted; expected x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def _pixel_limit(max_pixels: int | None) -> int | None:
    """The pixel limit in force: ``max_pixels``, else PIL's at call time."""
    if max_pixels is None:
        return Image.MAX_IMAGE_PIXELS
    _check_positive_int("max_pixels", max_pixels)
    return max_pixels


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


def _check_path(path: object, name: str = "path") -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _channel_values(name: str, values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {values!r}")
    return arr
