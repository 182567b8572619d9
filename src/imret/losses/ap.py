"""Listwise loss on the quantised average precision (Revaud et al., ICCV 2019).

Revaud, Almazán, Rezende & de Souza, "Learning with Average Precision: Training Image Retrieval
with a Listwise Loss", ICCV 2019 (naver/deep-image-retrieval). Every image of the batch is a query
against all the others: with L2-normalised descriptors the scores ``s = x_q . x_j`` are cosines in
``[-1, 1]``.

Quantisation. ``M`` bin centres ``b_m = 1 - (m - 1) * delta`` (``m = 1..M``, top bin first),
``delta = 2 / (M - 1)``, and the triangular (linear-interpolation) soft assignment::

    delta_m(s) = max(0, 1 - |s - b_m| / delta)

so each score spreads a unit mass over the two bins around it. Per query, with ``Y`` the
positives (same label, the query itself excluded) and ``R+ = |Y|``::

    c_m  = sum_j delta_m(s_j)              c+_m = sum_{j in Y} delta_m(s_j)
    C_m  = sum_{m' <= m} c_m'              C+_m = sum_{m' <= m} c+_m'
    AP_Q = (1 / R+) sum_m (C+_m / C_m) c+_m          (precision at bin m times recall increment)

Tie-aware variant (``tie_aware=True``). The items of one bin are tied; averaging the AP over all
orders of the ties (the tie-aware AP of He, Cakir, Bargal & Sclaroff, "Hashing as Tie-Aware
Learning to Rank", CVPR 2018; the histogram-binned AP itself is also the one of He, Lu & Sclaroff,
"Local Descriptors Optimized for Average Precision", CVPR 2018; dirtorch ships it as ``TAPLoss``)
gives, bin by bin::

    AP_T = (1 / R+) sum_m (c+_m / c_m) sum_{j=1}^{c_m} (C+_{m-1} + 1 + (j - 1) r_m) / (C_{m-1} + j)
         = (1 / R+) sum_m (c+_m / c_m) [ c_m r_m + (C+_{m-1} + 1 - r_m (C_{m-1} + 1)) (H(C_m) - H(C_{m-1})) ]

with ``r_m = (c+_m - 1) / (c_m - 1)`` (clamped to ``[0, 1]``; the share of the other tied items
that are positive; for a soft count ``c_m < 1``, where it matters only through interpolation,
``r_m = c+_m / c_m``, so that a bin holding only positives keeps a precision of 1) and
``H(t) = digamma(t + 1) + gamma`` the harmonic number. With hard assignments (integer counts)
this is exactly the expected AP under random tie-breaking; with soft counts it is its smooth
extension. dirtorch approximates ``H(C_m) - H(C_{m-1})`` by
``log((C_m + 1) / (C_{m-1} + 1))``; we use the exact digamma difference.

Loss. ``1 - sum_q w_q AP(q) / sum_q w_q`` over the queries that have at least one positive in the
batch; ``w_q`` is 1, or the given ``query_weights``, times ``1 / (number of such queries of q's
class)`` with ``class_balanced=True`` (every class then weighs the same whatever its number of
images in the batch). A batch where no query has a positive gives 0 with a zero gradient.

Defaults: ``M = 20`` bins over ``[-1, 1]``, the score range of the paper's formulation
(dirtorch's public ``APLoss`` class defaults to ``nq=25`` bins over ``[0, 1]``; its training code
is not public). Both variants are opt-in extras: ``tie_aware=False``, ``class_balanced=False``.

Memory. The assignment is computed with two scatter-adds per score (never an ``(N, N, M)`` tensor),
and ``chunk_size`` processes the queries by blocks whose intermediates are recomputed in the
backward pass (activation checkpointing), so memory beyond ``x`` is ``O(chunk_size * N)``. For
N = 4096, D = 2048 in float32 (forward + backward, CPU) we measured a peak of about 0.6 GB beyond
``x`` with ``chunk_size=512`` and 0.9 GB without chunks. The result does not depend on ``chunk_size``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .contrastive import _check_descriptors, _check_labels, _compute_dtype, _no_autocast

__all__ = ["quantized_ap", "ap_per_query", "ap_loss", "APLoss", "bin_centers"]

_TINY = 1e-12


def _check_bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    return bins


def _check_chunk(chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    return chunk_size


def bin_centers(bins: int = 20, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The ``(M,)`` bin centres ``1, 1 - delta, ..., -1`` (top bin first), ``delta = 2 / (M - 1)``."""
    bins = _check_bins(bins)
    return torch.linspace(1.0, -1.0, bins, dtype=dtype, device=device)


