"""Heads: feature maps of the trunk -> one L2-normalised descriptor per image.

Every head is a :class:`Head`: it names the trunk stages it reads (``levels``, timm stage
indices, negative from the end), is built from the channels of those maps, and maps
``[(B, C_i, h_i, w_i)]`` to ``(B, D)``. The network (:class:`~imret.models.net.RetrievalNet`)
asks the head for its levels before it builds the trunk, so a head class must say them
without being built (:meth:`Head.levels_for`).

- ``"global"``, :class:`GlobalHead`: pooling -> L2 -> [whitening -> L2] on the last map; the
  GeM network of Radenović et al. (TPAMI 2018) and, with R-MAC and whitening, the R-MAC
  network of Gordo et al. (IJCV 2017).
- ``"dolg"``, :class:`~imret.models.dolg.DOLGHead` (Yang et al., ICCV 2021): ``levels =
  (-2, -1)``, a local branch (multi-atrous convolutions + self-attention) on the stride-16
  map, GeM + FC on the final map, orthogonal fusion of the two, pooling and an output FC.

A head defined in another module (which imports :class:`Head` from here) is registered by
its import path, ``"module:Class"``, and imported when first built.
"""

from __future__ import annotations

import fnmatch
import importlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .pooling import GeM, create_pool

__all__ = ["Head", "GlobalHead", "whitening_layer", "create_head", "list_heads", "head_levels", "head_descriptions"]


class Head(nn.Module):
    """Base of the heads: ``forward(features) -> (B, D)`` L2-normalised descriptors.

    Subclasses set ``levels`` (or override :meth:`levels_for` when their arguments decide
    it), implement :attr:`dim` and :meth:`forward`, and take the channels of their maps as
    the first constructor argument followed by the keyword arguments of :func:`create_head`.
    """

    levels: tuple[int, ...] = (-1,)

    @classmethod
    def levels_for(cls, **kwargs: Any) -> tuple[int, ...]:
        """The trunk stages a head built with ``kwargs`` reads (default: the class's ``levels``)."""
        return tuple(cls.levels)

    @property
    def dim(self) -> int:
        """Descriptor dimension D."""
        raise NotImplementedError

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[(B, C_i, h_i, w_i)]`` (one map per level, in ``levels`` order) -> ``(B, D)``."""
        raise NotImplementedError

    def multiscale_power(self) -> float:
        """Exponent for averaging this head's descriptors over image scales (1: arithmetic mean)."""
        return 1.0

    def set_whitening(
        self, projection: torch.Tensor, mean: torch.Tensor | None = None, *, device: torch.device | None = None
    ) -> None:
        """Fold a whitening ``y = P (x - m)`` into the head (heads with a whitening layer only)."""
        raise TypeError(f"{type(self).__name__} has no whitening layer to fold a whitening into")


def whitening_layer(projection: torch.Tensor, mean: torch.Tensor | None, in_features: int, *,
                    device: torch.device | None = None) -> nn.Linear:
    """``y = P (x - m)`` as a linear layer: weight = P ``(D_out, in_features)``, bias = -P m (m = 0 when None)."""
    P = torch.as_tensor(projection, dtype=torch.float32)
    if P.dim() != 2 or P.shape[1] != in_features:
        raise ValueError(f"whitening projection must be (D_out, {in_features}), got {tuple(P.shape)}")
    m = torch.zeros(in_features) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    layer = nn.Linear(in_features, P.shape[0], bias=True)
    with torch.no_grad():
        layer.weight.copy_(P)
        layer.bias.copy_(-(P @ m))
    return layer.to(device) if device is not None else layer


