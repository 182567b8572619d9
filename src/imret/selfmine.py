"""Label-free training data: mine matching pairs from unlabelled photos, and clean noisy labels,
by geometric verification of global-descriptor neighbours.

Mining (Radenović et al., "CNN Image Retrieval Learns from BoW", ECCV 2016, got their
retrieval-SfM-120k pairs from 3D models; here the 3D model is replaced by pairwise geometric
verification, as in Philbin et al., "Object mining using a matching graph", ICVGIP 2010)::

    descriptors (N, D) -> knn_graph -> candidate edges (i < j, cosine)
    local features     -> verify_edges -> inliers per edge (threads; resumable checkpoint)
    [expand rounds: each component's mean descriptor -> k outside images -> verified against
     its most similar members (expansion_pairs)]
    verified edges (inliers >= min_inliers), plus images that verify with >= attach_min members
    of a component at attach_inliers (linked_components) -> components of >= min_size images
    = pseudo-classes
    -> positives (verified edges; hard ones: each image's least similar verified neighbour)
    -> hard negatives (most similar images of other components, at most one per component)

Cleaning (Gordo et al., "Deep Image Retrieval", ECCV 2016, cleaned the Landmarks set this way):
within each label, verify pairs of its images and keep the largest verified component
(``mode="largest"``), or drop only the images that verify with no other image of their label
(``mode="flag"``).

Writers give the ``path,label`` CSV that ``imret train`` reads (``data.kind: csv``), a pairs
CSV ``query,positive,negative_1..negative_K``, and an HTML page of what cleaning dropped.
Nothing here prints; progress bars (tqdm, stderr) only when asked.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .local.types import LocalFeatures
from .local.verification import (
    DEFAULT_CONFIDENCE,
    DEFAULT_MAX_ANISOTROPY,
    DEFAULT_MAX_ITERS,
    DEFAULT_MAX_SCALE,
    DEFAULT_RATIO,
    DEFAULT_REFERENCE_SIDE,
    DEFAULT_RETRIES,
    DEFAULT_SEED,
    DEFAULT_THRESHOLD,
    GeometricVerifier,
    verify_pair,
)

__all__ = [
    "DEFAULT_K",
    "DEFAULT_MIN_INLIERS",
    "DEFAULT_NEGATIVES",
    "DEFAULT_ALL_PAIRS_UP_TO",
    "DEFAULT_MIN_SIZE",
    "DEFAULT_EXPAND",
    "DEFAULT_ATTACH_MEMBERS",
    "DEFAULT_ATTACH_MIN",
    "DEFAULT_ATTACH_INLIERS",
    "CLEAN_MODES",
    "VERIFY_DEFAULTS",
    "knn_graph",
    "verify_edges",
    "components_of",
    "expansion_pairs",
    "linked_components",
    "vote_attach",
    "check_vote_share",
    "MinedData",
    "mine",
    "write_class_csv",
    "write_pairs_csv",
    "read_pairs_csv",
    "CleanResult",
    "clean",
    "label_vote_share",
    "write_clean_csv",
    "write_clean_html",
    "paths_tag",
]

# Defaults, and why.
# 10 neighbours: on rParis6k-mini (50 photos per landmark) the 10 nearest neighbours by an
# ImageNet EfficientNet-Lite0 + GeM hold most of the verifiable views; each image then costs
# at most 10 verifications (~10-20 ms each for 1000 RootSIFT), so 10k photos take ~1 h/core.
DEFAULT_K = 10
# One false verified edge merges two pseudo-classes, so mining wants a higher bar than
# re-ranking (10: unrelated rParis6k-mini facades reached at most 9 one-to-one inliers).
DEFAULT_MIN_INLIERS = 15
DEFAULT_NEGATIVES = 5  # per query, at most one per component (cirtorch's default)
# Fragmented components (see BENCHMARKS.md, fine-tuning on mined labels): a landmark whose views
# verify only in chains splits into several components, which then serve as each other's
# negatives. Three remedies, each an option of mine():
# * expansion rounds: each component's mean descriptor (average query expansion over its
#   members) proposes the DEFAULT_K images outside it that are most similar to it, and each is
#   verified against its DEFAULT_ATTACH_MEMBERS most similar members;
# * attaching on several weaker matches: an image joins a component when at least
#   DEFAULT_ATTACH_MIN of its members verify with it at DEFAULT_ATTACH_INLIERS (a lower bar than
#   min_inliers; one weak match is not enough, two independent ones rarely happen by chance);
# * a minimum component size: smaller components are left unlabelled, not made classes.
DEFAULT_MIN_SIZE = 2
DEFAULT_EXPAND = 0
DEFAULT_ATTACH_MEMBERS = 3
DEFAULT_ATTACH_MIN = 2
DEFAULT_ATTACH_INLIERS = None  # None: min_inliers (no weaker bar)
# Attaching by descriptor votes (off by default): an image that verifies with no class joins the
# class holding at least attach_votes of the similarity mass of its DEFAULT_VOTE_K nearest
# labelled images. Measured on the fine-tuning folds (BENCHMARKS.md, fine-tuning, 2026-12-07):
# at 0.7 it labelled 49 more photos at 97-98.5 % purity and raised the mined share of the
# labelled gain from 75 % / 89 % to 85 % / 90 % (Medium / Hard); it trades purity for coverage.
DEFAULT_ATTACH_VOTES = None
# Cleaning verifies every pair of a label up to this size (30 images: 435 pairs), and only
# each image's k nearest neighbours within the label above it.
DEFAULT_ALL_PAIRS_UP_TO = 30
CLEAN_MODES = ("largest", "flag", "vote")
# mode="vote": an image that verifies with no other image of its label keeps it when at least
# half of the similarity mass of its 10 nearest neighbours (all labels) carries the same label.
# On rParis6k-mini with 20 % injected errors, kNN votes alone removed 98-100 % of the errors and
# kept 95.5-97 % of the correct photos over three seeds (0.4: 99 %, 0.3: 100 % kept).
DEFAULT_VOTE_K = 10
DEFAULT_VOTE_SHARE = 0.5

VERIFY_DEFAULTS: dict[str, Any] = {
    "ratio": DEFAULT_RATIO,  # Lowe's ratio test on mutual nearest neighbours (0.9, see verification.py)
    "mutual": True,
    "max_distance": None,
    "model": "affine",  # DELG's choice; 6 degrees of freedom
    "method": "magsac",  # MAGSAC++: less sensitive to the threshold
    "threshold": DEFAULT_THRESHOLD,  # 8 px at a 1024 px long side, scaled to each image
    "reference_side": DEFAULT_REFERENCE_SIDE,
    "max_iters": DEFAULT_MAX_ITERS,
    "confidence": DEFAULT_CONFIDENCE,
    "seed": DEFAULT_SEED,
    "max_scale": DEFAULT_MAX_SCALE,  # implausible fits (mirrors, collapsed maps) are rejected
    "max_anisotropy": DEFAULT_MAX_ANISOTROPY,
    "retries": DEFAULT_RETRIES,
}
"""Keyword arguments of pairwise verification (``**verify_kw``) and their defaults: those of
:class:`imret.local.GeometricVerifier` (see :mod:`imret.local.verification`)."""

_CHUNK_ELEMENTS = 1 << 22  # similarities held at once in knn_graph
_CHECKPOINT_VERSION = 1

FeatureSource = Callable[[int], "LocalFeatures | None"] | Sequence["LocalFeatures | None"]


# ----------------------------------------------------------------------------- checks


def _int_at_least(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _rows(x: Any, name: str) -> np.ndarray:
    """``(N, D)`` float64 unit rows (cosine = inner product)."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be (N, D) rows, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if a.shape[0] and (norms <= 1e-12).any():
        raise ValueError(f"{name} has all-zero rows (e.g. row {int(np.flatnonzero(norms.ravel() <= 1e-12)[0])}); "
                         "cosine similarity is undefined for them")
    return a / np.maximum(norms, 1e-12)


