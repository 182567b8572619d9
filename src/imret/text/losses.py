"""Ranking losses of the joint image–caption embedding (Gordo & Larlus, CVPR 2017).

A triplet ``(q, d⁺, d⁻)`` of a batch has ``d⁺`` more relevant to ``q`` than ``d⁻``, relevance being
the cosine similarity of the images' caption tf-idf vectors
(:func:`imret.text.tfidf_similarity`). With ``φ`` the image embeddings and ``θ`` the caption
embeddings of the batch (``(N, D)``, L2-normalised, row ``i`` of both belonging to image ``i``)::

    L_v  = ½ max(0, m − φ_qᵀφ₊ + φ_qᵀφ₋)     visual ranking loss
    L_t1 = ½ max(0, m − φ_qᵀθ₊ + φ_qᵀθ₋)     image query, caption results
    L_t2 = ½ max(0, m − θ_qᵀφ₊ + θ_qᵀφ₋)     caption query, image results
    L    = w_v L_v + w_t1 L_t1 + w_t2 L_t2

All three are :func:`ranking_loss` ``(queries, results)``: ``L_v = ranking_loss(φ, φ)``,
``L_t1 = ranking_loss(φ, θ)``, ``L_t2 = ranking_loss(θ, φ)``. Scores come from the ``(N, N)``
matrix ``q dᵀ`` and are gathered per triplet (``O(N² D + T)``), so all ``O(N³)`` triplets of a
batch of 100-200 fit in memory.

Triplets and mining (pure functions, no gradients):

* :func:`semantic_triplets`: every ``(a, p, n)`` with ``rel[a, p] > rel[a, n] + min_gap``,
  ``n ≠ a``, ``p ≠ n``, and ``p ≠ a`` unless ``self_positive``. For the cross-modal terms an
  image's own caption is its most relevant text (``rel[a, a] = 1``), so the joint loss allows
  ``p = a`` there (``cross_modal_self=True``): this is the pairing that text → image search needs.
  The visual term is 0 for those triplets (``φ_aᵀφ_a = 1`` carries no ranking information).
* :func:`mine_hard_triplets`: per anchor, the ``per_anchor`` triplets with the largest (weighted,
  total) loss, among those that violate the margin. This is our in-batch reading of the paper's
  hard-triplet selection; ``per_anchor=None`` keeps every valid triplet.

Two readings of the cross-modal terms (``cross_modal``):

* ``"relevance"``: the paper's, literally: ``L_t1`` / ``L_t2`` over the same relevance triplets as
  ``L_v`` (``θ₊``, ``θ₋`` the captions of ``d⁺``, ``d⁻``), mined and averaged with it.
* ``"pairs"`` (the default): ``d⁺`` is the anchor's own item, the most relevant one there is (its
  own caption for ``L_t1``, its own image for ``L_t2``), and every other item of the batch is a
  ``d⁻``; per anchor the hinge terms are *summed* over the negatives and the sums averaged over
  anchors (``cross_margin``, default 0.2)::

      L_t1 = mean_a Σ_{n≠a} ½ max(0, m_x − φ_aᵀθ_a + φ_aᵀθ_n)
      L_t2 = mean_a Σ_{n≠a} ½ max(0, m_x − θ_aᵀφ_a + θ_aᵀφ_n)

  This is what text → image search needs: on Flickr8k dev (frozen EfficientNet-Lite0 trunk) the
  relevance reading leaves text → image R@1 near chance (0.5 %) because the own-caption triplets
  are a vanishing share of the ``O(N³)`` relevance triplets, while ``pairs`` reaches about 19 %.
  ``L_v`` is the same in both readings (relevance triplets, mined, averaged over triplets).

Defaults: ``margin=0.1`` for ``L_v`` (as in Gordo et al.'s instance-level ranking loss, on unit
vectors), ``cross_margin=0.2`` and weights ``(1, 1, 1)``; all are settings to tune on a validation
split (:mod:`imret.train.semantic` uses ``(5, 1, 1)``, chosen on Flickr8k dev).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "semantic_triplets",
    "mine_hard_triplets",
    "ranking_loss",
    "triplet_hinge",
    "joint_ranking_loss",
    "JointLoss",
    "JointRankingLoss",
    "pair_ranking_loss",
    "CROSS_MODAL",
]

_REDUCTIONS = ("mean", "sum", "none")
CROSS_MODAL = ("pairs", "relevance")


def _check_margin(margin: Any) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    return float(margin)


def _check_reduction(reduction: Any) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; available: {', '.join(map(repr, _REDUCTIONS))}")
    return reduction


def _check_embeddings(x: Any, name: str, n: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating (N, D) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected {n}")
    return x


def _check_relevance(relevance: Any, n: int | None = None) -> torch.Tensor:
    rel = torch.as_tensor(np.asarray(relevance) if not isinstance(relevance, torch.Tensor) else relevance)
    if rel.ndim != 2 or rel.shape[0] != rel.shape[1]:
        raise ValueError(f"relevance must be a square (N, N) matrix, got shape {tuple(rel.shape)}")
    if n is not None and rel.shape[0] != n:
        raise ValueError(f"relevance is {tuple(rel.shape)} for a batch of {n}")
    if not rel.is_floating_point():
        rel = rel.double()
    if not torch.isfinite(rel).all():
        raise ValueError("relevance has non-finite values")
    return rel.detach()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@torch.no_grad()
def semantic_triplets(
    relevance: torch.Tensor | np.ndarray,
    *,
    min_gap: float = 0.0,
    self_positive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All triplets ``(a, p, n)`` of a batch with ``rel[a, p] > rel[a, n] + min_gap``.

    Args:
        relevance: ``(N, N)`` semantic relevance (caption tf-idf cosine similarities).
        min_gap: how much more relevant the positive must be (``>= 0``; 0: strictly more).
        self_positive: allow ``p = a`` (the anchor's own caption, for the cross-modal terms).

    Returns:
        ``(anchor, positive, negative)`` int64 tensors on ``relevance``'s device, in
        lexicographic order; ``n ≠ a`` and ``p ≠ n`` always.
    """
    if isinstance(min_gap, bool) or not isinstance(min_gap, (int, float)) or not math.isfinite(min_gap) or min_gap < 0:
        raise ValueError(f"min_gap must be a finite number >= 0, got {min_gap!r}")
    rel = _check_relevance(relevance)
    n = rel.shape[0]
    valid = rel[:, :, None] > rel[:, None, :] + float(min_gap)  # [a, p, n]
    eye = torch.eye(n, dtype=torch.bool, device=rel.device)
    valid &= ~eye[:, None, :]  # n != a
    valid &= ~eye[None, :, :]  # p != n (implied by the strict inequality; kept explicit)
    if not self_positive:
        valid &= ~eye[:, :, None]  # p != a
    a, p, ng = valid.nonzero(as_tuple=True)
    return a, p, ng


