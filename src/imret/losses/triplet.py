"""Triplet margin loss (Schroff et al., FaceNet, CVPR 2015; Gordo et al., IJCV 2017).

For an anchor ``a``, a positive ``p`` (same class) and a negative ``n`` (another class)::

    l(a, p, n) = max(0, margin + d(a, p)^2 - d(a, n)^2)

with ``d`` the Euclidean distance. Gordo et al. ("End-to-end learning of deep visual
representations for image retrieval", IJCV 2017) train R-MAC on L2-normalised descriptors with
squared distances and ``margin=0.1`` (they write the loss with an extra factor 1/2, which only
rescales the learning rate); cnnimageretrieval-pytorch's ``triplet_loss`` uses the same form and
default margin. ``squared=False`` uses plain distances instead.

Triplets come from integer class labels (every valid triplet of the batch, see
:func:`all_triplets`), from explicit index tuples (a miner's output), or from cirtorch-style
training tuples through :func:`tuples_to_triplets`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..mining import all_triplets

from .contrastive import (
    _check_descriptors,
    _check_index,
    _check_labels,
    _check_margin,
    _check_reduction,
    _compute_dtype,
    _dist_from_sq,
    _no_autocast,
    _pair_sq_dist,
    _reduce,
)

__all__ = ["triplet_loss", "TripletLoss", "tuples_to_triplets"]


def tuples_to_triplets(
    num_tuples: int, tuple_size: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triplets of cirtorch training tuples laid out as rows ``[q, p, n_1 .. n_k]`` per tuple.

    One triplet ``(q, p, n_i)`` per negative, as cnnimageretrieval-pytorch's ``triplet_loss``
    builds them. Returns ``(anchor, positive, negative)``.
    """
    if int(num_tuples) < 0 or int(tuple_size) < 3:
        raise ValueError(
            f"need num_tuples >= 0 and tuple_size >= 3 (query, positive, negatives), got {num_tuples}, {tuple_size}"
        )
    num_tuples, tuple_size = int(num_tuples), int(tuple_size)
    k = tuple_size - 2
    starts = torch.arange(num_tuples, device=device) * tuple_size
    anchor = starts.repeat_interleave(k)
    positive = anchor + 1
    negative = (starts[:, None] + torch.arange(2, tuple_size, device=device)[None, :]).reshape(-1)
    return anchor, positive, negative


def _resolve_triplets(x: torch.Tensor, labels, triplets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    if (labels is None) == (triplets is None):
        raise ValueError(
            "give exactly one of labels (all triplets of the batch) or triplets=(anchor, positive, negative)"
        )
    if triplets is None:
        return all_triplets(_check_labels(labels, n).to(x.device))
    if not isinstance(triplets, (tuple, list)) or len(triplets) != 3:
        raise ValueError("triplets must be a tuple (anchor, positive, negative) of index tensors")
    a, p, ng = (_check_index(t, n, nm, x.device) for t, nm in zip(triplets, ("anchor", "positive", "negative")))
    if not (a.numel() == p.numel() == ng.numel()):
        raise ValueError(f"triplet index lengths differ: {a.numel()}, {p.numel()}, {ng.numel()}")
    return a, p, ng


def triplet_loss(
    x: torch.Tensor,
    labels: torch.Tensor | Sequence[int] | None = None,
    *,
    triplets: tuple | None = None,
    margin: float = 0.1,
    squared: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Triplet loss ``max(0, margin + d(a, p)^2 - d(a, n)^2)`` over triplets of rows of ``x``.

    Args:
        x: ``(N, D)`` descriptors, normally L2-normalised.
        labels: ``(N,)`` integer class ids; all valid triplets of the batch (:func:`all_triplets`).
            Mutually exclusive with ``triplets``.
        triplets: ``(anchor, positive, negative)`` index tensors of one length ``T``, e.g. from a
            miner or :func:`tuples_to_triplets`.
        margin: Gordo et al.'s 0.1 (for squared distances between unit vectors).
        squared: compare squared distances (default, Gordo et al. and FaceNet) or plain ones.
        reduction: ``"mean"`` over all triplets (default), ``"sum"`` (cnnimageretrieval-pytorch's
            reduction), ``"mean_nonzero"`` (mean over triplets with a positive loss) or ``"none"``.

    A batch without a valid triplet gives 0 (still attached to the graph). Distances are exact
    differences for small problems and come from the Gram matrix beyond ``2 T D > 2^25`` elements
    (``O(N^2 + T)`` memory then; see ``contrastive._pair_sq_dist``).
    Computed in at least float32 with autocast off; returns that dtype.
    """
    _check_descriptors(x)
    margin = _check_margin(margin)
    reduction = _check_reduction(reduction)
    a, p, ng = _resolve_triplets(x, labels, triplets)
    with _no_autocast(x.device):
        xf = x.to(_compute_dtype(x))
        if a.numel() == 0:
            return _reduce(xf.new_zeros(0), reduction, xf)
        d2 = _pair_sq_dist(xf, torch.cat([a, a]), torch.cat([p, ng]))
        dp, dn = d2[: a.numel()], d2[a.numel() :]
        if not squared:
            dp, dn = _dist_from_sq(dp), _dist_from_sq(dn)
        losses = (margin + dp - dn).clamp_min(0.0)
        return _reduce(losses, reduction, xf)


class TripletLoss(nn.Module):
    """Module form of :func:`triplet_loss`; ``forward(x, labels=None, *, triplets=None)``."""

    def __init__(self, margin: float = 0.1, squared: bool = True, reduction: str = "mean"):
        super().__init__()
        self.margin = _check_margin(margin)
        self.squared = bool(squared)
        self.reduction = _check_reduction(reduction)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, *, triplets: tuple | None = None
    ) -> torch.Tensor:
        return triplet_loss(
            x, labels, triplets=triplets, margin=self.margin, squared=self.squared, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, squared={self.squared}, reduction={self.reduction!r}"
