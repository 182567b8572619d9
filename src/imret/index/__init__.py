"""Search backends behind one spec string, and the persistent store.

``create_backend("exact" | "faiss:..." | "ann" | "milvus:...", dim)`` builds an empty backend;
``load_backend(spec, dim, directory)`` reopens one saved with :meth:`Backend.save`. FAISS and
Milvus are optional: their adapters import them lazily and name the extra to install.
``auto?recall=0.95&k=100`` is chosen from the collection's own vectors by
:func:`imret.index.tuning.tune` (the store does so when it builds its index).
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import BACKEND_KINDS, Backend, BackendSpec, parse_spec, tie_aware_recall
from .exact import ExactBackend, exact_search

__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "BackendSpec",
    "ExactBackend",
    "check_spec",
    "create_backend",
    "load_backend",
    "exact_search",
    "parse_spec",
    "resolve_spec",
    "tie_aware_recall",
]


def resolve_spec(spec: str | BackendSpec, n_hint: int | None = None) -> BackendSpec:
    """Parse ``spec`` and turn the ``ann`` alias into a concrete FAISS spec sized for ``n_hint`` rows
    (``auto`` stays as it is: only the vectors can resolve it, see :func:`imret.index.tuning.tune`)."""
    s = parse_spec(spec)
    if s.kind == "ann":
        from .faiss_backend import default_ann_spec

        return parse_spec(default_ann_spec(n_hint or 0, **s.params))
    return s


def check_spec(spec: str | BackendSpec, *, dim: int | None = None) -> BackendSpec:
    """Check a whole backend spec before any work depends on it; returns it parsed.

    Checks what :func:`parse_spec` checks (the kind, the target) and also every parameter name
    and value (``exact``: ``precision``; ``ann``: ``nprobe``, ``efSearch``; ``auto``: see
    :data:`imret.index.tuning.AUTO_PARAMS`; ``faiss:``: see
    :data:`imret.index.faiss_backend.FAISS_PARAMS`; ``milvus:``: see
    :data:`imret.index.milvus_backend.PARAMS`), and that the optional package the backend
    needs is installed. With ``dim``, FAISS also builds the (empty, untrained) index of a
    ``faiss:`` spec for ``dim``-D rows, which checks the factory string and that each
    parameter applies to it. A Milvus target is parsed, never contacted. Nothing is written.

    Raises:
        ValueError: the spec or one of its parameters is wrong (the message names the valid
            choices).
        ImportError: the backend's package is missing (the message names the extra).
    """
    s = parse_spec(spec)
    if s.kind == "exact":
        from .exact import _precision_of

        _precision_of(str(s))  # only precision=auto|fp32|bf16
    elif s.kind == "ann":
        from .faiss_backend import _faiss, check_ann_params

        check_ann_params(s.params)
        _faiss()
    elif s.kind == "auto":  # parse_spec checked the parameters
        from .faiss_backend import _faiss

        _faiss()
    elif s.kind == "faiss":
        from .faiss_backend import FaissBackend, _faiss, _parse_params

        _parse_params(s.params)
        _faiss()
        if dim is not None:
            FaissBackend(dim, s.target, s.params).close()
    else:
        import importlib.util

        from .milvus_backend import milvus_config

        milvus_config(s.target, s.params)
        if importlib.util.find_spec("pymilvus") is None:
            raise ImportError("the milvus backend needs pymilvus and milvus-lite: pip install 'imret[milvus]'")
    return s


def create_backend(spec: str | BackendSpec, dim: int, *, root: str | os.PathLike | None = None,
                   n_hint: int | None = None) -> Backend:
    """An empty backend for ``dim``-D rows.

    ``root`` is the directory relative paths in the spec (``milvus:./x.db``) resolve against
    (the store directory; default the working directory). ``n_hint`` sizes the ``ann`` alias.
    """
    s = resolve_spec(spec, n_hint)
    if s.kind == "auto":
        raise ValueError(f"{str(s)!r} is chosen from the collection's vectors: build it with "
                         "imret.index.tuning.tune(vectors, alive, auto_target(params)), in a store or a Retriever")
    if s.kind == "exact":
        return ExactBackend(dim, spec=str(s))
    if s.kind == "faiss":
        from .faiss_backend import FaissBackend

        return FaissBackend(dim, s.target, s.params)
    from .milvus_backend import MilvusBackend

    return MilvusBackend(dim, s.target, s.params, root=Path(root) if root is not None else None)


def load_backend(spec: str | BackendSpec, dim: int, directory: str | os.PathLike, *,
                 root: str | os.PathLike | None = None) -> Backend:
    """Reopen a backend saved into ``directory``; its spec and dim must match."""
    s = parse_spec(spec)
    if s.kind in ("ann", "auto"):
        raise ValueError(f"a saved backend has a concrete spec; {s.kind!r} is resolved when the index is built")
    if s.kind == "exact":
        return ExactBackend.load(directory, spec=str(s))
    if s.kind == "faiss":
        from .faiss_backend import FaissBackend

        return FaissBackend.load(directory, dim, s.target, s.params)
    from .milvus_backend import MilvusBackend

    return MilvusBackend.load(directory, dim, s.target, s.params, root=Path(root) if root is not None else None)
