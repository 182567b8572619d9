"""Hard-example mining as pure functions over descriptors: no model, no images, no I/O.

Two families:

* Dataset-level mining for tuple losses (contrastive, Radenović et al. ECCV 2016 /
  TPAMI 2018): each epoch, :func:`sample_epoch` draws queries, their positives and a
  random pool; the trainer computes descriptors of the queries and the pool with its
  current model (e.g. :func:`imret.extract.extract_descriptors`); then
  :func:`mine_hard_negatives` gives each query its ``k`` most similar pool images from
  other classes (clusters), at most one per class, and :func:`make_tuples` assembles
  ``(query, positive, n_1..n_k)`` rows. :func:`epoch_tuples` does the last two steps.
* In-batch mining for pair and triplet losses: :func:`batch_hard_triplets` (Hermans
  et al. 2017), :func:`margin_triplets` / :func:`semi_hard_triplets` (Schroff et al.
  2015), :func:`hard_pairs`, :func:`all_pairs`, :func:`all_triplets`. They return plain
  index tuples, as pytorch-metric-learning does: ``(a, p, n)`` for triplets and
  ``(a1, p, a2, n)`` for pairs (positive pairs ``(a1, p)``, negative pairs ``(a2, n)``),
  run under ``torch.no_grad`` and check their output.

Descriptors are ``(N, D)`` rows (numpy or torch, any device; similarity is the dot
product, i.e. cosine for the L2-normalised descriptors imret produces). Labels are
``(N,)`` arrays of class / cluster ids (ints, or strings for the dataset-level functions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

__all__ = [
    "EpochSample",
    "mine_hard_negatives",
    "mine_hard_positives",
    "positive_pairs_from_labels",
    "sample_epoch",
    "make_tuples",
    "epoch_tuples",
    "pairwise_distance",
    "all_pairs",
    "all_triplets",
    "batch_hard_triplets",
    "margin_triplets",
    "semi_hard_triplets",
    "hard_pairs",
    "METRICS",
    "TRIPLET_KINDS",
    "INCOMPLETE",
]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

METRICS = ("euclidean", "cosine")
"""Distances for in-batch mining: Euclidean, and cosine distance ``1 - cos``."""

TRIPLET_KINDS = ("semihard", "hard", "violating", "easy")
"""Triplet selections of :func:`margin_triplets`, with ``m = d(a, n) - d(a, p)``:
semihard ``0 < m <= margin``, hard ``m <= 0``, violating ``m <= margin`` (every triplet
with a positive hinge loss, or zero at the boundary), easy ``m > margin``."""

INCOMPLETE = ("drop", "keep", "error")
"""What :func:`make_tuples` does with queries that got fewer than ``k`` negatives."""

_CHUNK_ELEMENTS = 1 << 22  # similarities held at once per chunk of queries in mining


# ------------------------------------------------------------------ dataset-level mining


def mine_hard_negatives(
    q_desc: ArrayLike,
    pool_desc: ArrayLike,
    q_labels: ArrayLike,
    pool_labels: ArrayLike,
    k: int = 5,
    *,
    exclude: Any = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """The ``k`` hardest negatives of each query in a pool, at most one per class.

    For query ``i`` the pool is ranked by similarity ``q_desc[i] @ pool_desc[j]``
    (descending; ties by lower pool index), items of the query's own label and excluded
    items are skipped, and walking the ranking, an item is taken only if no item of its
    label has been taken yet, until ``k`` are taken: cirtorch's selection of negatives
    from distinct clusters (Radenović et al., ECCV 2016), where the query's own cluster
    may hold unlabelled positives. Computed on the descriptors' device, in chunks of
    queries, with exact sorting (no approximation).

    Args:
        q_desc: ``(Q, D)`` query descriptors.
        pool_desc: ``(P, D)`` pool descriptors. The work runs on ``pool_desc``'s device
            when it is a tensor, else on ``q_desc``'s (numpy: CPU), in float32 (float64
            if either input is).
        q_labels: ``(Q,)`` class / cluster of each query.
        pool_labels: ``(P,)`` class / cluster of each pool item.
        k: negatives per query.
        exclude: pool items that may not be a query's negative besides its own label:
            a ``(Q, P)`` bool array / tensor, or a sequence of ``Q`` collections of pool
            indices. ``None``: none.
        chunk_size: queries per chunk; default keeps ~4M similarities per chunk.

    Returns:
        ``(Q, k)`` int64 numpy array of pool indices, most similar first; rows are padded
        with ``-1`` where fewer than ``k`` labels are available.
    """
    k = _check_count("k", k)
    q, pool = _pair_of_matrices(q_desc, pool_desc)
    n_q, n_p = q.shape[0], pool.shape[0]
    q_codes, pool_codes, n_labels = _label_codes(q_labels, pool_labels, n_q, n_p)
    excl = _check_exclude(exclude, n_q, n_p)
    out = np.full((n_q, k), -1, dtype=np.int64)
    if n_q == 0 or n_p == 0 or k == 0:
        return out
    device = pool.device
    q_codes_t = torch.as_tensor(q_codes, device=device)
    pool_codes_t = torch.as_tensor(pool_codes, device=device)
    step = _chunk(chunk_size, n_p)
    kk = min(k, n_labels)
    positions = torch.arange(n_p, device=device)
    for start in range(0, n_q, step):
        stop = min(n_q, start + step)
        sim = q[start:stop] @ pool.T  # (C, P)
        sim.masked_fill_(pool_codes_t[None, :] == q_codes_t[start:stop, None], float("-inf"))
        _apply_exclude(sim, excl, start, stop, float("-inf"))
        ranked, order = torch.sort(sim, dim=1, descending=True, stable=True)
        labels_ranked = pool_codes_t[order]
        rank_or_end = torch.where(ranked > float("-inf"), positions.expand_as(order), n_p)
        # the rank of each label's first (most similar) usable item; n_p where none is
        first = torch.full((stop - start, n_labels), n_p, dtype=torch.long, device=device)
        first.scatter_reduce_(1, labels_ranked, rank_or_end, reduce="amin")
        ranks, _ = torch.topk(first, kk, dim=1, largest=False, sorted=True)
        picked = order.gather(1, ranks.clamp(max=n_p - 1))
        picked[ranks == n_p] = -1
        out[start:stop, :kk] = picked.cpu().numpy()
    return out


def mine_hard_positives(
    q_desc: ArrayLike,
    cand_desc: ArrayLike,
    q_labels: ArrayLike,
    cand_labels: ArrayLike,
    *,
    exclude: Any = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """The hardest (least similar) positive of each query among candidates.

    Candidates with the query's label that are not excluded are positives; the one with
    the lowest similarity is returned (ties: lower index). Exclude the query itself when
    queries are also candidates. On noisy labels (GLDv2) the hardest positive is often
    a mislabelled or non-matching image; verified pairs (SfM-120k) are safer.

    Args:
        q_desc, cand_desc: ``(Q, D)`` and ``(P, D)`` descriptors.
        q_labels, cand_labels: ``(Q,)`` and ``(P,)`` labels.
        exclude: as in :func:`mine_hard_negatives`.
        chunk_size: queries per chunk.

    Returns:
        ``(Q,)`` int64 numpy array of candidate indices, ``-1`` where a query has none.
    """
    q, cand = _pair_of_matrices(q_desc, cand_desc, names=("q_desc", "cand_desc"))
    n_q, n_p = q.shape[0], cand.shape[0]
    q_codes, cand_codes, _ = _label_codes(q_labels, cand_labels, n_q, n_p, names=("q_labels", "cand_labels"))
    excl = _check_exclude(exclude, n_q, n_p)
    out = np.full(n_q, -1, dtype=np.int64)
    if n_q == 0 or n_p == 0:
        return out
    device = cand.device
    q_codes_t = torch.as_tensor(q_codes, device=device)
    cand_codes_t = torch.as_tensor(cand_codes, device=device)
    step = _chunk(chunk_size, n_p)
    for start in range(0, n_q, step):
        stop = min(n_q, start + step)
        sim = q[start:stop] @ cand.T
        sim.masked_fill_(cand_codes_t[None, :] != q_codes_t[start:stop, None], float("inf"))
        _apply_exclude(sim, excl, start, stop, float("inf"))
        low, idx = sim.min(dim=1)  # first index of the minimum
        idx[torch.isinf(low)] = -1
        out[start:stop] = idx.cpu().numpy()
    return out


def positive_pairs_from_labels(labels: ArrayLike) -> np.ndarray:
    """All ordered pairs ``(i, j)``, ``i != j``, of images with the same label.

    Returns:
        ``(M, 2)`` int64 array sorted by ``(i, j)``: the ``(query, positive)`` layout of
        SfM-120k's ``qidxs``/``pidxs`` and of :func:`imret.whitening.fit_learned_whitening`.
        A class of ``n`` images gives ``n (n - 1)`` pairs, so subsample large classes.
    """
    lab = _labels_1d(labels, "labels")
    _, codes = np.unique(lab, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    pairs = []
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        a, b = np.meshgrid(members, members, indexing="ij")
        keep = a != b
        pairs.append(np.stack([a[keep], b[keep]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    out = np.concatenate(pairs).astype(np.int64)
    return out[np.lexsort((out[:, 1], out[:, 0]))]


@dataclass(frozen=True)
class EpochSample:
    """The images of one epoch of tuple training (dataset indices, int64).

    Attributes:
        query_ids: ``(Q,)`` the queries.
        positive_ids: ``(Q,)`` the positive of each query.
        pool_ids: ``(P,)`` the random pool negatives are mined from.
    """

    query_ids: np.ndarray
    positive_ids: np.ndarray
    pool_ids: np.ndarray


def sample_epoch(
    rng: np.random.Generator | int | Sequence[int],
    *,
    num_images: int,
    qsize: int,
    poolsize: int,
    labels: ArrayLike | None = None,
    pairs: ArrayLike | None = None,
) -> EpochSample:
    """Draw the queries, positives and negative pool of one epoch (cirtorch's scheme).

    Positives come from exactly one of:

    * ``pairs``: ``(M, 2)`` matching ``(query, positive)`` pairs (SfM-120k's
      ``qidxs``/``pidxs``); ``min(qsize, M)`` distinct pairs are drawn.
    * ``labels``: ``min(qsize, n)`` distinct queries are drawn among the ``n`` images
      whose class has at least two images, each with a uniformly random other image of
      its class as positive.

    The pool is ``min(poolsize, num_images)`` distinct images drawn uniformly.

    Args:
        rng: a numpy generator, or a seed for one (e.g. ``(seed, epoch)``: every rank of
            a distributed run must pass the same so all see the same tuples).
        num_images: size of the dataset.
        qsize: queries (tuples) per epoch.
        poolsize: images in the negative pool.
        labels: ``(num_images,)`` labels, or ``None``.
        pairs: ``(M, 2)`` int pairs, or ``None``.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    num_images = _check_count("num_images", num_images)
    qsize = _check_count("qsize", qsize)
    poolsize = _check_count("poolsize", poolsize)
    if (labels is None) == (pairs is None):
        raise ValueError("give exactly one source of positives: labels=... or pairs=... (not both, not neither)")
    if pairs is not None:
        pr = _pairs_array(pairs, num_images)
        sel = rng.permutation(len(pr))[: min(qsize, len(pr))]
        query_ids, positive_ids = pr[sel, 0], pr[sel, 1]
    else:
        lab = _labels_1d(labels, "labels")
        if len(lab) != num_images:
            raise ValueError(f"labels has {len(lab)} entries but num_images is {num_images}")
        _, codes, counts = np.unique(lab, return_inverse=True, return_counts=True)
        eligible = np.flatnonzero(counts[codes] >= 2)
        n = min(qsize, len(eligible))
        query_ids = rng.choice(eligible, size=n, replace=False) if n else eligible[:0]
        order = np.argsort(codes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)])
        where = np.empty(num_images, dtype=np.int64)
        where[order] = np.arange(num_images)
        positive_ids = np.empty(n, dtype=np.int64)
        for t, qi in enumerate(query_ids):
            c = codes[qi]
            j = int(rng.integers(counts[c] - 1))  # a member other than the query
            slot = starts[c] + j
            if slot >= where[qi]:
                slot += 1
            positive_ids[t] = order[slot]
    pool_ids = rng.permutation(num_images)[: min(poolsize, num_images)]
    return EpochSample(
        np.asarray(query_ids, dtype=np.int64),
        np.asarray(positive_ids, dtype=np.int64),
        np.asarray(pool_ids, dtype=np.int64),
    )


