"""Contrastive loss on pairs of descriptors (Hadsell et al., CVPR 2006; Radenović et al., TPAMI 2018).

For a pair ``(i, j)`` at Euclidean distance ``d = ||x_i - x_j||`` with ``y = 1`` for a matching
pair and ``y = 0`` for a non-matching one::

    l(i, j) = y * 0.5 * d^2 + (1 - y) * 0.5 * max(0, margin - d)^2

This is the form the GeM paper trains with (Radenović, Tolias & Chum, "Fine-tuning CNN image
retrieval with no human annotation", TPAMI 2018); cnnimageretrieval-pytorch defaults to
``margin=0.7`` (``--loss-margin`` of its ``train.py``), and its ResNet-101 GeM runs use 0.85 (the
``contrastive_m0.85`` of their experiment names).
Margins assume L2-normalised descriptors (distances in ``[0, 2]``).

The pairs come from integer class labels (every unordered pair of the batch), from explicit
index tuples (e.g. a miner's output), or from cirtorch-style training tuples through
:func:`tuples_to_pairs`.

This module also holds the small helpers the other losses share (input checks, reductions,
float32 computation under autocast).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
from torch import nn

from ..mining import all_pairs

__all__ = ["contrastive_loss", "ContrastiveLoss", "tuples_to_pairs"]

REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")


# ----------------------------------------------------------------------------- shared helpers


def _check_descriptors(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (N,), got shape {tuple(labels.shape)}")
    if labels.numel() != n:
        raise ValueError(f"labels has {labels.numel()} entries but x has N={n} rows")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
    return labels


def _check_index(idx, n: int, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(idx, device=device)
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D index tensor, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer indices, got dtype {t.dtype}")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"{name} has indices outside [0, {n}) (min {int(t.min())}, max {int(t.max())})")
    return t


def _check_margin(margin: float, name: str = "margin") -> float:
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {margin}")
    return margin


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; available: {', '.join(REDUCTIONS)}")
    return reduction


def _reduce(losses: torch.Tensor, reduction: str, anchor: torch.Tensor) -> torch.Tensor:
    """Reduce per-item losses; an empty set gives an exact 0 still connected to ``anchor``'s graph."""
    if reduction == "none":
        return losses
    zero = anchor.sum() * 0.0
    if losses.numel() == 0:
        return zero
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    nonzero = losses > 0  # mean_nonzero
    if not bool(nonzero.any()):
        return losses.sum() * 0.0
    return losses.sum() / nonzero.sum()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Losses are computed in at least float32 (half-precision inputs are upcast)."""
    return torch.promote_types(x.dtype, torch.float32)


def _no_autocast(device: torch.device):
    """A context that switches autocast off on ``device`` so the loss runs in the input precision."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast support
        return contextlib.nullcontext()


# Above this many elements (index pairs x D) squared distances come from the Gram matrix instead of
# explicit differences, to keep memory O(N^2 + pairs) rather than O(pairs x D).
_EXACT_BUDGET = 1 << 25


