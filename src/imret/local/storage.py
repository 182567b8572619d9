"""Fixed-size records of local features, for the store's rows files.

One image's :class:`~imret.local.types.LocalFeatures` become one record of ``nbytes`` bytes
(a multiple of 4, so that the store keeps them in a rows file like its descriptors, with the
same append-then-commit crash safety and per-row CRC32)::

    uint32 count, uint32 width, uint32 height, uint32 reserved
    max_keypoints x (uint16 x, uint16 y)      positions as fractions of the image size (1/65535)
    max_keypoints x dim codes                 uint8 ("u8": v * 255, for non-negative
                                              descriptors such as RootSIFT) or int8 ("i8":
                                              v * 127, for signed ones such as CNN features)
    zero padding to a multiple of 4

Positions keep 1/65535 of the side (0.06 px on a 4000 px photo); descriptors are re-normalised
to unit L2 norm when read (a cosine error below 1e-3 for RootSIFT and CNN features). A record
of SIFT with 1000 keypoints is 132,016 bytes; keypoints past ``max_keypoints`` are dropped
(the extractors already keep the strongest first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .types import LocalFeatures

__all__ = ["CODECS", "RecordLayout"]

CODECS = {"u8": (np.uint8, 255.0, 0.0, 1.0), "i8": (np.int8, 127.0, -1.0, 1.0)}
_HEADER = 16


@dataclass(frozen=True)
class RecordLayout:
    """How many keypoints of which dimension a record holds, and how descriptors are coded."""

    max_keypoints: int
    dim: int
    codec: str = "u8"
    kind: str = ""

    def __post_init__(self) -> None:
        for name in ("max_keypoints", "dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 1_000_000:
                raise ValueError(f"{name} must be an integer in [1, 1000000], got {v!r}")
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; available: {', '.join(CODECS)}")

    @property
    def nbytes(self) -> int:
        raw = _HEADER + self.max_keypoints * (4 + self.dim)
        return (raw + 3) // 4 * 4

    @property
    def width(self) -> int:
        """The record's size in float32 units (the store's rows files count in those)."""
        return self.nbytes // 4

    def to_dict(self) -> dict:
        return {"max_keypoints": int(self.max_keypoints), "dim": int(self.dim), "codec": self.codec, "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict) -> "RecordLayout":
        if not isinstance(d, dict) or set(d) != {"max_keypoints", "dim", "codec", "kind"}:
            raise ValueError(f"a record layout has keys max_keypoints, dim, codec, kind; got {d!r}")
        if not isinstance(d["kind"], str):
            raise ValueError(f"record layout kind must be a string, got {d['kind']!r}")
        return cls(d["max_keypoints"], d["dim"], d["codec"], d["kind"])

    # -- packing --------------------------------------------------------------------------

    def pack(self, feats: LocalFeatures | None) -> np.ndarray:
        """One record as a ``(nbytes,)`` uint8 array (``None``: an empty record, for an image
        whose features could not be computed)."""
        rec = np.zeros(self.nbytes, np.uint8)
        if feats is None:
            return rec
        if feats.dim != self.dim:
            raise ValueError(f"features of dimension {feats.dim} do not fit records of dimension {self.dim}")
        n = min(len(feats), self.max_keypoints)
        w, h = feats.size
        if n and (w < 1 or h < 1):
            raise ValueError(f"features need the image size to be stored, got {feats.size}")
        rec[:_HEADER].view(np.uint32)[:] = (n, w, h, 0)
        k = self.max_keypoints
        if n:
            rel = feats.keypoints[:n] / np.array([max(w, 1), max(h, 1)], np.float32)
            pos = np.round(np.clip(rel, 0.0, 1.0) * 65535.0).astype(np.uint16)
            rec[_HEADER:_HEADER + 4 * n] = pos.reshape(-1).view(np.uint8)
            dtype, scale, lo, hi = CODECS[self.codec]
            codes = np.round(np.clip(feats.descriptors[:n], lo, hi) * scale).astype(dtype)
            start = _HEADER + 4 * k
            rec[start:start + n * self.dim] = codes.reshape(-1).view(np.uint8)
        return rec

    def pack_many(self, feats: "list[LocalFeatures | None]") -> np.ndarray:
        """Records of several images as ``(N, width)`` float32 rows (bytes viewed as float32:
        the form the store writes)."""
        out = np.zeros((len(feats), self.nbytes), np.uint8)
        for i, f in enumerate(feats):
            out[i] = self.pack(f)
        return out.view(np.float32)

    def unpack(self, rec: np.ndarray) -> LocalFeatures | None:
        """The features of one record (bytes, or its float32 view); ``None`` for an empty
        record. Counts or sizes out of range raise ``ValueError`` (a damaged record)."""
        b = np.ascontiguousarray(rec).view(np.uint8).reshape(-1)
        if b.size != self.nbytes:
            raise ValueError(f"a record of this layout has {self.nbytes} bytes, got {b.size}")
        n, w, h, _ = (int(v) for v in b[:_HEADER].view(np.uint32))
        if n > self.max_keypoints or (n and not (1 <= w <= 1 << 20 and 1 <= h <= 1 << 20)):
            raise ValueError(f"damaged local-feature record: {n} keypoints (at most {self.max_keypoints}), size {w}x{h}")
        if n == 0:
            return None if w == 0 else LocalFeatures.empty(self.dim, (w, h), self.kind)
        pos = b[_HEADER:_HEADER + 4 * n].view(np.uint16).reshape(n, 2).astype(np.float32) / 65535.0
        kp = pos * np.array([w, h], np.float32)
        dtype, scale, _, _ = CODECS[self.codec]
        start = _HEADER + 4 * self.max_keypoints
        d = b[start:start + n * self.dim].view(dtype).reshape(n, self.dim).astype(np.float32) / scale
        norms = np.linalg.norm(d, axis=1, keepdims=True)
        d = d / np.maximum(norms, 1e-12)
        return LocalFeatures(kp, d, (w, h), None, self.kind)
