"""Putative correspondences between two sets of local descriptors: (mutual) nearest neighbours
in L2 distance, with Lowe's ratio test and an optional distance threshold.

Pure numpy; memory is bounded by processing the first set in chunks of rows.
"""

from __future__ import annotations

import numpy as np

__all__ = ["match_descriptors"]

_CHUNK_ELEMENTS = 1 << 22  # at most ~4M distances (32 MB of float64) in memory at once


def match_descriptors(
    d1: np.ndarray,
    d2: np.ndarray,
    *,
    ratio: float | None = 0.8,
    mutual: bool = True,
    max_distance: float | None = None,
) -> np.ndarray:
    """Match rows of ``d1`` ``(N1, D)`` to rows of ``d2`` ``(N2, D)`` by L2 distance.

    Row ``i`` of ``d1`` is matched to its nearest neighbour ``j`` in ``d2`` (the lowest index
    on ties) when all of these hold:

    * ``ratio``: Lowe's ratio test, ``dist(i, j) < ratio * dist(i, j2)`` with ``j2`` the second
      nearest neighbour in ``d2`` (Lowe 2004: 0.8 rejects 90 % of false matches and under 5 % of
      correct ones). Passes when ``d2`` has a single row. None: no ratio test.
    * ``mutual``: ``i`` is also the nearest neighbour of ``j`` in ``d1`` (lowest index on ties).
    * ``max_distance``: ``dist(i, j) <= max_distance`` (DELG matches unit-norm descriptors with
      a distance threshold of 1.0, i.e. cosine >= 0.5, and no ratio test). None: no threshold.

    For unit-norm rows, the L2 distance ranks as the inner product does
    (``dist^2 = 2 - 2 <a, b>``).

    Returns:
        ``(M, 2)`` int64 index pairs ``(i, j)``, sorted by ``i``.
    """
    a = np.asarray(d1, dtype=np.float64)
    b = np.asarray(d2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"descriptors must be (N, D) rows, got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"descriptor dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1] or None, got {ratio!r}")
    if max_distance is not None and (isinstance(max_distance, bool) or not isinstance(max_distance, (int, float))
                                     or not max_distance >= 0):
        raise ValueError(f"max_distance must be a number >= 0 or None, got {max_distance!r}")
    if not isinstance(mutual, bool):
        raise TypeError(f"mutual must be a bool, got {mutual!r}")
    n1, n2 = a.shape[0], b.shape[0]
    if n1 == 0 or n2 == 0:
        return np.zeros((0, 2), np.int64)

    bb = np.einsum("ij,ij->i", b, b)
    nn12 = np.empty(n1, np.int64)
    best = np.empty(n1)
    second = np.full(n1, np.inf)
    best21 = np.full(n2, np.inf)  # running column minima for the reverse direction
    nn21 = np.zeros(n2, np.int64)
    rows = max(1, _CHUNK_ELEMENTS // max(1, n2))
    for s in range(0, n1, rows):
        blk = a[s:s + rows]
        d = np.einsum("ij,ij->i", blk, blk)[:, None] + bb[None, :] - 2.0 * (blk @ b.T)
        np.maximum(d, 0.0, out=d)  # squared distances; rounding can make them slightly negative
        j = np.argmin(d, axis=1)
        r = np.arange(blk.shape[0])
        nn12[s:s + rows] = j
        best[s:s + rows] = d[r, j]
        if n2 > 1:
            d2 = d.copy()
            d2[r, j] = np.inf
            second[s:s + rows] = d2.min(axis=1)
        if mutual:
            i = np.argmin(d, axis=0)  # first occurrence within the chunk
            v = d[i, np.arange(n2)]
            better = v < best21  # strict: an earlier chunk keeps ties (lowest index)
            best21[better] = v[better]
            nn21[better] = i[better] + s

    keep = np.ones(n1, bool)
    if ratio is not None:
        # compare distances, not squares: sqrt(best) < ratio * sqrt(second)
        keep &= np.sqrt(best) < ratio * np.sqrt(second)
    if mutual:
        keep &= nn21[nn12] == np.arange(n1)
    if max_distance is not None:
        keep &= np.sqrt(best) <= float(max_distance)
    idx = np.flatnonzero(keep)
    return np.stack([idx, nn12[idx]], axis=1).astype(np.int64)