def make_tuples(
    query_ids: ArrayLike,
    positive_ids: ArrayLike,
    negatives: ArrayLike,
    *,
    pool_ids: ArrayLike | None = None,
    incomplete: str = "drop",
) -> np.ndarray:
    """Rows ``(query, positive, n_1, ..., n_k)`` of dataset indices.

    Args:
        query_ids, positive_ids: ``(Q,)`` dataset indices.
        negatives: ``(Q, k)`` negatives, ``-1`` for missing ones; pool positions when
            ``pool_ids`` is given (as :func:`mine_hard_negatives` returns), else dataset
            indices.
        pool_ids: ``(P,)`` dataset index of each pool position.
        incomplete: rows with a missing negative: ``"drop"`` them, ``"keep"`` them with
            their ``-1`` entries, or raise (``"error"``).

    Returns:
        ``(T, 2 + k)`` int64 array (``T = Q`` unless rows are dropped).
    """
    if incomplete not in INCOMPLETE:
        raise ValueError(f"unknown incomplete={incomplete!r}; available: {', '.join(INCOMPLETE)}")
    q = _int_1d(query_ids, "query_ids")
    p = _int_1d(positive_ids, "positive_ids")
    neg = np.asarray(negatives.cpu() if isinstance(negatives, torch.Tensor) else negatives)
    if neg.ndim == 1 and neg.size == 0:
        neg = neg.reshape(len(q), 0)
    if neg.ndim != 2 or (neg.size and neg.dtype.kind not in "iu"):
        raise ValueError(f"negatives must be a (Q, k) integer array, got shape {neg.shape} dtype {neg.dtype}")
    neg = neg.astype(np.int64)
    if not len(q) == len(p) == len(neg):
        raise ValueError(
            f"query_ids ({len(q)}), positive_ids ({len(p)}) and negatives ({len(neg)}) must have the same length"
        )
    missing = neg < 0
    if pool_ids is not None:
        pool = _int_1d(pool_ids, "pool_ids")
        if neg.size and neg.max() >= len(pool):
            raise ValueError(f"negatives hold pool position {neg.max()} but the pool has {len(pool)} items")
        neg = np.where(missing, -1, pool[np.where(missing, 0, neg)] if len(pool) else -1)
    rows = np.concatenate([q[:, None], p[:, None], neg], axis=1)
    incomplete_rows = missing.any(axis=1)
    if incomplete_rows.any():
        if incomplete == "error":
            first = int(np.flatnonzero(incomplete_rows)[0])
            raise ValueError(
                f"{int(incomplete_rows.sum())} queries have fewer than {neg.shape[1]} negatives "
                f"(first: row {first}, query {q[first]}); use a larger pool, a smaller k, or "
                "incomplete='drop'"
            )
        if incomplete == "drop":
            rows = rows[~incomplete_rows]
    return rows


