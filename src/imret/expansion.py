"""Query expansion and database augmentation over L2-normalised descriptors.

All functions take ``(N, D)`` float32 rows (NumPy arrays, or anything ``np.asarray``
accepts), L2-normalise them (a no-op for descriptors out of the model), and return new
L2-normalised ``(N, D)`` float32 rows. Similarities are dot products (cosines).

Each row ``q`` is replaced by ``normalise(q + Σ_{j in N_k(q)} w_j db_j)`` where ``N_k(q)`` is
the set of the ``k`` database rows most similar to ``q`` and ``w_j = max(s_j, 0)^alpha``
with ``s_j = qᵀ db_j``; the row itself always has weight 1 (its similarity to itself is 1).

- AQE, average query expansion (Chum et al., "Total Recall", ICCV 2007): ``w_j = 1``, i.e.
  the mean of the query and its top ``k`` neighbours, re-normalised.
- αQE, α-weighted query expansion (Radenović, Tolias & Chum, TPAMI 2018):
  ``w_j = max(s_j, 0)^alpha``. ``alpha = 0`` is AQE (numpy's ``0**0 == 1``, so negative
  similarities also get weight 1 then, exactly as in AQE).
- αDBA, α-weighted database-side augmentation (Arandjelović & Zisserman, "Three things
  everyone should know to improve object retrieval", CVPR 2012; α-weighted as in Radenović
  et al. and Gordo et al., IJCV 2017): the same update applied to every database row with
  its neighbours in the database, the row itself excluded from ``N_k`` (it already has
  weight 1).

Neighbours are found with a matrix product over chunks of queries and ``argpartition``, so
an ``(Nq, N)`` score matrix is never held at once. Which of several neighbours tied at the
``k``-th similarity is used is unspecified.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "QE_METHODS",
    "QueryExpansion",
    "average_query_expansion",
    "alpha_query_expansion",
    "alpha_database_augmentation",
    "expand_with_neighbours",
]

QE_METHODS = ("none", "aqe", "alpha")

@dataclass(frozen=True)
class QueryExpansion:
    """Query expansion applied at search time: ``none``, AQE (Chum et al.) or αQE (Radenović
    et al.) with the top ``k`` results and weight exponent ``alpha`` (ignored by AQE)."""

    method: str = "none"
    k: int = 2
    alpha: float = 3.0

    def __post_init__(self) -> None:
        if self.method not in QE_METHODS:
            raise ValueError(f"unknown query expansion {self.method!r}; available: {', '.join(QE_METHODS)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"query expansion k must be a positive integer, got {self.k!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha)
                or self.alpha < 0):
            raise ValueError(f"query expansion alpha must be a finite number >= 0, got {self.alpha!r}")

    @property
    def weight_alpha(self) -> float:
        """The exponent of the neighbour weights: 0 for AQE (every neighbour weighs 1)."""
        return 0.0 if self.method == "aqe" else float(self.alpha)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QueryExpansion":
        """From a saved dict; unknown keys are refused, naming the valid ones."""
        if not isinstance(d, dict):
            raise ValueError(f"query expansion must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in query_expansion; valid: {sorted(names)}")
        return cls(**d)


# Elements of float32 scratch per chunk (score block or gathered neighbours): 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


def _rows(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must be descriptors of shape (N, D), got shape {a.shape}")
    a = a.astype(np.float32)  # always a copy: the input is never modified
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    a /= np.maximum(norms, np.finfo(np.float32).tiny)
    return a


def _check_k(k: Any, limit: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {k!r}")
    if not 0 <= k <= limit:
        raise ValueError(f"k must be in [0, {limit}] ({what}), got {k}")
    return int(k)


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise TypeError(f"alpha must be a real number, got {alpha!r}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    return float(alpha)


def _chunk_rows(n_queries: int, n_db: int, k: int, dim: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, min(n_queries, _CHUNK_ELEMENTS // max(n_db, k * dim, 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return int(chunk_size)


def _expand(q: np.ndarray, db: np.ndarray, k: int, alpha: float, exclude_self: bool, chunk_size: int | None):
    """``normalise(q_i + Σ_{j in top-k(q_i)} max(s_ij, 0)^alpha db_j)`` for every row ``i``.

    With ``exclude_self``, ``q`` is ``db`` and row ``i`` is not its own neighbour.
    """
    if k == 0:
        return q
    out = q.copy()
    rows = _chunk_rows(len(q), len(db), k, db.shape[1], chunk_size)
    for start in range(0, len(q), rows):
        stop = min(start + rows, len(q))
        scores = q[start:stop] @ db.T  # (c, N)
        if exclude_self:
            scores[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        if k < scores.shape[1]:
            ids = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # the k largest, unordered
        else:
            ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        sims = np.take_along_axis(scores, ids, axis=1)
        out[start:stop] = _add_neighbours(q[start:stop], db[ids], sims, alpha)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    return out


def _add_neighbours(q: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """``q + Σ_j max(s_j, 0)^alpha n_j`` (not normalised); ``neighbours`` ``(Q, k, D)``, ``sims`` ``(Q, k)``."""
    weights = np.power(np.maximum(sims, 0.0), np.float32(alpha)).astype(np.float32)  # 0**0 == 1: alpha=0 is AQE
    return q + np.einsum("qk,qkd->qd", weights, neighbours)


def expand_with_neighbours(q: Any, neighbours: Any, sims: Any, alpha: float = 3.0) -> np.ndarray:
    """αQE with neighbours already found (e.g. by an index): ``normalise(q + Σ_j max(s_j, 0)^alpha n_j)``.

    Args:
        q: ``(Q, D)`` queries (used as given: the rows a search was run with).
        neighbours: ``(Q, k, D)`` the neighbours' database rows.
        sims: ``(Q, k)`` their similarities to the query; entries that are not finite (padding
            for missing results) get weight 0.
        alpha: exponent of the weights; 0 is AQE.

    Returns:
        ``(Q, D)`` float32, L2-normalised; the same update :func:`alpha_query_expansion` makes.
    """
    alpha = _check_alpha(alpha)
    q = np.asarray(q, dtype=np.float32)
    neighbours = np.asarray(neighbours, dtype=np.float32)
    sims = np.asarray(sims, dtype=np.float32)
    valid = np.isfinite(sims)
    out = _add_neighbours(q, np.where(valid[..., None], neighbours, 0.0), np.where(valid, sims, 0.0), alpha)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    return out.astype(np.float32)


def average_query_expansion(q: Any, db: Any, k: int = 2, *, chunk_size: int | None = None) -> np.ndarray:
    """AQE (Chum et al., ICCV 2007): each query becomes the normalised mean of itself and its
    top ``k`` database neighbours.

    Args:
        q: ``(Nq, D)`` queries.
        db: ``(N, D)`` database.
        k: number of neighbours, ``0 <= k <= N``; ``k = 0`` returns the normalised queries.
        chunk_size: queries per matrix product (default: sized for about 64 MiB of scratch).

    Returns:
        ``(Nq, D)`` float32, L2-normalised.
    """
    return alpha_query_expansion(q, db, k, alpha=0.0, chunk_size=chunk_size)


def alpha_query_expansion(
    q: Any, db: Any, k: int = 2, alpha: float = 3.0, *, chunk_size: int | None = None
) -> np.ndarray:
    """αQE (Radenović et al., TPAMI 2018): ``normalise(q + Σ_{j in top-k} max(s_j, 0)^alpha db_j)``.

    ``s_j = qᵀ db_j`` and the query itself has weight 1. The paper's typical values are
    ``alpha = 3`` and ``k`` between 1 and 10; ``alpha = 0`` is AQE. If the queries are also
    in the database, their own copy is their first neighbour: remove it from ``db`` or
    count it in ``k``.

    Args:
        q: ``(Nq, D)`` queries.
        db: ``(N, D)`` database.
        k: number of neighbours, ``0 <= k <= N``; ``k = 0`` returns the normalised queries.
        alpha: exponent of the similarity weights, ``>= 0``.
        chunk_size: queries per matrix product (default: sized for about 64 MiB of scratch).

    Returns:
        ``(Nq, D)`` float32, L2-normalised.
    """
    q = _rows(q, "q")
    db = _rows(db, "db")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"q and db must have the same dimension, got q {q.shape} and db {db.shape}")
    k = _check_k(k, len(db), f"the database has {len(db)} rows")
    alpha = _check_alpha(alpha)
    return _expand(q, db, k, alpha, exclude_self=False, chunk_size=chunk_size)


def alpha_database_augmentation(
    db: Any, k: int = 2, alpha: float = 3.0, *, chunk_size: int | None = None
) -> np.ndarray:
    """αDBA (Arandjelović & Zisserman, CVPR 2012; α-weighted as in Radenović et al., TPAMI 2018).

    Each database row ``x_i`` becomes ``normalise(x_i + Σ_{j in top-k, j != i} max(s_ij, 0)^alpha x_j)``:
    itself with weight 1 and its ``k`` most similar *other* rows (excluded by index, so a
    duplicate of ``x_i`` at another index does count as a neighbour). ``alpha = 0`` is plain
    DBA (averaging). Queries are then usually searched, or expanded, against the result.

    Args:
        db: ``(N, D)`` database.
        k: neighbours per row, ``0 <= k <= N - 1``; ``k = 0`` returns the normalised rows.
        alpha: exponent of the similarity weights, ``>= 0``.
        chunk_size: rows per matrix product (default: sized for about 64 MiB of scratch).

    Returns:
        ``(N, D)`` float32, L2-normalised.
    """
    db = _rows(db, "db")
    k = _check_k(k, len(db) - 1, f"neighbours other than the row itself among {len(db)} rows")
    alpha = _check_alpha(alpha)
    return _expand(db, db, k, alpha, exclude_self=True, chunk_size=chunk_size)