@torch.no_grad()
def mine_hard_triplets(losses: torch.Tensor, anchors: torch.Tensor, per_anchor: int) -> torch.Tensor:
    """Indices of the hardest triplets: per anchor, the ``per_anchor`` largest positive losses.

    Args:
        losses: ``(T,)`` per-triplet losses (any values; only ``> 0`` ones can be chosen).
        anchors: ``(T,)`` the anchor of each triplet.
        per_anchor: how many triplets to keep per anchor at most.

    Returns:
        ``(K,)`` int64 indices into the triplets, ascending. Equal losses are broken by the lower
        triplet index.
    """
    if isinstance(per_anchor, bool) or not isinstance(per_anchor, (int, np.integer)) or per_anchor < 1:
        raise ValueError(f"per_anchor must be a positive integer, got {per_anchor!r}")
    if losses.ndim != 1 or anchors.shape != losses.shape:
        raise ValueError(f"losses and anchors must be (T,) tensors of one length, got {tuple(losses.shape)} and {tuple(anchors.shape)}")
    t = losses.numel()
    if t == 0:
        return torch.zeros(0, dtype=torch.long, device=losses.device)
    if not anchors.is_floating_point() and bool((anchors[1:] >= anchors[:-1]).all()) and int(anchors[0]) >= 0:
        return _mine_grouped(losses.detach(), anchors.long(), int(per_anchor))
    by_loss = torch.sort(-losses.detach(), stable=True).indices  # largest loss first, ties by index
    order = by_loss[torch.sort(anchors[by_loss], stable=True).indices]  # grouped by anchor
    grouped = anchors[order]
    starts = torch.ones(t, dtype=torch.bool, device=losses.device)
    starts[1:] = grouped[1:] != grouped[:-1]
    pos = torch.arange(t, device=losses.device)
    group_start = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=0).values
    rank = pos - group_start
    keep = order[(rank < int(per_anchor)) & (losses.detach()[order] > 0)]
    return torch.sort(keep).values