def _bin_counts(
    scores: torch.Tensor, relevant: torch.Tensor, keep: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft counts ``c`` (all kept items) and ``c+`` (relevant ones) per bin: two ``(Q, M)`` tensors.

    A score at fractional bin position ``u = (1 - s) / delta`` puts ``1 - frac(u)`` in bin
    ``floor(u)`` and ``frac(u)`` in the next one, which is the triangular kernel.
    """
    delta = 2.0 / (bins - 1)
    u = (1.0 - scores.clamp(-1.0, 1.0)) / delta  # in [0, M - 1]
    # a NaN score must not become an out-of-range index (a device-side assert on CUDA): it maps to
    # bin 0 here and its NaN weight then propagates to the loss
    lo = u.detach().nan_to_num(0.0).floor().clamp_(0, bins - 2).long()
    frac = u - lo.to(u.dtype)  # in [0, 1]
    keep_f = keep.to(u.dtype)
    rel_f = relevant.to(u.dtype)
    to_next = frac * keep_f  # mass going to bin lo + 1
    to_lo = keep_f - to_next
    shape = (scores.shape[0], bins)
    c = u.new_zeros(shape).scatter_add(1, lo, to_lo).scatter_add(1, lo + 1, to_next)
    cp = u.new_zeros(shape).scatter_add(1, lo, to_lo * rel_f).scatter_add(1, lo + 1, to_next * rel_f)
    return c, cp


def _ap_from_counts(c: torch.Tensor, cp: torch.Tensor, n_pos: torch.Tensor, tie_aware: bool) -> torch.Tensor:
    """Per-query AP from the ``(Q, M)`` soft counts; ``n_pos`` is ``R+`` (rows with 0 give 0)."""
    big_c = c.cumsum(1)
    big_cp = cp.cumsum(1)
    if not tie_aware:
        per_bin = big_cp / big_c.clamp_min(_TINY) * cp
    else:
        zero = c.new_zeros(c.shape[0], 1)
        prev_c = torch.cat([zero, big_c[:, :-1]], 1)
        prev_cp = torch.cat([zero, big_cp[:, :-1]], 1)
        # share of the other tied items that are positive: (c+ - 1) / (c - 1) for c > 1; below one item
        # (soft counts only) it is irrelevant at c = 1 and we continue with c+ / c, so that a bin of
        # positives only keeps a precision of exactly 1 (dirtorch uses 0 there)
        ratio_many = (cp - 1.0).clamp_min(0.0) / (c - 1.0).clamp_min(_TINY)
        ratio_few = cp / c.clamp_min(_TINY)
        ratio = torch.where(c > 1.0, ratio_many, ratio_few).clamp(0.0, 1.0)
        harmonic = torch.digamma(big_c + 1.0) - torch.digamma(prev_c + 1.0)  # sum_{j=1}^{c} 1 / (C_{m-1} + j)
        inner = c * ratio + (prev_cp + 1.0 - ratio * (prev_c + 1.0)) * harmonic
        per_bin = cp / c.clamp_min(_TINY) * inner
    return per_bin.sum(1) / n_pos.clamp_min(1).to(c.dtype)


def quantized_ap(
    scores: torch.Tensor, relevant: torch.Tensor, *, bins: int = 20, tie_aware: bool = False
) -> torch.Tensor:
    """Quantised AP of each row of a ``(Q, N)`` score matrix against a ``(Q, N)`` boolean relevance mask.

    Every column takes part in the ranking of its row (exclude a query from its own list
    beforehand). Scores are clamped to ``[-1, 1]``. Rows without a relevant item give NaN.
    Returns ``(Q,)`` in the scores' dtype (at least float32). See the module docstring for the formulas.
    """
    bins = _check_bins(bins)
    if scores.dim() != 2 or relevant.shape != scores.shape:
        raise ValueError(
            f"scores and relevant must be (Q, N) of one shape, got {tuple(scores.shape)} and {tuple(relevant.shape)}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got dtype {scores.dtype}")
    relevant = relevant.to(device=scores.device, dtype=torch.bool)
    with _no_autocast(scores.device):
        s = scores.to(_compute_dtype(scores))
        c, cp = _bin_counts(s, relevant, torch.ones_like(relevant), bins)
        n_pos = relevant.sum(1)
        ap = _ap_from_counts(c, cp, n_pos, tie_aware)
        return torch.where(n_pos > 0, ap, torch.full_like(ap, float("nan")))


def _ap_block(xq: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, bins: int, tie_aware: bool):
    """AP of the query rows ``rows`` (descriptors ``xq``) against the whole batch, themselves excluded."""
    scores = xq @ x.T
    keep = torch.arange(x.shape[0], device=x.device)[None, :] != rows[:, None]
    relevant = (labels[rows][:, None] == labels[None, :]) & keep
    c, cp = _bin_counts(scores, relevant, keep, bins)
    return _ap_from_counts(c, cp, relevant.sum(1), tie_aware)


def _ap_all(x: torch.Tensor, labels: torch.Tensor, bins: int, tie_aware: bool, chunk_size: int | None):
    n = x.shape[0]
    rows_all = torch.arange(n, device=x.device)
    step = max(n, 1) if chunk_size is None else chunk_size
    use_ckpt = step < n and torch.is_grad_enabled() and x.requires_grad
    parts = []
    for start in range(0, n, step):
        rows = rows_all[start : start + step]
        xq = x[start : start + step]
        if use_ckpt:
            parts.append(checkpoint(_ap_block, xq, x, rows, labels, bins, tie_aware, use_reentrant=False))
        else:
            parts.append(_ap_block(xq, x, rows, labels, bins, tie_aware))
    ap = torch.cat(parts) if parts else x.new_zeros(0)
    same = labels[:, None] == labels[None, :]
    has_pos = same.sum(1) > 1  # another item of the query's class
    return ap, has_pos


def _prepare(x: torch.Tensor, labels, bins: int, chunk_size: int | None):
    _check_descriptors(x)
    labels = _check_labels(torch.as_tensor(labels), x.shape[0]).to(x.device)
    return labels, _check_bins(bins), _check_chunk(chunk_size)


def ap_per_query(
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    bins: int = 20,
    tie_aware: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Quantised AP of every row of ``x`` used as a query against the rest of the batch.

    ``x`` is ``(N, D)``, normally L2-normalised; ``labels`` ``(N,)`` integer class ids (positives:
    same label). Returns ``(N,)`` (at least float32); NaN for queries without a positive.
    """
    labels, bins, chunk_size = _prepare(x, labels, bins, chunk_size)
    with _no_autocast(x.device):
        ap, has_pos = _ap_all(x.to(_compute_dtype(x)), labels, bins, tie_aware, chunk_size)
        return torch.where(has_pos, ap, torch.full_like(ap, float("nan")))


def ap_loss(
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    bins: int = 20,
    tie_aware: bool = False,
    class_balanced: bool = False,
    query_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``1 - weighted mean AP`` over the queries of a batch (Revaud et al., ICCV 2019).

    Args:
        x: ``(N, D)`` L2-normalised descriptors; scores are cosines clamped to ``[-1, 1]``.
        labels: ``(N,)`` integer class ids; a query's positives are the other rows of its class.
        bins: number of quantisation bins ``M >= 2`` over ``[-1, 1]`` (default 20).
        tie_aware: use the tie-aware AP (expected AP under random tie-breaking within a bin).
        class_balanced: weight each query by ``1 / (number of queries with a positive in its class)``.
        query_weights: optional ``(N,)`` non-negative weights, multiplied with the above.
        chunk_size: queries per block (``None``: all at once); blocks are recomputed in backward.

    Queries without a positive in the batch are left out; if none is left (or all weights are 0)
    the loss is 0 with a zero gradient. Computed in at least float32 with autocast off.
    """
    labels, bins, chunk_size = _prepare(x, labels, bins, chunk_size)
    n = x.shape[0]
    with _no_autocast(x.device):
        xf = x.to(_compute_dtype(x))
        ap, has_pos = _ap_all(xf, labels, bins, tie_aware, chunk_size)
        w = has_pos.to(xf.dtype)
        if query_weights is not None:
            qw = torch.as_tensor(query_weights, device=x.device)
            if qw.shape != (n,):
                raise ValueError(f"query_weights must have shape ({n},), got {tuple(qw.shape)}")
            qw = qw.to(xf.dtype)
            if not bool(torch.isfinite(qw).all()) or bool((qw < 0).any()):
                raise ValueError("query_weights must be finite and >= 0")
            w = w * qw
        if class_balanced and n > 0:
            _, inverse = torch.unique(labels, return_inverse=True)
            per_class = torch.bincount(inverse, weights=has_pos.to(torch.float64)).to(xf.dtype)
            w = w / per_class[inverse].clamp_min(1.0)
        total = w.sum()
        # no host sync: with every weight 0 the loss is an exact 0 whose gradient is 0
        loss = 1.0 - (w * ap).sum() / total.clamp_min(_TINY)
        return torch.where(total > 0, loss, xf.sum() * 0.0)


class APLoss(nn.Module):
    """Module form of :func:`ap_loss`; ``forward(x, labels, *, query_weights=None)``."""

    def __init__(
        self, bins: int = 20, tie_aware: bool = False, class_balanced: bool = False, chunk_size: int | None = None
    ):
        super().__init__()
        self.bins = _check_bins(bins)
        self.tie_aware = bool(tie_aware)
        self.class_balanced = bool(class_balanced)
        self.chunk_size = _check_chunk(chunk_size)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, *, query_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        return ap_loss(
            x,
            labels,
            bins=self.bins,
            tie_aware=self.tie_aware,
            class_balanced=self.class_balanced,
            query_weights=query_weights,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins}, tie_aware={self.tie_aware}, class_balanced={self.class_balanced}, "
            f"chunk_size={self.chunk_size}"
        )
