"""Retrieval evaluation: the revisited Oxford/Paris protocol and labelled-set metrics.

Two families of metrics live here, both as pure functions returning dataclasses:

* **Revisited Oxford / Paris** (Radenović, Iscen, Tolias, Avrithis, Chum, "Revisiting
  Oxford and Paris: Large-Scale Image Retrieval Benchmarking", CVPR 2018). mAP and mP@k
  under the Easy / Medium / Hard protocols, reproducing the official ``revisitop`` code
  (``compute_ap`` / ``compute_map``) number for number, including its trapezoidal AP and
  its unusual mP@k.
* **Labelled sets** (a folder per class or a CSV of ``path,label``): leave-one-out mAP and
  the metric-learning Recall@K (Song et al., "Deep Metric Learning via Lifted Structured
  Feature Embedding", CVPR 2016).

Conventions: a ranking is an integer array ``ranks`` of shape ``(Nq, K)`` whose row ``i``
lists database indices, best first, for query ``i`` (rows are queries; the revisitop code
uses the transposed ``(Ndb, Nq)`` layout). Scores are similarities, higher is better.
Metrics are fractions in ``[0, 1]`` in the result objects and their ``to_dict``; what people
read is in percent, always marked as such: :func:`format_table` (its title says "values in
%"), :func:`percent_summary` (the headline numbers of the table, for a JSON report) and the
charts of :mod:`imret.plots`.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import positive_int
from .images import IMAGE_EXTENSIONS, list_images
from .safepickle import load_data_pickle

__all__ = [
    "PROTOCOLS",
    "IMAGE_EXTENSIONS",
    "FoldPairs",
    "connected_components",
    "fold_name",
    "ground_truth_set",
    "held_out_pairs",
    "landmark_folds",
    "landmark_of",
    "RevisitopGroundTruth",
    "ProtocolResult",
    "RevisitopResult",
    "LabelledResult",
    "load_revisitop",
    "revisitop_protocol",
    "rank_by_similarity",
    "evaluate_ranking",
    "evaluate_revisitop",
    "evaluate_revisitop_scores",
    "random_baseline_revisitop",
    "evaluate_labelled",
    "load_labelled_folder",
    "load_labelled_csv",
    "save_json",
    "format_table",
    "percent_summary",
]

#: Revisitop protocol names, in table order.
PROTOCOLS: tuple[str, ...] = ("easy", "medium", "hard")

# IMAGE_EXTENSIONS is imret.images' (re-exported): the one rule for what is an image.

# Number of float64-sized cells one chunk of the evaluation may hold per array; bounds
# memory to a few tens of MB whatever the number of queries and database images.
_CHUNK_CELLS = 1 << 22


# --------------------------------------------------------------------------------------
# Revisitop ground truth
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class RevisitopGroundTruth:
    """Ground truth of a revisited Oxford / Paris dataset (the official ``gnd_*.pkl``).

    Attributes:
        name: dataset name, e.g. ``"roxford5k"``.
        imlist: database image names (no extension), length ``Ndb``.
        qimlist: query image names (no extension), length ``Nq``.
        bbx: per query, the query region ``(x1, y1, x2, y2)`` in pixels of the stored
            image, or ``None`` for the whole image.
        easy, hard, junk: per query, int64 arrays of indices into ``imlist``.
    """

    name: str
    imlist: list[str]
    qimlist: list[str]
    bbx: list[tuple[float, float, float, float] | None]
    easy: list[np.ndarray]
    hard: list[np.ndarray]
    junk: list[np.ndarray]

    def __post_init__(self) -> None:
        problem = _ground_truth_problem(self)
        if problem is not None:
            raise ValueError(f"invalid revisitop ground truth {self.name!r}: {problem}")

    @property
    def n_queries(self) -> int:
        """Number of queries ``Nq``."""
        return len(self.qimlist)

    @property
    def n_db(self) -> int:
        """Number of database images ``Ndb``."""
        return len(self.imlist)

    def query_paths(self, root: str | os.PathLike, ext: str = ".jpg") -> list[Path]:
        """Query image files ``root / (name + ext)``, in query order (length ``Nq``)."""
        return [Path(root) / f"{n}{ext}" for n in self.qimlist]

    def db_paths(self, root: str | os.PathLike, ext: str = ".jpg") -> list[Path]:
        """Database image files ``root / (name + ext)``, in index order (length ``Ndb``)."""
        return [Path(root) / f"{n}{ext}" for n in self.imlist]


def landmark_of(name: str) -> str:
    """The landmark in a revisited Oxford/Paris image name: ``paris_defense_000056 -> defense``,
    ``all_souls_000013 -> souls`` (the second ``_`` field); a name without two ``_`` is its own."""
    parts = name.split("_")
    return parts[1] if len(parts) >= 3 else name


def connected_components(n: int, edges: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components of nodes ``0..n-1`` joined by ``edges``, each sorted, in order of
    their smallest node."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in edges:
        parent[root(int(i))] = root(int(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def ground_truth_set(gt: "RevisitopGroundTruth", i: int, kinds: Sequence[str] = ("easy", "hard", "junk")) -> set[int]:
    """Database indices in query ``i``'s ground-truth sets of the given kinds."""
    return set(np.concatenate([getattr(gt, k)[i] for k in kinds]).tolist())


