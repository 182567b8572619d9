"""Object localisation by approximate integral max-pooling (AML) and the re-ranker built on it.

Tolias, Sicre, Jégou, "Particular object retrieval with integral max-pooling of CNN
activations", ICLR 2016, section 5. The max-pooled vector of a region ``R`` of a non-negative
feature map ``X`` is approximated by the generalised mean

    f~_R,c = ( sum_{p in R} X_c(p)^alpha )^(1/alpha)          (alpha = 10 in the paper)

which integral images of ``X^alpha`` give in four look-ups per channel, whatever the region's
size. The query's (max-pooled) vector is compared with ``f~_R / ||f~_R||`` over windows whose
sides lie on a coarse grid and whose aspect ratio is close to the query's, and the best window
is refined by moving its sides (coordinate ascent on the cosine). The localised region's own
descriptor then re-scores the top of a ranking (:class:`LocalizationReranker`).

Defaults and where they come from: ``alpha = 10`` (the paper); windows with sides on a grid of
``step = 3`` cells, aspect ratio within a factor ``1.1`` of the query's, refinement moves of
3, 2, 1 cells with at most 10 iterations each (the values a public re-implementation of the
paper's AML uses; the paper describes the grid, the aspect-ratio constraint and the
refinement); query expansion with the top 5 localised regions (the paper's "+ QE"). The paper
re-ranks the top 1000; :class:`LocalizationReranker` defaults to 100 (about 40 ms per
candidate on one CPU thread for a 1280-channel 32 x 24 map).

Boxes come in two units:

* map cells: integer ``(x1, y1, x2, y2)``, half-open (columns ``x1 .. x2-1``, rows
  ``y1 .. y2-1``) on a ``(C, h, w)`` map;
* pixels: float ``(x1, y1, x2, y2)`` in the original (full-resolution, displayed) image.

A map of ``(h, w)`` cells covers the whole image it was computed from (resized to
``image_size`` long side as :func:`imret.extract.extract` does), so cell ``j`` spans pixels
``[j W / w, (j + 1) W / w)`` (:func:`cells_to_pixels`, :func:`pixels_to_cells`).

Numerics: ``X^alpha`` of raw activations over- or underflows (activations of 100 give 1e20 at
alpha = 10 and overflow float32 at alpha = 20). :func:`integral_images` therefore divides each
channel by its maximum over the map first (so every value is in ``[0, 1]``), sums in float64,
and :func:`approx_max_pool` multiplies the maximum back after the ``1/alpha`` root. Values
below 1e-30 of their channel's maximum vanish at alpha = 10, which changes no result; the
four-term difference of the integral image resolves less (see :data:`CANCELLATION`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ALPHA",
    "CANCELLATION",
    "IntegralImages",
    "integral_images",
    "approx_max_pool",
    "exact_max_pool",
    "candidate_windows",
    "localize",
    "Localization",
    "cells_to_pixels",
    "pixels_to_cells",
    "FeatureMap",
    "compute_maps",
    "LocalizationReranker",
]

ALPHA = 10.0
"""The exponent of the approximate max-pooling (Tolias et al. 2016: alpha = 10)."""


# --- integral max-pooling -------------------------------------------------------------------------


@dataclass(frozen=True)
class IntegralImages:
    """Per-channel integral images of ``(X / max_c X)^alpha`` for one ``(C, h, w)`` map.

    Attributes:
        sums: ``(C, h + 1, w + 1)`` float64; ``sums[c, y, x]`` is the sum of the normalised
            ``X_c^alpha`` over rows ``< y`` and columns ``< x`` (a zero first row and column).
        scale: ``(C,)`` float64 maximum of each channel over the map (0 for a channel that is
            0 everywhere).
        alpha: the exponent.
    """

    sums: np.ndarray
    scale: np.ndarray
    alpha: float

    @property
    def shape(self) -> tuple[int, int]:
        """``(h, w)`` of the map in cells."""
        return int(self.sums.shape[1] - 1), int(self.sums.shape[2] - 1)


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def _check_map(fmap: Any, name: str = "fmap") -> np.ndarray:
    try:
        import torch

        if isinstance(fmap, torch.Tensor):
            fmap = fmap.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency of imret
        pass
    a = np.asarray(fmap)
    if a.ndim != 3 or min(a.shape) < 1:
        raise ValueError(f"{name} must be a non-empty (C, h, w) array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return a


def integral_images(fmap: np.ndarray, alpha: float = ALPHA) -> IntegralImages:
    """Integral images of ``X^alpha`` for a ``(C, h, w)`` feature map (negative values clamped to 0).

    Each channel is divided by its maximum over the map before raising it to ``alpha`` (so no
    power over- or underflows), and the sums are float64; :func:`approx_max_pool` puts the
    maxima back. Tolias et al., ICLR 2016, section 5.
    """
    alpha = _check_alpha(alpha)
    x = np.maximum(_check_map(fmap), 0.0)
    scale = x.max(axis=(1, 2))
    safe = np.where(scale > 0, scale, 1.0)
    xa = (x / safe[:, None, None]) ** alpha
    c, h, w = x.shape
    sums = np.zeros((c, h + 1, w + 1), np.float64)
    np.cumsum(np.cumsum(xa, axis=1), axis=2, out=sums[:, 1:, 1:])
    return IntegralImages(sums, scale, alpha)


def _check_cell_boxes(boxes: Any, shape: tuple[int, int]) -> np.ndarray:
    b = np.asarray(boxes)
    if b.ndim == 1:
        b = b.reshape(1, -1)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (B, 4) cell boxes (x1, y1, x2, y2), got shape {np.asarray(boxes).shape}")
    if b.size and not np.issubdtype(b.dtype, np.integer):
        if not np.array_equal(b, np.round(b)):
            raise ValueError(f"cell boxes must be whole numbers, got {b[np.any(b != np.round(b), axis=1)][0].tolist()}")
    b = b.astype(np.int64)
    h, w = shape
    bad = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h) | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if bad.any():
        raise ValueError(f"cell box {b[bad][0].tolist()} is empty or outside the {h} x {w} map; "
                         f"expected 0 <= x1 < x2 <= {w} and 0 <= y1 < y2 <= {h}")
    return b


CANCELLATION = 16 * float(np.finfo(np.float64).eps)
"""Region sums at or below this fraction of the largest of their four integral-image terms
are set to 0: they are rounding residue of the difference (a region of zeros gives about
1e-16, which the ``1/alpha`` root would turn into 2.5 % of the channel's maximum at alpha = 10).
So a channel whose values in a region are all below about ``(CANCELLATION * h * w)^(1/alpha)``
of the channel's maximum over the map (about 5 % for 1000 cells at alpha = 10) reads as 0."""


def _region_sums(sums: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(B, C)`` sums over the half-open cell boxes ``b`` (checked) from ``(C, h+1, w+1)`` integral images."""
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    whole = sums[:, y2, x2]  # the largest term: every sum is of non-negative values
    s = whole - sums[:, y1, x2] - sums[:, y2, x1] + sums[:, y1, x1]
    s[s <= CANCELLATION * whole] = 0.0
    return s.T


def approx_max_pool(ii: IntegralImages, boxes: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
    """``(B, C)`` float64 approximate max-pooled vectors ``(sum_R X^alpha)^(1/alpha)`` of cell boxes.

    ``boxes`` are ``(B, 4)`` half-open cell boxes ``(x1, y1, x2, y2)`` on the map of ``ii``. The
    result lies between the exact max and ``|R|^(1/alpha)`` times it, and tends to the max as
    alpha grows (Tolias et al., ICLR 2016, eq. 4). Work is done ``chunk`` boxes at a time.
    """
    b = _check_cell_boxes(boxes, ii.shape)
    out = np.empty((b.shape[0], ii.scale.shape[0]), np.float64)
    for s in range(0, b.shape[0], chunk):
        part = b[s:s + chunk]
        out[s:s + chunk] = _region_sums(ii.sums, part) ** (1.0 / ii.alpha) * ii.scale
    return out


def exact_max_pool(fmap: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``(B, C)`` exact max over each cell box of ``max(X, 0)`` (a loop over boxes; the
    reference :func:`approx_max_pool` approximates)."""
    x = np.maximum(_check_map(fmap), 0.0)
    b = _check_cell_boxes(boxes, x.shape[1:])
    return np.stack([x[:, y1:y2, x1:x2].max(axis=(1, 2)) for x1, y1, x2, y2 in b]) if len(b) \
        else np.zeros((0, x.shape[0]))


# --- window search ----------------------------------------------------------------------------------


def _edges(n: int, step: int) -> np.ndarray:
    return np.unique(np.concatenate([np.arange(0, n, step), [n]]))


def candidate_windows(shape: tuple[int, int], step: int = 3, aspect: float | None = None,
                      max_aspect_change: float = 1.1) -> np.ndarray:
    """``(B, 4)`` int64 cell boxes whose sides lie on a grid of ``step`` cells (plus the map's border).

    With ``aspect`` (the query's width / height), only windows with
    ``|log(window aspect / aspect)| <= log(max_aspect_change)`` are kept; when none is (a map of
    a few cells), the windows of the nearest aspect ratio are. Tolias et al. (2016) search
    windows on such a grid with the query's aspect ratio.
    """
    h, w = (int(v) for v in shape)
    if h < 1 or w < 1:
        raise ValueError(f"shape must be (h, w) >= 1, got {tuple(shape)}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be a positive integer (cells), got {step!r}")
    xs, ys = _edges(w, int(step)), _edges(h, int(step))
    xi, xj = np.triu_indices(len(xs), 1)
    yi, yj = np.triu_indices(len(ys), 1)
    xp = np.stack([xs[xi], xs[xj]], 1)
    yp = np.stack([ys[yi], ys[yj]], 1)
    bx = np.repeat(xp, len(yp), axis=0)
    by = np.tile(yp, (len(xp), 1))
    boxes = np.stack([bx[:, 0], by[:, 0], bx[:, 1], by[:, 1]], 1).astype(np.int64)
    if aspect is None:
        return boxes
    if not (isinstance(aspect, (int, float, np.integer, np.floating)) and math.isfinite(aspect) and aspect > 0):
        raise ValueError(f"aspect must be a finite number > 0 (width / height) or None, got {aspect!r}")
    if not (isinstance(max_aspect_change, (int, float, np.integer, np.floating)) and max_aspect_change >= 1):
        raise ValueError(f"max_aspect_change must be a number >= 1, got {max_aspect_change!r}")
    dev = _log_aspect_dev(boxes, aspect)
    limit = max(math.log(max_aspect_change), float(dev.min())) + 1e-9
    return boxes[dev <= limit]


def _cosines(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=1)
    return np.where(n > 0, v @ q / np.where(n > 0, n, 1.0), -1.0)


@dataclass(frozen=True)
class Localization:
    """Result of :func:`localize`.

    Attributes:
        box: ``(x1, y1, x2, y2)`` half-open cell box on the map.
        score: cosine between the query vector and the box's approximate max-pooled vector.
        coarse_box, coarse_score: the best grid window before refinement.
    """

    box: tuple[int, int, int, int]
    score: float
    coarse_box: tuple[int, int, int, int]
    coarse_score: float


def _unit_query(query_vec: Any, c: int) -> np.ndarray:
    q = np.asarray(query_vec, np.float64).ravel()
    if q.shape[0] != c:
        raise ValueError(f"query_vec has {q.shape[0]} values, the map has {c} channels")
    if not np.isfinite(q).all():
        raise ValueError("query_vec holds NaN or infinite values")
    n = np.linalg.norm(q)
    if n == 0:
        raise ValueError("query_vec is all zeros: nothing to localise")
    return q / n


def localize(
    query_vec: np.ndarray,
    fmap: np.ndarray | IntegralImages,
    *,
    alpha: float = ALPHA,
    step: int = 3,
    aspect: float | None = None,
    max_aspect_change: float = 1.1,
    refine: bool = True,
    refine_steps: Sequence[int] = (3, 2, 1),
    max_iter: int = 10,
    starts: int = 3,
) -> Localization:
    """The window of a ``(C, h, w)`` feature map that best matches the query (AML).

    Exhaustive search over :func:`candidate_windows` (sides on a grid of ``step`` cells,
    aspect ratio within ``max_aspect_change`` of ``aspect``), scored by the cosine between the
    query's vector and the L2-normalised approximate max-pooled vector of the window
    (:func:`approx_max_pool`); then, with ``refine``, coordinate ascent from each of the
    ``starts`` best windows: for each move size in ``refine_steps``, each of the four sides (or
    a horizontal and a vertical side together, a corner) is moved in or out by that many cells,
    the best move is taken while it raises the cosine, at most ``max_iter`` times per size, and
    the best refined window wins. Tolias et al., ICLR
    2016, section 5 (alpha = 10; windows on a grid with the query's aspect ratio; refinement
    of the best window).

    Three choices of ours, measured on rParis6k-mini (the 12 queries' boxes found in their own
    images, MobileNetV2 ImageNet weights, 1024 px; see tests/test_localization.py): refinement
    keeps the coarse search's aspect-ratio limit (freeing it let windows grow, since max-pooled
    vectors of supersets rarely lose similarity: mean IoU 0.67 -> 0.70), it starts from the
    3 best windows rather than 1 (mean IoU 0.70 -> 0.72; ``starts=1`` is the paper's), and corner
    moves are tried besides single sides (with the aspect-ratio limit, single moves alone got
    stuck on a window larger than a planted object).

    Args:
        query_vec: ``(C,)`` the query's vector in the map's channel space (its max-pooled
            map in the paper); normalised here.
        fmap: the ``(C, h, w)`` map (non-negative; negative values are clamped) or its
            :func:`integral_images` (then ``alpha`` is theirs).
        alpha: exponent of the approximate max-pooling.
        step: grid step in cells of the coarse search.
        aspect: the query's width / height (None: any aspect ratio).
        max_aspect_change: largest ratio between a window's aspect and ``aspect``.
        refine, refine_steps, max_iter, starts: the refinement (see above).

    Returns:
        :class:`Localization` with the box in cells and its score.
    """
    ii = fmap if isinstance(fmap, IntegralImages) else integral_images(fmap, alpha)
    q = _unit_query(query_vec, ii.scale.shape[0])
    h, w = ii.shape
    windows = candidate_windows((h, w), step, aspect, max_aspect_change)
    scores = _cosines(q, approx_max_pool(ii, windows))
    order = np.argsort(-scores, kind="stable")
    best_box, best_score = windows[order[0]].copy(), float(scores[order[0]])
    coarse = (tuple(int(v) for v in best_box), best_score)
    if refine:
        if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if isinstance(starts, bool) or not isinstance(starts, (int, np.integer)) or starts < 1:
            raise ValueError(f"starts must be a positive integer, got {starts!r}")
        sizes = [int(v) for v in refine_steps]
        if any(v < 1 for v in sizes) or any(isinstance(v, bool) for v in refine_steps):
            raise ValueError(f"refine_steps must be positive integers (cells), got {list(refine_steps)}")
        for j in order[: int(starts)]:
            box, score = _refine(q, ii, windows[j].copy(), float(scores[j]), sizes, int(max_iter),
                                 aspect, max_aspect_change)
            if score > best_score:
                best_box, best_score = box, score
    return Localization(tuple(int(v) for v in best_box), best_score, coarse[0], coarse[1])


def _log_aspect_dev(boxes: np.ndarray, aspect: float) -> np.ndarray:
    return np.abs(np.log((boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])) - math.log(aspect))


def _side_moves() -> np.ndarray:
    """``(24, 4)`` unit moves: one side in or out (8), or one vertical and one horizontal side
    together (16; these keep the aspect ratio while a window shrinks or grows at a corner)."""
    single = np.concatenate([np.eye(4, dtype=np.int64), -np.eye(4, dtype=np.int64)])
    horizontal = [m for m in single if m[0] or m[2]]  # x1 or x2
    vertical = [m for m in single if m[1] or m[3]]
    return np.concatenate([single, np.array([a + b for a in horizontal for b in vertical])])


_MOVES = _side_moves()


def _refine(q: np.ndarray, ii: IntegralImages, box: np.ndarray, score: float, sizes: Sequence[int],
            max_iter: int, aspect: float | None, max_aspect_change: float) -> tuple[np.ndarray, float]:
    """Coordinate ascent on the cosine: the best move (:func:`_side_moves`) of each size while
    it improves, keeping the aspect-ratio limit of the coarse search (or the start's, if looser)."""
    h, w = ii.shape
    limits = np.array([w, h, w, h])
    if aspect is not None:
        limit = max(math.log(max_aspect_change), float(_log_aspect_dev(box[None], aspect)[0])) + 1e-9
    for size in sizes:
        moves = _MOVES * size
        for _ in range(max_iter):
            cand = np.clip(box[None, :] + moves, 0, limits)
            ok = (cand[:, 2] > cand[:, 0]) & (cand[:, 3] > cand[:, 1]) & np.any(cand != box, axis=1)
            cand = cand[ok]
            if aspect is not None and len(cand):
                cand = cand[_log_aspect_dev(cand, aspect) <= limit]
            if len(cand) == 0:
                break
            s = _cosines(q, approx_max_pool(ii, cand))
            j = int(np.argmax(s))
            if s[j] <= score:
                break
            box, score = cand[j], float(s[j])
    return box, score


# --- cells <-> pixels -------------------------------------------------------------------------------


def _check_sizes(map_shape, image_size) -> tuple[int, int, float, float]:
    h, w = (int(v) for v in map_shape)
    width, height = (float(v) for v in image_size)
    if h < 1 or w < 1 or not (width > 0 and height > 0):
        raise ValueError(f"map_shape (h, w) and image_size (width, height) must be positive, "
                         f"got {tuple(map_shape)} and {tuple(image_size)}")
    return h, w, width, height


def cells_to_pixels(boxes: np.ndarray, map_shape: tuple[int, int], image_size: tuple[float, float]) -> np.ndarray:
    """Cell boxes ``(B, 4)`` of an ``(h, w)`` map -> float32 pixel boxes of the ``(width, height)``
    image the map covers: ``x -> x * width / w``, ``y -> y * height / h``.

    The map of an image resized to ``image_size`` long side covers the whole image, so the resize
    factor cancels: one cell is ``width / w`` original pixels wide (the network's stride divided
    by the resize factor, up to the rounding of the map's size).
    """
    h, w, width, height = _check_sizes(map_shape, image_size)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    f = np.array([width / w, height / h, width / w, height / h])
    return (b * f).astype(np.float32)


def pixels_to_cells(boxes: np.ndarray, map_shape: tuple[int, int], image_size: tuple[float, float]) -> np.ndarray:
    """Pixel boxes ``(B, 4)`` in the ``(width, height)`` image -> int64 half-open cell boxes of its
    ``(h, w)`` map, rounded to the nearest cell edge, clamped to the map and at least one cell
    wide and high (the inverse of :func:`cells_to_pixels` on its outputs)."""
    h, w, width, height = _check_sizes(map_shape, image_size)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not np.isfinite(b).all():
        raise ValueError("pixel boxes must be finite")
    f = np.array([w / width, h / height, w / width, h / height])
    c = np.round(b * f).astype(np.int64)
    lim = np.array([w, h, w, h])
    c = np.clip(c, 0, lim)
    c[:, 0] = np.minimum(c[:, 0], lim[0] - 1)
    c[:, 1] = np.minimum(c[:, 1], lim[1] - 1)
    c[:, 2] = np.maximum(c[:, 2], c[:, 0] + 1)
    c[:, 3] = np.maximum(c[:, 3], c[:, 1] + 1)
    return c


# --- feature maps of images -------------------------------------------------------------------------


class FeatureMap(NamedTuple):
    """The final feature map of one image: ``fmap`` ``(C, h, w)`` float32 and ``size``, the
    ``(width, height)`` in original pixels of the image (or crop) the map covers. Unpacks as
    ``fmap, size = m`` (the form a ``maps`` source of :class:`LocalizationReranker` returns)."""

    fmap: np.ndarray
    size: tuple[int, int]


def _original_size(image: Any) -> tuple[int, int]:
    from ..images import image_size_of

    return image_size_of(image)


def _model_device(model) -> Any:
    return next(model.parameters()).device


def _decode_input(model, image: Any, box, image_size: int):
    """The model's input tensor ``(3, H, W)`` for ``image`` (cropped to ``box``), as extract does."""
    from ..images import check_image_input, load_image, prepare_image, to_tensor

    image = check_image_input(image)
    if isinstance(image, str):
        img = load_image(image, image_size=image_size, bbox=box, crop_resize="image")
    else:
        img = prepare_image(image, image_size=image_size, bbox=box, crop_resize="image")
    return to_tensor(img, model.mean, model.std)


def compute_maps(model, images: Sequence[Any], *, bboxes: Sequence[Any] | None = None, image_size: int = 1024,
                 device: Any = None) -> list[FeatureMap]:
    """The final feature map (``model.features``) of each image, as :func:`imret.extract.extract`
    feeds it to the network: RGB, cropped to its box (with the whole image's resize factor,
    ``crop_resize="image"``), long side resized to ``image_size`` (never up), normalised.

    Args:
        model: a :class:`~imret.models.net.RetrievalNet` (put in eval mode; run on ``device``,
            default the device of its parameters).
        images: paths, PIL images or ``H x W x 3`` uint8 RGB arrays.
        bboxes: per image ``(x1, y1, x2, y2)`` in original pixels, or None.

    Returns:
        One :class:`FeatureMap` per image: the ``(C, h, w)`` float32 map and the ``(width,
        height)`` of the region it covers in original pixels (the whole image, or the box as
        :func:`imret.images.load_image` rounds it: outward to whole pixels, clamped).
    """
    import torch

    from .._checks import positive_int
    from ..images import check_image_input, image_list

    image_size = positive_int(image_size, "image_size")
    images = [check_image_input(x, i) for i, x in enumerate(image_list(images))]
    if bboxes is not None and len(bboxes) != len(images):
        raise ValueError(f"got {len(bboxes)} bboxes for {len(images)} images")
    device = _model_device(model) if device is None else torch.device(device)
    model.eval().to(device)
    out = []
    for i, image in enumerate(images):
        box = None if bboxes is None else bboxes[i]
        x = _decode_input(model, image, box, image_size)
        with torch.inference_mode():
            f = model.features(x[None].to(device))[0].float().cpu().numpy()
        width, height = _original_size(image)
        if box is not None:
            x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
            x2, y2 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
            width, height = x2 - x1, y2 - y1
        out.append(FeatureMap(np.ascontiguousarray(f, np.float32), (int(width), int(height))))
    return out


# --- the re-ranker ----------------------------------------------------------------------------------


def _check_qe(qe: Any) -> int:
    if isinstance(qe, bool) or not isinstance(qe, (int, np.integer)) or qe < 0:
        raise ValueError(f"qe must be an integer >= 0 (0: no query expansion), got {qe!r}")
    return int(qe)


class LocalizationReranker:
    """Re-rank the top of a ranking by the query's similarity to the object localised in each
    database image (AML; Tolias, Sicre, Jégou, ICLR 2016, section 5).

    For each query, the top ``top_k`` candidates are localised (:func:`localize`, with the
    query's max-pooled channel vector and aspect ratio), the localised region of each
    candidate's map is described by the model's own head (``model.head([crop])``: its pooling,
    whitening layer and L2) and post-processed into the rows' space (``postprocess``), and the
    candidates are re-scored by the inner product with the query row ``x``. With ``qe = n``, the
    query row is then averaged with the ``n`` best localised region descriptors, L2-normalised,
    and the top ``top_k`` re-scored with it (the paper's re-ranking + QE, n = 5).

    Scores: the re-ranked block gets those cosines, sorted in decreasing order; if its lowest
    score falls to or below the best score after it, the whole block is raised by the
    difference plus one float32 step, so that it stays above the rest (``extras
    ["region_score"]`` keeps the unshifted cosines). A candidate without a map (``maps`` gives
    None) keeps its first-stage score and is ranked among the block by it. Results past
    ``top_k`` and padding are unchanged.

    Extras: ``"box"`` float32 ``(Q, k, 4)``, the localised ``(x1, y1, x2, y2)`` in original
    pixels of the database image (NaN where none), and ``"region_score"`` float32 ``(Q, k)``.

    Args:
        model: a :class:`~imret.models.net.RetrievalNet` with a global head (pooling ->
            [whitening] -> L2 on the last map).
        maps: ``maps(ids)`` -> per id ``(fmap, (width, height))``: the ``(C, h, w)`` final map
            of the database image (``model.features`` at the extraction's image size; see
            :func:`compute_maps`) and its original size, or None where there is none.
        postprocess: raw ``(N, D)`` descriptors -> the post-processed rows ``x`` lives in (the
            retriever's whitening); None for none.
        top_k: how many candidates to localise per query (the paper re-ranks 1000).
        alpha, step, max_aspect_change, refine: see :func:`localize`.
        qe: query expansion with that many localised regions (0: none).
        image_size: long side of the query images fed to the model (use the database's).
        query_pool: the query's channel vector for localisation: ``"mac"`` (max-pooling,
            the paper) or ``"model"`` (the model's own pooling before whitening, e.g. GeM).
        device: where the model runs on query images (default: its parameters' device).
    """

    def __init__(
        self,
        model,
        maps: Callable[[np.ndarray], Sequence[Any]],
        postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
        *,
        top_k: int = 100,
        alpha: float = ALPHA,
        step: int = 3,
        max_aspect_change: float = 1.1,
        refine: bool = True,
        qe: int = 0,
        image_size: int = 1024,
        query_pool: str = "mac",
        device: Any = None,
    ) -> None:
        from .._checks import positive_int
        from ..models.heads import GlobalHead

        if not isinstance(getattr(model, "head", None), GlobalHead):
            raise TypeError(f"LocalizationReranker needs a RetrievalNet with a global head, got head "
                            f"{type(getattr(model, 'head', None)).__name__}")
        if not callable(maps):
            raise TypeError(f"maps must be callable: maps(ids) -> [(fmap, (width, height)) or None], got {maps!r}")
        if postprocess is not None and not callable(postprocess):
            raise TypeError(f"postprocess must be callable or None, got {postprocess!r}")
        if query_pool not in ("mac", "model"):
            raise ValueError(f"unknown query_pool {query_pool!r}; available: 'mac', 'model'")
        self.model = model
        self.maps = maps
        self.postprocess = postprocess
        self.top_k = positive_int(top_k, "top_k")
        self.alpha = _check_alpha(alpha)
        self.step = positive_int(step, "step")
        if not (isinstance(max_aspect_change, (int, float)) and max_aspect_change >= 1):
            raise ValueError(f"max_aspect_change must be a number >= 1, got {max_aspect_change!r}")
        self.max_aspect_change = float(max_aspect_change)
        self.refine = bool(refine)
        self.qe = _check_qe(qe)
        self.image_size = positive_int(image_size, "image_size")
        self.query_pool = query_pool
        self.device = device

    def __repr__(self) -> str:
        return (f"LocalizationReranker(top_k={self.top_k}, alpha={self.alpha}, step={self.step}, "
                f"max_aspect_change={self.max_aspect_change}, refine={self.refine}, qe={self.qe})")

    # -- pieces ------------------------------------------------------------------------------------

    def query_vector(self, image: Any, box: Any) -> tuple[np.ndarray, float]:
        """The query's ``(C,)`` channel vector (max-pooled map, or the model's pooling) and its
        aspect ratio (width / height of the box, or of the image)."""
        import torch

        (fm,) = compute_maps(self.model, [image], bboxes=None if box is None else [box],
                             image_size=self.image_size, device=self.device)
        f = fm.fmap
        if self.query_pool == "mac":
            v = np.maximum(f, 0).max(axis=(1, 2))
        else:
            with torch.inference_mode():
                v = self.model.head.pool(torch.from_numpy(f)[None].to(_model_device(self.model)))
            v = v.float().cpu().numpy().ravel()
        width, height = fm.size
        return v.astype(np.float64), width / height

    def region_descriptors(self, fmap: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Raw ``(B, D)`` descriptors of cell boxes of a map by the model's head (before ``postprocess``)."""
        import torch

        device = _model_device(self.model)
        out = []
        with torch.inference_mode():
            for x1, y1, x2, y2 in np.asarray(boxes, np.int64).reshape(-1, 4):
                crop = torch.from_numpy(np.ascontiguousarray(fmap[:, y1:y2, x1:x2], np.float32))[None].to(device)
                out.append(self.model.head([crop]).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.dim), np.float32)

    def _post(self, raw: np.ndarray) -> np.ndarray:
        rows = raw if self.postprocess is None else self.postprocess(raw)
        return np.asarray(rows, np.float32)

    # -- the protocol ------------------------------------------------------------------------------

    def rerank(self, x: np.ndarray, scores: np.ndarray, ids: np.ndarray, images: Sequence[Any] | None = None):
        """``(scores, ids, extras)`` with the top ``top_k`` of each row re-ranked (see the class)."""
        if images is None:
            raise ValueError("LocalizationReranker needs the query images: search with images=... "
                             "(and optionally vectors=...), not with vectors alone")
        x = np.asarray(x, np.float32)
        scores = np.array(scores, np.float32)
        ids = np.array(ids, np.int64)
        if scores.shape != ids.shape or scores.ndim != 2 or x.ndim != 2 or x.shape[0] != ids.shape[0]:
            raise ValueError(f"expected x (Q, D) and scores, ids (Q, k) with the same Q, got {x.shape}, "
                             f"{scores.shape}, {ids.shape}")
        if len(images) != x.shape[0]:
            raise ValueError(f"got {len(images)} query images for {x.shape[0]} queries")
        q_n, k = ids.shape
        boxes = np.full((q_n, k, 4), np.nan, np.float32)
        region = np.full((q_n, k), np.nan, np.float32)
        for i in range(q_n):
            item = images[i]
            image, box = item if isinstance(item, tuple) else (item, None)
            self._rerank_row(i, x[i], image, box, scores, ids, boxes, region)
        return scores, ids, {"box": boxes, "region_score": region}

    def _rerank_row(self, i, xq, image, box, scores, ids, boxes, region) -> None:
        n = min(self.top_k, ids.shape[1])
        live = np.flatnonzero(ids[i, :n] >= 0)
        if live.size == 0:
            return
        top_ids = ids[i, live]
        found = list(self.maps(top_ids))
        if len(found) != len(top_ids):
            raise ValueError(f"maps(ids) returned {len(found)} maps for {len(top_ids)} ids")
        qvec, aspect = self.query_vector(image, box)
        if not np.any(qvec > 0):
            return  # an all-zero query map: nothing to localise, ranking kept
        loc_boxes = np.full((len(live), 4), np.nan, np.float32)
        descs: list[np.ndarray | None] = [None] * len(live)
        for j, m in enumerate(found):
            if m is None:
                continue
            fmap, size = m[0], m[1]
            fmap = np.asarray(fmap, np.float32)
            if fmap.ndim != 3:
                raise ValueError(f"maps gave a map of shape {fmap.shape} for id {int(top_ids[j])}; expected (C, h, w)")
            loc = localize(qvec, fmap, alpha=self.alpha, step=self.step, aspect=aspect,
                           max_aspect_change=self.max_aspect_change, refine=self.refine)
            cell = np.array(loc.box, np.int64)
            loc_boxes[j] = cells_to_pixels(cell, fmap.shape[1:], size)[0]
            descs[j] = self.region_descriptors(fmap, cell)[0]
        have = np.array([d is not None for d in descs])
        new = scores[i, live].copy()
        cos = np.full(len(live), np.nan, np.float32)
        if have.any():
            rows = self._post(np.stack([d for d in descs if d is not None]))
            c = rows @ xq
            if self.qe > 0:
                top = np.argsort(-c, kind="stable")[: self.qe]
                qx = xq.astype(np.float64) + rows[top].astype(np.float64).sum(0)
                nrm = np.linalg.norm(qx)
                if nrm > 0:
                    c = rows @ (qx / nrm).astype(np.float32)
            cos[have] = c
            new[have] = c
        order = np.argsort(-new, kind="stable")
        new, cos, loc_boxes, block_ids = new[order], cos[order], loc_boxes[order], top_ids[order]
        # the block stays above what follows it (the rest of the row, beyond the re-ranked part)
        rest = scores[i, n:]
        rest = rest[np.isfinite(rest)]
        if rest.size and new.size:
            top_rest = np.float32(rest.max())
            if new[-1] <= top_rest:
                shift = np.float32(top_rest - new[-1])
                new = new + shift
                while new[-1] <= top_rest:
                    new = np.nextafter(new, np.float32(np.inf), dtype=np.float32)
        pos = live  # positions of the live ids in the row's head (the padding sits after them)
        scores[i, pos] = new
        ids[i, pos] = block_ids
        boxes[i, pos] = loc_boxes
        region[i, pos] = cos
