"""Exact search: a batched matrix product, a bounded-error first pass and exact re-scoring.

The result of exact search is defined by one scoring rule: the score of row ``x`` for query
``q`` is :func:`exact_scores` (float32 products summed in float32 along the row, a fixed
order), the top ``k`` rows by that score, equal scores ordered by increasing row. It is
reached in two passes over the database, in blocks of rows so memory stays bounded at
``Q x block`` scores whatever ``N`` is:

1. an approximate pass, a matrix product in ``fp32`` or ``bf16`` (half the memory traffic,
   and about 2.5x the throughput where the CPU has AVX512-BF16 or AMX), keeping per query the
   rows whose approximate score could, within a proven error bound, reach the top ``k``: per
   block a set that holds its top ``keep`` (by group maxima in fp32, :func:`_select`), less the
   rows that the blocks before rule out (:func:`_cut`), then the bound applied to them all;
2. the kept rows (typically ``k`` plus a few) are re-scored by the exact rule and the top
   ``k`` returned.

Because the bound is rigorous (see :func:`error_bound`), both precisions return identical ids
and scores, bit for bit. The database may be a NumPy array in memory or a read-only memory
map (the store's descriptor file): nothing is copied at search time beyond the block being
multiplied and the rows re-scored.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import positive_int
from .base import Backend, _check_k, as_ids, as_rows, pad_results

__all__ = ["ExactBackend", "exact_search", "exact_scores", "error_bound", "prepare_rows", "PRECISIONS", "bf16_speedup",
           "resolve_precision"]

_FILE_VECTORS = "vectors.npy"
_FILE_IDS = "ids.npy"

#: ``precision`` of the first pass: ``auto`` takes ``bf16`` where a bf16 matrix product is
#: measured at least :data:`AUTO_MIN_SPEEDUP` times faster than fp32 on this machine.
PRECISIONS = ("auto", "fp32", "bf16")
AUTO_MIN_SPEEDUP = 1.5
U32 = 2.0 ** -24  # unit roundoff of float32 (round to nearest)
U16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
_TINY = 2.0 ** -126  # smallest normal float32: bounds what flushing a subnormal to zero loses


def _gamma(n: int, u: float = U32) -> float:
    return n * u / (1 - n * u)


def exact_scores(x: torch.Tensor, q: torch.Tensor, dim: int = 1, *, out: torch.Tensor | None = None,
                 out_scores: torch.Tensor | None = None) -> torch.Tensor:
    """The exact-search score of each pair: float32 ``x`` and ``q`` of one shape ``(..., D)``
    (``dim`` the last) → ``(...)`` float32.

    Elementwise float32 products summed along the last dimension by ``torch.sum`` (its order
    depends on ``D`` only, not on how many pairs are scored at once), so a pair gets the same
    bits whichever batch it is scored in. ``out`` (the shape of ``x``; may be ``x``) takes the
    products, ``out_scores`` the scores.
    Error against the real inner product: at most ``γ_D · Σ|q_i x_i| ≤ γ_D ‖q‖ ‖x‖`` with
    ``γ_n = n u / (1 - n u)``, ``u = 2^-24`` (Higham, *Accuracy and Stability of Numerical
    Algorithms*, 2nd ed., §3.1: any summation order).
    """
    p = torch.mul(x, q, out=out)
    return p.sum(dim=dim) if out_scores is None else torch.sum(p, dim=dim, out=out_scores)


@dataclass(frozen=True)
class _RowStats:
    """Upper bounds on the norms of a set of database rows (maxima over the rows)."""

    x: float  # max ‖x_j‖
    xr: float  # max ‖bf16(x_j)‖ (0 unless bf16)
    dx: float  # max ‖x_j − bf16(x_j)‖ (0 unless bf16)

    @staticmethod
    def of(x: torch.Tensor, xr: torch.Tensor | None) -> "_RowStats":
        """Bounds for float32 rows ``x`` and, if given, their bfloat16 rounding ``xr``."""
        if x.shape[0] == 0:
            return _RowStats(0.0, 0.0, 0.0)
        nx = float(_norms(x).max())
        if xr is None:
            return _RowStats(nx, 0.0, 0.0)
        xr32 = xr.float()
        # x − bf16(x) is exact in float32 (the low bits of x)
        return _RowStats(nx, float(_norms(xr32).max()), float(_norms(x - xr32).max()))

    def merge(self, other: "_RowStats") -> "_RowStats":
        return _RowStats(max(self.x, other.x), max(self.xr, other.xr), max(self.dx, other.dx))


def _norm_slack(d: int) -> float:
    """Factor that turns a float32 Euclidean norm of a ``d``-vector into an upper bound of the
    real one: the sum of squares has relative error ≤ γ_d, the square root adds ≤ u."""
    return (1 + 2 * _gamma(d + 2)) * (1 + 2 ** -20)


def _norms(v: torch.Tensor) -> torch.Tensor:
    """Upper bounds (float64) of the Euclidean norms of the rows of float32 ``v``: the float32
    norm times :func:`_norm_slack`, plus ``sqrt(d)·2^-63`` for squares lost to underflow."""
    d = v.shape[1]
    return torch.linalg.vector_norm(v, dim=1).double() * _norm_slack(d) + math.sqrt(d) * 2.0 ** -63


def error_bound(q: torch.Tensor, stats: _RowStats, precision: str) -> tuple[torch.Tensor, float]:
    """Per-query bound ``(eps (Q,) float64, r)``: for every database row ``j``,
    ``|a_j − e_j| ≤ eps + r·|a_j|`` where ``a_j`` is the first pass's score and ``e_j`` the
    exact score (:func:`exact_scores`).

    Notation: ``t = q·x`` the real inner product, ``u = 2^-24`` (float32), ``v = 2^-8``
    (bfloat16), ``γ_D = D u / (1 − D u)``, ``X = max_j ‖x_j‖``. The exact score obeys
    ``|e − t| ≤ γ_D ‖q‖ X`` (:func:`exact_scores`).

    ``fp32``: ``a`` is a float32 matrix product, products and sums rounded in any order, so
    ``|a − t| ≤ γ_D ‖q‖ X`` as well; ``eps = 2 γ_D ‖q‖ X``, ``r = 0``.

    ``bf16``: ``q̃ = bf16(q)``, ``x̃ = bf16(x)`` (round to nearest, relative error ≤ v per
    component, so ``|q·x − q̃·x̃| ≤ (2v + v²) Σ|q_i x_i|``); instead of that a priori bound the
    actual rounding errors are used, which is tighter: ``q·x − q̃·x̃ = q·(x − x̃) + (q − q̃)·x̃``,
    so by Cauchy–Schwarz ``|t − q̃·x̃| ≤ ‖q‖ ‖δx‖ + ‖δq‖ ‖x̃‖`` with ``δx = x − x̃``,
    ``δq = q − q̃``, both computed exactly and bounded by their maximum over rows. Each
    product of two bfloat16 numbers is exact in float32 (8 + 8 ≤ 24 significant bits), and
    the product accumulates in float32 in any order: error ``≤ γ_D ‖q̃‖ ‖x̃‖``. The
    accumulated sum ``s`` is rounded to bfloat16 to nearest: ``|a − s| ≤ v|s| ≤ v/(1 − v)·|a|``.
    Adding the exact score's own error: ``eps = ‖q‖ max‖δx‖ + ‖δq‖ max‖x̃‖ + γ_D ‖q̃‖ max‖x̃‖
    + γ_D ‖q‖ X``, ``r = v / (1 − v)``.

    Both add ``η = 2 (D + 1) 2^-126 (1 + ‖q‖)(1 + X)`` for what flushing subnormal factors,
    products or sums to zero can lose (a flushed factor loses at most the other factor times
    2^-126). Norms are computed in float32 and inflated to upper bounds (:func:`_norms`).

    Assumptions, checked where they can be: the product accumulates in float32 (checked once
    per process by :func:`bf16_speedup`; otherwise bf16 is refused), and rounds to nearest.
    Every search also checks the bound on each re-scored candidate; a violation (a product that
    breaks the assumptions) switches the process to fp32 and redoes the search. For unit rows
    in 512-D the bf16 ``eps`` is about ``0.004`` (``‖δx‖ ≤ 0.52 v``), plus ``v |a|``; the fp32
    ``eps`` about ``6e-5``.

    How :func:`exact_search` uses it: ``lower(a) = a − r|a| − eps`` and ``upper(a) = a + r|a| +
    eps`` are increasing in ``a``, so ``L = lower(a_(k))`` (the k-th largest first-pass score)
    is a lower bound of the k-th largest exact score, and a row can be in the exact top k only
    if ``upper(a_j) ≥ L``: those rows are re-scored. Rows the first pass let go (beyond its
    per-block top ``keep``) are covered by the largest score let go; where even that reaches
    ``L`` the query is rescanned in full.
    """
    d = q.shape[1]
    nq = _norms(q)
    g = _gamma(d)
    eta = 2 * (d + 1) * _TINY * (1 + nq) * (1 + stats.x)
    if precision == "fp32":
        return 2 * g * nq * stats.x + eta, 0.0
    qr = q.bfloat16().float()
    nqr, ndq = _norms(qr), _norms(q - qr)
    eps = nq * stats.dx + ndq * stats.xr + g * nqr * stats.xr + g * nq * stats.x + eta
    return eps, U16 / (1 - U16)


# -- choosing the precision -------------------------------------------------------------------

_SPEEDUP: dict[str, float] = {}
_CHECK_BOUND = True  # check the bound on every re-scored candidate (tests turn it off)
_SPEEDUP_LOCK = threading.Lock()


def _bf16_accumulates_in_fp32() -> bool:
    """True when the bf16 matrix product sums in float32: 1 + 511·2^-9 is 1.998 in float32 (2.0
    after rounding to bfloat16) but stays 1 if each partial sum were rounded to bfloat16."""
    a = torch.full((1, 512), 2.0 ** -9)
    a[0, 0] = 1.0
    s = float((a.bfloat16() @ torch.ones(512, 2).bfloat16()).float()[0, 0])
    return s == 2.0


def bf16_speedup() -> float:
    """fp32 / bf16 time of a ``(256 x 512) @ (512 x 8192)`` product on this machine, best of 3,
    measured once per process (about 0.3 s); 0 when the bf16 product does not accumulate in
    float32 (the error bound would not hold, so bf16 is never used)."""
    with _SPEEDUP_LOCK:
        if "bf16" not in _SPEEDUP:
            if not _bf16_accumulates_in_fp32():
                _SPEEDUP["bf16"] = 0.0
            else:
                g = torch.Generator().manual_seed(0)
                a, b = torch.randn(256, 512, generator=g), torch.randn(8192, 512, generator=g)
                times = {}
                for name, (aa, bb) in {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}.items():
                    aa @ bb.T
                    best = math.inf
                    for _ in range(3):
                        t0 = time.perf_counter()
                        aa @ bb.T
                        best = min(best, time.perf_counter() - t0)
                    times[name] = best
                _SPEEDUP["bf16"] = times["fp32"] / max(times["bf16"], 1e-9)
        return _SPEEDUP["bf16"]


def resolve_precision(precision: str) -> str:
    """``fp32`` or ``bf16`` for a requested precision (``auto`` measures, once per process)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_speedup() >= AUTO_MIN_SPEEDUP else "fp32"
    if precision == "bf16" and bf16_speedup() == 0.0:
        raise ValueError("precision 'bf16' is unavailable: this machine's bf16 matrix product does not "
                         "accumulate in float32, so its error bound would not hold; use 'fp32' or 'auto'")
    return precision


