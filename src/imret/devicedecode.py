"""JPEG decoding on the accelerator: the GPU path of extraction.

At 1024 px a GPU describes images faster than a few CPU cores can decode them, so decoding
moves to the device too: the worker threads read the file (header checks first, as
:func:`imret.images.open_image` does them), ``torchvision.io.decode_jpeg`` decodes it on the
device (nvJPEG on CUDA; libjpeg-turbo when ``device`` is the CPU, which is how the tests run
this path), EXIF orientation is applied, and the crop and resize happen on the device with
the input sizes of the CPU path (:func:`imret.images.crop_geometry`). Only the filter differs:
bicubic with antialiasing on the device, Lanczos in Pillow (descriptor cosine ≥ 0.999 in the
tests). Files that are not JPEG, and JPEGs the device decoder refuses, return ``None``: the
caller decodes them on the CPU as before.

torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (a
``DeprecationWarning``, hidden outside ``__main__`` and tests); they still work, and this module
is the one place to change when they go.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

from .images import crop_geometry, open_image, open_regular_file

__all__ = ["DECODERS", "device_decoding", "read_jpeg", "decode_jpeg_on"]

DECODERS = ("auto", "cpu", "device")
"""``auto``: on the device when it is a CUDA GPU, else Pillow on the CPU; ``cpu``: Pillow;
``device``: torchvision on the extraction device (the CPU too)."""

_JPEG_FORMATS = ("JPEG", "MPO")


def device_decoding(decode: str, device: torch.device) -> bool:
    """Whether ``decode`` means decoding on ``device``; raises ``ValueError`` naming the choices."""
    if decode not in DECODERS:
        raise ValueError(f"unknown decode {decode!r}; available: {', '.join(DECODERS)}")
    if decode == "cpu":
        return False
    if decode == "auto" and device.type != "cuda":
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:  # torchvision without its image ops: the CPU path
        return False
    return True


def read_jpeg(path: str | os.PathLike, *, max_pixels: int | None = None) -> torch.Tensor | None:
    """The bytes of the JPEG file at ``path`` as a 1-D uint8 tensor, after the header checks of
    :func:`imret.images.open_image` (a regular non-empty file, an image, under ``max_pixels``);
    ``None`` for another format. Raises :class:`~imret.images.ImageError` for a bad file."""
    with open_image(path, max_pixels=max_pixels) as im:
        if im.format not in _JPEG_FORMATS:
            return None
    with open_regular_file(path) as f:
        data = f.read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_jpeg_on(
    data: torch.Tensor,
    device: torch.device | str,
    *,
    image_size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    bbox: Sequence[float] | None = None,
    crop_resize: str = "image",
    path: str = "<image>",
) -> torch.Tensor | None:
    """Decode JPEG bytes on ``device`` into the network input of the CPU path's size:
    ``(3, h, w)`` float32, normalised by ``mean`` / ``std`` (0..1 scale), on ``device``.

    ``None`` when the decoder refuses the data (the caller falls back to Pillow, which names
    the fault). Raises :class:`~imret.images.ImageError` for a box outside the image."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    try:
        img = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:  # corrupt, truncated, CMYK or otherwise unsupported by this decoder
        return None
    h, w = img.shape[-2:]
    box = None if bbox is None else tuple(float(v) for v in bbox)
    (x1, y1, x2, y2), (tw, th) = crop_geometry(w, h, box, image_size, crop_resize, path)
    x = img[:, y1:y2, x1:x2].unsqueeze(0).float()
    if (x2 - x1, y2 - y1) != (tw, th):
        x = F.interpolate(x, size=(th, tw), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 255)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
    return ((x - m) / s)[0].contiguous()


