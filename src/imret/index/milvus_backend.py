"""Milvus backend: the index lives in Milvus Lite (an embedded database) or a Milvus server.

``milvus:./vectors.db`` opens Milvus Lite, the embedded engine of the ``milvus-lite``
package: no server to run, the data sit in a local ``.db`` directory (relative paths
resolve against the store directory), and one process at a time may open it (a file lock).
It runs inside the Python process, so it suits one machine and up to about a million rows
(measured here: ~15k rows/s inserted, ~2000 queries/s at k=10 and ~200 at k=100 with HNSW
over 50k 256-D rows).

``milvus:http://host:19530`` (or ``https://``, ``tcp://``) talks to a Milvus standalone
server or a cluster. Move there when several processes must write or search at once, when
the collection outgrows one machine, or when search runs on another host. Start Milvus with
its docker compose file (standalone), its helm chart (Kubernetes cluster) or, to try it on
one machine, the ``milvus`` package (``pip install 'imret[milvus-server]'``, then
``milvus-server --data DIR``), then switch the store over, which rebuilds the index from the
stored descriptors::

    imret index configure STORE --backend 'milvus:http://host:19530'

The descriptors stay in the store, so a Milvus collection is a derived copy that can always
be rebuilt (``imret index rebuild STORE``).

Parameters after ``?`` (see :data:`PARAMS`)::

    milvus:./vectors.db?index=HNSW&M=16&efConstruction=200&ef=128
    milvus:http://host:19530?collection=products&index=IVF_FLAT&nlist=4096&nprobe=32

Collections: Milvus Lite uses ``imret`` (one database file per store). On a server, a
backend made for a store (``root`` given) without ``?collection=`` uses
``imret_`` + 16 hex digits of the SHA-256 of the store directory's absolute path, so stores
sharing a server never touch each other's collection, and writes that name into its
:attr:`~MilvusBackend.spec` (saved in the store), so the store finds it again if moved. A
collection of that name is replaced only when this module made it.

The collection has an INT64 primary key ``id`` and a FLOAT_VECTOR field ``vector`` indexed
for inner product (``IP``). Reads use ``Strong`` consistency on Milvus Lite and ``Session``
on a server (``?consistency=``): either way a process finds the rows it added as soon as
:meth:`MilvusBackend.add` returns. ``Strong`` also waits for every other client's writes,
which on a server costs a time tick (~200 ms) per request (measured: 200 ms against 4 ms
for one query); with ``Session`` another process's rows appear a moment later. Milvus Lite,
though, searches new rows by brute force
(exact, and slow at scale) until they are flushed into a segment and that segment is
indexed, which a load of the collection does at once and its background worker only some
time after a flush. :meth:`MilvusBackend.flush` (and :meth:`~MilvusBackend.save`, which the
store calls after every add) therefore releases, flushes and loads a Lite collection again
when rows were inserted since it was loaded: when it returns, searches use the index. The
reload builds the index of the new rows only (seconds per 10k rows) and is skipped when no
rows were inserted. A server indexes on its own and is never released.

Credentials: ``?token=user:password`` (or an API key), or ``user:password@`` in the URI,
which is moved into the token. The token goes to the client only: it is left out of
:attr:`MilvusBackend.spec`, :meth:`MilvusBackend.describe`, ``milvus.json`` and error
messages, so whoever reopens the backend must pass it again. A store refuses a spec that
holds credentials (:func:`check_no_secrets`; its spec is saved in ``store.json``): give it
the token with ``Store.open(..., backend_options={"token": ...})`` or, for the CLI,
``IMRET_MILVUS_TOKEN``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np

from .._checks import positive_int
from .base import Backend, BackendSpec, _check_k, as_ids, as_rows

__all__ = ["CONSISTENCY_LEVELS", "INDEX_TYPES", "LITE_INDEX_TYPES", "MAX_TOPK", "PARAMS", "MilvusBackend",
           "MilvusConfig", "check_no_secrets", "milvus_config"]

#: Every parameter a ``milvus:`` spec accepts, with what it does.
PARAMS: dict[str, str] = {
    "collection": "collection name (default 'imret'; one collection per store)",
    "index": "Milvus index type (default HNSW; see INDEX_TYPES)",
    "M": "HNSW: graph degree (default 16)",
    "efConstruction": "HNSW: candidate list size while building (default 200)",
    "ef": "HNSW: candidate list size while searching, raised to k when smaller (default 128)",
    "nlist": "IVF: clusters per segment (default 128; about 4 * sqrt(rows) for millions of rows)",
    "nprobe": "IVF: clusters visited per query (default 16)",
    "token": "server authentication, 'user:password' or an API key (never stored or shown)",
    "db_name": "Milvus database (default: the server's default database)",
    "consistency": "reads: Session (server default: this process sees its own writes) or Strong "
                   "(Milvus Lite default: every write of any process; on a server ~200 ms a request)",
}

#: Consistency levels of reads; both let a process read what it wrote (the backend's contract).
CONSISTENCY_LEVELS = ("Session", "Strong")

#: Build / search parameters per index family, with their defaults.
_HNSW_PARAMS = {"M": 16, "efConstruction": 200}
_HNSW_SEARCH = {"ef": 128}
_IVF_PARAMS = {"nlist": 128}
_IVF_SEARCH = {"nprobe": 16}

_HNSW_TYPES = ("HNSW", "HNSW_SQ", "HNSW_PQ", "HNSW_PRQ")
_IVF_TYPES = ("IVF_FLAT", "IVF_SQ8", "IVF_PQ", "IVF_RABITQ", "SCANN")

#: Dense float index types a Milvus server accepts (the server checks the finer details).
INDEX_TYPES = ("FLAT", "HNSW", "HNSW_SQ", "HNSW_PQ", "HNSW_PRQ", "IVF_FLAT", "IVF_SQ8", "IVF_PQ",
               "IVF_RABITQ", "SCANN", "DISKANN", "AUTOINDEX")
#: The subset Milvus Lite builds. Lite accepts any name but silently falls back to brute
#: force for the others, so they are refused here.
LITE_INDEX_TYPES = ("FLAT", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "AUTOINDEX")
_DEFAULT_INDEX = "HNSW"
_DEFAULT_COLLECTION = "imret"

#: The most results Milvus returns per query (its ``topk`` limit).
MAX_TOPK = 16384

_SERVER_SCHEMES = ("http", "https", "tcp")
_PK, _VEC = "id", "vector"
# marks the collections this module made (and so may drop): the description, and a property
# since Milvus Lite does not keep descriptions
_MARK = "imret index"
_MARK_PROPERTY = "imret.kind"
_FILE_META = "milvus.json"
_BATCH_BYTES = 16 << 20  # vector payload per insert / fetch request
_ID_CHUNK = 4096  # ids per filter expression
_RESULT_BUDGET = 1 << 20  # query rows x k per search request

# Milvus Lite runs one in-process server per file; it is stopped (releasing the file lock)
# when the last backend of this process that uses the file is closed.
_LITE_LOCK = threading.Lock()
_LITE_USERS: dict[str, int] = {}


def _import_pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise ImportError("the milvus backend needs pymilvus and milvus-lite: "
                          "pip install 'imret[milvus]'") from None
    return pymilvus


def _redact(uri: str) -> str:
    """``uri`` without a ``user:password@`` part."""
    parts = urlsplit(uri)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))
    return uri


def _positive_int(name: str, value: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = 0
    if v < 1:
        raise ValueError(f"milvus parameter {name} must be a positive integer, got {value!r}")
    return v


@dataclass(frozen=True)
class MilvusConfig:
    """A parsed ``milvus:`` target and parameters: where the collection is and how it is indexed."""

    spec: str  #: the spec string without the token
    uri: str  #: absolute ``.db`` path (Lite) or server URI
    lite: bool
    collection: str
    db_name: str
    index_type: str
    index_params: dict[str, int]
    search_params: dict[str, int]
    consistency: str = "Strong"
    token: str = field(default="", repr=False)

    @property
    def safe_uri(self) -> str:
        """:attr:`uri` without a ``user:password@`` part."""
        return _redact(self.uri)


def milvus_config(target: str, params: dict[str, str] | None = None, *, root: Path | None = None) -> MilvusConfig:
    """Check and resolve a ``milvus:`` target and its parameters (no connection is made).

    Relative ``.db`` paths resolve against ``root`` (the store directory), else the working
    directory. Raises ``ValueError`` naming the valid choices.
    """
    target = str(target)
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown milvus parameter(s) {', '.join(unknown)}; valid: {', '.join(PARAMS)}")
    if not target:
        raise ValueError("the milvus backend needs a target, e.g. 'milvus:./vectors.db' or "
                         "'milvus:http://host:19530'")
    public = {k: v for k, v in params.items() if k != "token"}
    token = params.get("token", "")

    scheme = urlsplit(target).scheme.lower()
    if scheme in _SERVER_SCHEMES:
        lite = False
        target, user_info = _split_user_info(target)
        if user_info:
            if token:
                raise ValueError(f"milvus target {_redact(target)!r} has credentials both in the URI and in "
                                 f"the token parameter; give them once, as the token")
            token = user_info
        uri = target
    elif len(scheme) > 1:  # a single letter is a Windows drive
        raise ValueError(f"milvus target {_redact(target)!r} has scheme {scheme!r}; expected a local '.db' "
                         f"path or one of {', '.join(s + '://' for s in _SERVER_SCHEMES)}")
    else:
        if not target.endswith(".db"):
            raise ValueError(f"a Milvus Lite target must be a path ending in '.db', got {target!r}")
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = (Path(root) if root is not None else Path.cwd()) / path
        lite, uri = True, os.path.abspath(path)

    if "collection" in params:
        collection = params["collection"]
    elif not lite and root is not None:
        # stores sharing a server get a collection each: named after the store directory,
        # and written into the spec so that the store finds it again wherever it moves
        collection = _store_collection(Path(root))
        public["collection"] = collection
    else:
        collection = _DEFAULT_COLLECTION
    if not collection or collection[0].isdigit() or not all(
            c.isascii() and (c.isalnum() or c == "_") for c in collection):
        raise ValueError(f"milvus collection name must be letters, digits and '_', not starting with a digit; "
                         f"got {collection!r}")

    index = params.get("index", _DEFAULT_INDEX).upper()
    allowed = LITE_INDEX_TYPES if lite else INDEX_TYPES
    if index not in allowed:
        where = "Milvus Lite" if lite else "the milvus backend"
        raise ValueError(f"index type {index!r} is not supported by {where}; available: {', '.join(allowed)}")
    if index in _HNSW_TYPES:
        build, search = dict(_HNSW_PARAMS), dict(_HNSW_SEARCH)
    elif index in _IVF_TYPES:
        build, search = dict(_IVF_PARAMS), dict(_IVF_SEARCH)
    else:
        build, search = {}, {}
    for name in ("M", "efConstruction", "ef", "nlist", "nprobe"):
        if name not in params:
            continue
        if name not in build and name not in search:
            takes = ", ".join([*build, *search]) or "none of M, efConstruction, ef, nlist, nprobe"
            raise ValueError(f"milvus parameter {name} does not apply to index {index}; it takes {takes}")
        (build if name in build else search)[name] = _positive_int(name, params[name])
    consistency = params.get("consistency", "Strong" if lite else "Session")
    if consistency not in CONSISTENCY_LEVELS:
        raise ValueError(f"milvus consistency must be one of {', '.join(CONSISTENCY_LEVELS)}, got {consistency!r}")
    return MilvusConfig(spec=str(BackendSpec("milvus", target, public)), uri=uri, lite=lite,
                        collection=collection, db_name=params.get("db_name", ""), index_type=index,
                        index_params=build, search_params=search, consistency=consistency, token=token)


def _split_user_info(uri: str) -> tuple[str, str]:
    """``(uri without 'user:password@', 'user:password')``; the second is empty without one."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, ""
    user_info, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=host)), unquote(user_info)


