"""An index chosen for a recall target, measured on the collection's own vectors (``auto``).

``auto?recall=0.95&k=100`` asks for the cheapest index whose recall@k against exact search
reaches the target on this collection. How :func:`tune` chooses (after autofaiss's idea of
deriving the index from a recall target; the rules and code are imret's own):

1. **Index family, from the size** (:func:`candidates`), in the order tried:

   - ``N·D <= 2**24`` (one query streams at most 64 MiB: about 2 ms on two cores, and a
     1000-query batch a few hundred ms): **exact**, nothing to tune, recall 1.
   - otherwise an inverted file ``IVF<nlist>`` with ``nlist`` the power of two nearest
     ``4·√N`` (clamped to 16..65536, halved until 39 rows per list can train it, the FAISS
     k-means minimum), whose codes are tried from the most compact up:
     ``PQ<D/4>x8`` (D/4 bytes per row; only when SQ8 codes would pass 4 GiB, ``N·D > 2**32``),
     ``SQ8`` (D bytes), ``Flat`` (4·D bytes: no quantisation error), then **exact**, which
     always reaches the target. Each IVF family has a ladder of ``nprobe`` values, powers of
     two up to a fraction of ``nlist`` (1/8 for compressed codes, 1/16 for flat ones) beyond
     which exact search is about as fast on this hardware (``benchmarks/search.py``).

   HNSW is not among them: at 100k rows it matched IVF-SQ8 in speed and recall in the
   benchmark while holding 4x the memory, it cannot delete rows (tombstones, rebuilds), and
   its multi-threaded construction is not reproducible, which a seeded tuning must be.

2. **Held-out queries.** ``sample`` live rows drawn with ``seed`` become the queries, and
   each candidate index is built from the *other* rows, so a query never finds itself
   (a self-match would be found first by any index and inflate recall). The reference is
   exact search over the same other rows.

3. **Selection** (:func:`select`). Per family, ``nprobe`` ascending: search the queries,
   measure the per-query tie-aware recall@k (:func:`measure_recall`) and the time, and stop
   at the first value whose one-sided 95 % lower confidence bound (mean − 1.645·sd/√S)
   reaches the target. Search cost grows with ``nprobe``, so that is the fastest setting of
   the family that meets the target; a family that never does gives way to the next one
   (Flat is not built when SQ8 at Flat's largest ``nprobe`` fell more than 0.03 short: flat
   codes only remove SQ8's quantisation error: 0.005 of recall@100 at 1M 512-D rows in the
   benchmark, 0.02 of recall@10 on the 32-D test data).
   The choice depends on recall only (seeded sample, seeded training sample, seeded FAISS
   k-means): the same collection and seed give the same index. Times are measured and
   recorded, never used to choose.

4. The held-out rows are added to the chosen index, which then holds the whole collection.

:class:`TuningRecord` is what the store keeps in ``store.json`` (``backend.tuning``) and
``imret index info`` shows. :func:`retune_due`: the store tunes again at the next index build
once the collection has doubled since the last tuning.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .base import Backend, parse_spec, tie_aware_hits
from .exact import exact_search

__all__ = [
    "AUTO_PARAMS",
    "AutoTarget",
    "Candidate",
    "DEFAULT_POLICY",
    "Measurement",
    "Tuned",
    "TuningPolicy",
    "TuningRecord",
    "auto_target",
    "candidates",
    "check_tunable",
    "flat_can_help",
    "ivf_nlist",
    "measure_recall",
    "min_rows",
    "recall_lower_bound",
    "retune_due",
    "select",
    "split_holdout",
    "tune",
]

#: the parameters of an ``auto`` spec: (type, valid range, default, meaning)
AUTO_PARAMS: dict[str, tuple[type, tuple[float, float], float, str]] = {
    "recall": (float, (0.0, 1.0), 0.95, "recall@k target against exact search, in (0, 1]"),
    "k": (int, (1, 10_000), 100, "the k of recall@k (the depth searches will ask for)"),
    "sample": (int, (10, 100_000), 1000, "live rows held out as queries"),
    "seed": (int, (0, 2**32 - 1), 0, "seed of the held-out sample and the training sample"),
}


@dataclass(frozen=True)
class AutoTarget:
    """What an ``auto`` spec asks for (see :data:`AUTO_PARAMS`)."""

    recall: float = 0.95
    k: int = 100
    sample: int = 1000
    seed: int = 0


def auto_target(params: Mapping[str, Any] | None = None) -> AutoTarget:
    """The parameters of an ``auto`` spec (strings as parsed, or numbers) checked and typed.

    Raises ``ValueError`` naming the bad key or value and the valid keys or range.
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(AUTO_PARAMS))
    if unknown:
        raise ValueError(f"unknown 'auto' parameter(s) {', '.join(map(repr, unknown))}; valid: "
                         + "; ".join(f"{name} ({meaning}, default {d:g})" for name, (_, _, d, meaning) in AUTO_PARAMS.items()))
    out: dict[str, Any] = {}
    for name, value in params.items():
        kind, (lo, hi), _, _ = AUTO_PARAMS[name]
        text = str(value).strip()
        if kind is float:
            try:
                v = float(text)
            except ValueError:
                v = math.nan
            ok = math.isfinite(v) and lo < v <= hi
            rng = f"a number in ({lo:g}, {hi:g}]"
        else:
            v = int(text) if re.fullmatch(r"[+-]?\d{1,12}", text) else None
            ok = v is not None and lo <= v <= hi
            rng = f"an integer in [{int(lo)}, {int(hi)}]"
        if isinstance(value, bool) or not ok:
            raise ValueError(f"'auto' parameter {name}={value!r} must be {rng}")
        out[name] = v
    return AutoTarget(**out)