def landmark_folds(gt: "RevisitopGroundTruth") -> list[list[int]]:
    """Queries grouped into landmarks for leave-one-landmark-out protocols: same landmark in
    the file name (:func:`landmark_of`), or sharing any easy / hard / junk image (connected
    components), so that no database image belongs to two folds."""
    sets = [ground_truth_set(gt, i) for i in range(gt.n_queries)]
    edges = [(i, j) for i in range(gt.n_queries) for j in range(i + 1, gt.n_queries)
             if landmark_of(gt.qimlist[i]) == landmark_of(gt.qimlist[j]) or sets[i] & sets[j]]
    return connected_components(gt.n_queries, edges)


@dataclass
class FoldPairs:
    """Training data of one held-out fold: database images and matching pairs among them.

    Attributes:
        images: ``(n,)`` database indices of the images in some pair.
        pairs: ``(2P, 2)`` indices into ``images``, both orders of each unordered pair.
        n_pairs: ``P``, the unordered pairs.
        landmarks: the landmarks the pairs come from, ``"+"``-joined per fold, ``", "`` between folds.
    """

    images: np.ndarray
    pairs: np.ndarray
    n_pairs: int
    landmarks: str


def fold_name(gt: "RevisitopGroundTruth", fold: Sequence[int]) -> str:
    """The landmarks of a fold's queries, ``"+"``-joined (``eiffel+invalides``)."""
    return "+".join(sorted({landmark_of(gt.qimlist[i]) for i in fold}))


def held_out_pairs(gt: "RevisitopGroundTruth", folds: list[list[int]], held: int) -> FoldPairs:
    """Database-database matching pairs (both images easy/hard for one query) of every fold
    but ``held``, leaving out every image in any ground-truth set of the held-out queries:
    what a learned whitening may see when it is evaluated on fold ``held``."""
    banned = set().union(*(ground_truth_set(gt, i) for i in folds[held]))
    unordered: set[tuple[int, int]] = set()
    for f, fold in enumerate(folds):
        if f == held:
            continue
        for i in fold:
            positives = sorted(ground_truth_set(gt, i, ("easy", "hard")) - banned)
            unordered.update(itertools.combinations(positives, 2))
    if not unordered:
        raise ValueError(f"no training pairs outside the fold {fold_name(gt, folds[held])}: "
                         "leave-one-landmark-out needs at least two landmark groups with positives")
    flat = np.array(sorted(unordered), dtype=np.int64)
    images, local = np.unique(flat, return_inverse=True)
    local = local.reshape(-1, 2)
    names = ", ".join(fold_name(gt, fold) for f, fold in enumerate(folds) if f != held)
    return FoldPairs(images, np.concatenate([local, local[:, ::-1]]), len(flat), names)


def _ground_truth_problem(gt: RevisitopGroundTruth) -> str | None:
    """Return a description of the first inconsistency in ``gt``, or ``None``."""
    nq, ndb = len(gt.qimlist), len(gt.imlist)
    for attr in ("bbx", "easy", "hard", "junk"):
        if len(getattr(gt, attr)) != nq:
            return f"{attr} has {len(getattr(gt, attr))} entries but there are {nq} queries"
    for attr in ("easy", "hard", "junk"):
        for i, idx in enumerate(getattr(gt, attr)):
            if not isinstance(idx, np.ndarray) or idx.ndim != 1 or idx.dtype.kind not in "iu":
                return f"query {i}: {attr} must be a 1-D integer array"
            if idx.size and (idx.min() < 0 or idx.max() >= ndb):
                bad = int(idx[(idx < 0) | (idx >= ndb)][0])
                return f"query {i}: {attr} index {bad} is outside [0, {ndb})"
    for i, box in enumerate(gt.bbx):
        if box is not None and (len(box) != 4 or not all(math.isfinite(v) for v in box)):
            return f"query {i}: bbx {box!r} is not 4 finite numbers (x1, y1, x2, y2)"
    return None


def _index_array(value: Any, where: str) -> np.ndarray:
    """1-D int64 copy of a sequence of integer indices; ValueError naming ``where`` else."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        return value.reshape(-1).astype(np.int64)
    arr = np.asarray(value if value is not None else [], dtype=object).reshape(-1)
    out = np.empty(arr.shape[0], dtype=np.int64)
    for k, v in enumerate(arr):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{where}: entry {k} is {v!r}, expected an integer index")
        out[k] = int(v)
    return out


def load_revisitop(path: str | os.PathLike, name: str | None = None) -> RevisitopGroundTruth:
    """Read an official revisitop ground-truth pickle (``gnd_roxford5k.pkl``, ...).

    The file is a pickled dict with ``imlist`` (database names), ``qimlist`` (query names)
    and ``gnd``, a list with one dict per query holding ``bbx`` (``[x1, y1, x2, y2]`` or
    ``None``) and ``easy`` / ``hard`` / ``junk`` lists of indices into ``imlist``
    (Radenović et al., CVPR 2018).

    Security: pickle can execute code. Load only the published dataset files or files you
    made yourself. As a safeguard the unpickler refuses every class except numpy arrays.

    Args:
        path: the ``.pkl`` file.
        name: dataset name; default: the file stem without a ``gnd_`` prefix.

    Raises:
        ValueError: naming the file, when the content is not a valid ground truth
            (missing keys, indices out of range, malformed boxes).
    """
    path = Path(path)
    raw = load_data_pickle(path, what="a revisitop ground-truth pickle")
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a dict, got {type(raw).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; a ground truth has imlist, qimlist, gnd")
    imlist = [str(n) for n in raw["imlist"]]
    qimlist = [str(n) for n in raw["qimlist"]]
    gnd = raw["gnd"]
    if len(gnd) != len(qimlist):
        raise ValueError(f"{path}: gnd has {len(gnd)} entries but qimlist has {len(qimlist)}")
    bbx: list[tuple[float, float, float, float] | None] = []
    sets: dict[str, list[np.ndarray]] = {"easy": [], "hard": [], "junk": []}
    for i, g in enumerate(gnd):
        if not isinstance(g, Mapping):
            raise ValueError(f"{path}: gnd[{i}] is {type(g).__name__}, expected a dict")
        for key in sets:
            if key not in g:
                raise ValueError(f"{path}: gnd[{i}] has no {key!r} list (keys: {sorted(g)})")
            sets[key].append(_index_array(g[key], f"{path}: gnd[{i}][{key!r}]"))
        box = g.get("bbx")
        if box is None:
            bbx.append(None)
        else:
            try:
                vals = tuple(float(v) for v in box)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: gnd[{i}]['bbx'] = {box!r} is not numeric") from e
            if len(vals) != 4:
                raise ValueError(f"{path}: gnd[{i}]['bbx'] = {box!r} must be [x1, y1, x2, y2]")
            bbx.append(vals)  # type: ignore[arg-type]
    if name is None:
        name = path.stem[4:] if path.stem.startswith("gnd_") else path.stem
    try:
        return RevisitopGroundTruth(
            name, imlist, qimlist, bbx, sets["easy"], sets["hard"], sets["junk"]
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def revisitop_protocol(
    gt: RevisitopGroundTruth, protocol: str
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Positive and junk index sets of one protocol, as in the official evaluation.

    * Easy: positives = easy; junk = junk + hard.
    * Medium: positives = easy + hard; junk = junk.
    * Hard: positives = hard; junk = junk + easy.

    Returns:
        ``(positives, junk)``: two lists of ``Nq`` int64 arrays of database indices.
    """
    p = _protocol_name(protocol)
    cat = np.concatenate
    if p == "easy":
        return list(gt.easy), [cat([j, h]) for j, h in zip(gt.junk, gt.hard)]
    if p == "medium":
        return [cat([e, h]) for e, h in zip(gt.easy, gt.hard)], list(gt.junk)
    return list(gt.hard), [cat([j, e]) for j, e in zip(gt.junk, gt.easy)]


