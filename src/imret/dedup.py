"""Near-duplicate detection: which photos of a collection are copies of one another after an
edit (re-compression, resizing, cropping, a flip, a 90° rotation, a colour change, overlaid text).

Three steps, each usable on its own::

    descriptors (N, D) [+ query-side variants (N, V, D)]
        -> candidate_pairs      cosine >= threshold among each image's k nearest neighbours
        -> DuplicateCheck       RootSIFT + a near-similarity fitted by MAGSAC++, mirrored too
        -> duplicate_groups     connected components of the confirmed pairs
        -> DedupResult          {key: [duplicates]} (as imagededup returns), groups, pairs, reports

Global descriptors of CNNs are not invariant to a mirror image or a quarter turn of a photo
(ImageNet-trained filters are not symmetric), so the descriptor stage describes
every image also flipped and rotated (test-time augmentation, :data:`DEFAULT_TTA`) and a pair is
a candidate when any variant of one is close to the other. Local features then confirm a pair
only if one photo maps onto the other by a similarity (plus a crop), possibly mirrored: RootSIFT
is rotation invariant, and a mirror is matched by permuting the descriptor bins
(:func:`mirror_features`), so no image is decoded twice. A copy fits that map exactly (its
inliers are off it by localisation noise only, :func:`affine_residuals`) and its pixels, laid
onto the other's, correlate (:func:`aligned_correlation`); a second shot of the scene from the
same spot does neither.

:func:`find_duplicates` runs all of it on image files with a model;
:func:`find_duplicates_in_store` on a :class:`~imret.index.store.Store` (its descriptors and, when
it keeps RootSIFT, its local features). Nothing here prints; progress bars are tqdm on stderr.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

__all__ = [
    "VARIANTS",
    "DEFAULT_TTA",
    "EDITS",
    "Candidates",
    "candidate_pairs",
    "pair_scores",
    "variant_image",
    "describe_variants",
    "mirror_features",
    "PairCheck",
    "DuplicateCheck",
    "affine_residuals",
    "aligned_correlation",
    "duplicate_groups",
    "DuplicatePair",
    "DedupResult",
    "deduplicate",
    "find_duplicates",
    "find_duplicates_in_store",
    "apply_edit",
    "write_report",
]

# ----------------------------------------------------------------------------- defaults

# Query-side variants of an image, as PIL transposes (ROTATE_90 turns counter-clockwise).
VARIANTS = {
    "flip": Image.Transpose.FLIP_LEFT_RIGHT,
    "rot90": Image.Transpose.ROTATE_90,
    "rot180": Image.Transpose.ROTATE_180,
    "rot270": Image.Transpose.ROTATE_270,
}
# flip, rot90 and rot180 are enough: every image is described in each variant and compared with
# the originals of all others, so a copy turned by 270° is found as "rot90 of the copy ~ the
# original" (rot270 would only repeat that check from the other side). 4 forward passes per image.
DEFAULT_TTA = ("flip", "rot90", "rot180")
DEFAULT_K = 8  # neighbours per image (and variant) kept as candidates: larger groups still chain through them
# Cosine bars on L2-normalised GeM descriptors (set for EfficientNet-Lite0 ImageNet weights at
# 512 px; see the near-duplicate section of BENCHMARKS.md for what they give): with verification
# the bar only has to let every near-duplicate through in some variant (RootSIFT then rejects
# distinct photos of one landmark), so it is low; without verification it has to separate
# copies from look-alikes on its own. (0.75 missed 2 of 15 crops to 60-90 % of each side, at
# cosine 0.73-0.74, in the benchmark's full run.)
DEFAULT_THRESHOLD_VERIFY = 0.7
DEFAULT_THRESHOLD_DESCRIPTOR = 0.85
_CHUNK_ELEMENTS = 1 << 23  # similarities in memory at once (32 MB of float32)


def _check_unit_interval(name: str, value: Any, low: float = -1.0) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not ok or not math.isfinite(value) or not low <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [{low:g}, 1], got {value!r}")
    return float(value)


def _check_pos_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_tta(tta: Any) -> tuple[str, ...]:
    """``tta`` as a tuple of variant names: None / "none" / "" -> (), "all" -> every variant,
    "flip,rot90" or a sequence -> those (order kept, duplicates dropped)."""
    if tta is None:
        return ()
    if isinstance(tta, str):
        t = tta.strip().lower()
        if t in ("", "none"):
            return ()
        if t == "all":
            return tuple(VARIANTS)
        if t == "default":
            return DEFAULT_TTA
        tta = [s.strip() for s in t.split(",") if s.strip()]
    out: list[str] = []
    for name in tta:
        if name not in VARIANTS:
            raise ValueError(f"unknown test-time variant {name!r}; available: {', '.join(VARIANTS)} "
                             "(or 'none', 'default', 'all')")
        if name not in out:
            out.append(name)
    return tuple(out)


# ------------------------------------------------------------------------ descriptor stage


@dataclass(frozen=True)
class Candidates:
    """Pairs of images whose descriptors are close (:func:`candidate_pairs`).

    Attributes:
        pairs: ``(M, 2)`` int64 ``(i, j)`` with ``i < j``, sorted.
        scores: ``(M,)`` float32 best cosine of the pair over the variants.
        variants: ``(M,)`` int64 which query variant gave it: 0 the image itself, ``v >= 1``
            the ``v``-th entry of the variant axis (of either image of the pair).
    """

    pairs: np.ndarray
    scores: np.ndarray
    variants: np.ndarray

    def __len__(self) -> int:
        return int(self.pairs.shape[0])


def _as_rows(descriptors: Any, variants: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(descriptors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be (N, D) rows, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("descriptors hold NaN or infinite values")
    if variants is None:
        q = x[:, None, :]
    else:
        v = np.asarray(variants, dtype=np.float32)
        if v.ndim != 3 or v.shape[0] != x.shape[0] or v.shape[2] != x.shape[1]:
            raise ValueError(f"variants must be (N, V, D) = ({x.shape[0]}, V, {x.shape[1]}), got shape {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError("variants hold NaN or infinite values")
        q = np.concatenate([x[:, None, :], v], axis=1)
    return x, q


def candidate_pairs(
    descriptors: np.ndarray,
    threshold: float,
    *,
    k: int = DEFAULT_K,
    variants: np.ndarray | None = None,
    progress: bool = False,
) -> Candidates:
    """Pairs of near-duplicate candidates: exact cosine kNN, in chunks of rows.

    Every query row — image ``i`` itself and each of its ``variants[i]`` — is compared with the
    descriptors of all images; among its ``k`` most similar other images, those with cosine
    ``>= threshold`` pair with ``i``. A pair's score is its best cosine over both directions and
    all variants. At most ``_CHUNK_ELEMENTS`` similarities are held at once, never ``N x N``.

    Args:
        descriptors: ``(N, D)`` L2-normalised rows (so the inner product is the cosine).
        threshold: the cosine bar, in ``[-1, 1]``.
        k: neighbours kept per query row (ties at the k-th place are broken arbitrarily).
        variants: ``(N, V, D)`` descriptors of transformed copies of each image (flipped,
            rotated; :func:`describe_variants`), or None.
        progress: a tqdm bar over the rows.

    Returns:
        :class:`Candidates`.
    """
    threshold = _check_unit_interval("threshold", threshold)
    k = _check_pos_int("k", k)
    x, q = _as_rows(descriptors, variants)
    n, nv, _ = q.shape
    empty = Candidates(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
    if n < 2:
        return empty
    kk = min(k, n - 1)
    per = max(1, _CHUNK_ELEMENTS // (n * nv))  # images per chunk
    found_a, found_b, found_s, found_v = [], [], [], []
    from tqdm.auto import tqdm

    with tqdm(total=n, desc="candidates", unit="img", disable=not progress) as bar:
        for s in range(0, n, per):
            e = min(n, s + per)
            blk = q[s:e].reshape(-1, q.shape[2])
            sims = blk @ x.T  # ((e - s) * nv, n)
            owner = np.repeat(np.arange(s, e), nv)
            sims[np.arange(sims.shape[0]), owner] = -np.inf
            if kk < n - 1:
                idx = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            else:
                idx = np.argsort(-sims, axis=1)[:, :kk]  # everyone but itself (-inf sorts last)
            sv = np.take_along_axis(sims, idx, axis=1)
            keep = sv >= threshold
            rows, cols = np.nonzero(keep)
            found_a.append(owner[rows])
            found_b.append(idx[rows, cols])
            found_s.append(sv[rows, cols])
            found_v.append(np.tile(np.arange(nv), e - s)[rows])
            bar.update(e - s)
    a = np.concatenate(found_a).astype(np.int64)
    b = np.concatenate(found_b).astype(np.int64)
    if a.size == 0:
        return empty
    sc = np.concatenate(found_s).astype(np.float32)
    va = np.concatenate(found_v).astype(np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((-sc, hi, lo))  # by pair, best score first
    lo, hi, sc, va = lo[order], hi[order], sc[order], va[order]
    first = np.ones(lo.size, bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return Candidates(np.stack([lo[first], hi[first]], axis=1), sc[first], va[first])


def pair_scores(descriptors: np.ndarray, pairs: np.ndarray, *, variants: np.ndarray | None = None) -> np.ndarray:
    """Best cosine of each pair ``(i, j)`` of ``pairs`` ``(M, 2)`` over both directions and all
    variants (the score :func:`candidate_pairs` gives it, without the kNN cut): ``(M,)`` float32."""
    x, q = _as_rows(descriptors, variants)
    p = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if p.size and (p.min() < 0 or p.max() >= x.shape[0]):
        raise ValueError(f"pairs index images out of range (N = {x.shape[0]})")
    s1 = np.einsum("mvd,md->mv", q[p[:, 0]], x[p[:, 1]]).max(axis=1)
    s2 = np.einsum("mvd,md->mv", q[p[:, 1]], x[p[:, 0]]).max(axis=1)
    return np.maximum(s1, s2).astype(np.float32)


def variant_image(image: Image.Image, name: str) -> Image.Image:
    """``image`` transformed by the variant ``name`` of :data:`VARIANTS`."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; available: {', '.join(VARIANTS)}")
    return image.transpose(VARIANTS[name])