# -- search -----------------------------------------------------------------------------------

def _block_rows(n_queries: int, budget_bytes: int = 256 << 20) -> int:
    # the scores block (B x Q float32) stays within budget_bytes; B a multiple of _GROUP
    return int(min(65536, max(4096, budget_bytes // (4 * max(n_queries, 1))))) // _GROUP * _GROUP


def prepare_rows(x: np.ndarray, precision: str, block: int = 65536) -> tuple[torch.Tensor | None, _RowStats]:
    """bfloat16 copy (for ``bf16``; None for ``fp32``) and the norm bounds of ``(N, D)`` rows."""
    n, d = x.shape
    xr = torch.empty((n, d), dtype=torch.bfloat16) if precision == "bf16" else None
    stats = _RowStats(0.0, 0.0, 0.0)
    for start in range(0, n, block):
        xb = torch.from_numpy(np.ascontiguousarray(x[start:start + block], dtype=np.float32))
        rb = None
        if xr is not None:
            rb = xr[start:start + block]
            rb.copy_(xb)
        stats = stats.merge(_RowStats.of(xb, rb))
    return xr, stats


#: Rows per group in the first pass's selection: the group maxima (one streaming pass over the
#: scores) pick the ``keep`` groups that hold a query's top ``keep`` scores.
_GROUP = 64
#: Queries from which the fp32 first pass runs as (rows x queries) with group maxima.
_BY_ROWS_MIN_QUERIES = 32


def _cut(thr: np.ndarray, eps: np.ndarray, r: float, dtype: torch.dtype) -> np.ndarray:
    """Per query a value ``c`` such that every first-pass score ``a < c`` has ``upper(a) <
    lower(thr)``: such a row cannot be a candidate once the k-th largest score is ``≥ thr``.
    Lowered by a relative 2^-20 (float32) or 2^-7 (bfloat16) so that rounding it to ``dtype``
    (relative error ≤ 2^-24 or 2^-9) keeps it below."""
    with np.errstate(invalid="ignore"):
        lo = thr - r * np.abs(thr) - eps - eps  # lower(thr) − eps
        c = np.where(lo >= 0, lo / (1 + r), lo / (1 - r))
        rel = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -20
        return np.where(np.isfinite(c), c - np.abs(c) * rel - 2.0 ** -100, -np.inf)


def _select(sc: torch.Tensor, keep: int, cut: np.ndarray | None, *, groups: bool = True
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Per query (column of the first-pass scores ``sc`` ``(B, Q)``) a set of rows that holds its
    top ``keep`` scores, less rows scoring below ``cut`` ``(Q,)`` (float64, or None).

    Returns flat ``(query, row, score)`` int64 / int64 / float64 arrays (the scores as computed:
    bfloat16 → float64 is exact), ``let_go`` ``(Q,)``: no row left out (other than by ``cut``)
    scores above it, None when none is, and ``floor`` ``(Q,)``: at least ``keep`` rows kept score
    ``≥ floor`` where ``floor`` exceeds the bound that gave ``cut`` (a lower bound of the block's
    ``keep``-th largest score), None when unknown.

    With ``groups`` (``sc`` contiguous) and at least ``2 keep`` groups of :data:`_GROUP` rows:
    the ``keep`` groups of largest maximum hold the top ``keep`` scores (a group holding one has
    its maximum ≥ it, and at most ``keep`` groups do; every other group's maximum is ``≤ t``, the
    least maximum chosen); ``t`` is ``≤`` the ``keep``-th largest score (the ``keep`` maxima are
    scores), so the chosen groups' rows scoring ``≥ t`` are kept and ``let_go = t``. The group
    maxima are one streaming pass over ``(B, Q)``, and the gather reads ``keep`` groups per query,
    sorted by group so each is read from cache: less than ``torch.topk`` over the block (which
    would also need it as ``(Q, B)``). Otherwise ``torch.topk`` per query.
    """
    b, nq = sc.shape
    ng = b // _GROUP
    c = None if cut is None else torch.from_numpy(cut).to(sc.dtype)
    if groups and ng >= 2 * keep:
        m = ng * _GROUP
        grouped = sc[:m].view(ng, _GROUP, nq)
        gm = grouped.amax(dim=1).T.contiguous()  # (Q, groups)
        gv, gi = torch.topk(gm, keep, dim=1, sorted=False)
        t = gv.min(dim=1).values
        lim = t if c is None else torch.maximum(t, c)
        g, qq = gi.flatten(), torch.arange(nq).repeat_interleave(keep)
        o = torch.argsort(g, stable=True)  # by group: each group's rows are read once, from cache
        g, qq = g[o], qq[o]
        vals = grouped[g, :, qq]  # (Q keep, _GROUP)
        p, j = torch.nonzero(vals >= lim[qq][:, None], as_tuple=True)
        out = [(qq[p].numpy(), (g[p] * _GROUP + j).numpy(), vals[p, j].float().numpy())]
        if m < b:  # the last rows, fewer than a group: all kept
            tail = sc[m:].T
            qt_, jt = torch.nonzero(tail >= c[:, None] if c is not None else torch.ones_like(tail, dtype=torch.bool),
                                    as_tuple=True)
            out.append((qt_.numpy(), (jt + m).numpy(), tail[qt_, jt].float().numpy()))
        q_, r_, a_ = (np.concatenate(z) for z in zip(*out))
        t64 = t.double().numpy()
        return q_, r_, a_.astype(np.float64), t64, t64
    st = sc.T  # (Q, B), few rows
    if keep < b:
        v, i = torch.topk(st, keep, dim=1, sorted=False)
        let_go = v.min(dim=1).values.double().numpy()
        floor = let_go
    else:
        v, i = st, torch.arange(b).expand(nq, b)
        let_go = floor = None
    mask = torch.ones_like(v, dtype=torch.bool) if c is None else v >= c[:, None]
    p, j = torch.nonzero(mask, as_tuple=True)
    return p.numpy(), i[p, j].numpy(), v[p, j].double().numpy(), let_go, floor


def exact_search(
    q: np.ndarray,
    x: np.ndarray,
    k: int,
    *,
    ids: np.ndarray | None = None,
    alive: np.ndarray | None = None,
    block_rows: int | None = None,
    precision: str = "fp32",
    prepared: tuple[torch.Tensor | None, _RowStats] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``x`` by inner product with each row of ``q``.

    ``q`` ``(Q, D)``, ``x`` ``(N, D)`` float32 (array or memmap); ``ids`` ``(N,)`` int64 labels
    of the rows (default ``arange(N)``); ``alive`` an optional ``(N,)`` bool mask of searchable
    rows; ``precision`` of the first pass (``fp32``, ``bf16`` or ``auto``; the result is the
    same); ``prepared`` what :func:`prepare_rows` returned for ``x`` in that precision (else it is
    computed block by block). Returns ``(scores, ids)`` ``(Q, k)`` sorted by decreasing score,
    equal scores by increasing row, padded with -inf / -1. Scores are :func:`exact_scores`.
    """
    k = _check_k(k)
    precision = resolve_precision(precision)
    nq, n = q.shape[0], x.shape[0]
    if nq == 0 or n == 0:
        return pad_results(np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64), k)
    block = block_rows or _block_rows(nq)
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    qa = qt.bfloat16() if precision == "bf16" else qt
    xr, stats = prepared if prepared is not None else (None, None)
    if stats is not None and ((xr is None) != (precision == "fp32") or (xr is not None and xr.shape != x.shape)):
        raise ValueError(f"prepared rows are for another precision or shape than {precision!r} {x.shape}")
    dead_all = None if alive is None else ~np.asarray(alive, dtype=bool)

    def rows_block(start: int, stop: int) -> tuple[torch.Tensor, _RowStats | None]:
        """Rows ``start:stop`` as the first pass multiplies them, and their norm bounds."""
        if xr is not None:
            return xr[start:stop], None
        xf = torch.from_numpy(np.ascontiguousarray(x[start:stop], dtype=np.float32))
        if precision == "fp32":
            return xf, None if stats is not None else _RowStats.of(xf, None)
        xb = xf.bfloat16()
        return xb, None if stats is not None else _RowStats.of(xf, xb)

    def dead_block(start: int, stop: int) -> torch.Tensor | None:
        if dead_all is None:
            return None
        dead = torch.from_numpy(dead_all[start:stop])
        return dead if bool(dead.any()) else None

    # first pass, per block of rows: scores (B x Q), then per query a set of rows that holds its
    # top `keep` scores (the bf16 bound admits ~20 % more rows than k on unit descriptors; more
    # trigger a rescan), and a value that no row left out scores above. Rows that provably cannot
    # be candidates (below the cut that the blocks before give) are left out as well, where the
    # bound is known in advance. (B x Q) is the orientation the matrix product runs fastest in
    # (about 1.3x (Q x B) with MKL on AVX-512), and groups of rows are contiguous in it.
    keep = 2 * k + 16 if precision == "bf16" else k + max(8, k // 8)
    # fp32 with many queries: (B x Q) and group maxima. bf16 runs as fast in (Q x B) and its group
    # maxima are slow; a few queries are a matrix-vector product, faster in (Q x B) with top-k.
    by_rows = precision == "fp32" and nq >= _BY_ROWS_MIN_QUERIES
    buf = torch.empty(nq * min(block, n), dtype=qa.dtype)  # reused: fresh blocks cost page faults
    eps_early = None if stats is None else error_bound(qt, stats, precision)
    thr = np.full(nq, -np.inf)  # a lower bound of every query's k-th largest first-pass score
    seen = _RowStats(0.0, 0.0, 0.0)
    pq, pr, pa, let_go = [], [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        xb, st = rows_block(start, stop)
        if st is not None:
            seen = seen.merge(st)
        if by_rows:
            sc = torch.mm(xb, qa.T, out=buf[: nq * (stop - start)].view(stop - start, nq))
        else:  # (Q x B), plain top-k: see by_rows
            sc = torch.mm(qa, xb.T, out=buf[: nq * (stop - start)].view(nq, stop - start)).T
        dead = dead_block(start, stop)
        if dead is not None:
            sc[dead] = -math.inf
        cut = None if eps_early is None else _cut(thr, eps_early[0].numpy(), eps_early[1], qa.dtype)
        bq, br, ba, bl, lb = _select(sc, keep, cut, groups=by_rows)
        pq.append(bq)
        pr.append(br + start)
        pa.append(ba)
        if bl is not None:
            let_go.append(bl)
        if lb is not None:
            thr = np.maximum(thr, lb)
    if stats is None:
        stats = seen
    # the bound: lb(a) = a − r|a| − eps ≤ e ≤ a + r|a| + eps = ub(a), both increasing in a
    eps_t, r = error_bound(qt, stats, precision) if eps_early is None else eps_early
    eps = eps_t.numpy()

    def lower(a: np.ndarray, e: np.ndarray) -> np.ndarray:  # e ≥ lower(a): increasing in a
        return a - r * np.abs(a) - e if r else a - e

    def upper(a: np.ndarray, e: np.ndarray) -> np.ndarray:  # e ≤ upper(a): increasing in a
        return a + r * np.abs(a) + e if r else a + e

    pq, pr, pa = np.concatenate(pq), np.concatenate(pr), np.concatenate(pa)
    # each query's k-th largest kept score (what follows the products works on these flat
    # arrays in NumPy, on this thread: a thread team costs more than it saves on such steps)
    count = np.bincount(pq, minlength=nq)
    first = np.cumsum(count) - count
    by_score = pa[np.lexsort((-pa, pq))]
    ak = np.where(count >= k, by_score[np.minimum(first + k - 1, max(pa.size - 1, 0))] if pa.size else 0, -np.inf)
    d64 = np.max(let_go, axis=0) if let_go else np.full(nq, -np.inf)
    with np.errstate(invalid="ignore"):  # -inf + inf (bf16, dead rows) is NaN: never a candidate
        lbk = np.where(np.isfinite(ak), lower(ak, eps), -np.inf)  # the k-th exact score is ≥ this
        incomplete = np.isfinite(d64) & (upper(d64, eps) >= lbk)
        cand = np.isfinite(pa) & (upper(pa, eps[pq]) >= lbk[pq]) & ~incomplete[pq]
    # the candidates as flat (query, row, first-pass score) triples; incomplete queries rescanned
    pq, pr, pa = [pq[cand]], [pr[cand]], [pa[cand]]
    redo = np.flatnonzero(incomplete)
    if redo.size:
        # rows let go in the first pass might reach the top k: rescan those queries in full
        qsub, eps_sub, lb_sub = qa[torch.from_numpy(redo)], eps[redo], lbk[redo]
        for start in range(0, n, block):
            stop = min(n, start + block)
            sc = (qsub @ rows_block(start, stop)[0].T).double().numpy()
            dead = dead_block(start, stop)
            if dead is not None:
                sc[:, dead.numpy()] = -np.inf
            with np.errstate(invalid="ignore"):
                j, c = np.nonzero(np.isfinite(sc) & (upper(sc, eps_sub[:, None]) >= lb_sub[:, None]))
            pq.append(redo[j])
            pr.append(c + start)
            pa.append(sc[j, c])
    try:
        return _rescore_top_k(qt, x, np.concatenate(pq), np.concatenate(pr), k, ids,
                              check=(np.concatenate(pa), eps, r) if _CHECK_BOUND else None)
    except _BoundViolated:
        if precision == "fp32":
            raise RuntimeError("the float32 first pass broke its error bound; this machine's matrix "
                               "product is not IEEE float32") from None
        with _SPEEDUP_LOCK:
            _SPEEDUP["bf16"] = 0.0  # the bf16 product breaks the bound's assumptions: never again
        return exact_search(q, x, k, ids=ids, alive=alive, block_rows=block_rows, precision="fp32")


class _BoundViolated(Exception):
    """A re-scored candidate's exact score lies outside the first pass's error bound."""


#: Elements per step of the re-scoring: below ATen's grain size (32768), so each small step runs
#: on the calling thread. A thread team for a few microseconds of work costs more than it saves,
#: and on a loaded machine, where a team waits for its slowest descheduled thread, far more.
_SERIAL_ELEMENTS = 16384


def _rescore_top_k(qt: torch.Tensor, x: np.ndarray, pq: np.ndarray, pr: np.ndarray, k: int,
                   ids: np.ndarray | None, check: tuple[np.ndarray, np.ndarray, float] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of candidate pairs, then per query its top ``k`` by (score desc, row asc).

    ``pq``, ``pr`` ``(P,)`` int64: the query and the row of each candidate pair (a row at most once
    per query). ``check`` = ``(a, eps, r)``, the pairs' first-pass scores ``(P,)`` and the bound:
    raises :class:`_BoundViolated` where a candidate's exact score is outside it. Returns
    ``(scores, ids)`` ``(Q, k)``, padded with -inf / -1.
    """
    nq, d = qt.shape
    npairs = pq.shape[0]
    xt = torch.from_numpy(x) if type(x) is np.ndarray and x.flags.c_contiguous else None
    e = torch.empty(npairs)
    step = max(1, _SERIAL_ELEMENTS // d)
    xbuf, qbuf = torch.empty((step, d)), torch.empty((step, d))  # reused: they stay in cache
    pq_t, pr_t = torch.from_numpy(pq), torch.from_numpy(pr)
    for a in range(0, npairs, step):
        b = min(npairs, a + step)
        r = pr_t[a:b]
        if xt is not None:
            xs = torch.index_select(xt, 0, r, out=xbuf[: b - a])
        else:
            xs = xbuf[: b - a].copy_(torch.from_numpy(np.ascontiguousarray(x[r.numpy()], dtype=np.float32)))
        exact_scores(xs, torch.index_select(qt, 0, pq_t[a:b], out=qbuf[: b - a]), out=xs, out_scores=e[a:b])
    en = e.numpy()
    if check is not None and npairs:
        a_, eps_, r_ = check
        if bool((np.abs(en.astype(np.float64) - a_) - r_ * np.abs(a_) - eps_[pq] > 0).any()):
            raise _BoundViolated
    # per query: score descending, then row ascending
    qn, rn = pq, pr
    order = np.lexsort((rn, -en, qn))
    qn, en, rn = qn[order], en[order], rn[order]
    first = np.searchsorted(qn, np.arange(nq))
    rank = np.arange(npairs) - first[qn]
    top = rank < k
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_r = np.full((nq, k), -1, np.int64)
    out_s[qn[top], rank[top]] = en[top]
    out_r[qn[top], rank[top]] = rn[top] if ids is None else np.asarray(ids, dtype=np.int64)[rn[top]]
    return out_s, out_r


def _precision_of(spec: str) -> str:
    """The ``precision`` parameter of an ``exact`` spec (default ``auto``); other keys are errors."""
    from .base import parse_spec

    params = dict(parse_spec(spec).params)
    precision = params.pop("precision", "auto")
    if params:
        raise ValueError(f"backend 'exact' takes only 'precision', got {', '.join(map(repr, params))} in {spec!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r} in {spec!r}")
    return precision


class ExactBackend(Backend):
    """Brute-force inner-product search over all rows (``spec = "exact[?precision=auto|fp32|bf16]"``).

    Rows are kept in a growable float32 buffer, or wrap an existing matrix (for example the
    store's memory-mapped descriptors) without a copy via :meth:`from_matrix`. ``precision`` is
    that of the first pass (:func:`exact_search`; the results do not depend on it): ``auto``
    takes ``bf16`` where this machine's bf16 matrix product is at least 1.5x faster than fp32
    (:func:`bf16_speedup`). The bf16 path keeps a bfloat16 copy of the rows (half their size),
    extended at the first search after rows are added.
    """

    supports_remove = True

    def __init__(self, dim: int, *, spec: str = "exact", block_rows: int | None = None):
        positive_int(dim, "dim")
        self.dim = int(dim)
        self.spec = spec
        self.precision = _precision_of(spec)
        self.block_rows = block_rows
        self._x = np.zeros((0, self.dim), np.float32)
        self._ids = np.zeros((0,), np.int64)
        self._alive = np.zeros((0,), bool)
        self._n = 0
        self._id_set: dict[int, int] | None = None
        self._prepared: dict[str, tuple] = {}  # precision -> (rows prepared, prepare_rows(...))
        self._lock = threading.Lock()

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

    def _prepared_rows(self, precision: str, x: np.ndarray):
        """The bfloat16 copy and norm bounds of the current rows, extended by the rows added
        since the last search (rows only ever append; removals only clear ``alive``)."""
        with self._lock:
            n, got = self._prepared.get(precision, (0, (None, _RowStats(0.0, 0.0, 0.0))))
            if n > x.shape[0]:
                n, got = 0, (None, _RowStats(0.0, 0.0, 0.0))
            if n < x.shape[0]:
                xr_new, st_new = prepare_rows(x[n:], precision)
                xr, st = got
                if xr_new is not None:
                    if xr is None or xr.shape[0] < x.shape[0]:  # grow geometrically, as the rows do
                        grown = torch.empty((max(x.shape[0], 2 * n), x.shape[1]), dtype=torch.bfloat16)
                        if n:
                            grown[:n] = xr[:n]
                        xr = grown
                    xr[n:x.shape[0]] = xr_new
                got = (xr, st.merge(st_new))
                self._prepared = {precision: (x.shape[0], got)}
            xr, st = got
            return (None if xr is None else xr[: x.shape[0]]), st

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_rows(q, self.dim, "queries")
        n = self._n
        alive = self._alive[:n]
        x = self._x[:n] if n else np.zeros((0, self.dim), np.float32)
        precision = resolve_precision(self.precision)
        return exact_search(q, x, k, ids=self._ids[:n], alive=None if alive.all() else alive,
                            block_rows=self.block_rows, precision=precision,
                            prepared=self._prepared_rows(precision, x) if n else None)

    def describe(self) -> dict:
        info = super().describe()
        info["precision"] = self.precision
        if self.precision == "auto":
            info["precision_used"] = resolve_precision("auto")
        return info

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