@dataclass(frozen=True)
class TuningPolicy:
    """The rules :func:`candidates` and :func:`tune` follow (see the module docstring)."""

    #: N·D at or below which exact search is chosen without tuning
    exact_max_cells: int = 1 << 24
    #: N·D above which IVF-PQ codes are tried first (SQ8 codes would pass 4 GiB)
    pq_min_cells: int = 1 << 32
    #: clamp of IVF's nlist
    nlist_range: tuple[int, int] = (16, 65536)
    #: rows per IVF list needed to train it (FAISS k-means min_points_per_centroid)
    points_per_list: int = 39
    #: largest nprobe tried, as a fraction of nlist, per code type
    probe_fraction: tuple[tuple[str, float], ...] = (("PQ", 1 / 8), ("SQ8", 1 / 8), ("Flat", 1 / 16))
    #: rows trained on (at least the index's minimum), as the store samples for any index
    train_rows: int = 100_000
    #: z of the one-sided lower confidence bound on recall (1.645: 95 %)
    z: float = 1.645
    #: collection growth since the last tuning that makes the next build tune again
    growth: float = 2.0
    #: the most recall flat codes are expected to add over SQ8 at the same nprobe (0.005 at 1M
    #: rows in the benchmark, 0.02 on 32-D test data); Flat is not built when SQ8 falls further short
    flat_gain: float = 0.03


DEFAULT_POLICY = TuningPolicy()


@dataclass(frozen=True)
class Candidate:
    """One index family: a FAISS factory string (or ``exact``) and its search-parameter ladder
    (ascending: cost grows with the value)."""

    factory: str
    param: str | None = None
    values: tuple[int, ...] = ()

    def spec(self, value: int | None = None) -> str:
        if self.factory == "exact":
            return "exact"
        return f"faiss:{self.factory}" + (f"?{self.param}={value}" if value is not None else "")


