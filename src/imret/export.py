"""Export a store's vectors and metadata for other tools: NumPy, Parquet, FiftyOne.

A store keeps its rows in raw ``.f32`` files (no header: ``np.load`` cannot read them) and its
metadata in SQLite. :func:`export_store` writes the live images only, in id order, row ``i``
of the vectors belonging to entry ``i`` of the metadata:

* ``"npy"``: ``PATH.npy`` (float32 ``(N, D)``, ``np.load`` reads it), ``PATH.jsonl`` (one JSON
  object per line: ``id, path, width, height, size, sha256, added``) and ``PATH.json`` (what
  the rows are: model, dimension, descriptors or post-processed vectors).
* ``"parquet"``: one table, ``PATH`` (``.parquet`` added when it has no suffix): the metadata
  columns and ``vector``, a fixed-size list of ``D`` float32; the facts of ``PATH.json`` are in
  the schema metadata under ``imret``. Needs pyarrow (``pip install pyarrow``).
* ``"fiftyone"``: a folder, ``PATH/samples.json`` (a list of samples: ``filepath``,
  ``imret_id``, ``width``, ``height``, ``size``, ``sha256``, ``added``), ``PATH/embeddings.npy``
  (row ``i`` for sample ``i``) and ``PATH/README.md`` with the two lines that load it into
  FiftyOne (:func:`fiftyone_snippet`); FiftyOne itself is not needed to export.

Rows are the raw descriptors by default, or with ``vectors=True`` the indexed rows (after
the store's whitening / DBA: what a search compares). Everything is streamed in chunks of
``chunk`` images, so memory stays flat for any store size; every file is written beside its
target and renamed over it only when complete.

Paths: written as stored (absolute) when ``relative_to`` is None, else relative to that
folder (``os.path.relpath``: images outside it get ``../`` parts), so that an export can be
shared without the layout of the machine it came from; :func:`common_folder` finds the
deepest folder holding every image, the CLI's default.

The store is read through its public methods only (``list``, ``records``, ``descriptors``,
``vectors``, ``info``). A store changed by a writer while it is exported keeps the rows of
the snapshot taken at the start (removed rows stay readable; later adds are left out).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ._checks import positive_int
from .fileio import atomic_path

__all__ = ["EXPORT_FORMATS", "ExportReport", "export_store", "common_folder", "relative_paths",
           "fiftyone_snippet", "require_pyarrow", "live_snapshot"]

#: The formats of :func:`export_store`.
EXPORT_FORMATS = ("npy", "parquet", "fiftyone")

#: The metadata of each image, in the order of the columns / JSON keys.
METADATA_FIELDS = ("id", "path", "width", "height", "size", "sha256", "added")

_PAGE = 10_000  # records per page of Store.list when taking the snapshot of live ids


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_store` wrote.

    Attributes:
        format: one of :data:`EXPORT_FORMATS`.
        files: the files written (for ``"fiftyone"``, those in its folder).
        rows: images exported (live images of the store).
        dim: the width ``D`` of each row.
        rows_kind: ``"descriptors"`` (raw) or ``"vectors"`` (post-processed, as indexed).
        relative_to: the folder the paths are relative to; None when they are as stored.
    """

    format: str
    files: tuple[Path, ...]
    rows: int
    dim: int
    rows_kind: str
    relative_to: Path | None