def _edges_array(edges: Any) -> np.ndarray:
    e = np.asarray(edges)
    if e.size == 0:
        return np.zeros((0, 2), np.int64)
    if e.ndim != 2 or e.shape[1] != 2 or not np.issubdtype(e.dtype, np.integer):
        raise ValueError(f"edges must be (E, 2) integer index pairs, got {e.dtype} {e.shape}")
    if e.min() < 0:
        raise ValueError(f"edges hold a negative index ({int(e.min())})")
    if (e[:, 0] == e[:, 1]).any():
        i = int(np.flatnonzero(e[:, 0] == e[:, 1])[0])
        raise ValueError(f"edges[{i}] joins image {int(e[i, 0])} to itself")
    return e.astype(np.int64)


def _verify_settings(verify_kw: dict[str, Any]) -> dict[str, Any]:
    """The resolved, checked verification settings (``VERIFY_DEFAULTS`` updated by ``verify_kw``)."""
    unknown = sorted(set(verify_kw) - set(VERIFY_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown verification option(s) {', '.join(map(repr, unknown))}; "
                         f"available: {', '.join(VERIFY_DEFAULTS)}")
    s = {**VERIFY_DEFAULTS, **verify_kw}
    # GeometricVerifier checks every value and says what is wrong; it is not used otherwise
    GeometricVerifier(lambda image, box: None, lambda ids: [], **s)
    return s


def _verify_one(f1: LocalFeatures | None, f2: LocalFeatures | None, s: dict[str, Any]) -> int:
    """One-to-one inliers between two images (0 when either has no features)."""
    if f1 is None or f2 is None:
        return 0
    for f in (f1, f2):
        if not isinstance(f, LocalFeatures):
            raise TypeError(f"features_of must give LocalFeatures or None, got {type(f).__name__}")
    threshold = s["threshold"]
    side = max(f2.size) if f2.size else 0
    if s["reference_side"] is not None and side > 0:  # as GeometricVerifier: pixels of image 2
        threshold = threshold * side / s["reference_side"]
    kw = {k: v for k, v in s.items() if k not in ("reference_side", "threshold")}
    return int(verify_pair(f1, f2, threshold=threshold, **kw).inliers)


class _FeatureCache:
    """Thread-safe LRU over ``features_of(i)`` (a callable) or direct indexing (a sequence)."""

    def __init__(self, source: FeatureSource, size: int) -> None:
        if callable(source):
            self._get = source
        elif isinstance(source, Sequence):
            self._get = source.__getitem__
            size = 0  # nothing to save
        else:
            raise TypeError(f"features_of must be a callable (index -> LocalFeatures or None) or a sequence, "
                            f"got {type(source).__name__}")
        self._size = size
        self._items: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, i: int) -> Any:
        if self._size <= 0:
            return self._get(i)
        with self._lock:
            if i in self._items:
                self._items.move_to_end(i)
                return self._items[i]
        f = self._get(i)  # outside the lock: loading may be slow (disk)
        with self._lock:
            self._items[i] = f
            self._items.move_to_end(i)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return f


# --------------------------------------------------------------------------- kNN graph


def _topk_rows(sim: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest entries of each row, most similar first, ties by
    lower index (exact: rows whose k-th value is tied are resolved one by one)."""
    c, n = sim.shape
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(sim, part, axis=1).min(axis=1)
    out = np.empty((c, k), np.int64)
    for r in range(c):
        cand = np.flatnonzero(sim[r] >= kth[r])  # ascending index; every top-k member is here
        order = np.lexsort((cand, -sim[r, cand]))  # most similar first; ties: lower index
        out[r] = cand[order[:k]]
    return out


def knn_graph(descriptors: Any, k: int = DEFAULT_K, *, chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Candidate edges: every image joined to its ``k`` nearest neighbours by cosine similarity.

    Exact (every pair is scored), in chunks of rows. An image is never its own neighbour; ties
    go to the lower index. The union of the neighbour lists is returned with each unordered pair
    once.

    Args:
        descriptors: ``(N, D)`` global descriptors (normalised here; zero rows are an error).
        k: neighbours per image (``k >= N`` gives all pairs).
        chunk_size: rows per chunk; default keeps ~4M similarities in memory.

    Returns:
        ``(edges (E, 2) int64, cosine (E,) float32)``: pairs ``i < j`` sorted by ``(i, j)``,
        and their cosine similarity.
    """
    x = _rows(descriptors, "descriptors")
    k = _int_at_least(k, "k", 1)
    n = x.shape[0]
    kk = min(k, n - 1)
    if kk <= 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    step = _int_at_least(chunk_size, "chunk_size", 1) if chunk_size is not None else max(1, _CHUNK_ELEMENTS // n)
    src, dst = [], []
    for s in range(0, n, step):
        sim = x[s:s + step] @ x.T
        rows = np.arange(sim.shape[0])
        sim[rows, rows + s] = -np.inf  # not its own neighbour
        nb = _topk_rows(sim, kk)
        src.append(np.repeat(np.arange(s, s + sim.shape[0]), kk))
        dst.append(nb.ravel())
    a, b = np.concatenate(src), np.concatenate(dst)
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0)
    cos = np.einsum("ij,ij->i", x[pairs[:, 0]], x[pairs[:, 1]])
    return pairs.astype(np.int64), cos.astype(np.float32)


# ------------------------------------------------------------------------ verification


def _read_checkpoint(path: Path, header: dict) -> dict[tuple[int, int], int]:
    """Verified edges in a checkpoint; checks its header; cuts off a half-written last line."""
    done: dict[tuple[int, int], int] = {}
    data = path.read_bytes()
    if not data:
        return done
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a line cut short by a crash: drop it before appending
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    lines = data.decode("utf-8").splitlines()
    if not lines:
        return done
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError:
        first = None
    if not isinstance(first, dict) or first.get("imret_verified_edges") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a checkpoint of verified edges (first line {lines[0][:80]!r}); "
                         "give another path or delete it")
    for key in ("settings", "tag"):
        if first.get(key) != header[key]:
            raise ValueError(f"checkpoint {path} was written with {key} {first.get(key)!r}, now {header[key]!r}; "
                             "its edges do not apply: delete it or give another checkpoint path")
    for ln, line in enumerate(lines[1:], start=2):
        try:
            i, j, m = json.loads(line)
            done[(int(i), int(j))] = int(m)
        except (ValueError, TypeError):
            raise ValueError(f"{path}:{ln}: expected [i, j, inliers], got {line[:80]!r}") from None
    return done


