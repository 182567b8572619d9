"""Re-ranker spec strings: one way to name a second stage in the store, the CLI, the server,
evaluation and Python.

A spec is ``kind[:top_k][?key=value&key=value]``, like a backend spec:

========= ===============================================================================
``sift``  geometric verification with RootSIFT (:class:`imret.local.verification.GeometricVerifier`)
``cnn``   geometric verification with the model's own CNN local features
``aml``   object localisation by approximate integral max-pooling, re-rank by the region
          (:class:`imret.local.localization.LocalizationReranker`)
``sg``    SuperGlobal-style top-M refinement of the global descriptors
          (:class:`imret.refinement.TopMRefiner`)
========= ===============================================================================

``top_k`` is how many candidates the stage looks at (``sg``: M). Parameters are the
keyword arguments of the stage's class (``sift:100?min_inliers=15&model=homography``),
checked against its signature before anything heavy runs.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .specs import spec_value, split_spec

__all__ = ["RERANK_KINDS", "RerankSpec", "RerankSources", "PathSources", "parse_rerank", "check_rerank",
           "build_reranker", "build_rerankers"]

# kind -> (default top_k, "module:Class" of the stage, the class keyword top_k maps to)
_KINDS: dict[str, tuple[int, str, str]] = {
    "sift": (100, "imret.local.verification:GeometricVerifier", "top_k"),
    "cnn": (100, "imret.local.verification:GeometricVerifier", "top_k"),
    "aml": (100, "imret.local.localization:LocalizationReranker", "top_k"),
    "sg": (400, "imret.refinement:TopMRefiner", "m"),
}
RERANK_KINDS = tuple(_KINDS)
CNN_THRESHOLD = 20.0  # RANSAC threshold of cnn stages, px at 1024 px (DELG's, for stride-16 features)
# keyword arguments a builder supplies (sources, callables), never given in a spec
_SUPPLIED = {"sift": {"extract_query", "database"}, "cnn": {"extract_query", "database"},
             "aml": {"model", "maps", "postprocess"}, "sg": {"rows"}}


@dataclass(frozen=True)
class RerankSpec:
    """A parsed re-ranker spec: ``kind``, ``top_k`` (None: the kind's default) and the
    stage's keyword ``params`` (strings converted to numbers and booleans where they look so)."""

    kind: str
    top_k: int
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        q = "&".join(f"{k}={_show(v)}" for k, v in self.params.items())
        return f"{self.kind}:{self.top_k}" + (f"?{q}" if q else "")

    @property
    def stage(self) -> type:
        """The class this spec builds (imported on first use)."""
        import importlib

        mod, _, name = _KINDS[self.kind][1].partition(":")
        return getattr(importlib.import_module(mod), name)


def _show(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def parse_rerank(spec: "str | RerankSpec") -> RerankSpec:
    """Parse ``kind[:top_k][?key=value&...]``; raises ``ValueError`` naming the valid kinds."""
    if isinstance(spec, RerankSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"re-ranker spec must be a non-empty string, got {spec!r}; kinds: {', '.join(RERANK_KINDS)}")
    kind, colon, top, raw = split_spec(spec, "re-ranker spec")
    if kind not in _KINDS:
        raise ValueError(f"unknown re-ranker {kind!r} in {spec!r}; available: {', '.join(RERANK_KINDS)}")
    if colon:
        try:
            top_k = int(top)
        except ValueError:
            top_k = 0
        if top_k < 1:
            raise ValueError(f"the number of candidates in {spec!r} must be a positive integer, got {top!r}")
    else:
        top_k = _KINDS[kind][0]
    params: dict[str, Any] = {k: spec_value(v) for k, v in raw.items()}
    return RerankSpec(kind, top_k, params)


def check_rerank(spec: "str | RerankSpec") -> RerankSpec:
    """Parse ``spec`` and check its parameters against the stage's signature (names only;
    values are checked when the stage is built), so that a typo fails before any work."""
    s = parse_rerank(spec)
    sig = inspect.signature(s.stage)
    known = [n for n, p in sig.parameters.items()
             if n != "self" and n not in _SUPPLIED[s.kind] and p.kind is not p.VAR_KEYWORD]
    count_key = _KINDS[s.kind][2]
    for key in s.params:
        if key == count_key:
            raise ValueError(f"give the number of candidates as {s.kind}:N, not {key}=... (in {str(s)!r})")
        if key not in known:
            raise ValueError(f"unknown parameter {key!r} for re-ranker {s.kind!r}; "
                             f"available: {', '.join(k for k in known if k != count_key)}")
    return s


# --- building stages -----------------------------------------------------------------------------


@dataclass
class RerankSources:
    """What the stages read, supplied by whoever holds the database (the store, or a caller
    with its database in memory, see :class:`PathSources`).

    Attributes:
        model: the retrieval model (CNN local features, localisation maps and regions).
        image_size: the long side images are extracted at (localisation maps of queries).
        rows: ``rows(ids (Q, k)) -> (Q, k, D')`` the database's post-processed rows (``sg``).
        postprocess: raw ``(N, D)`` descriptors -> post-processed rows (``aml``).
        local_query: ``kind -> f(image, box) -> LocalFeatures`` for query images.
        local_database: ``kind -> f(ids) -> [LocalFeatures | None]`` for database images.
        maps: ``maps(ids) -> [(fmap, (width, height)) | None]`` database feature maps (``aml``)
            at ``image_size``.
        maps_at: ``size -> maps`` the same at another long side (an ``aml`` stage with its own
            ``image_size``: localise on a finer map than the first stage searches with).
        device: where the model runs on query images.
    """

    model: Any = None
    image_size: int = 1024
    rows: Any = None
    postprocess: Any = None
    local_query: Any = None
    local_database: Any = None
    maps: Any = None
    maps_at: Any = None
    device: Any = None


def build_reranker(spec: "str | RerankSpec", sources: RerankSources):
    """The stage a spec names, reading from ``sources``; a missing source is named."""
    s = check_rerank(spec)
    cls = s.stage
    if s.kind in ("sift", "cnn"):
        if sources.local_query is None or sources.local_database is None:
            raise ValueError(f"re-ranker {s.kind!r} needs local features of the database images")
        params = dict(s.params)
        if s.kind == "cnn":  # features on a stride-16 grid: DELG's 20 px (at 1024 px), not SIFT's 8
            params.setdefault("threshold", CNN_THRESHOLD)
        return cls(sources.local_query(s.kind), sources.local_database(s.kind), top_k=s.top_k, **params)
    if s.kind == "aml":
        if sources.model is None or sources.maps is None:
            raise ValueError("re-ranker 'aml' needs the model and the database images' feature maps")
        params = dict(s.params)
        params.setdefault("image_size", sources.image_size)
        params.setdefault("device", sources.device)
        maps = sources.maps
        if params["image_size"] != sources.image_size:  # queries and database localised at the same size
            if sources.maps_at is None:
                raise ValueError(f"re-ranker 'aml' at image_size={params['image_size']} needs database maps at that "
                                 f"size; these sources have them at {sources.image_size} only")
            maps = sources.maps_at(params["image_size"])
        return cls(sources.model, maps, sources.postprocess, top_k=s.top_k, **params)
    if sources.rows is None:
        raise ValueError("re-ranker 'sg' needs the database rows")
    return cls(sources.rows, m=s.top_k, **s.params)


def build_rerankers(specs: "Sequence[str | RerankSpec] | str | None", sources: RerankSources) -> list:
    """The stages of several specs, in order (a string may hold one spec)."""
    if specs is None:
        return []
    if isinstance(specs, (str, RerankSpec)):
        specs = [specs]
    return [build_reranker(s, sources) for s in specs]


class _Cached:
    """``f(ids) -> [value | None]`` over a per-id computation, keeping what it computed (an
    ``lru`` bound on the number of ids held, None: all)."""

    def __init__(self, compute: Callable[[int], Any], lru: int | None = None) -> None:
        from collections import OrderedDict

        self._compute = compute
        self._lru = lru
        self._cache: "OrderedDict[int, Any]" = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, ids) -> list:
        out = []
        for i in np.asarray(ids, dtype=np.int64).ravel().tolist():
            if i < 0:  # padding
                out.append(None)
                continue
            with self._lock:
                hit = i in self._cache
                if hit:
                    self._cache.move_to_end(i)
                    out.append(self._cache[i])
                    continue
            v = self._compute(i)
            with self._lock:
                self._cache[i] = v
                if self._lru is not None and len(self._cache) > self._lru:
                    self._cache.popitem(last=False)
            out.append(v)
        return out


@dataclass
class PathSources:
    """Re-ranker sources for a database of image files held in memory (id ``i`` is
    ``paths[i]``): local features and feature maps are computed the first time a stage asks
    for an id and kept (``lru`` ids at most per kind; None: all). For evaluation, benchmarks
    and :class:`~imret.retrieval.Retriever` users; a store keeps its local features on disk.

    ``local_params`` are the extractors' keyword arguments per kind (e.g.
    ``{"sift": {"max_keypoints": 500}}``). ``as_stored``: database features go through the
    store's record format (:class:`~imret.local.storage.RecordLayout`: quantised codes) first,
    so that results are those a store would give.
    """

    paths: Sequence[str]
    model: Any = None
    image_size: int = 1024
    rows: Any = None
    postprocess: Any = None
    local_params: dict = field(default_factory=dict)
    device: Any = None
    lru: int | None = None
    as_stored: bool = False

    def __post_init__(self) -> None:
        self._extractors: dict[str, Any] = {}
        self._dbs: dict[str, _Cached] = {}
        self._maps: dict[int, _Cached] = {}

    def extractor(self, kind: str):
        from .local.extractors import create_local_extractor

        if kind not in self._extractors:
            self._extractors[kind] = create_local_extractor(kind, self.local_params.get(kind, {}), self.model)
        return self._extractors[kind]

    def database(self, kind: str) -> _Cached:
        if kind not in self._dbs:
            ex = self.extractor(kind)
            layout = ex.layout() if self.as_stored else None

            def one(i: int):
                f = _quiet(ex, self.paths[i])
                return f if layout is None or f is None else layout.unpack(layout.pack(f))

            self._dbs[kind] = _Cached(one, self.lru)
        return self._dbs[kind]

    def maps_at(self, size: int) -> _Cached:
        """Database feature maps at ``size`` px long side, computed on demand and kept."""
        from .local.localization import compute_maps

        if size not in self._maps:
            def one(i: int):
                (fm,) = compute_maps(self.model, [self.paths[i]], image_size=size, device=self.device)
                return fm

            self._maps[size] = _Cached(one, self.lru)
        return self._maps[size]

    def sources(self) -> RerankSources:
        has_model = self.model is not None
        return RerankSources(model=self.model, image_size=self.image_size, rows=self.rows, postprocess=self.postprocess,
                             local_query=self.extractor, local_database=self.database,
                             maps=self.maps_at(self.image_size) if has_model else None,
                             maps_at=self.maps_at if has_model else None, device=self.device)


def _quiet(extractor, path):
    """Local features of a database file, or None when it cannot be read."""
    try:
        return extractor(path, None)
    except Exception:
        return None
