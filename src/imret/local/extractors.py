"""Local-feature extractors by name, as the store and the re-rankers configure them.

``create_local_extractor("sift", {"max_keypoints": 500})`` or ``("cnn", {...}, model)``
gives ``f(image, box=None) -> LocalFeatures`` with a :meth:`layout` method: the fixed-size
record (:class:`~imret.local.storage.RecordLayout`) the store keeps its features in.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from .storage import RecordLayout
from .types import LocalFeatures

__all__ = ["LOCAL_KINDS", "create_local_extractor", "check_local_params"]

LOCAL_KINDS = ("sift", "cnn")


def _class(kind: str):
    if kind == "sift":
        from .sift import SiftExtractor

        return SiftExtractor
    if kind == "cnn":
        from .cnn import CnnLocalExtractor

        return CnnLocalExtractor
    raise ValueError(f"unknown local features {kind!r}; available: {', '.join(LOCAL_KINDS)}")


def check_local_params(kind: str, params: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming a parameter the extractor of ``kind`` does not take."""
    sig = inspect.signature(_class(kind))
    known = [n for n, p in sig.parameters.items() if n not in ("self", "model") and p.kind is not p.VAR_KEYWORD]
    for key in params:
        if key not in known:
            raise ValueError(f"unknown parameter {key!r} for {kind} local features; available: {', '.join(known)}")


class _WithLayout:
    """An extractor and the record layout of its features."""

    def __init__(self, kind: str, extractor: Any, dim: int, codec: str) -> None:
        self.kind, self.extractor, self.dim, self.codec = kind, extractor, int(dim), codec

    def __call__(self, image: Any, box=None) -> LocalFeatures:
        return self.extractor(image, box)

    @property
    def max_keypoints(self) -> int:
        return int(self.extractor.max_keypoints)

    def layout(self) -> RecordLayout:
        return RecordLayout(self.max_keypoints, self.dim, self.codec, self.kind)

    def __repr__(self) -> str:
        return repr(self.extractor)


def _cnn_dim(extractor: Any) -> int:
    """The descriptor width of a CNN extractor, from one small textured image."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    return extractor(img, None).dim


def create_local_extractor(kind: str, params: dict[str, Any] | None = None, model: Any = None) -> _WithLayout:
    """The extractor of ``kind`` (``sift``: RootSIFT, stored as uint8 codes; ``cnn``: the
    model's own local features, stored as int8 codes) with ``params``; ``cnn`` needs the model."""
    params = dict(params or {})
    check_local_params(kind, params)
    cls = _class(kind)
    if kind == "sift":
        ex = cls(**params)
        return _WithLayout(kind, ex, ex.dim, "u8" if getattr(ex, "root", True) else "i8")
    if model is None:
        raise ValueError("cnn local features come from the retrieval model: pass the model")
    ex = cls(model, **params)
    return _WithLayout(kind, ex, _cnn_dim(ex), "i8")