def _protocol_name(protocol: str) -> str:
    p = str(protocol).lower()
    if p not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
    return p


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


def _nan_to_none(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _array_to_list(a: np.ndarray) -> list:
    return [_array_to_list(v) if isinstance(v, np.ndarray) else _nan_to_none(v) for v in a]


@dataclass(eq=False)
class ProtocolResult:
    """Metrics of one ranking under one positive / junk definition.

    Attributes:
        map: mean AP over queries that have positives (fraction; NaN if none has).
        mp_at_k: ``{k: mean precision@k}`` with the revisitop definition, same queries.
        ap: ``(Nq,)`` float64 AP per query, NaN where the query has no positives.
        n_empty: number of queries without positives (excluded from the means).
        precision_at_k: ``(Nq, len(mp_at_k))`` per-query precision@k, NaN rows for
            empty queries; columns follow the order of ``mp_at_k``.
        recall_at_k: ``{k: share of queries with a positive among their first k}``
            (junk removed first; place-recognition "Recall@k"), same queries.
        hit_at_k: ``(Nq, len(recall_at_k))`` per query, 1.0 when a positive is in its first
            k (a fraction for a random baseline), NaN rows for empty queries.
    """

    map: float
    mp_at_k: dict[int, float]
    ap: np.ndarray
    n_empty: int
    precision_at_k: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    recall_at_k: dict[int, float] = field(default_factory=dict)
    hit_at_k: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (NaN becomes ``None``)."""
        return {
            "map": _nan_to_none(self.map),
            "mp_at_k": {int(k): _nan_to_none(v) for k, v in self.mp_at_k.items()},
            "ap": _array_to_list(self.ap),
            "n_empty": int(self.n_empty),
            "precision_at_k": _array_to_list(self.precision_at_k),
            "recall_at_k": {int(k): _nan_to_none(v) for k, v in self.recall_at_k.items()},
            "hit_at_k": _array_to_list(self.hit_at_k),
        }


@dataclass(eq=False)
class RevisitopResult:
    """Revisitop Easy / Medium / Hard results of one ranking (or of a baseline).

    Attributes:
        easy, medium, hard: one :class:`ProtocolResult` each.
        kappas: the ``k`` of the mP@k values.
        name: dataset name.
        query_names: the ``Nq`` query names (``qimlist``).
        n_db: number of database images.
        n_trials: for a random baseline, the number of random rankings averaged; else 0.
    """

    easy: ProtocolResult
    medium: ProtocolResult
    hard: ProtocolResult
    kappas: tuple[int, ...]
    name: str = ""
    query_names: tuple[str, ...] = ()
    n_db: int = 0
    n_trials: int = 0

    @property
    def protocols(self) -> dict[str, ProtocolResult]:
        """``{"easy": ..., "medium": ..., "hard": ...}``."""
        return {"easy": self.easy, "medium": self.medium, "hard": self.hard}

    @property
    def n_queries(self) -> int:
        """Number of queries ``Nq``."""
        return int(self.medium.ap.shape[0])

    def protocol(self, name: str) -> ProtocolResult:
        """The result of protocol ``name`` (``"easy"``, ``"medium"`` or ``"hard"``)."""
        return self.protocols[_protocol_name(name)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (NaN becomes ``None``)."""
        out: dict[str, Any] = {
            "kind": "revisitop",
            "name": self.name,
            "n_queries": self.n_queries,
            "n_db": int(self.n_db),
            "kappas": [int(k) for k in self.kappas],
            "query_names": list(self.query_names),
        }
        if self.n_trials:
            out["n_trials"] = int(self.n_trials)
        out.update({p: r.to_dict() for p, r in self.protocols.items()})
        return out


@dataclass(eq=False)
class LabelledResult:
    """Leave-one-out retrieval metrics on a labelled set.

    Attributes:
        map: mean AP over the included queries (fraction; NaN if none is included).
        recall_at_k: ``{k: fraction of included queries with a positive in the top k}``.
        ap: ``(N,)`` float64 AP per item as a query, NaN for excluded ones.
        n_excluded: items whose class has no other member (no positives), excluded.
        ks: the ``k`` of the recall values.
        name: optional dataset name.
    """

    map: float
    recall_at_k: dict[int, float]
    ap: np.ndarray
    n_excluded: int
    ks: tuple[int, ...]
    name: str = ""

    @property
    def n_queries(self) -> int:
        """Number of items (each one is a query)."""
        return int(self.ap.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (NaN becomes ``None``)."""
        return {
            "kind": "labelled",
            "name": self.name,
            "n_queries": self.n_queries,
            "n_excluded": int(self.n_excluded),
            "ks": [int(k) for k in self.ks],
            "map": _nan_to_none(self.map),
            "recall_at_k": {int(k): _nan_to_none(v) for k, v in self.recall_at_k.items()},
            "ap": _array_to_list(self.ap),
        }


def save_json(
    result: RevisitopResult | LabelledResult | ProtocolResult, path: str | os.PathLike
) -> Path:
    """Write ``result.to_dict()`` as indented JSON to ``path`` (parents created); return it."""
    if not hasattr(result, "to_dict"):
        raise TypeError(
            f"save_json expects a RevisitopResult, LabelledResult or ProtocolResult, "
            f"got {type(result).__name__}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    return path


# --------------------------------------------------------------------------------------
# Rankings
# --------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def rank_by_similarity(scores: Any) -> np.ndarray:
    """Sort database items by decreasing score, per query.

    Args:
        scores: ``(Nq, Ndb)`` similarities (numpy array or tensor), higher is better.

    Returns:
        ``(Nq, Ndb)`` int64 database indices, best first; equal scores keep the lower
        index first (stable sort), so the result is deterministic.
    """
    s = _to_numpy(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must have shape (Nq, Ndb), got {s.shape}")
    if s.dtype.kind not in "fiub":
        raise TypeError(f"scores must be numeric, got dtype {s.dtype}")
    if s.dtype.kind != "f":
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; rankings of NaN scores are undefined")
    return np.argsort(-s, axis=1, kind="stable").astype(np.int64, copy=False)


def _check_ranks(ranks: Any, n_queries: int, n_db: int) -> np.ndarray:
    r = _to_numpy(ranks)
    if r.dtype.kind not in "iu":
        raise TypeError(
            f"ranks must be integer database indices, got dtype {r.dtype}; "
            "to evaluate similarity scores use evaluate_revisitop_scores"
        )
    if r.ndim != 2:
        raise ValueError(f"ranks must have shape (Nq, K), got {r.shape}")
    if r.shape[0] != n_queries:
        hint = ""
        if r.ndim == 2 and r.shape[1] == n_queries:
            hint = " (this looks like the revisitop (Ndb, Nq) column layout: pass ranks.T)"
        raise ValueError(f"ranks has {r.shape[0]} rows but there are {n_queries} queries{hint}")
    if r.shape[1] > n_db:
        raise ValueError(f"ranks has {r.shape[1]} columns but the database has {n_db} images")
    if r.size:
        lo, hi = int(r.min()), int(r.max())
        if lo < 0 or hi >= n_db:
            raise ValueError(f"ranks hold index {lo if lo < 0 else hi} outside [0, {n_db})")
        srt = np.sort(r, axis=1)
        dup = np.nonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))[0]
        if dup.size:
            raise ValueError(f"ranks row {int(dup[0])} lists a database index more than once")
    return r.astype(np.int64, copy=False)


def _check_kappas(kappas: Iterable[int], what: str = "kappas") -> tuple[int, ...]:
    out = tuple(kappas)
    try:
        return tuple(positive_int(k, what) for k in out)
    except ValueError:
        raise ValueError(f"{what} must be positive integers, got {out!r}") from None


# --------------------------------------------------------------------------------------
# Revisitop metrics
# --------------------------------------------------------------------------------------


def _membership(sets: Sequence[np.ndarray], rows: range, n_db: int) -> np.ndarray:
    """``(len(rows), n_db)`` bool matrix, True where database item is in ``sets[row]``."""
    m = np.zeros((len(rows), n_db), dtype=bool)
    for a, i in enumerate(rows):
        m[a, sets[i]] = True
    return m


def _score_ranked(
    ranked_ok: np.ndarray, ranked_junk: np.ndarray, n_pos: np.ndarray, kappas: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Revisitop AP and precision@k from ranked membership flags.

    Args:
        ranked_ok, ranked_junk: ``(c, K)`` bool, whether the item at each rank is a
            positive / junk for that query.
        n_pos: ``(c,)`` number of positives of each query (the AP denominator).

    Returns:
        ``ap (c,)``, ``prec (c, len(kappas))`` and ``hit (c, len(kappas))`` (1.0 when a
        positive has a junk-free rank <= k), NaN rows where ``n_pos == 0``.
    """
    c, k_len = ranked_ok.shape
    # 0-based rank after junk removal: position minus the junk strictly before it (an
    # item that is both positive and junk does not shift itself, as in the official code).
    junk_before = np.cumsum(ranked_junk, axis=1, dtype=np.int64) - ranked_junk
    rows, cols = np.nonzero(ranked_ok)
    r = cols - junk_before[rows, cols]
    # j: 0-based index of the positive among the positives of its query.
    j = np.cumsum(ranked_ok, axis=1, dtype=np.int64)[rows, cols] - 1
    precision_1 = (j + 1) / (r + 1)
    precision_0 = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    ap_sum = np.bincount(rows, weights=(precision_0 + precision_1) / 2, minlength=c)
    empty = n_pos == 0
    ap = np.full(c, np.nan)
    ap[~empty] = ap_sum[~empty] / n_pos[~empty]

    pos1 = r + 1  # 1-based junk-free ranks of retrieved positives
    max_pos = np.zeros(c, dtype=np.int64)
    np.maximum.at(max_pos, rows, pos1)
    first_pos = np.full(c, np.iinfo(np.int64).max)
    np.minimum.at(first_pos, rows, pos1)
    prec = np.full((c, len(kappas)), np.nan)
    hit = np.full((c, len(kappas)), np.nan)
    for t, kappa in enumerate(kappas):
        kq = np.minimum(max_pos, kappa)
        hits = np.bincount(rows, weights=pos1 <= kq[rows], minlength=c)
        p = np.where(kq > 0, hits / np.maximum(kq, 1), 0.0)
        prec[~empty, t] = p[~empty]
        hit[~empty, t] = (first_pos <= kappa)[~empty]
    return ap, prec, hit


def _protocol_result(ap: np.ndarray, prec: np.ndarray, kappas: tuple[int, ...],
                     hit: np.ndarray | None = None) -> ProtocolResult:
    valid = ~np.isnan(ap)
    n_valid = int(valid.sum())
    hit = np.full_like(prec, np.nan) if hit is None else hit
    if n_valid:
        m = float(ap[valid].mean())
        mp = {k: float(prec[valid, t].mean()) for t, k in enumerate(kappas)}
        rk = {k: float(hit[valid, t].mean()) for t, k in enumerate(kappas)}
    else:
        m = math.nan
        mp = {k: math.nan for k in kappas}
        rk = {k: math.nan for k in kappas}
    return ProtocolResult(m, mp, ap, int(ap.shape[0] - n_valid), prec, rk, hit)


def evaluate_ranking(
    ranks: Any,
    positives: Sequence[Any],
    junk: Sequence[Any] | None = None,
    kappas: Iterable[int] = (1, 5, 10),
    n_db: int | None = None,
) -> ProtocolResult:
    """Revisitop mAP and mP@k of a ranking for arbitrary positive / junk sets.

    The exact definitions of the official revisitop ``compute_map`` (Radenović et al.,
    CVPR 2018): junk items are removed from each ranking; with ``r_j`` the 0-based
    junk-free rank of the ``j``-th retrieved positive (``j`` 0-based) and ``npos`` the
    size of the positive set,

        AP = sum_j (P0_j + P1_j) / 2 / npos,  P0_j = j / r_j (1 if r_j = 0),
        P1_j = (j + 1) / (r_j + 1).

    mP@k: with ``pos`` the 1-based junk-free ranks of the retrieved positives,
    ``kq = min(max(pos), k)`` and precision@k = ``#{pos <= kq} / kq``.

    Queries with an empty positive set get NaN and are left out of the means (counted
    in ``n_empty``). A ranking may be truncated to ``K < Ndb`` columns: positives that are
    not retrieved add nothing to AP (the official code does the same); a query that
    retrieves none of its positives gets precision 0 (the official code would fail).

    Args:
        ranks: ``(Nq, K)`` integer database indices, best first, no repeats in a row.
        positives: ``Nq`` sequences of positive database indices.
        junk: ``Nq`` sequences of junk (ignored) database indices, or None.
        kappas: the ``k`` of mP@k.
        n_db: database size; default: ``K`` (a full ranking).

    Returns:
        a :class:`ProtocolResult` (fractions in [0, 1]).
    """
    kappas = _check_kappas(kappas)
    r_in = _to_numpy(ranks)
    n_q = len(positives)
    if n_db is None:
        n_db = int(r_in.shape[1]) if r_in.ndim == 2 else 0
    if junk is None:
        junk = [np.zeros(0, dtype=np.int64)] * n_q
    if len(junk) != n_q:
        raise ValueError(f"junk has {len(junk)} entries but positives has {n_q}")
    ok_sets = [_index_array(p, f"positives[{i}]") for i, p in enumerate(positives)]
    junk_sets = [_index_array(p, f"junk[{i}]") for i, p in enumerate(junk)]
    for what, sets in (("positives", ok_sets), ("junk", junk_sets)):
        for i, s in enumerate(sets):
            if s.size and (s.min() < 0 or s.max() >= n_db):
                raise ValueError(f"{what}[{i}] holds an index outside [0, {n_db})")
    r = _check_ranks(r_in, n_q, n_db)
    return _evaluate_sets(r, ok_sets, junk_sets, kappas, n_db)


def _evaluate_sets(
    ranks: np.ndarray,
    ok_sets: Sequence[np.ndarray],
    junk_sets: Sequence[np.ndarray],
    kappas: tuple[int, ...],
    n_db: int,
) -> ProtocolResult:
    n_q = ranks.shape[0]
    n_pos = np.array([len(s) for s in ok_sets], dtype=np.int64)
    ap = np.full(n_q, np.nan)
    prec = np.full((n_q, len(kappas)), np.nan)
    hit = np.full((n_q, len(kappas)), np.nan)
    step = max(1, _CHUNK_CELLS // max(n_db, 1))
    for start in range(0, n_q, step):
        rows = range(start, min(start + step, n_q))
        chunk = ranks[rows.start : rows.stop]
        ranked_ok = np.take_along_axis(_membership(ok_sets, rows, n_db), chunk, axis=1)
        ranked_junk = np.take_along_axis(_membership(junk_sets, rows, n_db), chunk, axis=1)
        a, p, h = _score_ranked(ranked_ok, ranked_junk, n_pos[rows.start : rows.stop], kappas)
        ap[rows.start : rows.stop] = a
        prec[rows.start : rows.stop] = p
        hit[rows.start : rows.stop] = h
    return _protocol_result(ap, prec, kappas, hit)


def evaluate_revisitop(
    ranks: Any, gt: RevisitopGroundTruth, kappas: Iterable[int] = (1, 5, 10)
) -> RevisitopResult:
    """Evaluate rankings with the revisited Oxford / Paris Easy, Medium and Hard protocols.

    Reproduces the official revisitop evaluation (Radenović et al., CVPR 2018); see
    :func:`evaluate_ranking` for the AP and mP@k definitions and
    :func:`revisitop_protocol` for the protocols.

    Args:
        ranks: ``(Nq, K)`` integer database indices per query, best first (``K <= Ndb``;
            rows are queries, i.e. the transpose of the revisitop layout).
        gt: ground truth from :func:`load_revisitop`.
        kappas: the ``k`` of mP@k.
    """
    kappas = _check_kappas(kappas)
    r = _check_ranks(ranks, gt.n_queries, gt.n_db)
    res = {p: _evaluate_sets(r, *revisitop_protocol(gt, p), kappas, gt.n_db) for p in PROTOCOLS}
    return RevisitopResult(
        **res, kappas=kappas, name=gt.name, query_names=tuple(gt.qimlist), n_db=gt.n_db
    )


def evaluate_revisitop_scores(
    scores: Any, gt: RevisitopGroundTruth, kappas: Iterable[int] = (1, 5, 10)
) -> RevisitopResult:
    """:func:`evaluate_revisitop` of ``rank_by_similarity(scores)``.

    Args:
        scores: ``(Nq, Ndb)`` query-to-database similarities, higher is better.
    """
    s = _to_numpy(scores)
    if s.ndim != 2 or s.shape != (gt.n_queries, gt.n_db):
        raise ValueError(
            f"scores must have shape (Nq, Ndb) = ({gt.n_queries}, {gt.n_db}), got {s.shape}"
        )
    return evaluate_revisitop(rank_by_similarity(s), gt, kappas)


def random_baseline_revisitop(
    gt: RevisitopGroundTruth,
    n_trials: int = 100,
    seed: int = 0,
    kappas: Iterable[int] = (1, 5, 10),
) -> RevisitopResult:
    """Expected revisitop metrics of a uniformly random ranking, by simulation.

    Averages ``n_trials`` seeded random permutations of the database per query. The
    per-query ``ap`` / ``precision_at_k`` and the means are averages over the trials
    (the set of empty queries does not depend on the ranking, so both agree).

    Args:
        gt: ground truth from :func:`load_revisitop`.
        n_trials: number of random rankings (>= 1).
        seed: seed of ``numpy.random.default_rng``.
        kappas: the ``k`` of mP@k.
    """
    kappas = _check_kappas(kappas)
    positive_int(n_trials, "n_trials")
    rng = np.random.default_rng(seed)
    n_q, n_db = gt.n_queries, gt.n_db
    sets = {p: revisitop_protocol(gt, p) for p in PROTOCOLS}
    all_rows = range(n_q)
    masks = {
        p: (_membership(ok, all_rows, n_db), _membership(jk, all_rows, n_db),
            np.array([len(s) for s in ok], dtype=np.int64))
        for p, (ok, jk) in sets.items()
    }
    ap_sum = {p: np.zeros(n_q) for p in PROTOCOLS}
    prec_sum = {p: np.zeros((n_q, len(kappas))) for p in PROTOCOLS}
    hit_sum = {p: np.zeros((n_q, len(kappas))) for p in PROTOCOLS}
    ranks = np.tile(np.arange(n_db, dtype=np.int64), (n_q, 1))
    for _ in range(int(n_trials)):
        rng.permuted(ranks, axis=1, out=ranks)
        for p, (is_ok, is_junk, n_pos) in masks.items():
            a, pr, h = _score_ranked(
                np.take_along_axis(is_ok, ranks, axis=1),
                np.take_along_axis(is_junk, ranks, axis=1),
                n_pos,
                kappas,
            )
            ap_sum[p] += a
            prec_sum[p] += pr
            hit_sum[p] += h
    res = {
        p: _protocol_result(ap_sum[p] / n_trials, prec_sum[p] / n_trials, kappas, hit_sum[p] / n_trials)
        for p in PROTOCOLS
    }
    return RevisitopResult(
        **res,
        kappas=kappas,
        name=gt.name,
        query_names=tuple(gt.qimlist),
        n_db=n_db,
        n_trials=int(n_trials),
    )


# --------------------------------------------------------------------------------------
# Labelled sets
# --------------------------------------------------------------------------------------


def evaluate_labelled(
    descriptors: Any,
    labels: Any,
    ks: Iterable[int] = (1, 5, 10),
    chunk_size: int | None = None,
) -> LabelledResult:
    """Leave-one-out retrieval on a labelled set: mAP and Recall@K.

    Every item queries all the others, ranked by dot product (the cosine similarity when
    the rows are L2-normalised, which is the caller's job); its positives are the other
    items with the same label. Equal scores rank the lower index first.

    * AP: the standard non-interpolated average precision, the mean over all positives
      of the precision at the positive's rank.
    * Recall@K (Song et al., CVPR 2016): the fraction of queries with at least one
      positive among the top K.

    Items whose class has no other member have no positives: their AP is NaN and they are
    excluded from both means (counted in ``n_excluded``).

    Scores are computed as a chunked matrix product over queries, so memory stays at
    about ``2 * chunk_size * N`` scores whatever ``N``; each positive's rank is found by
    binary search in the sorted score row, so no full argsort is needed.

    Args:
        descriptors: ``(N, D)`` float descriptors (float32 is kept as float32).
        labels: ``(N,)`` class labels of any comparable type (ints, strings).
        ks: the K of Recall@K.
        chunk_size: queries per chunk; default chosen to hold about 4M scores.
    """
    ks = _check_kappas(ks, "ks")
    x = _to_numpy(descriptors)
    if x.ndim != 2:
        raise ValueError(f"descriptors must have shape (N, D), got {x.shape}")
    if x.dtype.kind != "f" or x.itemsize < 4:  # ints, bools, float16 -> float32
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError("descriptors contain NaN or infinite values")
    lab = _to_numpy(labels)
    if lab.ndim != 1 or lab.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels must have shape (N,) = ({x.shape[0]},) like the descriptors, got {lab.shape}"
        )
    _, y = np.unique(lab, return_inverse=True)
    y = y.reshape(-1).astype(np.int64)
    n = x.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_CELLS // max(n, 1))
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    n_pos = np.bincount(y)[y] - 1  # other members of each item's class
    by_class = np.argsort(y, kind="stable")
    members = np.split(by_class, np.cumsum(np.bincount(y))[:-1])  # ascending indices
    ap = np.full(n, np.nan)
    first_hit = np.full(n, n, dtype=np.int64)  # 0-based rank of the best positive
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        s = x[start:stop] @ x.T  # (c, N)
        s[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # the query itself
        srt = np.sort(s, axis=1)  # ascending; no argsort of the whole row is needed
        for a, q in enumerate(range(start, stop)):
            if n_pos[q] == 0:
                continue
            pos = members[y[q]]
            pos = pos[pos != q]
            row = s[a]
            sp = row[pos]
            right = np.searchsorted(srt[a], sp, side="right")
            # 0-based rank among the others: items scoring higher, then equal scores
            # with a lower index (self is -inf and never counts).
            rank = n - right
            tied = np.nonzero(right - np.searchsorted(srt[a], sp, side="left") > 1)[0]
            for t in tied:
                rank[t] += np.count_nonzero(row[: pos[t]] == sp[t])
            rank.sort()
            ap[q] = float(np.mean(np.arange(1, rank.shape[0] + 1) / (rank + 1)))
            first_hit[q] = rank[0]
    found = {k: first_hit < k for k in ks}
    valid = n_pos > 0
    n_valid = int(valid.sum())
    if n_valid:
        m = float(ap[valid].mean())
        recall = {k: float(found[k][valid].mean()) for k in ks}
    else:
        m = math.nan
        recall = {k: math.nan for k in ks}
    return LabelledResult(m, recall, ap, int(n - n_valid), ks)


def load_labelled_folder(root: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """List a labelled image set stored as one sub-folder per class.

    Images are the files under each class folder that :func:`imret.images.list_images`
    lists (searched recursively; extension in :data:`imret.images.IMAGE_EXTENSIONS`,
    case-insensitive; hidden files and folders skipped), so evaluation sees exactly the
    images every other imret command sees. Classes are sorted by name and images by
    path, so the order is deterministic.

    Returns:
        ``(paths, labels, class_names)``: ``N`` paths, ``(N,)`` int64 labels indexing
        ``class_names``.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
        ValueError: no class folder, or a class folder without images (named).
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"labelled set root {str(root)!r} is not a folder")
    class_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )
    if not class_dirs:
        raise ValueError(f"{root}: no class folders; expected one sub-folder of images per class")
    paths: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    for ci, d in enumerate(class_dirs):
        files = [Path(p) for p in list_images(d)]
        if not files:
            empty.append(d.name)
        paths.extend(files)
        labels.extend([ci] * len(files))
    if empty:
        raise ValueError(
            f"{root}: class folders without images: {empty}; image extensions: "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return paths, np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs]


def load_labelled_csv(
    path: str | os.PathLike, check_exists: bool = True
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Read a labelled image set from a CSV file of ``path,label`` rows.

    A first row ``path,label`` (any case) is taken as a header. Blank lines are skipped.
    Relative image paths are resolved against the CSV file's folder. Class names are the
    distinct labels, sorted.

    Args:
        path: the CSV file.
        check_exists: raise if a listed image file does not exist.

    Returns:
        ``(paths, labels, class_names)``: ``N`` paths, ``(N,)`` int64 labels indexing
        ``class_names``.

    Raises:
        ValueError: naming the file and line, for a row that is not two non-empty fields
            or an empty file.
        FileNotFoundError: naming the file and line, for a missing image.
    """
    path = Path(path)
    base = path.parent
    paths: list[Path] = []
    names: list[str] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if not paths and not names and [c.strip().lower() for c in row] == ["path", "label"]:
                continue
            if len(row) != 2:
                raise ValueError(
                    f"{path}:{line}: expected 2 columns 'path,label', got {len(row)}: {row!r}"
                )
            p, label = row[0].strip(), row[1].strip()
            if not p or not label:
                raise ValueError(f"{path}:{line}: empty path or label in {row!r}")
            full = Path(p) if Path(p).is_absolute() else base / p
            if check_exists and not full.is_file():
                raise FileNotFoundError(f"{path}:{line}: image file {str(full)!r} does not exist")
            paths.append(full)
            names.append(label)
    if not paths:
        raise ValueError(f"{path}: no 'path,label' rows")
    class_names = sorted(set(names))
    index = {c: i for i, c in enumerate(class_names)}
    return paths, np.asarray([index[c] for c in names], dtype=np.int64), class_names


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100.0 * x:.2f}"


def _pct_value(x: float) -> float | None:
    """A fraction as the percent :func:`format_table` shows (2 decimals); NaN -> None."""
    x = float(x)
    return None if math.isnan(x) else round(100.0 * x, 2)


def percent_summary(result: RevisitopResult | LabelledResult) -> dict[str, Any]:
    """The numbers of :func:`format_table` as a JSON-ready dict, in percent (2 decimals; None
    for n/a), with ``"unit": "%"``.

    Revisitop: ``{"unit": "%", "easy": {"mAP": .., "mP@1": .., "R@1": ..}, "medium": .., "hard": ..}``;
    labelled: ``{"unit": "%", "mAP": .., "R@1": .., ...}``.
    """
    if isinstance(result, RevisitopResult):
        out: dict[str, Any] = {"unit": "%"}
        for p in PROTOCOLS:
            r = result.protocol(p)
            row = {"mAP": _pct_value(r.map)}
            row.update({f"mP@{k}": _pct_value(r.mp_at_k[k]) for k in result.kappas})
            row.update({f"R@{k}": _pct_value(r.recall_at_k.get(k, math.nan)) for k in result.kappas})
            out[p] = row
        return out
    if isinstance(result, LabelledResult):
        out = {"unit": "%", "mAP": _pct_value(result.map)}
        out.update({f"R@{k}": _pct_value(result.recall_at_k[k]) for k in result.ks})
        return out
    raise TypeError(f"percent_summary expects a RevisitopResult or LabelledResult, got {type(result).__name__}")


def format_table(
    result: RevisitopResult | LabelledResult,
    baseline: RevisitopResult | LabelledResult | None = None,
) -> str:
    """Plain-text table of a result, metrics in percent with 2 decimals (the title line says so).

    Revisitop: columns Easy / Medium / Hard, rows mAP and mP@k. Labelled: one column,
    rows mAP and R@k. With ``baseline`` (e.g. :func:`random_baseline_revisitop`), its
    rows follow, labelled ``(random)`` when it is a random baseline, else ``(baseline)``.
    """
    if isinstance(result, RevisitopResult):
        return _format_revisitop(result, baseline)
    if isinstance(result, LabelledResult):
        return _format_labelled(result, baseline)
    raise TypeError(
        f"format_table expects a RevisitopResult or LabelledResult, got {type(result).__name__}"
    )


def _rows_table(header: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    w0 = max([len(r[0]) for r in rows] + [4])
    w = max([len(h) for h in header] + [len(v) for _, vals in rows for v in vals] + [6])
    out = [" " * w0 + "".join(f"  {h:>{w}}" for h in header)]
    out += [f"{name:<{w0}}" + "".join(f"  {v:>{w}}" for v in vals) for name, vals in rows]
    return out


def _baseline_suffix(baseline: Any) -> str:
    return " (random)" if getattr(baseline, "n_trials", 0) else " (baseline)"


def _format_revisitop(result: RevisitopResult, baseline: Any) -> str:
    if baseline is not None and not isinstance(baseline, RevisitopResult):
        raise TypeError(f"baseline must be a RevisitopResult, got {type(baseline).__name__}")

    def rows_of(r: RevisitopResult, suffix: str) -> list[tuple[str, list[str]]]:
        prs = [r.protocol(p) for p in PROTOCOLS]
        rows = [("mAP" + suffix, [_pct(x.map) for x in prs])]
        rows += [(f"mP@{k}" + suffix, [_pct(x.mp_at_k[k]) for x in prs]) for k in r.kappas]
        rows += [(f"R@{k}" + suffix, [_pct(x.recall_at_k.get(k, math.nan)) for x in prs]) for k in r.kappas]
        return rows

    rows = rows_of(result, "")
    if baseline is not None:
        rows += rows_of(baseline, _baseline_suffix(baseline))
    title = (
        f"{result.name or 'revisitop'}: {result.n_queries} queries, "
        f"{result.n_db} database images; values in %"
    )
    lines = [title, *_rows_table(["Easy", "Medium", "Hard"], rows)]
    if baseline is not None and baseline.n_trials:
        lines.append(f"random: mean of {baseline.n_trials} random rankings")
    empties = [f"{p.capitalize()} {r.n_empty}" for p, r in result.protocols.items() if r.n_empty]
    if empties:
        lines.append("queries without positives (excluded): " + ", ".join(empties))
    return "\n".join(lines)


def _format_labelled(result: LabelledResult, baseline: Any) -> str:
    if baseline is not None and not isinstance(baseline, LabelledResult):
        raise TypeError(f"baseline must be a LabelledResult, got {type(baseline).__name__}")

    def rows_of(r: LabelledResult, suffix: str) -> list[tuple[str, list[str]]]:
        rows = [("mAP" + suffix, [_pct(r.map)])]
        rows += [(f"R@{k}" + suffix, [_pct(r.recall_at_k[k])]) for k in r.ks]
        return rows

    rows = rows_of(result, "")
    if baseline is not None:
        rows += rows_of(baseline, " (baseline)")
    title = f"{result.name or 'labelled set'}: {result.n_queries} queries; values in %"
    lines = [title, *_rows_table(["%"], rows)]
    if result.n_excluded:
        lines.append(f"queries without positives (excluded): {result.n_excluded}")
    return "\n".join(lines)
