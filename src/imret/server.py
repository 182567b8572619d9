"""The HTTP API and web page of an image store (``imret serve STORE``).

One process holds one :class:`~imret.index.store.Store` and answers, over FastAPI on
uvicorn (the endpoints are listed in ``docs/http-api.md`` and in the OpenAPI schema at
``/openapi.json``, browsable at ``/docs``):

- searches by uploaded photo (optional crop box, ``k``, query expansion on or off), by text
  (a store with a caption model: ``θ(t)·φ``, see :mod:`imret.retrieval`) and by the id of an
  indexed image, re-ranked by the store's second stages or the request's own
  (:mod:`imret.rerank` specs, ``localize`` for object boxes); adds and removes; thumbnails;
  paged listing; info, health, metrics;
- a web page (``/``) from :mod:`imret.web` to drop a photo, draw a crop box and browse results.

Design:

- **Decoding** of uploads runs on the request's worker thread (PIL releases the GIL), with
  the size and pixel limits checked on the header before any pixel is decoded.
- **Micro-batching**: decoded queries go to one :class:`~imret.batching.MicroBatcher` worker,
  which runs the model over them and searches the index once for the whole batch, so the
  model never runs on several threads at once and throughput holds up under load.
- **Re-ranking** (geometric verification, localisation, top-M refinement) runs after the
  batched first stage, per query, on a small pool of its own (``rerank_workers`` threads), so
  that RANSAC and localisation neither block the event loop nor hold up the next batch's
  first stage. It sees the pixels the request uploaded (kept in a private temporary file
  until its re-ranking ends) or, for a search by indexed image, that image's stored file; a
  path from a request is never read. Request specs are untrusted: checked names, at most
  ``max_rerank_stages`` stages of at most ``max_rerank_k`` candidates, and only the
  parameters of :data:`REQUEST_RERANK_PARAMS` (the server keeps threads, iterations, time
  and image sizes for itself); stages built for requests are kept in a small LRU, never in
  the store.
- **Writes** (add, remove) run one at a time on a single writer thread through the store,
  which commits them crash-safely; searches keep being answered meanwhile (the store only
  locks them out during the short commit of each batch). Uploaded files are stored under
  ``<store>/uploads/`` with a name made from their content hash and a sanitised stem; a name
  from a request never becomes a path otherwise. Thumbnails are made only of indexed files.
- **Safety**: JSON and multipart only (nothing from a request is unpickled or evaluated),
  binding to 127.0.0.1 by default (the CLI), an optional bearer token for writes (and
  reads), request-body, upload and pixel limits, and 4xx errors that say what was wrong.
  Before anything else runs, :class:`RequestGuard` refuses a ``Host`` that does not name the
  bound interface (DNS rebinding) and requests from other web pages (a foreign ``Origin``, or
  ``Sec-Fetch-Site: cross-site`` without one), so a page the user opens cannot read or write
  through a server on their machine. No response shows a server-side filesystem path.
- **Uploads** are accepted exactly in the formats :mod:`imret.images` accepts
  (:data:`imret.images.IMAGE_EXTENSIONS` that this Pillow decodes); a stored upload that does
  not end up indexed (a duplicate, a skipped file, a failed add, a removed image) is deleted.

Only :func:`create_app` touches the store; nothing happens at import.
"""


import asyncio
import hashlib
import io
import ipaddress
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

__all__ = ["ServerConfig", "ApiError", "ERROR_CODES", "REQUEST_RERANK_PARAMS", "RequestGuard", "create_app",
           "sanitise_name"]

WEB_DIR = Path(__file__).resolve().parent / "web"
UPLOADS = "uploads"
_UPLOAD_NAME = re.compile(r"^[0-9a-f]{16}-(.+)$")
MAX_ID = 2**63 - 1
"""Largest image id, offset or other integer a request may carry (SQLite's signed 64 bits)."""

ERROR_CODES: dict[str, str] = {
    "bad_request": "a malformed request: bad parameter, form field or multipart body",
    "bad_name": "an upload's file name has directories or control characters",
    "empty": "an empty (0-byte) upload",
    "unauthorized": "the API token is missing",
    "forbidden": "the API token is wrong",
    "forbidden_host": "the Host header does not name this server",
    "forbidden_origin": "the request comes from another web page (Origin / Sec-Fetch-Site)",
    "read_only": "a write to a read-only server",
    "not_found": "an unknown or removed id, or an unknown path",
    "method_not_allowed": "the path exists but not with this method",
    "too_large": "an upload or request body over its limit",
    "too_many_files": "more files than max_files in one add",
    "too_many_pixels": "an image with more pixels than max_pixels",
    "unsupported_media_type": "not an image in an accepted format, or a request that is not multipart",
    "bad_image": "a truncated or corrupt image",
    "busy": "the query queue (or the re-ranking queue) is full",
    "text_unavailable": "a text query to a store without a caption model, or whose vectors are whitened or "
                        "augmented (alpha-DBA): text is ranked by the raw image descriptors",
    "unknown_words": "a text query none of whose words is in the caption model's vocabulary",
    "rerank_unavailable": "a re-ranker the store has no sources for (local features of that kind, a model "
                          "with a global head)",
    "insufficient_storage": "the server's disk is full: nothing of the request was written, the store is intact",
    "store_damaged": "a file of the store is damaged (the server log names it); nothing was changed",
    "internal": "an unexpected server error (logged)",
}
"""Every error ``code`` the server answers with, and what it means (see docs/http-api.md)."""

# (a verifier's ``model``, affine or homography, is refused by imret.rerank.check_rerank for now:
# it shares its name with the network the builders supply)
_VERIFY_PARAMS = ("min_inliers", "model", "method", "threshold", "reference_side", "ratio", "mutual", "max_distance",
                  "confidence", "seed", "max_scale", "max_anisotropy")
REQUEST_RERANK_PARAMS: dict[str, tuple[str, ...]] = {
    "sift": _VERIFY_PARAMS,
    "cnn": _VERIFY_PARAMS,
    "aml": ("alpha", "max_aspect_change", "refine", "qe", "query_pool"),
    "sg": ("k", "beta"),
}
"""The re-ranker parameters a request's ``rerank`` spec may set, per kind: those that change
the ranking. The ones that set how much work a query costs (``workers``, ``max_iters``,
``time_budget``, ``image_size``, ``step``, ``chunk_size``, ``device``) are the server's: a
request's stage takes their defaults (the store's own specs may set them)."""
MAX_RERANK_SPEC = 300
"""Longest re-ranker spec string a request may send (characters)."""
_REQUEST_STAGES_KEPT = 32  # stages built for request specs, kept for reuse (LRU)

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9_.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass
class ServerConfig:
    """What the server allows; the CLI fills it from its options.

    Attributes:
        token: bearer token required for writes (``None``: no token, anyone on the network
            interface may write; bind to 127.0.0.1 then).
        token_reads: require the token for reads (searches, listing, thumbnails) too.
        read_only: refuse adds and removes (the store is opened read-only).
        max_upload_bytes: largest accepted file.
        max_pixels: largest accepted image (width x height, from the header).
        max_files: most files in one add request.
        max_request_bytes: largest add request (all its files together).
        max_k: largest ``k``.
        default_k: ``k`` when a request does not say.
        max_batch: most queries per model/search batch.
        max_wait_ms: how long a query waits for others to join its batch.
        max_queue: queries allowed to wait; beyond, 503 (separately for the first stage and
            for re-ranking).
        max_rerank_stages: most re-rankers in one request's ``rerank`` list (``localize`` may
            add one ``aml`` stage more; the store's own list is not limited).
        max_rerank_k: most candidates one stage of a request may look at (its ``top_k``; ``sg``:
            M), which also bounds the ``aml`` stage that ``localize`` adds.
        max_text_chars: longest text query (characters).
        rerank_workers: threads that re-rank queries (each geometric verification uses a few
            more threads of its own).
        thumbnail_cache: thumbnails kept in memory (LRU).
        save_interval_s: after adds or removes, the search index (FAISS, Milvus) is saved at
            most this often and at shutdown, not after every request (the store's descriptors
            are committed at once either way; the index catches up from them after a crash).
        device: where the model runs.
        allowed_hosts: more ``Host`` header values to accept besides the bound interface
            (``127.0.0.1``, ``localhost``, ``[::1]`` at the bound port for a loopback bind, the
            address a connection arrived at otherwise): the names clients use to reach the
            server, e.g. ``"imret.example.org"`` (any port) or ``"imret.lan:8000"``.
        allowed_origins: other web origins (``"https://app.example.org"``,
            ``"http://localhost:3000"``) whose pages may read and write through this server
            (the token, if any, is still required); they get CORS headers. Any other
            ``Origin`` is refused.
    """

    token: str | None = None
    token_reads: bool = False
    read_only: bool = False
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000
    max_files: int = 64
    max_request_bytes: int = 200 * 2**20
    max_k: int = 1000
    default_k: int = 20
    max_batch: int = 16
    max_wait_ms: float = 2.0
    max_queue: int = 512
    max_rerank_stages: int = 4
    max_rerank_k: int = 400
    max_text_chars: int = 1000
    rerank_workers: int = 2
    thumbnail_cache: int = 4096
    save_interval_s: float = 60.0
    device: str = "cpu"
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.allowed_hosts = tuple(_check_allowed_host(h) for h in _as_strings(self.allowed_hosts, "allowed_hosts"))
        self.allowed_origins = tuple(_check_allowed_origin(o)
                                     for o in _as_strings(self.allowed_origins, "allowed_origins"))
        for name in ("max_upload_bytes", "max_pixels", "max_files", "max_request_bytes", "max_k", "default_k",
                     "max_batch", "max_queue", "max_rerank_stages", "max_rerank_k", "max_text_chars", "rerank_workers",
                     "thumbnail_cache"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"default_k must be in 1..max_k={self.max_k}, got {self.default_k}")
        if self.token is not None and len(self.token) < 8:
            raise ValueError("the API token must have at least 8 characters")
        if self.token_reads and self.token is None:
            raise ValueError("token_reads needs a token")
        if not self.save_interval_s >= 0:
            raise ValueError(f"save_interval_s must be >= 0, got {self.save_interval_s!r}")


