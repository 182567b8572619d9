"""FAISS indexes behind the backend contract: any index-factory string, inner product.

``faiss:<factory>?key=value&...`` builds ``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)``
and sets the search parameters after ``?``::

    nprobe          IVF lists visited per query (faiss default 1)
    efSearch        HNSW candidate-list size at search (the HNSW index, or an IVF's HNSW quantiser)
    efConstruction  HNSW candidate-list size while adding (set before any row is added)
    k_factor        refine: re-rank ``k * k_factor`` candidates with the exact vectors (RFlat, Refine(...))

Ids: IVF indexes store ids natively; every other index is wrapped in an ``IndexIDMap2``.
Removal uses ``remove_ids`` where FAISS supports it. Where it does not (HNSW, refine), a removed
row becomes a tombstone: its id in the map is replaced by a negative marker, searches fetch
``k + tombstones`` candidates and drop the marked ones, and :attr:`ntotal` excludes them. The
tombstones live in the saved index file, and a removed id may be added again.

Training (:attr:`min_train_size`): FAISS k-means wants at least 39 rows per centroid
(``min_points_per_centroid``; it samples at most 256 per centroid), so an index needs
``39 * K`` rows for its largest clustering: ``K = nlist`` for ``IVF<nlist>``, ``K = 2**nbits``
for ``PQ<m>x<nbits>`` codebooks (256 for the default 8 bits), 256 for OPQ. Scalar quantisers
only learn value ranges: 1000 rows. :meth:`train` refuses fewer rows than centroids (``K``),
which FAISS cannot cluster; between ``K`` and ``39 * K`` it trains with lower quality.
Polysemous PQ training (a code reordering that only polysemous Hamming-filtered search uses, which
is never enabled here) is switched off: it makes PQ training 10-40x slower for nothing.

``FAISS`` is optional: ``pip install 'imret[faiss]'`` (or ``faiss-cpu``). Importing this module
does not import it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._checks import positive_int
from .base import Backend, _check_k, as_ids, as_rows, pad_results

__all__ = ["FaissBackend", "check_ann_params", "default_ann_spec", "FAISS_PARAMS"]

#: Search / build parameters a ``faiss:`` spec accepts, in their canonical order.
FAISS_PARAMS = ("nprobe", "efSearch", "efConstruction", "k_factor")

_FILE_INDEX = "index.faiss"
_FILE_META = "faiss.json"
_META_FORMAT = 1
_DEAD = -2  # id-map marker of a tombstoned row (live ids are >= 0, FAISS's "no result" is -1)
_POINTS_PER_CENTROID = 39  # faiss.ClusteringParameters().min_points_per_centroid
_SQ_TRAIN_ROWS = 1000

# the "ann" alias (see default_ann_spec)
_ANN_MIN_IVF_ROWS = 10_000
_ANN_NLIST_RANGE = (16, 65536)
_ANN_HNSW = "HNSW32"
_ANN_EF_SEARCH = 128
_ANN_MIN_NPROBE = 64
_ANN_PARAMS = ("nprobe", "efSearch")


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "the 'faiss' backend needs FAISS: pip install 'imret[faiss]' (or pip install faiss-cpu)"
        ) from e
    return faiss


def _positive_int(name: str, value: Any) -> int:
    try:
        v = int(str(value).strip())
    except ValueError:
        raise ValueError(f"parameter {name}={value!r} must be a positive integer") from None
    if v < 1:
        raise ValueError(f"parameter {name}={value!r} must be a positive integer")
    return v


def _parse_params(params: dict[str, Any] | None) -> dict[str, int | float]:
    """Validate spec parameters (strings or numbers) into typed values, in canonical order."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(FAISS_PARAMS))
    if unknown:
        raise ValueError(f"unknown faiss parameter(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(FAISS_PARAMS)}")
    out: dict[str, int | float] = {}
    for name in FAISS_PARAMS:
        if name not in params:
            continue
        if name == "k_factor":
            try:
                v = float(str(params[name]).strip())
            except ValueError:
                v = float("nan")
            if not (math.isfinite(v) and v >= 1):
                raise ValueError(f"parameter k_factor={params[name]!r} must be a number >= 1")
            out[name] = v
        else:
            out[name] = _positive_int(name, params[name])
    return out