def verify_edges(
    edges: Any,
    features_of: FeatureSource,
    *,
    workers: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    tag: str = "",
    progress: bool = False,
    cache_size: int = 256,
    **verify_kw: Any,
) -> np.ndarray:
    """Geometric verification of candidate edges: one-to-one inliers of a robust affine fit
    between the local features of the two images of each edge.

    Args:
        edges: ``(E, 2)`` integer image pairs (as :func:`knn_graph` gives them).
        features_of: ``i -> LocalFeatures | None`` (called from several threads; results are
            kept in an LRU of ``cache_size`` images), or a sequence of them. None: no features,
            0 inliers.
        workers: verification threads (OpenCV and numpy release the GIL); None:
            ``min(8, os.cpu_count())``; 0 or 1: the calling thread.
        checkpoint: a JSON-lines file: a header (settings, ``tag``), then ``[i, j, inliers]``
            per verified edge, appended as each finishes. Edges already in it are not verified
            again, so an interrupted run continues where it stopped; edges of other runs with
            the same settings and tag may share it. A header with other settings or another
            ``tag`` is an error (the stored counts would not apply).
        tag: names the image set (e.g. a hash of the paths) for the checkpoint's header.
        progress: a tqdm progress bar (stderr).
        verify_kw: matching and fitting options, see :data:`VERIFY_DEFAULTS`.

    Returns:
        ``(E,)`` int32 inliers per edge, aligned with ``edges``.
    """
    e = _edges_array(edges)
    settings = _verify_settings(verify_kw)
    nworkers = min(8, os.cpu_count() or 1) if workers is None else _int_at_least(workers, "workers", 0)
    cache = _FeatureCache(features_of, _int_at_least(cache_size, "cache_size", 0))
    if not isinstance(tag, str):
        raise TypeError(f"tag must be a string, got {type(tag).__name__}")
    inliers = np.full(e.shape[0], -1, np.int32)
    done: dict[tuple[int, int], int] = {}
    out = None
    if checkpoint is not None:
        path = Path(checkpoint)
        header = {"imret_verified_edges": _CHECKPOINT_VERSION, "settings": settings, "tag": tag}
        if path.exists():
            done = _read_checkpoint(path, header)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        out = open(path, "a", encoding="utf-8")
        if path.stat().st_size == 0:
            out.write(json.dumps(header) + "\n")
            out.flush()
    try:
        todo = []
        for r, (i, j) in enumerate(e.tolist()):
            m = done.get((i, j))
            if m is None:
                todo.append(r)
            else:
                inliers[r] = m
        from tqdm.auto import tqdm

        bar = tqdm(total=e.shape[0], initial=e.shape[0] - len(todo), desc="verify", unit="pair", disable=not progress)

        def job(r: int) -> int:
            i, j = int(e[r, 0]), int(e[r, 1])
            return _verify_one(cache(i), cache(j), settings)

        def record(r: int, m: int) -> None:
            inliers[r] = m
            if out is not None:
                out.write(f"[{int(e[r, 0])},{int(e[r, 1])},{m}]\n")
                out.flush()
            bar.update(1)

        try:
            if nworkers <= 1:
                for r in todo:
                    record(r, job(r))
            else:
                pool = ThreadPoolExecutor(nworkers, thread_name_prefix="imret-mine")
                pending: dict[Any, int] = {}
                it = iter(todo)
                try:
                    while True:
                        while len(pending) < 4 * nworkers:
                            r = next(it, None)
                            if r is None:
                                break
                            pending[pool.submit(job, r)] = r
                        if not pending:
                            break
                        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            r = pending.pop(fut)
                            record(r, fut.result())
                finally:  # an error or an interrupt: wait for the running pairs, keep every result
                    for fut in pending:
                        fut.cancel()
                    pool.shutdown(wait=True)
                    for fut, r in pending.items():
                        if not fut.cancelled() and fut.exception() is None:
                            record(r, fut.result())
        finally:
            bar.close()
    finally:
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
    return inliers


# ---------------------------------------------------------------------------- mining


def components_of(n: int, edges: Any) -> np.ndarray:
    """Connected components of nodes ``0..n-1`` joined by ``edges`` ``(E, 2)``.

    Returns:
        ``(n,)`` int64 component id per node; components are numbered ``0, 1, ...`` in order of
        their smallest node.
    """
    n = _int_at_least(n, "n", 0)
    e = _edges_array(edges)
    if e.size and e.max() >= n:
        raise ValueError(f"edges index node {int(e.max())} but there are {n} nodes")
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    for i, j in e.tolist():
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the smaller node is the root: ids follow it
    roots = np.array([root(i) for i in range(n)], np.int64)
    _, ids = np.unique(roots, return_inverse=True)  # unique roots sorted = by smallest node
    return ids.reshape(-1).astype(np.int64)


