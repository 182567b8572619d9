"""The search-backend contract, backend spec strings, and tie-aware recall.

A backend holds ``(N, D)`` float32 rows under non-negative int64 ids and answers
inner-product (cosine, for L2-normalised rows) top-k queries. Every backend is selected by a
short spec string that is saved in the store and rebuilds the same index::

    exact                                  brute force, batched matrix product (the reference)
    faiss:HNSW32?efSearch=128              any FAISS index-factory string, search parameters
    faiss:IVF4096,SQ8?nprobe=32            after '?', '&'-separated
    faiss:IVF1024,PQ64x8,RFlat?nprobe=16&k_factor=8   PQ codes re-ranked with the raw vectors
    ann                                    the default approximate index, sized from N at build
    auto?recall=0.95&k=100                 index and search parameters tuned on the collection for a
                                           recall@k target (see :mod:`imret.index.tuning`)
    milvus:./vectors.db                    Milvus Lite, embedded (relative to the store directory)
    milvus:http://host:19530?index=HNSW    a Milvus server or cluster

Results are ``(scores, ids)``, both ``(Q, k)``: float32 similarities in decreasing order and
int64 ids, padded with ``-inf`` / ``-1`` when fewer than ``k`` rows exist.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import positive_int
from ..specs import split_spec

__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "BackendSpec",
    "parse_spec",
    "as_rows",
    "as_ids",
    "tie_aware_recall",
    "tie_aware_hits",
]

BACKEND_KINDS = ("exact", "faiss", "milvus", "ann", "auto")


@dataclass(frozen=True)
class BackendSpec:
    """A parsed spec string: ``kind[:target][?key=value&...]``."""

    kind: str
    target: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        s = self.kind + (f":{self.target}" if self.target else "")
        if self.params:
            s += "?" + "&".join(f"{k}={v}" for k, v in self.params.items())
        return s


def parse_spec(spec: str | BackendSpec) -> BackendSpec:
    """Parse a backend spec string; raises ``ValueError`` naming the valid kinds."""
    if isinstance(spec, BackendSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"backend spec must be a non-empty string, got {spec!r}; kinds: {', '.join(BACKEND_KINDS)}")
    spec = spec.strip()
    kind, _, target, params = split_spec(spec, "backend spec")
    if kind == "flat":
        kind = "exact"
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend {kind!r} in spec {spec!r}; available: {', '.join(BACKEND_KINDS)}")
    if kind in ("exact", "ann", "auto") and target:
        raise ValueError(f"backend {kind!r} takes no target, got {spec!r}")
    if kind in ("faiss", "milvus") and not target:
        example = "faiss:IVF4096,SQ8?nprobe=32" if kind == "faiss" else "milvus:./vectors.db"
        raise ValueError(f"backend {kind!r} needs a target, e.g. {example!r}; got {spec!r}")
    if kind == "auto":
        from .tuning import auto_target

        auto_target(params)  # names the bad key or value and the valid range
    return BackendSpec(kind, target, params)


def as_rows(x: Any, dim: int | None = None, name: str = "x") -> np.ndarray:
    """``x`` as a C-contiguous ``(N, D)`` float32 array; checks finiteness and ``D``."""
    a = np.asarray(x)
    if a.ndim == 1 and dim is not None and a.shape[0] == dim:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (N, D) rows, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} has dimension {a.shape[1]}, the index holds {dim}-D vectors")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def as_ids(ids: Any, n: int | None = None) -> np.ndarray:
    """``ids`` as an int64 vector of non-negative, distinct values (length ``n`` if given)."""
    a = np.asarray(ids)
    if a.ndim != 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-D integer array, got dtype {a.dtype} and shape {a.shape}")
    a = a.astype(np.int64, copy=False)
    if n is not None and a.shape[0] != n:
        raise ValueError(f"got {a.shape[0]} ids for {n} vectors")
    if a.size and a.min() < 0:
        raise ValueError(f"ids must be non-negative, got {int(a.min())}")
    if np.unique(a).size != a.size:
        raise ValueError("ids must be distinct")
    return a


class Backend(abc.ABC):
    """An inner-product top-k index over ``(N, D)`` float32 rows with int64 ids.

    Subclasses set :attr:`spec` (the string that rebuilds them), :attr:`dim`, and say whether
    they need training (:attr:`is_trained`), delete rows natively (:attr:`supports_remove`;
    otherwise removed rows are tombstones filtered at search time, which slows search as they
    pile up) and keep their data in an external engine (:attr:`external`).
    """

    spec: str
    dim: int
    supports_remove: bool = True
    #: True when the backend's data lives in an external engine (Milvus) rather than in
    #: files written by :meth:`save`.
    external: bool = False

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Number of vectors currently searchable."""

    @property
    def is_trained(self) -> bool:
        return True

    def train(self, x: np.ndarray) -> None:
        """Learn the coarse quantiser / codebooks from sample rows (no-op when not needed)."""

    @property
    def min_train_size(self) -> int:
        """Rows recommended for :meth:`train` (the store waits for this many before it leaves
        exact search); 0 when the backend needs no training."""
        return 0

    @abc.abstractmethod
    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Add ``(n, D)`` rows under ``(n,)`` ids that are not already present."""

    @abc.abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Delete the given ids (unknown ids are ignored); returns how many were removed."""

    @abc.abstractmethod
    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``(scores, ids)``, both ``(Q, k)``, padded with -inf / -1."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Write the index into an existing empty ``directory`` (the store renames it in place)."""

    def close(self) -> None:
        """Release resources (files, connections)."""

    def describe(self) -> dict[str, Any]:
        """Facts for ``imret index info``."""
        return {"spec": self.spec, "dim": self.dim, "ntotal": self.ntotal}


