"""Metrics of semantic and cross-modal retrieval (Gordo & Larlus, CVPR 2017; Flickr8k protocol).

Two families, both on plain arrays (``(N, D)`` float rows or ``(Q, N)`` score matrices):

**Cross-modal retrieval** (:func:`evaluate_cross_modal`), the Flickr8k convention (Hodosh et
al. 2013; Karpathy & Fei-Fei, CVPR 2015): every caption is a text → image query whose one correct
image is the image it describes; every image is an image → text query, correct when *any* of its
captions is retrieved. Scores are dot products of the L2-normalised rows. The rank of a query is::

    rank = 1 + #{wrong items with score >= the best correct item's score}

(1-based; ties count against the query, so a constant model gets the worst rank, not the
best). Recall@k is the fraction of queries with ``rank <= k``; the median and mean rank are
reported too.

**Semantic image → image retrieval** (:func:`evaluate_semantic`), with graded relevance
``rel(q, d)`` = cosine similarity of the two images' caption tf-idf vectors
(:func:`imret.text.tfidf_similarity`), as in Gordo & Larlus:

* NDCG@k: with the database ranked by decreasing model score (ties broken by lower index),
  ``DCG@k = Σ_{i=1..k} g(rel_i) / log2(i + 1)`` and ``NDCG@k = DCG@k / IDCG@k``, ``IDCG@k`` the DCG
  of the database sorted by decreasing relevance. The gain ``g`` is ``2^rel − 1``
  (``gain="exp"``, the standard form of Burges et al., ICML 2005, default) or ``rel``
  (``gain="linear"``, Järvelin & Kekäläinen 2002). With ``rel`` in ``[0, 1]`` the two are close.
  ``k`` beyond the database size means the whole database.
* PCC@k: per query, Pearson's correlation coefficient between the model's scores and the
  relevance of the model's top ``k`` results; ``pcc_all`` takes the whole database. Averaged
  over queries.

A query whose IDCG is 0 (nothing relevant), or whose scores or relevance are constant over the
PCC window, has no value; it is left out of that mean and counted in the result. ``exclude_self``
drops the query itself from the database (a query image is in the database it searches).

Metrics are fractions in ``[0, 1]`` (PCC in ``[-1, 1]``), as in :mod:`imret.evaluation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ._checks import positive_int

__all__ = [
    "CrossModalResult",
    "SemanticResult",
    "cross_modal_ranks",
    "evaluate_cross_modal",
    "dcg",
    "ndcg_per_query",
    "pcc_per_query",
    "evaluate_semantic",
]

_GAINS = ("exp", "linear")


def _to_numpy(x: Any, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be a numeric array with {ndim} dimensions, got {a.dtype} of shape {a.shape}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite values")
    return a


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = []
    for k in ks:
        out.append(positive_int(k, f"each k (in {list(ks)!r})"))
    if not out:
        raise ValueError("give at least one k")
    return tuple(sorted(set(out)))


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# --- cross-modal retrieval -----------------------------------------------------------------


def cross_modal_ranks(
    image_emb: Any, text_emb: Any, text_image: Sequence[int], *, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of the correct answers: ``(text_to_image (Nt,), image_to_text (Ni,))``.

    Args:
        image_emb: ``(Ni, D)`` image embeddings.
        text_emb: ``(Nt, D)`` caption embeddings.
        text_image: ``(Nt,)`` the image each caption describes (every image needs one).
        block: queries scored at a time (memory ``block × max(Ni, Nt)``).

    See the module docstring for the tie rule.
    """
    img = _to_numpy(image_emb, "image_emb", 2)
    txt = _to_numpy(text_emb, "text_emb", 2)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image and text embeddings differ in size: {img.shape[1]} vs {txt.shape[1]}")
    owner = np.asarray(text_image)
    if owner.shape != (txt.shape[0],) or not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"text_image must be {txt.shape[0]} integer image indices, got {owner.dtype} of shape {owner.shape}")
    ni = img.shape[0]
    if owner.size and (owner.min() < 0 or owner.max() >= ni):
        raise ValueError(f"text_image indices must lie in [0, {ni}), got range [{owner.min()}, {owner.max()}]")
    counts = np.bincount(owner, minlength=ni)
    if ni and counts.min() == 0:
        raise ValueError(f"image {int(np.argmin(counts))} has no caption; every image needs at least one")
    t2i = np.empty(txt.shape[0], dtype=np.int64)
    for s in range(0, txt.shape[0], block):
        sc = txt[s : s + block] @ img.T  # (b, Ni)
        own = owner[s : s + block]
        true = sc[np.arange(len(own)), own]
        wrong = sc >= true[:, None]
        wrong[np.arange(len(own)), own] = False
        t2i[s : s + block] = 1 + wrong.sum(axis=1)
    i2t = np.empty(ni, dtype=np.int64)
    for s in range(0, ni, block):
        sc = img[s : s + block] @ txt.T  # (b, Nt)
        mine = owner[None, :] == np.arange(s, min(s + block, ni))[:, None]
        best = np.where(mine, sc, -np.inf).max(axis=1)
        i2t[s : s + block] = 1 + ((sc >= best[:, None]) & ~mine).sum(axis=1)
    return t2i, i2t