def _mine_grouped(losses: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`mine_hard_triplets` for triplets grouped by anchor (``anchors`` non-decreasing, the
    order of :func:`semantic_triplets`): the same selection without sorting, in ``O(T)``.

    Each anchor's losses go into a row of a padded ``(A, L)`` matrix in triplet order; the
    ``k``-th largest value ``v`` of a row (``topk``) splits it: every loss above ``v`` is kept, and
    of those equal to ``v`` the first ones (lowest triplet index) up to ``k``.
    """
    t = losses.numel()
    dev = losses.device
    counts = torch.bincount(anchors)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(t, device=dev) - starts[anchors]
    width = int(counts.max())
    neg_inf = torch.tensor(float("-inf"), dtype=losses.dtype, device=dev)
    dense = torch.full((counts.numel(), width), float("-inf"), dtype=losses.dtype, device=dev)
    dense[anchors, pos] = torch.where(losses > 0, losses, neg_inf)  # only violating triplets can be chosen
    kk = min(k, width)
    kth = torch.topk(dense, kk, dim=1).values[:, -1:]  # (A, 1)
    above = dense > kth
    equal = (dense == kth) & (dense > float("-inf"))
    need = kk - above.sum(dim=1, keepdim=True)
    keep = above | (equal & (torch.cumsum(equal.long(), dim=1) <= need))
    return torch.sort(keep[anchors, pos].nonzero().flatten()).values


def triplet_hinge(scores: torch.Tensor, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float) -> torch.Tensor:
    """``½ max(0, m − S[a, p] + S[a, n])`` per triplet from an ``(N, N)`` score matrix."""
    return 0.5 * (margin - scores[a, p] + scores[a, n]).clamp_min(0.0)


def _check_triplets(triplets: Any, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(triplets, (tuple, list)) or len(triplets) != 3:
        raise ValueError("triplets must be a tuple (anchor, positive, negative) of index tensors")
    out = []
    for t, name in zip(triplets, ("anchor", "positive", "negative")):
        t = torch.as_tensor(t, device=device)
        if t.ndim != 1 or t.dtype in (torch.bool,) or t.is_floating_point():
            raise ValueError(f"{name} indices must be a 1-D integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
        t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"{name} indices must lie in [0, {n}), got range [{int(t.min())}, {int(t.max())}]")
        out.append(t)
    if not (out[0].numel() == out[1].numel() == out[2].numel()):
        raise ValueError(f"triplet index lengths differ: {out[0].numel()}, {out[1].numel()}, {out[2].numel()}")
    return out[0], out[1], out[2]


def _reduce(losses: torch.Tensor, reduction: str, like: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return losses
    if losses.numel() == 0:
        return like.sum() * 0.0  # 0, still attached to the graph
    return losses.mean() if reduction == "mean" else losses.sum()


def ranking_loss(
    queries: torch.Tensor,
    results: torch.Tensor,
    triplets: tuple,
    *,
    margin: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """``½ max(0, m − q_aᵀ r_p + q_aᵀ r_n)`` over triplets ``(a, p, n)`` of batch indices.

    Args:
        queries: ``(N, D)`` query-side embeddings (``φ`` for ``L_v`` and ``L_t1``, ``θ`` for ``L_t2``).
        results: ``(N, D)`` result-side embeddings (``φ`` for ``L_v`` and ``L_t2``, ``θ`` for ``L_t1``).
        triplets: ``(anchor, positive, negative)`` index tensors of one length ``T``.
        margin: ``m``.
        reduction: ``"mean"`` over triplets, ``"sum"``, or ``"none"`` (``(T,)``).

    No triplet gives 0, still attached to the graph. Computed in at least float32, autocast off.
    """
    _check_embeddings(queries, "queries")
    _check_embeddings(results, "results", queries.shape[0])
    margin, reduction = _check_margin(margin), _check_reduction(reduction)
    a, p, n = _check_triplets(triplets, queries.shape[0], queries.device)
    with _no_autocast(queries.device):
        dt = _compute_dtype(queries)
        q, r = queries.to(dt), results.to(dt)
        if a.numel() == 0:
            return _reduce(q.new_zeros(0), reduction, q + r.sum() * 0)
        return _reduce(triplet_hinge(q @ r.T, a, p, n, margin), reduction, q)


def pair_ranking_loss(
    queries: torch.Tensor,
    results: torch.Tensor,
    *,
    margin: float = 0.2,
    reduction: str = "mean",
) -> torch.Tensor:
    """Matching-pair ranking loss: row ``a`` of ``results`` is the positive of query ``a``, every
    other row a negative; per query ``Σ_{n≠a} ½ max(0, m − q_aᵀr_a + q_aᵀr_n)``.

    Args:
        queries: ``(N, D)`` (``φ`` for ``L_t1``, ``θ`` for ``L_t2``).
        results: ``(N, D)`` (``θ`` for ``L_t1``, ``φ`` for ``L_t2``).
        margin: ``m``.
        reduction: ``"mean"`` of the per-query sums, ``"sum"``, or ``"none"`` (``(N,)``).

    Computed in at least float32, autocast off. One row gives 0 (no negative).
    """
    _check_embeddings(queries, "queries")
    _check_embeddings(results, "results", queries.shape[0])
    margin, reduction = _check_margin(margin), _check_reduction(reduction)
    with _no_autocast(queries.device):
        dt = _compute_dtype(queries)
        q, r = queries.to(dt), results.to(dt)
        s = q @ r.T
        pos = s.diagonal()[:, None]
        eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        per_query = (0.5 * (margin - pos + s).clamp_min(0.0)).masked_fill(eye, 0.0).sum(dim=1)
        return _reduce(per_query, reduction, q + r.sum() * 0)


class JointLoss(NamedTuple):
    """The joint loss and its parts, reduced over the same triplets:
    ``total = w_v · visual + w_t1 · image_text + w_t2 · text_image``."""

    total: torch.Tensor
    visual: torch.Tensor  # L_v
    image_text: torch.Tensor  # L_t1: image query, caption results
    text_image: torch.Tensor  # L_t2: caption query, image results
    num_triplets: int


def _check_weights(weights: Any) -> tuple[float, float, float]:
    if not isinstance(weights, (tuple, list)) or len(weights) != 3:
        raise ValueError(f"weights must be three numbers (w_v, w_t1, w_t2), got {weights!r}")
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights must be finite numbers >= 0 (w_v, w_t1, w_t2), got {weights!r}")
        out.append(float(w))
    if sum(out) == 0:
        raise ValueError(f"weights must hold at least one positive number, got {weights!r}")
    return out[0], out[1], out[2]


class JointOptions(NamedTuple):
    """The validated settings of :func:`joint_ranking_loss` (see :func:`check_joint_options`)."""

    margin: float
    weights: tuple[float, float, float]
    min_gap: float
    per_anchor: int | None
    reduction: str
    cross_modal: str
    cross_margin: float | None


def check_joint_options(
    *,
    margin: Any = 0.1,
    weights: Any = (1.0, 1.0, 1.0),
    min_gap: Any = 0.0,
    per_anchor: Any = None,
    reduction: Any = "mean",
    cross_modal: Any = "pairs",
    cross_margin: Any = 0.2,
) -> JointOptions:
    """Validate the settings of the joint loss once, for the function, the module and the trainer's config.

    Raises ``ValueError`` whose message starts with the setting's name, then the bad value and the
    valid choices.
    """
    margin = _check_margin(margin)
    w = _check_weights(weights)
    if isinstance(min_gap, bool) or not isinstance(min_gap, (int, float)) or not math.isfinite(min_gap) or min_gap < 0:
        raise ValueError(f"min_gap must be a finite number >= 0, got {min_gap!r}")
    if per_anchor is not None and (isinstance(per_anchor, bool) or not isinstance(per_anchor, int) or per_anchor < 1):
        raise ValueError(f"per_anchor must be a positive integer or None, got {per_anchor!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r} is unknown; available: 'mean', 'sum'")
    if cross_modal not in CROSS_MODAL:
        raise ValueError(f"cross_modal {cross_modal!r} is unknown; available: {', '.join(map(repr, CROSS_MODAL))}")
    if cross_margin is not None:
        try:
            cross_margin = _check_margin(cross_margin)
        except ValueError:
            raise ValueError(f"cross_margin must be a finite number >= 0 or None, got {cross_margin!r}") from None
    return JointOptions(margin, w, float(min_gap), per_anchor, reduction, cross_modal, cross_margin)


def joint_ranking_loss(
    phi: torch.Tensor,
    theta: torch.Tensor | None,
    relevance: torch.Tensor | np.ndarray,
    *,
    margin: float = 0.1,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    min_gap: float = 0.0,
    per_anchor: int | None = None,
    cross_modal_self: bool = True,
    reduction: str = "mean",
    cross_modal: str = "pairs",
    cross_margin: float | None = 0.2,
) -> JointLoss:
    """Gordo & Larlus's ``w_v L_v + w_t1 L_t1 + w_t2 L_t2`` over the triplets of a batch.

    Args:
        phi: ``(N, D)`` image embeddings, L2-normalised.
        theta: ``(N, D)`` caption embeddings of the same images (row ``i`` describes image ``i``),
            L2-normalised; ``None`` for the visual-only model (then ``w_t1 = w_t2 = 0`` required).
        relevance: ``(N, N)`` caption tf-idf similarity between the batch's images.
        margin: ``m``.
        weights: ``(w_v, w_t1, w_t2)``.
        min_gap: see :func:`semantic_triplets`.
        per_anchor: keep, per anchor, the hardest ``per_anchor`` violating triplets by total
            loss (:func:`mine_hard_triplets`); ``None`` keeps all valid triplets.
        cross_modal_self: let an image's own caption be a positive of the cross-modal terms
            (the visual term is 0 for those triplets). Only with ``cross_modal="relevance"``;
            ignored for the visual-only model.
        reduction: ``"mean"`` over the kept triplets (``"pairs"``: ``L_t1``/``L_t2`` averaged
            over anchors) or ``"sum"``.
        cross_modal: ``"pairs"`` or ``"relevance"`` (see the module docstring).
        cross_margin: margin of ``L_t1``/``L_t2`` with ``"pairs"`` (``None``: ``margin``).

    Returns:
        :class:`JointLoss`; with no triplet every part is 0 (attached to the graph).
    """
    _check_embeddings(phi, "phi")
    n = phi.shape[0]
    wv, w1, w2 = _check_weights(weights)
    if theta is None:
        if w1 or w2:
            raise ValueError(f"theta is None (visual-only) but the cross-modal weights are {w1}, {w2}; set them to 0")
    else:
        _check_embeddings(theta, "theta", n)
    o = check_joint_options(margin=margin, weights=weights, min_gap=min_gap, per_anchor=per_anchor,
                            reduction=reduction, cross_modal=cross_modal, cross_margin=cross_margin)
    margin, min_gap, per_anchor = o.margin, o.min_gap, o.per_anchor
    xmargin = margin if o.cross_margin is None else o.cross_margin
    rel = _check_relevance(relevance, n).to(phi.device)
    cross = theta is not None and (w1 > 0 or w2 > 0)
    if cross_modal == "pairs":
        vis = joint_ranking_loss(phi, None, rel, margin=margin, weights=(1.0, 0.0, 0.0), min_gap=min_gap,
                                 per_anchor=per_anchor, reduction=reduction, cross_modal="relevance") if wv > 0 else None
        like = phi if theta is None else phi + theta.sum() * 0
        zero = like.sum() * 0.0
        lv = vis.visual if vis is not None else zero
        l1 = pair_ranking_loss(phi, theta, margin=xmargin, reduction=reduction) if theta is not None and w1 > 0 else zero
        l2 = pair_ranking_loss(theta, phi, margin=xmargin, reduction=reduction) if theta is not None and w2 > 0 else zero
        count = (vis.num_triplets if vis is not None else 0) + (n * (n - 1) * ((w1 > 0) + (w2 > 0)) if cross else 0)
        return JointLoss(wv * lv + w1 * l1 + w2 * l2, lv, l1, l2, int(count))
    a, p, ng = semantic_triplets(rel, min_gap=min_gap, self_positive=bool(cross_modal_self) and cross)
    with _no_autocast(phi.device):
        dt = _compute_dtype(phi)
        f = phi.to(dt)
        t = theta.to(dt) if theta is not None else None

        def parts(a, p, ng):
            zero = f.new_zeros(a.numel())
            lv = triplet_hinge(f @ f.T, a, p, ng, margin) * (p != a) if wv > 0 else zero
            l1 = triplet_hinge(f @ t.T, a, p, ng, margin) if w1 > 0 else zero
            l2 = triplet_hinge(t @ f.T, a, p, ng, margin) if w2 > 0 else zero
            return wv * lv + w1 * l1 + w2 * l2, lv, l1, l2

        if per_anchor is not None:
            # mine on values without a graph, then differentiate only the kept triplets (same numbers)
            with torch.no_grad():
                keep = mine_hard_triplets(parts(a, p, ng)[0], a, per_anchor)
            a, p, ng = a[keep], p[keep], ng[keep]
        total, lv, l1, l2 = parts(a, p, ng)
        like = f if t is None else f + t.sum() * 0
        red = [_reduce(x, reduction, like) for x in (total, lv, l1, l2)]
    return JointLoss(red[0], red[1], red[2], red[3], int(total.numel()))


class JointRankingLoss(nn.Module):
    """Module form of :func:`joint_ranking_loss`: ``forward(phi, theta, relevance) -> JointLoss``."""

    def __init__(
        self,
        margin: float = 0.1,
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        *,
        min_gap: float = 0.0,
        per_anchor: int | None = None,
        cross_modal_self: bool = True,
        reduction: str = "mean",
        cross_modal: str = "pairs",
        cross_margin: float | None = 0.2,
    ):
        super().__init__()
        o = check_joint_options(margin=margin, weights=weights, min_gap=min_gap, per_anchor=per_anchor,
                                reduction=reduction, cross_modal=cross_modal, cross_margin=cross_margin)
        self.margin, self.weights, self.min_gap, self.per_anchor = o.margin, o.weights, o.min_gap, o.per_anchor
        self.reduction, self.cross_modal, self.cross_margin = o.reduction, o.cross_modal, o.cross_margin
        self.cross_modal_self = bool(cross_modal_self)

    def forward(self, phi: torch.Tensor, theta: torch.Tensor | None, relevance: torch.Tensor | np.ndarray) -> JointLoss:
        return joint_ranking_loss(
            phi, theta, relevance, margin=self.margin, weights=self.weights, min_gap=self.min_gap,
            per_anchor=self.per_anchor, cross_modal_self=self.cross_modal_self, reduction=self.reduction,
            cross_modal=self.cross_modal, cross_margin=self.cross_margin,
        )

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, weights={self.weights}, min_gap={self.min_gap}, "
                f"per_anchor={self.per_anchor}, cross_modal_self={self.cross_modal_self}, reduction={self.reduction!r}, "
                f"cross_modal={self.cross_modal!r}, cross_margin={self.cross_margin}")