def epoch_tuples(
    sample: EpochSample,
    q_desc: ArrayLike,
    pool_desc: ArrayLike,
    labels: ArrayLike,
    k: int = 5,
    *,
    incomplete: str = "drop",
    chunk_size: int | None = None,
) -> np.ndarray:
    """Mine the negatives of ``sample`` and return its tuples (cirtorch's epoch tuples).

    Negatives are mined with :func:`mine_hard_negatives` using ``labels`` (classes or
    clusters), never the query or its positive themselves.

    Args:
        sample: from :func:`sample_epoch`.
        q_desc: ``(Q, D)`` descriptors of ``sample.query_ids``, in that order.
        pool_desc: ``(P, D)`` descriptors of ``sample.pool_ids``, in that order.
        labels: ``(N,)`` label of every dataset image.
        k: negatives per tuple; 0 gives ``(query, positive)`` rows.
        incomplete: see :func:`make_tuples`.

    Returns:
        ``(T, 2 + k)`` int64 rows of dataset indices.
    """
    lab = _labels_1d(labels, "labels")
    ids = np.concatenate([sample.query_ids, sample.positive_ids, sample.pool_ids])
    if ids.size and (ids.min() < 0 or ids.max() >= len(lab)):
        raise ValueError(f"sample holds dataset indices outside 0..{len(lab) - 1} (the labels given)")
    where: dict[int, list[int]] = {}
    for pos, i in enumerate(sample.pool_ids.tolist()):
        where.setdefault(i, []).append(pos)
    exclude = [
        where.get(qi, []) + where.get(pi, [])
        for qi, pi in zip(sample.query_ids.tolist(), sample.positive_ids.tolist())
    ]
    neg = mine_hard_negatives(
        q_desc, pool_desc, lab[sample.query_ids], lab[sample.pool_ids], k,
        exclude=exclude, chunk_size=chunk_size,
    )
    return make_tuples(sample.query_ids, sample.positive_ids, neg, pool_ids=sample.pool_ids, incomplete=incomplete)