def _store_collection(root: Path) -> str:
    """The default server collection of the store at ``root``: ``imret_`` + 16 hex digits of
    the SHA-256 of its absolute path."""
    return "imret_" + hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]


def check_no_secrets(spec: str | BackendSpec) -> None:
    """Raise ``ValueError`` when a ``milvus:`` spec carries credentials (a ``token``
    parameter, or ``user:password@`` in the URI).

    For specs that are saved (a store's ``store.json``): the token must come from elsewhere,
    e.g. ``Store.open(..., backend_options={"token": ...})`` or ``IMRET_MILVUS_TOKEN`` for the CLI.
    """
    from .base import parse_spec

    s = parse_spec(spec)
    if s.kind != "milvus":
        return
    if "token" in s.params or _split_user_info(s.target)[1]:
        raise ValueError(f"backend {_public(s)!r} holds Milvus credentials, which would be saved in clear; "
                         f"pass the token with IMRET_MILVUS_TOKEN (CLI) or "
                         f"backend_options={{'token': ...}} (Store.create / Store.open) instead")


def _public(s: BackendSpec) -> str:
    target = _split_user_info(s.target)[0] if "://" in s.target else s.target
    params = {k: v for k, v in s.params.items() if k != "token"}
    return str(BackendSpec(s.kind, target, params))