def ivf_nlist(n: int, policy: TuningPolicy | None = None) -> int:
    """IVF lists for ``n`` training-and-indexed rows: the power of two nearest ``4·√n``,
    clamped to ``policy.nlist_range`` and halved until each list gets ``points_per_list`` rows."""
    policy = policy or DEFAULT_POLICY
    lo, hi = policy.nlist_range
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    nlist = min(hi, max(lo, nlist))
    while nlist > lo and policy.points_per_list * nlist > n:
        nlist //= 2
    return nlist


def _pq_m(dim: int) -> int:
    """PQ sub-quantisers: the largest divisor of ``dim`` at most ``dim / 4`` (4 dims per byte)."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def candidates(n: int, dim: int, policy: TuningPolicy | None = None) -> list[Candidate]:
    """The index families :func:`tune` tries for ``n`` rows of ``dim`` dimensions, in order;
    the last is always ``exact``. ``n`` is the number of rows the index is built from."""
    policy = policy or DEFAULT_POLICY
    exact = Candidate("exact")
    cells = n * dim
    if cells <= policy.exact_max_cells or n < policy.points_per_list * policy.nlist_range[0]:
        return [exact]
    nlist = ivf_nlist(n, policy)
    frac = dict(policy.probe_fraction)
    codes = ["SQ8", "Flat"]
    if cells > policy.pq_min_cells:
        codes.insert(0, f"PQ{_pq_m(dim)}x8")
    out = []
    for code in codes:
        top = max(1, int(nlist * frac["PQ" if code.startswith("PQ") else code]))
        ladder = tuple(2 ** i for i in range(int(math.log2(top)) + 1))
        out.append(Candidate(f"IVF{nlist},{code}", "nprobe", ladder))
    return [*out, exact]


def split_holdout(live: np.ndarray, sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(queries, rest)``: ``sample`` of the ``live`` row ids drawn with ``seed`` (at most a
    tenth of them, at least one when there are two) and the others, both sorted, disjoint."""
    live = np.sort(np.asarray(live, dtype=np.int64))
    s = min(int(sample), live.size // 10) if live.size >= 20 else min(1, live.size - 1)
    if s <= 0:
        return live[:0], live
    pick = np.random.default_rng([seed, 0]).choice(live.size, size=s, replace=False)
    mask = np.zeros(live.size, bool)
    mask[pick] = True
    return live[mask], live[~mask]


def measure_recall(q: np.ndarray, x: np.ndarray, exact_scores: np.ndarray, approx_ids: np.ndarray, k: int,
                   *, alive: np.ndarray | None = None, tol: float = 1e-5) -> np.ndarray:
    """Per-query tie-aware recall@k ``(Q,)``: ids are row numbers of ``x`` ``(N, D)``; a found
    row counts when it is searchable (``alive`` ``(N,)`` bool, default all) and ``q · x[id]``
    reaches the exact k-th score over the searchable rows (``exact_scores`` ``(Q, >=k)``,
    ``-inf`` padded) minus ``tol``. See :func:`imret.index.base.tie_aware_hits`."""
    approx_ids = np.asarray(approx_ids)
    if alive is not None:
        ok = (approx_ids >= 0) & (approx_ids < x.shape[0])
        ok[ok] = np.asarray(alive, dtype=bool)[approx_ids[ok]]
        approx_ids = np.where(ok, approx_ids, -1)
    return tie_aware_hits(q, x, None, exact_scores, approx_ids, k, tol=tol)


def recall_lower_bound(per_query: np.ndarray, z: float) -> float:
    """One-sided lower confidence bound of mean recall: ``mean − z·sd/√S`` (sd with ddof 1)."""
    r = np.asarray(per_query, dtype=np.float64)
    if r.size == 0:
        return 1.0
    sd = float(r.std(ddof=1)) if r.size > 1 else 0.0
    return float(r.mean() - z * sd / math.sqrt(r.size))


@dataclass(frozen=True)
class Measurement:
    """One setting searched with the held-out queries."""

    spec: str
    recall: float
    recall_lower: float
    qps: float

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "recall": round(self.recall, 6), "recall_lower": round(self.recall_lower, 6),
                "qps": round(self.qps, 1)}