def expansion_pairs(
    descriptors: Any,
    labels: Any,
    k: int = DEFAULT_K,
    members: int = DEFAULT_ATTACH_MEMBERS,
    *,
    exclude: Any = None,
) -> np.ndarray:
    """Candidate pairs of one expansion round: the images that components should be verified with next.

    For each component ``c`` (``labels == c``, ``c >= 0``), its query is the normalised sum of its
    members' descriptors (average query expansion, Chum et al. ICCV 2007, over the verified
    component instead of the top of a ranking). The ``k`` images outside ``c`` most similar to
    it are its candidates (images of other components included, so that components of one object
    can merge), and each candidate ``j`` is paired with the ``members`` members of ``c`` most
    similar to ``j``. Ties go to the lower index throughout.

    Args:
        descriptors: ``(N, D)`` global descriptors.
        labels: ``(N,)`` integer component per image, ``-1`` for images in none.
        k: outside images per component.
        members: members of the component each candidate is paired with.
        exclude: ``(E, 2)`` pairs not to return (e.g. those already verified), any order.

    Returns:
        ``(P, 2)`` int64 pairs ``i < j``, unique, sorted, none of them in ``exclude``.
    """
    x = _rows(descriptors, "descriptors")
    n = x.shape[0]
    lab = np.asarray(labels)
    if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be ({n},) integers (one per descriptor row), got {lab.dtype} {lab.shape}")
    k = _int_at_least(k, "k", 1)
    members = _int_at_least(members, "members", 1)
    out = []
    for c in np.unique(lab[lab >= 0]).tolist():
        inside = np.flatnonzero(lab == c)
        outside = np.flatnonzero(lab != c)
        if outside.size == 0:
            continue
        q = x[inside].sum(0)
        q /= max(float(np.linalg.norm(q)), 1e-12)
        s_out = x[outside] @ q
        cand = outside[np.lexsort((outside, -s_out))[:k]]
        sim = x[cand] @ x[inside].T  # (candidates, members)
        m = min(members, inside.size)
        for r, j in enumerate(cand.tolist()):
            best = inside[np.lexsort((inside, -sim[r]))[:m]]
            out.append(np.stack([np.minimum(best, j), np.maximum(best, j)], axis=1))
    if not out:
        return np.zeros((0, 2), np.int64)
    pairs = np.unique(np.concatenate(out), axis=0).astype(np.int64)
    if exclude is not None:
        ex = _edges_array(exclude)
        if ex.size:
            ex = np.stack([ex.min(1), ex.max(1)], axis=1)
            known = set(map(tuple, ex.tolist()))
            pairs = pairs[[tuple(p) not in known for p in pairs.tolist()]].reshape(-1, 2)
    return pairs


def linked_components(
    n: int,
    edges: Any,
    inliers: Any,
    min_inliers: int = DEFAULT_MIN_INLIERS,
    attach_inliers: int | None = DEFAULT_ATTACH_INLIERS,
    attach_min: int = DEFAULT_ATTACH_MIN,
) -> np.ndarray:
    """Components of verified pairs, with images attached on several weaker matches.

    First the connected components of the pairs with ``>= min_inliers`` inliers. Then, in one
    pass over those components, an image joins a component ``C`` it is not in when at least
    ``attach_min`` members of ``C`` verify with it at ``>= attach_inliers`` (a lower bar):
    its pairs with them become links, which also merges the image's own component into ``C``.
    ``attach_inliers=None`` (or ``>= min_inliers``) adds nothing.

    Args:
        n: number of images; ``edges``: ``(E, 2)`` verified pairs; ``inliers``: ``(E,)`` their counts.

    Returns:
        ``(n,)`` int64 component per image (as :func:`components_of`: numbered by smallest image).
    """
    e = _edges_array(edges)
    m = np.asarray(inliers).reshape(-1)
    if m.shape[0] != e.shape[0]:
        raise ValueError(f"{e.shape[0]} edges but {m.shape[0]} inlier counts")
    min_inliers = _int_at_least(min_inliers, "min_inliers", 2)
    attach_min = _int_at_least(attach_min, "attach_min", 1)
    strong = m >= min_inliers
    comp = components_of(n, e[strong])
    if attach_inliers is None or attach_inliers >= min_inliers:
        return comp
    attach_inliers = _int_at_least(attach_inliers, "attach_inliers", 2)
    weak = e[(m >= attach_inliers) & ~strong]
    # each weak pair, seen from both ends: (image, the component of its partner, the pair)
    img = np.concatenate([weak[:, 0], weak[:, 1]])
    other = np.concatenate([weak[:, 1], weak[:, 0]])
    cross = comp[img] != comp[other]
    img, other = img[cross], other[cross]
    links = [e[strong]]
    if img.size:
        key = np.stack([img, comp[other]], axis=1)
        uniq, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
        ok = counts[inv.reshape(-1)] >= attach_min
        links.append(np.stack([img[ok], other[ok]], axis=1))
    return components_of(n, np.concatenate(links))