class MilvusBackend(Backend):
    """Inner-product top-k search in a Milvus collection (Milvus Lite file or server).

    ``target`` is a ``.db`` path (Milvus Lite; relative to ``root``, else the working
    directory) or an ``http(s)://`` / ``tcp://`` URI; ``params`` the spec parameters
    (:data:`PARAMS`). The constructor makes an empty collection: a collection of the same
    name that this module made earlier is dropped (it is a derived copy of a store), any
    other collection of that name is left alone and raises ``ValueError``.

    Unlike the in-memory backends, :meth:`add` can overwrite rows (``replace=True``), so a
    store may replay rows after a crash; writes are not atomic across batches.
    """

    supports_remove = True
    external = True

    def __init__(self, dim: int, target: str, params: dict[str, str] | None = None, *,
                 root: Path | None = None, _open: bool = False):
        positive_int(dim, "dim")
        self.dim = int(dim)
        self._client = None
        self._written = False  # rows inserted or deleted since the last flush
        self._unindexed = False  # rows inserted since the collection was (re)loaded
        self._deleted = False  # rows deleted since the last insert (see _read_level)
        self.config = milvus_config(target, params, root=root)
        self._connect()
        try:
            if _open:
                self._open_collection()
            else:
                self._create_collection()
        except BaseException:
            self.close()
            raise

    @property
    def spec(self) -> str:  # type: ignore[override]
        """The spec string that reopens this backend (without the token)."""
        return self.config.spec

    # -- connection and collection ---------------------------------------------------------

    def _connect(self) -> None:
        pymilvus = _import_pymilvus()
        cfg = self.config
        kwargs: dict[str, Any] = {"dedicated": True}  # close() then really closes the channel
        if cfg.db_name:
            kwargs["db_name"] = cfg.db_name
        if cfg.token:
            kwargs["token"] = cfg.token
        if cfg.lite:
            if not Path(cfg.uri).parent.is_dir():
                raise FileNotFoundError(f"the directory of Milvus Lite database {cfg.uri} does not exist")
            with _LITE_LOCK:
                _LITE_USERS[cfg.uri] = _LITE_USERS.get(cfg.uri, 0) + 1
        try:
            self._client = pymilvus.MilvusClient(uri=cfg.uri, **kwargs)
        except Exception as e:
            self._client = None
            self._release_lite()
            if cfg.lite:
                hint = " (one process at a time may open a Milvus Lite database; use a Milvus server to share one)"
            else:
                hint = "" if cfg.token else " (no token was given: a server with authentication needs one)"
            raise ConnectionError(f"cannot connect to Milvus at {cfg.safe_uri}: {self._clean(e)}{hint}") from None

    def _clean(self, e: BaseException) -> str:
        """An error message with the token and any password in the URI masked."""
        msg = str(e)
        for secret in (self.config.token, self.config.uri if self.config.uri != self.config.safe_uri else ""):
            if secret:
                msg = msg.replace(secret, "***")
        return msg

    def _call(self, what: str, method: str, *args, **kwargs):
        """Run a client method; Milvus errors become ``RuntimeError`` naming the collection."""
        if self._client is None:
            raise RuntimeError(f"the milvus backend for {self.config.safe_uri} is closed")
        pymilvus = _import_pymilvus()
        try:
            return getattr(self._client, method)(*args, **kwargs)
        except pymilvus.MilvusException as e:
            raise RuntimeError(f"Milvus {what} failed on collection {self.config.collection!r} at "
                               f"{self.config.safe_uri}: {self._clean(e)}") from None

    def _create_collection(self) -> None:
        from pymilvus import DataType

        cfg, c = self.config, self._client
        if self._call("has_collection", "has_collection", cfg.collection):
            info = self._call("describe_collection", "describe_collection", cfg.collection)
            props = info.get("properties") or {}
            if info.get("description") != _MARK and props.get(_MARK_PROPERTY) != "index":
                raise ValueError(f"collection {cfg.collection!r} at {cfg.safe_uri} exists and was not made by "
                                 f"imret; name another with ?collection=NAME")
            self._call("drop_collection", "drop_collection", cfg.collection)
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False, description=_MARK)
        schema.add_field(_PK, DataType.INT64, is_primary=True)
        schema.add_field(_VEC, DataType.FLOAT_VECTOR, dim=self.dim)
        self._call("create_collection", "create_collection", cfg.collection, schema=schema,
                   consistency_level="Strong", properties={_MARK_PROPERTY: "index"})
        index = c.prepare_index_params()
        index.add_index(field_name=_VEC, index_type=cfg.index_type, metric_type="IP",
                        params=dict(cfg.index_params))
        # the collection is empty: no need to wait for the build (which Milvus Lite cannot report)
        self._call("create_index", "create_index", cfg.collection, index, sync=False)
        self._load()

    def _open_collection(self) -> None:
        cfg = self.config
        where = f"collection {cfg.collection!r} at {cfg.safe_uri}"
        if not self._call("has_collection", "has_collection", cfg.collection):
            raise ValueError(f"{where} does not exist; rebuild the index")
        info = self._call("describe_collection", "describe_collection", cfg.collection)
        fields = {f["name"]: f for f in info.get("fields", [])}
        pk, vec = fields.get(_PK), fields.get(_VEC)
        if pk is None or not pk.get("is_primary") or vec is None or "dim" not in vec.get("params", {}):
            raise ValueError(f"{where} does not have the imret schema (INT64 '{_PK}', FLOAT_VECTOR '{_VEC}')")
        dim = int(vec["params"]["dim"])
        if dim != self.dim:
            raise ValueError(f"{where} holds {dim}-D vectors, expected {self.dim}-D")
        index = self._call("describe_index", "describe_index", cfg.collection, _VEC) or {}
        found = str(index.get("index_type", "")).upper()
        if found != cfg.index_type:
            raise ValueError(f"{where} has index {found or 'none'}, the spec asks for {cfg.index_type}; "
                             f"rebuild the index")
        self._load()

    def _load(self) -> None:
        """Load the collection. Milvus Lite builds (or reads) the index of each segment here;
        its background worker may still be writing an index file of a segment flushed
        earlier, which a load reads as truncated: retry then (up to ~30 s)."""
        wait, deadline = 0.05, time.monotonic() + 30.0
        while True:
            try:
                self._call("load_collection", "load_collection", self.config.collection)
                return
            except RuntimeError:
                if not self.config.lite or time.monotonic() + wait > deadline:
                    raise
                time.sleep(wait)
                wait = min(2 * wait, 1.0)

    @classmethod
    def load(cls, directory: str | os.PathLike, dim: int, target: str, params: dict[str, str] | None = None,
             *, root: Path | None = None) -> "MilvusBackend":
        """Reconnect to the collection recorded by :meth:`save` in ``directory``.

        Raises ``FileNotFoundError`` without ``milvus.json`` or the Lite database,
        ``ValueError`` when the collection is missing or holds other vectors or another index.
        """
        meta_path = Path(directory) / _FILE_META
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        cfg = milvus_config(target, params, root=root)
        if meta.get("dim") != int(dim):
            raise ValueError(f"{meta_path} records {meta.get('dim')}-D vectors, expected {dim}-D")
        if meta.get("collection") != cfg.collection:
            raise ValueError(f"{meta_path} records collection {meta.get('collection')!r}, "
                             f"the spec names {cfg.collection!r}")
        if cfg.lite and not Path(cfg.uri).is_dir():
            raise FileNotFoundError(f"Milvus Lite database {cfg.uri} not found")
        return cls(dim, target, params, root=root, _open=True)

    # -- the Backend contract --------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        res = self._call("count", "query", self.config.collection, filter="", output_fields=["count(*)"],
                         consistency_level=self._read_level)
        return int(res[0]["count(*)"])

    @property
    def _read_level(self) -> str:
        """The consistency of the next read. Session reads wait for this client's last write,
        as pymilvus records it; a Milvus 2.3 server returns no timestamp for a delete, so
        after deletes reads are Strong until an insert (whose timestamp is later) returns."""
        return "Strong" if self._deleted else self.config.consistency

    def _rows_per_request(self) -> int:
        return max(1, min(10_000, _BATCH_BYTES // (4 * self.dim)))

    def _query_ids(self, ids: np.ndarray, field: str) -> list[dict[str, Any]]:
        """Rows (``id`` and ``field``) of the given distinct ids that exist, in chunks."""
        step = _ID_CHUNK if field == _PK else max(1, min(_ID_CHUNK, self._rows_per_request()))
        rows: list[dict[str, Any]] = []
        for start in range(0, ids.size, step):
            chunk = ids[start:start + step].tolist()
            rows.extend(self._call("query", "query", self.config.collection,
                                   filter=f"{_PK} in [{','.join(map(str, chunk))}]",
                                   output_fields=[field], limit=len(chunk),
                                   consistency_level=self._read_level))
        return rows

    def _existing(self, ids: np.ndarray) -> np.ndarray:
        """The distinct ``ids`` present in the collection, sorted."""
        return np.unique(np.asarray([r[_PK] for r in self._query_ids(ids, _PK)], dtype=np.int64))

    def add(self, x: np.ndarray, ids: np.ndarray, *, replace: bool = False) -> None:
        """Insert ``(n, D)`` rows under ``(n,)`` ids.

        With ``replace=False`` ids already present raise ``ValueError``, as in the other
        backends; with ``replace=True`` they are overwritten (upsert), so replaying rows
        after a crash is harmless. Rows go in batches: a failure can leave earlier ones in.
        """
        x = as_rows(x, self.dim)
        ids = as_ids(ids, x.shape[0])
        if ids.size == 0:
            return
        if not replace:
            clash = self._existing(ids)
            if clash.size:
                more = " ..." if clash.size > 5 else ""
                raise ValueError(f"ids already present: {clash[:5].tolist()}{more}; "
                                 f"pass replace=True to overwrite")
        method = "upsert" if replace else "insert"
        step = self._rows_per_request()
        for start in range(0, ids.size, step):
            rows = [{_PK: i, _VEC: v} for i, v in zip(ids[start:start + step].tolist(), x[start:start + step])]
            self._written = self._unindexed = True
            self._call(method, method, self.config.collection, rows)
            self._deleted = False

    def remove(self, ids: np.ndarray) -> int:
        """Delete the given ids (unknown ones are ignored); returns how many were removed."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        ids = ids[ids >= 0]
        if ids.size == 0:
            return 0
        present = self._existing(ids)
        self._written = self._written or present.size > 0
        self._deleted = self._deleted or (present.size > 0 and self.config.consistency == "Session")
        for start in range(0, present.size, _ID_CHUNK):
            self._call("delete", "delete", self.config.collection, ids=present[start:start + _ID_CHUNK].tolist())
        return int(present.size)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``(scores, ids)``, both ``(Q, k)``, padded with -inf / -1.

        ``k`` may be at most :data:`MAX_TOPK`. Equal scores are ordered by increasing id.
        """
        k = _check_k(k)
        if k > MAX_TOPK:
            raise ValueError(f"k={k} is above Milvus' limit of {MAX_TOPK} results per query")
        q = as_rows(q, self.dim, "queries")
        nq = q.shape[0]
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        out = np.full((nq, k), -1, dtype=np.int64)
        params = dict(self.config.search_params)
        if "ef" in params:
            params["ef"] = max(params["ef"], k)  # Milvus requires ef >= k
        step = max(1, min(1024, _RESULT_BUDGET // k))
        for start in range(0, nq, step):
            res = self._call("search", "search", self.config.collection, data=list(q[start:start + step]),
                             limit=k, anns_field=_VEC, output_fields=[], consistency_level=self._read_level,
                             search_params={"metric_type": "IP", "params": params})
            for r, hits in enumerate(res, start=start):
                hit_ids, hit_scores = _hits_arrays(hits)
                order = np.lexsort((hit_ids, -hit_scores))[:k]  # by decreasing score, ties by id
                scores[r, :order.size] = hit_scores[order]
                out[r, :order.size] = hit_ids[order]
        return scores, out

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored rows of the given ids, ``(n, D)`` float32; ``KeyError`` for an unknown id."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        rows = {int(r[_PK]): r[_VEC] for r in self._query_ids(np.unique(ids), _VEC)}
        out = np.empty((ids.size, self.dim), dtype=np.float32)
        for j, v in enumerate(ids.tolist()):
            if v not in rows:
                raise KeyError(f"unknown id {v}")
            out[j] = np.asarray(rows[v], dtype=np.float32)
        return out

    def flush(self) -> None:
        """Write buffered rows to the engine's storage (Milvus also does this on its own).

        With Milvus Lite, also release and load the collection again when rows were inserted
        since it was loaded, so that the index of the new rows is built now and searches use
        it from the return on (Lite searches unindexed rows by brute force). A no-op when
        nothing was written since the last call. Searches must not run meanwhile (the store
        calls this under its lock).
        """
        cfg = self.config
        reload = cfg.lite and self._unindexed
        if reload:
            # release before flushing: Lite's background worker then leaves the new segment
            # to the load below instead of indexing it at the same time (a load can read the
            # index file the worker is still writing)
            self._call("release_collection", "release_collection", cfg.collection)
        try:
            if self._written:
                self._call("flush", "flush", cfg.collection)
                self._written = False
        finally:
            if reload:  # also after a failed flush: searches need a loaded collection
                self._load()
                self._unindexed = self._written

    def save(self, directory: str | os.PathLike) -> None:
        """Flush, then record the connection in ``directory/milvus.json`` (without the token)."""
        self.flush()
        cfg = self.config
        meta = {"uri": cfg.safe_uri, "lite": cfg.lite, "collection": cfg.collection, "db_name": cfg.db_name,
                "dim": self.dim, "metric": "IP", "index": cfg.index_type, "index_params": cfg.index_params,
                "search_params": cfg.search_params, "ntotal": self.ntotal}
        with open(Path(directory) / _FILE_META, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Close the connection; with Milvus Lite also stop the engine, which frees the file
        lock, once no other backend of this process uses the file. Idempotent."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.close()
        finally:
            self._release_lite()

    def _release_lite(self) -> None:
        cfg = self.config
        if not cfg.lite:
            return
        with _LITE_LOCK:
            users = _LITE_USERS.get(cfg.uri, 0) - 1
            if users > 0:
                _LITE_USERS[cfg.uri] = users
                return
            _LITE_USERS.pop(cfg.uri, None)
            try:
                from milvus_lite.server_manager import server_manager_instance
            except ImportError:
                return
            server_manager_instance.release_server(cfg.uri)

    def __enter__(self) -> "MilvusBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {"spec": cfg.spec, "dim": self.dim, "ntotal": self.ntotal,
                "engine": "milvus-lite" if cfg.lite else "milvus", "uri": cfg.safe_uri,
                "collection": cfg.collection, "db_name": cfg.db_name, "index": cfg.index_type,
                "index_params": dict(cfg.index_params), "search_params": dict(cfg.search_params),
                "consistency": cfg.consistency}

    def __repr__(self) -> str:
        return f"MilvusBackend({self.spec!r}, dim={self.dim}, {'open' if self._client is not None else 'closed'})"


def _hits_arrays(hits) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, scores float32) of one query's hits."""
    ids = getattr(hits, "ids", None)
    dist = getattr(hits, "distances", None)
    if ids is None or dist is None:
        ids = [h["id"] for h in hits]
        dist = [h["distance"] for h in hits]
    return np.asarray(ids, dtype=np.int64), np.asarray(dist, dtype=np.float32)
