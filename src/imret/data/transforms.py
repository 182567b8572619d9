"""Training augmentations for instance retrieval, driven by an explicit random generator.

A transform here is any callable ``transform(img, rng) -> img`` taking an RGB PIL image
and a :class:`random.Random`; it draws every random number from ``rng`` and touches no
global random state, so the same ``(image, rng seed)`` always gives the same pixels, in
any process and any DataLoader worker. :class:`imret.data.ImageListDataset` seeds ``rng``
from ``(seed, epoch, index)`` (:func:`sample_rng`), which is what lets a trainer
materialise the augmented batch twice (multistage backpropagation) and get identical
tensors.

What is "appropriate to retrieval": instance retrieval must keep the identity of one
building or object, so the defaults are mild (after the landmark-retrieval practice of
training on whole images at 362-1024 px, Radenović et al. TPAMI 2018, and of light
random-resized crops on GLDv2, Weyand et al. CVPR 2020): a crop keeping 50-100 % of the
area with aspect 3/4..4/3, colour jitter of ±20 % in brightness, contrast and
saturation, no hue shift, no rotation and *no horizontal flip* (a mirrored shop sign or
inscription is a different instance, and many facades are not symmetric; turn it on with
``hflip=0.5`` for data where that does not matter).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from ..images import RESAMPLE

__all__ = [
    "Transform",
    "RetrievalAugment",
    "TorchvisionTransform",
    "sample_rng",
    "OUTPUT_MODES",
]

Transform = Callable[[Image.Image, random.Random], Image.Image]
"""The transform protocol: ``transform(img, rng)`` -> a new RGB PIL image."""

OUTPUT_MODES = ("long_side", "square")

# the fill for pixels a rotation uncovers: ImageNet's mean colour, ~0 after normalising
_FILL = (124, 116, 104)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator for image ``index`` in ``epoch`` of a run seeded with ``seed``.

    The three integers are mixed by :class:`numpy.random.SeedSequence`, so neighbouring
    indices and epochs give unrelated streams; the result depends on nothing else
    (not the process, the worker, ``PYTHONHASHSEED`` or any global generator).
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


class RetrievalAugment:
    """Random resized crop, optional flip and rotation, and colour jitter for retrieval.

    Steps, each drawing from ``rng`` in this order: crop (area fraction uniform in
    ``scale``, aspect ratio log-uniform in ``ratio``, position uniform; up to 10 draws,
    then the largest centred crop within ``ratio``, as torchvision's RandomResizedCrop),
    resize, horizontal flip with probability ``hflip``, rotation uniform in
    ``±rotation`` degrees (uncovered corners filled with the ImageNet mean colour), and
    brightness / contrast / saturation / hue jitter in a random order.

    Args:
        size: output size in pixels. ``output="long_side"``: the crop's long side is
            resized to ``size`` (up or down) keeping its aspect, so shapes vary and a batch
            needs a list collate or batch size 1 (cirtorch trains this way).
            ``output="square"``: the crop is resized to ``size x size`` (aspect changes by
            at most ``ratio``), so images stack into one batch tensor.
        scale: range of the crop's area as a fraction of the image's; ``(1, 1)`` keeps
            the whole image.
        ratio: range of the crop's aspect ratio (width / height), before resizing.
        hflip: probability of a horizontal flip (default 0: see the module notes).
        rotation: largest rotation in degrees (default 0).
        brightness, contrast, saturation: jitter strengths ``s``: the factor is uniform
            in ``[1 - s, 1 + s]`` (0 turns the jitter off).
        hue: hue shift uniform in ``[-hue, hue]`` of a full turn, ``hue <= 0.5``.

    To avoid upscaling the crop, load the images a bit larger than ``size``, e.g. at
    ``size / sqrt(scale[0])`` (the dataset's ``image_size``).
    """

    def __init__(
        self,
        size: int,
        *,
        output: str = "long_side",
        scale: Sequence[float] = (0.5, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.0,
        rotation: float = 0.0,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.0,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if output not in OUTPUT_MODES:
            raise ValueError(f"unknown output {output!r}; available: {', '.join(OUTPUT_MODES)}")
        lo, hi = _range("scale", scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        rlo, rhi = _range("ratio", ratio)
        if not 0 < rlo <= rhi:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip!r}")
        if not 0 <= rotation <= 180:
            raise ValueError(f"rotation must be in [0, 180] degrees, got {rotation!r}")
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} jitter must be in [0, 1), got {value!r}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {hue!r}")
        self.size = int(size)
        self.output = output
        self.scale = (lo, hi)
        self.ratio = (rlo, rhi)
        self.hflip = float(hflip)
        self.rotation = float(rotation)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)

    def __repr__(self) -> str:
        keys = ("size", "output", "scale", "ratio", "hflip", "rotation", "brightness", "contrast", "saturation", "hue")
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """A random crop ``(x1, y1, x2, y2)`` of a ``width x height`` image (see the class doc)."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                x = rng.randint(0, width - w)
                y = rng.randint(0, height - h)
                return x, y, x + w, y + h
        # fallback: the largest centred crop whose aspect lies within ratio
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, max(1, round(width / self.ratio[0]))
        elif aspect > self.ratio[1]:
            w, h = max(1, round(height * self.ratio[1])), height
        else:
            w, h = width, height
        x, y = (width - w) // 2, (height - h) // 2
        return x, y, x + w, y + h

    def output_size(self, crop_w: int, crop_h: int) -> tuple[int, int]:
        """The ``(w, h)`` a ``crop_w x crop_h`` crop is resized to."""
        if self.output == "square":
            return self.size, self.size
        long_side = max(crop_w, crop_h)
        short = max(1, round(min(crop_w, crop_h) * self.size / long_side))
        return (self.size, short) if crop_w >= crop_h else (short, self.size)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f"img must be a PIL image, got {type(img).__name__}")
        if not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
        if img.mode != "RGB":
            img = img.convert("RGB")
        box = self.crop_box(*img.size, rng)
        out_size = self.output_size(box[2] - box[0], box[3] - box[1])
        img = img.resize(out_size, RESAMPLE, box=box)
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rotation > 0:
            angle = rng.uniform(-self.rotation, self.rotation)
            img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)
        jitters = [
            (self.brightness, ImageEnhance.Brightness),
            (self.contrast, ImageEnhance.Contrast),
            (self.saturation, ImageEnhance.Color),
        ]
        steps: list[Callable[[Image.Image], Image.Image]] = []
        for strength, enhancer in jitters:
            if strength > 0:
                factor = rng.uniform(1 - strength, 1 + strength)
                steps.append(lambda im, e=enhancer, f=factor: e(im).enhance(f))
        if self.hue > 0:
            shift = rng.uniform(-self.hue, self.hue)
            steps.append(lambda im, s=shift: _shift_hue(im, s))
        rng.shuffle(steps)
        for step in steps:
            img = step(img)
        return img


class TorchvisionTransform:
    """Adapter: a torchvision transform (PIL in, PIL out) made deterministic under ``rng``.

    torchvision draws from torch's global generator; this runs it inside
    :func:`torch.random.fork_rng` seeded from ``rng``, so the caller's torch state is
    restored afterwards and the result depends only on ``rng``. Transforms that use
    Python's or numpy's global generators are not covered. The wrapped transform must
    return a PIL image (keep ``ToTensor``/``Normalize`` out: the dataset normalises).
    """

    def __init__(self, transform: Callable[[Image.Image], Image.Image]) -> None:
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.transform = transform

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            out = self.transform(img)
        if not isinstance(out, Image.Image):
            raise TypeError(
                f"the wrapped transform returned {type(out).__name__}, expected a PIL image; "
                "leave ToTensor/Normalize out (the dataset converts and normalises)"
            )
        return out


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """``img`` with its hue rotated by ``shift`` of a full turn."""
    h, s, v = img.convert("HSV").split()
    offset = round(shift * 256)
    h = h.point([(i + offset) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _range(name: str, values: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (min, max), got {values!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name} must be finite with min <= max, got {values!r}")
    return lo, hi
