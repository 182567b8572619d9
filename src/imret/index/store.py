"""A persistent, crash-safe image index: everything search needs, in one directory.

Layout of a store directory::

    store.json          the commit point: format version, model and preprocessing, whitening,
                        query expansion / DBA parameters, backend spec, which files are current
    meta.sqlite         one row per image: id, path, size, width, height, sha256, time added,
                        removal mark, CRC32 of its descriptor (WAL journal, synchronous=FULL)
    model.safetensors   the model (weights + spec) descriptors were extracted with
    descriptors.f32     raw model descriptors, float32 rows, row i = image id i (memory-mapped)
    vectors.<g>.f32     post-processed rows (whitened / augmented) when post-processing is set
    whitening.<g>.npz   the fitted whitening, if any
    local.<g>.rec       local features (``index configure --local sift|cnn``): one fixed-size
                        record per row (:class:`imret.local.storage.RecordLayout`), with
                        ``local.<g>.crc32`` checksums; written with the descriptors
    index.<g>/          files of the search backend (FAISS); none for exact search
    text.<g>.safetensors  the caption model of a joint image–caption model, if any
                        (:meth:`Store.set_text_model`): text queries, ranked by θ(t)·φ
    lock                held (flock) by the one process writing

Crash safety. Descriptors are appended (and fsynced) before the SQLite transaction that
lists them commits, so committed metadata always has its rows; rows past the committed count
are garbage from an interrupted add and are overwritten. Derived files (post-processed rows,
whitening, backend index) are written under new names and switched by an atomic rename of
``store.json``. The saved backend index records how many rows and which removals it covers;
opening a store brings it up to date from the descriptors, so a process killed at any point
(``kill -9``, power loss) leaves a store that opens consistent, and rerunning the ``add``
skips the images already committed (content hash) and adds the rest.

Ids are assigned in insertion order and never reused; removal marks a row and takes it out of
the backend (removed rows keep their place in the descriptor files).

Threads. One process holds the one writable :class:`Store` of a directory (the ``lock`` file
sees to that across processes); within it, any number of threads may search and read while
one thread at a time adds, removes, configures or rebuilds. Writers are serialised by
``Store._write_lock``; all in-memory state, the SQLite connection, the backend and the
memory maps are guarded by ``Store._lock``, which readers hold only for short steps. The
expensive parts run outside ``_lock``: extracting descriptors (of images being added and
of query images), hashing files, writing new rows past the committed count, computing
whitened / augmented vectors and building a new backend index (searches use exact search
over the stored vectors while it is built). So searches keep being answered while an
``add`` extracts; they wait only for its short commit steps. Read-only stores follow the
same rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import stat
import threading
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from .._checks import positive_int
from ..results import Hit, SearchHits, SearchResults  # re-exported: the store returns them
from ..expansion import QE_METHODS, QueryExpansion, alpha_database_augmentation
from ..retrieval import SearchResult, apply_rerankers, expand_and_search, postprocess, rerank_depth, search_stage, truncate
from ..fileio import atomic_write_bytes, fsync_dir
from ..whitening import Whitening
from . import check_spec, create_backend, load_backend, resolve_spec
from .base import Backend, BackendSpec, parse_spec
from .exact import ExactBackend
from .tuning import TuningRecord, auto_target, retune_due, tune

__all__ = [
    "STORE_FORMAT",
    "STORE_VERSION",
    "QE_METHODS",
    "StoreError",
    "StoreVersionError",
    "StoreCorruptError",
    "StoreLockedError",
    "StoreFullError",
    "Hit",
    "SearchHits",
    "SearchResults",
    "AddReport",
    "ImageRecord",
    "Preprocessing",
    "QueryExpansion",
    "Store",
]

STORE_FORMAT = "imret.store"
STORE_VERSION = 1

_STORE_JSON = "store.json"
_SQLITE = "meta.sqlite"
_MODEL = "model.safetensors"
_DESCRIPTORS = "descriptors.f32"
_LOCK = "lock"
_SEARCH_BATCH = 1024  # queries per search_vectors call of Store.search
_SCHEMA = 1
# files the store writes under a generation number (anything else in the directory is left alone)
_GENERATED = re.compile(r"index\.\d+|vectors\.\d+\.f32|vectors\.\d+\.crc32|whitening\.\d+\.npz"
                        r"|local\.\d+\.rec|local\.\d+\.crc32|text\.\d+\.safetensors")


class StoreError(RuntimeError):
    """A store cannot be opened or used."""


class StoreVersionError(StoreError):
    """The store was written by an incompatible version of imret."""


class StoreCorruptError(StoreError):
    """A file of the store is missing, truncated or inconsistent with the others."""


class StoreFullError(StoreError):
    """The disk is full: the failed step was not committed and the store is intact."""


class StoreLockedError(StoreError):
    """Another process is writing to the store; ``holder`` is what its lock file says about
    it (``pid``, ``host``, ``since``, and ``kind: "server"`` with its ``url`` for
    ``imret serve``), empty when it says nothing."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.holder = dict(holder or {})


@dataclass(frozen=True)
class ImageRecord:
    """Metadata of an indexed image."""

    id: int
    path: str
    size: int
    width: int
    height: int
    sha256: str
    added: str


@dataclass
class AddReport:
    """What :meth:`Store.add` did."""

    added: list[int] = field(default_factory=list)
    duplicates: list[tuple[str, int]] = field(default_factory=list)  # (path, id of the existing copy)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into descriptors; saved in the store and used for queries too."""

    image_size: int = 1024
    scales: tuple[float, ...] = (1.0,)
    crop_resize: str = "image"
    draft: bool = True
    max_pixels: int | None = None
    min_size: int | None = None  # enlarge smaller images to this short side (see imret.extract.extract)
    # training-free pooling changes at extraction (SuperGlobal: GeM+, regional GeM, max over
    # scales, ReLU-shift): an imret.refinement.Refinement, saved as its dict
    refinement: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or not 1 <= self.image_size <= 65536:
            raise ValueError(f"image_size must be an integer in [1, 65536], got {self.image_size!r}")
        scales = self.scales
        if not isinstance(scales, tuple) or not scales or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 < s <= 8
                for s in scales):
            raise ValueError(f"scales must be a non-empty tuple of numbers in (0, 8], got {scales!r}")
        if self.crop_resize not in ("image", "crop"):
            raise ValueError(f"crop_resize must be 'image' or 'crop', got {self.crop_resize!r}")
        if not isinstance(self.draft, bool):
            raise ValueError(f"draft must be true or false, got {self.draft!r}")
        if self.max_pixels is not None and (isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int)
                                            or self.max_pixels < 1):
            raise ValueError(f"max_pixels must be a positive integer or None, got {self.max_pixels!r}")
        if self.min_size is not None and (isinstance(self.min_size, bool) or not isinstance(self.min_size, int)
                                          or not 1 <= self.min_size <= 65536):
            raise ValueError(f"min_size must be an integer in [1, 65536] or None, got {self.min_size!r}")
        if self.refinement is not None:
            from ..refinement import Refinement

            r = self.refinement
            if isinstance(r, dict):
                r = Refinement.from_dict(r)
            if not isinstance(r, Refinement):
                raise ValueError(f"refinement must be an imret.refinement.Refinement or None, got {r!r}")
            object.__setattr__(self, "refinement", r if r.active else None)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["scales"] = list(self.scales)
        d["refinement"] = None if self.refinement is None else self.refinement.to_dict()
        if d["refinement"] is None:
            del d["refinement"]  # stores without refinement keep the keys older versions read
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        _reject_unknown(d, cls, "preprocessing")
        d = dict(d)
        if "scales" in d:
            if not isinstance(d["scales"], (list, tuple)):
                raise ValueError(f"scales must be a list of numbers, got {d['scales']!r}")
            d["scales"] = tuple(d["scales"])
        return cls(**d)


