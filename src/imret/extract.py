"""Batched, multi-scale descriptor extraction: images -> ``(N, D)`` float32 rows in input order.

The pipeline: a thread pool decodes images (PIL releases the GIL while decoding; JPEG
draft mode lets libjpeg downscale while decoding), images of equal size are grouped into
batches, each batch runs through the model at every scale under ``torch.inference_mode``
(channels-last, optional bf16/fp16 autocast), and the per-scale descriptors are combined
with the GeM power mean of Radenović et al. (TPAMI 2018) and L2-normalised. Rows are
written into a preallocated matrix by input index, so any completion order is correct.

How each scale's input is made and how scales are combined is the model's multi-scale mode
(``model.spec.multiscale``, :data:`~imret.models.spec.MULTISCALE_MODES`), so that a checkpoint
imported from cirtorch or dirtorch gives that project's multi-scale descriptors:

- ``"imret"``: bilinear resize of the network input to ``round(s * side)``, antialiased when
  shrinking; power mean with the model's :meth:`~imret.models.net.RetrievalNet.multiscale_power`.
- ``"cirtorch"``: ``F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)``
  (sides ``floor(s * side)``, no antialiasing), as cirtorch's ``extract_ms``; the same power
  rule (cirtorch's ``msp``: the learned GeM p without whitening, else 1).
- ``"dirtorch"``: each scale is the 8-bit image resized by Pillow's bilinear filter to
  ``int(0.5 + s * side)``, as dirtorch's ``Scale(s)`` transform; the descriptors are combined
  by dirtorch's ``pool(x, "gem", 3)`` (sign-preserving power mean, p = 3, magnitudes clamped
  at 1e-6 before each power) and L2-normalised, as its ``test_dir`` / ``extract_features``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import unicodedata
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ._checks import positive_int
from .fileio import atomic_path, atomic_write_bytes
from .images import (
    ImageError,
    check_image_input,
    check_image_type,
    image_label,
    image_list,
    load_image,
    prepare_image,
    to_tensor,
)
from .compiled import (AUTO_MIN_EAGER_SECONDS, AUTO_TIMED_IMAGES, CompiledForward, check_compile,
                       compile_decision, compile_pays, compiled_forward, is_cached)
from .models.spec import MULTISCALE_MODES
from .models.net import RetrievalNet
from .precision import PRECISIONS, autocast_dtype
from .refinement import Refinement, check_refinement, combine_scales_max, refined_descriptors, refined_power, relup_hooks

__all__ = [
    "SCALE_PRESETS", "SkippedImage", "Extraction", "extract", "extract_descriptors", "describe_tensors", "combine_scales", "PRECISIONS",
    "MULTISCALE_MODES", "combine_scales_sympow", "scale_input", "check_multiscale",
    "SavedExtraction", "save_extraction", "load_extraction", "read_paths_file", "is_plain_path",
]

BBox = tuple[float, float, float, float]
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

# Named multi-scale settings: factors applied to the ``image_size`` input.
SCALE_PRESETS: dict[str, tuple[float, ...]] = {
    "ms3": (1.0, 2 ** -0.5, 0.5),  # cirtorch's multi-scale test (Radenovic et al.)
    "dolg5": (8 ** -0.5, 0.5, 2 ** -0.5, 1.0, 2 ** 0.5),  # DOLG's test scales, 0.354 .. 1.414 (Yang et al.)
    "sg3": (2 ** -0.5, 1.0, 2 ** 0.5),  # SuperGlobal's test scales (Shao et al.)
}


@dataclass(frozen=True)
class SkippedImage:
    """An input that could not be used, with the reason."""

    index: int
    path: str
    reason: str


@dataclass
class Extraction:
    """Result of :func:`extract`.

    Attributes:
        descriptors: ``(M, D)`` float32, one L2-normalised row per image that worked.
        indices: ``(M,)`` int64 positions of those images in the input list.
        paths: the M paths (for images given in memory, their label, such as
            ``<PIL image #3: 640x480 RGB>``; see :func:`imret.images.image_label`).
        skipped: the inputs that failed, in input order.
        small: input positions of images that reached the network with a side under
            :data:`SMALL_SIDE` pixels (after ``min_size``).
        compiled: whether the network ran as a compiled graph (:mod:`imret.compiled`).
        compile_note: why it did or did not (``compile`` setting, fallback reason).
    """

    descriptors: np.ndarray
    indices: np.ndarray
    paths: list[str]
    skipped: list[SkippedImage] = field(default_factory=list)
    small: list[int] = field(default_factory=list)  # input positions whose network input had a side < SMALL_SIDE
    compiled: bool = False
    compile_note: str = ""


def combine_scales(descs: Sequence[torch.Tensor], power: float = 1.0) -> torch.Tensor:
    """Combine per-scale descriptors ``S x (B, D)`` into ``(B, D)``: ``(mean_s v_s^power)^(1/power)``, L2-normalised.

    ``power`` = 1 is the plain average; GeM networks use their learned p (Radenović et al.).
    A power other than 1 needs non-negative descriptors.
    """
    if len(descs) == 1:
        return F.normalize(descs[0], dim=1)
    stack = torch.stack([d.float() for d in descs])
    if power == 1.0:
        v = stack.mean(0)
    else:
        if (stack < 0).any():
            raise ValueError(f"power-mean over scales with power={power} needs non-negative descriptors")
        v = stack.pow(power).mean(0).pow(1.0 / power)
    return F.normalize(v, dim=1)


DIRTORCH_GEM_P = 3.0  # dirtorch's test_dir / extract_features --gemp default
_SYMPOW_EPS = 1e-6  # dirtorch's sympow clamp


def _sympow(x: torch.Tensor, p: float) -> torch.Tensor:
    """``sign(x) * max(|x|, 1e-6)^p``; zeros stay zero (their sign is 0)."""
    return x.abs().clamp(min=_SYMPOW_EPS).pow(p) * torch.sign(x)


def combine_scales_sympow(descs: Sequence[torch.Tensor], p: float = DIRTORCH_GEM_P) -> torch.Tensor:
    """dirtorch's scale pooling: ``S x (B, D) -> (B, D)``, ``L2(sympow(mean_s sympow(v_s, p), 1/p))``
    with ``sympow(x, q) = sign(x) max(|x|, 1e-6)^q`` (deep-image-retrieval ``common.pool(..., "gem")``,
    then ``F.normalize``). One scale is only normalised, as there. Signed descriptors (after
    whitening) are fine; note that the clamp lifts every mean below 1e-6 in magnitude (a
    component under 0.01) to ``±0.01``."""
    if len(descs) == 1:
        return F.normalize(descs[0].float(), dim=1)
    stack = torch.stack([d.float() for d in descs])
    return F.normalize(_sympow(_sympow(stack, p).mean(0), 1.0 / p), dim=1)


def check_multiscale(mode: str) -> str:
    """``mode`` when it is a multi-scale mode (:data:`MULTISCALE_MODES`), else ValueError naming them."""
    if mode not in MULTISCALE_MODES:
        raise ValueError(f"unknown multiscale mode {mode!r}; available: {', '.join(MULTISCALE_MODES)}")
    return mode


def _pil_scale_size(h: int, w: int, s: float) -> tuple[int, int] | None:
    """dirtorch's ``Scale(s)``: ``(int(0.5 + s h), int(0.5 + s w))``, or None when it leaves the
    image as it is (the same size, or the same short side: it resizes only when that changes)."""
    oh, ow = int(0.5 + s * h), int(0.5 + s * w)
    if (oh, ow) == (h, w) or min(oh, ow) == min(h, w):
        return None
    return max(1, oh), max(1, ow)


def _pil_rescale(x: torch.Tensor, size: tuple[int, int], mean, std) -> torch.Tensor:
    """Normalised inputs ``(B, 3, h, w)`` -> the same images resized by Pillow's bilinear filter
    to ``size`` (H, W) on their 8-bit pixels, normalised again: what a Pillow transform before
    ``ToTensor`` gives. The pixels are recovered exactly (they came from 8-bit images)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = ((x.detach().float().cpu() * sd + m) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    out = []
    for img in pixels.permute(0, 2, 3, 1).numpy():
        small = Image.fromarray(np.ascontiguousarray(img), "RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        out.append(to_tensor(small, mean, std))
    return torch.stack(out)


def scale_input(x: torch.Tensor, s: float, mode: str = "imret", mean=None, std=None) -> torch.Tensor:
    """The network input at scale ``s`` of the normalised batch ``x`` ``(B, 3, H, W)`` in multi-scale
    ``mode`` (see the module docstring); ``x`` itself at ``s == 1``. ``"dirtorch"`` needs the
    ``mean`` / ``std`` that normalised ``x`` (it resizes the 8-bit pixels; the result is on the CPU)."""
    if s == 1.0:
        return x
    if mode == "imret":
        size = _scaled_size(*x.shape[-2:], s)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1.0)
    if mode == "cirtorch":
        return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
    if mode == "dirtorch":
        if mean is None or std is None:
            raise ValueError("scale_input(mode='dirtorch') needs the mean and std that normalised x")
        size = _pil_scale_size(*x.shape[-2:], s)
        return x if size is None else _pil_rescale(x, size, mean, std)
    raise ValueError(f"unknown multiscale mode {mode!r}; available: {', '.join(MULTISCALE_MODES)}")


def _multiscale_of(model, multiscale: str | None) -> str:
    """The multi-scale mode to use: ``multiscale``, else the model spec's (``"imret"`` without one)."""
    if multiscale is None:
        multiscale = getattr(getattr(model, "spec", None), "multiscale", "imret")
    return check_multiscale(multiscale)


def _check_precision(precision: str, device: torch.device) -> torch.dtype | None:
    return autocast_dtype(precision, device)


def _check_run(scales: Sequence[float], device, batch_size: int | None) -> tuple[torch.device, int]:
    """Checked scales; the device; the batch size (default 1 on the CPU, 8 on GPUs)."""
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"scales must be positive numbers, got {list(scales)}")
    device = torch.device(device)
    if batch_size is None:
        batch_size = 1 if device.type == "cpu" else 8
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return device, batch_size


def _scaled_size(h: int, w: int, s: float) -> tuple[int, int]:
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def _run_batch(
    model: RetrievalNet,
    x: torch.Tensor,
    scales: Sequence[float],
    power: float,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    refinement: Refinement | None = None,
    multiscale: str = "imret",
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(B, 3, H, W)`` normalised inputs -> ``(B, D)`` combined descriptors; ``forward`` (one
    scale's input -> float32 descriptors, e.g. a compiled graph) replaces the eager forward."""
    host = x
    x = x.to(device, non_blocking=True)
    descs = []
    for s in scales:
        if multiscale == "dirtorch":  # Pillow resizes on the host
            xs = scale_input(host, s, multiscale, model.mean, model.std).to(device, non_blocking=True)
        else:
            xs = scale_input(x, s, multiscale)
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        if forward is not None:
            descs.append(forward(xs))
            continue
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if refinement is None:
                descs.append(model(xs).float())
            else:
                descs.append(refined_descriptors(model, xs, refinement).float())
    if refinement is not None and refinement.scale_max:
        return combine_scales_max(descs)
    if multiscale == "dirtorch":
        return combine_scales_sympow(descs)
    return combine_scales(descs, power)


SMALL_SIDE = 96
"""Network inputs with a shorter side than this are reported (:func:`extract` warns): at the
usual stride 32 they leave a feature map of 2 x 2 cells or less for pooling."""


def upscale_to(img: Image.Image, min_size: int | None) -> Image.Image:
    """``img`` enlarged (bicubic, aspect kept) so that its short side is ``min_size``, when
    it is smaller; unchanged otherwise or when ``min_size`` is None."""
    if min_size is None:
        return img
    w, h = img.size
    short = min(w, h)
    if short >= min_size:
        return img
    f = min_size / short
    size = (min_size, round(h * f)) if w == short else (round(w * f), min_size)
    return img.resize(size, Image.Resampling.BICUBIC)


def _decode(i: int, image, bbox, image_size: int, draft: bool, max_pixels, crop_resize, mean, std,
            min_size: int | None = None, on_device: torch.device | None = None):
    try:
        if isinstance(image, str):
            check_image_type(image)
            if on_device is not None and min_size is None:
                x = _decode_on(on_device, image, bbox, image_size, max_pixels, crop_resize, mean, std)
                if x is not None:
                    return i, x, None
            img = load_image(image, image_size=image_size, bbox=bbox, draft=draft, max_pixels=max_pixels,
                             crop_resize=crop_resize)
        else:  # a PIL image or an RGB array (checked by extract)
            img = prepare_image(image, image_size=image_size, bbox=bbox, crop_resize=crop_resize,
                                name=image_label(image, i))
        return i, to_tensor(upscale_to(img, min_size), mean, std), None
    except ImageError as e:
        return i, None, e


def _decode_on(device: torch.device, path: str, bbox, image_size: int, max_pixels, crop_resize, mean, std):
    """The network input of a JPEG decoded on ``device``, or None for Pillow's path (another
    format, or data the device decoder refuses: Pillow then decodes it or names the fault)."""
    from .devicedecode import decode_jpeg_on, read_jpeg

    data = read_jpeg(path, max_pixels=max_pixels)
    if data is None:
        return None
    return decode_jpeg_on(data, device, image_size=image_size, mean=mean, std=std, bbox=bbox,
                          crop_resize=crop_resize, path=path)


def _prefetch(pool: ThreadPoolExecutor, jobs, depth: int) -> Iterator:
    window: deque[Future] = deque()
    for job in jobs:
        window.append(pool.submit(*job))
        if len(window) >= depth:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def extract(
    model: RetrievalNet,
    images: Sequence[ImageInput],
    *,
    bboxes: Sequence[BBox | None] | None = None,
    scales: Sequence[float] = (1.0,),
    image_size: int = 1024,
    batch_size: int | None = None,
    workers: int = 2,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    channels_last: bool = True,
    draft: bool = True,
    max_pixels: int | None = None,
    crop_resize: str = "image",
    on_error: str = "skip",
    progress: bool = False,
    min_size: int | None = None,
    refinement: Refinement | None = None,
    multiscale: str | None = None,
    compile: str = "auto",
    decode: str = "auto",
    compile_horizon: int | None = None,
) -> Extraction:
    """Extract L2-normalised descriptors of ``images``, skipping or raising on bad files.

    Args:
        model: a :class:`RetrievalNet`; it is put in eval mode and moved to ``device``
            (and to channels-last memory format when ``channels_last``).
        images: image paths, or images in memory: ``PIL.Image.Image`` objects or
            ``H x W x 3`` uint8 RGB arrays (used as they are, without EXIF orientation; see
            :func:`imret.images.prepare_image`), in any mix. Anything else raises
            ``TypeError`` before any work. A path whose extension is not in
            :data:`imret.images.IMAGE_EXTENSIONS` (a type this install cannot decode), or
            that is not a regular file (a folder, FIFO or device: never opened blocking,
            never read), is skipped with the reason, as is any file that fails to decode.
        bboxes: per image ``(x1, y1, x2, y2)`` crop in original pixels (queries of the
            revisited Oxford/Paris protocol), or None. Cropping happens before resizing;
            ``crop_resize="image"`` (default) scales the crop by the whole image's factor, as
            the revisited Oxford/Paris evaluation code does, ``"crop"`` fits the crop itself
            to ``image_size`` (see :func:`imret.images.load_image`).
        scales: resize factors of the ``image_size`` input, e.g. ``(1, 2**-0.5, 0.5)``;
            descriptors are combined by the GeM power mean (``model.multiscale_power()``),
            or as ``multiscale`` says.
        image_size: long side in pixels after resizing (never upscaled; aspect kept).
        batch_size: images of equal size per forward pass; default 1 on the CPU (at ~1024 px
            a batch of 4 ran 1.5-2x slower per image than single images, cache-bound; see
            BENCHMARKS.md) and 8 on GPUs.
        workers: decoding threads (0 decodes in the calling thread).
        precision: ``"fp32"``, ``"bf16"`` (CPUs with AVX512-BF16/AMX, recent GPUs) or ``"fp16"`` (GPU).
        draft: let libjpeg downscale large JPEGs while decoding (see :mod:`imret.images`).
        max_pixels: reject images with more pixels (default: PIL's limit).
        on_error: ``"skip"`` reports bad files in ``Extraction.skipped``; ``"raise"`` raises
            the first :class:`~imret.images.ImageError`.
        progress: show a tqdm progress bar (stderr).
        min_size: enlarge images whose short side (after the crop and ``image_size``) is
            smaller, to this many pixels (bicubic). Without it, inputs with a short side
            under :data:`SMALL_SIDE` are described as they are and a ``UserWarning`` says how
            many (their descriptors pool a map of a few cells only); the result's ``small``
            lists them either way.
        refinement: test-time SuperGlobal switches (GeM+, regional GeM, max over scales,
            ReLU-shift; see :class:`imret.refinement.Refinement`), applied without changing
            the weights; None or ``Refinement()`` changes nothing. ReLU-shift hooks the
            model's trunk for the duration of the call.
        multiscale: how each scale's input is made and the scales combined
            (:data:`MULTISCALE_MODES`: ``"imret"``, ``"cirtorch"``, ``"dirtorch"``; see the
            module docstring); None (default) takes the model's ``spec.multiscale``, which a
            cirtorch or dirtorch import sets to its project's.
        compile: run the network through ``torch.compile`` with frozen weights (see
            :mod:`imret.compiled`): ``"on"``, ``"off"``, or ``"auto"`` (default: on the CPU for
            runs of :data:`~imret.compiled.AUTO_MIN_IMAGES` images or more, or when this
            process already compiled the network), and there only when the first images,
            timed eagerly, predict enough eager work left to repay the compilation
            (:func:`imret.compiled.compile_pays`). A failed compilation warns and falls back
            to eager mode; ``Extraction.compile_note`` says what ran and why.
        compile_horizon: for ``compile="auto"``, the images still to describe in the run this
            call belongs to, its own included (a store adding a folder in batches passes the
            folder's); default: this call's.
        decode: where JPEG files are decoded (:data:`imret.devicedecode.DECODERS`): ``"auto"``
            (default) on the device when it is a CUDA GPU (nvJPEG, in the worker threads; other
            formats, files it refuses and ``min_size`` enlargements go through Pillow), else
            Pillow on the CPU; ``"cpu"``: Pillow always; ``"device"``: torchvision's decoder on
            ``device`` whatever it is. The device path resizes with bicubic antialiasing
            instead of Lanczos (the same input sizes; descriptors differ by ~1e-3 in cosine)
            and does not use ``draft``; the peers' ``multiscale`` modes always use Pillow.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"unknown on_error {on_error!r}; available: 'skip', 'raise'")
    images = [check_image_input(x, i) for i, x in enumerate(image_list(images))]
    labels = [image_label(x, i) for i, x in enumerate(images)]
    device, batch_size = _check_run(scales, device, batch_size)
    from .devicedecode import device_decoding

    use_device = device_decoding(decode, device)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    n = len(images)
    if bboxes is not None and len(bboxes) != n:
        raise ValueError(f"got {len(bboxes)} bboxes for {n} images")
    amp_dtype = _check_precision(precision, device)
    check_compile(compile)
    if min_size is not None:
        min_size = positive_int(min_size, "min_size")

    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    refinement = check_refinement(model, refinement)
    power = refined_power(model, refinement)
    mode = _multiscale_of(model, multiscale)
    # the peers' multi-scale modes reproduce their Pillow decoding and resizing: Pillow only
    on_device = device if use_device and mode == "imret" else None
    horizon = n if compile_horizon is None else max(n, int(compile_horizon))
    forward, compile_note = _forward_for(model, compile, device, amp_dtype, channels_last, refinement, horizon)
    timing = forward is _TIME_FIRST
    if timing:
        forward = None
    timed = [0.0, 0]  # eager seconds and images, while "auto" times the first ones
    out = np.zeros((n, model.dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    skipped: list[SkippedImage] = []

    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc="extract", unit="img", disable=not progress)
    buckets: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    pending = 0
    max_pending = max(4 * batch_size, 16)

    def flush(key: tuple[int, int]) -> None:
        nonlocal pending, forward, compile_note, timing
        items = buckets.pop(key)
        pending -= len(items)
        x = torch.stack([t.to(device) if on_device is not None else t for _, t in items])
        if device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()  # the copy to the GPU then overlaps (non_blocking in _run_batch)
        t0 = time.perf_counter()
        with torch.inference_mode():
            d = _run_batch(model, x, scales, power, device, amp_dtype, channels_last, refinement, mode, forward)
        if timing:
            timed[0] += time.perf_counter() - t0
            timed[1] += len(items)
            if timed[1] >= AUTO_TIMED_IMAGES:
                timing = False
                rate, left = timed[0] / timed[1], horizon - int(ok.sum()) - len(items)
                if compile_pays(left, rate):
                    forward, _ = _forward_for(model, "on", device, amp_dtype, channels_last, refinement, left)
                    compile_note = f"auto: compiled after {timed[1]} eager images ({rate:.2f} s each, {left} left)"
                else:
                    compile_note = (f"auto: eager ({rate:.2f} s per image, {left} left: ~{rate * left:.0f} s; "
                                    f"compiling pays from {AUTO_MIN_EAGER_SECONDS:.0f} s)")
        idx = [i for i, _ in items]
        out[idx] = d.cpu().numpy()
        ok[idx] = True
        bar.update(len(items))

    jobs = (
        (_decode, i, images[i], None if bboxes is None else bboxes[i], image_size, draft, max_pixels, crop_resize,
         model.mean, model.std, min_size, on_device)
        for i in range(n)
    )
    small: list[int] = []
    executor = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
    hooks = contextlib.ExitStack()
    if refinement is not None and refinement.relup is not None:
        hooks.enter_context(relup_hooks(model, refinement.relup))
    try:
        results = _prefetch(executor, jobs, 2 * workers + batch_size) if executor else (job[0](*job[1:]) for job in jobs)
        for i, tensor, err in results:
            if err is not None:
                if on_error == "raise":
                    raise err
                skipped.append(SkippedImage(i, labels[i], err.reason))
                bar.update(1)
                continue
            key = tuple(tensor.shape[-2:])
            if min(key) < SMALL_SIDE:
                small.append(i)
            buckets.setdefault(key, []).append((i, tensor))
            pending += 1
            if len(buckets[key]) >= batch_size:
                flush(key)
            elif pending > max_pending:  # many distinct sizes: run the fullest bucket
                flush(max(buckets, key=lambda k: len(buckets[k])))
        for key in list(buckets):
            flush(key)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        hooks.close()
        bar.close()

    indices = np.flatnonzero(ok)
    if small and min_size is None:
        first = labels[small[0]]
        warnings.warn(f"{len(small)} image(s) reach the network with a side under {SMALL_SIDE} px (e.g. {first!r}): "
                      "their descriptors pool a feature map of a few cells; pass min_size= (imret: --min-size) "
                      "to enlarge them", UserWarning, stacklevel=2)
    if forward is not None and forward.failure is not None:
        compile_note = f"eager: compilation failed ({forward.failure})"
    return Extraction(
        descriptors=out[indices],
        indices=indices.astype(np.int64),
        paths=[labels[i] for i in indices],
        skipped=sorted(skipped, key=lambda s: s.index),
        small=sorted(small),
        compiled=forward is not None and forward.failure is None,
        compile_note=compile_note,
    )


_TIME_FIRST: Any = object()  # _forward_for: "auto" decides after timing the first images eagerly


def _forward_for(model, mode: str, device: torch.device, amp_dtype, channels_last: bool,
                 refinement: Refinement | None, n: int) -> tuple[CompiledForward | None, str]:
    """The compiled per-scale forward to use (None: eager) and the reason, for ``compile=mode``."""
    hooks = refinement is not None and refinement.relup is not None
    variant = None if refinement is None else ("refined", refinement.gem_p, refinement.regional)
    use, note = compile_decision(mode, device=device, n_images=n, hooks=hooks, refined=variant is not None,
                                 cached=is_cached(model, device, amp_dtype, channels_last, variant))
    if use is None:  # "auto" on a long run: time the first images (extract), then decide
        return _TIME_FIRST, note
    if not use:
        return None, note
    step = None if refinement is None else (lambda x: refined_descriptors(model, x, refinement))
    return compiled_forward(model, device=device, amp_dtype=amp_dtype, channels_last=channels_last, step=step,
                            variant=variant), note


def describe_tensors(
    model: RetrievalNet,
    tensors: Sequence[torch.Tensor],
    *,
    scales: Sequence[float] = (1.0,),
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    channels_last: bool = True,
    refinement: Refinement | None = None,
    multiscale: str | None = None,
    compile: str = "off",
) -> np.ndarray:
    """``(N, D)`` float32 descriptors of already decoded ``(3, H, W)`` image tensors, in input order.

    The tensors are normalised model inputs (:func:`imret.images.to_tensor` with the model's
    mean and std), as :func:`extract` makes them; images of equal size run together up to
    ``batch_size`` (default 1 on the CPU, 8 on GPUs, as :func:`extract`). The model must
    already be in eval mode on ``device`` (this function does not move it, so that several
    threads may share it). ``refinement`` as in :func:`extract`, except ReLU-shift (it hooks
    the shared model; use :func:`extract`) and ``multiscale`` as in :func:`extract`;
    ``compile`` as in :func:`extract`, but ``"off"`` by default.
    """
    device, batch_size = _check_run(scales, device, batch_size)
    amp_dtype = _check_precision(precision, device)
    refinement = check_refinement(model, refinement)
    if refinement is not None and refinement.relup is not None:
        raise ValueError("describe_tensors cannot apply ReLU-shift (relup): it would hook a model other threads "
                         "may share; use extract(..., refinement=...) or relup=None")
    power = refined_power(model, refinement)
    mode = _multiscale_of(model, multiscale)
    check_compile(compile)
    forward, _ = _forward_for(model, compile, device, amp_dtype, channels_last, refinement, len(tensors))
    if forward is _TIME_FIRST:  # "auto" here: eager (no timing in this shared-model helper)
        forward = None
    out = np.zeros((len(tensors), model.dim), dtype=np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"tensor {i} must be (3, H, W), got {getattr(t, 'shape', type(t).__name__)}")
        groups.setdefault(tuple(t.shape), []).append(i)
    with torch.inference_mode():
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                part = idx[s:s + batch_size]
                x = torch.stack([tensors[i] for i in part])
                out[part] = _run_batch(model, x, scales, power, device, amp_dtype, channels_last,
                                       refinement, mode, forward).cpu().numpy()
    return out


def extract_descriptors(
    model: RetrievalNet,
    images: Sequence[ImageInput],
    scales: Sequence[float] = (1.0,),
    image_size: int = 1024,
    *,
    bboxes: Sequence[BBox | None] | None = None,
    on_error: str = "raise",
    **kwargs,
) -> np.ndarray:
    """``(N, D)`` float32 descriptors of ``images``, rows in input order (see :func:`extract`).

    With ``on_error="raise"`` (default) a bad image raises :class:`~imret.images.ImageError`;
    with ``"skip"`` its row is NaN and a warning names the skipped files.
    """
    images = image_list(images)
    res = extract(model, images, bboxes=bboxes, scales=scales, image_size=image_size, on_error=on_error, **kwargs)
    out = np.full((len(images), res.descriptors.shape[1]), np.nan, dtype=np.float32)
    out[res.indices] = res.descriptors
    if res.skipped:
        warnings.warn(
            f"skipped {len(res.skipped)} image(s): " + "; ".join(f"{s.path}: {s.reason}" for s in res.skipped[:10]),
            stacklevel=2,
        )
    return out


# --- extraction files --------------------------------------------------------------------------

_LINE_BREAKING = frozenset("\u2028\u2029")  # Unicode line / paragraph separators (Zl, Zp)


def is_plain_path(path: str) -> bool:
    """Whether ``path`` can be one line of a UTF-8 text file and read back unchanged.

    Not when it holds a control character (``\\n``, ``\\r``, tab, escape, C1 controls such
    as NEL), a Unicode line or paragraph separator (``str.splitlines`` breaks on all of
    these), or bytes that are not UTF-8 (Python keeps them as lone surrogates).
    """
    for ch in path:
        if unicodedata.category(ch) in ("Cc", "Cs") or ch in _LINE_BREAKING:
            return False
    return True


@dataclass(frozen=True)
class SavedExtraction:
    """The files :func:`save_extraction` wrote.

    Attributes:
        descriptors: ``<stem>.npy``, the ``(N, D)`` float32 rows.
        paths: ``<stem>.paths.jsonl``, row ``i``'s path as a JSON string on line ``i``
            (ASCII only, so no file name can break a line): the authoritative list.
        paths_txt: ``<stem>.paths.txt``, one plain path per line, or None when some path is
            not plain (:func:`is_plain_path`) and the file was left out.
        metadata: ``<stem>.json``.
        note: why ``paths_txt`` was left out, else None.
    """

    descriptors: Path
    paths: Path
    paths_txt: Path | None
    metadata: Path
    note: str | None = None


def _extraction_stem(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_suffix("") if out.suffix == ".npy" else out


def _with(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def save_extraction(
    out: str | os.PathLike, extraction: Extraction, metadata: dict[str, Any] | None = None
) -> SavedExtraction:
    """Write ``extraction`` as ``<stem>.npy``, ``<stem>.paths.jsonl``, ``<stem>.paths.txt``
    (plain paths only) and ``<stem>.json``, each file replaced atomically.

    Row ``i`` of the ``.npy`` belongs to line ``i`` of ``.paths.jsonl`` whatever the file
    names hold. ``.paths.txt`` is written only when every path is plain
    (:func:`is_plain_path`); otherwise it is left out (an older one at the same stem is
    removed, so it cannot be read against the new rows) and the metadata says why.

    Args:
        out: ``<stem>.npy`` or ``<stem>``.
        extraction: what :func:`extract` returned.
        metadata: more keys for ``<stem>.json`` (the model spec, scales, ...); ``n``,
            ``dim``, ``paths``, ``paths_txt`` and ``skipped`` are filled in here.
    """
    stem = _extraction_stem(out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    npy, jsonl, txt, meta_path = (_with(stem, s) for s in (".npy", ".paths.jsonl", ".paths.txt", ".json"))
    n, dim = extraction.descriptors.shape
    if len(extraction.paths) != n:
        raise ValueError(f"extraction has {n} rows but {len(extraction.paths)} paths")
    with atomic_path(npy) as tmp:
        np.save(tmp, extraction.descriptors)
    atomic_write_bytes(jsonl, "".join(json.dumps(p) + "\n" for p in extraction.paths).encode("ascii"))
    odd = [p for p in extraction.paths if not is_plain_path(p)]
    note = None
    if odd:
        note = (f"{txt.name} not written: {len(odd)} path(s) hold line breaks, control characters or "
                f"bytes that are not UTF-8 (first: {json.dumps(odd[0])}); read the paths from {jsonl.name}")
        txt.unlink(missing_ok=True)
    else:
        atomic_write_bytes(txt, "".join(p + "\n" for p in extraction.paths).encode("utf-8"))
    meta = dict(metadata or {})
    meta.update(
        n=int(n), dim=int(dim), paths=jsonl.name, paths_txt=None if odd else txt.name,
        skipped=[{"path": s.path, "reason": s.reason} for s in extraction.skipped],
    )
    if note:
        meta["paths_txt_omitted"] = note
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
    return SavedExtraction(npy, jsonl, None if odd else txt, meta_path, note)


def read_paths_file(path: str | os.PathLike) -> list[str]:
    """The paths listed in ``path``: a ``.jsonl`` file of one JSON string per line, or a
    text file of one path per line (a name holding a line break cannot be in those)."""
    path = Path(path)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        text = f.read()
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON string ({e.msg}): {line[:80]!r}") from None
            if not isinstance(value, str):
                raise ValueError(f"{path}:{lineno}: expected a JSON string (a path), got {type(value).__name__}")
            out.append(value)
        return out
    lines = text.split("\n")
    return [line[:-1] if line.endswith("\r") else line for line in lines if line.strip()]


def load_extraction(out: str | os.PathLike) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """``(descriptors, paths, metadata)`` of an extraction saved by :func:`save_extraction`
    (or by an older imret, which wrote only ``<stem>.paths.txt``).

    Raises:
        FileNotFoundError: no ``<stem>.npy``, or neither paths file.
        ValueError: the number of paths differs from the number of rows.
    """
    stem = _extraction_stem(out)
    npy, jsonl, txt, meta_path = (_with(stem, s) for s in (".npy", ".paths.jsonl", ".paths.txt", ".json"))
    descriptors = np.load(npy, allow_pickle=False)
    if jsonl.is_file():
        source = jsonl
    elif txt.is_file():
        source = txt
    else:
        raise FileNotFoundError(f"no paths file for {npy}: expected {jsonl.name} (or {txt.name})")
    paths = read_paths_file(source)
    if len(paths) != len(descriptors):
        raise ValueError(f"{source} lists {len(paths)} paths for the {len(descriptors)} rows of {npy}")
    metadata = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    return descriptors, paths, metadata