def _format_param(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _chain(index) -> list:
    """``index`` and the sub-indexes it wraps (id maps, transforms, refine base, HNSW storage), outermost first.

    IVF coarse quantisers are not part of the chain.
    """
    faiss = _faiss()
    out = [index]
    while True:
        c = out[-1]
        sub = None
        for attr in ("index", "base_index", "storage"):
            sub = getattr(c, attr, None)
            if isinstance(sub, faiss.Index):
                break
            sub = None
        if sub is None:
            return out
        out.append(faiss.downcast_index(sub))


def _takes_ids(index) -> bool:
    """Whether ``add_with_ids`` works on ``index`` itself (IVF, possibly under transforms; id maps)."""
    faiss = _faiss()
    for c in _chain(index):
        if isinstance(c, (faiss.IndexIDMap, faiss.IndexIVF)):
            return True
        if not isinstance(c, faiss.IndexPreTransform):
            return False
    return False


def _can_remove(index) -> bool:
    """Whether FAISS implements ``remove_ids`` for ``index`` (probed with an empty selector)."""
    faiss = _faiss()
    try:
        index.remove_ids(faiss.IDSelectorRange(0, 0))
    except RuntimeError:
        return False
    return True


def _train_sizes(index) -> tuple[int, int]:
    """``(fewest rows FAISS can train on, rows it should get)`` for ``index``; ``(0, 0)`` if untrainable."""
    faiss = _faiss()
    floor = 0  # centroids of the largest clustering, or input dimension of a PCA
    sq = False
    for c in _chain(index):
        if isinstance(c, faiss.IndexIVF):
            floor = max(floor, int(c.nlist))
        if isinstance(getattr(c, "pq", None), faiss.ProductQuantizer):
            floor = max(floor, int(c.pq.ksub))
        if isinstance(getattr(c, "sq", None), faiss.ScalarQuantizer):
            sq = True
        if isinstance(c, faiss.IndexPreTransform):
            for i in range(c.chain.size()):
                vt = faiss.downcast_VectorTransform(c.chain.at(i))
                if isinstance(vt, faiss.OPQMatrix):
                    floor = max(floor, 256)  # OPQ trains an 8-bit PQ internally
                elif isinstance(vt, faiss.PCAMatrix) or not vt.is_trained:
                    floor = max(floor, int(vt.d_in))
    if floor:
        return floor, max(_POINTS_PER_CENTROID * floor, _SQ_TRAIN_ROWS if sq else 0)
    if sq or not index.is_trained:
        return 1, _SQ_TRAIN_ROWS
    return 0, 0


def _stored_ids(index) -> np.ndarray:
    """The id of every stored row (tombstones included, as negative markers), in no particular order."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    parts = [np.zeros(0, np.int64)]
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            ptr = invlists.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, size).copy())
            invlists.release_ids(lst, ptr)
    return np.concatenate(parts).astype(np.int64, copy=False)


def _write_file(path: Path, write) -> None:
    """Create ``path``, let ``write(fileobj)`` fill it, and flush it to disk."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Boolean mask of ``values`` found in the sorted array ``sorted_set``."""
    if sorted_set.size == 0 or values.size == 0:
        return np.zeros(values.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[pos] == values


class FaissBackend(Backend):
    """A FAISS index over ``(N, dim)`` float32 rows, inner-product metric, spec ``faiss:<factory>?params``.

    ``factory`` is a FAISS index-factory string (``"Flat"``, ``"HNSW32"``, ``"IVF4096,SQ8"``,
    ``"IVF1024,PQ64x8,RFlat"``, ...); ``params`` maps names in :data:`FAISS_PARAMS` to values
    (strings as parsed from a spec, or numbers). Indexes with IVF / PQ / SQ parts must be
    :meth:`train`-ed before rows are added.
    """

    def __init__(self, dim: int, factory: str, params: dict[str, Any] | None = None):
        faiss = _faiss()
        self._setup(dim, factory, params)
        try:
            index = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"FAISS cannot build index {self.factory!r} for {self.dim}-D vectors: "
                             f"{_faiss_message(e)}") from None
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"FAISS index {self.factory!r} does not support inner-product search")
        self._attach(index)

    def _setup(self, dim: int, factory: str, params: dict[str, Any] | None) -> None:
        positive_int(dim, "dim")
        if not isinstance(factory, str) or not factory.strip():
            raise ValueError("faiss backend needs an index-factory string, e.g. 'HNSW32' or 'IVF4096,SQ8'; "
                             f"got {factory!r}")
        self.dim = int(dim)
        self.factory = factory.strip()
        self.params = _parse_params(params)
        self.spec = f"faiss:{self.factory}"
        if self.params:
            self.spec += "?" + "&".join(f"{k}={_format_param(v)}" for k, v in self.params.items())

    def _attach(self, index) -> None:
        """Adopt ``index`` (fresh or loaded): add an id map where needed, apply the parameters."""
        faiss = _faiss()
        if not _takes_ids(index):
            index = faiss.IndexIDMap2(index)
        removable = _can_remove(index)
        if not removable and not isinstance(index, faiss.IndexIDMap):
            index = faiss.IndexIDMap2(index)  # tombstones need an id map to mark
        for c in _chain(index):
            if getattr(c, "do_polysemous_training", False):
                # only polysemous (Hamming-filtered) search uses it, which imret never enables;
                # it multiplies PQ training time by ~10-40x
                c.do_polysemous_training = False
        self._index = index
        self.supports_remove = removable
        self._train_floor, self._train_rows = _train_sizes(index)
        self._apply_params()
        stored = _stored_ids(index) if index.ntotal else np.zeros(0, np.int64)
        live = stored[stored >= 0]
        self._n_dead = int(stored.size - live.size)
        self._ids = np.sort(live)  # sorted live ids, for duplicate checks and remove counts

    def set_params(self, params: dict[str, Any]) -> None:
        """Change search parameters (``nprobe``, ``efSearch``, ``k_factor``) in place, no rebuild;
        :attr:`spec` follows. ``efConstruction`` only applies before rows are added."""
        merged = {**self.params, **_parse_params(params)}
        old = self.params
        self._setup(self.dim, self.factory, merged)
        try:
            self._apply_params()
        except ValueError:
            self._setup(self.dim, self.factory, old)
            raise

    def _apply_params(self) -> None:
        faiss = _faiss()
        chain = _chain(self._index)
        ivf = next((c for c in chain if isinstance(c, faiss.IndexIVF)), None)
        hnsw = next((c for c in chain if isinstance(c, faiss.IndexHNSW)), None)
        if hnsw is None and ivf is not None:
            quantizer = faiss.downcast_index(ivf.quantizer)
            hnsw = quantizer if isinstance(quantizer, faiss.IndexHNSW) else None
        refine = next((c for c in chain if isinstance(c, faiss.IndexRefine)), None)
        targets = {
            "nprobe": (ivf, "an IVF part"),
            "efSearch": (hnsw, "an HNSW part"),
            "efConstruction": (hnsw, "an HNSW part"),
            "k_factor": (refine, "a refine stage (RFlat, Refine(...))"),
        }
        for name, value in self.params.items():
            target, needs = targets[name]
            if target is None:
                usable = [n for n, (t, _) in targets.items() if t is not None]
                raise ValueError(f"parameter {name!r} needs {needs}, which FAISS index {self.factory!r} lacks; "
                                 f"parameters for it: {', '.join(usable) or 'none'}")
            if name == "nprobe":
                target.nprobe = value
            elif name == "efSearch":
                target.hnsw.efSearch = value
            elif name == "efConstruction":
                target.hnsw.efConstruction = value
            else:
                target.k_factor = value

    # -- state ------------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self._ids.size)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def min_train_size(self) -> int:
        """Rows :meth:`train` should get: 39 per centroid of the largest clustering (0: no training)."""
        return self._train_rows

    @property
    def tombstones(self) -> int:
        """Removed rows still stored (indexes without FAISS removal); they are skipped at search."""
        return self._n_dead

    def train(self, x: np.ndarray) -> None:
        """Train the coarse quantiser / codebooks on ``(n, dim)`` rows; a no-op once trained."""
        x = as_rows(x, self.dim, "training rows")
        if self.is_trained:
            return
        if x.shape[0] < self._train_floor:
            raise ValueError(f"FAISS index {self.factory!r} needs at least {self._train_floor} training rows "
                             f"({self._train_rows} recommended), got {x.shape[0]}")
        try:
            self._index.train(x)
        except RuntimeError as e:
            raise ValueError(f"FAISS could not train {self.factory!r} on {x.shape[0]} rows: "
                             f"{_faiss_message(e)}") from None

    # -- rows -------------------------------------------------------------------------------

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        x = as_rows(x, self.dim)
        ids = as_ids(ids, x.shape[0])
        if ids.size == 0:
            return
        if not self.is_trained:
            raise RuntimeError(f"FAISS index {self.factory!r} is not trained: call train() first with "
                               f"{self._train_rows} rows (at least {self._train_floor})")
        clash = ids[_member(ids, self._ids)]
        if clash.size:
            raise ValueError(f"ids already present: {clash[:5].tolist()}")
        self._index.add_with_ids(x, ids)
        self._ids = np.sort(np.concatenate([self._ids, ids]))

    def remove(self, ids: np.ndarray) -> int:
        faiss = _faiss()
        ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        present = ids[_member(ids, self._ids)]
        if present.size == 0:
            return 0
        if self.supports_remove:
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(present.size, faiss.swig_ptr(present))))
        else:
            id_map = faiss.vector_to_array(self._index.id_map)
            dead = _member(id_map, present)
            id_map[dead] = _DEAD
            faiss.copy_array_to_vector(id_map, self._index.id_map)
            if isinstance(self._index, faiss.IndexIDMap2):
                self._index.construct_rev_map()
            removed = int(np.count_nonzero(dead))
            self._n_dead += removed
        self._ids = self._ids[~_member(self._ids, present)]
        return removed

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_rows(q, self.dim, "queries")
        k = _check_k(k)
        nq = q.shape[0]
        if nq == 0 or self.ntotal == 0:
            return pad_results(np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64), k)
        kk = min(k + self._n_dead, int(self._index.ntotal))
        scores, ids = self._index.search(q, kk)
        valid = ids >= 0  # -1: FAISS found fewer rows; _DEAD: a tombstone
        if not valid.all():
            order = np.argsort(~valid, axis=1, kind="stable")  # valid results first, rank order kept
            scores = np.take_along_axis(scores, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
            valid = np.take_along_axis(valid, order, axis=1)
            scores = np.where(valid, scores, -np.inf)
            ids = np.where(valid, ids, -1)
        return pad_results(scores[:, :k], ids[:, :k], k)

    # -- files ------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``index.faiss`` (FAISS's own format) and ``faiss.json`` into ``directory``."""
        faiss = _faiss()
        d = Path(directory)

        def write_index(f) -> None:
            writer = faiss.PyCallbackIOWriter(f.write)
            faiss.write_index(self._index, writer)
            del writer

        _write_file(d / _FILE_INDEX, write_index)
        meta = {
            "format": _META_FORMAT,
            "factory": self.factory,
            "params": {k: _format_param(v) for k, v in self.params.items()},
            "dim": self.dim,
            "ntotal": self.ntotal,
            "stored": int(self._index.ntotal),
            "tombstones": self._n_dead,
            "faiss_version": faiss.__version__,
        }
        text = json.dumps(meta, indent=2) + "\n"
        _write_file(d / _FILE_META, lambda f: f.write(text.encode("utf-8")))

    @classmethod
    def load(cls, directory: str | os.PathLike, dim: int, factory: str,
             params: dict[str, Any] | None = None) -> "FaissBackend":
        """Reopen a backend written by :meth:`save`; ``dim`` and ``factory`` must match the saved ones.

        ``params`` (search parameters) may differ from the saved ones and are applied.
        """
        faiss = _faiss()
        b = cls.__new__(cls)
        b._setup(dim, factory, params)
        d = Path(directory)
        meta_path, index_path = d / _FILE_META, d / _FILE_INDEX
        for p in (meta_path, index_path):
            if not p.is_file():
                raise FileNotFoundError(f"FAISS backend file missing: {p}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            saved_factory, saved_dim, stored = str(meta["factory"]), int(meta["dim"]), int(meta["stored"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path} is not a valid FAISS backend description "
                             f"({type(e).__name__}: {e})") from None
        if saved_factory != b.factory:
            raise ValueError(f"{d} holds a FAISS {saved_factory!r} index, but the spec asks for {b.factory!r}")
        if saved_dim != b.dim:
            raise ValueError(f"{d} holds {saved_dim}-D vectors, but {b.dim}-D were asked for")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as e:
            raise ValueError(f"cannot read FAISS index {index_path} (truncated or corrupt?): "
                             f"{_faiss_message(e)}") from None
        if index.d != b.dim or index.ntotal != stored or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{index_path} does not match {meta_path} (dim {index.d}, {index.ntotal} rows; "
                             f"expected {saved_dim}-D, {stored} rows, inner product)")
        b._attach(index)
        return b

    def close(self) -> None:
        self._index = None

    def describe(self) -> dict[str, Any]:
        faiss = _faiss()
        chain = _chain(self._index)
        info = super().describe()
        info.update(
            factory=self.factory,
            params={k: _format_param(v) for k, v in self.params.items()},
            index_type=" > ".join(type(c).__name__ for c in chain),
            is_trained=self.is_trained,
            min_train_size=self.min_train_size,
            supports_remove=self.supports_remove,
            tombstones=self._n_dead,
        )
        ivf = next((c for c in chain if isinstance(c, faiss.IndexIVF)), None)
        if ivf is not None:
            info.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
        hnsw = next((c for c in chain if isinstance(c, faiss.IndexHNSW)), None)
        if hnsw is not None:
            info.update(efSearch=int(hnsw.hnsw.efSearch), efConstruction=int(hnsw.hnsw.efConstruction))
        refine = next((c for c in chain if isinstance(c, faiss.IndexRefine)), None)
        if refine is not None:
            info.update(k_factor=float(refine.k_factor))
        size = [0]

        def count(b: bytes) -> int:
            size[0] += len(b)
            return len(b)

        writer = faiss.PyCallbackIOWriter(count)
        faiss.write_index(self._index, writer)
        del writer
        info["index_bytes"] = size[0]
        return info


def _faiss_message(e: BaseException) -> str:
    """The useful last line of a FAISS C++ exception ("Error in ... at file:line: Error: '...' failed: ...")."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    marker = line.find(": Error: ")
    return line[marker + 2:] if marker >= 0 else line


def check_ann_params(params: dict[str, Any]) -> dict[str, int]:
    """The parameters of an ``ann`` spec checked: names in ``nprobe``, ``efSearch``, values
    positive integers (whichever index the alias later picks)."""
    unknown = sorted(set(params) - set(_ANN_PARAMS))
    if unknown:
        raise ValueError(f"unknown 'ann' parameter(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(_ANN_PARAMS)}")
    return {name: _positive_int(name, value) for name, value in params.items()}


def default_ann_spec(n: int, **params: Any) -> str:
    """The ``faiss:`` spec the ``ann`` alias stands for, sized for ``n`` rows.

    - ``n < 10_000`` (or unknown, 0): ``HNSW32`` with ``efSearch=128``; no training, and at this
      size any IVF would have too few rows per list.
    - otherwise ``IVF<nlist>,SQ8``: ``nlist`` is the power of two nearest ``4 * sqrt(n)``,
      clamped to 16..65536 and halved until ``39 * nlist <= n`` (enough rows to train it);
      ``nprobe = max(64, nlist // 128)``, i.e. at least 1/128 of the lists.

    Measured with ``benchmarks/search.py`` (clustered synthetic 512-D descriptors, k=100, see
    BENCHMARKS.md): at 1M rows ``IVF4096,SQ8`` gives recall@100 0.992 at nprobe 32 and 0.994 at
    nprobe 64 (about 50x the exact-search throughput); at 100k rows ``IVF1024,SQ8`` needs nprobe
    64 for 0.958 (16 gave 0.876), hence the floor of 64 probes.
    ``params`` may override ``nprobe`` (used when the rule picks IVF, capped at ``nlist``) and
    ``efSearch`` (used when it picks HNSW); other names raise ``ValueError``.
    """
    check_ann_params(params)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer (expected number of rows), got {n!r}")
    n = int(n)
    if n < _ANN_MIN_IVF_ROWS:
        ef = _positive_int("efSearch", params["efSearch"]) if "efSearch" in params else _ANN_EF_SEARCH
        return f"faiss:{_ANN_HNSW}?efSearch={ef}"
    lo, hi = _ANN_NLIST_RANGE
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = min(hi, max(lo, nlist))
    while nlist > lo and _POINTS_PER_CENTROID * nlist > n:
        nlist //= 2
    nprobe = _positive_int("nprobe", params["nprobe"]) if "nprobe" in params else max(_ANN_MIN_NPROBE, nlist // 128)
    return f"faiss:IVF{nlist},SQ8?nprobe={min(nprobe, nlist)}"
