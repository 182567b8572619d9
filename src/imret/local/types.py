"""The value every local-feature step exchanges: :class:`LocalFeatures`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LocalFeatures", "require_cv2"]


@dataclass(frozen=True)
class LocalFeatures:
    """Local features of one image.

    Attributes:
        keypoints: ``(N, 2)`` float32 ``(x, y)`` positions in pixels of the original image
            (full resolution, before any resizing for extraction; a query box's offset added).
        descriptors: ``(N, D)`` float32 rows, normalised so that the inner product is the
            similarity (RootSIFT: Hellinger kernel; CNN: cosine).
        size: ``(width, height)`` of the original image.
        scores: ``(N,)`` float32 strength of each feature (SIFT response, CNN activation norm /
            attention), or None.
        kind: the extractor's name (``"sift"``, ``"cnn"``), so that features of different kinds
            are never matched against each other.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int]
    scores: np.ndarray | None = None
    kind: str = ""

    def __post_init__(self) -> None:
        kp = np.ascontiguousarray(self.keypoints, dtype=np.float32).reshape(-1, 2)
        d = np.asarray(self.descriptors, dtype=np.float32)
        if d.ndim != 2 or d.shape[0] != kp.shape[0]:
            raise ValueError(f"descriptors must be (N, D) with N = {kp.shape[0]} keypoints, got shape {d.shape}")
        object.__setattr__(self, "keypoints", kp)
        object.__setattr__(self, "descriptors", np.ascontiguousarray(d))
        w, h = (int(v) for v in self.size)
        object.__setattr__(self, "size", (w, h))
        if self.scores is not None:
            s = np.ascontiguousarray(self.scores, dtype=np.float32).ravel()
            if s.shape[0] != kp.shape[0]:
                raise ValueError(f"scores must have one value per keypoint ({kp.shape[0]}), got {s.shape[0]}")
            object.__setattr__(self, "scores", s)

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    @classmethod
    def empty(cls, dim: int, size: tuple[int, int] = (0, 0), kind: str = "") -> "LocalFeatures":
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32), size,
                   np.zeros(0, np.float32), kind)


def require_cv2() -> Any:
    """Import OpenCV, or say how to install it."""
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("local features and geometric verification need OpenCV: "
                          "pip install 'imret[local]' (opencv-python-headless)") from e
    return cv2