def require_pyarrow() -> Any:
    """``pyarrow`` and ``pyarrow.parquet``, or an ImportError naming the package to install."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"the parquet export needs pyarrow, which is not installed: pip install pyarrow "
                          f"({e})") from None
    return pyarrow, pq


def relative_paths(paths: Sequence[str], relative_to: str | os.PathLike | None) -> list[str]:
    """``paths`` relative to the folder ``relative_to`` (forward slashes kept as the OS gives
    them), or unchanged when it is None. Pure: nothing is read from disk."""
    if relative_to is None:
        return list(paths)
    root = os.path.abspath(os.fspath(relative_to))
    return [os.path.relpath(os.path.abspath(p), root) for p in paths]


def common_folder(paths: Sequence[str]) -> str | None:
    """The deepest folder that holds every path of ``paths`` (None for no paths, or paths on
    different drives). Pure."""
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if not folders:
        return None
    try:
        return os.path.commonpath(sorted(folders))
    except ValueError:  # different drives (Windows), or absolute and relative mixed
        return None


def live_snapshot(store: Any) -> tuple[np.ndarray, str | None]:
    """The live ids of ``store`` in id order, and the deepest folder holding all their images
    (None for an empty store), read page by page through ``store.list``."""
    ids: list[int] = []
    folders: set[str] = set()
    root: str | None = None
    offset = 0
    while True:
        page = store.list(offset, _PAGE)
        ids.extend(r.id for r in page)
        folders.update(os.path.dirname(os.path.abspath(r.path)) for r in page)
        if root is not None:
            folders.add(root)
        root = common_folder([os.path.join(f, "_") for f in folders])
        folders.clear()
        offset += len(page)
        if len(page) < _PAGE:
            break
    return np.asarray(ids, dtype=np.int64), root


def _chunks(store: Any, ids: np.ndarray, matrix: np.ndarray, chunk: int) -> Iterator[tuple[list, np.ndarray]]:
    """``(records, rows)`` for consecutive chunks of ``ids``: float32 ``(len, D)`` rows."""
    for lo in range(0, ids.size, chunk):
        part = ids[lo:lo + chunk]
        recs = store.records(part.tolist())
        rows = np.ascontiguousarray(matrix[part], dtype=np.float32)
        yield recs, rows


def _meta_row(r: Any, path: str) -> dict[str, Any]:
    return {"id": int(r.id), "path": path, "width": int(r.width), "height": int(r.height), "size": int(r.size),
            "sha256": r.sha256, "added": r.added}


def _store_facts(store: Any, rows_kind: str, n: int, dim: int, relative: bool) -> dict[str, Any]:
    """What the exported rows are (no path of this machine in it)."""
    info = store.info()
    return {
        "format": "imret-export",
        "version": 1,
        "rows": rows_kind,
        "n": int(n),
        "dim": int(dim),
        "dtype": "float32",
        "model": info["model"].get("spec"),
        "weights_sha256": info["model"].get("weights_sha256"),
        "preprocessing": info["preprocessing"],
        "whitening": info["whitening"] if rows_kind == "vectors" else None,
        "dba": info["dba"] if rows_kind == "vectors" else None,
        "paths": "relative" if relative else "as stored",
        "fields": list(METADATA_FIELDS),
    }


def _check_new(paths: Sequence[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for p in paths:
        if p.exists():
            raise FileExistsError(f"{p} exists; choose another output or allow overwriting it (imret: --force)")


def _npy_paths(out: Path) -> tuple[Path, Path, Path]:
    stem = out.with_suffix("") if out.suffix.lower() in (".npy", ".jsonl", ".json") else out
    return stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".jsonl"), stem.with_name(stem.name + ".json")


def _parquet_path(out: Path) -> Path:
    return out if out.suffix else out.with_name(out.name + ".parquet")


def export_store(
    store: Any,
    out: str | os.PathLike,
    *,
    format: str = "npy",
    vectors: bool = False,
    relative_to: str | os.PathLike | None = None,
    common_root: bool = False,
    chunk: int = 4096,
    overwrite: bool = False,
) -> ExportReport:
    """Export the live images of an open :class:`imret.index.store.Store` (see the module doc).

    Args:
        store: an open store (read-only is enough).
        out: ``"npy"``: the path stem (``.npy``, ``.jsonl``, ``.json`` added; a given ``.npy``
            suffix is replaced); ``"parquet"``: the file (``.parquet`` added without a suffix);
            ``"fiftyone"``: the folder (created; must be empty unless ``overwrite``).
        format: one of :data:`EXPORT_FORMATS`.
        vectors: export the indexed (post-processed) rows instead of the raw descriptors.
        relative_to: write image paths relative to this folder; None: as stored.
        common_root: without ``relative_to``, write them relative to the deepest folder
            holding every exported image (:func:`common_folder`); the report names it.
        chunk: images read and written per step.
        overwrite: replace existing output files instead of refusing.

    Returns:
        an :class:`ExportReport`.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; available: {', '.join(EXPORT_FORMATS)}")
    chunk = positive_int(chunk, "chunk")
    if relative_to is not None and not os.path.isdir(relative_to):
        raise ValueError(f"relative_to {os.fspath(relative_to)!r} is not a folder")
    if format == "parquet":
        require_pyarrow()  # before any work
    if common_root and relative_to is not None:
        raise ValueError("give relative_to or common_root=True, not both")
    out = Path(out)
    ids, root = live_snapshot(store)
    if common_root:
        relative_to = root
    n_rows = int(ids.max()) + 1 if ids.size else 0
    matrix = store.vectors(n_rows) if vectors else store.descriptors(n_rows)
    dim = int(store.search_dim if vectors else store.dim)
    rows_kind = "vectors" if vectors else "descriptors"
    facts = _store_facts(store, rows_kind, ids.size, dim, relative_to is not None)
    rel = None if relative_to is None else Path(os.path.abspath(relative_to))
    if format == "npy":
        files = _export_npy(store, out, ids, matrix, dim, chunk, facts, relative_to, overwrite)
    elif format == "parquet":
        files = _export_parquet(store, out, ids, matrix, dim, chunk, facts, relative_to, overwrite)
    else:
        files = _export_fiftyone(store, out, ids, matrix, dim, chunk, facts, relative_to, overwrite)
    return ExportReport(format=format, files=tuple(files), rows=int(ids.size), dim=dim, rows_kind=rows_kind,
                        relative_to=rel)