def _check_k(k: Any) -> int:
    positive_int(k, "k")
    return int(k)


def pad_results(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``(Q, k')`` results to ``(Q, k)`` with -inf / -1 (``k' <= k``)."""
    q, kk = ids.shape
    if kk >= k:
        return np.ascontiguousarray(scores[:, :k], dtype=np.float32), np.ascontiguousarray(ids[:, :k], dtype=np.int64)
    s = np.full((q, k), -np.inf, dtype=np.float32)
    i = np.full((q, k), -1, dtype=np.int64)
    s[:, :kk] = scores
    i[:, :kk] = ids
    return s, i


def tie_aware_recall(
    q: np.ndarray,
    x: np.ndarray,
    x_ids: np.ndarray,
    exact_scores: np.ndarray,
    approx_ids: np.ndarray,
    k: int,
    *,
    tol: float = 1e-5,
) -> float:
    """Recall@k of an approximate result against the exact one, counting ties as hits.

    A returned id counts when its true similarity ``q · x[id]`` is at least the exact k-th
    score minus ``tol`` (so any of several equally-near rows is a correct answer), each id at
    most once. ``q`` is ``(Q, D)``, ``x`` the ``(N, D)`` indexed rows with ids ``x_ids``,
    ``exact_scores`` the exact ``(Q, >=k)`` scores, ``approx_ids`` ``(Q, >=k)``.
    Returns the mean over queries of hits / min(k, N).
    """
    per_query = tie_aware_hits(q, x, x_ids, exact_scores, approx_ids, k, tol=tol)
    return float(per_query.mean()) if per_query.size else 1.0


def tie_aware_hits(
    q: np.ndarray,
    x: np.ndarray,
    x_ids: np.ndarray | None,
    exact_scores: np.ndarray,
    approx_ids: np.ndarray,
    k: int,
    *,
    tol: float = 1e-5,
) -> np.ndarray:
    """Per-query recall@k of :func:`tie_aware_recall`: ``(Q,)`` float64, hits / min(k, N).

    ``x_ids=None``: the ids are row numbers of ``x`` (which may hold more rows than were
    indexed, e.g. a store's whole matrix), and ``min(k, N)`` is taken per query as the number
    of finite exact scores among the first ``k`` (exact search pads with ``-inf``). A query
    with nothing to find scores 1.0.
    """
    k = _check_k(k)
    nq = q.shape[0]
    out = np.ones(nq)
    if x_ids is not None:
        order = np.argsort(x_ids)
        sorted_ids = x_ids[order]
        n = x_ids.shape[0]
    for qi in range(nq):
        if x_ids is None:
            want = int(np.count_nonzero(np.isfinite(exact_scores[qi, :k])))
        else:
            want = min(k, n)
        if want == 0:
            continue
        kth = exact_scores[qi, want - 1]
        found = approx_ids[qi, :k]
        found = np.unique(found[found >= 0])
        if x_ids is None:
            rows = found[found < x.shape[0]]
        else:
            pos = np.searchsorted(sorted_ids, found)
            ok = (pos < n) & (sorted_ids[np.minimum(pos, n - 1)] == found)
            rows = order[pos[ok]]
        true = np.asarray(x[rows], dtype=np.float32) @ q[qi]
        out[qi] = np.count_nonzero(true >= kth - tol) / want
    return out