# ------------------------------------------------------------------------ in-batch mining


def pairwise_distance(x: torch.Tensor, y: torch.Tensor | None = None, *, metric: str = "euclidean") -> torch.Tensor:
    """``(B, M)`` distances between the rows of ``x`` ``(B, D)`` and ``y`` ``(M, D)`` (default ``x``).

    ``"euclidean"``: ``||x_i - y_j||`` (computed from dot products, clamped at 0, with an
    exact 0 on the diagonal when ``y`` is ``x``; differentiable, with gradient 0 where the
    distance is 0); ``"cosine"``: ``1 - cos(x_i, y_j)``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; available: {', '.join(METRICS)}")
    same = y is None
    y = x if y is None else y
    if metric == "cosine":
        xn = torch.nn.functional.normalize(x, dim=1)
        yn = xn if same else torch.nn.functional.normalize(y, dim=1)
        dist = 1 - xn @ yn.T
    else:
        sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * (x @ y.T)
        if same:
            sq = sq.fill_diagonal_(0)
        # sqrt only where positive, so the gradient at 0 is 0 rather than NaN
        positive = sq > 0
        dist = torch.where(positive, sq.where(positive, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
        return dist
    if same:
        dist = dist.fill_diagonal_(0)
    return dist


@torch.no_grad()
def all_pairs(labels: ArrayLike, *, both_orders: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every positive pair ``(a1, p)`` (``a1 != p``, same label) and every negative pair
    ``(a2, n)`` (different labels) of a batch, as index tensors ordered by first index, then
    second. ``both_orders=False`` keeps each unordered pair once (``a1 < p``, ``a2 < n``): the
    pairs a contrastive loss over "every pair of the batch" sums over. The one home of
    all-pairs selection (the losses use it when given labels)."""
    lab = _batch_labels(labels)
    same, diff = _label_masks(lab)
    if not both_orders:
        upper = torch.ones_like(same).triu(1)
        same, diff = same & upper, diff & upper
    a1, p = torch.nonzero(same, as_tuple=True)
    a2, n = torch.nonzero(diff, as_tuple=True)
    _check_pair_output(a1, p, a2, n, lab)
    return a1, p, a2, n


