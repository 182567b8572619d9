"""DOLG: deep orthogonal fusion of local and global features (Yang et al., ICCV 2021).

Yang, Hoang, Chen, He, Hu & Liu, "DOLG: Single-Stage Image Retrieval with Deep Orthogonal
Fusion of Local and Global Features", ICCV 2021. One network, one descriptor:

- **local branch** on the stride-16 map ``f3`` (ResNet ``layer3``): a multi-atrous module
  (three dilated 3x3 convolutions, rates 3 / 6 / 9 in the paper, plus an image-pooling branch,
  concatenated and projected by a 1x1 convolution + ReLU), then DELF-style self-attention:
  ``y = BN(conv1x1(.))``, ``f_l = (y / ||y||_channels) * softplus(conv1x1(ReLU(y)))``;
- **global branch** on the final stride-32 map ``f4``: GeM (learnable p, initial 3), then a
  fully connected layer to the local width: ``f_g``;
- **orthogonal fusion**: at every location the component of ``f_l`` along ``f_g`` is removed,
  ``f_l - (f_g . f_l) f_g / ||f_g||^2``, the result is average-pooled to ``f_orth``, and
  ``[f_g, f_orth]`` goes through a fully connected layer to the descriptor (512-d), L2-normalised.

The paper's ablations are options: ``multi_atrous=False`` (the attention reads ``f3``
directly), ``fusion="concat"`` (pool ``f_l`` as it is) and ``fusion="hadamard"`` (pool
``f_l * f_g``); ``local=False`` drops the local branch and leaves GeM + FC. The official code
(feymanpriv/DOLG) ships its multi-atrous module switched off (``WITH_MA: False``), with rates
6 / 12 / 18 and an extra 1x1 branch (``atrous_rates`` sets the rates; ``atrous_rates=(1, 6,
12, 18)`` is close to it).

Where the paper is silent: the local width (``local_dim``, 1024 on ResNet-50/101, which is
``layer3``'s width) defaults to the stride-16 stage's channels but at least 512, so that thin
trunks (MobileNetV2: 96) keep room for the global vector; each atrous branch has half of it.
The fusion, pooling and normalisations run in float32 under autocast.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import Head, whitening_layer
from .pooling import create_pool

__all__ = ["FUSIONS", "orthogonal_fusion", "MultiAtrous", "LocalAttention", "DOLGHead"]

FUSIONS = ("orthogonal", "concat", "hadamard")
_MIN_LOCAL_DIM = 512


def orthogonal_fusion(local: torch.Tensor, glob: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The component of each local feature orthogonal to the global vector.

    ``local`` ``(B, C, h, w)``, ``glob`` ``(B, C)`` -> ``(B, C, h, w)``:
    ``f_l - (f_g . f_l) f_g / ||f_g||^2`` at every location (in float32 at least). A zero
    global vector leaves ``local`` unchanged (nothing to project on).
    """
    if local.dim() != 4 or glob.dim() != 2 or local.shape[:2] != glob.shape:
        raise ValueError(f"local must be (B, C, h, w) and glob (B, C), got {tuple(local.shape)} and {tuple(glob.shape)}")
    dtype = torch.promote_types(torch.promote_types(local.dtype, glob.dtype), torch.float32)
    fl, fg = local.to(dtype), glob.to(dtype)
    dot = torch.einsum("bchw,bc->bhw", fl, fg)
    coef = dot / (fg * fg).sum(dim=1).clamp_min(eps)[:, None, None]
    return fl - coef[:, None] * fg[:, :, None, None]


class MultiAtrous(nn.Module):
    """Dilated 3x3 convolutions at ``rates`` and an image-pooling branch, concatenated, 1x1 conv + ReLU.

    ``(B, C_in, h, w) -> (B, out_channels, h, w)`` for any ``h, w`` (padding = rate). A rate
    of 1 is a plain 1x1 convolution branch (the official code's ASPP has one).
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (3, 6, 9),
                 branch_channels: int | None = None) -> None:
        super().__init__()
        rates = tuple(int(r) for r in rates)
        if not rates or any(r < 1 for r in rates):
            raise ValueError(f"atrous rates must be integers >= 1, got {rates}")
        b = int(branch_channels or max(1, out_channels // 2))
        self.rates = rates
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, b, 1) if r == 1 else nn.Conv2d(in_channels, b, 3, padding=r, dilation=r)
            for r in rates
        )
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, b, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(b * (len(rates) + 1), out_channels, 1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = self.image_pool(x).expand(-1, -1, h, w)  # bilinear upsampling of a 1x1 map is a copy
        return self.project(torch.cat([pooled] + [conv(x) for conv in self.branches], dim=1))

    def extra_repr(self) -> str:
        return f"rates={self.rates}"


class LocalAttention(nn.Module):
    """DELF-style self-attention: ``y = BN(conv1x1(x))``; returns ``(y / ||y|| * a, a)`` with
    ``a = softplus(conv1x1(ReLU(y)))`` ``(B, 1, h, w)``, the non-negative attention."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.score = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(self.conv(x))
        att = F.softplus(self.score(F.relu(y)))
        return F.normalize(y.float(), dim=1) * att.float(), att


