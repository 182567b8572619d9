"""RootSIFT local features (OpenCV SIFT + the Hellinger-kernel mapping of Arandjelović &
Zisserman, "Three things everyone should know to improve object retrieval", CVPR 2012).

Also the image preparation every local extractor shares (:func:`load_local_image`): decode,
crop to a query box, downscale, and the :class:`ImageFrame` that maps positions in the
prepared pixels back to the original image.

Coordinates: keypoints are ``(x, y)`` in pixels of the original image with pixel *centres* at
integer coordinates (OpenCV's convention: the top-left pixel covers ``[-0.5, 0.5)``).

Storage: the store keeps RootSIFT as uint8 codes of the unit vectors
(:mod:`imret.local.storage`, cosine error < 1e-3). For an exact copy: OpenCV's SIFT
descriptors are integers 0..255 (the unit vector clipped at 0.2, renormalised and scaled by
512); :meth:`SiftExtractor.encode` returns them as ``uint8`` next to the features, and
:func:`sift_from_uint8` rebuilds the float descriptors from them (RootSIFT or L2) exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .types import LocalFeatures, require_cv2

__all__ = [
    "ImageFrame",
    "load_local_image",
    "rootsift",
    "l2_normalize",
    "sift_from_uint8",
    "SiftExtractor",
]

Box = Sequence[float]


# --------------------------------------------------------------------- descriptor maps


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` ``(N, D)`` divided by their L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (N, D) rows, got shape {x.shape}")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32)


def rootsift(desc: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """RootSIFT: L1-normalise each row of ``desc`` ``(N, D)``, then take the element-wise square root.

    The inner product of two RootSIFT rows is the Hellinger kernel of the L1-normalised SIFT
    histograms (Arandjelović & Zisserman, CVPR 2012). Every non-zero row comes out with unit L2
    norm (its squares sum to its L1-normalised entries, which sum to 1); an all-zero row stays
    zero (``eps`` bounds the divisor). Entries must be non-negative (SIFT histograms are).

    Returns:
        ``(N, D)`` float32.
    """
    d = np.asarray(desc, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"desc must be (N, D) SIFT rows, got shape {d.shape}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if d.size and not np.all(d >= 0):  # also catches NaN
        raise ValueError("RootSIFT needs non-negative descriptors (SIFT histograms); got negative or NaN entries")
    l1 = d.sum(axis=1, keepdims=True)
    return np.sqrt(d / np.maximum(l1, eps)).astype(np.float32)


def sift_from_uint8(raw: np.ndarray, *, root: bool = True) -> np.ndarray:
    """Float descriptors from stored OpenCV SIFT bytes ``(N, 128)`` uint8 (see :meth:`SiftExtractor.encode`).

    ``root=True``: :func:`rootsift`; ``False``: plain L2 normalisation. Exactly what the
    extractor returned for the same image (both are computed from these bytes).
    """
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"stored SIFT descriptors must be uint8, got {raw.dtype}")
    if raw.ndim != 2:
        raise ValueError(f"stored SIFT descriptors must be (N, 128), got shape {raw.shape}")
    return rootsift(raw) if root else l2_normalize(raw)


# ------------------------------------------------------------------ image preparation


@dataclass(frozen=True)
class ImageFrame:
    """Where prepared pixels lie in the original image.

    Attributes:
        size: ``(width, height)`` of the original image (displayed orientation).
        origin: ``(x, y)`` of the prepared region's top-left corner in original pixels (the
            query box rounded outward to whole pixels and clamped; ``(0, 0)`` without a box).
        scale: ``(sx, sy)`` original pixels per prepared pixel.
        region: ``(width, height)`` of the region in original pixels.
    """

    size: tuple[int, int]
    origin: tuple[int, int]
    scale: tuple[float, float]
    region: tuple[int, int]

    def to_original(self, xy: np.ndarray) -> np.ndarray:
        """``(N, 2)`` pixel-centre positions in prepared pixels -> the same in original pixels, float32."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        s = np.asarray(self.scale, dtype=np.float64)
        o = np.asarray(self.origin, dtype=np.float64)
        return ((xy + 0.5) * s + o - 0.5).astype(np.float32)


def _original_size(image: Any) -> tuple[int, int]:
    from ..images import image_size_of

    return image_size_of(image)


def load_local_image(image: Any, box: Box | None = None, max_side: int | None = None) -> tuple[Image.Image, ImageFrame]:
    """Decode ``image`` for local features: RGB, cropped to ``box``, long side at most ``max_side``.

    ``image`` is a path (EXIF orientation applied), a PIL image or an ``H x W x 3`` uint8 RGB
    array (used as is), as :func:`imret.images.load_image` / :func:`~imret.images.prepare_image`
    take them. ``box`` ``(x1, y1, x2, y2)`` is in original pixels; the crop is resized by the
    factor that fits the *whole* image into ``max_side`` (so an object keeps the scale it has
    in database images), never upscaled.

    Returns:
        ``(pixels, frame)``: the prepared RGB image and the :class:`ImageFrame` that maps its
        positions back to the original image.
    """
    from ..images import check_image_input, load_image, prepare_image

    image = check_image_input(image)
    if isinstance(image, str):
        img = load_image(image, image_size=max_side, bbox=box, crop_resize="image")
    else:
        img = prepare_image(image, image_size=max_side, bbox=box, crop_resize="image")
    w, h = _original_size(image)
    if box is None:
        x1, y1, x2, y2 = 0, 0, w, h
    else:  # as imret.images crops: outward to whole pixels, clamped (already validated by the load)
        x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
        x2, y2 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    rw, rh = x2 - x1, y2 - y1
    frame = ImageFrame((w, h), (x1, y1), (rw / img.size[0], rh / img.size[1]), (rw, rh))
    return img, frame


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {low}{extra}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