@torch.no_grad()
def all_triplets(labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every triplet ``(a, p, n)`` of a batch: ``a != p`` share a label, ``n`` has another;
    ordered by anchor, then positive, then negative. The one home of all-triplets selection.

    Their number grows as ``B^3`` for a batch of a few classes (use a miner for large
    batches); memory is linear in their number (no ``B^3`` mask).
    """
    lab = _batch_labels(labels)
    same, diff = _label_masks(lab)
    a, p = same.nonzero(as_tuple=True)  # ordered by anchor, then positive
    reps = diff.sum(1)[a]  # one triplet per negative of the anchor
    # each row's negatives first, ascending (a stable sort of "is not a negative")
    neg_order = torch.argsort((~diff).to(torch.int8), dim=1, stable=True)
    a_t, p_t = a.repeat_interleave(reps), p.repeat_interleave(reps)
    starts = torch.cumsum(reps, 0) - reps
    within = torch.arange(a_t.numel(), device=lab.device) - starts.repeat_interleave(reps)
    n_t = neg_order[a_t, within]
    _check_triplet_output(a_t, p_t, n_t, lab)
    return a_t, p_t, n_t


@torch.no_grad()
def batch_hard_triplets(
    embeddings: torch.Tensor, labels: ArrayLike, *, metric: str = "euclidean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One triplet per anchor: its farthest positive and nearest negative (Hermans et al. 2017).

    Anchors without a positive or without a negative in the batch are left out. Ties go
    to the lower index.

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` integer labels.
        metric: see :data:`METRICS`.

    Returns:
        ``(a, p, n)`` int64 tensors on ``embeddings``' device.
    """
    emb, lab = _batch_inputs(embeddings, labels)
    dist = pairwise_distance(emb, metric=metric)
    same, diff = _label_masks(lab)
    pos_d = dist.masked_fill(~same, float("-inf"))
    neg_d = dist.masked_fill(~diff, float("inf"))
    p = pos_d.argmax(dim=1)
    n = neg_d.argmin(dim=1)
    ok = same.any(dim=1) & diff.any(dim=1)
    a = torch.nonzero(ok, as_tuple=True)[0]
    p, n = p[a], n[a]
    _check_triplet_output(a, p, n, lab)
    return a, p, n


@torch.no_grad()
def margin_triplets(
    embeddings: torch.Tensor,
    labels: ArrayLike,
    margin: float,
    *,
    kind: str = "semihard",
    metric: str = "euclidean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All triplets whose distance gap ``m = d(a, n) - d(a, p)`` falls in a band.

    ``kind``: ``"semihard"`` ``0 < m <= margin`` (Schroff et al., FaceNet 2015),
    ``"hard"`` ``m <= 0``, ``"violating"`` ``m <= margin``, ``"easy"`` ``m > margin``
    (pytorch-metric-learning's TripletMarginMiner bands). ``O(B^3)`` memory.

    Returns:
        ``(a, p, n)`` int64 tensors on ``embeddings``' device, in ``(a, p, n)`` order.
    """
    if kind not in TRIPLET_KINDS:
        raise ValueError(f"unknown kind {kind!r}; available: {', '.join(TRIPLET_KINDS)}")
    margin = _check_margin("margin", margin)
    emb, lab = _batch_inputs(embeddings, labels)
    dist = pairwise_distance(emb, metric=metric)
    same, diff = _label_masks(lab)
    gap = dist[:, None, :] - dist[:, :, None]  # [a, p, n] = d(a, n) - d(a, p)
    if kind == "semihard":
        band = (gap > 0) & (gap <= margin)
    elif kind == "hard":
        band = gap <= 0
    elif kind == "violating":
        band = gap <= margin
    else:
        band = gap > margin
    a, p, n = torch.nonzero(band & same[:, :, None] & diff[:, None, :], as_tuple=True)
    _check_triplet_output(a, p, n, lab)
    return a, p, n


def semi_hard_triplets(
    embeddings: torch.Tensor, labels: ArrayLike, margin: float, *, metric: str = "euclidean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semi-hard triplets ``0 < d(a, n) - d(a, p) <= margin``: :func:`margin_triplets` with ``kind="semihard"``."""
    return margin_triplets(embeddings, labels, margin, kind="semihard", metric=metric)


@torch.no_grad()
def hard_pairs(
    embeddings: torch.Tensor,
    labels: ArrayLike,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 0.7,
    metric: str = "euclidean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs that a contrastive loss still penalises.

    Positive pairs (``a1 != p``, same label) farther than ``pos_margin`` and negative
    pairs (different labels) closer than ``neg_margin``: with cirtorch's contrastive loss
    ``0.5 d^2`` for positives and ``0.5 max(0, margin - d)^2`` for negatives, these are
    the pairs with a non-zero loss for ``pos_margin=0`` and ``neg_margin`` = the loss
    margin (0.7 in Radenović et al. for ResNet/VGG GeM).

    Returns:
        ``(a1, p, a2, n)`` int64 tensors on ``embeddings``' device.
    """
    pos_margin = _check_margin("pos_margin", pos_margin)
    neg_margin = _check_margin("neg_margin", neg_margin)
    emb, lab = _batch_inputs(embeddings, labels)
    dist = pairwise_distance(emb, metric=metric)
    same, diff = _label_masks(lab)
    a1, p = torch.nonzero(same & (dist > pos_margin), as_tuple=True)
    a2, n = torch.nonzero(diff & (dist < neg_margin), as_tuple=True)
    _check_pair_output(a1, p, a2, n, lab)
    return a1, p, a2, n


# --------------------------------------------------------------------------------- checks


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_margin(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _as_matrix(x: ArrayLike, name: str) -> torch.Tensor:
    """A 2-D floating tensor (float32 at least) of finite values, on ``x``'s device."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name} must hold numbers, got dtype {t.dtype}")
    if t.dtype != torch.float64:
        t = t.float()
    if t.numel() and not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return t.detach()


def _pair_of_matrices(
    a: ArrayLike, b: ArrayLike, names: tuple[str, str] = ("q_desc", "pool_desc")
) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_matrix(a, names[0]), _as_matrix(b, names[1])
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{names[0]} has dimension {x.shape[1]} but {names[1]} has {y.shape[1]}")
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    device = y.device if isinstance(b, torch.Tensor) else x.device
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def _labels_1d(labels: ArrayLike, name: str) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iuUSO" or (
        arr.dtype.kind == "O" and not all(isinstance(v, (str, int, np.integer)) for v in arr)
    ):
        raise TypeError(f"{name} must hold integer or string labels, got dtype {arr.dtype}")
    return arr


def _int_1d(x: ArrayLike, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64)


def _label_codes(
    q_labels: ArrayLike, pool_labels: ArrayLike, n_q: int, n_p: int,
    names: tuple[str, str] = ("q_labels", "pool_labels"),
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pool labels as codes ``0..L-1``; query labels as the same codes, ``-1`` if absent from the pool."""
    ql, pl = _labels_1d(q_labels, names[0]), _labels_1d(pool_labels, names[1])
    if len(ql) != n_q or len(pl) != n_p:
        raise ValueError(
            f"{names[0]} has {len(ql)} entries for {n_q} descriptors, {names[1]} {len(pl)} for {n_p}"
        )
    if ql.size and pl.size and (ql.dtype.kind in "iu") != (pl.dtype.kind in "iu"):
        raise TypeError(f"{names[0]} ({ql.dtype}) and {names[1]} ({pl.dtype}) must be both integers or both strings")
    uniq, pool_codes = np.unique(pl, return_inverse=True)
    if len(uniq) == 0:
        return np.full(n_q, -1, dtype=np.int64), pool_codes.astype(np.int64), 0
    pos = np.clip(np.searchsorted(uniq, ql), 0, len(uniq) - 1)
    q_codes = np.where(uniq[pos] == ql, pos, -1)
    return q_codes.astype(np.int64), pool_codes.astype(np.int64).reshape(-1), len(uniq)


def _chunk(chunk_size: int | None, n_p: int) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(1, n_p))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


def _check_exclude(exclude: Any, n_q: int, n_p: int) -> Any:
    """``None``, a ``(Q, P)`` bool tensor (CPU), or a list of ``Q`` int64 index arrays."""
    if exclude is None:
        return None
    if isinstance(exclude, torch.Tensor):
        exclude = exclude.detach().cpu().numpy()
    if isinstance(exclude, np.ndarray) and exclude.dtype == np.bool_:
        t = torch.as_tensor(exclude)
        if tuple(t.shape) != (n_q, n_p):
            raise ValueError(f"exclude mask has shape {tuple(t.shape)}, expected (Q, P) = {(n_q, n_p)}")
        return t
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, (Sequence, np.ndarray)):
        raise TypeError("exclude must be a (Q, P) bool mask or a sequence of Q collections of pool indices")
    if len(exclude) != n_q:
        raise ValueError(f"exclude has {len(exclude)} entries, expected one per query ({n_q})")
    lists = []
    for i, items in enumerate(exclude):
        arr = np.asarray(list(items) if not isinstance(items, np.ndarray) else items, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= n_p):
            raise ValueError(f"exclude[{i}] holds pool index outside 0..{n_p - 1}: {arr.tolist()}")
        lists.append(arr)
    return lists


def _apply_exclude(sim: torch.Tensor, excl: Any, start: int, stop: int, value: float) -> None:
    if excl is None:
        return
    if isinstance(excl, torch.Tensor):
        sim.masked_fill_(excl[start:stop].to(sim.device), value)
        return
    rows = [np.full(len(excl[i]), i - start, dtype=np.int64) for i in range(start, stop)]
    cols = [excl[i] for i in range(start, stop)]
    if rows and sum(len(r) for r in rows):
        r = torch.as_tensor(np.concatenate(rows), device=sim.device)
        c = torch.as_tensor(np.concatenate(cols), device=sim.device)
        sim[r, c] = value


def _pairs_array(pairs: ArrayLike, num_images: int) -> np.ndarray:
    arr = pairs.detach().cpu().numpy() if isinstance(pairs, torch.Tensor) else np.asarray(pairs)
    if arr.ndim != 2 or arr.shape[1] != 2 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"pairs must be an (M, 2) integer array of (query, positive), got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_images):
        raise ValueError(f"pairs hold index outside 0..{num_images - 1}")
    return arr


def _batch_labels(labels: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    lab = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-D (B,), got shape {tuple(lab.shape)}")
    if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got dtype {lab.dtype}")
    return lab.to(device=device if device is not None else lab.device, dtype=torch.long)


def _batch_inputs(embeddings: torch.Tensor, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    emb = _as_matrix(embeddings, "embeddings")
    lab = _batch_labels(labels, emb.device)
    if len(lab) != len(emb):
        raise ValueError(f"labels has {len(lab)} entries but embeddings has {len(emb)} rows")
    return emb, lab


def _label_masks(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, B)`` masks: same label and not the same item; different label."""
    eq = lab[:, None] == lab[None, :]
    same = eq.clone()
    same.fill_diagonal_(False)
    return same, ~eq


def _check_triplet_output(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, lab: torch.Tensor) -> None:
    """A miner's triplets must index the batch, pair ``a != p`` of one label with ``n`` of another."""
    b = len(lab)
    if not (a.shape == p.shape == n.shape and a.ndim == 1):
        raise RuntimeError(f"miner output shapes differ: {tuple(a.shape)}, {tuple(p.shape)}, {tuple(n.shape)}")
    if a.numel() == 0:
        return
    idx = torch.stack([a, p, n])
    if idx.min() < 0 or idx.max() >= b:
        raise RuntimeError(f"miner output holds index outside 0..{b - 1}")
    if (a == p).any() or (lab[a] != lab[p]).any() or (lab[a] == lab[n]).any():
        raise RuntimeError("miner output holds an invalid triplet (a == p, label[a] != label[p] or label[a] == label[n])")


def _check_pair_output(
    a1: torch.Tensor, p: torch.Tensor, a2: torch.Tensor, n: torch.Tensor, lab: torch.Tensor
) -> None:
    b = len(lab)
    if a1.shape != p.shape or a2.shape != n.shape:
        raise RuntimeError("miner output: pair index tensors differ in shape")
    for x in (a1, p, a2, n):
        if x.numel() and (x.min() < 0 or x.max() >= b):
            raise RuntimeError(f"miner output holds index outside 0..{b - 1}")
    if a1.numel() and ((a1 == p).any() or (lab[a1] != lab[p]).any()):
        raise RuntimeError("miner output holds an invalid positive pair")
    if a2.numel() and (lab[a2] == lab[n]).any():
        raise RuntimeError("miner output holds an invalid negative pair")