def describe_variants(
    encode: Callable[[list[Image.Image]], np.ndarray],
    images: Sequence[Any],
    tta: Sequence[str] | str = DEFAULT_TTA,
    *,
    image_size: int | None = 1024,
    chunk: int = 16,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Descriptors of every image and of its test-time variants, each file decoded once.

    Args:
        encode: a list of PIL images -> their ``(n, D)`` L2-normalised descriptors, e.g.
            ``lambda ims: imret.extract(model, ims, image_size=512).descriptors``.
        images: paths (EXIF orientation applied, downscaled to ``image_size`` while decoding)
            or PIL images.
        tta: variant names (:data:`VARIANTS`), or a comma list, "none", "default", "all".
        image_size: long side images are decoded to (the model's input size; never upscaled).
        chunk: images decoded and described together.
        progress: a tqdm bar over the images.

    Returns:
        ``(rows (M, 1 + V, D) float32, indices (M,) int64, skipped)``: row ``[m, 0]`` describes
        image ``indices[m]`` itself, ``[m, v]`` its ``tta[v - 1]`` variant; ``skipped`` lists
        ``(index, reason)`` of images that could not be read.
    """
    from tqdm.auto import tqdm

    from .images import ImageError, load_image

    names = _check_tta(tta)
    chunk = _check_pos_int("chunk", chunk)
    rows: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[tuple[int, str]] = []
    nv = 1 + len(names)
    with tqdm(total=len(images), desc="describe", unit="img", disable=not progress) as bar:
        for s in range(0, len(images), chunk):
            batch, idx = [], []
            for i in range(s, min(len(images), s + chunk)):
                item = images[i]
                try:
                    if isinstance(item, Image.Image):
                        img = item.convert("RGB")
                    else:
                        img = load_image(item, image_size=image_size)
                except (ImageError, OSError) as e:
                    skipped.append((i, getattr(e, "reason", None) or str(e)))
                    continue
                batch.append(img)
                batch.extend(variant_image(img, v) for v in names)
                idx.append(i)
            if batch:
                d = np.asarray(encode(batch), dtype=np.float32)
                if d.shape[0] != len(batch):
                    raise RuntimeError(f"encode returned {d.shape[0]} rows for {len(batch)} images")
                rows.append(d.reshape(len(idx), nv, -1))
                kept.extend(idx)
            bar.update(min(len(images), s + chunk) - s)
    if not rows:
        return np.zeros((0, nv, 0), np.float32), np.zeros(0, np.int64), skipped
    return np.concatenate(rows), np.asarray(kept, np.int64), skipped


# --------------------------------------------------------------------------- local stage

# SIFT's 128 bins are 4 x 4 cells (rows along the keypoint's perpendicular axis, columns along
# its orientation) x 8 gradient orientations relative to the keypoint's. Mirroring the image
# keeps the orientation axis and reverses the perpendicular one (the frame changes handedness),
# and negates relative angles: cell row r -> 3 - r, bin o -> (8 - o) mod 8. Checked against
# SIFT run on mirrored images in tests/test_dedup.py.
_R, _C, _O = np.meshgrid(np.arange(4), np.arange(4), np.arange(8), indexing="ij")
_MIRROR = (((3 - _R) * 4 + _C) * 8 + (8 - _O) % 8).ravel()


def mirror_features(f: Any) -> Any:
    """The local features of the mirror image (left-right flip) of the image ``f`` describes:
    keypoints at ``x -> W - 1 - x`` (pixel centres), SIFT/RootSIFT descriptors with their bins
    permuted as SIFT computes them on the flipped pixels. Only for ``kind == "sift"``."""
    from .local.types import LocalFeatures

    if f.kind != "sift":
        raise ValueError(f"mirror_features needs SIFT features (kind 'sift'), got kind {f.kind!r}")
    kp = f.keypoints.copy()
    kp[:, 0] = (f.size[0] - 1) - kp[:, 0]
    return LocalFeatures(kp, f.descriptors[:, _MIRROR], f.size, f.scores, f.kind)


@dataclass(frozen=True)
class PairCheck:
    """The geometric check of a candidate pair ``(a, b)`` (:class:`DuplicateCheck`).

    Attributes:
        confirmed: whether the pair is a near-duplicate.
        inliers: one-to-one inliers of the best transform (0 if none).
        flip: whether b is the mirror image of a (the transform found is a reflection).
        rotation: rotation from a to b in degrees, counter-clockwise as seen on screen, in
            ``(-180, 180]`` (90: b is a turned a quarter turn to the left).
        scale: size of b's pixels relative to a's (``sqrt |det|`` of the linear part; 0.5: b is
            a at half the resolution).
        coverage: ``(of_a, of_b)`` fractions of a's and b's frames that the other one covers.
        transform: ``(3, 3)`` map from a's pixels to b's (a reflection when ``flip``), or None.
        residual: median distance of the inliers from the least-squares affine map, in pixels
            of the coarser of the two images as their local features were detected
            (:attr:`DuplicateCheck.max_residual`); NaN when not measured.
        reason: why a pair is not confirmed ("" when it is).
    """

    confirmed: bool
    inliers: int = 0
    flip: bool = False
    rotation: float = 0.0
    scale: float = 1.0
    coverage: tuple[float, float] = (0.0, 0.0)
    transform: np.ndarray | None = None
    residual: float = float("nan")
    reason: str = ""

    def edit(self, size_a: tuple[int, int] | None = None, size_b: tuple[int, int] | None = None) -> str:
        """What turns a into b, as far as geometry tells: '+'-joined parts of ``flip``,
        ``rotate90|180|270`` (or ``rotateN`` for another angle), ``crop`` (b shows part of a),
        ``uncrop`` (a shows part of b), ``resize``; ``copy`` when none (re-compression, colour,
        overlaid text leave the geometry alone); "" when not confirmed."""
        if not self.confirmed:
            return ""
        parts = []
        if self.flip:
            parts.append("flip")
        r = self.rotation
        q = 90 * round(r / 90)
        if abs(r - q) <= 10 and q % 360 != 0:
            parts.append(f"rotate{q % 360}")
        elif abs(r - q) > 10:
            parts.append(f"rotate{round(r) % 360}")
        cov_a, cov_b = self.coverage
        if cov_a < 0.9 and cov_b >= cov_a:
            parts.append("crop")
        elif cov_b < 0.9:
            parts.append("uncrop")
        if abs(math.log(max(self.scale, 1e-9))) > 0.05:
            parts.append("resize")
        return "+".join(parts) or "copy"


def _coverage(h: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int], n: int = 24) -> tuple[float, float]:
    """Fractions of a's frame that lands inside b under ``h``, and of b's frame inside a under ``h^-1``
    (on an ``n x n`` grid of points)."""
    def inside(hh: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> float:
        xs = (np.arange(n) + 0.5) / n * src[0] - 0.5
        ys = (np.arange(n) + 0.5) / n * src[1] - 0.5
        gx, gy = np.meshgrid(xs, ys)
        p = np.stack([gx.ravel(), gy.ravel(), np.ones(gx.size)])
        m = hh @ p
        with np.errstate(divide="ignore", invalid="ignore"):
            u, v = m[0] / m[2], m[1] / m[2]
        ok = (m[2] > 0) & (u >= -0.5) & (u <= dst[0] - 0.5) & (v >= -0.5) & (v <= dst[1] - 0.5)
        return float(ok.mean())

    try:
        inv = np.linalg.inv(h)
    except np.linalg.LinAlgError:
        return 0.0, 0.0
    return inside(h, size_a, size_b), inside(inv, size_b, size_a)


def _inside_count(keypoints: np.ndarray, h: np.ndarray, dst: tuple[int, int]) -> int:
    """How many of ``keypoints`` (``(K, >=2)``, x y first) ``h`` maps inside a ``dst`` = (w, h) frame."""
    if len(keypoints) == 0:
        return 0
    p = np.c_[np.asarray(keypoints, np.float64)[:, :2], np.ones(len(keypoints))] @ np.asarray(h, np.float64).T
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = p[:, 0] / p[:, 2], p[:, 1] / p[:, 2]
    ok = (p[:, 2] > 0) & (u >= -0.5) & (u <= dst[0] - 0.5) & (v >= -0.5) & (v <= dst[1] - 0.5)
    return int(ok.sum())


def affine_residuals(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Distances ``(N,)`` of ``dst`` from the least-squares affine map of ``src`` (both ``(N, 2)``
    points, N >= 3), in ``dst``'s units.

    Between a photo and a copy of it (resized, rotated, mirrored, cropped, re-encoded, recoloured)
    the map is an exact similarity, so the residuals of matched keypoints are their localisation
    noise: for isotropic Gaussian noise of standard deviation sigma per coordinate their median
    is sigma * sqrt(2 ln 2) (a Rayleigh distribution, less the few degrees of freedom of the fit).
    Two exposures of one scene, even from the same spot, add a systematic displacement that no
    affine map takes away (parallax, a camera turned a little, lens distortion that changes with
    the zoom, things that moved).
    """
    p = np.asarray(src, np.float64).reshape(-1, 2)
    q = np.asarray(dst, np.float64).reshape(-1, 2)
    if p.shape != q.shape or p.shape[0] < 3:
        raise ValueError(f"src and dst must be (N, 2) point sets of one shape with N >= 3, got {p.shape} and {q.shape}")
    c = p.mean(axis=0)  # centred for conditioning
    x = np.c_[p - c, np.ones(len(p))]
    m, *_ = np.linalg.lstsq(x, q, rcond=None)
    return np.linalg.norm(q - x @ m, axis=1)


def _grey(image: Any) -> np.ndarray:
    """``(H, W)`` float32 luma of a path, a PIL image or an ``H x W [x 3]`` uint8 array, or of what
    a zero-argument callable returns (pixels decoded only when needed)."""
    if callable(image) and not isinstance(image, (np.ndarray, Image.Image)):
        image = image()
    if isinstance(image, np.ndarray):
        a = image.astype(np.float32)
        return a if a.ndim == 2 else a[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), np.float32)
    from .local.sift import load_local_image  # EXIF orientation applied: the frame of the keypoints

    img, _ = load_local_image(os.fspath(image))
    return np.asarray(img.convert("L"), np.float32)


# Long side the pixels of a photo are kept at between the checks of one run (the side RootSIFT
# is computed at, so rParis-sized photos are kept whole), and the memory they may take.
GREY_SIDE = 1024
GREY_BYTES = 256 << 20


class _GreyCache:
    """Grey pixels of image files, each decoded once (EXIF orientation applied, long side at most
    ``side``) and kept as uint8 while they fit in ``max_bytes``, the least recently used dropped
    first. ``cache(path) -> (H, W) uint8 array``; an unreadable file raises as :func:`_grey`."""

    def __init__(self, side: int = GREY_SIDE, max_bytes: int = GREY_BYTES) -> None:
        self.side, self.max_bytes, self.bytes = side, max_bytes, 0
        self.items: dict[str, np.ndarray] = {}  # insertion order = use order

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        from .local.sift import load_local_image

        key = os.fspath(path)
        if key in self.items:
            self.items[key] = self.items.pop(key)  # now the most recent
            return self.items[key]
        img, _ = load_local_image(key, max_side=self.side)
        a = np.asarray(img.convert("L"), np.uint8)
        self.items[key] = a
        self.bytes += a.nbytes
        while self.bytes > self.max_bytes and len(self.items) > 1:
            self.bytes -= self.items.pop(next(iter(self.items))).nbytes
        return a


def _rescale_frames(h: np.ndarray, frame_a: tuple[int, int], size_a: tuple[int, int],
                    frame_b: tuple[int, int], size_b: tuple[int, int]) -> np.ndarray:
    """``h`` (a's frame pixels to b's) between the same photos resized to ``size_a`` and ``size_b``
    (all ``(w, h)``; pixel centres at integers, so ``x -> (x + 0.5) s - 0.5``)."""
    def to(frame: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        fx, fy = size[0] / frame[0], size[1] / frame[1]
        return np.array([[fx, 0, 0.5 * fx - 0.5], [0, fy, 0.5 * fy - 0.5], [0, 0, 1]])

    if tuple(frame_a) == tuple(size_a) and tuple(frame_b) == tuple(size_b):
        return h
    return to(frame_b, size_b) @ h @ np.linalg.inv(to(frame_a, size_a))


def aligned_correlation(image_a: Any, image_b: Any, h: np.ndarray, *, side: int = 256, sigma: float = 1.0,
                        frames: tuple[tuple[int, int], tuple[int, int]] | None = None) -> tuple[float, float]:
    """How well ``h`` (a's pixels to b's, ``(3, 3)``) lays b's pixels onto a's: ``(ncc, local)``.

    a is resized to ``side`` pixels on its long side, b to the same scale through ``h`` (its
    pixels then match a's one to one), both blurred (``sigma`` pixels), b warped onto a's grid
    (bilinear); ``ncc`` is the normalised cross-correlation of the grey values over the pixels
    of a that land inside b, ``local`` the median of it over the 16 x 16 blocks fully inside
    (an overlaid caption lowers ``ncc`` a little and ``local`` not at all). A copy correlates
    almost perfectly (re-encoding, resizing and colour changes are smooth or affine in grey
    level); two shots of one scene do not, even when one fits the other by a similarity.
    ``(0, 0)`` when fewer than 64 pixels overlap.

    ``frames``: the sizes ``(w, h)`` of a's and b's frames ``h`` is expressed in, when the images
    are given at other sizes (downscaled copies of the same photos): ``h`` is rescaled to them.
    """
    from .local.types import require_cv2

    cv2 = require_cv2()
    ga, gb = _grey(image_a), _grey(image_b)
    h = np.asarray(h, np.float64)
    if frames is not None:
        h = _rescale_frames(h, frames[0], (ga.shape[1], ga.shape[0]), frames[1], (gb.shape[1], gb.shape[0]))
    lin = h[:2, :2]
    scale = math.sqrt(abs(float(np.linalg.det(lin)))) or 1.0  # b pixels per a pixel
    sa = min(1.0, side / max(ga.shape))
    sb = sa / scale
    size_a = (max(1, round(ga.shape[1] * sa)), max(1, round(ga.shape[0] * sa)))
    size_b = (max(1, round(gb.shape[1] * sb)), max(1, round(gb.shape[0] * sb)))
    small_a = cv2.resize(ga, size_a, interpolation=cv2.INTER_AREA if sa < 1 else cv2.INTER_LINEAR)
    small_b = cv2.resize(gb, size_b, interpolation=cv2.INTER_AREA if sb < 1 else cv2.INTER_LINEAR)
    small_a = cv2.GaussianBlur(small_a, (0, 0), sigma)
    small_b = cv2.GaussianBlur(small_b, (0, 0), sigma)
    # a_small pixel -> a pixel -> b pixel -> b_small pixel (pixel centres at +0.5)
    to_a = np.array([[1 / sa, 0, 0.5 / sa - 0.5], [0, 1 / sa, 0.5 / sa - 0.5], [0, 0, 1]])
    to_small_b = np.array([[sb, 0, 0.5 * sb - 0.5], [0, sb, 0.5 * sb - 0.5], [0, 0, 1]])
    m = to_small_b @ h @ to_a
    ys, xs = np.mgrid[0:small_a.shape[0], 0:small_a.shape[1]]
    p = m @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    with np.errstate(divide="ignore", invalid="ignore"):
        u = (p[0] / p[2]).reshape(small_a.shape).astype(np.float32)
        v = (p[1] / p[2]).reshape(small_a.shape).astype(np.float32)
    inside = (p[2].reshape(small_a.shape) > 0) & (u >= 0) & (u <= small_b.shape[1] - 1) & (v >= 0) & (v <= small_b.shape[0] - 1)
    if inside.sum() < 64:
        return 0.0, 0.0
    warped = cv2.remap(small_b, np.where(inside, u, -1), np.where(inside, v, -1), cv2.INTER_LINEAR)

    def ncc(x: np.ndarray, y: np.ndarray) -> float | None:
        x = x.astype(np.float64) - x.mean()
        y = y.astype(np.float64) - y.mean()
        d = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
        return None if d <= 1e-6 else float((x * y).sum() / d)

    g = ncc(small_a[inside], warped[inside]) or 0.0
    blocks = []
    for i in range(0, small_a.shape[0] - 15, 16):
        for j in range(0, small_a.shape[1] - 15, 16):
            if inside[i:i + 16, j:j + 16].all():
                c = ncc(small_a[i:i + 16, j:j + 16], warped[i:i + 16, j:j + 16])
                if c is not None:
                    blocks.append(c)
    return g, float(np.median(blocks)) if blocks else g


@dataclass(frozen=True)
class DuplicateCheck:
    """Confirms a candidate pair when one photo maps onto the other by a similarity (any
    rotation, uniform scale, a crop), possibly mirrored, fitted to RootSIFT matches.

    ``check(fa, fb) -> PairCheck`` matches ``fa`` to ``fb`` and to the mirror of ``fa``
    (:func:`mirror_features`), fits an affine transform with MAGSAC++ to each
    (:func:`imret.local.verification.verify_pair`), and keeps the better. Attributes (the
    defaults, and why):

        min_inliers: 25. Near-duplicates share most of their content, so the bar is well above
            the 10 of geometric re-ranking (where unrelated rParis6k-mini photos reached at most
            9 inliers at 8 px); different photos of one facade are kept out mainly by the
            similarity, containment and tight-threshold tests below.
        min_inlier_ratio: 0.25. Inliers as a fraction of the keypoints that lie in the part
            both frames show (a's keypoints that the transform puts inside b, b's that its
            inverse puts inside a; the smaller count), times the size ratio of the two when
            one is smaller (a copy at 36-53 % of the size kept 15-22 % of them as inliers). A copy repeats most of its keypoints
            there (0.32 to 0.93 in the dedup benchmark, the lowest for 30 % resizes), while two
            photos of one scene taken from the same spot share only the planar, unchanged parts
            (0.14 to 0.17 for night shots of the Moulin Rouge's sign, which still fit a
            similarity with 120-170 inliers).
        threshold: 4 px (at a 1024 px long side, scaled to image b's size): a copy maps
            pixel-exactly (re-compression and resampling move SIFT keypoints by about a pixel),
            while two views of a 3-D scene leave parallax; verification for retrieval uses 8.
        max_anisotropy: 1.25. Largest ratio of the transform's singular values: a resized or
            rotated copy is a similarity (ratio 1); a view from elsewhere is not.
        max_scale: 16. Largest size ratio (a thumbnail of a photo is still its duplicate).
        min_coverage: 0.85. One of the two frames must lie inside the other (a crop, a resize,
            a rotation): at least this fraction of it. Two overlapping shots of one scene fail.
        ratio: 0.85. Lowe's ratio for the putative matches (mutual nearest neighbours too).
        mirror: True. Also try the mirror image (flipped copies).
        max_residual: 0.3 px. After the geometric tests, the median distance of the inliers from
            the least-squares affine map of them (:func:`affine_residuals`), measured in pixels of
            the coarser of the two images as their features were detected (long side at most
            ``reference_side``), must be at most this. A copy is an exact similarity of the
            original, so what is left is keypoint localisation noise; a second shot of a scene
            from the same spot and framing leaves a systematic part (parallax, a small turn of
            the camera, the lens distortion of another zoom). On the dedup benchmark's set,
            copies left 0.01-0.21 px (JPEG q 20-50 the most; resizes at most 0.11), the distinct
            shots that passed every geometric test 0.42-1.55 px. 0 turns the test off.
        min_correlation: 0.965, with ``images`` given: after the geometric tests, b warped onto
            a by the fitted transform must correlate with a (:func:`aligned_correlation`):
            ``ncc >= min_correlation`` or, for a copy with a caption written over it,
            ``local >= max(min_correlation, 0.99)``. On the dedup benchmark's set, copies reached
            0.970-1.000 and distinct frontal shots of one facade that fit a similarity
            0.943-0.984 (most below the bar). 0 turns the test off.
    """

    min_inliers: int = 25
    min_inlier_ratio: float = 0.25
    threshold: float = 4.0
    reference_side: int = 1024
    max_anisotropy: float = 1.25
    max_scale: float = 16.0
    min_coverage: float = 0.85
    ratio: float = 0.85
    mirror: bool = True
    seed: int = 0
    max_residual: float = 0.3
    min_correlation: float = 0.965

    def __post_init__(self) -> None:
        _check_pos_int("min_inliers", self.min_inliers)
        _check_unit_interval("min_inlier_ratio", self.min_inlier_ratio, 0.0)
        _check_unit_interval("min_coverage", self.min_coverage, 0.0)
        _check_unit_interval("ratio", self.ratio, 0.0)
        _check_unit_interval("min_correlation", self.min_correlation, 0.0)
        v = self.max_residual
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"max_residual must be a finite number >= 0 (0: off), got {v!r}")
        for name in ("threshold", "max_anisotropy", "max_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if self.max_anisotropy < 1 or self.max_scale < 1:
            raise ValueError(f"max_anisotropy and max_scale must be >= 1, got {self.max_anisotropy!r}, {self.max_scale!r}")
        _check_pos_int("reference_side", self.reference_side)

    def _fit(self, fa: Any, fb: Any) -> tuple[Any, np.ndarray]:
        """``(Verification, its inlier matches (K, 2))`` of ``fa`` to ``fb``."""
        from .local.matching import match_descriptors
        from .local.verification import estimate_transform

        if fa.kind != fb.kind:
            raise ValueError(f"cannot match local features of kind {fa.kind!r} with kind {fb.kind!r}")
        px = self.threshold * max(fb.size) / self.reference_side
        matches = match_descriptors(fa.descriptors, fb.descriptors, ratio=self.ratio, mutual=True)
        ver = estimate_transform(fa.keypoints, fb.keypoints, matches, model="affine", method="magsac",
                                 threshold=max(px, 1.0), max_scale=self.max_scale,
                                 max_anisotropy=self.max_anisotropy, seed=self.seed)
        return ver, (matches[ver.mask] if ver.transform is not None else np.zeros((0, 2), np.int64))

    def __call__(self, fa: Any, fb: Any, images: tuple[Any, Any] | None = None) -> PairCheck:
        """Check the local features ``fa`` of image a against ``fb`` of image b; with ``images``
        (a's and b's pixels: paths, PIL images or arrays, the latter possibly downscaled from
        the frames of ``fa`` and ``fb``, or zero-argument callables returning one of them) also
        their aligned correlation."""
        if fa is None or fb is None or len(fa) == 0 or len(fb) == 0:
            return PairCheck(False, reason="no local features")
        tries = [(False, fa, *self._fit(fa, fb))]
        if self.mirror and fa.kind == "sift":
            fm = mirror_features(fa)
            tries.append((True, fm, *self._fit(fm, fb)))
        flip, fa_used, ver, inl = max(tries, key=lambda t: t[2].inliers)
        if ver.transform is None:
            return PairCheck(False, reason="no transform")
        h = ver.transform.copy()
        if flip:  # ver maps mirrored a to b: compose with the mirror of a
            m = np.array([[-1.0, 0.0, fa.size[0] - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
            lin = h[:2, :2]
            h = h @ m
        else:
            lin = h[:2, :2]
        sv = np.linalg.svd(lin, compute_uv=False)
        scale = float(math.sqrt(abs(np.linalg.det(lin))))
        # y points down in images: an on-screen counter-clockwise turn has a negative angle here
        rot = -math.degrees(math.atan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1]))
        rot = 180.0 if rot <= -180.0 else rot
        cov = _coverage(h, fa.size, fb.size)
        try:
            shared = min(_inside_count(fa.keypoints, h, fb.size), _inside_count(fb.keypoints, np.linalg.inv(h), fa.size))
        except np.linalg.LinAlgError:  # a singular fit: no shared part to speak of
            shared = 0
        fewer = max(1, shared)
        out = dict(inliers=ver.inliers, flip=flip, rotation=rot, scale=scale, coverage=cov, transform=h)
        if ver.inliers < self.min_inliers:
            return PairCheck(False, **out, reason=f"{ver.inliers} inliers < {self.min_inliers}")
        # a downscaled copy repeats only the coarse keypoints of the larger image: the bar scales with the size ratio
        bar = self.min_inlier_ratio * min(1.0, scale, 1.0 / max(scale, 1e-9))
        if ver.inliers < bar * fewer:
            return PairCheck(False, **out, reason=f"{ver.inliers} inliers < {bar:.3g} x {fewer} keypoints "
                                                  "in the shared part")
        if sv[0] > self.max_anisotropy * sv[1]:
            return PairCheck(False, **out, reason=f"not a similarity (anisotropy {sv[0] / sv[1]:.2f})")
        if max(cov) < self.min_coverage:
            return PairCheck(False, **out, reason=f"neither frame inside the other (coverage {cov[0]:.2f}, {cov[1]:.2f})")
        if self.max_residual > 0 and len(inl) >= 3:
            # b pixels per pixel of the coarser detection: a's (ua of its pixels, `scale` b pixels
            # each) or b's (ub of its pixels), features being detected at most reference_side long
            ua = max(1.0, max(fa.size) / self.reference_side)
            ub = max(1.0, max(fb.size) / self.reference_side)
            r = affine_residuals(fa_used.keypoints[inl[:, 0], :2], fb.keypoints[inl[:, 1], :2])
            out["residual"] = res = float(np.median(r)) / max(ua * scale, ub)
            if res > self.max_residual:
                return PairCheck(False, **out, reason=f"inliers off an exact map (median residual {res:.2f} px "
                                                      f"> {self.max_residual:g})")
        if images is not None and self.min_correlation > 0:
            try:
                g, loc = aligned_correlation(images[0], images[1], h, frames=(fa.size, fb.size))
            except (OSError, ValueError) as e:  # unreadable pixels: no photometric evidence
                return PairCheck(False, **out, reason=f"pixels not comparable: {e}")
            if g < self.min_correlation and loc < max(self.min_correlation, 0.99):
                return PairCheck(False, **out, reason=f"pixels differ once aligned (correlation {g:.3f}, "
                                                      f"blocks {loc:.3f} < {self.min_correlation:g})")
        return PairCheck(True, **out)


# ------------------------------------------------------------------------------- groups


def duplicate_groups(n: int, pairs: np.ndarray | Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components with at least two members of the graph on ``n`` nodes whose edges
    are ``pairs`` ``(M, 2)``: sorted member lists, ordered by their first member."""
    n = int(n)
    p = np.asarray(list(pairs) if not isinstance(pairs, np.ndarray) else pairs, dtype=np.int64).reshape(-1, 2)
    if p.size and (p.min() < 0 or p.max() >= n):
        raise ValueError(f"pairs index nodes out of range (n = {n})")
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in p.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DuplicatePair:
    """A confirmed (or, without verification, a candidate) pair of :class:`DedupResult`.

    ``a``, ``b`` are positions in ``DedupResult.keys`` (``a < b``); ``score`` the best cosine;
    ``inliers`` -1 when not verified; ``edit`` what turns a into b (:meth:`PairCheck.edit`,
    or the variant that matched when not verified: "" for none); ``residual`` the inliers'
    median residual (:attr:`PairCheck.residual`, NaN when not measured)."""

    a: int
    b: int
    score: float
    inliers: int = -1
    edit: str = ""
    flip: bool = False
    rotation: float = 0.0
    residual: float = float("nan")


@dataclass
class DedupResult:
    """Near-duplicates of a collection.

    Attributes:
        keys: one per image (its path, or its store id), in input order.
        paths: the image files (for reports and thumbnails).
        groups: lists of positions in ``keys``, each a connected component of confirmed pairs,
            its reference (the member with the most pixels) first.
        pairs: the confirmed :class:`DuplicatePair` s.
        members: per group, ``(position, score, edit)`` relative to its reference (the reference
            itself: ``(position, 1.0, "original")``).
        settings: the parameters of the run (threshold, k, tta, verify, ...).
        skipped: ``(key, reason)`` of images that could not be read.
        candidates: how many candidate pairs the descriptors gave.
    """

    keys: list[Any]
    paths: list[str]
    groups: list[list[int]]
    pairs: list[DuplicatePair]
    members: list[list[tuple[int, float, str]]]
    settings: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[Any, str]] = field(default_factory=list)
    candidates: int = 0

    def duplicates(self, scores: bool = False) -> dict[Any, list[Any]]:
        """``{key: [keys of the other members of its group]}`` for every image, as imagededup's
        ``find_duplicates`` returns (an empty list for an image without duplicates). With
        ``scores``: ``[(key, score)]``, the score being the cosine of the two images."""
        out: dict[Any, list[Any]] = {k: [] for k in self.keys}
        score = {}
        for p in self.pairs:
            score[(p.a, p.b)] = score[(p.b, p.a)] = p.score
        for g, mem in zip(self.groups, self.members):
            ref = g[0]
            to_ref = {i: s for i, s, _ in mem}
            for i in g:
                others = []
                for j in g:
                    if j == i:
                        continue
                    s = score.get((i, j))
                    if s is None:
                        s = to_ref[j] if i == ref else (to_ref[i] if j == ref else min(to_ref[i], to_ref[j]))
                    others.append((self.keys[j], round(float(s), 4)))
                others.sort(key=lambda t: -t[1])
                out[self.keys[i]] = others if scores else [k for k, _ in others]
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per group member: group (from 1), key, path, score, edit."""
        out = []
        for gi, mem in enumerate(self.members, 1):
            for i, s, e in mem:
                out.append({"group": gi, "key": self.keys[i], "path": self.paths[i], "score": round(float(s), 4),
                            "edit": e})
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return {
            "settings": self.settings,
            "images": len(self.keys),
            "candidates": self.candidates,
            "groups": [[{"key": self.keys[i], "path": self.paths[i], "score": round(float(s), 4), "edit": e}
                        for i, s, e in mem] for mem in self.members],
            "pairs": [{"a": self.keys[p.a], "b": self.keys[p.b], "score": round(float(p.score), 4),
                       "inliers": p.inliers, "edit": p.edit, "flip": p.flip, "rotation": round(p.rotation, 2),
                       "residual": None if math.isnan(p.residual) else round(p.residual, 3)}
                      for p in self.pairs],
            "duplicates": {str(k): v for k, v in self.duplicates(scores=True).items() if v},
            "skipped": [{"key": k, "reason": r} for k, r in self.skipped],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    def to_csv(self) -> str:
        """``group,path,score,edit`` (and key): one row per member of each group, reference first."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["group", "path", "score", "edit", "key"])
        for r in self.rows():
            w.writerow([r["group"], r["path"], f"{r['score']:.4f}", r["edit"], r["key"]])
        return buf.getvalue()

    def to_html(self, *, thumb: int = 160, title: str = "imret near-duplicates") -> str:
        """A self-contained page: per group, the members' thumbnails (data URIs) with path, score, edit."""
        import html

        from .plots import thumbnail_data_uri

        fig = ("margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;"
               f"width:{thumb}px;flex:none;font:12px system-ui,sans-serif;color:#222")
        img = f"display:block;width:{thumb}px;height:{thumb}px"
        parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
                 f"<title>{html.escape(title)}</title></head>",
                 "<body style='font:14px system-ui,sans-serif;margin:24px;background:#fafafa;color:#222'>",
                 f"<h1 style='font-size:18px'>{html.escape(title)}</h1>",
                 f"<p>{len(self.keys)} images, {len(self.groups)} groups of near-duplicates, "
                 f"{sum(len(g) - 1 for g in self.groups)} duplicates.</p>"]
        for gi, mem in enumerate(self.members, 1):
            parts.append(f"<section data-group='{gi}' style='margin:0 0 16px'><h2 style='font-size:14px'>group {gi} "
                         f"({len(mem)} images)</h2><div style='display:flex;flex-wrap:wrap;gap:8px'>")
            for i, s, e in mem:
                path = self.paths[i]
                target = Path(path).resolve().as_uri() if os.path.isabs(path) else path
                border = ";border:2px solid #3b6fd4" if e == "original" else ""
                parts.append(
                    f"<figure style='{fig}{border}'><a href='{html.escape(target)}'>"
                    f"<img alt='{html.escape(os.path.basename(path))}' style='{img}' src='{thumbnail_data_uri(path, thumb, None)}'>"
                    f"</a><figcaption style='margin-top:4px;word-break:break-all'><b>{html.escape(e)}</b> · {s:.3f}"
                    f"<br>{html.escape(os.path.basename(path))}</figcaption></figure>")
            parts.append("</div></section>")
        parts.append("</body></html>\n")
        return "".join(parts)


REPORT_FORMATS = (".json", ".csv", ".html")


def write_report(result: DedupResult, path: str | os.PathLike) -> Path:
    """Write ``result`` as JSON, CSV or HTML, chosen by the extension of ``path``."""
    from .fileio import atomic_write_bytes

    p = Path(path)
    ext = p.suffix.lower()
    if ext not in REPORT_FORMATS:
        raise ValueError(f"unknown report format {p.suffix!r} of {os.fspath(path)!r}; available: "
                         f"{', '.join(REPORT_FORMATS)}")
    text = result.to_json() if ext == ".json" else result.to_csv() if ext == ".csv" else result.to_html()
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, text.encode("utf-8"))
    return p


# ----------------------------------------------------------------------------- pipeline


def _image_size(path: str) -> tuple[int, int] | None:
    from .images import open_image, upright_size

    try:
        img = open_image(path)
        try:
            return upright_size(img)
        finally:
            img.close()
    except Exception:  # unreadable now: the group still stands, ordered without its size
        return None


def deduplicate(
    keys: Sequence[Any],
    paths: Sequence[str],
    descriptors: np.ndarray,
    *,
    variants: np.ndarray | None = None,
    variant_names: Sequence[str] = (),
    threshold: float | None = None,
    k: int = DEFAULT_K,
    verify: bool = True,
    features: Callable[[int], Any] | None = None,
    check: DuplicateCheck | None = None,
    progress: bool = False,
    settings: dict[str, Any] | None = None,
) -> DedupResult:
    """The pipeline on described images: candidates, verification, groups, per-group edits.

    Args:
        keys, paths: per row of ``descriptors``, its key (path or id) and its file.
        descriptors: ``(N, D)`` L2-normalised; ``variants`` ``(N, V, D)`` of the
            ``variant_names`` (:func:`describe_variants`) or None.
        threshold: cosine bar of the candidates (default :data:`DEFAULT_THRESHOLD_VERIFY`, or
            :data:`DEFAULT_THRESHOLD_DESCRIPTOR` without verification).
        verify: confirm candidates with local features; ``features(i)`` gives image ``i``'s
            (default: RootSIFT of ``paths[i]``, computed once per image in a candidate pair).
        check: the :class:`DuplicateCheck` (default settings when None).
    """
    from tqdm.auto import tqdm

    n = len(keys)
    if len(paths) != n or np.asarray(descriptors).shape[0] != n:
        raise ValueError(f"keys ({n}), paths ({len(paths)}) and descriptors ({np.asarray(descriptors).shape[0]}) "
                         "must have one entry per image")
    if threshold is None:
        threshold = DEFAULT_THRESHOLD_VERIFY if verify else DEFAULT_THRESHOLD_DESCRIPTOR
    check = check or DuplicateCheck()
    names = ("",) + tuple(variant_names)
    cands = candidate_pairs(descriptors, threshold, k=k, variants=variants, progress=progress)
    cache: dict[int, Any] = {}
    if verify and features is None:
        from .local.sift import SiftExtractor

        sift = SiftExtractor()

        def features(i: int) -> Any:
            try:
                return sift(paths[i])
            except Exception:  # an unreadable file: no local features, so the pair is not confirmed
                return None

    def feats(i: int) -> Any:
        if i not in cache:
            cache[i] = features(i)  # type: ignore[misc]
        return cache[i]

    grey_cache = _GreyCache()

    def pixels(i: int) -> Callable[[], np.ndarray]:
        """Image i's grey pixels for the photometric check, decoded when a pair first gets there,
        then kept while they fit in memory (an unreadable file raises there: the pair is not
        confirmed)."""
        return lambda: grey_cache(paths[i])

    checks: dict[tuple[int, int], PairCheck] = {}
    confirmed: list[DuplicatePair] = []
    for (a, b), s, v in tqdm(zip(cands.pairs.tolist(), cands.scores.tolist(), cands.variants.tolist()),
                             total=len(cands), desc="verify" if verify else "pairs", unit="pair",
                             disable=not progress or not verify):
        if not verify:
            confirmed.append(DuplicatePair(a, b, float(s), -1, names[v] if v < len(names) else ""))
            continue
        pc = check(feats(a), feats(b), images=(pixels(a), pixels(b)))
        checks[(a, b)] = pc
        if pc.confirmed:
            confirmed.append(DuplicatePair(a, b, float(s), pc.inliers, pc.edit(), pc.flip, pc.rotation,
                                           pc.residual))
    groups = duplicate_groups(n, [(p.a, p.b) for p in confirmed])

    direct = {(p.a, p.b): p for p in confirmed}
    ordered, members = [], []
    for g in groups:
        sizes = {i: _image_size(paths[i]) for i in g}
        ref = max(g, key=lambda i: ((sizes[i][0] * sizes[i][1]) if sizes[i] else -1, -i))
        g = [ref] + [i for i in g if i != ref]
        others = np.asarray([[ref, i] for i in g[1:]])
        sc = pair_scores(descriptors, others, variants=variants)
        mem = [(ref, 1.0, "original")]
        for (_, i), s in zip(others.tolist(), sc.tolist()):
            if not verify:
                p = direct.get((min(ref, i), max(ref, i)))
                mem.append((i, float(s), p.edit if p else ""))
                continue
            pc = checks.get((ref, i)) or check(feats(ref), feats(i), images=(pixels(ref), pixels(i)))  # reference -> member
            mem.append((i, float(s), pc.edit() if pc.confirmed else "similar"))
        ordered.append(g)
        members.append(mem)
    st = {"threshold": float(threshold), "k": int(k), "tta": list(variant_names), "verify": bool(verify)}
    if verify:
        st["check"] = {f: getattr(check, f) for f in check.__dataclass_fields__}
    st.update(settings or {})
    return DedupResult(list(keys), list(paths), ordered, confirmed, members, st, [], len(cands))


def find_duplicates(
    images: Sequence[str | os.PathLike],
    model: Any,
    *,
    threshold: float | None = None,
    k: int = DEFAULT_K,
    tta: Sequence[str] | str = DEFAULT_TTA,
    verify: bool = True,
    image_size: int = 512,
    check: DuplicateCheck | None = None,
    local: Any = None,
    progress: bool = False,
    **extract_kw: Any,
) -> DedupResult:
    """Near-duplicates among image files: describe them (and their ``tta`` variants) with
    ``model``, then :func:`deduplicate`.

    Args:
        images: image paths (keys of the result).
        model: a :class:`~imret.model.RetrievalNet` (``imret.create_model(...)``).
        image_size: long side the model sees (512: near-duplicates are alike at any size, and
            it is 4x cheaper than 1024).
        local: the local extractor for verification (default ``SiftExtractor()``: RootSIFT,
            1000 keypoints at 1024 px).
        extract_kw: passed to :func:`imret.extract.extract` (device, batch_size, workers,
            precision, scales, ...).
    """
    from .extract import extract

    paths = [os.fspath(p) for p in images]
    names = _check_tta(tta)
    extract_kw = dict(extract_kw)
    extract_kw.pop("progress", None)
    extract_kw.pop("image_size", None)

    def encode(ims: list[Image.Image]) -> np.ndarray:
        return extract(model, ims, image_size=image_size, on_error="raise", progress=False, **extract_kw).descriptors

    rows, kept, skipped = describe_variants(encode, paths, names, image_size=image_size, progress=progress)
    kpaths = [paths[i] for i in kept.tolist()]
    features = None
    if verify and local is not None:
        def features(i: int) -> Any:
            try:
                return local(kpaths[i])
            except Exception:
                return None
    res = deduplicate(kpaths, kpaths, rows[:, 0], variants=rows[:, 1:] if names else None, variant_names=names,
                      threshold=threshold, k=k, verify=verify, features=features, check=check, progress=progress,
                      settings={"image_size": image_size})
    res.skipped = [(paths[i], r) for i, r in skipped]
    return res


def find_duplicates_in_store(
    store: Any,
    *,
    threshold: float | None = None,
    k: int = DEFAULT_K,
    tta: Sequence[str] | str = DEFAULT_TTA,
    verify: bool = True,
    check: DuplicateCheck | None = None,
    progress: bool = False,
    **extract_kw: Any,
) -> DedupResult:
    """Near-duplicates among the live images of a :class:`~imret.index.store.Store` (keys: ids).

    Uses the stored descriptors (raw, before whitening) for the images themselves; the ``tta``
    variants are described from the image files with the store's model and preprocessing
    (``extract_kw``: batch_size, workers, precision); an image whose file is gone keeps its
    stored descriptor only. Verification uses the stored local features when the store keeps
    RootSIFT (``configure(local="sift")``), else RootSIFT computed from the files of the images in
    candidate pairs only.
    """
    from .local.sift import SiftExtractor

    names = _check_tta(tta)
    recs = []
    offset = 0
    while True:
        page = store.list(offset=offset, limit=10_000)
        recs.extend(page)
        if len(page) < 10_000:
            break
        offset += len(page)
    ids = np.asarray([r.id for r in recs], np.int64)
    paths = [r.path for r in recs]
    desc = np.asarray(store.descriptors()[ids], np.float32) if ids.size else np.zeros((0, store.dim), np.float32)
    variants = None
    skipped: list[tuple[Any, str]] = []
    if names and ids.size:
        def encode(ims: list[Image.Image]) -> np.ndarray:
            return store.encode(ims, **extract_kw).descriptors

        image_size = store.preprocessing.image_size
        rows, kept, bad = describe_variants(encode, paths, names, image_size=image_size, progress=progress)
        variants = np.repeat(desc[:, None, :], len(names), axis=1)  # a missing file: its own descriptor
        if kept.size:
            variants[kept] = rows[:, 1:]
        skipped = [(int(ids[i]), f"no test-time variants: {r}") for i, r in bad]
    features = None
    if verify:
        stored = store.local_kind == "sift"
        sift = SiftExtractor()

        def features(i: int) -> Any:
            if stored:
                f = store.local_features([int(ids[i])])[0]
                if f is not None:
                    return f
            try:
                return sift(paths[i])
            except Exception:
                return None
    res = deduplicate(ids.tolist(), paths, desc, variants=variants, variant_names=names, threshold=threshold, k=k,
                      verify=verify, features=features, check=check, progress=progress,
                      settings={"store": os.fspath(store.path)})
    res.skipped = skipped
    return res


# ------------------------------------------------------------------------- evaluation aid

EDITS = ("crop", "resize", "jpeg", "flip", "rotate", "colour", "text")


def apply_edit(image: Image.Image, edit: str, rng: np.random.Generator) -> Image.Image:
    """A near-duplicate of ``image`` by one random edit of :data:`EDITS` (for tests and benchmarks):
    crop (60-90 % of each side), resize (30-70 %), jpeg (quality 20-50, decoded back), flip
    (left-right), rotate (90, 180 or 270°), colour (brightness, contrast, saturation x 0.7-1.3),
    text (a caption over 5-10 % of the height)."""
    img = image.convert("RGB")
    w, h = img.size
    if edit == "crop":
        f = float(rng.uniform(0.6, 0.9))
        cw, ch = max(1, round(w * f)), max(1, round(h * f))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x0, y0, x0 + cw, y0 + ch))
    if edit == "resize":
        f = float(rng.uniform(0.3, 0.7))
        return img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BICUBIC)
    if edit == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(20, 51)))
        buf.seek(0)
        out = Image.open(buf)
        out.load()
        return out.convert("RGB")
    if edit == "flip":
        return ImageOps.mirror(img)
    if edit == "rotate":
        return img.transpose([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                              Image.Transpose.ROTATE_270][int(rng.integers(0, 3))])
    if edit == "colour":
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 1.3)))
        img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.7, 1.3)))
        return ImageEnhance.Color(img).enhance(float(rng.uniform(0.7, 1.3)))
    if edit == "text":
        from PIL import ImageFont

        out = img.copy()
        draw = ImageDraw.Draw(out)
        size = max(10, int(h * float(rng.uniform(0.05, 0.1))))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: the fixed bitmap font
            font = ImageFont.load_default()
        y = int(rng.uniform(0.05, 0.85) * h)
        draw.text((int(0.05 * w), y), "imret near-duplicate #" + str(int(rng.integers(0, 10_000))),
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)), font=font)
        return out
    raise ValueError(f"unknown edit {edit!r}; available: {', '.join(EDITS)}")