def flat_can_help(tried: Sequence[Measurement], flat: Candidate, target: float,
                  policy: TuningPolicy | None = None) -> bool:
    """Whether the ``IVF…,Flat`` family ``flat`` may reach ``target`` where SQ8 codes did not:
    False when SQ8 (same lists) at flat's largest nprobe fell more than ``policy.flat_gain``
    short, since flat codes only remove the quantisation error. True when SQ8 was not tried."""
    policy = policy or DEFAULT_POLICY
    sq8 = "faiss:" + flat.factory[: -len("Flat")] + "SQ8"
    top = f"{sq8}?{flat.param}={flat.values[-1]}" if flat.values else None
    m = next((t for t in tried if t.spec == top), None)
    return m is None or m.recall >= target - policy.flat_gain


def select(measurements: Sequence[Measurement], target: float) -> Measurement | None:
    """The first measurement, in the order tried (family, then increasing cost), whose recall
    lower bound reaches ``target``; None when none does."""
    return next((m for m in measurements if m.recall_lower >= target), None)


# -- the record kept in store.json ---------------------------------------------------------

_MAX_TRIED = 64


@dataclass(frozen=True)
class TuningRecord:
    """What :func:`tune` chose and measured (``store.json`` ``backend.tuning``)."""

    spec: str  # the concrete spec chosen: "exact" or "faiss:<factory>?<param>=<value>"
    target_recall: float
    k: int
    seed: int
    sample: int  # held-out queries measured with
    n: int  # live rows at tuning
    dim: int
    recall: float  # mean recall@k of the chosen setting on the held-out queries
    recall_lower: float
    qps: float  # held-out queries per second with the chosen setting
    exact_qps: float  # exact search of the same queries, same run
    tuning_s: float  # all of it: reference search, indexes built, searches
    build_s: float  # training and filling the chosen index (0 for exact)
    reason: str
    tried: tuple[Measurement, ...] = ()

    @property
    def index_type(self) -> str:
        s = parse_spec(self.spec)
        return "exact" if s.kind == "exact" else s.target

    @property
    def params(self) -> dict[str, str]:
        return dict(parse_spec(self.spec).params)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["type"] = self.index_type
        d["params"] = self.params
        for key in ("target_recall", "recall", "recall_lower"):
            d[key] = round(d[key], 6)
        for key in ("qps", "exact_qps", "tuning_s", "build_s"):
            d[key] = round(d[key], 3)
        d["tried"] = [m.to_dict() for m in self.tried]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "TuningRecord":
        """Check an untrusted record (from ``store.json``); ``ValueError`` names the bad key."""
        if not isinstance(d, dict):
            raise ValueError(f"backend.tuning must be an object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        keys = fields | {"type", "params"}
        missing, unknown = sorted(keys - set(d)), sorted(set(d) - keys)
        if missing or unknown:
            raise ValueError("backend.tuning has " + ", ".join(filter(None, (
                missing and f"missing keys {missing}", unknown and f"unknown keys {unknown}"))))
        spec = d["spec"]
        if not isinstance(spec, str) or len(spec) > 200:
            raise ValueError(f"backend.tuning.spec must be a backend spec string, got {spec!r}")
        kind = parse_spec(spec).kind
        if kind not in ("exact", "faiss"):
            raise ValueError(f"backend.tuning.spec must be an exact or faiss: spec, got {spec!r}")
        _num(d, "target_recall", 0.0, 1.0, lo_open=True)
        for key in ("recall", "recall_lower"):
            _num(d, key, -1e9 if key == "recall_lower" else 0.0, 1.0)
        for key in ("qps", "exact_qps", "tuning_s", "build_s"):
            _num(d, key, 0.0, 1e15)
        _int(d, "k", *AUTO_PARAMS["k"][1])
        _int(d, "seed", *AUTO_PARAMS["seed"][1])
        _int(d, "n", 0, 1 << 62)
        _int(d, "sample", 0, AUTO_PARAMS["sample"][1][1])
        _int(d, "dim", 1, 1 << 20)
        if d["sample"] > d["n"]:
            raise ValueError(f"backend.tuning.sample ({d['sample']}) exceeds backend.tuning.n ({d['n']})")
        if not isinstance(d["reason"], str) or len(d["reason"]) > 500 or not d["reason"].isprintable():
            raise ValueError(f"backend.tuning.reason must be printable text of at most 500 characters, got {d['reason']!r}")
        tried = d["tried"]
        if not isinstance(tried, list) or len(tried) > _MAX_TRIED:
            raise ValueError(f"backend.tuning.tried must be a list of at most {_MAX_TRIED} entries")
        ms = []
        for i, t in enumerate(tried):
            if not isinstance(t, dict) or set(t) != {"spec", "recall", "recall_lower", "qps"}:
                raise ValueError(f"backend.tuning.tried[{i}] must be an object with spec, recall, recall_lower, qps")
            if not isinstance(t["spec"], str) or len(t["spec"]) > 200:
                raise ValueError(f"backend.tuning.tried[{i}].spec must be a spec string, got {t['spec']!r}")
            parse_spec(t["spec"])
            _num(t, "recall", 0.0, 1.0, f"backend.tuning.tried[{i}].")
            _num(t, "recall_lower", -1e9, 1.0, f"backend.tuning.tried[{i}].")
            _num(t, "qps", 0.0, 1e15, f"backend.tuning.tried[{i}].")
            ms.append(Measurement(t["spec"], float(t["recall"]), float(t["recall_lower"]), float(t["qps"])))
        rec = cls(**{k: d[k] for k in fields if k != "tried"}, tried=tuple(ms))
        if d["type"] != rec.index_type or d["params"] != rec.params:
            raise ValueError(f"backend.tuning.type/params ({d['type']!r}, {d['params']!r}) do not match "
                             f"backend.tuning.spec {spec!r}")
        return dataclasses.replace(rec, target_recall=float(rec.target_recall), recall=float(rec.recall),
                                   recall_lower=float(rec.recall_lower), qps=float(rec.qps),
                                   exact_qps=float(rec.exact_qps), tuning_s=float(rec.tuning_s),
                                   build_s=float(rec.build_s))


def _num(d: dict, key: str, lo: float, hi: float, prefix: str = "backend.tuning.", *, lo_open: bool = False) -> None:
    v = d[key]
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
          and (lo < v if lo_open else lo <= v) and v <= hi)
    if not ok:
        raise ValueError(f"{prefix}{key} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")


