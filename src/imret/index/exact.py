"""Exact search: a batched matrix product and a running top-k, the reference for every index.

Queries are processed against the database in blocks of rows, so memory stays bounded at
``Q x block`` scores whatever ``N`` is. The database may be a NumPy array in memory or a
read-only memory map (the store's descriptor file): nothing is copied at search time beyond
the block being multiplied. Among the returned rows, equal scores are ordered by increasing
id, so results are deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .._checks import positive_int
from .base import Backend, _check_k, as_ids, as_rows, pad_results

__all__ = ["ExactBackend", "exact_search"]

_FILE_VECTORS = "vectors.npy"
_FILE_IDS = "ids.npy"


def _block_rows(n_queries: int, dim: int, budget_bytes: int = 512 << 20) -> int:
    # scores block (Q x B) plus the database block (B x D), both float32
    return max(1024, budget_bytes // (4 * (n_queries + dim)))


def exact_search(
    q: np.ndarray,
    x: np.ndarray,
    k: int,
    *,
    ids: np.ndarray | None = None,
    alive: np.ndarray | None = None,
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``x`` by inner product with each row of ``q``.

    ``q`` ``(Q, D)``, ``x`` ``(N, D)`` float32 (array or memmap); ``ids`` ``(N,)`` int64 labels
    of the rows (default ``arange(N)``); ``alive`` an optional ``(N,)`` bool mask of searchable
    rows. Returns ``(scores, ids)`` ``(Q, k)`` sorted by decreasing score, equal scores by
    increasing id, padded with -inf / -1.
    """
    k = _check_k(k)
    nq, n = q.shape[0], x.shape[0]
    if nq == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    block = block_rows or _block_rows(nq, x.shape[1])
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    best_s = torch.full((nq, 0), -float("inf"))
    best_i = torch.zeros((nq, 0), dtype=torch.int64)
    buf = torch.empty((nq, min(block, n)))  # reused: a fresh score block each time costs page faults
    for start in range(0, n, block):
        stop = min(n, start + block)
        xb = torch.from_numpy(np.ascontiguousarray(x[start:stop], dtype=np.float32))
        s = torch.mm(qt, xb.T, out=buf) if stop - start == buf.shape[1] else qt @ xb.T
        if alive is not None:
            dead = torch.from_numpy(~np.asarray(alive[start:stop], dtype=bool))
            if bool(dead.any()):
                s[:, dead] = -float("inf")
        kk = min(k, stop - start)
        bs, bi = torch.topk(s, kk, dim=1, sorted=False)
        bi = bi + start
        best_s = torch.cat([best_s, bs], dim=1)
        best_i = torch.cat([best_i, bi], dim=1)
        if best_s.shape[1] > 4 * k:
            best_s, best_i = _merge(best_s, best_i, k)
    best_s, best_i = _merge(best_s, best_i, k)
    rows = best_i.numpy()
    scores = best_s.numpy()
    out_ids = rows if ids is None else np.asarray(ids, dtype=np.int64)[rows]
    invalid = ~np.isfinite(scores)
    out_ids = np.where(invalid, -1, out_ids)
    scores = np.where(invalid, -np.inf, scores).astype(np.float32)
    return pad_results(scores, out_ids, k)


