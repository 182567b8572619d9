"""The model layer: spec, trunks with multi-level feature maps, pooling, heads, the network,
checkpoints, and the factory that joins them.

Dependencies point one way, and a test keeps them so::

    spec, hub  <-  backbones, pooling  <-  heads  <-  dolg  <-  net  <-  checkpoints  <-  factory

(``heads`` names the DOLG head by its import path and imports it when it is first built.)

Importing this package imports torch but not timm, and does no I/O.
"""

from .backbones import (
    BackbonePreset,
    FeatureLevels,
    WeightsUnavailableError,
    create_backbone,
    create_trunk,
    feature_maps,
    get_preset,
    list_backbones,
)
from .checkpoints import check_weights_fit, file_sha256, load_weights, read_checkpoint, read_weights_file, save_model
from .factory import create_model, create_model_from_spec, load_model
from .dolg import DOLGHead
from .heads import GlobalHead, Head, create_head, head_levels, list_heads
from .net import RetrievalNet
from .pooling import create_pool, list_pools
from .spec import ModelSpec

__all__ = [
    "BackbonePreset",
    "DOLGHead",
    "FeatureLevels",
    "GlobalHead",
    "Head",
    "ModelSpec",
    "RetrievalNet",
    "WeightsUnavailableError",
    "check_weights_fit",
    "create_backbone",
    "create_head",
    "create_model",
    "create_model_from_spec",
    "create_pool",
    "create_trunk",
    "feature_maps",
    "file_sha256",
    "get_preset",
    "head_levels",
    "list_backbones",
    "list_heads",
    "list_pools",
    "load_model",
    "load_weights",
    "read_checkpoint",
    "read_weights_file",
    "save_model",
]
