"""Loading and saving weights: local files, imret checkpoints, cirtorch and dirtorch imports.

Formats understood by :func:`load_weights` and :func:`load_model`:

- **safetensors** or a **torch state dict** file, holding either the backbone alone (timm
  key names, e.g. ``conv1.weight``; the backbone's classifier keys are dropped) or the
  whole :class:`~imret.model.RetrievalNet` (``trunk.*``, ``pool.*``, ``whiten.*``).
  Loaded strictly: a missing or unexpected key is an error.
- **imret checkpoints** (:func:`save_model`): weights plus the full :class:`ModelSpec`, so the
  file alone rebuilds the model with its preprocessing. ``.pt`` (a dict loadable with
  ``weights_only=True``) or ``.safetensors`` (the spec in the metadata).
- **cnnimageretrieval-pytorch** (cirtorch) checkpoints: ``{"meta": ..., "state_dict": ...}``
  with ``features.*``, ``pool.p``, ``whiten.*`` keys (ResNet and VGG trunks).
- **deep-image-retrieval** (dirtorch) checkpoints: ``{"model_options": ..., "state_dict": ...}``
  of its ResNet-GeM/R-MAC nets (``conv1.*``, ``layer*``, ``adpool.p``, ``fc.*``).

Every torch file is read with ``torch.load(weights_only=True)``: nothing is unpickled
beyond tensors and plain containers unless the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any

import torch

from .fileio import atomic_path
from .model import ModelSpec, RetrievalNet, create_model_from_spec

__all__ = ["read_weights_file", "load_weights", "load_model", "save_model", "convert_cirtorch", "convert_dirtorch"]

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


def _load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
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
    trunk (its classifier keys, if any, are dropped). cirtorch/dirtorch checkpoints are
    converted. Returns ``model``.
    """
    content, meta = read_weights_file(path, trust_pickle=trust_pickle)
    what = f"loading {os.fspath(path)!r}"
    kind, spec, sd = _interpret(content, meta, path)
    if kind == "backbone":
        sd = _strip_prefix(_strip_prefix(sd, "module."), "model.")
        drop = tuple(_classifier_prefixes(model.trunk))
        trunk_keys = set(model.trunk.state_dict())
        sd = {k: v for k, v in sd.items() if k in trunk_keys or not (drop and k.startswith(drop))}
        _load_strict(model.trunk, sd, what + " (backbone weights)")
    else:
        _load_strict(model, sd, what)
    return model


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
    if sd and all(k.split(".")[0] in ("trunk", "pool", "whiten") for k in sd):
        return "model", None, sd
    return "backbone", None, sd


def load_model(path: str | os.PathLike, *, trust_pickle: bool = False, device: str | torch.device = "cpu") -> RetrievalNet:
    """Rebuild a model from a checkpoint that carries its spec (imret, cirtorch or dirtorch).

    Returns the model in eval mode on ``device``.
    """
    content, meta = read_weights_file(path, trust_pickle=trust_pickle)
    kind, spec, sd = _interpret(content, meta, path)
    if spec is None:
        raise ValueError(
            f"{os.fspath(path)!r} holds weights without a model spec; build the model with "
            "create_model(backbone, pool, weights=PATH) (CLI: --model BACKBONE --weights PATH)"
        )
    model = create_model_from_spec(spec)
    _load_strict(model, sd, f"loading {os.fspath(path)!r}")
    return model.to(device).eval()


def save_model(model: RetrievalNet, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> None:
    """Write an imret checkpoint: weights + spec (+ preprocessing). ``.safetensors`` or torch format.

    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    path = os.fspath(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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
    )
    return spec, out
