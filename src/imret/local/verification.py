"""Geometric verification: a robust 2-D transform between matched keypoints (OpenCV MAGSAC++ or
RANSAC), and :class:`GeometricVerifier`, the re-ranker that reorders the top of a ranking by
inlier counts as DELG does (Cao et al., "Unifying Deep Local and Global Features for Image
Search", ECCV 2020).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .matching import match_descriptors
from .types import LocalFeatures, require_cv2

__all__ = [
    "Verification",
    "MODELS",
    "METHODS",
    "MIN_MATCHES",
    "estimate_transform",
    "verify_pair",
    "geometric_order",
    "GeometricVerifier",
]

MODELS = ("affine", "homography")
METHODS = ("magsac", "ransac")
MIN_MATCHES = {"affine": 3, "homography": 4}  # the minimal samples: fewer matches cannot be verified

# Defaults, and where they come from.
# DELG's reference re-ranking (tensorflow/models research/delf, detect_to_retrieve/image_reranking.py
# and delg/perform_retrieval.py): the top 100 are re-ranked, an affine transform is fitted by
# RANSAC with 1000 trials, 3-point samples, a residual threshold of 20 px on the 1024 px
# revisited Oxford/Paris images, and seed 0.
DEFAULT_TOP_K = 100  # DELG's _NUM_TO_RERANK
DEFAULT_MAX_ITERS = 1000  # DELG's _NUM_RANSAC_TRIALS
# DELG's ransac_residual_threshold is 20 px at a 1024 px long side, for its sparse, attentive
# features. With RootSIFT (1000 per image, many on repeated facade texture) 20 px lets chance
# matches of unrelated buildings reach 20-100 "inliers" (measured on rParis6k-mini); 8 px
# keeps true views verified and unrelated ones under 10.
DEFAULT_THRESHOLD = 8.0
DEFAULT_REFERENCE_SIDE = 1024  # the long side DEFAULT_THRESHOLD is measured at (rOxford/rParis images)
DEFAULT_CONFIDENCE = 0.99  # OpenCV's default for estimateAffine2D / findHomography
DEFAULT_SEED = 0  # DELG passes ransac_seed=0
# DELG orders by (inliers, global score) with no minimum, but an affine fitted to random matches
# still collects a few chance inliers: with the plausibility checks below, unrelated rParis6k-mini
# photos reached at most 9 one-to-one inliers (60 query/negative pairs), so 10 is the bar.
DEFAULT_MIN_INLIERS = 10
# A transform between two photos of one object keeps its orientation (no mirror), changes the
# scale by less than 10x and the aspect by less than 5x. Without these checks a RANSAC over
# many putative matches often returns a collapsed transform (a singular value near 0) that maps
# many query points onto one dense patch of the other image and counts them all as inliers.
DEFAULT_MAX_SCALE = 10.0
DEFAULT_MAX_ANISOTROPY = 5.0
DEFAULT_RETRIES = 2  # implausible fits whose inliers are set aside before fitting again
# Lowe's 0.8 with mutual nearest neighbours leaves 5-20 putative matches between two views of
# a Paris facade (repeated windows fail the ratio test); 0.9 keeps 60-200, and mutual nearest
# neighbours keep them one to one.
DEFAULT_RATIO = 0.9


@dataclass(frozen=True)
class Verification:
    """The result of :func:`estimate_transform`.

    Attributes:
        inliers: number of matches consistent with the transform (0 when none was found).
        mask: ``(M,)`` bool, which of the matches are inliers.
        transform: ``(3, 3)`` float64 mapping homogeneous points of image 1 to image 2
            (affine: last row ``[0, 0, 1]``), or None when no transform was found.
    """

    inliers: int
    mask: np.ndarray
    transform: np.ndarray | None

    @classmethod
    def none(cls, m: int) -> "Verification":
        return cls(0, np.zeros(m, bool), None)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; available: {', '.join(choices)}")


def _check_number(name: str, value: Any, *, low: float, high: float | None = None, open_low: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        rng = f"{'(' if open_low else '['}{low}, {'inf)' if high is None else f'{high}]'}"
        raise ValueError(f"{name} must be a number in {rng}, got {value!r}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def plausible(transform: np.ndarray | None, points: np.ndarray | None = None, *,
              max_scale: float = DEFAULT_MAX_SCALE, max_anisotropy: float = DEFAULT_MAX_ANISOTROPY) -> bool:
    """Whether a ``(3, 3)`` transform can relate two photos of one object: orientation kept
    (positive determinant of its linear part), both singular values within
    ``[1 / max_scale, max_scale]`` and their ratio at most ``max_anisotropy``. For a homography
    the linear part is its Jacobian at the centroid of ``points`` (``(N, 2)`` in image 1; the
    origin when None), where it is also required to keep points in front (``w > 0``)."""
    if transform is None:
        return False
    h = np.asarray(transform, dtype=np.float64)
    if h.shape != (3, 3) or not np.isfinite(h).all():
        return False
    c = np.zeros(2) if points is None or len(points) == 0 else np.asarray(points, np.float64).reshape(-1, 2).mean(0)
    w = h[2, 0] * c[0] + h[2, 1] * c[1] + h[2, 2]
    if w <= 1e-12:
        return False
    u = h[:2, :2] @ c + h[:2, 2]
    jac = (h[:2, :2] - np.outer(u / w, h[2, :2])) / w  # d(Hx)/dx at c
    if np.linalg.det(jac) <= 0:
        return False
    sv = np.linalg.svd(jac, compute_uv=False)
    return bool(sv[1] >= 1.0 / max_scale and sv[0] <= max_scale and sv[0] <= max_anisotropy * sv[1])


def estimate_transform(
    kp1: np.ndarray,
    kp2: np.ndarray,
    matches: np.ndarray,
    *,
    model: str = "affine",
    method: str = "magsac",
    threshold: float = DEFAULT_THRESHOLD,
    max_iters: int = DEFAULT_MAX_ITERS,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int | None = DEFAULT_SEED,
    max_scale: float | None = DEFAULT_MAX_SCALE,
    max_anisotropy: float = DEFAULT_MAX_ANISOTROPY,
    retries: int = DEFAULT_RETRIES,
) -> Verification:
    """Fit a transform from image 1 to image 2 to matched keypoints, robustly.

    Args:
        kp1, kp2: ``(N1, 2)``, ``(N2, 2)`` keypoint positions ``(x, y)`` in pixels.
        matches: ``(M, 2)`` integer index pairs ``(i, j)``: ``kp1[i]`` matches ``kp2[j]``.
        model: ``"affine"`` (6 degrees of freedom, ``cv2.estimateAffine2D``; DELG's choice) or
            ``"homography"`` (8, ``cv2.findHomography``).
        method: ``"magsac"`` (``cv2.USAC_MAGSAC``: MAGSAC++, no hard threshold inside the
            scoring, so less sensitive to it) or ``"ransac"`` (``cv2.RANSAC``).
        threshold: largest reprojection error of an inlier, in pixels of image 2 (MAGSAC++:
            the largest noise scale it marginalises over).
        max_iters: largest number of hypotheses.
        confidence: stop early once an as-good model is found with this probability.
        seed: seed of OpenCV's random generator (``cv2.setRNGSeed``, which is per thread) before
            the fit, for reproducible results; None leaves the generator as it is.
        max_scale, max_anisotropy: a fit that is not :func:`plausible` with these bounds is
            rejected (None: no check); its inliers are set aside and the fit is tried again on the
            other matches, up to ``retries`` times.

    Inliers are counted one to one: several matches of one keypoint count once.

    Returns:
        A :class:`Verification`. Fewer matches than the model's minimal sample
        (:data:`MIN_MATCHES`), degenerate configurations (collinear or repeated points),
        implausible and non-finite estimates give 0 inliers and no transform; this never
        raises for them.
    """
    _check_choice("model", model, MODELS)
    _check_choice("method", method, METHODS)
    _check_number("threshold", threshold, low=0.0)
    _check_int("max_iters", max_iters, 1)
    _check_number("confidence", confidence, low=0.0, high=1.0)
    if seed is not None:
        _check_int("seed", seed, 0)
    k1 = np.asarray(kp1, dtype=np.float64).reshape(-1, 2)
    k2 = np.asarray(kp2, dtype=np.float64).reshape(-1, 2)
    m = np.asarray(matches)
    if m.size == 0:
        return Verification.none(0)
    if m.ndim != 2 or m.shape[1] != 2 or not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"matches must be (M, 2) integer index pairs, got {m.dtype} {m.shape}")
    if m.min() < 0 or m[:, 0].max() >= len(k1) or m[:, 1].max() >= len(k2):
        raise ValueError(f"matches index keypoints out of range ({len(k1)} and {len(k2)} keypoints)")
    n = m.shape[0]
    if n < MIN_MATCHES[model]:
        return Verification.none(n)
    src = k1[m[:, 0]].astype(np.float32)
    dst = k2[m[:, 1]].astype(np.float32)
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        return Verification.none(n)

    if max_scale is not None:
        _check_number("max_scale", max_scale, low=1.0, open_low=False)
        _check_number("max_anisotropy", max_anisotropy, low=1.0, open_low=False)
    _check_int("retries", retries, 0)
    keep = np.ones(n, bool)
    for _ in range(int(retries) + 1):
        if keep.sum() < MIN_MATCHES[model]:
            break
        idx = np.flatnonzero(keep)
        fit = _fit(src[idx], dst[idx], model, method, threshold, max_iters, confidence, seed)
        if fit is None:
            break
        h, sub = fit
        mask = np.zeros(n, bool)
        mask[idx[sub]] = True
        if max_scale is None or plausible(h, src[mask], max_scale=max_scale, max_anisotropy=max_anisotropy):
            one_to_one = min(np.unique(m[mask, 0]).size, np.unique(m[mask, 1]).size)
            return Verification(int(one_to_one), mask, h)
        keep &= ~mask  # a collapsed fit: set its matches aside and look for another
    return Verification.none(n)


def _fit(src, dst, model, method, threshold, max_iters, confidence, seed):
    """One robust fit with OpenCV: ``(H (3, 3), inlier mask)`` or None."""
    cv2 = require_cv2()
    n = src.shape[0]
    flag = cv2.USAC_MAGSAC if method == "magsac" else cv2.RANSAC
    if seed is not None:
        cv2.setRNGSeed(int(seed))
    try:
        if model == "affine":
            t, mask = cv2.estimateAffine2D(src, dst, method=flag, ransacReprojThreshold=float(threshold),
                                           maxIters=int(max_iters), confidence=float(confidence))
        else:
            t, mask = cv2.findHomography(src, dst, flag, float(threshold), maxIters=int(max_iters),
                                         confidence=float(confidence))
    except cv2.error:  # OpenCV asserts on some degenerate samples: no transform
        return None
    if t is None or mask is None or not np.isfinite(t).all():
        return None
    mask = np.asarray(mask).reshape(-1).astype(bool)
    if mask.shape[0] != n or not mask.any():
        return None
    h = np.eye(3)
    h[: t.shape[0]] = t
    if model == "homography":
        if abs(h[2, 2]) < 1e-12:
            return None
        h = h / h[2, 2]
    return h, mask


def verify_pair(
    f1: LocalFeatures,
    f2: LocalFeatures,
    *,
    ratio: float | None = 0.8,
    mutual: bool = True,
    max_distance: float | None = None,
    **kwargs: Any,
) -> Verification:
    """Match ``f1`` to ``f2`` (:func:`~imret.local.matching.match_descriptors`) and fit a transform
    from image 1 to image 2 (:func:`estimate_transform`, which takes ``kwargs``).

    ``mask`` refers to the putative matches, which are not returned; call the two steps
    yourself to keep them.
    """
    if f1.kind != f2.kind:
        raise ValueError(f"cannot match local features of kind {f1.kind!r} with kind {f2.kind!r}")
    if len(f1) == 0 or len(f2) == 0:
        return Verification.none(0)
    matches = match_descriptors(f1.descriptors, f2.descriptors, ratio=ratio, mutual=mutual, max_distance=max_distance)
    return estimate_transform(f1.keypoints, f2.keypoints, matches, **kwargs)


def geometric_order(
    scores: np.ndarray, inliers: np.ndarray, *, top_k: int, min_inliers: int
) -> tuple[np.ndarray, np.ndarray]:
    """DELG's re-ordering of a ranking by inlier counts, with scores that stay decreasing.

    Among the first ``top_k`` columns of each row, the candidates with
    ``inliers >= min_inliers`` come first, ordered by ``(inliers, score)`` descending (then by
    position); the other candidates of the first ``top_k`` keep their order after them, and the
    columns past ``top_k`` stay where they are.

    New scores: a verified candidate gets ``shift + inliers + (1 + clip(score, -1, 1)) / 2``,
    where ``shift = max(0, max(finite scores of the row) - min_inliers)`` (0 for cosine
    scores, which are at most 1 < 2 <= ``min_inliers``); every other candidate keeps its score.
    So verified scores lie in ``[shift + inliers, shift + inliers + 1]``, all at or above every
    unverified score, and the new scores of a row never increase.

    Args:
        scores: ``(Q, k)`` decreasing per row (``-inf`` padding allowed).
        inliers: ``(Q, k)`` integer inlier counts, negative where not verified.
        top_k: how many leading columns may move.
        min_inliers: the inlier count that makes a candidate verified, at least 2.

    Returns:
        ``(order (Q, k) int64, new_scores (Q, k) float32)``: row ``q`` of the new ranking is
        ``ids[q, order[q]]`` with scores ``new_scores[q]``.
    """
    s = np.asarray(scores, dtype=np.float64)
    n_in = np.asarray(inliers)
    if s.ndim != 2 or n_in.shape != s.shape:
        raise ValueError(f"scores and inliers must be (Q, k) arrays of one shape, got {s.shape} and {n_in.shape}")
    _check_int("top_k", top_k, 0)
    _check_int("min_inliers", min_inliers, 2)
    q, k = s.shape
    order = np.tile(np.arange(k, dtype=np.int64), (q, 1))
    new = s.copy()
    kk = min(int(top_k), k)
    for r in range(q):
        head = np.arange(kk)
        ok = (n_in[r, :kk] >= min_inliers) & np.isfinite(s[r, :kk])
        ver, rest = head[ok], head[~ok]
        if ver.size == 0:
            continue
        # lexsort: last key first; descending by inliers, then score, then ascending position
        ver = ver[np.lexsort((ver, -s[r, ver], -n_in[r, ver].astype(np.float64)))]
        finite = s[r][np.isfinite(s[r])]
        shift = max(0.0, float(finite.max()) - min_inliers) if finite.size else 0.0
        order[r, :kk] = np.concatenate([ver, rest])
        new[r, : ver.size] = shift + n_in[r, ver] + (1.0 + np.clip(s[r, ver], -1.0, 1.0)) / 2.0
        new[r, ver.size:kk] = s[r, rest]
    return order, new.astype(np.float32)


QueryExtractor = Callable[[Any, Any], LocalFeatures]
FeatureSource = Callable[[np.ndarray], Sequence["LocalFeatures | None"]]


class GeometricVerifier:
    """Re-ranker: geometric verification of the top candidates with local features (DELG).

    For each query, the local features of the query image (``extract_query(image, box)``) are
    matched with those of its first ``top_k`` candidates (``database(ids)``, a list aligned with
    ``ids`` holding None where an item has no stored features), a transform is fitted to the
    matches (:func:`verify_pair`), and the ranking is reordered by :func:`geometric_order`:
    candidates with at least ``min_inliers`` inliers first, by (inliers, global score); the rest
    in their global order; candidates past ``top_k`` unchanged.

    ``rerank(x, scores, ids, images)`` returns ``(scores, ids, extras)`` with
    ``extras["inliers"]`` ``(Q, k)`` int32 (-1 where not verified: no local features stored,
    past ``top_k``, padding, or out of time) and ``extras["transform"]`` ``(Q, k, 3, 3)``
    float32 mapping query pixels to database pixels (NaN where none), both aligned with the
    returned ids. Searches that started from vectors (``images is None``) have no query image:
    the ranking is returned unchanged and nothing is verified.

    Args (defaults and their sources in the module constants):
        extract_query: ``(image, box) -> LocalFeatures`` for a query (e.g. a
            :class:`~imret.local.sift.SiftExtractor`).
        database: ``(ids (n,) int64) -> list of LocalFeatures or None``.
        top_k: candidates verified per query (DELG: 100).
        min_inliers: inliers that make a candidate verified (>= 2; default 10, see
            :data:`DEFAULT_MIN_INLIERS`).
        model, method, max_iters, confidence, seed: see :func:`estimate_transform`
            (DELG: affine, 1000 iterations, seed 0; MAGSAC++ instead of plain RANSAC because it
            depends less on the threshold).
        threshold: inlier reprojection error in pixels at a ``reference_side`` long side (8 px
            on 1024 px images; DELG's 20 px lets RootSIFT verify unrelated facades); for each
            candidate it is scaled by the long side of its original image over
            ``reference_side`` (None: pixels as they are).
        ratio, mutual, max_distance: matching, see
            :func:`~imret.local.matching.match_descriptors` (ratio 0.9 with mutual nearest
            neighbours; DELG itself uses ``ratio=None, max_distance=1.0``).
        max_scale, max_anisotropy, retries: implausible transforms are rejected and the fit
            tried again without their inliers (see :func:`estimate_transform`).
        workers: threads verifying candidates in parallel (OpenCV and numpy release the GIL);
            None: ``min(8, os.cpu_count())``; 0 or 1: in the calling thread.
        time_budget: seconds per query, from before the query's features are extracted; the
            candidates whose verification has not finished by then keep their global order and
            are reported as not verified. None: no limit; 0: nothing is verified.
    """

    def __init__(
        self,
        extract_query: QueryExtractor,
        database: FeatureSource,
        *,
        top_k: int = DEFAULT_TOP_K,
        min_inliers: int = DEFAULT_MIN_INLIERS,
        model: str = "affine",
        method: str = "magsac",
        threshold: float = DEFAULT_THRESHOLD,
        reference_side: int | None = DEFAULT_REFERENCE_SIDE,
        ratio: float | None = DEFAULT_RATIO,
        mutual: bool = True,
        max_distance: float | None = None,
        max_iters: int = DEFAULT_MAX_ITERS,
        confidence: float = DEFAULT_CONFIDENCE,
        seed: int | None = DEFAULT_SEED,
        max_scale: float | None = DEFAULT_MAX_SCALE,
        max_anisotropy: float = DEFAULT_MAX_ANISOTROPY,
        retries: int = DEFAULT_RETRIES,
        workers: int | None = None,
        time_budget: float | None = None,
    ) -> None:
        if not callable(extract_query) or not callable(database):
            raise TypeError("extract_query and database must be callables: (image, box) -> LocalFeatures "
                            "and (ids) -> list of LocalFeatures or None")
        _check_int("top_k", top_k, 1)
        _check_int("min_inliers", min_inliers, 2)
        _check_choice("model", model, MODELS)
        _check_choice("method", method, METHODS)
        _check_number("threshold", threshold, low=0.0)
        if reference_side is not None:
            _check_int("reference_side", reference_side, 1)
        _check_int("max_iters", max_iters, 1)
        _check_number("confidence", confidence, low=0.0, high=1.0)
        if seed is not None:
            _check_int("seed", seed, 0)
        if max_scale is not None:
            _check_number("max_scale", max_scale, low=1.0, open_low=False)
            _check_number("max_anisotropy", max_anisotropy, low=1.0, open_low=False)
        _check_int("retries", retries, 0)
        if workers is not None:
            _check_int("workers", workers, 0)
        if time_budget is not None:
            _check_number("time_budget", time_budget, low=0.0, open_low=False)
        # matching arguments are checked by a dry run on empty inputs
        match_descriptors(np.zeros((0, 1)), np.zeros((0, 1)), ratio=ratio, mutual=mutual, max_distance=max_distance)
        self.extract_query = extract_query
        self.database = database
        self.top_k = int(top_k)
        self.min_inliers = int(min_inliers)
        self.model = model
        self.method = method
        self.threshold = float(threshold)
        self.reference_side = None if reference_side is None else int(reference_side)
        self.ratio = ratio
        self.mutual = mutual
        self.max_distance = max_distance
        self.max_iters = int(max_iters)
        self.confidence = float(confidence)
        self.seed = seed
        self.max_scale = None if max_scale is None else float(max_scale)
        self.max_anisotropy = float(max_anisotropy)
        self.retries = int(retries)
        self.workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
        self.time_budget = None if time_budget is None else float(time_budget)

    def __repr__(self) -> str:
        return (f"GeometricVerifier(top_k={self.top_k}, min_inliers={self.min_inliers}, model={self.model!r}, "
                f"method={self.method!r}, threshold={self.threshold:g}, ratio={self.ratio}, "
                f"workers={self.workers}, time_budget={self.time_budget})")

    def _threshold_for(self, f: LocalFeatures) -> float:
        side = max(f.size) if f.size else 0
        if self.reference_side is None or side <= 0:
            return self.threshold
        return self.threshold * side / self.reference_side

    def verify(self, query: LocalFeatures, candidate: LocalFeatures) -> Verification:
        """Verify one pair: query (image 1) against a database item (image 2)."""
        return verify_pair(query, candidate, ratio=self.ratio, mutual=self.mutual, max_distance=self.max_distance,
                           model=self.model, method=self.method, threshold=self._threshold_for(candidate),
                           max_iters=self.max_iters, confidence=self.confidence, seed=self.seed,
                           max_scale=self.max_scale, max_anisotropy=self.max_anisotropy, retries=self.retries)

    def _verify_query(
        self, pool: ThreadPoolExecutor | None, image: Any, box: Any, ids: np.ndarray, deadline: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inliers ``(k,)`` int32 (-1: not verified) and transforms ``(k, 3, 3)`` float32 for one row."""
        k = ids.shape[0]
        inliers = np.full(k, -1, np.int32)
        transforms = np.full((k, 3, 3), np.nan, np.float32)

        def out_of_time() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        if out_of_time():
            return inliers, transforms
        pos = np.flatnonzero(ids[: self.top_k] >= 0)
        if pos.size == 0:
            return inliers, transforms
        query = self.extract_query(image, box)
        if not isinstance(query, LocalFeatures):
            raise TypeError(f"extract_query must return LocalFeatures, got {type(query).__name__}")
        if out_of_time():
            return inliers, transforms
        feats = list(self.database(ids[pos]))
        if len(feats) != pos.size:
            raise ValueError(f"database returned {len(feats)} entries for {pos.size} ids")
        jobs = [(int(p), f) for p, f in zip(pos, feats) if f is not None]
        for _, f in jobs:
            if not isinstance(f, LocalFeatures):
                raise TypeError(f"database must return LocalFeatures or None, got {type(f).__name__}")
            if f.kind != query.kind:
                raise ValueError(f"query features are of kind {query.kind!r} but the database holds {f.kind!r}")

        def record(p: int, v: Verification) -> None:
            inliers[p] = v.inliers
            if v.transform is not None:
                transforms[p] = v.transform

        if pool is None:
            for p, f in jobs:
                v = self.verify(query, f)
                if out_of_time():  # finished too late: counted as not verified, as with threads
                    break
                record(p, v)
            return inliers, transforms
        futures = {pool.submit(self.verify, query, f): p for p, f in jobs}
        pending = set(futures)
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            late = out_of_time()
            for fut in done:
                if not late:
                    record(futures[fut], fut.result())
            if late:
                for fut in pending:
                    fut.cancel()  # not started: dropped; running: finishes, result ignored
                break
        return inliers, transforms

    def rerank(
        self, x: np.ndarray, scores: np.ndarray, ids: np.ndarray, images: Sequence[tuple[Any, Any]] | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Reorder ``(Q, k)`` results; see the class docstring. ``x`` (the query rows) is not used."""
        s = np.asarray(scores, dtype=np.float32)
        i = np.asarray(ids, dtype=np.int64)
        if s.ndim != 2 or i.shape != s.shape:
            raise ValueError(f"scores and ids must be (Q, k) arrays of one shape, got {s.shape} and {i.shape}")
        q, k = s.shape
        inliers = np.full((q, k), -1, np.int32)
        transforms = np.full((q, k, 3, 3), np.nan, np.float32)
        skip = images is None or (self.time_budget is not None and self.time_budget <= 0)
        if not skip:
            images = list(images)  # type: ignore[arg-type]
            if len(images) != q:
                raise ValueError(f"got {len(images)} query images for {q} result rows")
            pool = ThreadPoolExecutor(self.workers, thread_name_prefix="imret-verify") if self.workers > 1 else None
            try:
                for r, item in enumerate(images):
                    try:
                        image, box = item
                    except (TypeError, ValueError):
                        raise TypeError(f"images[{r}] must be a tuple (image, box), got {type(item).__name__}") from None
                    start = time.monotonic()
                    deadline = None if self.time_budget is None else start + self.time_budget
                    inliers[r], transforms[r] = self._verify_query(pool, image, box, i[r], deadline)
            finally:
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
        order, new_scores = geometric_order(s, inliers, top_k=self.top_k, min_inliers=self.min_inliers)
        new_ids = np.take_along_axis(i, order, axis=1)
        extras = {
            "inliers": np.take_along_axis(inliers, order, axis=1),
            "transform": np.take_along_axis(transforms, order[:, :, None, None], axis=1),
        }
        return new_scores, new_ids, extras
