"""Local features and the second stage of retrieval: RootSIFT and CNN local features,
descriptor matching, geometric verification (RANSAC), object localisation by approximate
integral max-pooling, and compact records of local features for the store.

Data flow (one way)::

    image -> extractor (sift.py, cnn.py) -> LocalFeatures -> storage.py (the store's records)
          -> matching.py -> verification.py (GeometricVerifier re-ranker)
    feature map -> localization.py (box, regional descriptor; LocalizationReranker)

Everything here is CPU-first and works on ``numpy`` arrays; OpenCV (``opencv-python-headless``,
the ``local`` extra) is imported only when SIFT or RANSAC runs. Importing this package does no
I/O and imports neither OpenCV nor timm; the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .types import LocalFeatures, require_cv2

_LAZY = {
    "SiftExtractor": "sift", "rootsift": "sift",
    "CnnLocalExtractor": "cnn",
    "match_descriptors": "matching",
    "Verification": "verification", "estimate_transform": "verification", "verify_pair": "verification",
    "GeometricVerifier": "verification",
    "localize": "localization", "compute_maps": "localization", "LocalizationReranker": "localization",
    "RecordLayout": "storage",
    "create_local_extractor": "extractors",
}

__all__ = ["LocalFeatures", "require_cv2", *_LAZY]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