def _reject_unknown(d: dict[str, Any], cls: type, what: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise StoreCorruptError(f"unknown keys {sorted(unknown)} in {what}; valid: {sorted(names)}")


# --- small file helpers -----------------------------------------------------------------------


def _sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            size += len(b)
    return h.hexdigest(), size


class _NotAnImageFile(Exception):
    """A path the store will not index (the reason is the message)."""


def _image_files(paths: Any) -> tuple[list[str], list[str]]:
    """The files :meth:`Store.add` indexes: ``paths`` (one path, or an iterable of them) with
    each folder replaced by its images (:func:`imret.images.list_images`), checked before
    anything is read, and the folders that hold no image. Images in memory are refused with
    a ``TypeError`` saying why (a store indexes files)."""
    from ..images import IMAGE_INPUTS, expand_image_inputs

    if isinstance(paths, (str, os.PathLike, Image.Image, np.ndarray)):
        paths = [paths]
    paths = list(paths)
    for i, p in enumerate(paths):
        if not isinstance(p, (str, os.PathLike)) or not isinstance(os.fspath(p), str):
            hint = ("a store indexes files: save the image first (image.save('photo.jpg')) and add the file"
                    if isinstance(p, (Image.Image, np.ndarray)) else "expected image files or folders")
            raise TypeError(f"Store.add: item {i} is a {type(p).__name__}; {hint} "
                            f"(searches take {IMAGE_INPUTS})")
    return expand_image_inputs(paths)


_FAILED = object()  # a local-feature extraction that raised (counted, stored as an empty record)


def _local_threads(workers: int | None) -> int:
    """Threads for RootSIFT: ``workers`` when given (0 or 1: this thread), else up to 4."""
    if workers is None:
        return max(1, min(4, os.cpu_count() or 1))
    return max(1, int(workers))


def _hash_image_file(path: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """``(sha256, size)`` of the image file at ``path``, read once through one descriptor.

    The library's bad-file policy (:func:`imret.images.open_regular_file`) comes first: a FIFO,
    a device (a symlink to ``/dev/zero``), a socket, a directory or an empty file is refused
    before anything is read, so an add never blocks or reads without end; a type this install
    cannot decode is refused by name. Reads stop at the size the file had when it was opened.
    """
    from ..images import ImageError, check_image_type, open_regular_file

    try:
        check_image_type(path)
        f = open_regular_file(path)
    except ImageError as e:
        raise _NotAnImageFile(e.reason) from None
    with f:
        expected = os.fstat(f.fileno()).st_size
        h = hashlib.sha256()
        size = 0
        try:
            while size <= expected:  # +1 byte past the size: growth is noticed, never followed
                b = f.read(min(chunk, expected + 1 - size))
                if not b:
                    break
                h.update(b)
                size += len(b)
        except OSError as e:
            raise _NotAnImageFile(f"cannot read ({e.strerror or e})") from None
    if size != expected:
        raise _NotAnImageFile(f"changed size while being read ({expected} -> {size} bytes)")
    return h.hexdigest(), size


def _image_size(path: str) -> tuple[int, int]:
    """Upright (width, height) from the header; (0, 0) when unknown."""
    from PIL import Image

    from ..images import upright_size

    try:
        with Image.open(path) as im:
            return upright_size(im)
    except Exception:  # the extraction step reports unreadable files
        return 0, 0


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_ino


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _prepare_model(model: Any, device: str) -> Any:
    """Put ``model`` in the state extraction wants (eval, on ``device``, channels-last) once,
    so that extractions running in several threads at once do not convert its weights."""
    import torch

    model.eval().to(device)
    model.to(memory_format=torch.channels_last)
    return model


# --- errors from below: a full disk, a damaged database ------------------------------------------

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


def _no_space(path: Path) -> bool:
    """True when the file system of ``path`` has no block left for us."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (64 << 10)


def _store_errors(fn: Callable) -> Callable:
    """Turn what the disk and SQLite raise inside a public :class:`Store` method into a
    :class:`StoreError` that says what happened, to which file, and what state the store is in.

    Every write of the store is ordered so that an exception leaves the committed state as it
    was (rows past the committed count are ignored and cut on the next writable open; derived
    files are switched by renaming store.json), so "intact" below is a promise the write path
    keeps, and the tests check it after real and simulated full disks.
    """

    @functools.wraps(fn)
    def wrapper(self: "Store", *args: Any, **kwargs: Any):
        try:
            return fn(self, *args, **kwargs)
        except StoreError:
            raise
        except sqlite3.DatabaseError as e:
            raise self._database_error(e, fn.__name__) from e
        except OSError as e:
            if e.errno in _FULL:
                raise self._disk_full_error(e, fn.__name__) from e
            raise

    return wrapper


# --- the store --------------------------------------------------------------------------------


class Store:
    """A directory holding an image index; see the module docstring for the layout.

    Create one with :meth:`Store.create`, open one with :meth:`Store.open` (read-only by
    default; ``writable=True`` takes the writer lock). Use as a context manager or call
    :meth:`close`.

    Thread safety: one ``Store`` may be shared by the threads of a process. Keep one
    writable store per directory and process (a second writable open fails with
    :class:`StoreLockedError`). Any number of threads may call the reading methods
    (:meth:`search`, :meth:`search_vectors`, :meth:`search_ids`, :meth:`encode`, :meth:`hits`,
    :meth:`records`, :meth:`list`, :meth:`info`, :meth:`n_rows`, ``len``,
    :meth:`descriptors`, :meth:`vectors`, ...) while another thread writes (:meth:`add`,
    :meth:`remove`, :meth:`remove_paths`, :meth:`configure`, :meth:`rebuild`,
    :meth:`save_index`); writers run one at a time, in call order of the lock. Readers see
    each committed batch of an ``add`` (and each ``remove``) at once and never a part of
    one; descriptor extraction, of the images being added as of query images, runs without
    blocking the others. Locks: ``_write_lock`` (held by a writer for its whole call) is
    always taken before ``_lock`` (in-memory state, SQLite, backend, memory maps; held for
    short steps). :meth:`close` waits for a running writer to finish.
    """

    def __init__(self, path: Path, config: dict[str, Any], *, writable: bool, device: str = "cpu",
                 backend_options: dict[str, str] | None = None):
        self.path = path
        self.backend_options = dict(backend_options or {})
        self._config = config
        self.writable = writable
        self.device = device
        self._lock_fd: int | None = None
        self._db: sqlite3.Connection | None = None
        self._model = None
        self._whitening: Whitening | None = None
        self._backend: Backend | None = None
        self._backend_rows = 0  # rows [0, n) of the current vectors the backend covers
        self._backend_remove_seq = 0
        self._fallback: ExactBackend | None = None
        self._fallback_seq = -1
        self._stamp: tuple[int, int] | None = None
        self._pending_dead: set[int] = set()
        self._maps: dict[str, np.ndarray] = {}
        # per rows file: which rows this process has checked against their CRC32 (each row is
        # checked once: at the first exact search of the whole matrix, or when it is re-scored)
        self._verified: dict[str, np.ndarray] = {}
        self._checked_upto: dict[str, int] = {}  # ... and the prefix of rows known to be all checked
        # per checksum sidecar: (size, mtime, inode) of the file when it was mapped, and the map
        self._sums: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}
        # see the class docstring: writers take _write_lock, then _lock for short steps
        self._lock = threading.RLock()
        self._write_lock = threading.RLock()
        self._model_lock = threading.Lock()  # loads the model once; taken under no other lock
        self._building = False  # a writer is building a new backend: search exactly meanwhile
        self._local_cache: dict[str, Any] = {}  # the local-feature extractor, built once
        self._text: tuple[str, Any] | None = None  # (sha256, CaptionEncoder) of the text model loaded

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        model: Any,
        *,
        model_source: str = "",
        preprocessing: Preprocessing | None = None,
        backend: str = "exact",
        query_expansion: QueryExpansion | None = None,
        device: str = "cpu",
        exist_ok: bool = False,
        backend_options: dict[str, str] | None = None,
    ) -> "Store":
        """Create an empty store for ``model`` (a :class:`~imret.models.RetrievalNet`).

        ``backend`` is a spec string (see :mod:`imret.index.base`); ``ann`` is resolved from the
        number of images the first time the index is built. The model is saved into the store,
        so the store is self-contained; ``model_source`` records where it came from.
        """
        from ..models.checkpoints import save_model

        path = Path(path)
        spec = check_spec(backend, dim=int(model.dim))  # every parameter, before anything is written
        check_backend_spec(str(spec), path)
        if check_new_store_dir(path, exist_ok=exist_ok):
            return cls.open(path, writable=True, device=device, backend_options=backend_options)
        path.mkdir(parents=True, exist_ok=True)
        pre = preprocessing or Preprocessing()
        qe = query_expansion or QueryExpansion()
        save_model(model, path / _MODEL)
        model_hash, _ = _sha256_file(path / _MODEL)
        store_id = uuid.uuid4().hex
        db = _connect(path / _SQLITE)
        with db:
            db.executescript(_SCHEMA_SQL)
            db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                           [("store_id", store_id), ("schema", str(_SCHEMA)), ("remove_seq", "0")])
        db.close()
        (path / _DESCRIPTORS).touch()
        config = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "store_id": store_id,
            "created": _now(),
            "dim": int(model.dim),
            "model": {"file": _MODEL, "sha256": model_hash, "source": model_source,
                      "weights_sha256": getattr(model, "weights_sha256", None), "spec": model.spec.to_dict()},
            "preprocessing": pre.to_dict(),
            "query_expansion": dataclasses.asdict(qe),
            "backend": {"requested": str(spec), "spec": None},
            "generation": 0,
            "whitening": None,
            "dba": None,
            "vectors": None,
            "index": None,
            "local": None,
            "rerank": [],
        }
        atomic_write_bytes(path / _STORE_JSON, json.dumps(config, indent=2).encode())
        store = cls.open(path, writable=True, device=device, backend_options=backend_options)
        store._model = _prepare_model(model, device)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool = False, device: str = "cpu",
             backend_options: dict[str, str] | None = None, holder: dict[str, str] | None = None) -> "Store":
        """Open a store; checks the format version and that its files agree.

        ``backend_options`` are extra backend parameters that must not be saved in the store,
        such as ``{"token": "user:password"}`` for a Milvus server. ``holder`` describes a
        writable store's process to any other that finds the store locked (saved in the lock
        file with this process's id, host and start time): ``{"kind": "server", "url": URL}``
        for a server (the message then says to stop it, or to add through its API) or
        ``{"command": "imret index add"}``.
        """
        path = Path(path)
        cfg_path = path / _STORE_JSON
        if not cfg_path.is_file():
            if not path.exists():
                raise FileNotFoundError(f"no store at {path}")
            raise StoreCorruptError(f"{path} has no {_STORE_JSON}: not an imret store (or its creation was interrupted)")
        for name in (_STORE_JSON, _SQLITE, _SQLITE + "-wal", _SQLITE + "-shm", _SQLITE + "-journal", _DESCRIPTORS, _LOCK):
            if os.path.lexists(path / name):
                _contained(path, path / name, f"the store's file {name!r}")
        stamp = _stamp(cfg_path)
        config = _read_config(cfg_path)
        store = cls(path, config, writable=writable, device=device, backend_options=backend_options)
        store._stamp = stamp
        try:
            if writable:
                store._acquire_lock(holder)
            store._open_db()
            store._check_files()
            if writable:
                store._recover()
        except BaseException:
            store.close()
            raise
        return store

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the backend, the database and the writer lock; waits for a running writer."""
        with self._write_lock, self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._lock_fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._lock_fd, 0)  # no longer held: say nothing about a holder
                os.close(self._lock_fd)
                self._lock_fd = None

    def _acquire_lock(self, holder: dict[str, str] | None = None) -> None:
        import fcntl
        import socket

        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            record = _read_lock_record(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StoreLockedError(_locked_message(self.path, record), record) from None
            raise
        self._lock_fd = fd
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), **(holder or {})}
        try:  # a note for whoever finds the store locked; the flock alone is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        except OSError:
            pass

    def _open_db(self) -> None:
        db_path = self.path / _SQLITE
        if not db_path.is_file():
            raise StoreCorruptError(f"{db_path} is missing")
        try:
            self._db = _connect(db_path, readonly=not self.writable)
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            if self._db is not None:
                self._db.close()
                self._db = None
            if _no_space(self.path):  # SQLite says "disk I/O error" when it cannot create its WAL
                raise StoreFullError(f"no space left on the device of {self.path} to open {db_path} ({e}); "
                                 "nothing was changed and the store is intact; free some space and try again") from None
            raise StoreCorruptError(f"{db_path} is not a readable SQLite database: {e}") from None
        if meta.get("store_id") != self._config["store_id"]:
            raise StoreCorruptError(f"{db_path} belongs to another store (id {meta.get('store_id')!r}, "
                                    f"store.json says {self._config['store_id']!r})")
        if meta.get("schema") != str(_SCHEMA):
            raise StoreVersionError(f"{db_path} has metadata schema {meta.get('schema')!r}; this imret reads {_SCHEMA}")

    @_store_errors
    def refresh(self) -> bool:
        """Reader side: pick up a new ``store.json`` written by another process (cheap stat).

        Returns True when the configuration changed and cached state was dropped.
        """
        if self.writable:
            return False
        with self._lock:
            cfg_path = self.path / _STORE_JSON
            stamp = _stamp(cfg_path)
            if stamp == self._stamp:
                return False
            config = _read_config(cfg_path)
            if config["store_id"] != self._config["store_id"]:
                raise StoreCorruptError(f"{cfg_path} now describes another store")
            self._config, self._stamp = config, stamp
            self._whitening = None
            self._fallback = None
            self._drop_maps()
            if self._backend is not None:
                self._backend.close()
                self._backend = None
            return True

    def _file(self, name: str, what: str = "file") -> Path:
        """The path of the store's file ``name``, refused when it (or a symlink on the way)
        leads outside the store directory: a store's files are untrusted input."""
        return _contained(self.path, self.path / name, f"the store's {what} {name!r}")

    def _checked_file(self, info: dict[str, Any], what: str) -> Path:
        """The store's file ``info["file"]`` (as :meth:`_file`), after its SHA-256 matched
        ``info["sha256"]`` from store.json; :class:`StoreCorruptError` when missing or changed."""
        f = self._file(info["file"], what)
        try:
            digest, _ = _sha256_file(f)
        except FileNotFoundError:
            raise StoreCorruptError(f"the store's {what} {f} is missing") from None
        if digest != info["sha256"]:
            raise StoreCorruptError(f"{what} {f} does not match its checksum in store.json")
        return f

    def _committed_summary(self) -> str:
        try:
            with self._lock:
                row = self._db.execute("SELECT (SELECT COALESCE(MAX(id) + 1, 0) FROM images) - "
                                       "(SELECT COUNT(*) FROM images WHERE removed > 0)").fetchone()
            return f"it holds {int(row[0])} images"
        except Exception:  # the reason we are here may be the database itself
            return "its committed state is unchanged"

    def _disk_full_error(self, e: OSError, op: str) -> StoreError:
        where = e.filename or self.path
        return StoreFullError(f"no space left on the device of {where} ({e.strerror or e}) during {op}: nothing "
                          f"of the failed step was committed and the store {self.path} is intact "
                          f"({self._committed_summary()}); free some space and run it again")

    def _database_error(self, e: sqlite3.DatabaseError, op: str) -> StoreError:
        db = self.path / _SQLITE
        text = str(e)
        if "full" in text or ("I/O" in text and _no_space(self.path)):
            return StoreFullError(f"no space left for {db} ({text}) during {op}: nothing of the failed step was "
                              f"committed and the store {self.path} is intact; free some space and run it again")
        if "locked" in text or "busy" in text:
            return StoreError(f"{db} stayed locked by another process for 30 s during {op} ({text}); "
                              "nothing was changed; try again")
        return StoreCorruptError(f"{db} is damaged ({text}) during {op}: the image list of the store cannot be "
                                 f"read; nothing was changed. Restore {db} from a backup, or build the store "
                                 "again from its images")

    # -- facts -------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Dimension of the raw model descriptors."""
        return int(self._config["dim"])

    @property
    def search_dim(self) -> int:
        """Dimension of the indexed (post-processed) vectors."""
        w = self.whitening
        return w.dim if w is not None else self.dim

    @property
    def preprocessing(self) -> Preprocessing:
        with self._lock:
            return Preprocessing.from_dict(self._config["preprocessing"])

    @property
    def query_expansion(self) -> QueryExpansion:
        with self._lock:
            return QueryExpansion.from_dict(self._config["query_expansion"])

    @property
    def backend_spec(self) -> str:
        with self._lock:
            b = self._config["backend"]
            return b["spec"] or b["requested"]

    @property
    def whitening(self) -> Whitening | None:
        with self._lock:
            if self._config["whitening"] is None:
                return None
            if self._whitening is None:
                self._whitening = Whitening.load(self._checked_file(self._config["whitening"], "whitening file"))
            return self._whitening

    @_store_errors
    def n_rows(self) -> int:
        """Rows committed (live and removed): the next id."""
        with self._lock:
            row = self._db.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM images").fetchone()
        return int(row[0])

    @_store_errors
    def __len__(self) -> int:
        """Live images. Cheap at any size: rows committed minus rows removed (a partial index)."""
        with self._lock:
            row = self._db.execute("SELECT (SELECT COALESCE(MAX(id) + 1, 0) FROM images) - "
                                   "(SELECT COUNT(*) FROM images WHERE removed > 0)").fetchone()
        return int(row[0])

    def _removed_ids(self, after_seq: int = 0) -> np.ndarray:
        with self._lock:
            rows = self._db.execute("SELECT id FROM images WHERE removed > ?", (after_seq,)).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def _alive_mask(self, n: int) -> np.ndarray:
        alive = np.ones(n, bool)
        dead = self._removed_ids()
        alive[dead[dead < n]] = False
        return alive

    def _remove_seq(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key = 'remove_seq'").fetchone()[0])

    def _check_files(self) -> None:
        n = self.n_rows()
        local = self._config["local"]
        for name, width in ((_DESCRIPTORS, self.dim), (self._config["vectors"], self.search_dim),
                            (local and local["file"], local and self._local_layout().width)):
            if name is None:
                continue
            f = self._file(name, "rows file")
            if not f.is_file():
                raise StoreCorruptError(f"{f} is missing")
            have = f.stat().st_size // (4 * width)
            if have < n:
                raise StoreCorruptError(f"{f} holds {have} rows but the metadata lists {n} images")
        model = self._file(self._config["model"]["file"], "model file")
        if not model.is_file():
            raise StoreCorruptError(f"the store's model file {model} is missing")

    # -- raw rows ----------------------------------------------------------------------------

    def _matrix(self, name: str, width: int, n: int | None = None, *, check: bool = True) -> np.ndarray:
        """A memory map of the first ``n`` rows of the rows file ``name``.

        ``check``: rows not verified yet in this process are checked against their stored
        CRC32 first (see :meth:`_check_rows`), so a damaged or edited file fails loudly
        instead of giving wrong results. Each row is checked once per process.
        """
        with self._lock:
            n = self.n_rows() if n is None else n
            if n == 0:
                return np.zeros((0, width), np.float32)
            # committed rows never change in place (derived files get new names, new rows go
            # past the end), so a map of the first n rows stays valid, also in the hands of a
            # caller after a writer moved on; reuse it instead of mapping the file per search
            m = self._maps.get(name)
            if m is None or m.shape != (n, width):
                m = np.memmap(self._file(name, "rows file"), dtype=np.float32, mode="c", shape=(n, width))
                self._maps[name] = m
            if check and self._checked_upto.get(name, 0) < n:
                self._check_rows(name, m, np.arange(self._checked_upto.get(name, 0), n))
                self._checked_upto[name] = n
            return m

    def _drop_maps(self) -> None:
        """Forget the memory maps of rows files and checksum files (their files were replaced)."""
        with self._lock:
            self._maps.clear()
            self._sums.clear()

    def _checksums(self, name: str) -> np.ndarray | None:
        """The CRC32 sidecar of the rows file ``name`` as a uint32 array (None: it has none).

        Mapped once per version of the file: a search costs a ``stat``, and the file is mapped
        again only when its size, mtime or inode changed (an ``add`` appended checksums,
        recovery cut them, ``configure`` wrote a new file of that name, another process did).
        """
        side = _crc_sidecar(name)
        with self._lock:
            try:
                st = os.stat(self.path / side)
            except FileNotFoundError:
                st = None
            key = None if st is None else (st.st_size, st.st_mtime_ns, st.st_ino)
            cached = self._sums.get(side)
            if key is not None and cached is not None and cached[0] == key:
                return cached[1]
            self._sums.pop(side, None)
            f = self._file(side, "checksum file")  # a symlink out of the store is refused, even a dangling one
            if st is None or not stat.S_ISREG(st.st_mode):
                return None  # a store written before vectors had checksums (its writer adds them)
            sums = _map_checksums(f, st.st_size // 4)
            self._sums[side] = (key, sums)
            return sums

    def _expected_crcs(self, name: str, ids: np.ndarray) -> np.ndarray | None:
        """The CRC32 recorded for rows ``ids`` of ``name`` (None: that file has no checksums)."""
        if name == _DESCRIPTORS:
            out = np.zeros(ids.size, np.int64)
            want = ids.tolist()
            lo, hi = (int(ids.min()), int(ids.max()) + 1) if ids.size else (0, 0)
            with self._lock:
                if hi - lo <= 4 * ids.size:  # a range: one ordered scan
                    got = dict(self._db.execute("SELECT id, crc32 FROM images WHERE id >= ? AND id < ?", (lo, hi)))
                else:
                    got = {}
                    distinct = sorted(set(want))
                    for start in range(0, len(distinct), 900):
                        chunk = distinct[start:start + 900]
                        got.update(self._db.execute(
                            f"SELECT id, crc32 FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk))
            for j, i in enumerate(want):
                out[j] = got.get(i, -1)
            return out
        sums = self._checksums(name)
        if sums is None:
            return None
        out = np.full(ids.size, -1, np.int64)
        ok = ids < sums.shape[0]
        out[ok] = np.asarray(sums[ids[ok]], dtype=np.int64)
        return out

    def _check_rows(self, name: str, m: np.ndarray, ids: np.ndarray) -> None:
        """Raise :class:`StoreCorruptError` naming the file when a row of ``m`` (rows ``ids``)
        does not match the CRC32 recorded when it was written (swapped, zeroed, edited rows)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        done = self._verified.get(name)
        if done is None or done.size < m.shape[0]:
            grown = np.zeros(max(m.shape[0], 2 * (0 if done is None else done.size)), bool)
            if done is not None:
                grown[:done.size] = done
            done = self._verified[name] = grown
        ids = ids[~done[ids]]
        if ids.size == 0:
            return
        ids = np.unique(ids)  # sorted: a run of consecutive ids is read as one slice
        for lo in range(0, ids.size, 65536):
            part = ids[lo:lo + 65536]
            expected = self._expected_crcs(name, part)
            if expected is None:
                return
            block = np.asarray(m[part[0]:part[-1] + 1]) if part[-1] - part[0] + 1 == part.size else np.asarray(m[part])
            got = np.fromiter((zlib.crc32(r) for r in block), np.int64, count=part.size)
            bad = part[got != expected]
            if bad.size:
                f = self.path / name
                raise StoreCorruptError(
                    f"{f} is damaged: {bad.size} row(s) do not match the checksums recorded when they were written "
                    f"(ids {bad[:5].tolist()}{' ...' if bad.size > 5 else ''}); refusing to search with it. "
                    f"Restore the store from a backup, or build it again from its images "
                    f"(`imret index verify {self.path}` lists the damaged rows)")
            done[part] = True

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """The indexed rows of ids (any shape, all >= 0) as float32 ``(ids.size, D')``; rows not
        verified in this process yet are checked against their checksums (cheap: k per query)."""
        with self._lock:
            name = self._config["vectors"] or _DESCRIPTORS
            width = self.search_dim if self._config["vectors"] else self.dim
            m = self._matrix(name, width, check=False)
            flat = np.asarray(ids, dtype=np.int64).ravel()
            rows = np.asarray(m[flat], dtype=np.float32)
            self._check_rows(name, m, flat)
            return rows

    @_store_errors
    def descriptors(self, n: int | None = None) -> np.ndarray:
        """The raw ``(N, D)`` descriptors (memory-mapped, read-only), row i = id i; checked
        against their checksums the first time a process maps them."""
        return self._matrix(_DESCRIPTORS, self.dim, n)

    @_store_errors
    def vectors(self, n: int | None = None) -> np.ndarray:
        """The indexed (post-processed) ``(N, D')`` rows: the descriptors when nothing is set."""
        with self._lock:
            name = self._config["vectors"]
            if name is None:
                return self.descriptors(n)
            return self._matrix(name, self.search_dim, n)

    # -- local features ----------------------------------------------------------------------

    def _local_layout(self):
        from ..local.storage import RecordLayout

        return RecordLayout.from_dict(self._config["local"]["layout"])

    @property
    def local_kind(self) -> str | None:
        """The kind of local features the store keeps (``"sift"``, ``"cnn"``) or None."""
        loc = self._config["local"]
        return None if loc is None else loc["extractor"]["kind"]

    def local_extractor(self):
        """The extractor of the store's local features (for query images): ``f(image, box) ->
        LocalFeatures``, configured as the stored features were."""
        from ..local.extractors import create_local_extractor

        with self._lock:
            loc = self._config["local"]
        if loc is None:
            raise StoreError(f"{self.path} keeps no local features; add them with "
                             f"`imret index configure {self.path} --local sift` (or cnn)")
        ex = self._local_cache.get("extractor")
        if ex is None or ex[0] != loc["extractor"]:
            model = self.model if loc["extractor"]["kind"] == "cnn" else None
            ex = (loc["extractor"], create_local_extractor(loc["extractor"]["kind"], loc["extractor"]["params"], model))
            self._local_cache["extractor"] = ex
        return ex[1]

    @_store_errors
    def local_features(self, ids: Sequence[int] | np.ndarray) -> list:
        """The stored local features of ``ids`` (:class:`~imret.local.LocalFeatures`, or None
        for an id without any: removed, unreadable when they were computed, out of range),
        each record checked against its CRC32 first."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        with self._lock:
            if self._config["local"] is None:
                raise StoreError(f"{self.path} keeps no local features; add them with "
                                 f"`imret index configure {self.path} --local sift` (or cnn)")
            name = self._config["local"]["file"]
            layout = self._local_layout()
            n = self.n_rows()
            m = self._matrix(name, layout.width, check=False)
            ok = (ids >= 0) & (ids < n)
            want = ids[ok]
            rows = np.asarray(m[want])
            self._check_rows(name, m, want)
        out: list = [None] * ids.size
        for j, r in zip(np.flatnonzero(ok).tolist(), rows):
            try:
                out[j] = layout.unpack(r)
            except ValueError as e:
                raise StoreCorruptError(f"{self.path / name}: {e}") from None
        return out

    def _compute_local(self, extractor, layout, paths: Sequence[str | None],
                       workers: int | None = None) -> tuple[np.ndarray, int]:
        """Records for image files (None: an empty record); returns ``(rows, n_failed)``.

        RootSIFT runs on ``workers`` threads (OpenCV releases the GIL; default: up to 4, as many
        as the CPU has); CNN features run in this thread (the model uses the CPU's threads)."""

        def one(p: str | None):
            if p is None:
                return None
            try:
                return extractor(p, None)
            except Exception:  # an unreadable or vanished file: no local features for it
                return _FAILED

        threads = _local_threads(workers) if getattr(extractor, "kind", None) == "sift" else 1
        if threads > 1 and len(paths) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(threads, len(paths))) as pool:
                feats = list(pool.map(one, paths))
        else:
            feats = [one(p) for p in paths]
        failed = sum(f is _FAILED for f in feats)
        return layout.pack_many([None if f is _FAILED else f for f in feats]), failed

    def postprocess(self, x: np.ndarray) -> np.ndarray:
        """Apply the store's whitening to raw descriptors (queries or new rows): the same
        step as :meth:`imret.retrieval.Retriever.postprocess` (:func:`imret.retrieval.postprocess`)."""
        return postprocess(x, self.whitening, dim=self.dim, name="x")

    # -- model -------------------------------------------------------------------------------

    @property
    def model(self):
        """The store's model (loaded on first use, once however many threads ask, and checked
        against its checksum)."""
        model = self._model
        if model is not None:
            return model
        with self._model_lock:  # not _lock: searches by vector go on while the model loads
            if self._model is None:
                from ..models.factory import load_model

                f = self._checked_file(self._config["model"], "model file")  # never changes after creation
                self._model = _prepare_model(load_model(f, device=self.device), self.device)
            return self._model

    def encode(self, images: Sequence[Any], bboxes=None, **extract_kw: Any):
        """Descriptors of query ``images`` (paths, PIL images or ``H x W x 3`` uint8 RGB
        arrays; optional ``(x1, y1, x2, y2)`` boxes) as the store extracts them (its model and
        preprocessing): an :class:`imret.extract.Extraction` whose ``skipped`` lists the
        images that could not be read, with the reason. Other kinds raise ``TypeError``.
        ``extract_kw`` are run-time settings (batch_size, workers, precision). Runs without
        the store's lock; pass the rows to :meth:`search_vectors`."""
        return self._extract(images, bboxes, **extract_kw)

    def _extract(self, images: Sequence[Any], bboxes=None, *, progress: bool = False, **kw: Any):
        from ..extract import extract

        pre = self.preprocessing
        return extract(self.model, images, bboxes=bboxes, scales=pre.scales, image_size=pre.image_size,
                       crop_resize=pre.crop_resize, draft=pre.draft, max_pixels=pre.max_pixels,
                       min_size=pre.min_size, refinement=pre.refinement, device=self.device, on_error="skip",
                       progress=progress, **kw)

    # -- text queries (a joint image–caption model) -----------------------------------------

    @property
    def text_info(self) -> dict[str, Any] | None:
        """What ``store.json`` says of the caption model (``file``, ``sha256``, ``dim``, ``terms``,
        ``source``), or None when the store has none; nothing is read."""
        with self._lock:
            t = self._config.get("text")
            return None if t is None else dict(t)

    @property
    def text_model(self):
        """The store's caption model (:class:`~imret.text.CaptionEncoder`), or None when it has
        none (:meth:`set_text_model`). Loaded on first use and checked as untrusted input: a
        file of the store (no symlink out of it) matching its checksum in ``store.json``, a
        valid caption encoder of the store's dimension; else :class:`StoreCorruptError`."""
        with self._lock:
            info = self._config.get("text")
        if info is None:
            return None
        cached = self._text
        if cached is not None and cached[0] == info["sha256"]:
            return cached[1]
        with self._model_lock:
            cached = self._text
            if cached is not None and cached[0] == info["sha256"]:
                return cached[1]
            from ..text.queries import load_text_model

            f = self._checked_file(info, "text model file")
            try:
                enc = load_text_model(f, dim=self.dim)
            except (ValueError, OSError) as e:
                raise StoreCorruptError(f"the store's text model file {f} cannot be used: {e}") from None
            self._text = (info["sha256"], enc)
            return enc

    @_store_errors
    def set_text_model(self, text_model: Any, *, source: str | None = None) -> None:
        """Keep a caption model in the store for text queries (``Store.search(text=...)``), or
        drop it (``None``). ``text_model`` is a :class:`~imret.text.CaptionEncoder` or the path
        of one (read as untrusted input: :func:`imret.text.queries.load_text_model`); it must
        embed text in the store's descriptor dimension (the image model's half of the same
        joint model). The store writes its own copy (``text.<g>.safetensors``) and switches to
        it atomically with ``store.json``; ``source`` records where it came from (default:
        the path given)."""
        from ..text.encoder import CaptionEncoder
        from ..text.queries import load_text_model

        with self._write_lock:
            self._require_writable()
            enc = None
            if text_model is not None:
                if isinstance(text_model, (str, os.PathLike)):
                    enc = load_text_model(text_model, dim=self.dim)
                    if source is None:
                        source = os.path.abspath(os.fspath(text_model))
                elif isinstance(text_model, CaptionEncoder):
                    enc = text_model
                else:
                    raise TypeError(f"text_model must be a CaptionEncoder, the path of one, or None; got "
                                    f"{type(text_model).__name__}")
                if not enc.is_fitted:
                    raise ValueError("the caption encoder is not fitted: fit it (or load a saved one) first")
                if enc.dim != self.dim:
                    raise ValueError(f"the caption model embeds text in {enc.dim}-D, but the store's descriptors "
                                     f"are {self.dim}-D; a joint model's caption encoder and image model share one "
                                     "dimension")
            with self._lock:
                cfg = json.loads(json.dumps(self._config))
            old = cfg.get("text")
            gen = int(cfg["generation"]) + 1
            try:
                if enc is None:
                    cfg["text"] = None
                else:
                    name = f"text.{gen}.safetensors"
                    enc.save(self.path / name)
                    digest, _ = _sha256_file(self.path / name)
                    cfg["text"] = {"file": name, "sha256": digest, "dim": int(enc.dim), "terms": int(enc.num_terms),
                                   "source": (source or "")[:4096]}
                cfg["generation"] = gen
                with self._lock:
                    self._config = cfg
                self._write_config()
            except BaseException:
                self._abandon()
                raise
            if old is not None and (cfg["text"] is None or old["file"] != cfg["text"]["file"]):
                with contextlib.suppress(OSError, StoreCorruptError):
                    _remove_entry(self._file(old["file"], "old file"))

    def encode_text(self, text: "str | Sequence[str]", *, rerank: "Sequence[Any] | None" = (), text_model: Any = None,
                    max_chars: int | None = None):
        """Caption embeddings ``θ(t)`` ``(Q, D)`` of text queries with the store's caption
        model, after checking that they can be searched here: a caption model, no whitening or
        αDBA, no re-ranker in ``rerank`` that needs pixels (:func:`imret.retrieval.check_text_pipeline`);
        ``ValueError`` saying why not otherwise. A text none of whose words the model knows
        embeds to zeros (:meth:`search` reports it). ``text_model``: a caption encoder to use
        instead of the store's own (of the store's dimension); ``max_chars``: the longest text
        accepted (default :data:`imret.text.queries.MAX_TEXT_CHARS`)."""
        from ..retrieval import check_text_pipeline
        from ..text.queries import check_text_queries

        texts = check_text_queries(text) if max_chars is None else check_text_queries(text, max_chars=max_chars)
        enc = self.text_model if text_model is None else text_model
        if text_model is not None and int(getattr(text_model, "dim", -1)) != self.dim:
            raise ValueError(f"the caption model embeds text in {getattr(text_model, 'dim', '?')}-D, but the store's "
                             f"descriptors are {self.dim}-D")
        if enc is None:
            raise ValueError(f"{self.path} has no caption model, so it cannot be searched by text; add the caption "
                             f"model of a joint image-caption model with `imret index configure {self.path} "
                             "--text-model FILE` (Store.set_text_model)")
        with self._lock:
            w, dba = self._config["whitening"], self._config["dba"]
        check_text_pipeline(whitening=None if w is None else w["kind"], dba=dba,
                            rerankers=rerank or (), where=str(self.path),
                            fix=f"drop them with `imret index configure {self.path} --whiten none --dba-k 0` to "
                                "search by text (or keep a second store without them)")
        return np.asarray(enc.encode_text(texts), dtype=np.float32)

    def _search_text(self, text: Any, *, k: int, query_expansion: QueryExpansion | None, rerank: Any,
                     on_error: str, text_model: Any = None) -> "SearchResults | SearchHits":
        """:meth:`search` with ``text=``: see there."""
        from ..retrieval import needs_query_image
        from ..text.queries import text_card

        single = isinstance(text, str)
        if rerank is None:  # the store's own stages were chosen for photos: those that need pixels are left out
            specs = [sp for sp in self.rerank_specs if not needs_query_image(sp)]
        else:
            specs = [rerank] if isinstance(rerank, str) else list(rerank)
        theta = self.encode_text(text, rerank=specs, text_model=text_model)  # refuses pixel stages before any is built
        stages = self.rerankers(specs)
        texts = [text] if single else list(text)
        known = np.any(theta != 0, axis=1)
        if not known.all() and on_error == "raise":
            i = int(np.flatnonzero(~known)[0])
            from ..text.queries import NoKnownWordError

            raise NoKnownWordError(f"no word of text query {i} ({texts[i][:80]!r}) is in the caption model's "
                                   f"vocabulary ({(text_model or self.text_model).num_terms} terms); try other words")
        out = SearchResults(
            SearchHits(query=t, error=None if known[i] else "no word of the text is in the caption model's vocabulary",
                       image=text_card(t))
            for i, t in enumerate(texts))
        rows = np.flatnonzero(known)
        depth = max(int(k), rerank_depth(stages))
        for lo in range(0, rows.size, _SEARCH_BATCH):
            part = rows[lo:lo + _SEARCH_BATCH]
            with self._lock:
                scores, ids = self.search_vectors(theta[part], depth, query_expansion=query_expansion)
                res = (truncate(apply_rerankers(stages, self.postprocess(theta[part]), scores, ids, None), int(k))
                       if stages else SearchResult(scores[:, :int(k)], ids[:, :int(k)]))
                hits = self.hits(res.scores, res.ids, res.extras)
            for r, h in zip(part.tolist(), hits):
                out[r].extend(h)
        return out[0] if single else out

    # -- writing -----------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if not self.writable or self._lock_fd is None:
            raise StoreError(f"{self.path} was opened read-only; open it with writable=True to change it")

    def _write_rows(self, name: str, width: int, start: int, x: np.ndarray) -> None:
        self._write_at(name, start * width * 4, np.ascontiguousarray(x, dtype=np.float32).tobytes())

    def _write_at(self, name: str, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the store's file ``name`` and fsync it."""
        fd = os.open(self._file(name, "rows file"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:  # pwrite may write less than asked (signals, quotas)
                done = os.pwrite(fd, view, offset)
                view, offset = view[done:], offset + done
            os.fsync(fd)
        finally:
            os.close(fd)

    def _truncate_rows(self, name: str, width: int, n: int) -> None:
        f = self._file(name, "rows file")
        if f.is_file() and f.stat().st_size > n * width * 4:
            os.truncate(f, n * width * 4)

    @_store_errors
    def add(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        commit_every: int = 64,
        save_every: int = 50_000,
        save: bool = True,
        progress: bool = False,
        on_commit: Callable[[int], None] | None = None,
        hashes: dict[str, tuple[str, int] | str] | None = None,
        extractor: Callable[[list[str]], tuple[Any, np.ndarray | None]] | None = None,
        **extract_kw: Any,
    ) -> AddReport:
        """Index image files; files already in the store (same content hash) are not added twice.

        ``paths`` are image files and folders (a folder stands for its images, listed by
        :func:`imret.images.list_images`: recursively, sorted), or one file or folder alone.

        Images are committed ``commit_every`` at a time, so an interrupted call keeps what it
        committed and a rerun adds the rest. The backend index is saved every ``save_every``
        added rows and at the end, unless ``save=False`` (a server adding a few images at a
        time saves on its own schedule: writing a large FAISS index after every small add
        would stall it). The index is a cache of the committed descriptors either way: after a
        crash it is brought up to date from them on the next open. Unreadable files are
        reported, not indexed.
        ``extract_kw`` go to :func:`imret.extract.extract` (batch_size, workers, precision).
        ``on_commit(n_added_so_far)`` is called in this thread after each commit.

        Other threads keep searching meanwhile: hashing and extraction run without the
        store's read lock, which is taken only to look up duplicates and to commit a batch.

        Two hooks let :mod:`imret.index.distributed` spread the work over processes while this
        process stays the one writer: ``hashes`` maps absolute paths to ``(sha256, size)``
        already computed (or to the reason the file is not indexed; paths missing from it are
        hashed here), and ``extractor(paths) -> (extraction, local records or None)`` replaces
        :meth:`prepare_rows` for each batch (``extract_kw`` and ``progress`` then go unused).
        """
        with self._write_lock:
            self._require_writable()
            report = AddReport()
            seen: dict[str, str] = {}
            again: list[tuple[str, str]] = []  # duplicates within this call: (path, sha256)
            pending: list[tuple[str, str, int]] = []  # (path, sha256, size)

            unsaved = [0]

            def flush() -> None:
                if pending:
                    before = len(report.added)
                    kw = extract_kw if horizon is None else {**extract_kw, "compile_horizon": horizon[0]}
                    self._add_batch(pending, report, progress=progress, extractor=extractor, **kw)
                    if horizon is not None:  # images still to describe in this run ("auto" times them)
                        horizon[0] = max(0, horizon[0] - len(pending))
                    pending.clear()
                    unsaved[0] += len(report.added) - before
                    if unsaved[0] >= save_every:
                        self.save_index()
                        unsaved[0] = 0
                    if on_commit is not None:
                        on_commit(len(report.added))

            files, empty = _image_files(paths)
            report.skipped.extend((os.path.abspath(d), "a directory with no images in it") for d in empty)
            if extractor is None and extract_kw.get("compile", "auto") == "auto":  # decided for the whole run
                from ..compiled import resolve_auto

                refined = self.preprocessing.refinement is not None and self.preprocessing.refinement.active
                extract_kw["compile"] = resolve_auto("auto", device=self.device, n_images=len(files), refined=refined)
            horizon = [len(files)] if extract_kw.get("compile") == "auto" and extractor is None else None
            for p in files:
                p = os.path.abspath(p)
                known = None if hashes is None else hashes.get(p)
                try:
                    if isinstance(known, str):
                        raise _NotAnImageFile(known)
                    digest, size = known if known is not None else _hash_image_file(p)  # file I/O: no lock needed
                except _NotAnImageFile as e:
                    report.skipped.append((p, str(e)))
                    continue
                existing = self._live_id(digest)
                if existing is not None:
                    report.duplicates.append((p, existing))
                    continue
                if digest in seen:
                    again.append((p, digest))
                    continue
                seen[digest] = p
                pending.append((p, digest, size))
                if len(pending) >= commit_every:
                    flush()
            flush()
            for p, digest in again:
                existing = self._live_id(digest)
                if existing is not None:
                    report.duplicates.append((p, existing))
                else:  # its first copy could not be read
                    report.skipped.append((p, f"same content as {seen[digest]}, which could not be indexed"))
            if save:
                self.save_index()
            return report

    def _live_id(self, sha256: str) -> int | None:
        """Id of the live image with this content hash, if any."""
        with self._lock:
            row = self._db.execute("SELECT id FROM images WHERE sha256 = ? AND removed = 0", (sha256,)).fetchone()
        return None if row is None else int(row[0])

    def prepare_rows(self, paths: Sequence[str], *, progress: bool = False, **extract_kw: Any):
        """What :meth:`add` computes for a batch of image files before it writes anything:
        ``(extraction, records)``, the :class:`imret.extract.Extraction` of ``paths`` with the
        store's model and preprocessing, and the local-feature records of its rows (an array
        of :class:`~imret.local.storage.RecordLayout` rows) or None when the store keeps no
        local features. Changes nothing, so it runs on read-only stores too: the processes of
        :mod:`imret.index.distributed` prepare their share of each batch with it."""
        ex = self._extract(list(paths), progress=progress, **extract_kw)  # the slow part
        with self._lock:
            local = self._config["local"]
        if local is None or len(ex.indices) == 0:
            return ex, None
        recs, _ = self._compute_local(self.local_extractor(), self._local_layout(),
                                      [paths[int(i)] for i in ex.indices],  # slow too (SIFT, CNN features)
                                      workers=extract_kw.get("workers"))
        return ex, recs

    def _add_batch(self, batch: list[tuple[str, str, int]], report: AddReport, *, progress: bool,
                   extractor: Callable | None = None, **extract_kw: Any) -> None:
        # the caller holds _write_lock, so no other thread changes the row count, the files
        # or the configuration until this returns; _lock is taken only to read and to commit
        paths = [b[0] for b in batch]
        if extractor is None:
            ex, recs = self.prepare_rows(paths, progress=progress, **extract_kw)
        else:
            ex, recs = extractor(paths)
            _check_prepared(ex, recs, len(paths), self.dim)
        for s in ex.skipped:
            report.skipped.append((s.path, s.reason))
        if len(ex.indices) == 0:
            return
        raw = ex.descriptors
        m = raw.shape[0]
        now = _now()
        meta = []
        for row, idx in enumerate(ex.indices):
            p, digest, size = batch[int(idx)]
            w, h = _image_size(p)
            meta.append((p, size, w, h, digest, now, zlib.crc32(raw[row].tobytes())))
        with self._lock:
            n = self.n_rows()
            vectors_file = self._config["vectors"]
            vec = raw if vectors_file is None else self.postprocess(raw)
            width = self.search_dim
            local = self._config["local"]
        if local is not None:
            layout = self._local_layout()
            if recs is None or recs.shape != (m, layout.width):
                raise StoreError(f"the extractor gave local-feature records of shape {getattr(recs, 'shape', None)} "
                                 f"for {m} rows of width {layout.width}")
        ids = np.arange(n, n + m, dtype=np.int64)
        # 1. rows first (fsynced), past the committed count where no reader looks yet ...
        self._write_rows(_DESCRIPTORS, self.dim, n, raw)
        if vectors_file is not None:
            self._write_rows(vectors_file, width, n, vec)
            self._write_at(_crc_sidecar(vectors_file), n * 4, _row_crcs(vec).tobytes())
        if local is not None:
            self._write_rows(local["file"], layout.width, n, recs)
            self._write_at(_crc_sidecar(local["file"]), n * 4, _row_crcs(recs).tobytes())
        # 2. ... then the metadata that lists them, in one transaction, and the in-memory
        # index, in one step for readers (the index is saved by save_index())
        records = [(int(i), *r) for i, r in zip(ids, meta)]
        with self._lock:
            with self._db:
                self._db.executemany(
                    "INSERT INTO images(id, path, size, width, height, sha256, added, removed, crc32) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)", records)
            report.added.extend(int(i) for i in ids)
            if self._backend is not None and self._backend_ready():
                self._add_to(self._backend, vec, ids)
                self._backend_rows = n + m

    @_store_errors
    def remove(self, ids: Iterable[int], *, save: bool = True) -> int:
        """Remove images by id; returns how many were live. Unknown ids raise ``KeyError``.

        The removal is committed at once; ``save=False`` leaves saving the backend index to a
        later :meth:`save_index` (see :meth:`add`)."""
        with self._write_lock:
            self._require_writable()
            ids = [int(i) for i in ids]
            if not ids:
                return 0
            with self._lock:
                found: dict[int, int] = {}
                for start in range(0, len(ids), 900):
                    chunk = ids[start:start + 900]
                    q = ",".join("?" * len(chunk))
                    found.update(self._db.execute(f"SELECT id, removed FROM images WHERE id IN ({q})", chunk))
                missing = [i for i in ids if i not in found]
                if missing:
                    raise KeyError(f"unknown image ids: {missing[:10]}")
                live = sorted({i for i in ids if found[i] == 0})
                if not live:
                    return 0
                seq = self._remove_seq() + 1
                with self._db:
                    self._db.execute("UPDATE meta SET value = ? WHERE key = 'remove_seq'", (str(seq),))
                    self._db.executemany("UPDATE images SET removed = ? WHERE id = ?", [(seq, i) for i in live])
                if self._backend is not None and self._backend_ready():
                    self._backend.remove(np.array(live, dtype=np.int64))
                    self._backend_remove_seq = seq
            if save:
                self.save_index()
            return len(live)

    @_store_errors
    def remove_paths(self, paths: Iterable[str | os.PathLike]) -> int:
        """Remove the live images with these paths (absolute or relative to the cwd)."""
        with self._write_lock:
            ids = []
            for p in paths:
                p = os.path.abspath(os.fspath(p))
                with self._lock:
                    rows = self._db.execute("SELECT id FROM images WHERE path = ? AND removed = 0", (p,)).fetchall()
                if not rows:
                    raise KeyError(f"no indexed image at {p}")
                ids.extend(r[0] for r in rows)
            return self.remove(ids)

    # -- the backend -------------------------------------------------------------------------

    def _backend_ready(self) -> bool:
        b = self._backend
        return b is not None and b.is_trained

    @staticmethod
    def _add_to(b: Backend, vec: np.ndarray, ids: np.ndarray) -> None:
        # an external engine may already hold rows sent before a crash: upsert them
        if b.external:
            b.add(vec, ids, replace=True)
        else:
            b.add(vec, ids)

    def _add_rows_to(self, b: Backend, start: int, n: int, vec: np.ndarray, alive: np.ndarray) -> None:
        """Add the live rows ``[start, n)`` of ``vec`` to ``b`` in 65536-row chunks."""
        for lo in range(start, n, 65536):
            hi = min(n, lo + 65536)
            ids = np.arange(lo, hi)[alive[lo:hi]]
            if ids.size:
                self._add_to(b, np.asarray(vec[ids]), ids)

    def _with_options(self, spec: str) -> str:
        """The spec plus run-time backend options that are never saved (e.g. a Milvus token)."""
        if not self.backend_options:
            return spec
        p = parse_spec(spec)
        if p.kind != "milvus":
            return spec
        return str(dataclasses.replace(p, params={**p.params, **self.backend_options}))

    def _load_backend(self) -> None:
        """Open the saved backend and bring it up to date with the committed rows."""
        with self._lock:
            spec = self._config["backend"]["spec"]
            info = self._config["index"]
            n = self.n_rows()
            if spec is None or parse_spec(spec).kind == "exact":
                self._backend = None
                return
            if info is None:
                self._backend = None  # not built yet: exact fallback
                return
            directory = self._file(info["dir"], "index directory")
            try:
                b = load_backend(self._with_options(spec), self.search_dim, directory, root=self.path)
            except ConnectionError as e:
                raise StoreError(f"cannot reach the search backend {spec}: {e}") from None
            except FileNotFoundError as e:
                raise StoreCorruptError(f"index files in {directory} are missing ({e}); "
                                        f"run `imret index rebuild {self.path}`") from None
            except (ValueError, RuntimeError, OSError) as e:
                raise StoreCorruptError(f"index in {directory} cannot be read ({e}); "
                                        f"run `imret index rebuild {self.path}`") from None
            covered, seq = int(info["rows"]), int(info["remove_seq"])
            if covered > n:
                b.close()
                raise StoreCorruptError(f"index in {directory} covers {covered} rows but the metadata lists {n}")
            self._backend = b
            self._backend_rows = covered
            self._backend_remove_seq = seq
            self._catch_up()

    def _catch_up(self) -> None:
        with self._lock:
            n = self.n_rows()
            b = self._backend
            if b is None:
                return
            if b.external and not self.writable:
                # a reader never writes to a shared engine: rows the writer has not sent yet are
                # not found yet, and removals it has not applied yet are filtered from results
                self._pending_dead = set(self._removed_ids(self._backend_remove_seq).tolist())
                return
            if self._backend_rows < n:
                self._add_rows_to(b, self._backend_rows, n, self.vectors(n), self._alive_mask(n))
                self._backend_rows = n
            seq = self._remove_seq()
            if self._backend_remove_seq < seq:
                dead = self._removed_ids(self._backend_remove_seq)
                if dead.size:
                    b.remove(dead)
                self._backend_remove_seq = seq

    def _searcher(self) -> Backend:
        """The backend to search now: the built index, or exact search over the vectors."""
        with self._lock:
            spec = self._config["backend"]["spec"]
            if not self._building and spec is not None and parse_spec(spec).kind != "exact":
                if self._backend is None and self._config["index"] is not None:
                    try:
                        self._load_backend()
                    except StoreCorruptError:
                        # a reader may race a writer that just replaced the index: look again
                        if not self.refresh():
                            raise
                        return self._searcher()
                else:
                    self._catch_up()
                if self._backend is not None and self._backend.is_trained:
                    return self._backend
            return self._exact_searcher()

    def _exact_searcher(self) -> ExactBackend:
        """Exact search over the stored vectors of the live rows (rebuilt when rows change)."""
        with self._lock:
            n = self.n_rows()
            seq = self._remove_seq()
            if self._fallback is None or self._fallback._n != n or self._fallback_seq != seq:
                self._fallback = ExactBackend.from_matrix(self.vectors(n), alive=self._alive_mask(n))
                self._fallback_seq = seq
            return self._fallback

    @_store_errors
    def save_index(self, *, force: bool = False) -> None:
        """Build the backend if it is due, and persist it (atomic: new directory + store.json)."""
        with self._write_lock:
            self._require_writable()
            with self._lock:
                n = self.n_rows()
                requested = self._config["backend"]["requested"]
                spec = self._config["backend"]["spec"]
                backend = self._backend
            if spec is None:
                kind = parse_spec(requested).kind
                if kind == "exact" or n > 0:
                    self._build_backend(resolve_spec(requested, n_hint=len(self)))
                return
            if parse_spec(requested).kind == "auto" and retune_due(self._config["backend"].get("tuning"), len(self)):
                self._build_backend(parse_spec(requested))  # the collection has grown: tune again
                return
            if parse_spec(spec).kind == "exact":
                return
            if backend is None:
                self._build_backend(parse_spec(spec))
                return
            if not backend.is_trained:
                return
            with self._lock:
                self._catch_up()
                dead = int(getattr(backend, "tombstones", 0) or 0)
                if dead <= max(1000, backend.ntotal // 4):
                    info = self._config["index"] or {}
                    if (not force and info.get("rows") == self._backend_rows
                            and info.get("remove_seq") == self._backend_remove_seq):
                        return
                    # under _lock: saving reads the live index (and Milvus Lite reloads it)
                    self._persist_backend()
                    return
            # tombstoned rows (HNSW cannot delete) slow every search: rebuild without them
            self._build_backend(parse_spec(spec))

    def _build_backend(self, spec) -> None:
        """(Re)build the backend from all live vectors; train it when it needs training.

        The caller holds ``_write_lock``, so rows and removals stay as they are. The old
        backend is dropped first (a Milvus collection is replaced in place); until the new
        one is installed, searches run exactly over the stored vectors, without waiting.
        """
        spec_str = str(spec)
        if spec.kind == "exact":
            with self._lock:
                if self._backend is not None:
                    self._backend.close()
                self._backend = None
                self._config["backend"]["spec"] = spec_str
                self._replace_index_dir(None)
            return
        with self._lock:
            n = self.n_rows()
            alive = self._alive_mask(n)
            vec = self.vectors(n)
            dim = self.search_dim
            seq = self._remove_seq()
            old, self._backend = self._backend, None
            self._building = True
            if old is not None:
                old.close()
        b = None
        tuning = None
        try:
            if spec.kind == "auto":  # choose the index on the vectors themselves
                tuned = tune(vec, alive, auto_target(spec.params))
                b, tuning = tuned.backend, tuned.record.to_dict()
                if b is None:  # exact search was chosen
                    with self._lock:
                        self._config["backend"].update(spec="exact", tuning=tuning)
                        self._replace_index_dir(None)
                        self._building = False
                    return
            else:
                b = create_backend(self._with_options(spec_str), dim, root=self.path, n_hint=int(alive.sum()))
            if not b.is_trained:
                need = b.min_train_size
                live_ids = np.flatnonzero(alive)
                if live_ids.size < need:
                    # not enough rows to train: search stays exact until there are
                    b.close()
                    b = None
                    with self._lock:
                        self._config["backend"]["spec"] = spec_str
                        self._replace_index_dir(None)
                        self._building = False
                    return
                rng = np.random.default_rng(0)
                sample = np.sort(rng.choice(live_ids, size=min(live_ids.size, max(need, 100_000)), replace=False))
                b.train(np.asarray(vec[sample]))
            if tuning is None:  # a tuned backend holds every live row already
                self._add_rows_to(b, 0, n, vec, alive)
            name, gen = self._save_backend_files(b)
        except BaseException:
            if b is not None:
                b.close()
            with self._lock:
                self._building = False
            raise
        with self._lock:
            self._backend = b
            self._backend_rows = n
            self._backend_remove_seq = seq
            self._building = False
            self._config["backend"]["spec"] = b.spec
            if tuning is not None:
                self._config["backend"]["tuning"] = tuning
            self._config["generation"] = gen
            self._replace_index_dir({"dir": name, "rows": n, "remove_seq": seq})

    def _save_backend_files(self, b: Backend) -> tuple[str, int]:
        """Write ``b`` into a new ``index.<generation>`` directory; returns its name and generation."""
        gen = int(self._config["generation"]) + 1
        name = f"index.{gen}"
        tmp = self.path / f".{name}.tmp"
        _remove_entry(tmp)
        try:
            tmp.mkdir()
            b.save(tmp)
            fsync_dir(tmp)
            os.replace(tmp, self.path / name)
        except BaseException:
            _remove_entry(tmp)  # a full disk leaves no half-written index behind
            raise
        fsync_dir(self.path)
        return name, gen

    def _persist_backend(self) -> None:
        with self._lock:
            name, gen = self._save_backend_files(self._backend)
            self._config["generation"] = gen
            self._replace_index_dir({"dir": name, "rows": self._backend_rows, "remove_seq": self._backend_remove_seq})

    def _replace_index_dir(self, info: dict[str, Any] | None) -> None:
        with self._lock:
            old = self._config["index"]
            self._config["index"] = info
            self._write_config()
        if old is not None and (info is None or old["dir"] != info["dir"]):
            _remove_entry(self._file(old["dir"], "index directory"))

    def _write_config(self) -> None:
        with self._lock:
            atomic_write_bytes(self.path / _STORE_JSON, json.dumps(self._config, indent=2).encode())

    def _recover_crcs(self, vectors: str, n: int, width: int | None = None) -> None:
        """Cut the checksums of ``vectors`` to ``n`` rows; rows without one (a store written
        before vectors had checksums) get theirs from the file as it is now."""
        f = self._file(_crc_sidecar(vectors), "checksum file")
        have = f.stat().st_size // 4 if f.is_file() else 0
        with self._lock:
            self._sums.pop(f.name, None)  # the file changes here: map it again when it is next read
        if have > n:
            os.truncate(f, n * 4)
        elif have < n:
            m = self._matrix(vectors, width or self.search_dim, n, check=False)
            for lo in range(have, n, 65536):
                hi = min(n, lo + 65536)
                self._write_at(f.name, lo * 4, _row_crcs(np.asarray(m[lo:hi])).tobytes())

    def _recover(self) -> None:
        """Writer start-up: drop leftovers of an interrupted write."""
        n = self.n_rows()
        self._truncate_rows(_DESCRIPTORS, self.dim, n)
        if self._config["vectors"] is not None:
            self._truncate_rows(self._config["vectors"], self.search_dim, n)
            self._recover_crcs(self._config["vectors"], n)
        if self._config["local"] is not None:
            name, width = self._config["local"]["file"], self._local_layout().width
            self._truncate_rows(name, width, n)
            self._recover_crcs(name, n, width)
        self._remove_unreferenced()
        if self._config["backend"]["spec"] is not None:
            self._load_backend()

    def _remove_unreferenced(self) -> None:
        """Remove temporary files and generated files that store.json does not name."""
        live = {_STORE_JSON, _SQLITE, _SQLITE + "-wal", _SQLITE + "-shm", _SQLITE + "-journal", _MODEL, _DESCRIPTORS, _LOCK}
        if self._config["vectors"]:
            live.update((self._config["vectors"], _crc_sidecar(self._config["vectors"])))
        if self._config["whitening"]:
            live.add(self._config["whitening"]["file"])
        if self._config["local"]:
            live.update((self._config["local"]["file"], _crc_sidecar(self._config["local"]["file"])))
        if self._config["index"]:
            live.add(self._config["index"]["dir"])
        if self._config.get("text"):
            live.add(self._config["text"]["file"])
        for entry in self.path.iterdir():
            name = entry.name
            stale = (name.startswith(".") and ".tmp" in name) or (
                _GENERATED.fullmatch(name) is not None and name not in live)
            if stale:
                _remove_entry(entry)

    # -- post-processing ---------------------------------------------------------------------

    @_store_errors
    def configure(
        self,
        *,
        backend: str | None = None,
        whitening: Whitening | None | str = "keep",
        dba: tuple[int, float] | None | str = "keep",
        query_expansion: QueryExpansion | None = None,
        local: str | None = "keep",
        rerank: Sequence[str] | None = None,
        progress: bool = False,
    ) -> None:
        """Change post-processing or the backend, recomputing vectors and rebuilding the index.

        ``local``: the local features to keep with every image, ``"sift"`` or ``"cnn"`` with
        optional extractor parameters (``"sift?max_keypoints=500"``), computed now for the
        images already in the store (from their files; an image whose file is gone gets none)
        and from then on by :meth:`add`; ``None`` drops them, ``"keep"`` leaves them.
        ``rerank``: the re-ranker specs searches use by default (see :mod:`imret.rerank`),
        ``[]`` for none.

        ``whitening``: a fitted :class:`~imret.whitening.Whitening` for the raw descriptors,
        ``None`` to drop it, ``"keep"``. ``dba``: ``(k, alpha)`` for αDBA over the database,
        ``None`` to drop, ``"keep"``. αDBA is computed over the rows present now; rows added
        later are whitened but not augmented until ``configure`` runs again (``info`` shows
        how many). The switch is atomic: until the new ``store.json`` lands, the old files
        serve searches. In this process, searches go on with the old vectors while the new
        ones are computed, then exactly over the new ones while the index is rebuilt.
        """
        with self._write_lock:
            self._require_writable()
            try:
                self._configure(backend=backend, whitening=whitening, dba=dba, query_expansion=query_expansion,
                                local=local, rerank=rerank, progress=progress)
            except BaseException:
                self._abandon()
                raise

    def _abandon(self) -> None:
        """After a failed configure: back to the configuration store.json holds (the committed
        one), and files of the attempt that it does not name are removed."""
        try:
            disk = _read_config(self.path / _STORE_JSON)
        except StoreError:
            return  # leave the files alone: the next writable open sorts them out
        with self._lock:
            self._config = disk
            self._whitening = None
            self._fallback = None
            self._drop_maps()
            self._building = False
            if self._backend is not None:
                self._backend.close()
                self._backend = None  # reopened from the committed index on the next search
        self._remove_unreferenced()

    def _configure(self, *, backend, whitening, dba, query_expansion, local="keep", rerank=None,
                   progress=False) -> None:
        with self._write_lock:
            with self._lock:
                cfg = json.loads(json.dumps(self._config))
                n = self.n_rows()
                old_vectors = self._config["vectors"]
                old_whitening = self._config["whitening"]
                old_local = self._config["local"] and self._config["local"]["file"]
            if rerank is not None:  # names and parameters, before anything is computed
                from ..rerank import check_rerank

                if isinstance(rerank, str):
                    rerank = [rerank]
                rerank = [str(check_rerank(r)) for r in rerank]
                if len(rerank) > 8:
                    raise ValueError(f"at most 8 re-rankers, got {len(rerank)}")
            local_spec = None if local in ("keep", None) else _parse_local(local)
            if backend is not None:  # the whole spec, before any vector is computed
                dim = (self.search_dim if isinstance(whitening, str) else
                       whitening.dim if isinstance(whitening, Whitening) else self.dim)
                check_backend_spec(backend, self.path)
                check_spec(self._with_options(backend), dim=dim)
            # the caller's write lock keeps rows and files as they are: compute without _lock
            gen = int(cfg["generation"]) + 1
            changed_vectors = False
            if whitening != "keep":
                if whitening is not None:
                    if whitening.input_dim != self.dim:
                        raise ValueError(f"whitening takes {whitening.input_dim}-D input; "
                                         f"the store's descriptors are {self.dim}-D")
                    name = f"whitening.{gen}.npz"
                    whitening.save(self.path / name)
                    digest, _ = _sha256_file(self.path / name)
                    cfg["whitening"] = {"file": name, "sha256": digest, "kind": whitening.kind, "dim": whitening.dim}
                else:
                    cfg["whitening"] = None
                changed_vectors = True
            if dba != "keep":
                if dba is not None:
                    k, alpha = int(dba[0]), float(dba[1])
                    if k < 1 or alpha < 0:
                        raise ValueError(f"dba needs k >= 1 and alpha >= 0, got k={k}, alpha={alpha}")
                    cfg["dba"] = {"k": k, "alpha": alpha, "rows": None}
                else:
                    cfg["dba"] = None
                changed_vectors = True
            elif cfg["dba"] is not None and changed_vectors:
                cfg["dba"]["rows"] = None
            if query_expansion is not None:
                cfg["query_expansion"] = dataclasses.asdict(query_expansion)
            if rerank is not None:
                cfg["rerank"] = rerank
            if local is None:
                cfg["local"] = None
            elif local_spec is not None:
                cfg["local"] = self._write_local(local_spec, gen, n, progress=progress)
            if backend is not None:
                check_backend_spec(backend, self.path)
                cfg["backend"] = {"requested": backend, "spec": None}
            if changed_vectors:
                w = None
                if cfg["whitening"] is not None:
                    w = (whitening if isinstance(whitening, Whitening)
                         else Whitening.load(self._file(cfg["whitening"]["file"], "whitening file")))
                if w is None and cfg["dba"] is None:
                    cfg["vectors"] = None
                else:
                    name = f"vectors.{gen}.f32"
                    width = w.dim if w is not None else self.dim
                    raw = self.descriptors(n)
                    out = np.empty((n, width), np.float32)
                    for start in range(0, n, 65536):
                        out[start:start + 65536] = postprocess(np.asarray(raw[start:start + 65536]), w, dim=self.dim)
                    if cfg["dba"] is not None and n > 1:
                        alive = self._alive_mask(n)
                        live = np.flatnonzero(alive)
                        k = min(cfg["dba"]["k"], live.size - 1)
                        if k >= 1:
                            out[live] = alpha_database_augmentation(out[live], k, cfg["dba"]["alpha"])
                        cfg["dba"]["rows"] = n
                    for fname, data in ((_crc_sidecar(name), _row_crcs(out)), (name, out)):
                        tmp = self.path / f".{fname}.tmp"
                        with open(tmp, "wb") as f:
                            f.write(data.tobytes())
                            f.flush()
                            os.fsync(f.fileno())
                        os.replace(tmp, self.path / fname)
                    cfg["vectors"] = name
            cfg["generation"] = gen
            rebuild = changed_vectors or backend is not None
            # swap in the new configuration, then rebuild the index from the new vectors
            with self._lock:
                self._config = cfg
                self._whitening = None
                self._fallback = None
                self._drop_maps()
                if rebuild:
                    cfg["backend"]["spec"] = None
                    if self._backend is not None:
                        self._backend.close()
                        self._backend = None
            if rebuild:
                self._build_backend(resolve_spec(cfg["backend"]["requested"], n_hint=len(self)))
            self._write_config()
            new_local = cfg["local"] and cfg["local"]["file"]
            for old in (old_vectors, old_vectors and _crc_sidecar(old_vectors), old_whitening and old_whitening["file"],
                        old_local, old_local and _crc_sidecar(old_local)):
                keep = (cfg["vectors"], cfg["vectors"] and _crc_sidecar(cfg["vectors"]),
                        cfg["whitening"] and cfg["whitening"]["file"], new_local, new_local and _crc_sidecar(new_local))
                if old and old not in keep:
                    with contextlib.suppress(OSError, StoreCorruptError):
                        _remove_entry(self._file(old, "old file"))

    def _write_local(self, spec: dict[str, Any], gen: int, n: int, *, progress: bool = False) -> dict[str, Any]:
        """Compute the local features of rows ``[0, n)`` into ``local.<gen>.rec`` (and its
        checksums), written whole under temporary names and renamed; returns the config block."""
        from ..local.extractors import create_local_extractor

        model = self.model if spec["kind"] == "cnn" else None
        extractor = create_local_extractor(spec["kind"], spec["params"], model)
        layout = extractor.layout()
        name = f"local.{gen}.rec"
        with self._lock:
            alive = self._alive_mask(n)
            paths = self._paths(np.flatnonzero(alive))
        tmp, tmp_crc = self.path / f".{name}.tmp", self.path / f".{_crc_sidecar(name)}.tmp"
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="local features", unit="img")
        with open(tmp, "wb") as f, open(tmp_crc, "wb") as fc:
            for lo in range(0, n, 64):
                part = [paths.get(i) if alive[i] else None for i in range(lo, min(n, lo + 64))]
                recs, _ = self._compute_local(extractor, layout, part)
                f.write(recs.tobytes())
                fc.write(_row_crcs(recs).tobytes())
                if bar is not None:
                    bar.update(len(part))
            for h in (f, fc):
                h.flush()
                os.fsync(h.fileno())
        if bar is not None:
            bar.close()
        os.replace(tmp_crc, self.path / _crc_sidecar(name))
        os.replace(tmp, self.path / name)
        fsync_dir(self.path)
        self._local_cache["extractor"] = (spec, extractor)
        return {"file": name, "layout": layout.to_dict(), "extractor": spec}

    @_store_errors
    def rebuild(self) -> None:
        """Rebuild the backend index from the stored vectors (after corruption or to retrain)."""
        with self._write_lock:
            self._require_writable()
            with self._lock:
                if self._backend is not None:
                    self._backend.close()
                    self._backend = None
                self._config["backend"]["spec"] = None
                requested = self._config["backend"]["requested"]
            self._build_backend(resolve_spec(requested, n_hint=len(self)))
            self._write_config()

    # -- reading -----------------------------------------------------------------------------

    @_store_errors
    def records(self, ids: Sequence[int]) -> list[ImageRecord]:
        """Metadata of the given ids (removed ones included); unknown ids raise ``KeyError``."""
        ids = [int(i) for i in ids]
        want = sorted(set(ids))
        found: dict[int, ImageRecord] = {}
        with self._lock:  # one query per 900 ids (SQLite's parameter limit), not one per id
            for start in range(0, len(want), 900):
                chunk = want[start:start + 900]
                rows = self._db.execute("SELECT id, path, size, width, height, sha256, added FROM images "
                                        f"WHERE id IN ({','.join('?' * len(chunk))})", chunk)
                found.update((r[0], ImageRecord(*r)) for r in rows)
        for i in ids:
            if i not in found:
                raise KeyError(f"unknown image id {i}")
        return [found[i] for i in ids]

    @_store_errors
    def is_live(self, image_id: int) -> bool:
        """True when ``image_id`` is indexed and not removed (unknown ids are not live)."""
        with self._lock:
            row = self._db.execute("SELECT removed FROM images WHERE id = ?", (int(image_id),)).fetchone()
        return row is not None and row[0] == 0

    @_store_errors
    def list(self, offset: int = 0, limit: int = 100) -> list[ImageRecord]:
        """Live images in id order, paged.

        Walks the id-ordered table skipping removed rows, so a page costs O(offset + limit):
        about 5 ms at offset 100k.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT id, path, size, width, height, sha256, added FROM images WHERE removed = 0 "
                "ORDER BY id LIMIT ? OFFSET ?", (int(limit), int(offset))).fetchall()
        return [ImageRecord(*r) for r in rows]

    def _paths(self, ids: np.ndarray) -> dict[int, str]:
        want = sorted({int(i) for i in ids.ravel() if i >= 0})
        out: dict[int, str] = {}
        with self._lock:
            for start in range(0, len(want), 900):
                chunk = want[start:start + 900]
                q = ",".join("?" * len(chunk))
                out.update(self._db.execute(f"SELECT id, path FROM images WHERE id IN ({q})", chunk).fetchall())
        return out

    @_store_errors
    def search_vectors(
        self,
        q: np.ndarray,
        k: int = 10,
        *,
        query_expansion: QueryExpansion | None = None,
        exact_rescore: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search with raw model descriptors ``(Q, D)``: whitening, backend, query expansion.

        Returns ``(scores, ids)`` ``(Q, k)``, padded with -inf / -1. Approximate backends'
        candidates are re-scored with the stored float32 vectors (``exact_rescore``).
        """
        positive_int(k, "k")
        with self._lock:
            self.refresh()
            qe = self.query_expansion if query_expansion is None else query_expansion
            x = self.postprocess(q)
            searcher = self._searcher()
            n_live = len(self)

            def stage(xq: np.ndarray, kq: int):
                return search_stage(xq, kq, searcher, n_live=n_live, rows=self._gather if exact_rescore else None,
                                    exact=self._exact_searcher,
                                    raw_search=lambda a, b: self._first_stage(searcher, a, b))

            scores, ids = expand_and_search(x, int(k), stage, self._gather, qe, n_live)
        return scores, ids

    @_store_errors
    def search_ids(
        self,
        ids: Sequence[int],
        k: int = 10,
        *,
        query_expansion: QueryExpansion | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search with the stored descriptors of indexed images ("more like this").

        Same as :meth:`search_vectors` on ``descriptors()[ids]``: returns ``(scores, ids)``
        ``(Q, k)``; each image usually finds itself first. An unknown or removed id raises
        ``KeyError`` naming it.
        """
        want = np.asarray(ids)
        if want.ndim != 1 or (want.size and (want.dtype == bool or not np.issubdtype(want.dtype, np.integer))):
            raise TypeError(f"ids must be a sequence of integers, got {ids!r}")
        want = want.astype(np.int64)
        with self._lock:
            state: dict[int, int] = {}
            distinct = sorted(set(want.tolist()))
            for start in range(0, len(distinct), 900):
                chunk = distinct[start:start + 900]
                q = ",".join("?" * len(chunk))
                state.update(self._db.execute(f"SELECT id, removed FROM images WHERE id IN ({q})", chunk))
            for i in want.tolist():
                if i not in state:
                    raise KeyError(f"unknown image id {i}")
                if state[i] != 0:
                    raise KeyError(f"image id {i} was removed")
            with self._lock:
                m = self._matrix(_DESCRIPTORS, self.dim, check=False)
                x = np.asarray(m[want], dtype=np.float32)
                self._check_rows(_DESCRIPTORS, m, want)
            return self.search_vectors(x, k, query_expansion=query_expansion)

    def _first_stage(self, searcher: Backend, x: np.ndarray, k: int):
        """The backend's top k, without the removals a shared engine has not applied yet (a
        reader of a Milvus collection filters them out itself)."""
        dead = self._pending_dead if searcher is self._backend else set()
        scores, ids = searcher.search(x, k + len(dead))
        if dead:
            keep = ~np.isin(ids, np.fromiter(dead, np.int64))
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
            scores = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(scores, order, 1), -np.inf)
            ids = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(ids, order, 1), -1)
        return scores, ids

    def _gather(self, ids: np.ndarray) -> np.ndarray:
        """The indexed rows of a ``(Q, k)`` id array as ``(Q, k, D')``; padding ids (-1) give zeros."""
        valid = ids >= 0
        rows = self._rows(np.where(valid, ids, 0))
        return np.where(valid[..., None], rows.reshape(*ids.shape, -1), 0.0).astype(np.float32)

    @_store_errors
    def search(
        self,
        queries: Any = None,
        *,
        text: "str | Sequence[str] | None" = None,
        text_model: Any = None,
        bboxes: Sequence[Sequence[float] | None] | None = None,
        k: int = 10,
        query_expansion: QueryExpansion | None = None,
        rerank: "Sequence[Any] | str | None" = None,
        on_error: str = "raise",
        **extract_kw: Any,
    ) -> "SearchResults | SearchHits":
        """Search with query images (optionally cropped to ``(x1, y1, x2, y2)`` boxes).

        ``queries`` are image paths, PIL images or ``H x W x 3`` uint8 RGB arrays, in any mix
        (see :func:`imret.extract.extract`; anything else raises ``TypeError``), or one image
        alone. Returns per query its :class:`SearchHits` (a list of ranked :class:`Hit`
        ``(score, id, path)`` that shows as thumbnails in a notebook), as a
        :class:`SearchResults` list in query order; for one image given alone, its
        :class:`SearchHits`. ``bboxes`` has one box or None per query (for one image alone,
        its box may be given by itself).

        A query image that cannot be read raises :class:`~imret.images.ImageError`
        (``on_error="raise"``) or gets an empty :class:`SearchHits` whose ``error`` says why
        (``"skip"``). All queries are extracted in one call, without holding the store's
        lock (other searches and an ``add`` go on meanwhile), then searched in batches.

        ``rerank``: re-ranker specs (``"sift:100"``, see :mod:`imret.rerank`) or
        :class:`~imret.retrieval.Reranker` objects applied after the first stage; None: the
        store's own (``configure(rerank=...)``), ``[]``: none. Each stage sees its own top_k
        candidates whatever ``k`` is; what it finds per hit is in :attr:`Hit.extras`.

        ``text``: one text query (a ``str``) or a list of them instead of images, searched with
        the store's caption model (:meth:`set_text_model`) by ``θ(t)·φ``; :attr:`SearchHits.query`
        is the text (and :attr:`SearchHits.image` a picture of it). Refused (``ValueError``) on a
        store without a caption model or with whitening / αDBA, and for a ``rerank`` stage that
        needs pixels (``sift``, ``cnn``, ``aml``); the store's own such stages are skipped (see
        :mod:`imret.retrieval`). A text none of whose words the model knows raises
        :class:`~imret.text.queries.NoKnownWordError` (``on_error="raise"``) or gets an empty
        :class:`SearchHits` with its ``error`` (``"skip"``). ``text_model``: a caption model to
        use instead of the store's own.
        """
        from ..images import ImageError, check_image_input, image_label, image_list, is_single_image

        if on_error not in ("raise", "skip"):
            raise ValueError(f"unknown on_error {on_error!r}; available: 'raise', 'skip'")
        positive_int(k, "k")
        if text is not None:
            if queries is not None or bboxes is not None or extract_kw:
                raise ValueError("give text=... or query images, not both (a text query has no box or extraction)")
            return self._search_text(text, k=int(k), query_expansion=query_expansion, rerank=rerank,
                                     on_error=on_error, text_model=text_model)
        if queries is None:
            raise ValueError("give query images (or text=...)")
        single = is_single_image(queries)
        items = [check_image_input(q, i) for i, q in enumerate([queries] if single else image_list(queries, "queries"))]
        if single and bboxes is not None and len(bboxes) == 4 and all(
                isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in bboxes):
            bboxes = [bboxes]  # the box of the one query
        if bboxes is not None:
            bboxes = list(bboxes)
            if len(bboxes) != len(items):
                raise ValueError(f"got {len(bboxes)} bboxes for {len(items)} queries; give one box (or None) per query")
        stages = self.rerankers(rerank)  # a bad spec fails before any extraction
        ex = self.encode(items, bboxes, **extract_kw)
        if ex.skipped and on_error == "raise":
            s = ex.skipped[0]
            raise ImageError(s.path, s.reason)
        errors = {s.index: s.reason for s in ex.skipped}
        out = SearchResults(
            SearchHits(query=image_label(q, i), bbox=None if bboxes is None else bboxes[i], error=errors.get(i),
                       image=None if isinstance(q, str) else q)
            for i, q in enumerate(items))
        rows = np.asarray(ex.indices, dtype=np.int64)
        depth = max(int(k), rerank_depth(stages))
        for lo in range(0, rows.size, _SEARCH_BATCH):
            part = rows[lo:lo + _SEARCH_BATCH]
            desc = ex.descriptors[lo:lo + _SEARCH_BATCH]
            with self._lock:  # ids and their paths from the same state
                scores, ids = self.search_vectors(desc, depth, query_expansion=query_expansion)
                if stages:
                    shown = [(items[r], None if bboxes is None else bboxes[r]) for r in part.tolist()]
                    res = truncate(apply_rerankers(stages, self.postprocess(desc), scores, ids, shown), int(k))
                else:
                    res = SearchResult(scores, ids)
                hits = self.hits(res.scores, res.ids, res.extras)
            for r, h in zip(part.tolist(), hits):
                out[r].extend(h)
        return out[0] if single else out

    def rerankers(self, specs: "Sequence[Any] | str | None" = None) -> list:
        """Re-ranker stages over this store: built from specs (None: the store's configured
        ones; objects with a ``rerank`` method are taken as they are). Stages are built once
        per spec and reused (the local-feature extractor and the feature-map cache with them)."""
        from ..rerank import build_reranker, check_rerank

        if specs is None:
            specs = self.rerank_specs
        elif isinstance(specs, str):
            specs = [specs]
        out = []
        for sp in specs:
            if hasattr(sp, "rerank") and not isinstance(sp, str):
                out.append(sp)
                continue
            key = str(check_rerank(sp))
            stage = self._local_cache.get(("stage", key))
            if stage is None:
                stage = build_reranker(key, self.rerank_sources())
                self._local_cache[("stage", key)] = stage
            out.append(stage)
        return out

    @property
    def rerank_specs(self) -> list[str]:
        """The re-ranker specs searches use by default (``configure(rerank=...)``)."""
        with self._lock:
            return list(self._config["rerank"])

    def rerank_sources(self):
        """What re-rankers read from this store (:class:`imret.rerank.RerankSources`): its
        model and image size, its rows, its post-processing, its local features (the query
        side extracted as they were) and database feature maps (computed from the indexed
        files on demand, the last 2000 kept in memory)."""
        from ..rerank import RerankSources, _Cached

        def local_query(kind: str):
            if kind != self.local_kind:
                raise StoreError(f"re-ranker {kind!r} needs {kind} local features, and {self.path} keeps "
                                 f"{self.local_kind or 'none'}; add them with `imret index configure {self.path} "
                                 f"--local {kind}`")
            return self.local_extractor()

        def local_database(kind: str):
            return self.local_features

        def maps_at(size: int):
            """Database feature maps at ``size`` px (long side), computed from the indexed files
            on demand; the last ones kept per size."""
            from ..local.localization import compute_maps

            def one_map(i: int):
                path = self._paths(np.array([i])).get(i)
                if path is None:
                    return None
                try:
                    (fm,) = compute_maps(self.model, [path], image_size=size, device=self.device)
                except Exception:  # the file is gone or unreadable: no map, the hit keeps its place
                    return None
                return fm

            key = ("maps", int(size))
            maps = self._local_cache.get(key)
            if maps is None:
                maps = self._local_cache[key] = _Cached(one_map, lru=_MAPS_CACHED)
            return maps

        size = self.preprocessing.image_size
        return RerankSources(model=self.model, image_size=size, rows=self._gather,
                             postprocess=self.postprocess, local_query=local_query, local_database=local_database,
                             maps=maps_at(size), maps_at=maps_at, device=self.device)

    def find_duplicates(self, threshold: float | None = None, *, verify: bool = True, k: int = 8,
                        tta: "Sequence[str] | str" = "default", progress: bool = False, **extract_kw: Any):
        """Near-duplicate groups among the live images (keys: ids): candidates from the stored
        descriptors (and flipped / rotated views of the files), confirmed by RootSIFT
        verification; see :func:`imret.dedup.find_duplicates_in_store`."""
        from ..dedup import find_duplicates_in_store

        return find_duplicates_in_store(self, threshold=threshold, k=k, tta=tta, verify=verify,
                                        progress=progress, **extract_kw)

    @_store_errors
    def hits(self, scores: np.ndarray, ids: np.ndarray, extras: dict[str, np.ndarray] | None = None) -> list[list[Hit]]:
        """Attach paths (and the re-rankers' per-hit ``extras``) to ``(scores, ids)`` results."""
        paths = self._paths(ids)
        out = []
        for q, (srow, irow) in enumerate(zip(scores, ids)):
            row = []
            for j, (s, i) in enumerate(zip(srow, irow)):
                if i < 0:
                    continue
                row.append(Hit(float(s), int(i), paths[int(i)], _hit_extras(extras, q, j)))
            out.append(row)
        return out

    # -- reporting ---------------------------------------------------------------------------

    @_store_errors
    def info(self) -> dict[str, Any]:
        """Facts about the store (for ``imret index info``)."""
        disk = _disk_bytes(self.path)  # without the lock: a writer may be adding files meanwhile
        with self._lock:
            n = self.n_rows()
            live = len(self)
            cfg = self._config
            out = {
                "path": str(self.path),
                "format": f"{cfg['format']} v{cfg['version']}",
                "created": cfg["created"],
                "images": live,
                "removed": n - live,
                "dim": self.dim,
                "search_dim": self.search_dim,
                "model": {k: cfg["model"].get(k) for k in ("source", "weights_sha256", "spec")},
                "preprocessing": cfg["preprocessing"],
                "whitening": cfg["whitening"],
                "query_expansion": cfg["query_expansion"],
                "dba": cfg["dba"],
                "backend": dict(cfg["backend"]),
                "rerank": list(cfg["rerank"]),
                "text": None if cfg.get("text") is None else {
                    k: cfg["text"][k] for k in ("dim", "terms", "source", "sha256")},
                "local": None,
                "disk_bytes": disk,
            }
            if cfg["local"] is not None:
                layout = self._local_layout()
                f = self.path / cfg["local"]["file"]
                out["local"] = {"kind": cfg["local"]["extractor"]["kind"], "params": cfg["local"]["extractor"]["params"],
                                "max_keypoints": layout.max_keypoints, "dim": layout.dim, "codec": layout.codec,
                                "bytes_per_image": layout.nbytes,
                                "file_bytes": f.stat().st_size if f.is_file() else 0}
            out = json.loads(json.dumps(out))  # a copy: the writer changes cfg in place
            if out["text"] is not None:  # text queries need the raw descriptors (imret.retrieval)
                out["text"]["searchable"] = cfg["whitening"] is None and cfg["dba"] is None
            if cfg["dba"] is not None and cfg["dba"].get("rows") is not None:
                out["dba"] = dict(out["dba"], rows_not_augmented=n - cfg["dba"]["rows"])
            searcher = self._searcher()
            out["backend"]["searching_with"] = "exact (index not built yet)" if (
                isinstance(searcher, ExactBackend) and parse_spec(self.backend_spec).kind != "exact") else searcher.spec
            out["backend"]["ntotal"] = searcher.ntotal
        return out

    @_store_errors
    def verify(self) -> list[str]:
        """Full consistency check; returns the problems found (empty when the store is sound).

        Checks the rows committed when it starts; reads descriptors without holding the lock,
        so searches go on while a large store is checked.
        """
        problems = []
        with self._lock:
            ok = self._db.execute("PRAGMA integrity_check").fetchone()[0]
            n = self.n_rows()
        if ok != "ok":
            problems.append(f"SQLite integrity check: {ok}")
        raw = self._matrix(_DESCRIPTORS, self.dim, n, check=False)
        for start in range(0, n, 4096):
            with self._lock:
                rows = self._db.execute("SELECT id, crc32 FROM images WHERE id >= ? AND id < ? ORDER BY id",
                                        (start, min(start + 4096, n))).fetchall()
            block = np.asarray(raw[start:start + 4096])
            for i, crc in rows:
                if zlib.crc32(block[i - start].tobytes()) != crc:
                    problems.append(f"descriptor of image {i} does not match its checksum")
        with self._lock:
            vectors = self._config["vectors"]
            width = self.search_dim
        if vectors is not None:
            m = self._matrix(vectors, width, n, check=False)
            for start in range(0, n, 65536):
                ids = np.arange(start, min(n, start + 65536))
                expected = self._expected_crcs(vectors, ids)
                if expected is None:
                    problems.append(f"{vectors} has no checksums ({_crc_sidecar(vectors)} is missing)")
                    break
                got = _row_crcs(np.asarray(m[start:start + ids.size])).astype(np.int64)
                problems.extend(f"post-processed vector of image {i} does not match its checksum"
                                for i in ids[got != expected].tolist())
        with self._lock:
            local = self._config["local"]
        if local is not None:
            name, layout = local["file"], self._local_layout()
            m = self._matrix(name, layout.width, n, check=False)
            for start in range(0, n, 4096):
                ids = np.arange(start, min(n, start + 4096))
                expected = self._expected_crcs(name, ids)
                if expected is None:
                    problems.append(f"{name} has no checksums ({_crc_sidecar(name)} is missing)")
                    break
                got = _row_crcs(np.asarray(m[start:start + ids.size])).astype(np.int64)
                problems.extend(f"local features of image {i} do not match their checksum"
                                for i in ids[got != expected].tolist())
        with self._lock:
            text = self._config.get("text")
        if text is not None:  # the caption model: present, inside the store, as its checksum says
            try:
                if _sha256_file(self._file(text["file"], "text model file"))[0] != text["sha256"]:
                    problems.append(f"text model file {text['file']} does not match its checksum")
            except (OSError, StoreCorruptError) as e:
                problems.append(f"text model file {text['file']}: {e}")
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM images WHERE id < ? ORDER BY id", (n,))]
            if ids != list(range(n)):
                problems.append("image ids are not contiguous")
            dup = self._db.execute("SELECT sha256, COUNT(*) FROM images WHERE removed = 0 GROUP BY sha256 "
                                   "HAVING COUNT(*) > 1").fetchall()
            if dup:
                problems.append(f"{len(dup)} contents indexed more than once")
            live = int(self._db.execute("SELECT COUNT(*) FROM images WHERE removed = 0").fetchone()[0])
            try:
                searcher = self._searcher()
            except StoreCorruptError as e:  # damaged rows are listed above one by one
                if not problems:
                    problems.append(str(e))
            else:
                if searcher.ntotal != live:
                    problems.append(f"the search index holds {searcher.ntotal} vectors for {live} live images")
        return problems


_LOCAL_KINDS = ("sift", "cnn")
_MAPS_CACHED = 2000  # database feature maps a store keeps in memory for localisation


def _check_prepared(ex: Any, recs: Any, n: int, dim: int) -> None:
    """Refuse what an ``extractor`` hook of :meth:`Store.add` returned for ``n`` paths unless it
    has the shape of :meth:`Store.prepare_rows`' result (rows, then input positions)."""
    d = getattr(ex, "descriptors", None)
    idx = getattr(ex, "indices", None)
    if not isinstance(d, np.ndarray) or d.dtype != np.float32 or d.ndim != 2 or d.shape[1] != dim:
        raise StoreError(f"the extractor gave descriptors {getattr(d, 'shape', type(d).__name__)} "
                         f"({getattr(d, 'dtype', '')}); expected (M, {dim}) float32")
    if not isinstance(idx, np.ndarray) or idx.shape != (d.shape[0],) or (
            idx.size and (np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= n)):
        raise StoreError(f"the extractor gave row positions {idx!r}; expected {d.shape[0]} increasing "
                         f"positions in [0, {n})")
    if recs is not None and (not isinstance(recs, np.ndarray) or recs.ndim != 2 or len(recs) != d.shape[0]):
        raise StoreError(f"the extractor gave local-feature records {getattr(recs, 'shape', type(recs).__name__)} "
                         f"for {d.shape[0]} rows")


def _hit_extras(extras: dict[str, np.ndarray] | None, q: int, j: int) -> dict[str, Any]:
    """The re-rankers' values for one hit as plain Python (JSON-ready); fill values (NaN,
    -1) are left out."""
    out: dict[str, Any] = {}
    for name, a in (extras or {}).items():
        v = a[q, j]
        if np.issubdtype(a.dtype, np.floating):
            if np.isnan(v).any():
                continue
            out[name] = float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64).tolist()
        elif np.issubdtype(a.dtype, np.integer):
            if np.ndim(v) == 0 and v < 0:
                continue
            out[name] = int(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
        elif a.dtype == bool:
            out[name] = bool(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
    if isinstance(out.get("box"), list):
        out["box"] = tuple(out["box"])
    return out


def _parse_local(spec: Any) -> dict[str, Any]:
    """``"sift"``, ``"cnn?level=-2&max_keypoints=300"`` -> ``{"kind", "params"}`` (checked)."""
    from ..specs import split_spec, spec_value

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"local features are named by a string ({', '.join(_LOCAL_KINDS)}), got {spec!r}")
    kind, colon, target, raw = split_spec(spec, "local features spec")
    if colon:
        raise ValueError(f"local features {kind!r} take no ':' part, got {spec!r}; e.g. 'cnn?level=-2'")
    out = _local_spec({"kind": kind, "params": {k: spec_value(v) for k, v in raw.items()}})
    from ..local.extractors import check_local_params

    check_local_params(out["kind"], out["params"])
    return out


def _local_spec(value: Any) -> dict[str, Any]:
    """The ``local.extractor`` block of store.json: ``{"kind": "sift"|"cnn", "params": {...}}``
    with plain scalar parameters (the extractor checks their names and values when built)."""
    d = _dict_with(value, {"kind", "params"}, "local.extractor")
    if d["kind"] not in _LOCAL_KINDS:
        raise ValueError(f"local.extractor.kind is {d['kind']!r}; available: {', '.join(_LOCAL_KINDS)}")
    if not isinstance(d["params"], dict) or len(d["params"]) > 32 or not all(
            isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in d["params"].items()):
        raise ValueError(f"local.extractor.params must be an object of scalars, got {d['params']!r}")
    return d


def _crc_sidecar(rows_name: str) -> str:
    """``vectors.<g>.crc32`` / ``local.<g>.crc32``: the little-endian uint32 CRC32 of each row
    of ``vectors.<g>.f32`` / ``local.<g>.rec``."""
    return rows_name.rsplit(".", 1)[0] + ".crc32"


def _map_checksums(path: Path, n: int) -> np.ndarray:
    """The first ``n`` checksums of a ``vectors.<g>.crc32`` file, memory-mapped read-only."""
    return np.memmap(path, dtype="<u4", mode="r", shape=(n,)) if n else np.zeros(0, "<u4")


def _row_crcs(x: np.ndarray) -> np.ndarray:
    """CRC32 of each float32 row, as stored in ``vectors.<g>.crc32``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.fromiter((zlib.crc32(r) for r in x), "<u4", count=x.shape[0])


def _remove_entry(p: Path) -> None:
    """Remove a file or directory of the store; a symlink is removed itself, never followed."""
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


def _disk_bytes(path: Path) -> int:
    """Bytes in the files under ``path``; files that vanish while it looks are skipped."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f), follow_symlinks=False).st_size
    return total


_SCHEMA_SQL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    added TEXT NOT NULL,
    removed INTEGER NOT NULL DEFAULT 0,
    crc32 INTEGER NOT NULL
);
CREATE UNIQUE INDEX images_live_sha256 ON images(sha256) WHERE removed = 0;
CREATE INDEX images_path ON images(path);
CREATE INDEX images_removed ON images(removed) WHERE removed > 0;
"""


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
    else:
        db = sqlite3.connect(path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
    return db


def _read_config(path: Path) -> dict[str, Any]:
    """Read and check ``store.json``: an untrusted file, so every value is checked here, once,
    before anything uses it (types, ranges, and file names that stay inside the store)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_CONFIG_BYTES + 1)
        if len(data) > _MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {_MAX_CONFIG_BYTES} bytes")
        config = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StoreCorruptError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != STORE_FORMAT:
        raise StoreCorruptError(f"{path} is not an imret store description (format {config.get('format') if isinstance(config, dict) else None!r})")
    version = config.get("version")
    if version != STORE_VERSION:
        raise StoreVersionError(f"{path.parent} was written in store format {version!r}; this imret reads format "
                                f"{STORE_VERSION}" + (" (upgrade imret)" if isinstance(version, int) and version > STORE_VERSION else ""))
    required = ("store_id", "dim", "model", "preprocessing", "query_expansion", "backend", "generation",
                "whitening", "dba", "vectors", "index")
    missing = [k for k in required if k not in config]
    if missing:
        raise StoreCorruptError(f"{path} lacks keys {missing}")
    config.setdefault("local", None)  # stores written before local features and re-rankers
    config.setdefault("rerank", [])
    config.setdefault("text", None)  # stores written before text queries
    try:
        _check_config(config, path.parent)
    except (ValueError, TypeError) as e:
        raise StoreCorruptError(f"{path}: {e}; the store was not changed") from None
    return config


_MAX_CONFIG_BYTES = 1 << 22
# the names store.json may give its files: exactly what the store itself writes
_NAME_PATTERNS = {
    "model.file": re.compile(r"model\.safetensors"),
    "vectors": re.compile(r"vectors\.\d{1,18}\.f32"),
    "whitening.file": re.compile(r"whitening\.\d{1,18}\.npz"),
    "index.dir": re.compile(r"index\.\d{1,18}"),
    "local.file": re.compile(r"local\.\d{1,18}\.rec"),
    "text.file": re.compile(r"text\.\d{1,18}\.safetensors"),
}
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a valid JSON number")


def _int_in(value: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _dict_with(value: Any, keys: set[str], what: str, optional: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object, got {type(value).__name__}")
    missing = keys - set(value)
    unknown = set(value) - keys - optional
    if missing or unknown:
        raise ValueError(f"{what} has " + ", ".join(filter(None, (
            missing and f"missing keys {sorted(missing)}", unknown and f"unknown keys {sorted(unknown)}"))))
    return value


def _check_name(value: Any, key: str) -> str:
    """A file name from store.json: one of the names the store writes, nothing else."""
    if not isinstance(value, str) or _NAME_PATTERNS[key].fullmatch(value) is None:
        raise ValueError(f"{key} is {value!r}; expected a file of the store named like "
                         f"{_NAME_PATTERNS[key].pattern.replace(chr(92), '')!r} (no directories, no '..')")
    return value


def _check_config(c: dict[str, Any], root: Path) -> None:
    """Raise ``ValueError`` naming the first bad value of a parsed ``store.json``."""
    if not isinstance(c["store_id"], str) or not re.fullmatch(r"[0-9a-f]{1,64}", c["store_id"]):
        raise ValueError(f"store_id must be a hex string, got {c['store_id']!r}")
    _int_in(c["dim"], 1, 1 << 20, "dim")
    _int_in(c["generation"], 0, 10**18, "generation")
    m = _dict_with(c["model"], {"file", "sha256", "source", "spec"}, "model", optional={"weights_sha256"})
    ws = m.get("weights_sha256")  # the ImageNet (or other) weights the model started from, when known
    if ws is not None and (not isinstance(ws, str) or not _HEX64.fullmatch(ws)):
        raise ValueError(f"model.weights_sha256 must be null or 64 hex digits, got {ws!r}")
    _check_name(m["file"], "model.file")
    if not isinstance(m["sha256"], str) or not _HEX64.fullmatch(m["sha256"]):
        raise ValueError(f"model.sha256 must be 64 hex digits, got {m['sha256']!r}")
    if not isinstance(m["source"], str) or not isinstance(m["spec"], dict):
        raise ValueError("model.source must be a string and model.spec an object")
    if not isinstance(c["preprocessing"], dict):
        raise ValueError("preprocessing must be an object")
    try:
        Preprocessing.from_dict(c["preprocessing"])  # bad values raise ValueError themselves
    except StoreCorruptError as e:  # unknown keys (_reject_unknown)
        raise ValueError(str(e)) from None
    if not isinstance(c["query_expansion"], dict):
        raise ValueError("query_expansion must be an object")
    QueryExpansion.from_dict(c["query_expansion"])  # ValueError naming the bad key or value
    b = _dict_with(c["backend"], {"requested", "spec"}, "backend", optional={"tuning"})
    for key in ("requested", "spec"):
        if b[key] is None and key == "spec":
            continue
        if not isinstance(b[key], str):
            raise ValueError(f"backend.{key} must be a string, got {b[key]!r}")
        check_backend_spec(b[key], root)
    if b.get("tuning") is not None:  # what the auto backend chose and measured
        rec = TuningRecord.from_dict(b["tuning"])
        if parse_spec(b["requested"]).kind != "auto":
            raise ValueError(f"backend.tuning is only kept for an 'auto' backend, not {b['requested']!r}")
        if b["spec"] is not None and rec.spec != b["spec"]:
            raise ValueError(f"backend.tuning.spec {rec.spec!r} is not the backend's spec {b['spec']!r}")
    if c["whitening"] is not None:
        w = _dict_with(c["whitening"], {"file", "sha256", "kind", "dim"}, "whitening")
        _check_name(w["file"], "whitening.file")
        if not isinstance(w["sha256"], str) or not _HEX64.fullmatch(w["sha256"]):
            raise ValueError(f"whitening.sha256 must be 64 hex digits, got {w['sha256']!r}")
        _int_in(w["dim"], 1, 1 << 20, "whitening.dim")
    if c["dba"] is not None:
        d = _dict_with(c["dba"], {"k", "alpha", "rows"}, "dba")
        _int_in(d["k"], 1, 1 << 20, "dba.k")
        if isinstance(d["alpha"], bool) or not isinstance(d["alpha"], (int, float)) or not 0 <= d["alpha"] < 1e6:
            raise ValueError(f"dba.alpha must be a number in [0, 1e6), got {d['alpha']!r}")
        if d["rows"] is not None:
            _int_in(d["rows"], 0, 1 << 62, "dba.rows")
    if c["vectors"] is not None:
        _check_name(c["vectors"], "vectors")
    if c["local"] is not None:
        from ..local.storage import RecordLayout

        loc = _dict_with(c["local"], {"file", "layout", "extractor"}, "local")
        _check_name(loc["file"], "local.file")
        RecordLayout.from_dict(loc["layout"])
        _local_spec(loc["extractor"])
    if not isinstance(c["rerank"], list) or len(c["rerank"]) > 8 or not all(isinstance(x, str) for x in c["rerank"]):
        raise ValueError(f"rerank must be a list of at most 8 re-ranker specs, got {c['rerank']!r}")
    from ..rerank import parse_rerank

    for spec in c["rerank"]:
        parse_rerank(spec)
    if c["text"] is not None:
        t = _dict_with(c["text"], {"file", "sha256", "dim", "terms", "source"}, "text")
        _check_name(t["file"], "text.file")
        if not isinstance(t["sha256"], str) or not _HEX64.fullmatch(t["sha256"]):
            raise ValueError(f"text.sha256 must be 64 hex digits, got {t['sha256']!r}")
        if _int_in(t["dim"], 1, 1 << 20, "text.dim") != c["dim"]:
            raise ValueError(f"text.dim is {t['dim']} but the store's descriptors are {c['dim']}-D")
        _int_in(t["terms"], 1, 1 << 31, "text.terms")
        if not isinstance(t["source"], str) or len(t["source"]) > 4096:
            raise ValueError("text.source must be a string of at most 4096 characters")
    if c["index"] is not None:
        x = _dict_with(c["index"], {"dir", "rows", "remove_seq"}, "index")
        _check_name(x["dir"], "index.dir")
        _int_in(x["rows"], 0, 1 << 62, "index.rows")
        _int_in(x["remove_seq"], 0, 1 << 62, "index.remove_seq")


def check_new_store_dir(path: str | os.PathLike, *, exist_ok: bool = False) -> bool:
    """Check that :meth:`Store.create` can make a store at ``path``: it does not exist or is
    an empty directory (False), or, with ``exist_ok``, it holds a store already (True: open
    it). Raises ``FileExistsError`` saying what to do otherwise; nothing is written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; choose a new directory for the store")
    if path.exists() and any(path.iterdir()):
        if (path / _STORE_JSON).exists():
            if exist_ok:
                return True
            raise FileExistsError(f"{path} already holds a store; use `imret index add` to extend it")
        raise FileExistsError(f"{path} exists and is not empty; choose a new directory for the store")
    return False


def check_backend_spec(spec: str, root: Path) -> BackendSpec:
    """Parse a backend spec for the store at ``root``; a Milvus Lite file must lie inside it,
    and a Milvus spec holds no credentials.

    Raises ``ValueError`` naming the spec (a store never writes outside its directory, and a
    store's own description cannot point it at someone else's database).
    """
    s = parse_spec(spec)
    if s.kind == "milvus":
        from .milvus_backend import check_no_secrets

        check_no_secrets(s)  # store.json is no place for a token
    if s.kind == "milvus" and "://" not in s.target:
        target = s.target
        parts = Path(target).parts
        if not target or Path(target).is_absolute() or target.startswith("~") or ".." in parts:
            raise ValueError(f"backend {spec!r}: a Milvus Lite file must be a relative path inside the store "
                             "directory, such as 'milvus:./vectors.db' (use a milvus:http://... URI for a server)")
        _contained(root, root / target, f"backend {spec!r}")
    return s


_LOCK_RECORD_BYTES = 4096


def _printable(value: Any, limit: int) -> str | None:
    """A string from the lock file, cut to ``limit`` characters, control characters escaped;
    None for anything that is not a string."""
    if not isinstance(value, str) or not value:
        return None
    value = value[:limit]
    return value if value.isprintable() else json.dumps(value)[1:-1]


def _read_lock_record(fd: int) -> dict[str, Any]:
    """What a lock file says about its holder (see :meth:`Store.open`), checked: it is
    untrusted, and only shown in a message. Empty when it says nothing usable."""
    try:
        data = json.loads(os.pread(fd, _LOCK_RECORD_BYTES, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    pid = data.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
        out["pid"] = pid
    for key, limit in (("host", 255), ("since", 40), ("command", 200)):
        text = _printable(data.get(key), limit)
        if text is not None:
            out[key] = text
    if data.get("kind") == "server":
        out["kind"] = "server"
        url = _printable(data.get("url"), 300)
        if url is not None and url.startswith(("http://", "https://")) and " " not in url:
            out["url"] = url
    return out


def _locked_message(path: Path, holder: dict[str, Any]) -> str:
    """Why a writable open failed, who holds the store (as far as its lock file says), and
    what to do next."""
    facts = []
    if "pid" in holder:
        facts.append(f"pid {holder['pid']}" + (f" on {holder['host']}" if "host" in holder else ""))
    if "command" in holder:
        facts.append(holder["command"])
    if "since" in holder:
        facts.append(f"since {holder['since']}")
    said = f" ({', '.join(facts)})" if facts else ""
    if holder.get("kind") == "server":
        url = holder.get("url")
        api = f"{url.rstrip('/')}/api/images" if url else "http://HOST:PORT/api/images"
        return (f"{path} is held by an imret server{' at ' + url if url else ''}{said}, which keeps its store "
                "locked for as long as it runs. Stop the server, or add the images through its API: POST "
                f"/api/images (e.g. curl -F images=@photo.jpg -H 'Authorization: Bearer TOKEN' {api}; "
                "the token only when the server has one)")
    return f"{path} is being written by another process{said}; try again when it finishes"


def _contained(root: Path, p: Path, what: str) -> Path:
    """``p`` when it resolves (symlinks followed) inside ``root``; else ``StoreCorruptError``."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(p)
    if real == real_root or os.path.commonpath([real_root, real]) != real_root:
        raise StoreCorruptError(f"{what}: {p} resolves to {real}, outside the store {real_root}; "
                                "refusing to use it (nothing was read, written or removed)")
    return p