class DOLGHead(Head):
    """DOLG on two trunk levels: the local map (``local_level``, default the stride-16 stage) and
    the final map. ``[(B, C3, h3, w3), (B, C4, h4, w4)] -> (B, dim)`` L2-normalised.

    Args:
        channels: channels of the maps (local, final), or of the final map alone with ``local=False``.
        pool, pool_kwargs: the global branch's pooling (default GeM, p learnable from 3).
        whitening, l2_before_whiten: an optional whitening layer after the output layer
            (for a whitening learned afterwards; see :meth:`set_whitening`).
        dim: descriptor dimension (the output FC), 512 as in the paper.
        local_dim: width of the local branch and of ``f_g`` (default: the local map's
            channels, at least 512).
        multi_atrous: use the multi-atrous module (else the attention reads the map directly).
        atrous_rates: dilation rates of the multi-atrous module.
        fusion: ``"orthogonal"`` (DOLG), ``"concat"`` or ``"hadamard"`` (the paper's ablations).
        local: False drops the local branch: GeM -> FC -> L2 on the final map.
        local_level: trunk stage of the local branch (default -2, the stage before the last).
    """

    levels = (-2, -1)

    @classmethod
    def levels_for(cls, *, local: bool = True, local_level: int = -2, **kwargs: Any) -> tuple[int, ...]:
        return (int(local_level), -1) if local else (-1,)

    def __init__(
        self,
        channels: Sequence[int] | int,
        *,
        pool: str = "gem",
        pool_kwargs: dict[str, Any] | None = None,
        whitening: int | None = None,
        l2_before_whiten: bool = True,
        dim: int = 512,
        local_dim: int | None = None,
        multi_atrous: bool = True,
        atrous_rates: Sequence[int] = (3, 6, 9),
        fusion: str = "orthogonal",
        local: bool = True,
        local_level: int = -2,
    ) -> None:
        super().__init__()
        chans = [int(channels)] if isinstance(channels, int) else [int(c) for c in channels]
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; available: {', '.join(FUSIONS)}")
        for name, v in (("dim", dim), ("local_dim", local_dim)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.local = bool(local)
        self.levels = self.levels_for(local=self.local, local_level=local_level)
        if len(chans) != len(self.levels):
            raise ValueError(f"DOLG head (local={self.local}) reads {len(self.levels)} maps, got channels {chans}")
        c_final = chans[-1]
        self.in_channels = tuple(chans)
        self.fusion = fusion
        self.multi_atrous = bool(multi_atrous) and self.local
        self.pool = create_pool(pool, channels=c_final, **dict(pool_kwargs or {}))
        if self.local:
            c_local = chans[0]
            width = int(local_dim) if local_dim is not None else max(c_local, _MIN_LOCAL_DIM)
            self.local_dim = width
            self.atrous = MultiAtrous(c_local, width, atrous_rates) if self.multi_atrous else None
            self.attention = LocalAttention(width if self.multi_atrous else c_local, width)
            self.fc_global = nn.Linear(c_final, width)
            self.fc = nn.Linear(2 * width, int(dim))
        else:
            self.local_dim = 0
            self.atrous = None
            self.attention = None
            self.fc_global = None
            self.fc = nn.Linear(c_final, int(dim))
        self.whiten: nn.Linear | None = None
        if whitening is not None:
            if isinstance(whitening, bool) or not isinstance(whitening, int) or whitening < 1:
                raise ValueError(f"whitening dimension must be an integer >= 1 or None, got {whitening!r}")
            layer = nn.Linear(int(dim), whitening, bias=True)
            with torch.no_grad():
                layer.weight.copy_(torch.eye(whitening, int(dim)))
                layer.bias.zero_()
            self.whiten = layer
        self.l2_before_whiten = bool(l2_before_whiten)

    @property
    def dim(self) -> int:
        return self.whiten.out_features if self.whiten is not None else self.fc.out_features

    def global_vector(self, final: torch.Tensor) -> torch.Tensor:
        """``(B, C4, h, w) -> (B, local_dim)``: ``f_g`` (pooled, projected), float32."""
        v = self.pool(final).float()
        return self.fc_global(v).float() if self.fc_global is not None else v

    def local_map(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C3, h, w) -> (f_l (B, local_dim, h, w) float32, attention (B, 1, h, w))``."""
        if self.attention is None:
            raise TypeError("this DOLG head was built with local=False: it has no local branch")
        x = self.atrous(fmap) if self.atrous is not None else fmap
        return self.attention(x)

    def fused(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The vector before the output FC: ``[f_g, f_orth]`` ``(B, 2 local_dim)`` (or GeM without the local branch)."""
        if not self.local:
            return self.pool(features[-1]).float()
        fmap, final = features[0], features[-1]
        fg = self.global_vector(final)
        fl, _ = self.local_map(fmap)
        if self.fusion == "orthogonal":
            part = orthogonal_fusion(fl, fg)
        elif self.fusion == "hadamard":
            part = fl * fg[:, :, None, None]
        else:
            part = fl
        return torch.cat([fg, part.mean(dim=(2, 3))], dim=1)

    def forward(self, features: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        feats = [features] if isinstance(features, torch.Tensor) else list(features)
        if len(feats) != len(self.levels):
            raise ValueError(f"DOLG head reads {len(self.levels)} maps (levels {self.levels}), got {len(feats)}")
        v = self.fc(self.fused(feats)).float()
        if self.whiten is not None:
            if self.l2_before_whiten:
                v = F.normalize(v, dim=1)
            v = self.whiten(v).float()
        return F.normalize(v, dim=1)

    def multiscale_power(self) -> float:
        """1: DOLG's descriptors are averaged over scales (the official test code does)."""
        return 1.0

    def set_whitening(
        self, projection: torch.Tensor, mean: torch.Tensor | None = None, *, device: torch.device | None = None
    ) -> None:
        """Set the whitening layer after the output FC to ``y = P (x - m)``."""
        self.whiten = whitening_layer(projection, mean, self.fc.out_features, device=device)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, dim={self.dim}, local={self.local}, local_dim={self.local_dim}, "
                f"multi_atrous={self.multi_atrous}, fusion={self.fusion!r}")