@dataclass(eq=False)
class CrossModalResult:
    """Text → image and image → text retrieval.

    Attributes:
        text_to_image: ``{k: fraction of caption queries whose image is in the top k}``.
        image_to_text: ``{k: fraction of image queries with one of their captions in the top k}``.
        *_median_rank, *_mean_rank: of the 1-based ranks.
        t2i_ranks, i2t_ranks: the ranks per query.
    """

    text_to_image: dict[int, float]
    text_to_image_median_rank: float
    text_to_image_mean_rank: float
    image_to_text: dict[int, float]
    image_to_text_median_rank: float
    image_to_text_mean_rank: float
    num_images: int
    num_texts: int
    t2i_ranks: np.ndarray = field(repr=False)
    i2t_ranks: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_to_image": {int(k): float(v) for k, v in self.text_to_image.items()},
            "text_to_image_median_rank": float(self.text_to_image_median_rank),
            "text_to_image_mean_rank": float(self.text_to_image_mean_rank),
            "image_to_text": {int(k): float(v) for k, v in self.image_to_text.items()},
            "image_to_text_median_rank": float(self.image_to_text_median_rank),
            "image_to_text_mean_rank": float(self.image_to_text_mean_rank),
            "num_images": self.num_images,
            "num_texts": self.num_texts,
        }


def evaluate_cross_modal(
    image_emb: Any, text_emb: Any, text_image: Sequence[int], *, ks: Sequence[int] = (1, 5, 10)
) -> CrossModalResult:
    """Recall@k and median / mean rank both ways (Flickr8k protocol; see the module docstring)."""
    ks = _check_ks(ks)
    t2i, i2t = cross_modal_ranks(image_emb, text_emb, text_image)
    if t2i.size == 0:
        raise ValueError("no caption queries")
    return CrossModalResult(
        {k: float(np.mean(t2i <= k)) for k in ks}, float(np.median(t2i)), float(np.mean(t2i)),
        {k: float(np.mean(i2t <= k)) for k in ks}, float(np.median(i2t)), float(np.mean(i2t)),
        int(i2t.size), int(t2i.size), t2i, i2t,
    )


# --- semantic retrieval: NDCG and PCC ------------------------------------------------------


def _gain(rel: np.ndarray, gain: str) -> np.ndarray:
    if gain == "exp":
        return np.exp2(rel) - 1.0
    return rel


def _check_gain(gain: str) -> str:
    if gain not in _GAINS:
        raise ValueError(f"unknown gain {gain!r}; available: {', '.join(map(repr, _GAINS))}")
    return gain


def dcg(relevance_in_order: Any, k: int, *, gain: str = "exp") -> float:
    """``Σ_{i=1..min(k, n)} g(rel_i) / log2(i + 1)`` of relevances listed in ranked order."""
    rel = _to_numpy(relevance_in_order, "relevance_in_order", 1)[: int(k)]
    return float(np.sum(_gain(rel, _check_gain(gain)) / np.log2(np.arange(2, rel.size + 2))))


def _prepare(scores: Any, relevance: Any, exclude_self: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, scores, relevance)`` with each query's database in model order (self dropped)."""
    s = _to_numpy(scores, "scores", 2)
    r = _to_numpy(relevance, "relevance", 2)
    if s.shape != r.shape:
        raise ValueError(f"scores {s.shape} and relevance {r.shape} must have one shape (queries, database)")
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be True or False, got {exclude_self!r}")
    q, n = s.shape
    if exclude_self:
        if q != n:
            raise ValueError(f"exclude_self needs square (N, N) matrices (queries = database), got {s.shape}")
        keep = ~np.eye(n, dtype=bool)
        s, r = s[keep].reshape(n, n - 1), r[keep].reshape(n, n - 1)
    # decreasing score, ties by lower database index (a stable sort of the negated scores)
    order = np.argsort(-s, axis=1, kind="stable")
    return order, np.take_along_axis(s, order, axis=1), np.take_along_axis(r, order, axis=1)


