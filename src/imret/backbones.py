"""CNN trunks from timm: the unpooled feature map of any timm CNN, plus named presets.

A preset fixes the timm model name, the constructor arguments and the preprocessing that
go with a set of weights (for example the TF-ported MobileNets need ``pad_type="same"`` and
mean = std = 128/255). Any other timm model name is accepted as is, with timm's own
preprocessing for it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["BackbonePreset", "list_backbones", "get_preset", "create_trunk", "trunk_channels", "WeightsUnavailableError"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (128 / 255, 128 / 255, 128 / 255)
TF_STD = (128 / 255, 128 / 255, 128 / 255)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded and are not in the local cache."""


@dataclass(frozen=True)
class BackbonePreset:
    """A named trunk: timm model, constructor arguments and the preprocessing of its weights."""

    name: str
    timm_name: str
    create_kwargs: dict = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    downloadable: bool = True  # pretrained weights exist on the hub for timm to fetch
    note: str = ""


_PRESETS: dict[str, BackbonePreset] = {}


def _add(p: BackbonePreset) -> None:
    _PRESETS[p.name] = p


for _depth in (18, 34, 50, 101, 152):
    _add(BackbonePreset(f"resnet{_depth}", f"resnet{_depth}.tv_in1k", note="torchvision ImageNet weights, as cirtorch uses"))
_add(BackbonePreset("resnet50.a1", "resnet50.a1_in1k", note="timm's 'ResNet strikes back' A1 weights"))
_add(BackbonePreset("resnext101_32x8d", "resnext101_32x8d.tv_in1k"))
_add(BackbonePreset("vgg16", "vgg16.tv_in1k", note="torchvision VGG16, conv5_3 + ReLU features"))
_add(BackbonePreset("efficientnet_b0", "efficientnet_b0.ra_in1k"))
_add(BackbonePreset("efficientnet_b3", "efficientnet_b3.ra2_in1k"))
_add(BackbonePreset("convnext_tiny", "convnext_tiny.fb_in1k"))
_add(BackbonePreset("mobilenetv2_100", "mobilenetv2_100.ra_in1k"))
_add(
    BackbonePreset(
        "mobilenetv2_100.coral",
        "mobilenetv2_100",
        {"pad_type": "same"},
        TF_MEAN,
        TF_STD,
        downloadable=False,
        note="TF-slim ImageNet weights (google-coral test_data); local file only, needs pad_type='same'",
    )
)
_add(
    BackbonePreset(
        "mobilenetv1_100.coral",
        "mobilenetv1_100",
        {"pad_type": "same"},
        TF_MEAN,
        TF_STD,
        downloadable=False,
        note="TF-slim ImageNet weights (google-coral test_data); local file only, needs pad_type='same'",
    )
)


def list_backbones(pattern: str = "*") -> list[str]:
    """Names of the backbone presets matching a shell-style pattern.

    Any timm model name (``timm.list_models()``) is accepted too; presets only fix weights
    and preprocessing that do not follow timm's defaults.
    """
    return sorted(n for n in _PRESETS if fnmatch.fnmatch(n, pattern))


def get_preset(name: str) -> BackbonePreset:
    """The preset for ``name``, or a preset built from timm's own config for any timm model name."""
    if name in _PRESETS:
        return _PRESETS[name]
    import timm

    base = name.split(".")[0]
    if not timm.is_model(base):
        raise ValueError(
            f"unknown backbone {name!r}; presets: {', '.join(list_backbones())}; "
            "or any timm model name (timm.list_models())"
        )
    cfg = timm.models.get_pretrained_cfg(name)
    mean = tuple(getattr(cfg, "mean", IMAGENET_MEAN)) if cfg is not None else IMAGENET_MEAN
    std = tuple(getattr(cfg, "std", IMAGENET_STD)) if cfg is not None else IMAGENET_STD
    return BackbonePreset(name, name, {}, mean, std)


def create_trunk(name: str, pretrained: bool = False, **kwargs) -> tuple[nn.Module, BackbonePreset]:
    """Build the fully convolutional trunk of ``name``: a timm model without classifier or pooling.

    Call ``trunk.forward_features(x)`` for the ``(B, C, H', W')`` feature map. With
    ``pretrained=True`` timm downloads the weights into its cache (Hugging Face hub);
    offline with nothing cached this raises :class:`WeightsUnavailableError` that says how
    to pass a local file instead.
    """
    import timm

    preset = get_preset(name)
    create_kwargs = {**preset.create_kwargs, **kwargs, "num_classes": 0, "global_pool": ""}
    if pretrained and not preset.downloadable:
        raise WeightsUnavailableError(
            f"backbone {name!r} has no downloadable weights ({preset.note}); "
            "build it with pretrained=False and pass a local file: weights=PATH (CLI: --weights PATH)"
        )
    try:
        trunk = timm.create_model(preset.timm_name, pretrained=pretrained, **create_kwargs)
    except TypeError as e:
        raise ValueError(f"bad backbone arguments {kwargs} for {name!r}: {e}") from e
    except Exception as e:
        if not pretrained:
            raise
        raise WeightsUnavailableError(
            f"could not get pretrained weights for backbone {name!r} (timm model {preset.timm_name!r}): "
            f"{type(e).__name__}: {e}. If this machine is offline and the weights are not in the "
            "Hugging Face / torch hub cache, download them elsewhere and pass the file: "
            "create_model(..., pretrained=False, weights='file.safetensors') or the CLI's --weights FILE."
        ) from e
    # timm's pooling-less models keep a head that is Identity; make sure forward_features exists.
    if not hasattr(trunk, "forward_features"):
        raise ValueError(f"timm model {preset.timm_name!r} has no forward_features(); it is not usable as a trunk")
    return trunk, preset


def trunk_channels(trunk: nn.Module) -> int:
    """Channels of the trunk's final feature map, found by a dry run on a small input.

    (timm's ``feature_info`` names the last stage, which misses heads such as MobileNet's
    1x1 ``conv_head``, so it is not used.) Raises ValueError when the output is not a map.
    """
    was_training = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            y = trunk.forward_features(torch.zeros(1, 3, 64, 64))
    except Exception as e:
        raise ValueError(f"backbone {type(trunk).__name__} cannot run on a 64x64 input ({e}): only fully convolutional CNN backbones are supported") from e
    finally:
        trunk.train(was_training)
    if not isinstance(y, torch.Tensor) or y.dim() != 4:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"trunk output is {shape}, not a (B, C, H, W) feature map: only CNN backbones are supported")
    return int(y.shape[1])