def _int(d: dict, key: str, lo: int, hi: int) -> None:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"backend.tuning.{key} must be an integer in [{lo}, {hi}], got {v!r}")


def retune_due(record: TuningRecord | Mapping[str, Any] | None, n_live: int, policy: TuningPolicy | None = None) -> bool:
    """Whether the next index build should tune again: no record, or the collection has grown
    to ``policy.growth`` times the rows it was tuned on."""
    policy = policy or DEFAULT_POLICY
    if record is None:
        return True
    n = record.n if isinstance(record, TuningRecord) else int(record["n"])
    return n_live >= policy.growth * max(n, 1)


# -- tuning ----------------------------------------------------------------------------------

@dataclass
class Tuned:
    """The result of :func:`tune`: the built index over every live row (None: exact search was
    chosen) and the record."""

    backend: Backend | None
    record: TuningRecord


def min_rows(target: AutoTarget) -> int:
    """The fewest live rows :func:`tune` can measure ``target`` on: at least 20, so that
    :func:`split_holdout` holds out two or more queries (a confidence bound needs a spread), and
    enough that the rows left after holding out number ``k`` or more (else every search returns
    them all and recall@k is 1 whatever the index)."""
    n = max(20, target.k)
    while n - min(target.sample, n // 10) < target.k:
        n += 1
    return n


def check_tunable(n_live: int, target: AutoTarget, what: str = "the collection") -> None:
    """Raise ``ValueError`` naming the size and the minimum where ``n_live`` rows are too few
    to tune for ``target`` (:func:`min_rows`)."""
    need = min_rows(target)
    if n_live < need:
        raise ValueError(f"'auto' tunes the index on {what}'s own rows, holding some out as queries: recall@"
                         f"{target.k} needs at least {need} rows, {what} has {n_live}; use backend 'exact' "
                         f"(exact search is what tuning would choose at this size) or a smaller k")


def _add_rows(b: Backend, vectors: np.ndarray, rows: np.ndarray, labels: np.ndarray | None = None,
              chunk: int = 65536) -> None:
    """Add ``vectors[rows]`` labelled ``labels[rows]`` (the row numbers when None)."""
    for lo in range(0, rows.size, chunk):
        part = rows[lo:lo + chunk]
        b.add(np.asarray(vectors[part], dtype=np.float32), part if labels is None else labels[part])


def _row_numbers(labels: np.ndarray | None) -> Callable[[np.ndarray], np.ndarray]:
    """Labels found by a search → row numbers (-1 stays -1); the identity when ``labels`` is None."""
    if labels is None:
        return lambda found: found
    order = np.argsort(labels, kind="stable")
    by_label = labels[order]

    def rows(found: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(by_label, found), 0, max(by_label.size - 1, 0))
        ok = (found >= 0) & (by_label[pos] == found) if by_label.size else np.zeros(found.shape, bool)
        return np.where(ok, order[pos], -1)

    return rows


def _timed_search(b: Backend, q: np.ndarray, k: int, clock: Callable[[], float]) -> tuple[np.ndarray, np.ndarray, float]:
    b.search(q[: min(10, q.shape[0])], k)  # warm-up: lazy allocations are not the setting's cost
    t0 = clock()
    s, i = b.search(q, k)
    return s, i, max(clock() - t0, 1e-9)


def tune(vectors: np.ndarray, alive: np.ndarray | None, target: AutoTarget, *,
         policy: TuningPolicy | None = None, clock: Callable[[], float] = time.perf_counter,
         ids: np.ndarray | None = None) -> Tuned:
    """Choose and build the index for ``target`` over the live rows of ``vectors``.

    ``vectors`` ``(N, D)`` float32 (array or memory map), ``alive`` an optional ``(N,)`` bool
    mask of the live rows, ``ids`` the ``(N,)`` labels the built index gives the rows (default:
    the row numbers, as the store keeps them; an in-memory :class:`~imret.retrieval.Retriever`
    passes its ids). Returns the built backend holding every live row (None when exact search
    is chosen) and the :class:`TuningRecord`. Deterministic given ``target.seed`` (see the
    module docstring); only the recorded times vary.
    """
    from . import create_backend
    from .base import as_ids

    policy = policy or DEFAULT_POLICY
    t_start = clock()
    n_all, dim = vectors.shape
    labels = None if ids is None else as_ids(ids, n_all)
    to_rows = _row_numbers(labels)
    alive = np.ones(n_all, bool) if alive is None else np.asarray(alive, dtype=bool)
    live = np.flatnonzero(alive)
    k = target.k
    base = dict(target_recall=target.recall, k=k, seed=target.seed, n=int(live.size), dim=int(dim))

    queries, rest = split_holdout(live, target.sample, target.seed)
    families = candidates(int(rest.size), int(dim), policy)
    if len(families) == 1:  # exact is fast enough: measure its speed on a sample, nothing to tune
        qi = queries if queries.size else live[: min(live.size, target.sample)]
        q = np.asarray(vectors[qi], dtype=np.float32)
        t0 = clock()
        exact_search(q, vectors, k, alive=alive)
        qps = q.shape[0] / max(clock() - t0, 1e-9) if q.shape[0] else 0.0
        reason = (f"N·D = {live.size}·{dim} <= {policy.exact_max_cells}: exact search is fast enough"
                  if live.size * dim <= policy.exact_max_cells or rest.size * dim <= policy.exact_max_cells
                  else f"{live.size} rows are too few to train an IVF index: exact search")
        rec = TuningRecord(spec="exact", sample=int(qi.size), recall=1.0, recall_lower=1.0, qps=qps, exact_qps=qps,
                           tuning_s=clock() - t_start, build_s=0.0, reason=reason, **base)
        return Tuned(None, rec)

    q = np.asarray(vectors[queries], dtype=np.float32)
    rest_alive = np.zeros(n_all, bool)
    rest_alive[rest] = True
    t0 = clock()
    gt_scores, _ = exact_search(q, vectors, k, alive=rest_alive)
    exact_qps = q.shape[0] / max(clock() - t0, 1e-9)

    tried: list[Measurement] = []
    skipped: list[str] = []
    for fam in families[:-1]:
        if fam.factory.endswith(",Flat") and not flat_can_help(tried, fam, target.recall, policy):
            skipped.append(fam.factory)
            continue
        t_build = clock()
        b = create_backend(fam.spec(), int(dim))
        try:
            if not b.is_trained:
                size = min(rest.size, max(b.min_train_size, policy.train_rows))
                rows = np.sort(np.random.default_rng([target.seed, 1]).choice(rest, size=size, replace=False))
                b.train(np.asarray(vectors[rows], dtype=np.float32))
                del rows
            _add_rows(b, vectors, rest, labels)
            build_s = clock() - t_build
            chosen = None
            for value in fam.values:
                b.set_params({fam.param: value})
                _, found, secs = _timed_search(b, q, k, clock)
                per_query = measure_recall(q, vectors, gt_scores, to_rows(found), k, alive=rest_alive)
                m = Measurement(fam.spec(value), float(per_query.mean()),
                                recall_lower_bound(per_query, policy.z), q.shape[0] / secs)
                tried.append(m)
                if select([m], target.recall) is not None:
                    chosen = m
                    break
            if chosen is not None:
                t_add = clock()
                _add_rows(b, vectors, queries, labels)  # the held-out rows join the collection
                build_s += clock() - t_add
                reason = (f"{fam.param}={b.params[fam.param]} is the smallest {fam.param} of "
                          f"{fam.factory} whose recall@{k} lower bound reaches {target.recall:g}")
                if len(tried) > 1 and any(not t.spec.startswith(f"faiss:{fam.factory}") for t in tried):
                    reason += " (more compact codes fell short)"
                rec = TuningRecord(spec=b.spec, sample=int(queries.size), recall=chosen.recall,
                                   recall_lower=chosen.recall_lower, qps=chosen.qps, exact_qps=exact_qps,
                                   tuning_s=clock() - t_start, build_s=build_s, reason=reason,
                                   tried=tuple(tried[-_MAX_TRIED:]), **base)
                return Tuned(b, rec)
        except BaseException:
            b.close()
            raise
        b.close()
    rec = TuningRecord(spec="exact", sample=int(queries.size), recall=1.0, recall_lower=1.0, qps=exact_qps,
                       exact_qps=exact_qps, tuning_s=clock() - t_start, build_s=0.0,
                       reason=f"no IVF setting reached recall@{k} {target.recall:g} before exact search is as fast"
                       + (f" ({', '.join(skipped)} not built: the coarser codes fell more than {policy.flat_gain:g} "
                          "short at its largest nprobe)" if skipped else ""),
                       tried=tuple(tried[-_MAX_TRIED:]), **base)
    return Tuned(None, rec)
