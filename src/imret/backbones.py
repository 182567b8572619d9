"""Former home of the CNN trunks and presets; kept so that ``imret.backbones`` imports keep working.

Everything here lives in :mod:`imret.models.backbones`; new code imports from there.
"""

from .models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TF_BN_EPS,
    TF_INCEPTION_MEAN,
    TF_INCEPTION_STD,
    TF_MEAN,
    TF_STD,
    BackbonePreset,
    PackagedWeights,
    WeightsUnavailableError,
    create_trunk,
    find_package_weights,
    get_preset,
    list_backbones,
    preset_for_weights,
    pretrained_weights_file,
    trunk_channels,
    trunk_signature,
)

__all__ = [
    "BackbonePreset",
    "PackagedWeights",
    "list_backbones",
    "get_preset",
    "create_trunk",
    "trunk_channels",
    "find_package_weights",
    "preset_for_weights",
    "pretrained_weights_file",
    "trunk_signature",
    "WeightsUnavailableError",
]