def _merge(s: torch.Tensor, i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top-k of candidate columns, ordered by (-score, row) for deterministic ties."""
    # lexicographic sort: first by row, then stable by score
    order = torch.argsort(i, dim=1)
    s = torch.gather(s, 1, order)
    i = torch.gather(i, 1, order)
    order = torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]
    return torch.gather(s, 1, order), torch.gather(i, 1, order)


class ExactBackend(Backend):
    """Brute-force inner-product search over all rows (``spec = "exact"``).

    Rows are kept in a growable float32 buffer, or wrap an existing matrix (for example the
    store's memory-mapped descriptors) without a copy via :meth:`from_matrix`.
    """

    supports_remove = True

    def __init__(self, dim: int, *, spec: str = "exact", block_rows: int | None = None):
        positive_int(dim, "dim")
        self.dim = int(dim)
        self.spec = spec
        self.block_rows = block_rows
        self._x = np.zeros((0, self.dim), np.float32)
        self._ids = np.zeros((0,), np.int64)
        self._alive = np.zeros((0,), bool)
        self._n = 0
        self._id_set: dict[int, int] | None = None

    @classmethod
    def from_matrix(cls, x: np.ndarray, ids: np.ndarray | None = None, alive: np.ndarray | None = None,
                    *, spec: str = "exact") -> "ExactBackend":
        """Wrap ``(N, D)`` float32 rows (array or memmap) without copying them."""
        if x.ndim != 2 or x.dtype != np.float32:
            raise ValueError(f"from_matrix needs (N, D) float32 rows, got {x.dtype} {x.shape}")
        b = cls(x.shape[1], spec=spec)
        b._x = x
        b._n = x.shape[0]
        b._ids = np.arange(b._n, dtype=np.int64) if ids is None else as_ids(ids, b._n)
        b._alive = np.ones(b._n, bool) if alive is None else np.array(alive, dtype=bool, copy=True)
        if b._alive.shape != (b._n,):
            raise ValueError(f"alive mask must be ({b._n},), got {b._alive.shape}")
        return b

    @property
    def ntotal(self) -> int:
        return int(np.count_nonzero(self._alive[: self._n]))

    def _index_of(self) -> dict[int, int]:
        if self._id_set is None or len(self._id_set) != self._n:
            self._id_set = {int(v): r for r, v in enumerate(self._ids[: self._n])}
        return self._id_set

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        x = as_rows(x, self.dim)
        ids = as_ids(ids, x.shape[0])
        if ids.size == 0:
            return
        index = self._index_of()
        clash = [int(i) for i in ids if int(i) in index and self._alive[index[int(i)]]]
        if clash:
            raise ValueError(f"ids already present: {clash[:5]}")
        need = self._n + x.shape[0]
        if not isinstance(self._x, np.ndarray) or isinstance(self._x, np.memmap) or need > self._x.shape[0]:
            cap = max(need, 2 * self._x.shape[0], 1024)
            grown = np.empty((cap, self.dim), np.float32)
            grown[: self._n] = self._x[: self._n]
            gi = np.empty(cap, np.int64)
            gi[: self._n] = self._ids[: self._n]
            ga = np.zeros(cap, bool)
            ga[: self._n] = self._alive[: self._n]
            self._x, self._ids, self._alive = grown, gi, ga
        self._x[self._n:need] = x
        self._ids[self._n:need] = ids
        self._alive[self._n:need] = True
        for r, v in enumerate(ids, start=self._n):
            index[int(v)] = r
        self._n = need

    def remove(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        index = self._index_of()
        removed = 0
        for v in ids:
            r = index.get(int(v))
            if r is not None and self._alive[r]:
                self._alive[r] = False
                removed += 1
        return removed

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_rows(q, self.dim, "queries")
        n = self._n
        alive = self._alive[:n]
        return exact_search(q, self._x[:n] if n else np.zeros((0, self.dim), np.float32), k,
                            ids=self._ids[:n], alive=None if alive.all() else alive,
                            block_rows=self.block_rows)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored rows of the given ids, ``(n, D)``."""
        index = self._index_of()
        try:
            rows = [index[int(v)] for v in np.asarray(ids).ravel()]
        except KeyError as e:
            raise KeyError(f"unknown id {e.args[0]}") from None
        return np.asarray(self._x[rows], dtype=np.float32)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        keep = self._alive[: self._n]
        np.save(d / _FILE_VECTORS, np.ascontiguousarray(self._x[: self._n][keep]))
        np.save(d / _FILE_IDS, self._ids[: self._n][keep])

    @classmethod
    def load(cls, directory: str | os.PathLike, *, spec: str = "exact", mmap: bool = True) -> "ExactBackend":
        d = Path(directory)
        x = np.load(d / _FILE_VECTORS, mmap_mode="c" if mmap else None, allow_pickle=False)
        ids = np.load(d / _FILE_IDS, allow_pickle=False)
        return cls.from_matrix(x, ids, spec=spec)