def _write_rows_npy(path: Path, store: Any, ids: np.ndarray, matrix: np.ndarray, dim: int, chunk: int,
                    on_chunk) -> None:
    """``path`` as a ``.npy`` of ``(len(ids), dim)`` float32, filled chunk by chunk; ``on_chunk(records)``
    is called for each chunk in order."""
    with atomic_path(path) as tmp:
        if ids.size == 0:
            np.save(tmp, np.zeros((0, dim), np.float32))
            return
        m = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(int(ids.size), dim))
        try:
            lo = 0
            for recs, rows in _chunks(store, ids, matrix, chunk):
                m[lo:lo + len(recs)] = rows
                lo += len(recs)
                on_chunk(recs)
            m.flush()
        finally:
            del m


def _export_npy(store, out, ids, matrix, dim, chunk, facts, relative_to, overwrite) -> list[Path]:
    npy, jsonl, meta = _npy_paths(out)
    _check_new([npy, jsonl, meta], overwrite)
    npy.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(jsonl) as tmp_jsonl, open(tmp_jsonl, "w", encoding="utf-8", newline="\n") as f:
        def lines(recs):
            for r, p in zip(recs, relative_paths([r.path for r in recs], relative_to)):
                f.write(json.dumps(_meta_row(r, p)) + "\n")

        _write_rows_npy(npy, store, ids, matrix, dim, chunk, lines)
        f.flush()
    with atomic_path(meta) as tmp:
        tmp.write_text(json.dumps(dict(facts, files={"rows": npy.name, "metadata": jsonl.name}), indent=1) + "\n",
                       encoding="utf-8")
    return [npy, jsonl, meta]