def check_vote_share(value: Any, name: str) -> float:
    """``value`` as a float when it is a majority share in ``(0.5, 1]``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.5 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0.5, 1] (a majority of the vote), got {value!r}")
    return float(value)


def vote_attach(descriptors: Any, labels: Any, share: float, k: int = DEFAULT_VOTE_K) -> np.ndarray:
    """Labels with unlabelled images attached by descriptor votes.

    For each image with label ``-1``, its ``k`` most similar labelled images (cosine; ties to the
    lower index) vote for their labels with weight ``max(cosine, 0)``; the image takes the label
    with the largest weight when that weight is at least ``share`` of the total (and the total is
    positive). Labelled images keep theirs; votes come from the labels given, never from images
    attached in the same call.

    Returns:
        ``(N,)`` int64 labels.
    """
    x = _rows(descriptors, "descriptors")
    lab = np.asarray(labels)
    if lab.shape != (x.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be ({x.shape[0]},) integers (one per descriptor row), got {lab.dtype} {lab.shape}")
    share = check_vote_share(share, "share")
    k = _int_at_least(k, "k", 1)
    out = lab.astype(np.int64).copy()
    voters = np.flatnonzero(lab >= 0)
    todo = np.flatnonzero(lab < 0)
    if voters.size == 0 or todo.size == 0:
        return out
    ncls = int(lab.max()) + 1
    for lo, nn, w in _weighted_neighbours(x[todo], x[voters], k):
        rows = np.arange(nn.shape[0])
        per_class = np.zeros((nn.shape[0], ncls), np.float64)
        np.add.at(per_class, (rows[:, None], lab[voters[nn]]), w)
        best = per_class.argmax(1)
        total = per_class.sum(1)
        take = (total > 0) & (per_class[rows, best] >= share * total)
        out[todo[lo:lo + nn.shape[0]][take]] = best[take]
    return out


def _weighted_neighbours(queries: np.ndarray, pool: np.ndarray, k: int, *, self_offset: int | None = None):
    """For chunks of ``queries`` rows: ``(first row, (R, k') indices into pool, (R, k') float64
    weights max(cosine, 0))`` of each row's ``k' = min(k, available)`` most similar pool rows
    (:func:`_topk_rows`: ties to the lower index). ``self_offset``: queries are ``pool`` itself
    from that row on, and a row is never its own neighbour."""
    kk = min(k, pool.shape[0] - (self_offset is not None))
    step = max(1, _CHUNK_ELEMENTS // max(1, pool.shape[0]))
    for lo in range(0, queries.shape[0], step):
        sim = queries[lo:lo + step] @ pool.T
        if self_offset is not None:
            r = np.arange(sim.shape[0])
            sim[r, self_offset + lo + r] = -np.inf
        nn = _topk_rows(sim, kk)
        yield lo, nn, np.clip(np.take_along_axis(sim, nn, 1), 0.0, None).astype(np.float64)


@dataclass
class MinedData:
    """What :func:`mine` found.

    Attributes:
        paths: the ``N`` image paths (or None).
        edges: ``(E, 2)`` int64 candidate pairs ``i < j`` (the kNN graph).
        similarity: ``(E,)`` float32 cosine of each candidate pair.
        inliers: ``(E,)`` int32 verified inliers of each candidate pair.
        min_inliers: the inlier count that makes a pair verified.
        labels: ``(N,)`` int64 pseudo-class per image: its component of the verified graph,
            ``0..C-1`` in order of the smallest image; ``-1`` for images in no component of at
            least ``min_size`` images.
        negatives: ``(N, K)`` int64 hard negatives per image, most similar first, ``-1``
            padding (all ``-1`` for unlabelled images).
    """

    paths: list[str] | None
    edges: np.ndarray
    similarity: np.ndarray
    inliers: np.ndarray
    min_inliers: int
    labels: np.ndarray
    negatives: np.ndarray

    @property
    def verified(self) -> np.ndarray:
        """``(E,)`` bool: candidate pairs with at least ``min_inliers`` inliers."""
        return self.inliers >= self.min_inliers

    @property
    def positives(self) -> np.ndarray:
        """``(P, 2)`` int64 verified pairs ``i < j``."""
        return self.edges[self.verified]

    @property
    def positive_similarity(self) -> np.ndarray:
        """``(P,)`` float32 cosine of each positive pair."""
        return self.similarity[self.verified]

    @property
    def hard_positives(self) -> np.ndarray:
        """``(Q, 2)`` int64 ``(query, positive)``: for every labelled image, its verified
        neighbour of lowest descriptor similarity (ties: lower index), by query."""
        pos, sim = self.positives, self.positive_similarity
        q = np.concatenate([pos[:, 0], pos[:, 1]])
        p = np.concatenate([pos[:, 1], pos[:, 0]])
        s = np.concatenate([sim, sim]).astype(np.float64)
        if q.size == 0:
            return np.zeros((0, 2), np.int64)
        order = np.lexsort((p, s, q))  # by query, then similarity ascending, then index
        q, p = q[order], p[order]
        first = np.r_[True, q[1:] != q[:-1]]
        return np.stack([q[first], p[first]], axis=1).astype(np.int64)

    @property
    def components(self) -> list[list[int]]:
        """The pseudo-classes: image indices of each component (size >= 2), by label."""
        return [np.flatnonzero(self.labels == c).tolist() for c in range(self.num_classes)]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.size and self.labels.max() >= 0 else 0

    def summary(self) -> dict[str, Any]:
        """Counts for a report: images, candidate and verified pairs, components and their sizes."""
        sizes = np.bincount(self.labels[self.labels >= 0]) if self.num_classes else np.zeros(0, np.int64)
        hist = {int(s): int(c) for s, c in zip(*np.unique(sizes, return_counts=True))} if sizes.size else {}
        return {
            "images": int(self.labels.size),
            "candidate_pairs": int(self.edges.shape[0]),
            "verified_pairs": int(self.verified.sum()),
            "min_inliers": int(self.min_inliers),
            "components": int(self.num_classes),
            "images_in_components": int((self.labels >= 0).sum()),
            "singletons": int((self.labels < 0).sum()),
            "largest_component": int(sizes.max()) if sizes.size else 0,
            "component_sizes": hist,
            "hard_positives": int(self.hard_positives.shape[0]),
            "queries_with_negatives": int((self.negatives >= 0).any(axis=1).sum()) if self.negatives.size else 0,
        }


def _labels_from_components(comp: np.ndarray, min_size: int = 2) -> np.ndarray:
    """Pseudo-classes ``0..C-1`` (by smallest image) of the components of at least ``min_size``
    images; ``-1`` elsewhere."""
    sizes = np.bincount(comp, minlength=1)
    labels = np.full(comp.size, -1, np.int64)
    big = sizes[comp] >= min_size
    if big.any():
        _, labels[big] = np.unique(comp[big], return_inverse=True)
    return labels


def _labels_from_verified(n: int, pairs: np.ndarray, min_size: int = 2) -> np.ndarray:
    return _labels_from_components(components_of(n, pairs), min_size)


def mine(
    descriptors: Any,
    features_of: FeatureSource,
    paths: Sequence[str] | None = None,
    *,
    k: int = DEFAULT_K,
    min_inliers: int = DEFAULT_MIN_INLIERS,
    negatives: int = DEFAULT_NEGATIVES,
    min_size: int = DEFAULT_MIN_SIZE,
    expand: int = DEFAULT_EXPAND,
    attach_members: int = DEFAULT_ATTACH_MEMBERS,
    attach_min: int = DEFAULT_ATTACH_MIN,
    attach_inliers: int | None = DEFAULT_ATTACH_INLIERS,
    attach_votes: float | None = DEFAULT_ATTACH_VOTES,
    workers: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    tag: str = "",
    progress: bool = False,
    **verify_kw: Any,
) -> MinedData:
    """Mine pseudo-classes, positive pairs and hard negatives from unlabelled images.

    Steps: :func:`knn_graph` (``k`` neighbours by cosine), :func:`verify_edges` (the
    candidates, in ``workers`` threads, resumable through ``checkpoint``), then ``expand``
    rounds of :func:`expansion_pairs` (each component's mean descriptor proposes ``k`` outside
    images, each verified against its ``attach_members`` most similar members), components by
    :func:`linked_components` (pairs with at least ``min_inliers`` inliers, plus images that
    verify with at least ``attach_min`` members of a component at ``attach_inliers``), the
    components of at least ``min_size`` images as pseudo-classes, and for each image in one the
    ``negatives`` most similar images of other components, at most one per component
    (:func:`imret.mining.mine_hard_negatives`; unlabelled images count as components of their
    own), never an image verified with the query (at ``min(attach_inliers, min_inliers)``).

    Args:
        descriptors: ``(N, D)`` global descriptors, row ``i`` for image ``i``.
        features_of: local features of image ``i`` (see :func:`verify_edges`).
        paths: the ``N`` image paths, kept in the result for the writers.
        k, min_inliers, negatives: see the module defaults (10, 15, 5) and why.
        min_size: smallest component made a pseudo-class (>= 2); smaller ones are unlabelled.
        expand: expansion rounds (0: the kNN graph only); a round that proposes no new pair ends them.
        attach_members, attach_min, attach_inliers: see :func:`expansion_pairs` and
            :func:`linked_components` (``attach_inliers=None``: no weaker bar).
        attach_votes: after the components, attach the images left out by descriptor votes
            (:func:`vote_attach` with this share, ``DEFAULT_VOTE_K`` neighbours); None (default): no attaching.
            Attached images are in a pseudo-class but in no verified pair.
        verify_kw: verification options, see :data:`VERIFY_DEFAULTS`.

    Returns:
        A :class:`MinedData`.
    """
    x = _rows(descriptors, "descriptors")
    n = x.shape[0]
    if paths is not None:
        paths = [os.fspath(p) for p in paths]
        if len(paths) != n:
            raise ValueError(f"{len(paths)} paths for {n} descriptors")
    min_inliers = _int_at_least(min_inliers, "min_inliers", 2)
    negatives = _int_at_least(negatives, "negatives", 0)
    min_size = _int_at_least(min_size, "min_size", 2)
    expand = _int_at_least(expand, "expand", 0)
    attach_members = _int_at_least(attach_members, "attach_members", 1)
    attach_min = _int_at_least(attach_min, "attach_min", 1)
    if attach_inliers is not None:
        attach_inliers = _int_at_least(attach_inliers, "attach_inliers", 2)
    if attach_votes is not None:
        attach_votes = check_vote_share(attach_votes, "attach_votes")
    edges, _ = knn_graph(x, k)
    vkw = dict(workers=workers, checkpoint=checkpoint, tag=tag, progress=progress, **verify_kw)
    inl = verify_edges(edges, features_of, **vkw)

    def link(e: np.ndarray, m: np.ndarray) -> np.ndarray:
        return linked_components(n, e, m, min_inliers, attach_inliers, attach_min)

    for _ in range(expand):
        new = expansion_pairs(x, _labels_from_components(link(edges, inl)), k, attach_members, exclude=edges)
        if new.shape[0] == 0:
            break
        edges = np.concatenate([edges, new])
        inl = np.concatenate([np.asarray(inl), verify_edges(new, features_of, **vkw)])
        order = np.lexsort((edges[:, 1], edges[:, 0]))
        edges, inl = edges[order], inl[order]
    sim = np.einsum("ij,ij->i", x[edges[:, 0]], x[edges[:, 1]]).astype(np.float32)
    labels = _labels_from_components(link(edges, inl), min_size)
    if attach_votes is not None:
        labels = vote_attach(x, labels, attach_votes)
    neg = np.full((n, negatives), -1, np.int64)
    queries = np.flatnonzero(labels >= 0)
    if negatives and queries.size:
        from .mining import mine_hard_negatives

        own = np.where(labels >= 0, labels, labels.max() + 1 + np.arange(n))  # singletons: their own group
        bar = min_inliers if attach_inliers is None else min(min_inliers, attach_inliers)
        matched = edges[np.asarray(inl) >= bar]
        partners: list[set[int]] = [set() for _ in range(n)]
        for i, j in matched.tolist():
            partners[i].add(j)
            partners[j].add(i)
        neg[queries] = mine_hard_negatives(x[queries], x, own[queries], own, k=negatives,
                                           exclude=[partners[q] for q in queries.tolist()])
    return MinedData(paths, edges, sim, np.asarray(inl), min_inliers, labels, neg)


# ----------------------------------------------------------------------------- writers


def _check_paths(paths: Sequence[str] | None, n: int) -> list[str]:
    if paths is None:
        raise ValueError("the image paths are needed to write a CSV; pass paths=... to mine() or clean()")
    if len(paths) != n:
        raise ValueError(f"{len(paths)} paths for {n} images")
    return [os.fspath(p) for p in paths]


def write_class_csv(path: str | os.PathLike, mined: MinedData) -> int:
    """Write the pseudo-classes as ``path,label`` rows (label = component id; images in no
    component left out): the layout ``imret train`` reads with ``data.kind: csv``. Image paths
    are written as given (give absolute paths, or paths relative to the CSV's folder).

    Returns:
        The number of rows written.
    """
    paths = _check_paths(mined.paths, mined.labels.size)
    rows = [(paths[i], str(int(mined.labels[i]))) for i in np.flatnonzero(mined.labels >= 0)]
    _write_csv(path, ["path", "label"], rows)
    return len(rows)


def write_pairs_csv(path: str | os.PathLike, mined: MinedData, *, hard_only: bool = False) -> int:
    """Write ``query,positive,negative_1,...,negative_K`` rows: every verified pair ``i < j``
    (``hard_only``: only :attr:`MinedData.hard_positives`) with the hard negatives of its
    query; missing negatives are empty cells. Read back with :func:`read_pairs_csv`.

    Returns:
        The number of rows written.
    """
    paths = _check_paths(mined.paths, mined.labels.size)
    pairs = mined.hard_positives if hard_only else mined.positives
    kneg = mined.negatives.shape[1]
    rows = []
    for q, p in pairs.tolist():
        negs = [paths[j] if j >= 0 else "" for j in mined.negatives[q].tolist()]
        rows.append([paths[q], paths[p], *negs])
    _write_csv(path, ["query", "positive", *[f"negative_{i + 1}" for i in range(kneg)]], rows)
    return len(rows)


def read_pairs_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read a pairs CSV (:func:`write_pairs_csv`).

    Returns:
        ``(paths, pairs (M, 2) int64, negatives (M, K) int64)``: the distinct image paths in
        order of first appearance, and indices into them (``-1`` for an empty negative cell).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["query", "positive"]:
            raise ValueError(f"{path}: expected a header 'query,positive[,negative_1,...]', got {header!r}")
        kneg = len(header) - 2
        index: dict[str, int] = {}

        def idx(p: str) -> int:
            return index.setdefault(p, len(index))

        pairs, negs = [], []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header) or not row[0] or not row[1]:
                raise ValueError(f"{path}:{reader.line_num}: expected {len(header)} cells with a query and a "
                                 f"positive, got {row!r}")
            pairs.append((idx(row[0]), idx(row[1])))
            negs.append([idx(c) if c else -1 for c in row[2:]])
    return (list(index), np.asarray(pairs, np.int64).reshape(-1, 2), np.asarray(negs, np.int64).reshape(-1, kneg))


def _write_csv(path: str | os.PathLike, header: list[str], rows: list) -> None:
    import io

    from .fileio import atomic_write_bytes

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


# ---------------------------------------------------------------------------- cleaning


@dataclass
class CleanResult:
    """What :func:`clean` kept and dropped.

    Attributes:
        paths: the ``N`` image paths.
        labels: the ``N`` labels as given.
        keep: ``(N,)`` bool.
        reasons: why each image was dropped (``""`` when kept).
        edges: ``(E, 2)`` int64 pairs verified (within labels), ``inliers`` ``(E,)`` their counts.
        min_inliers, mode: the settings used.
    """

    paths: list[str]
    labels: list[Any]
    keep: np.ndarray
    reasons: list[str]
    edges: np.ndarray
    inliers: np.ndarray
    min_inliers: int
    mode: str
    per_label: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.keep)

    @property
    def dropped(self) -> np.ndarray:
        return np.flatnonzero(~self.keep)

    def summary(self) -> dict[str, Any]:
        return {"images": len(self.paths), "kept": int(self.keep.sum()), "dropped": int((~self.keep).sum()),
                "labels": len(self.per_label), "verified_pairs": int((self.inliers >= self.min_inliers).sum()),
                "checked_pairs": int(self.edges.shape[0]), "mode": self.mode, "min_inliers": self.min_inliers}


def _clean_edges(groups: dict[Any, np.ndarray], x: np.ndarray | None, all_pairs_up_to: int, k: int) -> np.ndarray:
    out = []
    for lab, idx in groups.items():
        m = idx.size
        if m < 2:
            continue
        if m <= all_pairs_up_to:
            a, b = np.triu_indices(m, 1)
        else:
            if x is None:
                raise ValueError(f"label {lab!r} has {m} images, more than all_pairs_up_to={all_pairs_up_to}: "
                                 "pass descriptors=... to verify its k nearest neighbours, or raise all_pairs_up_to")
            loc, _ = knn_graph(x[idx], k)
            a, b = loc[:, 0], loc[:, 1]
        out.append(np.stack([idx[a], idx[b]], axis=1))
    if not out:
        return np.zeros((0, 2), np.int64)
    e = np.concatenate(out)
    return e[np.lexsort((e[:, 1], e[:, 0]))]


def _valid_mask(valid: Any, n: int) -> np.ndarray:
    if valid is None:
        return np.ones(n, bool)
    v = np.asarray(valid)
    if v.dtype != bool or v.shape != (n,):
        raise ValueError(f"valid must be a ({n},) bool mask, got {v.dtype} of shape {v.shape}")
    return v


def label_vote_share(descriptors: Any, labels: Sequence[Any], k: int = DEFAULT_VOTE_K, *,
                     valid: Any = None) -> np.ndarray:
    """``(N,)`` for each image, the share of its ``k`` nearest neighbours' similarity (weights
    ``max(0, cosine)``, itself excluded, ties by index) that carries its own label; 0 when the
    weights sum to 0 or there is no other image.

    ``valid``: optional ``(N,)`` bool mask; rows outside it (images whose descriptor could not
    be computed) are never neighbours, and their own share is 0.
    """
    x = _rows(descriptors, "descriptors")
    n = x.shape[0]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} descriptor rows")
    k = _int_at_least(k, "k", 1)
    ok = _valid_mask(valid, n)
    out = np.zeros(n, np.float64)
    if not ok.all():
        idx = np.flatnonzero(ok)
        out[idx] = label_vote_share(x[idx], [labels[i] for i in idx.tolist()], k)
        return out
    if n < 2:
        return out
    _, codes = np.unique(np.asarray([repr(v) if not isinstance(v, str) else "s:" + v for v in labels], dtype=object),
                         return_inverse=True)
    for s0, nn, w in _weighted_neighbours(x, x, k, self_offset=0):
        same = codes[nn] == codes[s0:s0 + nn.shape[0], None]
        tot = w.sum(1)
        out[s0:s0 + nn.shape[0]] = np.where(tot > 0, (w * same).sum(1) / np.where(tot > 0, tot, 1.0), 0.0)
    return out


def clean(
    paths: Sequence[str],
    labels: Sequence[Any],
    features_of: FeatureSource,
    *,
    mode: str = "largest",
    descriptors: Any = None,
    min_inliers: int = DEFAULT_MIN_INLIERS,
    all_pairs_up_to: int = DEFAULT_ALL_PAIRS_UP_TO,
    k: int = DEFAULT_K,
    workers: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    tag: str = "",
    progress: bool = False,
    vote_k: int = DEFAULT_VOTE_K,
    vote_share: float = DEFAULT_VOTE_SHARE,
    valid: Any = None,
    **verify_kw: Any,
) -> CleanResult:
    """Clean a labelled image set by geometric verification within each label.

    Pairs of images of one label are verified (:func:`verify_edges`): all pairs of a label of
    at most ``all_pairs_up_to`` images, else each image's ``k`` nearest neighbours within the
    label by ``descriptors``. Then per label:

    * ``mode="largest"`` (Gordo et al. 2016): keep the largest connected component of the
      verified pairs (ties: more verified pairs, then the lowest image index); a label where no
      pair verifies loses all its images.
    * ``mode="flag"``: drop only the images that verify with no other image of their label.
    * ``mode="vote"``: keep an image that verifies with another image of its label, and also one
      that does not but whose label holds at least ``vote_share`` of the similarity mass of its
      ``vote_k`` nearest neighbours among all images (by ``descriptors``, required: weights
      ``max(0, cosine)``). Verification alone cannot vouch for the views of a landmark that share
      no visible structure with the rest (a third of rParis6k-mini's photos); their neighbours
      in descriptor space still mostly carry the right label, while a wrongly labelled image's
      neighbours carry its true one.

    Args:
        paths: ``N`` image paths; ``labels``: ``N`` labels (any hashable: names, ids).
        features_of: local features of image ``i`` (see :func:`verify_edges`).
        descriptors: ``(N, D)`` global descriptors, needed when a label is larger than
            ``all_pairs_up_to``.
        min_inliers, workers, checkpoint, tag, progress, verify_kw: as in :func:`mine`.
        vote_k, vote_share: ``mode="vote"``'s neighbours and share (defaults 10 and 0.5).
        valid: optional ``(N,)`` bool mask of the images that could be read; the others are
            dropped (reason "unreadable"), never verified and never vote (their rows of
            ``descriptors`` are ignored).

    Returns:
        A :class:`CleanResult` with a reason for every dropped image.
    """
    if mode not in CLEAN_MODES:
        raise ValueError(f"unknown mode {mode!r}; available: {', '.join(CLEAN_MODES)}")
    paths = [os.fspath(p) for p in paths]
    labels = list(labels)
    n = len(paths)
    if len(labels) != n:
        raise ValueError(f"{n} paths but {len(labels)} labels")
    min_inliers = _int_at_least(min_inliers, "min_inliers", 2)
    all_pairs_up_to = _int_at_least(all_pairs_up_to, "all_pairs_up_to", 2)
    k = _int_at_least(k, "k", 1)
    vote_k = _int_at_least(vote_k, "vote_k", 1)
    if isinstance(vote_share, bool) or not isinstance(vote_share, (int, float)) or not 0 < vote_share <= 1:
        raise ValueError(f"vote_share must be a number in (0, 1], got {vote_share!r}")
    x = None
    if descriptors is not None:
        x = _rows(descriptors, "descriptors")
        if x.shape[0] != n:
            raise ValueError(f"descriptors has {x.shape[0]} rows for {n} images")
    if mode == "vote" and x is None:
        raise ValueError("mode 'vote' needs descriptors=... (the neighbours that vote on each label)")
    ok_image = _valid_mask(valid, n)
    groups: dict[Any, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    garr = {lab: np.asarray(v, np.int64) for lab, v in groups.items()}
    edges = _clean_edges({lab: idx[ok_image[idx]] for lab, idx in garr.items()}, x, all_pairs_up_to, k)
    inl = verify_edges(edges, features_of, workers=workers, checkpoint=checkpoint, tag=tag, progress=progress,
                       **verify_kw)
    ok = inl >= min_inliers
    comp = components_of(n, edges[ok])  # verified edges never cross labels
    degree = np.bincount(edges[ok].ravel(), minlength=n) if n else np.zeros(0, np.int64)
    keep = np.zeros(n, bool)
    reasons = [""] * n
    per_label: dict[str, dict[str, int]] = {}
    share = label_vote_share(x, labels, vote_k, valid=ok_image) if mode == "vote" else None
    for lab, idx in garr.items():
        name = repr(lab) if not isinstance(lab, str) else f"'{lab}'"
        if idx.size == 1:
            keep[idx] = False
            reasons[int(idx[0])] = f"the only image of label {name}"
        elif mode == "flag":
            keep[idx] = degree[idx] > 0
            for i in idx[degree[idx] == 0].tolist():
                reasons[i] = f"verifies with no other image of label {name}"
        elif mode == "vote":
            keep[idx] = (degree[idx] > 0) | (share[idx] >= vote_share)
            for i in idx[~keep[idx]].tolist():
                reasons[i] = (f"verifies with no other image of label {name}, which holds {share[i]:.0%} "
                              f"of its {min(vote_k, n - 1)} nearest neighbours' similarity (< {vote_share:.0%})")
        else:
            cs, sizes = np.unique(comp[idx], return_counts=True)
            nedges = np.array([int((comp[edges[ok][:, 0]] == c).sum()) for c in cs])
            first = np.array([int(idx[comp[idx] == c].min()) for c in cs])
            best = np.lexsort((first, -nedges, -sizes))[0]
            if sizes[best] < 2:
                for i in idx.tolist():
                    reasons[i] = f"no two images of label {name} verify"
            else:
                keep[idx] = comp[idx] == cs[best]
                size_of = dict(zip(cs.tolist(), sizes.tolist()))
                for i in idx[~keep[idx]].tolist():
                    if degree[i] == 0:
                        reasons[i] = f"verifies with no other image of label {name}"
                    else:
                        reasons[i] = (f"outside the largest verified group of label {name} "
                                      f"(its group: {size_of[int(comp[i])]} images; largest: {int(sizes[best])})")
        for i in idx[~ok_image[idx]].tolist():
            keep[i] = False
            reasons[i] = "unreadable: no descriptor or local features"
        per_label[str(lab)] = {"images": int(idx.size), "kept": int(keep[idx].sum())}
    return CleanResult(paths, labels, keep, reasons, edges, inl, min_inliers, mode, per_label)


def write_clean_csv(path: str | os.PathLike, result: CleanResult) -> int:
    """Write the kept images as ``path,label`` rows (the labels as given); returns the row count."""
    rows = [(result.paths[i], str(result.labels[i])) for i in result.kept.tolist()]
    _write_csv(path, ["path", "label"], rows)
    return len(rows)


def write_clean_html(path: str | os.PathLike, result: CleanResult, *, thumb: int = 128, kept_shown: int = 4,
                     title: str = "imret clean: dropped images") -> Path:
    """A self-contained HTML page: per label with drops, a few kept images for reference and
    every dropped image with its reason (thumbnails as inline JPEG data URIs)."""
    import html

    from .plots import thumbnail_data_uri

    thumb = _int_at_least(thumb, "thumb", 16)
    kept_shown = _int_at_least(kept_shown, "kept_shown", 0)
    fig = ("margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;"
           f"width:{thumb}px;flex:none;font:12px system-ui,sans-serif;color:#222;word-break:break-all")
    img = f"display:block;width:{thumb}px;height:{thumb}px"
    s = result.summary()
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title></head>",
             "<body style='font:14px system-ui,sans-serif;margin:24px;background:#fafafa;color:#222'>",
             f"<h1 style='font-size:18px'>{html.escape(title)}</h1>",
             f"<p>mode {html.escape(result.mode)}, at least {result.min_inliers} inliers: kept {s['kept']} of "
             f"{s['images']} images, dropped {s['dropped']}.</p>"]
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(result.labels):
        groups.setdefault(str(lab), []).append(i)
    for lab, idx in groups.items():
        drop = [i for i in idx if not result.keep[i]]
        if not drop:
            continue
        keep = [i for i in idx if result.keep[i]]
        parts.append(f"<h2 style='font-size:15px'>label {html.escape(lab)}: dropped {len(drop)} of {len(idx)}</h2>"
                     "<div style='display:flex;flex-wrap:wrap;gap:8px'>")
        for i in keep[:kept_shown]:
            parts.append(f"<figure style='{fig};border-color:#2a8a2a'><img alt='kept' style='{img}' "
                         f"src='{thumbnail_data_uri(result.paths[i], thumb, None)}'><figcaption>kept<br>"
                         f"{html.escape(os.path.basename(result.paths[i]))}</figcaption></figure>")
        for i in drop:
            parts.append(f"<figure style='{fig};border:2px solid #c03030'><img alt='dropped' style='{img}' "
                         f"src='{thumbnail_data_uri(result.paths[i], thumb, None)}'><figcaption><b>dropped</b>: "
                         f"{html.escape(result.reasons[i])}<br>{html.escape(result.paths[i])}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    from .fileio import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(parts).encode("utf-8"))
    return path


def paths_tag(paths: Sequence[str], *extra: Any) -> str:
    """A short hash naming an image list (and settings) for a checkpoint's ``tag``."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fsencode(os.fspath(p)) + b"\0")
    h.update(json.dumps([str(e) for e in extra]).encode())
    return h.hexdigest()[:16]