def _pair_sq_dist(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``||x_i - x_j||^2`` for index vectors ``i, j``.

    Exact differences when ``len(i) * D`` is within :data:`_EXACT_BUDGET`; otherwise
    ``|x_i|^2 + |x_j|^2 - 2 x_i . x_j`` from the Gram matrix (as ``torch.cdist`` does for large
    inputs), clamped at 0, whose rounding (about 1e-7 on ``d^2`` in float32) only matters for
    near-duplicate descriptors.
    """
    if i.numel() * x.shape[1] <= _EXACT_BUDGET:
        return (x[i] - x[j]).pow(2).sum(-1)
    sq = x.pow(2).sum(1)
    gram = x @ x.T
    return (sq[i] + sq[j] - 2.0 * gram[i, j]).clamp_min(0.0)


def _dist_from_sq(d2: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``sqrt(d2)`` with a finite gradient at 0 (distances below ``sqrt(eps)`` get zero gradient)."""
    return d2.clamp_min(eps).sqrt()


# ----------------------------------------------------------------------------- pairs


def tuples_to_pairs(
    num_tuples: int, tuple_size: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs of cirtorch training tuples laid out as rows ``[q, p, n_1 .. n_k]`` per tuple.

    The descriptor matrix holds ``num_tuples`` consecutive blocks of ``tuple_size`` rows: the
    query, its positive, then ``tuple_size - 2`` negatives. Each query is paired with every other
    row of its block (one positive pair and ``tuple_size - 2`` negative pairs), as
    cnnimageretrieval-pytorch's ``ContrastiveLoss`` does. Returns ``(anchor, other, is_positive)``.
    """
    if int(num_tuples) < 0 or int(tuple_size) < 2:
        raise ValueError(
            f"need num_tuples >= 0 and tuple_size >= 2 (query, positive, ...), got {num_tuples}, {tuple_size}"
        )
    num_tuples, tuple_size = int(num_tuples), int(tuple_size)
    starts = torch.arange(num_tuples, device=device) * tuple_size
    offsets = torch.arange(1, tuple_size, device=device)
    anchor = starts.repeat_interleave(tuple_size - 1)
    other = (starts[:, None] + offsets[None, :]).reshape(-1)
    is_positive = (offsets == 1).repeat(num_tuples)
    return anchor, other, is_positive


def _resolve_pairs(x: torch.Tensor, labels, pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    if (labels is None) == (pairs is None):
        raise ValueError("give exactly one of labels (all pairs of the batch) or pairs=(i, j, is_positive)")
    if pairs is None:  # every unordered pair of the batch, selected where all selections live
        pairs = all_pairs(_check_labels(labels, n).to(x.device), both_orders=False)
    if not isinstance(pairs, (tuple, list)) or len(pairs) not in (3, 4):
        raise ValueError(
            "pairs must be (anchor, other, is_positive) or a miner's (anchor_p, positive, anchor_n, negative)"
        )
    if len(pairs) == 4:
        names = ("anchor_p", "positive", "anchor_n", "negative")
        a1, p, a2, ng = (_check_index(t, n, nm, x.device) for t, nm in zip(pairs, names))
        if a1.numel() != p.numel() or a2.numel() != ng.numel():
            raise ValueError(
                f"pair index lengths differ: {a1.numel()}/{p.numel()} positives, {a2.numel()}/{ng.numel()} negatives"
            )
        y = torch.cat([torch.ones_like(a1, dtype=torch.bool), torch.zeros_like(a2, dtype=torch.bool)])
        return torch.cat([a1, a2]), torch.cat([p, ng]), y
    i = _check_index(pairs[0], n, "anchor", x.device)
    j = _check_index(pairs[1], n, "other", x.device)
    y = torch.as_tensor(pairs[2], device=x.device)
    if not (i.numel() == j.numel() == y.numel()) or y.dim() != 1:
        raise ValueError(
            f"pairs must be three 1-D tensors of one length, got {i.numel()}, {j.numel()}, {tuple(y.shape)}"
        )
    if y.dtype != torch.bool:
        if y.is_floating_point() or bool(((y != 0) & (y != 1)).any()):
            raise ValueError("is_positive must be boolean or 0/1")
        y = y.bool()
    return i, j, y


def contrastive_loss(
    x: torch.Tensor,
    labels: torch.Tensor | Sequence[int] | None = None,
    *,
    pairs: tuple | None = None,
    margin: float = 0.7,
    reduction: str = "mean",
) -> torch.Tensor:
    """Contrastive loss ``y d^2 / 2 + (1 - y) max(0, margin - d)^2 / 2`` over pairs of rows of ``x``.

    Args:
        x: ``(N, D)`` descriptors, normally L2-normalised.
        labels: ``(N,)`` integer class ids; every unordered pair ``i < j`` is used, positive when
            the labels are equal. Mutually exclusive with ``pairs``.
        pairs: explicit pairs, either ``(anchor, other, is_positive)`` (three ``(P,)`` tensors) or a
            miner's ``(anchor_p, positive, anchor_n, negative)``; see also :func:`tuples_to_pairs`.
        margin: negatives closer than this are pushed apart (cirtorch's default 0.7).
        reduction: ``"mean"`` over all pairs (default), ``"sum"`` (cnnimageretrieval-pytorch's
            reduction: the loss of a training tuple is the sum over its pairs), ``"mean_nonzero"``
            (mean over pairs with a positive loss) or ``"none"`` (the ``(P,)`` per-pair losses).

    A batch without pairs gives 0 (still attached to the graph, so ``backward`` works).
    Distances are exact differences up to ``P * D = 2^25`` elements, beyond that they come from
    the Gram matrix (``O(N^2 + P)`` memory; see :func:`_pair_sq_dist`).
    Computed in at least float32 with autocast off; returns that dtype.
    """
    _check_descriptors(x)
    margin = _check_margin(margin)
    reduction = _check_reduction(reduction)
    i, j, y = _resolve_pairs(x, labels, pairs)
    with _no_autocast(x.device):
        xf = x.to(_compute_dtype(x))
        d2 = _pair_sq_dist(xf, i, j)
        neg = (margin - _dist_from_sq(d2)).clamp_min(0.0).pow(2)
        losses = 0.5 * torch.where(y, d2, neg)
        return _reduce(losses, reduction, xf)


class ContrastiveLoss(nn.Module):
    """Module form of :func:`contrastive_loss`; ``forward(x, labels=None, *, pairs=None)``."""

    def __init__(self, margin: float = 0.7, reduction: str = "mean"):
        super().__init__()
        self.margin = _check_margin(margin)
        self.reduction = _check_reduction(reduction)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, *, pairs: tuple | None = None
    ) -> torch.Tensor:
        return contrastive_loss(x, labels, pairs=pairs, margin=self.margin, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"