def _utf8(text: str) -> str:
    """``text`` as valid UTF-8 for Arrow: a name that is not UTF-8 (surrogate escapes) gets
    U+FFFD in place of its bad bytes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _export_parquet(store, out, ids, matrix, dim, chunk, facts, relative_to, overwrite) -> list[Path]:
    pa, pq = require_pyarrow()
    path = _parquet_path(out)
    _check_new([path], overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.int64()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                        ("size", pa.int64()), ("sha256", pa.string()), ("added", pa.string()),
                        ("vector", pa.list_(pa.float32(), dim))],
                       metadata={"imret": json.dumps(facts)})
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as w:
            for recs, rows in _chunks(store, ids, matrix, chunk):
                paths = relative_paths([r.path for r in recs], relative_to)
                vec = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.float32()), dim)
                w.write_table(pa.Table.from_arrays([
                    pa.array([r.id for r in recs], pa.int64()), pa.array([_utf8(p) for p in paths], pa.string()),
                    pa.array([r.width for r in recs], pa.int32()), pa.array([r.height for r in recs], pa.int32()),
                    pa.array([r.size for r in recs], pa.int64()), pa.array([r.sha256 for r in recs], pa.string()),
                    pa.array([r.added for r in recs], pa.string()), vec], schema=schema))
    return [path]


def fiftyone_snippet(folder: str | os.PathLike, images_root: str | os.PathLike | None = None,
                     name: str = "imret") -> str:
    """The two Python lines that load a ``"fiftyone"`` export in ``folder`` into a FiftyOne
    dataset ``name``, each sample's vector in its ``embedding`` field (a 1-D numpy array: a
    FiftyOne vector field, usable as ``embeddings="embedding"`` by fiftyone.brain).
    ``images_root``: the folder the exported paths are relative to (default ``"."``, the
    working directory; ignored by absolute paths)."""
    folder = os.fspath(folder)
    root = "." if images_root is None else os.fspath(images_root)
    return (f"import json, os, numpy as np, fiftyone as fo; root, export = {root!r}, {folder!r}\n"
            f"dataset = fo.Dataset({name!r}); dataset.add_samples([fo.Sample(**dict(s, filepath=os.path.join(root, "
            "s['filepath'])), embedding=v) for s, v in zip(json.load(open(os.path.join(export, 'samples.json'))), "
            "np.load(os.path.join(export, 'embeddings.npy')))])\n")


def _export_fiftyone(store, out, ids, matrix, dim, chunk, facts, relative_to, overwrite) -> list[Path]:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--format fiftyone writes a folder; {out} is a file")
    samples_path, rows_path, readme = out / "samples.json", out / "embeddings.npy", out / "README.md"
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose a new folder or allow overwriting (imret: --force)")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(samples_path) as tmp_samples, open(tmp_samples, "w", encoding="utf-8", newline="\n") as f:
        f.write("[")
        first = [True]

        def samples(recs):
            for r, p in zip(recs, relative_paths([r.path for r in recs], relative_to)):
                row = _meta_row(r, p)
                sample = {"filepath": row.pop("path"), "imret_id": row.pop("id"), **row}
                f.write(("\n " if first[0] else ",\n ") + json.dumps(sample))
                first[0] = False

        _write_rows_npy(rows_path, store, ids, matrix, dim, chunk, samples)
        f.write("\n]\n")
    text = (
        "# imret export for FiftyOne\n\n"
        f"{facts['n']} images of an imret store: `samples.json` (one sample per image: `filepath`, `imret_id`, "
        f"`width`, `height`, `size`, `sha256`, `added`) and `embeddings.npy` (float32, {facts['n']} x {dim}, "
        f"the store's {facts['rows']}; row i belongs to sample i).\n\n"
        + ("Image paths are relative to the folder of the images: set `root` below to it "
           "(and `export` to this folder).\n\n"
           if facts["paths"] == "relative" else "Image paths are as the store holds them (absolute).\n\n")
        + "Load it (FiftyOne installed, from the folder holding this export):\n\n```python\n"
        + fiftyone_snippet(out.name)
        + "```\n\nThe vectors are a FiftyOne vector field, e.g. "
        "`fiftyone.brain.compute_visualization(dataset, embeddings='embedding')`.\n"
        f"\nWhat the rows are:\n\n```json\n{json.dumps(facts, indent=1)}\n```\n")
    with atomic_path(readme) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return [samples_path, rows_path, readme]