# ------------------------------------------------------------------------- extractor


@dataclass(frozen=True)
class SiftExtractor:
    """(Root)SIFT keypoints and descriptors of an image, in original-image pixels.

    ``extractor(image, box=None) -> LocalFeatures`` (kind ``"sift"``, 128-D). The image is
    prepared by :func:`load_local_image` (cropped to ``box``, downscaled to ``max_side``),
    converted to grey (ITU-R 601 luma, as ``cv2.COLOR_RGB2GRAY``), and the ``max_keypoints``
    keypoints with the strongest DoG response are kept (strongest first). ``scores`` are the
    responses.

    Attributes (the defaults, and why):
        max_keypoints: 1000. Enough for geometric verification of landmark photos at 1024 px
            while keeping 100 pairwise matches per query cheap (DELG keeps 1000 local
            features per image as well).
        max_side: 1024. The long side the image is brought down to before detection (the
            revisited Oxford/Paris images are 1024 px; larger photos mostly add fine-scale
            keypoints that are not repeatable across views). None: full resolution.
        root: True. RootSIFT (Hellinger kernel), which improves matching and retrieval over
            SIFT at no cost (Arandjelović & Zisserman 2012); False: L2-normalised SIFT.
        contrast_threshold: 0.04. Lowe's / OpenCV's DoG contrast threshold (divided by the
            number of layers inside OpenCV); lower gives more, weaker keypoints.
        edge_threshold: 10.0. Lowe's curvature-ratio threshold against edge responses.
        n_octave_layers: 3. Scales per octave (Lowe 2004).
        sigma: 1.6. Gaussian of the first octave (Lowe 2004).
    """

    max_keypoints: int = 1000
    max_side: int | None = 1024
    root: bool = True
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    n_octave_layers: int = 3
    sigma: float = 1.6

    kind = "sift"
    dim = 128

    def __post_init__(self) -> None:
        _check_int("max_keypoints", self.max_keypoints, 1)
        _check_int("max_side", self.max_side, 1, allow_none=True)
        _check_int("n_octave_layers", self.n_octave_layers, 1)
        if not isinstance(self.root, bool):
            raise TypeError(f"root must be a bool, got {self.root!r}")
        _check_positive("contrast_threshold", self.contrast_threshold)
        _check_positive("edge_threshold", self.edge_threshold)
        _check_positive("sigma", self.sigma)

    def detect_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SIFT on an ``H x W`` uint8 grey or ``H x W x 3`` uint8 RGB array, in its own pixels.

        Returns:
            ``(keypoints (N, 2) float32, raw (N, 128) uint8, responses (N,) float32)``,
            strongest first, ``N <= max_keypoints``.
        """
        cv2 = require_cv2()
        arr = np.asarray(pixels)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
            raise ValueError(f"pixels must be H x W uint8 grey or H x W x 3 uint8 RGB, got {arr.dtype} {arr.shape}")
        grey = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY) if arr.ndim == 3 else np.ascontiguousarray(arr)
        sift = cv2.SIFT_create(
            nfeatures=int(self.max_keypoints),
            nOctaveLayers=int(self.n_octave_layers),
            contrastThreshold=float(self.contrast_threshold),
            edgeThreshold=float(self.edge_threshold),
            sigma=float(self.sigma),
        )
        kps, desc = sift.detectAndCompute(grey, None)
        if not kps or desc is None:
            return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), np.zeros(0, np.float32)
        xy = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
        resp = np.array([k.response for k in kps], dtype=np.float32)
        # OpenCV keeps ties at its cut-off, and orientations can duplicate a keypoint: cut here
        order = np.argsort(-resp, kind="stable")[: self.max_keypoints]
        raw = np.clip(np.rint(desc[order]), 0, 255).astype(np.uint8)  # integer-valued floats 0..255
        return xy[order], raw, resp[order]

    def encode(self, image: Any, box: Box | None = None) -> tuple[LocalFeatures, np.ndarray]:
        """The features of ``image`` and their stored form: ``(features, raw (N, 128) uint8)``.

        ``sift_from_uint8(raw, root=self.root)`` equals ``features.descriptors`` exactly.
        """
        img, frame = load_local_image(image, box, self.max_side)
        xy, raw, resp = self.detect_pixels(np.asarray(img))
        feats = LocalFeatures(frame.to_original(xy), sift_from_uint8(raw, root=self.root), frame.size, resp, self.kind)
        return feats, raw

    def __call__(self, image: Any, box: Box | None = None) -> LocalFeatures:
        """``(N, 2)`` keypoints in original pixels, ``(N, 128)`` (Root)SIFT rows; see the class."""
        return self.encode(image, box)[0]