def ndcg_per_query(
    scores: Any, relevance: Any, k: int, *, exclude_self: bool, gain: str = "exp"
) -> np.ndarray:
    """``(Q,)`` NDCG@k per query (NaN when the ideal DCG is 0). See the module docstring."""
    (k,) = _check_ks([k])
    gain = _check_gain(gain)
    _, _, r_model = _prepare(scores, relevance, exclude_self)
    r_ideal = -np.sort(-r_model, axis=1)
    disc = 1.0 / np.log2(np.arange(2, min(k, r_model.shape[1]) + 2))
    got = (_gain(r_model[:, :k], gain) * disc).sum(axis=1)
    best = (_gain(r_ideal[:, :k], gain) * disc).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(best > 0, got / np.where(best > 0, best, 1.0), np.nan)


def pcc_per_query(scores: Any, relevance: Any, k: int | None, *, exclude_self: bool) -> np.ndarray:
    """``(Q,)`` Pearson correlation between model scores and relevance over each query's model
    top ``k`` (``None``: the whole database); NaN where either is constant or fewer than 2 items."""
    if k is not None:
        (k,) = _check_ks([k])
    _, s, r = _prepare(scores, relevance, exclude_self)
    if k is not None:
        s, r = s[:, :k], r[:, :k]
    if s.shape[1] < 2:
        return np.full(s.shape[0], np.nan)
    sc = s - s.mean(axis=1, keepdims=True)
    rc = r - r.mean(axis=1, keepdims=True)
    num = (sc * rc).sum(axis=1)
    den = np.sqrt((sc * sc).sum(axis=1) * (rc * rc).sum(axis=1))
    # a spread below float rounding of the values counts as constant
    tiny = 1e-12 * (np.abs(s).max(axis=1) + 1.0) * (np.abs(r).max(axis=1) + 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > tiny, num / np.where(den > 0, den, 1.0), np.nan)


@dataclass(eq=False)
class SemanticResult:
    """Semantic retrieval with graded relevance.

    Attributes:
        ndcg: ``{k: mean NDCG@k}`` over queries with some relevance.
        pcc: ``{k: mean PCC@k}`` over queries with a defined correlation in their top ``k``.
        pcc_all: mean per-query PCC over the whole database.
        gain: the NDCG gain, ``"exp"`` (``2^rel − 1``) or ``"linear"`` (``rel``).
        num_queries: queries evaluated.
        skipped_ndcg: queries without a relevant item (ideal DCG 0), per ``k``.
        skipped_pcc: queries with a constant score or relevance window, per ``k`` (``0``: all).
    """

    ndcg: dict[int, float]
    pcc: dict[int, float]
    pcc_all: float
    gain: str
    num_queries: int
    skipped_ndcg: dict[int, int]
    skipped_pcc: dict[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ndcg": {int(k): _nan_to_none(v) for k, v in self.ndcg.items()},
            "pcc": {int(k): _nan_to_none(v) for k, v in self.pcc.items()},
            "pcc_all": _nan_to_none(self.pcc_all),
            "gain": self.gain,
            "num_queries": self.num_queries,
            "skipped_ndcg": {int(k): int(v) for k, v in self.skipped_ndcg.items()},
            "skipped_pcc": {int(k): int(v) for k, v in self.skipped_pcc.items()},
        }


def _mean(x: np.ndarray) -> float:
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def evaluate_semantic(
    scores: Any,
    relevance: Any,
    *,
    exclude_self: bool,
    ks: Sequence[int] = (10, 50, 100),
    gain: str = "exp",
) -> SemanticResult:
    """NDCG@k and PCC@k of a semantic ranking (see the module docstring).

    Args:
        scores: ``(Q, N)`` model similarities (e.g. ``φ_q φ_dᵀ``).
        relevance: ``(Q, N)`` graded relevance (e.g. caption tf-idf cosine similarities).
        exclude_self: drop the diagonal (queries are the database); needs ``Q == N``.
        ks: cut-offs ``k``.
        gain: ``"exp"`` (``2^rel − 1``, default) or ``"linear"``.
    """
    ks = _check_ks(ks)
    gain = _check_gain(gain)
    ndcg, pcc, skip_n, skip_p = {}, {}, {}, {}
    for k in ks:
        v = ndcg_per_query(scores, relevance, k, exclude_self=exclude_self, gain=gain)
        ndcg[k], skip_n[k] = _mean(v), int(np.isnan(v).sum())
        c = pcc_per_query(scores, relevance, k, exclude_self=exclude_self)
        pcc[k], skip_p[k] = _mean(c), int(np.isnan(c).sum())
    c = pcc_per_query(scores, relevance, None, exclude_self=exclude_self)
    skip_p[0] = int(np.isnan(c).sum())
    return SemanticResult(ndcg, pcc, _mean(c), gain, int(c.size), skip_n, skip_p)