class GlobalHead(Head):
    """Pooling -> L2 -> [whitening (linear + bias) -> L2] on the last feature map.

    ``(B, C, h, w) -> (B, D)`` with ``D = whitening or C``. The whitening layer starts as the
    (truncated) identity. With ``l2_before_whiten`` the pooled vector is normalised before
    the whitening layer (cirtorch's convention; dirtorch's nets do not). Pooling and
    normalisation run in float32 under autocast.
    """

    levels = (-1,)

    def __init__(
        self,
        channels: Sequence[int] | int,
        *,
        pool: str = "gem",
        pool_kwargs: dict[str, Any] | None = None,
        whitening: int | None = None,
        l2_before_whiten: bool = True,
    ) -> None:
        super().__init__()
        c = int(channels) if isinstance(channels, int) else int(list(channels)[-1])
        self.in_channels = c
        self.pool = create_pool(pool, channels=c, **dict(pool_kwargs or {}))
        self.whiten: nn.Linear | None = None
        if whitening is not None:
            if whitening < 1:
                raise ValueError(f"whitening dimension must be >= 1 or None, got {whitening}")
            layer = nn.Linear(c, whitening, bias=True)
            with torch.no_grad():  # start as the identity (truncated), not a random projection
                layer.weight.copy_(torch.eye(whitening, c))
                layer.bias.zero_()
            self.whiten = layer
        self.l2_before_whiten = bool(l2_before_whiten)

    @property
    def dim(self) -> int:
        return self.whiten.out_features if self.whiten is not None else self.in_channels

    def forward(self, features: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """``[..., (B, C, h, w)] -> (B, D)``: the last map (or a bare map), pooled, normalised,
        whitened, normalised."""
        fmap = features if isinstance(features, torch.Tensor) else features[-1]
        return self.describe_pooled(self.pool(fmap))

    def describe_pooled(self, v: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` pooled vectors -> ``(B, D)`` descriptors: the steps after the pooling
        (normalised, whitened, normalised). Test-time pooling variants
        (:mod:`imret.refinement`) pool the map themselves and finish here."""
        if v.dtype in (torch.float16, torch.bfloat16):
            v = v.float()  # normalise in float32 under autocast
        if self.whiten is not None:
            if self.l2_before_whiten:
                v = F.normalize(v, dim=1)
            v = self.whiten(v)
        return F.normalize(v, dim=1)

    def multiscale_power(self) -> float:
        """The learned p of a scalar-p GeM without whitening (GeM power mean over scales,
        Radenović et al.); 1 otherwise (whitened descriptors can be negative)."""
        if isinstance(self.pool, GeM) and self.whiten is None and self.pool.p.numel() == 1:
            return float(self.pool.p.detach().item())
        return 1.0

    def set_whitening(
        self, projection: torch.Tensor, mean: torch.Tensor | None = None, *, device: torch.device | None = None
    ) -> None:
        """Set the whitening layer to ``y = P (x - m)``: weight = P ``(D_out, C)``, bias = -P m.

        Creates or replaces the layer, on ``device`` (default: the CPU).
        """
        self.whiten = whitening_layer(projection, mean, self.in_channels, device=device)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, dim={self.dim}, l2_before_whiten={self.l2_before_whiten}"


_HEADS: dict[str, tuple[type[Head] | str, str]] = {
    "global": (GlobalHead, "pooling -> L2 -> [whitening -> L2] on the last feature map (GeM / R-MAC networks)"),
    "dolg": ("imret.models.dolg:DOLGHead",
             "local (stride 16, multi-atrous + attention) and global (GeM + FC) branches, orthogonal fusion, FC; "
             "Yang et al., ICCV 2021"),
}


def list_heads(pattern: str = "*") -> list[str]:
    """Names of the registered heads matching a shell-style ``pattern``."""
    return sorted(n for n in _HEADS if fnmatch.fnmatch(n, pattern))


def head_descriptions() -> dict[str, str]:
    """Name -> one-line description of every registered head."""
    return {n: d for n, (_, d) in sorted(_HEADS.items())}


def _head_class(name: str) -> type[Head]:
    key = str(name).lower()
    if key not in _HEADS:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(list_heads())}")
    cls = _HEADS[key][0]
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = getattr(importlib.import_module(module), attr)
    return cls


def head_levels(name: str, **kwargs: Any) -> tuple[int, ...]:
    """The trunk stages head ``name`` built with ``kwargs`` reads, e.g. ``(-1,)``."""
    return _head_class(name).levels_for(**kwargs)


def create_head(
    name: str,
    channels: Sequence[int] | int,
    *,
    pool: str = "gem",
    pool_kwargs: dict[str, Any] | None = None,
    whitening: int | None = None,
    l2_before_whiten: bool = True,
    **kwargs: Any,
) -> Head:
    """Build head ``name`` (see :func:`list_heads`) for maps with ``channels`` (one per level).

    ``pool``, ``pool_kwargs``, ``whitening`` and ``l2_before_whiten`` are the settings every
    head takes (a :class:`~imret.models.spec.ModelSpec` holds them); ``kwargs`` are the
    head's own (``ModelSpec.head_kwargs``).
    """
    cls = _head_class(name)
    try:
        return cls(channels, pool=pool, pool_kwargs=pool_kwargs, whitening=whitening,
                       l2_before_whiten=l2_before_whiten, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments {kwargs} for head {name!r}: {e}") from e
