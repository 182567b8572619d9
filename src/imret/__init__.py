"""imret: instance-level image retrieval.

Importing imret does no I/O and sets no global state; timm and the optional backends are
imported when first used.
"""

from .extract import Extraction, extract, extract_descriptors
from .images import ImageError
from .index.store import Hit, Preprocessing, SearchHits, SearchResults, Store
from .models import (
    ModelSpec,
    RetrievalNet,
    WeightsUnavailableError,
    create_model,
    create_model_from_spec,
    create_pool,
    list_backbones,
    list_heads,
    list_pools,
    load_model,
    load_weights,
    save_model,
)

__version__ = "0.1.0"

__all__ = [
    "Store",
    "Preprocessing",
    "Hit",
    "SearchHits",
    "SearchResults",
    "Extraction",
    "ImageError",
    "extract",
    "extract_descriptors",
    "ModelSpec",
    "RetrievalNet",
    "WeightsUnavailableError",
    "create_model",
    "create_model_from_spec",
    "create_pool",
    "list_backbones",
    "list_heads",
    "list_pools",
    "load_model",
    "load_weights",
    "save_model",
]