def _as_strings(values, name: str) -> list[str]:
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of strings, got the string {values!r}")
    values = list(values)
    for v in values:
        if not isinstance(v, str):
            raise TypeError(f"{name} must hold strings, got {v!r}")
    return values


def _split_netloc(text: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (a Host header, an origin's host part) as ``(lower-cased host, port or
    None)``; a trailing dot of a name is dropped, IPv6 addresses lose their brackets. None when
    it is malformed."""
    t = text.strip().lower()
    m = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]*)(?::([^:]*))?", t)
    if m is None:
        return None
    name, port = m.group(1), m.group(2)
    if name.endswith(".") and not name.startswith("["):
        name = name[:-1]
    if not _HOST_NAME.fullmatch(name):
        return None
    if port is not None:
        if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
            return None
    return name.strip("[]"), None if port is None else int(port)


def _check_allowed_host(h: str) -> str:
    parsed = _split_netloc(h)
    if parsed is None or h.strip() == "":
        raise ValueError(f"allowed host {h!r} is not a host name or address with an optional port; "
                         "expected e.g. 'imret.example.org', 'imret.lan:8000', '192.168.1.5' or '[fe80::1]:8000'")
    name, port = parsed
    name = f"[{name}]" if ":" in name else name
    return name if port is None else f"{name}:{port}"


def _normalise_origin(text: str) -> str | None:
    """An ``Origin`` value as ``scheme://host[:port]`` (lower case, default port dropped), or None
    when it is not an http(s) origin (``null``, a path, credentials, another scheme)."""
    try:
        u = urlsplit(text.strip())
    except ValueError:
        return None
    if u.scheme.lower() not in ("http", "https") or u.path not in ("", "/") or u.query or u.fragment or "@" in u.netloc:
        return None
    parsed = _split_netloc(u.netloc)
    if parsed is None:
        return None
    name, port = parsed
    scheme = u.scheme.lower()
    if port == {"http": 80, "https": 443}[scheme]:
        port = None
    name = f"[{name}]" if ":" in name else name
    return f"{scheme}://{name}" + ("" if port is None else f":{port}")


def _check_allowed_origin(o: str) -> str:
    norm = _normalise_origin(o)
    if norm is None:
        raise ValueError(f"allowed origin {o!r} is not a web origin; expected scheme://host[:port] with scheme http "
                         "or https and no path, e.g. 'https://app.example.org' or 'http://localhost:3000'")
    return norm


class ApiError(Exception):
    """An error answered as ``{"error": {"status", "code", "message"}}``; ``code`` is one of
    :data:`ERROR_CODES`."""

    def __init__(self, status: int, code: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; known: {', '.join(sorted(ERROR_CODES))}")
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def sanitise_name(name: str | None, max_len: int = 80) -> str:
    """A file name from a request reduced to a safe display / file stem: no directories,
    only ``[A-Za-z0-9._-]``, no leading dots, at most ``max_len`` characters (may be empty)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")
    return base[:max_len]


def upload_formats() -> dict[str, tuple[str, ...]]:
    """The image formats uploads are accepted in: Pillow format name -> its extensions, the one
    a stored upload gets by default first (the shortest: ``.jpg``, ``.tif``).

    The same rule as the rest of imret: the formats of :data:`imret.images.IMAGE_EXTENSIONS`
    that this Pillow install registers a decoder for (read when called, so AVIF is in exactly
    when :mod:`imret.images` lists it and Pillow has the plugin). MPO (a JPEG with more frames)
    is stored as JPEG.
    """
    from PIL import Image

    from . import images

    registered = Image.registered_extensions()  # extension -> format; loads every plugin once
    exts: dict[str, set[str]] = {}
    for ext in images.IMAGE_EXTENSIONS:
        fmt = registered.get(ext.lower())
        if fmt is not None and fmt in Image.OPEN:
            exts.setdefault(fmt, set()).add(ext.lower())
    out = {fmt: tuple(sorted(e, key=lambda x, f=fmt: (len(x), x != "." + f.lower(), x))) for fmt, e in exts.items()}
    if "JPEG" in out:
        out.setdefault("MPO", out["JPEG"])
    return out


def _format_list(formats: dict[str, tuple[str, ...]]) -> str:
    return ", ".join(sorted(f for f in formats if f != "MPO")) or "none"


_ABS_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/:,;()\[\]]+/)+([^\s'\"/:,;()\[\]]*)")


def _hide_paths(text: str, names: dict[str, str] | None = None) -> str:
    """``text`` (an OS or decoder message) without server-side paths: each key of ``names``
    becomes its value, any other absolute path its last component."""
    for path, shown in sorted((names or {}).items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, shown)
    return _ABS_PATH.sub(lambda m: m.group(1), text)


# -- request metrics ----------------------------------------------------------------------------

class _Metrics:
    def __init__(self, window: int = 2048):
        self._lock = threading.Lock()
        self._routes: dict[str, dict[str, Any]] = {}
        self._window = window

    def record(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            r = self._routes.setdefault(route, {"count": 0, "errors_4xx": 0, "errors_5xx": 0,
                                                "lat": deque(maxlen=self._window)})
            r["count"] += 1
            if 400 <= status < 500:
                r["errors_4xx"] += 1
            elif status >= 500:
                r["errors_5xx"] += 1
            r["lat"].append(seconds * 1000.0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = {}
            for route, r in sorted(self._routes.items()):
                lat = np.asarray(r["lat"], dtype=np.float64)
                out[route] = {"count": r["count"], "errors": r["errors_4xx"] + r["errors_5xx"],
                              "errors_4xx": r["errors_4xx"], "errors_5xx": r["errors_5xx"],
                              "p50_ms": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
                              "p99_ms": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
                              "window": int(lat.size)}
            return out


# -- the service: store, model, batcher, writer -----------------------------------------------

@dataclass
class _Query:
    k: int
    qe: bool | None
    tensor: Any = None  # (3, H, W) model input
    image_id: int | None = None
    vector: Any = None  # (D,) raw descriptor of a text query (its caption embedding)


@dataclass
class _Checked:
    """An upload that passed every check."""

    data: bytes
    name: str
    ext: str
    width: int
    height: int
    tensor: Any = None  # the model input (search), or None (add: decoded only to check it)
    sha256: str = ""
    bbox: tuple[float, float, float, float] | None = None  # the box used, clamped to the image
    file: str | None = None  # a private temporary copy (keep_file=True), for the re-rankers


@dataclass
class _RerankPlan:
    """The second stages of one search: their canonical specs, the built stages, and how many
    first-stage candidates they need (at least ``k``)."""

    specs: list[str]
    stages: list
    depth: int


class Service:
    """Everything the endpoints use; built by :func:`create_app`."""

    def __init__(self, store, config: ServerConfig):
        from .batching import MicroBatcher

        self.store = store
        self.config = config
        self.started = time.time()
        self.metrics = _Metrics()
        self.model = store.model
        self.model.eval().to(config.device)
        self.pre = store.preprocessing
        self._tmp = tempfile.TemporaryDirectory(prefix="imret-serve-")
        # photo queries need the model; searches by indexed image do not, and get their own
        # batcher so they are not queued behind model work
        self.batcher = MicroBatcher(self._run_batch, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                                    max_queue=config.max_queue, name="imret-search")
        self.id_batcher = MicroBatcher(self._run_batch, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                                       max_queue=config.max_queue, name="imret-search-ids")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imret-writer")
        self.reranker = ThreadPoolExecutor(max_workers=config.rerank_workers, thread_name_prefix="imret-rerank")
        self._rerank_lock = threading.Lock()
        self._rerank_pending = 0
        self._stages: OrderedDict[str, Any] = OrderedDict()  # stages of request specs (LRU)
        self._thumbs: OrderedDict[tuple[int, int], tuple[bytes, str]] = OrderedDict()
        self._thumb_lock = threading.Lock()
        self._info_cache: tuple[float, dict[str, Any]] | None = None
        self._last_save = time.monotonic()
        self._unsaved = False
        if store.text_info is not None:  # load the caption model (and its text libraries) now,
            # off the request path, so that the first text query is not slowed by it
            threading.Thread(target=self._warm_text, name="imret-text-load", daemon=True).start()

    def _warm_text(self) -> None:
        try:
            self.store.text_model
        except Exception as e:  # noqa: BLE001 - a damaged file is reported by the text searches themselves
            logging.getLogger("imret.server").warning("the store's caption model cannot be loaded: %s", e)

    def close(self) -> None:
        self.batcher.close()
        self.id_batcher.close()
        self.reranker.shutdown(wait=True, cancel_futures=True)
        if self._unsaved:
            self.writer.submit(self.store.save_index)
        self.writer.shutdown(wait=True)
        self._tmp.cleanup()

    # -- uploads ------------------------------------------------------------------------------

    def check_upload(self, data: bytes, filename: str | None, *, bbox=None, decode_for_model: bool = True,
                     keep_file: bool = False) -> _Checked:
        """Check an uploaded file and decode it as the store's model input; ApiError if bad.
        ``keep_file``: keep the private temporary copy the check decoded (``_Checked.file``) for
        the re-rankers; the caller deletes it (:meth:`submit_rerank` does)."""
        from PIL import Image, UnidentifiedImageError

        from .extract import upscale_to
        from .images import ImageError, exif_orientation, load_image, to_tensor

        if filename and (re.search(r"[\\/\x00-\x1f\x7f]", filename) or filename.strip() in (".", "..")):
            raise ApiError(400, "bad_name", f"file name {filename!r} is not a plain file name (no directories, "
                                            "no control characters)")
        name = sanitise_name(filename) or "upload"
        if len(data) == 0:
            raise ApiError(400, "empty", f"{name}: the file is empty (0 bytes)")
        if len(data) > self.config.max_upload_bytes:
            raise ApiError(413, "too_large", f"{name}: {len(data)} bytes exceeds the limit of "
                                             f"{self.config.max_upload_bytes} bytes")
        formats = upload_formats()
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
                orientation = exif_orientation(im) if fmt in formats else 1
        except Image.DecompressionBombError as e:
            raise ApiError(413, "too_many_pixels", f"{name}: refused as a decompression bomb ({e})") from None
        except UnidentifiedImageError:
            raise ApiError(415, "unsupported_media_type",
                           f"{name}: not an image in an accepted format ({_format_list(formats)})") from None
        except Exception as e:  # noqa: BLE001 - anything PIL raises on a header is a bad upload
            raise ApiError(422, "bad_image", f"{name}: cannot read the image header ({type(e).__name__}: "
                                             f"{_hide_paths(str(e))})") from None
        if fmt not in formats:
            raise ApiError(415, "unsupported_media_type",
                           f"{name}: image format {fmt} is not accepted; accepted: {_format_list(formats)}")
        if w * h > self.config.max_pixels:
            raise ApiError(413, "too_many_pixels", f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of "
                                                   f"{self.config.max_pixels} pixels; not decoded")
        if orientation in (5, 6, 7, 8):
            w, h = h, w  # the displayed (upright) size, which boxes refer to
        box = None
        if bbox is not None:
            x1, y1, x2, y2 = bbox
            if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
                raise ApiError(400, "bad_request", f"bbox {list(bbox)} lies outside the {w}x{h} image")
            box = (max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2))
        suffix = os.path.splitext(name)[1].lower()
        ext = suffix if suffix in formats[fmt] else formats[fmt][0]  # the uploaded one when it fits
        path = Path(self._tmp.name) / f"{secrets.token_hex(8)}{ext}"
        path.write_bytes(data)
        kept = False
        try:
            size = self.pre.image_size if decode_for_model else 64
            img = load_image(path, image_size=size, bbox=box, draft=self.pre.draft,
                             max_pixels=min(self.config.max_pixels, self.pre.max_pixels or self.config.max_pixels),
                             crop_resize=self.pre.crop_resize)
            tensor = to_tensor(upscale_to(img, self.pre.min_size), self.model.mean, self.model.std) \
                if decode_for_model else None
            kept = keep_file
        except ImageError as e:
            raise ApiError(422, "bad_image", f"{name}: {_hide_paths(e.reason, {str(path): name})}") from None
        finally:
            if not kept:
                path.unlink(missing_ok=True)
        return _Checked(data, name, ext, w, h, tensor, hashlib.sha256(data).hexdigest(), box,
                        str(path) if kept else None)

    # -- searching ------------------------------------------------------------------------------

    def _qe(self, on: bool | None):
        from .index.store import QueryExpansion

        if on is None:
            return None
        if not on:
            return QueryExpansion("none")
        qe = self.store.query_expansion
        return qe if qe.method != "none" else QueryExpansion("alpha", k=10, alpha=3.0)

    def _run_batch(self, items: list[_Query]) -> list[Any]:
        """The batcher's function: model over the image queries, then one search per QE setting.
        Each query gets ``(scores, ids, x)``: its top ``k`` and, for a photo, its raw descriptor
        ``(1, D)`` (for the re-rankers; None for a search by id)."""
        from .extract import describe_tensors

        out: list[Any] = [None] * len(items)
        img_idx = [i for i, q in enumerate(items) if q.tensor is not None]
        desc = None
        if img_idx:
            desc = describe_tensors(self.model, [items[i].tensor for i in img_idx], scales=self.pre.scales,
                                    device=self.config.device)
        row_of = {i: r for r, i in enumerate(img_idx)}
        groups: dict[tuple[bool | None, str], list[int]] = {}
        for i, q in enumerate(items):
            kind = "image" if q.tensor is not None else "text" if q.vector is not None else "id"
            groups.setdefault((q.qe, kind), []).append(i)
        for (qe, kind), idx in groups.items():
            k = max(items[i].k for i in idx)
            is_img = kind == "image"
            try:
                if is_img:
                    scores, ids = self.store.search_vectors(desc[[row_of[i] for i in idx]], k,
                                                            query_expansion=self._qe(qe))
                elif kind == "text":
                    scores, ids = self.store.search_vectors(np.stack([items[i].vector for i in idx]), k,
                                                            query_expansion=self._qe(qe))
                else:
                    scores, ids = self.store.search_ids([items[i].image_id for i in idx], k,
                                                        query_expansion=self._qe(qe))
            except KeyError as e:  # an id removed since the request was checked
                for i in idx:
                    out[i] = ApiError(404, "not_found", str(e.args[0]) if e.args else "unknown image id")
                continue
            for r, i in enumerate(idx):
                kk = items[i].k
                x = desc[row_of[i]][None] if is_img else items[i].vector[None] if kind == "text" else None
                out[i] = (scores[r, :kk], ids[r, :kk], x)
        return out

    def hits(self, scores: np.ndarray, ids: np.ndarray, extras: dict[str, np.ndarray] | None = None
             ) -> list[dict[str, Any]]:
        """One query's ``(k,)`` results as JSON hits; ``extras`` (``(k, ...)`` arrays aligned with
        ``ids``) add what the re-rankers found per hit (see :func:`_extras_fields`)."""
        keep = ids >= 0
        recs = {r.id: r for r in self.store.records([int(i) for i in ids[keep]])}
        return [{"id": int(ids[j]), "score": round(float(scores[j]), 6),
                 **self._image_fields(recs[int(ids[j])], full=False), **_extras_fields(extras, j)}
                for j in np.flatnonzero(keep).tolist()]

    # -- re-ranking -----------------------------------------------------------------------------

    @property
    def rerank_pending(self) -> int:
        """Queries queued or running on the re-rank pool."""
        with self._rerank_lock:
            return self._rerank_pending

    def configured_rerank(self) -> list[str]:
        """The store's own re-ranker specs (``imret index configure --rerank``)."""
        return self.store.rerank_specs

    def plan_rerank(self, given: list | None, localize: bool, k: int, *, text: bool = False) -> _RerankPlan:
        """The stages of one search: the request's checked specs (``given``; None: the store's
        own), plus ``aml`` when ``localize`` asks for boxes and no stage localises yet. For a
        ``text`` query, the store's own stages that need the query's pixels are left out, and
        a request's are refused (400)."""
        from .rerank import parse_rerank
        from .retrieval import needs_query_image, rerank_depth

        configured = self.configured_rerank()
        specs = [parse_rerank(s) for s in configured] if given is None else list(given)
        if text:
            if localize:
                raise ApiError(400, "bad_request", "localize draws the query object in each hit; a text query has "
                                                   "no object to localise")
            pixel = [str(s) for s in specs if needs_query_image(s)]
            if pixel and given is not None:
                raise ApiError(400, "bad_request", f"re-ranker(s) {', '.join(pixel)} look at the query image's "
                                                   "pixels, and a text query has none; use sg or rerank=none")
            specs = [s for s in specs if not needs_query_image(s)]
        if localize and not any(s.kind == "aml" for s in specs):
            specs.append(parse_rerank(f"aml:{min(k, self.config.max_rerank_k)}"))
        local = self.store.local_kind
        for s in specs:
            if s.kind in ("sift", "cnn") and s.kind != local:
                have = f"keeps {local} local features" if local else "keeps no local features"
                raise ApiError(409, "rerank_unavailable",
                               f"re-ranker {str(s)!r} needs {s.kind} local features of the indexed images, and this "
                               f"store {have}; add them with `imret index configure STORE --local {s.kind}` (with "
                               "the server stopped), or search with rerank=none")
        stages = [self._stage(s, str(s) in configured) for s in specs]
        return _RerankPlan([str(s) for s in specs], stages, max(int(k), rerank_depth(stages)))

    def _stage(self, spec, configured: bool):
        """The stage of one spec: the store's cached one for its own specs, else one built for
        requests and kept in a small LRU (request specs are unbounded in number)."""
        from .rerank import build_reranker

        key = str(spec)
        try:
            if configured:
                return self.store.rerankers([key])[0]
            with self._rerank_lock:
                stage = self._stages.get(key)
                if stage is not None:
                    self._stages.move_to_end(key)
                    return stage
            # the store's sources: its local features, feature-map cache, rows and model
            stage = build_reranker(spec, self.store.rerank_sources())
        except TypeError as e:  # the model has no global head (aml)
            raise ApiError(409, "rerank_unavailable",
                           f"re-ranker {key!r} cannot run on this store: {_hide_paths(str(e))}") from None
        except ValueError as e:  # a parameter value the stage refuses
            status, code = (409, "rerank_unavailable") if configured else (400, "bad_request")
            raise ApiError(status, code, f"re-ranker {key!r}: {_hide_paths(str(e))}") from None
        with self._rerank_lock:
            self._stages[key] = stage
            while len(self._stages) > _REQUEST_STAGES_KEPT:
                self._stages.popitem(last=False)
        return stage

    def submit_rerank(self, plan: _RerankPlan, x: np.ndarray | None, scores: np.ndarray, ids: np.ndarray, k: int,
                      *, image: str, box=None, image_id: int | None = None, owned_file: str | None = None):
        """Queue one query's re-ranking on the re-rank pool; a future of ``(scores, ids, extras)``
        (its first ``k``). ``image`` is the query's file: the upload's private copy
        (``owned_file``, deleted when the job ends or is cancelled, or here when it is refused)
        or the stored file of the indexed image ``image_id``. More than ``max_queue`` queued
        queries: 503."""
        with self._rerank_lock:
            full = self._rerank_pending >= self.config.max_queue
            if not full:
                self._rerank_pending += 1
        if full:
            if owned_file is not None:
                Path(owned_file).unlink(missing_ok=True)
            raise ApiError(503, "busy", f"the server is overloaded ({self.config.max_queue} queries wait for "
                                        "re-ranking); retry later")

        def done(_fut) -> None:  # after the job, or when it was cancelled before it ran
            with self._rerank_lock:
                self._rerank_pending -= 1
            if owned_file is not None:
                Path(owned_file).unlink(missing_ok=True)

        try:
            fut = self.reranker.submit(self._rerank, plan, x, scores, ids, k, image, box, image_id)
        except RuntimeError:  # shutting down
            done(None)
            raise ApiError(503, "busy", "the server is shutting down") from None
        fut.add_done_callback(done)
        return fut

    def _rerank(self, plan: _RerankPlan, x, scores, ids, k: int, image: str, box, image_id: int | None):
        from .images import ImageError
        from .retrieval import apply_rerankers, truncate

        if x is None:  # a search by id: the indexed image's own descriptor, as search_ids uses it
            x = np.asarray(self.store.descriptors()[[image_id]], np.float32)
        x = self.store.postprocess(x)
        try:
            res = apply_rerankers(plan.stages, x, scores[None], ids[None], None if image is None else [(image, box)])
        except ImageError as e:
            if image_id is None:
                raise
            reason = _hide_paths(e.reason, {image: self.display_name(image)})
            raise ApiError(404, "not_found", f"image {image_id} cannot be read any more ({reason}), so its search "
                                             "cannot be re-ranked; search with rerank=none") from None
        res = truncate(res, k)
        return res.scores[0], res.ids[0], {n: a[0] for n, a in res.extras.items()}

    def encode_text(self, text: str) -> np.ndarray:
        """A text query's caption embedding ``(D,)``, after the checks (as ApiError): its length
        and characters (400), a caption model in the store and no whitening / αDBA (409
        ``text_unavailable``), a word the model knows (422 ``unknown_words``)."""
        from .index.store import StoreCorruptError
        from .text.queries import check_text_queries

        try:
            (text,) = check_text_queries([text], max_chars=self.config.max_text_chars)
        except (TypeError, ValueError) as e:
            raise ApiError(400, "bad_request", str(e).replace("text query 0", "the text")) from None
        try:
            enc = self.store.text_model
        except StoreCorruptError:
            raise
        if enc is None:
            raise ApiError(409, "text_unavailable", "this store has no caption model, so it cannot be searched by "
                                                    "text; add one with `imret index configure STORE --text-model "
                                                    "FILE` (with the server stopped), or search by photo")
        try:
            theta = self.store.encode_text([text], max_chars=self.config.max_text_chars)
        except ValueError as e:
            raise ApiError(409, "text_unavailable", _hide_paths(str(e).replace(str(self.store.path), "STORE"))) from None
        if not np.any(theta[0] != 0):
            raise ApiError(422, "unknown_words", f"no word of {text[:80]!r} is in the caption model's vocabulary "
                                                 f"({enc.num_terms} terms); try other words")
        return theta[0]

    @staticmethod
    def display_name(path: str) -> str:
        """The file name shown for an indexed image: its last component only, never a
        directory (uploads also lose their content-hash prefix)."""
        parts = re.split(r"[\\/]", path)
        base = parts[-1]
        m = _UPLOAD_NAME.match(base)
        if m is not None and len(parts) >= 3 and parts[-3] == UPLOADS:
            return m.group(1)
        return base

    @staticmethod
    def _image_fields(rec, full: bool = True) -> dict[str, Any]:
        d = {"name": Service.display_name(rec.path), "width": rec.width, "height": rec.height,
             "thumbnail": f"/api/images/{rec.id}/thumbnail"}
        if full:
            d = {"id": rec.id, **d, "size": rec.size, "added": rec.added}
        return d

    # -- writing --------------------------------------------------------------------------------

    def wrote(self) -> None:
        """After an add or remove (on the writer thread): save the index when it is due."""
        self._unsaved = True
        if time.monotonic() - self._last_save >= self.config.save_interval_s:
            self.store.save_index()
            self._last_save = time.monotonic()
            self._unsaved = False

    def save_uploads(self, files: list[_Checked]) -> tuple[list[str], set[str]]:
        """Store checked uploads under ``<store>/uploads/``; returns their absolute paths (one
        per file) and the set of those that this call created (the others existed already)."""
        from .fileio import atomic_write_bytes

        folder = self.uploads_dir()
        paths, created = [], set()
        try:
            for f in files:
                stem = (Path(f.name).stem if f.name else "") or "image"
                sub = folder / f.sha256[:2]
                p = sub / f"{f.sha256[:16]}-{sanitise_name(stem, 60) or 'image'}{f.ext}"
                if not p.is_file():
                    sub.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(p, f.data)
                    created.add(str(p))
                paths.append(str(p))
        except BaseException:
            self.delete_uploads(created)
            raise
        return paths, created

    def uploads_dir(self) -> Path:
        return Path(os.path.abspath(self.store.path)) / UPLOADS

    def add_uploads(self, files: list[_Checked]):
        """Save and index uploads (on the writer thread); returns the store's AddReport and the
        saved paths. Every file this call saved that did not end up indexed (a duplicate, a
        skipped file, or all that were not committed when the add failed) is deleted again; a
        file an indexed image points to never is."""
        first_new = self.store.n_rows()
        paths, created = self.save_uploads(files)
        report = None
        try:
            report = self.store.add(paths, save=False)
        finally:
            try:
                # ids are given in order by the one writer: the rows from first_new on are this add's
                new_ids = list(range(first_new, self.store.n_rows()))
                keep = {os.path.abspath(r.path) for r in self.store.records(new_ids)}
                if report is not None:
                    dup_ids = sorted({int(i) for _, i in report.duplicates})
                    keep |= {os.path.abspath(r.path) for r in self.store.records(dup_ids)}
                self.delete_uploads(created - keep)
            except Exception:  # noqa: BLE001 - never hide the add's own outcome behind the clean-up's
                logging.getLogger("imret.server").exception("cannot clean up the uploads of a failed add")
        return report, paths

    def delete_uploads(self, paths) -> None:
        """Delete stored uploads (only files under ``<store>/uploads/``) and folders left empty."""
        root = self.uploads_dir()
        for p in sorted(paths):
            path = Path(os.path.abspath(p))
            if path.parent.parent != root:
                continue
            try:
                path.unlink(missing_ok=True)
            except OSError:
                logging.getLogger("imret.server").warning("cannot delete the unindexed upload %s", path)
                continue
            try:
                path.parent.rmdir()  # only when empty
            except OSError:
                pass

    def remove_image(self, image_id: int) -> None:
        """Remove an image (on the writer thread); its stored upload, if it was one, is deleted."""
        rec = self.live_record(image_id)
        n = self.store.remove([image_id], save=False)
        self.wrote()
        if n == 0:
            raise ApiError(404, "not_found", f"image {image_id} was removed")
        self.forget_thumbnails(image_id)
        # an upload's file is named by its content hash; live contents are unique, so after the
        # removal no live image has this content, and none points to this file
        if os.path.basename(rec.path).startswith(rec.sha256[:16] + "-"):
            self.delete_uploads([rec.path])

    # -- thumbnails -------------------------------------------------------------------------------

    def thumbnail(self, image_id: int, size: int) -> tuple[bytes, str]:
        from .images import ImageError, load_image

        key = (image_id, size)
        with self._thumb_lock:
            hit = self._thumbs.get(key)
            if hit is not None:
                self._thumbs.move_to_end(key)
                return hit
        rec = self.live_record(image_id)
        try:
            img = load_image(rec.path, image_size=size, draft=True, max_pixels=self.config.max_pixels)
        except ImageError as e:
            reason = _hide_paths(e.reason, {rec.path: self.display_name(rec.path)})
            raise ApiError(404, "not_found", f"image {image_id} cannot be read any more ({reason})") from None
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85, optimize=True)
        out = (buf.getvalue(), f'"{rec.sha256[:20]}-{size}"')
        with self._thumb_lock:
            self._thumbs[key] = out
            while len(self._thumbs) > self.config.thumbnail_cache:
                self._thumbs.popitem(last=False)
        return out

    def live_record(self, image_id: int):
        try:
            rec = self.store.records([image_id])[0]
        except KeyError:
            raise ApiError(404, "not_found", f"no image with id {image_id}") from None
        if not self.store.is_live(image_id):
            raise ApiError(404, "not_found", f"image {image_id} was removed")
        return rec

    def forget_thumbnails(self, image_id: int) -> None:
        with self._thumb_lock:
            for key in [k for k in self._thumbs if k[0] == image_id]:
                del self._thumbs[key]

    def info(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._info_cache is None or now - self._info_cache[0] > 10.0:
            self._info_cache = (now, _public_store_info(self.store.info()))
        store = dict(self._info_cache[1], images=len(self.store))
        c = self.config
        return {"store": store, "server": {
            "max_upload_bytes": c.max_upload_bytes, "max_pixels": c.max_pixels, "max_files": c.max_files,
            "max_request_bytes": c.max_request_bytes,
            "max_k": c.max_k, "default_k": c.default_k, "writes": not c.read_only,
            "auth": {"writes": c.token is not None, "reads": c.token_reads},
            "upload_formats": sorted(f for f in upload_formats() if f != "MPO"),
            "query_expansion": store.get("query_expansion"),
            "rerank": {"max_stages": c.max_rerank_stages, "max_top_k": c.max_rerank_k,
                       "request_params": {k: list(v) for k, v in REQUEST_RERANK_PARAMS.items()}},
            "text": {"available": bool(store.get("text") and store["text"].get("searchable")),
                     "max_chars": c.max_text_chars},
            "version": _version()}}


def _extras_fields(extras: dict[str, np.ndarray] | None, j: int) -> dict[str, Any]:
    """What the re-rankers found for hit ``j`` (extras ``(k, ...)``), as JSON numbers, each only
    when a stage set it: ``inliers`` (int, geometric verification), ``box`` (``[x1, y1, x2, y2]``
    of the localised object in the hit image's upright pixels) and ``transform`` (3x3, query
    pixels -> hit pixels)."""
    out: dict[str, Any] = {}
    if not extras:
        return out
    if "inliers" in extras:
        n = int(extras["inliers"][j])
        if n >= 0:
            out["inliers"] = n
    if "box" in extras:
        b = np.asarray(extras["box"][j], np.float64)
        if b.shape == (4,) and np.isfinite(b).all():
            out["box"] = [round(float(v), 2) for v in b]
    if "transform" in extras:
        t = np.asarray(extras["transform"][j], np.float64)
        if t.shape == (3, 3) and np.isfinite(t).all():
            out["transform"] = [[round(float(v), 6) for v in row] for row in t]
    return out


def _public_store_info(info: dict[str, Any]) -> dict[str, Any]:
    """``Store.info()`` without server-side paths: no store path, a model file shown by its
    name, a Milvus file by its name and a Milvus server without credentials or token."""
    out = {k: v for k, v in info.items() if k != "path"}
    model = dict(out.get("model") or {})
    src = model.get("source")
    if isinstance(src, str) and src and (os.path.isabs(src) or src.startswith(("./", "../", "~", ".\\"))
                                         or "\\" in src or os.path.exists(src)):
        model["source"] = re.split(r"[\\/]", src.rstrip("/\\"))[-1]
    if model:
        out["model"] = model
    text = out.get("text")
    if isinstance(text, dict) and isinstance(text.get("source"), str):  # the caption model's file by its name only
        out["text"] = dict(text, source=re.split(r"[\\/]", text["source"].rstrip("/\\"))[-1])
    backend = dict(out.get("backend") or {})
    for key in ("requested", "spec", "searching_with"):
        if isinstance(backend.get(key), str):
            backend[key] = _public_spec(backend[key])
    if backend:
        out["backend"] = backend

    def scrub(x):
        if isinstance(x, dict):
            return {k: scrub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [scrub(v) for v in x]
        if isinstance(x, str):
            return _hide_paths(x)
        return x

    return scrub(out)


def _public_spec(spec: str) -> str:
    """A backend spec without paths or secrets: ``milvus:/srv/x/vectors.db`` -> ``milvus:vectors.db``,
    ``milvus:http://user:pw@host:19530?token=...`` -> ``milvus:http://host:19530``."""
    kind, sep, rest = spec.partition(":")
    if kind.strip().lower() != "milvus" or not sep:
        return spec
    target, _, query = rest.partition("?")
    if "://" in target:
        try:
            u = urlsplit(target)
            target = f"{u.scheme}://{u.netloc.rpartition('@')[2]}"
        except ValueError:
            target = "<server>"
    else:
        target = re.split(r"[\\/]", target.rstrip("/\\"))[-1]
    params = [kv for kv in query.split("&") if kv and kv.split("=", 1)[0].lower() not in ("token", "password", "user")]
    return f"{kind}:{target}" + (f"?{'&'.join(params)}" if params else "")


def _version() -> str:
    from . import __version__

    return __version__


# -- parsing helpers ------------------------------------------------------------------------------

def _parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None or text.strip() == "":
        return None
    parts = [p for p in re.split(r"[,\s]+", text.strip().strip("[]")) if p]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ApiError(400, "bad_request", f"bbox must be 4 numbers 'x1,y1,x2,y2', got {text[:100]!r}") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise ApiError(400, "bad_request", f"bbox must be 4 finite numbers 'x1,y1,x2,y2', got {text[:100]!r}")
    x1, y1, x2, y2 = vals
    if x2 <= x1 or y2 <= y1:
        raise ApiError(400, "bad_request", f"bbox {vals} is empty or inverted; expected x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def _parse_bool(text: str | None, name: str) -> bool | None:
    if text is None or text == "":
        return None
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ApiError(400, "bad_request", f"{name} must be true or false, got {text!r}")


def _parse_rerank(values: list[str] | None, cfg: ServerConfig) -> list | None:
    """A request's ``rerank`` field (one spec per value): None when absent (the store's own
    stages), ``[]`` for ``none``, else the checked :class:`~imret.rerank.RerankSpec` list."""
    from .rerank import check_rerank

    given = [v.strip() for v in (values or []) if v is not None and v.strip() != ""]
    if not given:
        return None
    if any(v.lower() == "none" for v in given):
        if len(given) > 1:
            raise ApiError(400, "bad_request", "rerank=none switches the re-rankers off; give it alone")
        return []
    if len(given) > cfg.max_rerank_stages:
        raise ApiError(400, "bad_request", f"{len(given)} re-rankers in one request; the limit is "
                                           f"{cfg.max_rerank_stages}")
    out = []
    for v in given:
        if len(v) > MAX_RERANK_SPEC:
            raise ApiError(400, "bad_request", f"re-ranker spec {v[:60]!r}... is {len(v)} characters long; the limit "
                                               f"is {MAX_RERANK_SPEC}")
        try:
            s = check_rerank(v)
        except ValueError as e:
            raise ApiError(400, "bad_request", f"rerank: {e}") from None
        if s.top_k > cfg.max_rerank_k:
            raise ApiError(400, "bad_request", f"re-ranker {v!r} looks at {s.top_k} candidates; this server allows "
                                               f"at most {cfg.max_rerank_k} per stage ({s.kind}:N, N <= "
                                               f"{cfg.max_rerank_k})")
        allowed = REQUEST_RERANK_PARAMS[s.kind]
        fixed = [p for p in s.params if p not in allowed]
        if fixed:
            raise ApiError(400, "bad_request", f"re-ranker {v!r}: {', '.join(fixed)} is set by the server, not per "
                                               f"request; a request may set: {', '.join(allowed)}")
        out.append(s)
    return out


def _check_k(k: int | None, cfg: ServerConfig) -> int:
    if k is None:
        return cfg.default_k
    if not 1 <= k <= cfg.max_k:
        raise ApiError(400, "bad_request", f"k must be in 1..{cfg.max_k}, got {k}")
    return k


# -- the ASGI guard: body limit and content types, before any parsing ---------------------------

class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """Pure ASGI middleware, the first thing a request meets; nothing behind it runs for a
    request it refuses.

    - ``Host`` must name this server: the address the connection arrived at (and ``localhost``,
      ``127.0.0.1``, ``[::1]`` when that is a loopback address) at the bound port, or one of
      ``allowed_hosts``; else 403 ``forbidden_host`` (a DNS-rebinding page sends its own name).
      A request without ``Host`` (HTTP/1.0; never a browser's) is not refused for it.
    - ``Origin``, when sent, must be this server's own page (the same host and port as ``Host``,
      or a loopback alias of it) or one of ``allowed_origins``; else 403 ``forbidden_origin``.
      Without ``Origin``, a browser request marked ``Sec-Fetch-Site: cross-site`` or
      ``same-site`` comes from another page: refused for writes, and for reads unless some
      ``allowed_origins`` are configured (their ``<img>`` tags send no ``Origin``).
    - Over-long bodies (by header and while streaming) and non-multipart uploads are refused
      (``json_paths`` also take a JSON body, of at most ``json_limit`` bytes: text queries)
      before the framework parses anything.
    """

    def __init__(self, app, *, limits: dict[str, int], multipart: set[str], default_limit: int = 1 << 20,
                 allowed_hosts: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = (),
                 json_paths: set[str] = frozenset(), json_limit: int = 1 << 16):
        self.app, self.limits, self.multipart, self.default_limit = app, limits, multipart, default_limit
        self.json_paths, self.json_limit = frozenset(json_paths), json_limit
        self.allowed_hosts = [_split_netloc(_check_allowed_host(h)) for h in allowed_hosts]
        self.allowed_origins = frozenset(_check_allowed_origin(o) for o in allowed_origins)

    # -- where a request comes from -------------------------------------------------------------

    @staticmethod
    def _bound(scope) -> tuple[set[str], int | None]:
        """The names of the interface this connection arrived at, and its port."""
        server = scope.get("server") or (None, None)
        addr, port = server[0], server[1] if len(server) > 1 else None
        if addr is None or (port is None and ("/" in str(addr) or str(addr)[:1] in ("", "\0"))):
            return set(_LOOPBACK_NAMES), None  # a Unix socket: only local clients
        addr = str(addr).lower().strip("[]")
        names = {addr}
        try:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
            mapped = getattr(ip, "ipv4_mapped", None)
            if ip.is_loopback or (mapped is not None and mapped.is_loopback):
                names |= _LOOPBACK_NAMES
            if mapped is not None:
                names.add(str(mapped))
        except ValueError:  # a name (the test client's "testserver")
            pass
        return names, None if port is None else int(port)

    def _host_ok(self, scope, host: str) -> bool:
        parsed = _split_netloc(host)
        if parsed is None:
            return False
        name, port = parsed
        port_or_default = port if port is not None else (443 if scope.get("scheme") == "https" else 80)
        names, bound_port = self._bound(scope)
        if name in names and (bound_port is None or port_or_default == bound_port):
            return True
        return any(name == a_name and (a_port is None or a_port == port_or_default)
                   for a_name, a_port in self.allowed_hosts)

    def _origin_is_own(self, scope, origin: str, host: str | None) -> bool:
        """``origin`` (normalised) is a page of this server: the request's own host, or the
        bound interface at the bound port."""
        netloc = origin.split("://", 1)[1]
        if host is not None and _split_netloc(netloc) == _split_netloc(host):
            return True
        parsed = _split_netloc(netloc)
        if parsed is None:
            return False
        name, port = parsed
        port = port if port is not None else (443 if origin.startswith("https:") else 80)
        names, bound_port = self._bound(scope)
        return name in names and bound_port is not None and port == bound_port

    def _refusal(self, scope, headers: dict[str, str], repeated: set[str]) -> tuple[str, str] | None:
        """``(code, message)`` when the request is refused for where it comes from."""
        host = headers.get("host")
        if "host" in repeated:
            return "forbidden_host", "more than one Host header"
        if host is not None and not self._host_ok(scope, host):
            return "forbidden_host", (f"Host {host[:100]!r} does not name this server; if clients reach it by "
                                      "that name, start it with --allowed-host NAME")
        origin = headers.get("origin")
        if "origin" in repeated:
            return "forbidden_origin", "more than one Origin header"
        if origin is not None:
            norm = _normalise_origin(origin)
            if norm is None or not (self._origin_is_own(scope, norm, host) or norm in self.allowed_origins):
                return "forbidden_origin", (f"requests from the web page at {origin[:100]!r} are refused; only this "
                                            "server's own page and --allowed-origin origins may use the API")
            return None
        site = headers.get("sec-fetch-site", "").strip().lower()
        if site in ("cross-site", "same-site"):
            if scope["method"] in _WRITE_METHODS or scope["method"] == "OPTIONS" or not self.allowed_origins:
                return "forbidden_origin", (f"a request from another web page (Sec-Fetch-Site: {site}) without an "
                                            "Origin header is refused")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        repeated: set[str] = set()
        for k, v in scope.get("headers", []):
            name = k.decode("latin-1").lower()
            if name in headers:
                repeated.add(name)
            headers[name] = v.decode("latin-1")
        refusal = self._refusal(scope, headers, repeated)
        if refusal is not None:
            return await _send_error(send, 403, *refusal)
        origin = headers.get("origin")
        cors = None
        if origin is not None and _normalise_origin(origin) in self.allowed_origins \
                and not self._origin_is_own(scope, _normalise_origin(origin), headers.get("host")):
            cors = origin.strip()
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                return await _send_preflight(send, cors)
            send = _with_cors(send, cors)
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = self.limits.get(path, self.default_limit)
        ctype = headers.get("content-type", "")
        is_json = path in self.json_paths and ctype.lower().split(";")[0].strip() == "application/json"
        if is_json:  # a JSON body (a text query) is small
            limit = min(limit, self.json_limit)
        elif path in self.multipart and scope["method"] == "POST" and not ctype.lower().startswith("multipart/form-data"):
            takes = "multipart/form-data" + (" or application/json" if path in self.json_paths else "")
            return await _send_error(send, 415, "unsupported_media_type",
                                     f"{path} takes {takes}, got {ctype or 'no content type'}")
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return await _send_error(send, 400, "bad_request", "malformed Content-Length header")
        if declared > limit:
            return await _send_error(send, 413, "too_large", f"request body of {declared} bytes exceeds the "
                                                             f"limit of {limit} bytes")
        seen = 0
        exceeded = False
        replaced = False

        async def limited_receive():
            nonlocal seen, exceeded
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return msg

        async def guarded_send(msg):
            # the framework turns the failed body read into its own error: answer 413 instead
            nonlocal replaced
            if exceeded:
                if not replaced:
                    replaced = True
                    await _send_error(send, 413, "too_large", f"request body exceeds the limit of {limit} bytes")
                return
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not replaced:
                replaced = True
                await _send_error(send, 413, "too_large", f"request body exceeds the limit of {limit} bytes")


def _with_cors(send, origin: str):
    """``send`` that marks the response readable by the page at ``origin`` (an allowed origin)."""
    async def cors_send(msg):
        if msg["type"] == "http.response.start":
            msg = dict(msg, headers=[*msg.get("headers", []),
                                     (b"access-control-allow-origin", origin.encode("latin-1")),
                                     (b"access-control-expose-headers", b"ETag"), (b"vary", b"Origin")])
        await send(msg)

    return cors_send


async def _send_preflight(send, origin: str) -> None:
    """The answer to a CORS preflight from an allowed origin."""
    await send({"type": "http.response.start", "status": 204, "headers": [
        (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
        (b"access-control-allow-methods", b"GET, HEAD, POST, DELETE"),
        (b"access-control-allow-headers", b"Authorization, X-API-Token, Content-Type, If-None-Match"),
        (b"access-control-max-age", b"600"), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def _send_error(send, status: int, code: str, message: str) -> None:
    import json

    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}; known: {', '.join(sorted(ERROR_CODES))}")
    body = json.dumps({"error": {"status": status, "code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": body})


# -- the API docs page (/docs) --------------------------------------------------------------------
# FastAPI's own /docs loads Swagger UI from a CDN (a blank page offline) and starts it with an
# inline <script>, which the pages' Content-Security-Policy (script-src 'self') refuses anyway.
# Here Swagger UI's files come from the fastapi-offline package (the serve extra; only its static
# folder is used), served by this server, and web/docs-init.js starts it: the page has no inline
# script and asks no other host. (swagger-ui-bundle is no substitute: its newest release carries
# Swagger UI 4, which cannot render the OpenAPI 3.1 schema FastAPI writes.)

_DOCS_ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}
"""The files of fastapi-offline's static folder served at ``/docs/assets/<name>``, and their
content types."""

_DOCS_INIT = "docs-init.js"
"""The script from :data:`WEB_DIR` that starts Swagger UI on ``/openapi.json``, served at
``/docs/assets/docs-init.js`` so that the page does not depend on the ``/static`` mount."""

_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>imret API</title>
  <link rel="icon" type="image/png" href="/docs/assets/favicon.png">
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
  <script src="/docs/assets/swagger-ui-bundle.js" defer></script>
  <script src="/docs/assets/docs-init.js" defer></script>
</head>
<body>
  <div id="swagger-ui"><noscript>The API docs need JavaScript; the schema is at
    <a href="/openapi.json">/openapi.json</a>.</noscript></div>
</body>
</html>
"""

_DOCS_FALLBACK = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>imret API</title></head>
<body>
  <h1>imret API</h1>
  <p>The interactive API docs need the <code>fastapi-offline</code> package (it carries Swagger UI),
    which this server does not have: install it with <code>pip install 'imret[serve]'</code> (or
    <code>pip install fastapi-offline</code>) and restart the server.</p>
  <p>The OpenAPI schema is at <a href="/openapi.json">/openapi.json</a>.</p>
</body>
</html>
"""


def _swagger_ui_dir() -> Path | None:
    """The folder of Swagger UI's files (fastapi-offline's ``static/``), or None when that
    package is not installed or lacks one of :data:`_DOCS_ASSETS`."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    path = Path(fastapi_offline.__file__).resolve().parent / "static"
    missing = [name for name in _DOCS_ASSETS if not (path / name).is_file()]
    if missing:
        logging.getLogger("imret.server").warning("fastapi-offline lacks Swagger UI's %s; /docs links the schema "
                                                  "only", ", ".join(missing))
        return None
    return path


# -- the app ------------------------------------------------------------------------------------

def create_app(store, config: ServerConfig | None = None, *, url: str | None = None):
    """The FastAPI application serving ``store`` (a :class:`~imret.index.store.Store`, or a
    path, opened writable unless ``config.read_only``). The app owns a path-opened store and
    closes it on shutdown. ``url``, where clients reach the server, is written into the
    store's lock with a note that a server holds it, so that ``imret index add`` meanwhile
    says to add the images through the API instead."""
    from contextlib import asynccontextmanager
    from typing import Annotated

    from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from fastapi.security import APIKeyHeader, HTTPBearer
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .batching import BatcherFull
    from .index.store import Store

    config = config or ServerConfig()
    owned = not isinstance(store, Store)
    if owned:
        holder = {"kind": "server", **({"url": url} if url else {})}
        store = Store.open(store, writable=not config.read_only, device=config.device, holder=holder)
    service = Service(store, config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()
        if owned:
            store.close()

    # docs_url, redoc_url: FastAPI's pages load from a CDN and start with an inline script (refused
    # by the CSP below); /docs is served further down instead
    app = FastAPI(title="imret", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Instance-level image retrieval: search an image store by photo or by indexed image, "
                              "add and remove images. Errors are `{\"error\": {\"status\", \"code\", \"message\"}}`.")
    app.state.service = service

    # integer parameters are bounded where they are parsed: out of range (negative, or beyond the
    # 64 bits SQLite takes) is a 422 like any other bad parameter, never an error further down
    ImageId = Annotated[int, PathParam(ge=0, le=MAX_ID, description=f"image id (0..{MAX_ID})")]
    K_HELP = f"number of results (1..{config.max_k}; default {config.default_k})"
    RERANK_HELP = (f"re-rankers to run after the first stage instead of the store's own (/api/info store.rerank): "
                   f"one spec 'kind[:top_k][?key=value&...]' per value, kinds sift, cnn, aml, sg; at most "
                   f"{config.max_rerank_stages} stages of at most {config.max_rerank_k} candidates, parameters of "
                   f"/api/info server.rerank.request_params only. 'none': no re-ranking. Absent: the store's own")
    LOCALIZE_HELP = (f"'true': give hits a 'box' of the query object, adding an aml:min(k,{config.max_rerank_k}) "
                     "stage unless a stage already localises (default false)")
    HITS_HELP = ("Each hit is {id, score, name, width, height, thumbnail} plus, when a re-ranker set them, "
                 "`inliers` (geometric verification), `box` [x1, y1, x2, y2] (the localised object, in the hit "
                 "image's upright pixels) and `transform` (3x3, query pixels -> hit pixels). `rerank` lists the "
                 "stages that ran. A sift/cnn stage on a store without those local features is 409 "
                 "`rerank_unavailable`.")
    SEARCH_DESC = ("Search with an uploaded photo; re-rankers see the uploaded pixels (and the box). Or search by "
                   f"text: a form field `text` instead of `image`, or a JSON body {{\"text\", \"k\", \"qe\", "
                   f"\"rerank\"}} (Content-Type: application/json; at most {config.max_text_chars} characters), on "
                   "a store with a caption model (/api/info server.text.available; else 409 `text_unavailable`); "
                   "a text none of whose words the model knows is 422 `unknown_words`. A text query is ranked "
                   "by caption embedding . image descriptor; the store's re-rankers that need the query's pixels "
                   "(sift, cnn, aml) are left out, and a request's are refused. " + HITS_HELP)
    TEXT_SCHEMA = {"type": "object", "required": ["text"], "additionalProperties": False, "properties": {
        "text": {"type": "string", "minLength": 1, "maxLength": config.max_text_chars,
                 "description": "the text query, e.g. 'a dog catching a frisbee'"},
        "k": {"type": "integer", "minimum": 1, "maximum": config.max_k, "description": K_HELP},
        "qe": {"type": ["boolean", "string"], "description": "query expansion (default: the store's setting)"},
        "rerank": {"type": ["array", "string"], "items": {"type": "string"},
                   "description": "re-rankers on descriptors (sg) or 'none'; default: the store's own that need "
                                  "no pixels"}}}
    SIMILAR_DESC = ("Search with the stored descriptor of an indexed image; re-rankers that need pixels read that "
                    "image's stored file. " + HITS_HELP)

    err = {"model": dict, "description": "error: {\"error\": {\"status\", \"code\", \"message\"}}"}

    def errors(*codes: int) -> dict[int, dict]:
        return {c: err for c in codes}

    # -- errors, metrics, headers --------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse({"error": {"status": e.status, "code": e.code, "message": e.message}}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        msgs = []
        for d in e.errors():
            loc = ".".join(str(x) for x in d.get("loc", ()) if x not in ("body", "query", "path"))
            msgs.append(f"{loc}: {d.get('msg')}")
        return JSONResponse({"error": {"status": 422, "code": "bad_request", "message": "; ".join(msgs)}},
                            status_code=422)

    def _internal(request: Request, e: BaseException) -> JSONResponse:
        from .index.store import StoreCorruptError, StoreFullError

        # store failures say what happened without the server's paths (the log has them)
        if isinstance(e, StoreFullError):
            logging.getLogger("imret.server").error("%s %s: %s", request.method, request.url.path, e)
            return JSONResponse({"error": {"status": 507, "code": "insufficient_storage", "message":
                                           "no space left on the server's disk: nothing of this request was "
                                           "written and the store is intact"}}, status_code=507)
        if isinstance(e, StoreCorruptError):
            logging.getLogger("imret.server").error("%s %s: %s", request.method, request.url.path, e)
            return JSONResponse({"error": {"status": 500, "code": "store_damaged", "message":
                                           "a file of the store is damaged (the server log names it); "
                                           "nothing was changed"}}, status_code=500)
        logging.getLogger("imret.server").error("unhandled error in %s %s", request.method, request.url.path,
                                                exc_info=(type(e), e, e.__traceback__))
        return JSONResponse({"error": {"status": 500, "code": "internal", "message": f"internal error "
                                       f"({type(e).__name__}); see the server log"}}, status_code=500)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return _internal(request, e)

    # the framework's own refusals (unknown path, wrong method, a multipart body it cannot parse)
    _HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                   405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type", 422: "bad_request",
                   503: "busy"}

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = _HTTP_CODES.get(e.status_code, "bad_request" if e.status_code < 500 else "internal")
        return JSONResponse({"error": {"status": e.status_code, "code": code, "message": str(e.detail)}},
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            try:
                response = await call_next(request)
            except Exception as e:  # noqa: BLE001
                # answered here, not by the outermost error handler: that one re-raises into the
                # server, which then drops the keep-alive connection
                response = _internal(request, e)
            status = response.status_code
        finally:
            route = request.scope.get("route")
            name = f"{request.method} {route.path}" if route is not None else "other"
            service.metrics.record(name, status, time.perf_counter() - t0)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if response.headers.get("content-type", "").startswith("text/html"):
            response.headers.setdefault("Content-Security-Policy",
                                        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                        "script-src 'self'; frame-ancestors 'none'")
        return response

    # -- auth ----------------------------------------------------------------------------------

    def _token_of(request: Request) -> str | None:
        h = request.headers.get("authorization", "")
        if h[:7].lower() == "bearer ":
            return h[7:].strip()
        return request.headers.get("x-api-token")

    def _check_token(request: Request) -> None:
        given = _token_of(request)
        if given is None or given == "":
            raise ApiError(401, "unauthorized", "this endpoint needs the API token (Authorization: Bearer <token>)")
        if not secrets.compare_digest(given.encode(), config.token.encode()):
            raise ApiError(403, "forbidden", "wrong API token")

    # The token schemes are declared as dependencies only where a token is asked for, so that
    # /openapi.json lists them (Swagger UI's "Authorize" button) on exactly the endpoints that
    # need one; _check_token reads the headers itself (auto_error=False: no FastAPI error shape).
    bearer = HTTPBearer(auto_error=False, description="the server's API token: Authorization: Bearer <token>")
    api_key = APIKeyHeader(name="X-Api-Token", auto_error=False, description="the API token, as a header")

    if config.token_reads:
        def read_auth(request: Request, _b=Depends(bearer), _k=Depends(api_key)) -> None:
            _check_token(request)
    else:
        def read_auth(request: Request) -> None:
            pass

    if config.token is not None:
        def write_auth(request: Request, _b=Depends(bearer), _k=Depends(api_key)) -> None:
            _check_token(request)
            _check_writable()
    else:
        def write_auth(request: Request) -> None:
            _check_writable()

    def _check_writable() -> None:
        if config.read_only:
            raise ApiError(403, "read_only", "this server was started read-only: adds and removes are disabled")

    async def _search(query: _Query) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        try:
            fut = (service.batcher if query.tensor is not None else service.id_batcher).submit(query)
        except BatcherFull as e:
            raise ApiError(503, "busy", f"the server is overloaded ({e}); retry later") from None
        return await asyncio.wrap_future(fut)

    async def _ranked(plan: _RerankPlan, query: _Query, k: int, *, image: str | None, box=None,
                      image_id: int | None = None, owned_file: str | None = None) -> dict[str, Any]:
        """First stage (batched), then the plan's re-rankers (on the re-rank pool), as the
        response's ``results`` and ``rerank``. Owns ``owned_file`` (deleted when done)."""
        try:
            scores, ids, x = await _search(query)
        except BaseException:
            if owned_file is not None:
                Path(owned_file).unlink(missing_ok=True)
            raise
        extras = None
        if plan.stages:
            fut = service.submit_rerank(plan, x, scores, ids, k, image=image, box=box, image_id=image_id,
                                        owned_file=owned_file)
            scores, ids, extras = await asyncio.wrap_future(fut)
        else:
            scores, ids = scores[:k], ids[:k]
            if owned_file is not None:
                Path(owned_file).unlink(missing_ok=True)
        hits = await run_in_threadpool(service.hits, scores, ids, extras)
        return {"results": hits, "rerank": plan.specs}

    # -- pages ---------------------------------------------------------------------------------

    def _page() -> Response:
        index = WEB_DIR / "index.html"
        if not index.is_file():
            return HTMLResponse("<!doctype html><title>imret</title><p>imret is running; the web page is not "
                                "installed. The API is at <a href='/docs'>/docs</a>.</p>")
        return FileResponse(index, media_type="text/html")

    @app.get("/", include_in_schema=False)
    async def page():
        return _page()

    @app.get("/browse", include_in_schema=False)
    async def page_browse():
        return _page()

    if WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    swagger_ui = _swagger_ui_dir()

    @app.get("/docs", include_in_schema=False)
    async def api_docs():
        return HTMLResponse(_DOCS_PAGE if swagger_ui is not None else _DOCS_FALLBACK)

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def api_docs_asset(name: str):
        # Swagger UI's bundle is 1.4 MB: let browsers keep it a day (revalidated by ETag after)
        cache = {"Cache-Control": "public, max-age=86400"}
        if swagger_ui is not None and name in _DOCS_ASSETS:
            return FileResponse(swagger_ui / name, media_type=_DOCS_ASSETS[name], headers=cache)
        if swagger_ui is not None and name == _DOCS_INIT and (WEB_DIR / _DOCS_INIT).is_file():
            return FileResponse(WEB_DIR / _DOCS_INIT, media_type="text/javascript; charset=utf-8", headers=cache)
        raise ApiError(404, "not_found", f"no API docs asset {sanitise_name(name)!r}")

    # -- reads ---------------------------------------------------------------------------------

    @app.get("/api/health", tags=["status"], summary="Liveness and image count")
    async def health():
        return {"status": "ok", "images": len(store), "uptime_s": round(time.time() - service.started, 3)}

    @app.get("/api/info", tags=["status"], summary="Store facts and server limits",
             dependencies=[Depends(read_auth)], responses=errors(401, 403))
    async def info():
        return await run_in_threadpool(service.info)

    @app.get("/api/metrics", tags=["status"], summary="Request counts, latencies, batching",
             dependencies=[Depends(read_auth)], responses=errors(401, 403))
    async def metrics():
        def batches(b):
            s = b.stats()
            return {"count": s.batches, "items": s.items, "mean_size": round(s.mean_size, 3), "max_size": s.max_size,
                    "busy_s": round(s.busy_s, 3), "sizes": {str(k): v for k, v in sorted(s.sizes.items())},
                    "queue": b.pending}

        return {"requests": service.metrics.snapshot(), "batches": batches(service.batcher),
                "id_batches": batches(service.id_batcher),
                "queue": service.batcher.pending + service.id_batcher.pending,
                "rerank_queue": service.rerank_pending,
                "uptime_s": round(time.time() - service.started, 3)}

    async def _text_search(text: Any, k: Any, qe: Any, rerank: Any, t0: float) -> dict[str, Any]:
        """A text query: checked, embedded, searched (batched with other text queries), re-ranked
        by the stages that need no pixels."""
        if not isinstance(text, str):
            raise ApiError(400, "bad_request", f"text must be a string, got {type(text).__name__}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
            raise ApiError(400, "bad_request", f"k must be an integer, got {k!r:.40}")
        kk = _check_k(k, config)
        if isinstance(qe, bool) or qe is None:
            use_qe = qe
        elif isinstance(qe, str):
            use_qe = _parse_bool(qe, "qe")
        else:
            raise ApiError(400, "bad_request", f"qe must be true or false, got {qe!r:.40}")
        if isinstance(rerank, str):
            rerank = [rerank]
        if rerank is not None and (not isinstance(rerank, list) or not all(isinstance(r, str) for r in rerank)):
            raise ApiError(400, "bad_request", "rerank must be a spec string or a list of them")
        specs = _parse_rerank(rerank, config)
        vector = await run_in_threadpool(service.encode_text, text)
        plan = await run_in_threadpool(lambda: service.plan_rerank(specs, False, kk, text=True))
        out = await _ranked(plan, _Query(plan.depth, use_qe, vector=vector), kk, image=None)
        return {**out, "took_ms": round((time.perf_counter() - t0) * 1000, 3),
                "query": {"text": text}}

    @app.post("/api/search", tags=["search"], summary="Search with an uploaded photo, or by text",
              description=SEARCH_DESC,
              dependencies=[Depends(read_auth)], responses=errors(400, 401, 403, 409, 413, 415, 422, 503),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": TEXT_SCHEMA}}}})
    async def search(
        request: Request,
        image: UploadFile | None = File(None, description="the query photo, in a format of /api/info's "
                                                          "upload_formats (or give text)"),
        text: str | None = Form(None, description=f"a text query instead of image (at most {config.max_text_chars} "
                                                  "characters; needs a caption model in the store)"),
        bbox: str | None = Form(None, description="crop box 'x1,y1,x2,y2' in pixels of the upright image"),
        k: int | None = Form(None, ge=1, le=config.max_k, description=K_HELP),
        qe: str | None = Form(None, description="query expansion 'true'/'false' (default: the store's setting)"),
        rerank: list[str] | None = Form(None, description=RERANK_HELP),
        localize: str | None = Form(None, description=LOCALIZE_HELP),
    ):
        t0 = time.perf_counter()
        if request.headers.get("content-type", "").lower().startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "bad_request", "the body is not valid JSON") from None
            if not isinstance(body, dict) or "text" not in body:
                raise ApiError(400, "bad_request", "a JSON search body is an object with a 'text' field "
                                                   "(photos are uploaded as multipart/form-data)")
            unknown = sorted(set(body) - {"text", "k", "qe", "rerank"})
            if unknown:
                raise ApiError(400, "bad_request", f"unknown field(s) {', '.join(map(repr, unknown))[:200]}; a text "
                                                   "search takes text, k, qe, rerank")
            return await _text_search(body["text"], body.get("k"), body.get("qe"), body.get("rerank"), t0)
        if text is not None:
            if image is not None or bbox is not None or localize not in (None, ""):
                raise ApiError(400, "bad_request", "give image or text, not both (a text query has no box and "
                                                   "nothing to localise)")
            return await _text_search(text, k, qe, rerank, t0)
        if image is None:
            raise ApiError(422, "bad_request", "a missing form field: give the query photo ('image') or a text "
                                               "query ('text')")
        kk = _check_k(k, config)
        box = _parse_bbox(bbox)
        use_qe = _parse_bool(qe, "qe")
        specs = _parse_rerank(rerank, config)
        loc = bool(_parse_bool(localize, "localize"))
        plan = await run_in_threadpool(service.plan_rerank, specs, loc, kk)  # refused before any decoding
        data = await image.read(config.max_upload_bytes + 1)
        checked = await run_in_threadpool(service.check_upload, data, image.filename, bbox=box,
                                          keep_file=bool(plan.stages))
        out = await _ranked(plan, _Query(plan.depth, use_qe, tensor=checked.tensor), kk, image=checked.file,
                            box=checked.bbox, owned_file=checked.file)
        return {**out, "took_ms": round((time.perf_counter() - t0) * 1000, 3),
                "query": {"width": checked.width, "height": checked.height,
                          "bbox": list(checked.bbox) if checked.bbox else None}}

    @app.get("/api/images/{image_id}/similar", tags=["search"], summary="Search with an indexed image",
             description=SIMILAR_DESC,
             dependencies=[Depends(read_auth)], responses=errors(400, 401, 403, 404, 409, 422, 503))
    async def similar(image_id: ImageId, k: int | None = Query(None, ge=1, le=config.max_k, description=K_HELP),
                      qe: str | None = Query(None, description="query expansion 'true'/'false' (default: the "
                                                                "store's setting)"),
                      rerank: list[str] | None = Query(None, description=RERANK_HELP),
                      localize: str | None = Query(None, description=LOCALIZE_HELP)):
        t0 = time.perf_counter()
        kk = _check_k(k, config)
        use_qe = _parse_bool(qe, "qe")
        specs = _parse_rerank(rerank, config)
        loc = bool(_parse_bool(localize, "localize"))
        rec = await run_in_threadpool(service.live_record, image_id)
        plan = await run_in_threadpool(service.plan_rerank, specs, loc, kk)
        # stages that need pixels read the indexed image's own file (a path from the store)
        out = await _ranked(plan, _Query(plan.depth, use_qe, image_id=image_id), kk, image=rec.path,
                            image_id=image_id)
        return {**out, "took_ms": round((time.perf_counter() - t0) * 1000, 3), "query": {"id": image_id}}

    @app.get("/api/images", tags=["images"], summary="Live images in id order, paged",
             dependencies=[Depends(read_auth)], responses=errors(401, 403, 422))
    async def list_images(offset: int = Query(0, ge=0, le=MAX_ID), limit: int = Query(50, ge=1, le=500)):
        def work():
            recs = store.list(offset, limit)
            return {"total": len(store), "offset": offset, "limit": limit,
                    "items": [service._image_fields(r) for r in recs]}

        return await run_in_threadpool(work)

    @app.get("/api/images/{image_id}", tags=["images"], summary="One image's record",
             dependencies=[Depends(read_auth)], responses=errors(401, 403, 404, 422))
    async def get_image(image_id: ImageId):
        rec = await run_in_threadpool(service.live_record, image_id)
        return service._image_fields(rec)

    @app.get("/api/images/{image_id}/thumbnail", tags=["images"], summary="JPEG thumbnail of an indexed image",
             dependencies=[Depends(read_auth)], responses={200: {"content": {"image/jpeg": {}}},
                                                            **errors(401, 403, 404, 422)},
             response_class=Response)
    async def thumbnail(request: Request, image_id: ImageId, size: int = Query(256, ge=32, le=1024)):
        data, etag = await run_in_threadpool(service.thumbnail, image_id, size)
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(content=data, media_type="image/jpeg", headers=headers)

    # -- writes --------------------------------------------------------------------------------

    @app.post("/api/images", tags=["images"], summary="Add images", status_code=201,
              dependencies=[Depends(write_auth)], responses=errors(400, 401, 403, 413, 415, 422))
    async def add_images(images: list[UploadFile] = File(..., description="one or more image files")):
        if len(images) > config.max_files:
            raise ApiError(413, "too_many_files", f"{len(images)} files in one request; the limit is {config.max_files}")
        checked = []
        for f in images:  # every file checked before anything is written
            data = await f.read(config.max_upload_bytes + 1)
            checked.append(await run_in_threadpool(service.check_upload, data, f.filename, decode_for_model=False))

        def work():
            report, paths = service.add_uploads(checked)
            service.wrote()
            by_path = dict(zip(paths, checked))
            shown = {p: f.name for p, f in by_path.items()}

            def name(p):
                return by_path[p].name if p in by_path else service.display_name(p)

            return {"added": [{"id": int(i), "name": service.display_name(r.path)}
                              for i, r in zip(report.added, store.records(report.added))],
                    "duplicates": [{"name": name(p), "id": int(i)} for p, i in report.duplicates],
                    "skipped": [{"name": name(p), "reason": _hide_paths(why, shown)} for p, why in report.skipped]}

        return await asyncio.wrap_future(service.writer.submit(work))

    @app.delete("/api/images/{image_id}", tags=["images"], summary="Remove an image",
                dependencies=[Depends(write_auth)], responses=errors(401, 403, 404, 422))
    async def remove_image(image_id: ImageId):
        def work():
            service.remove_image(image_id)
            return {"removed": image_id}

        return await asyncio.wrap_future(service.writer.submit(work))

    limits = {"/api/search": config.max_upload_bytes + 65536,
              "/api/images": min(config.max_request_bytes,
                                 config.max_files * (config.max_upload_bytes + 4096) + 65536)}
    app.add_middleware(RequestGuard, limits=limits, multipart={"/api/search", "/api/images"},
                       allowed_hosts=config.allowed_hosts, allowed_origins=config.allowed_origins,
                       json_paths={"/api/search"})
    return app
