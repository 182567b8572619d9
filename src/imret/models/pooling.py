"""Global pooling of a CNN feature map into one descriptor per image.

Every function takes a feature map ``x`` of shape ``(B, C, H, W)`` and returns
``(B, C)``; none of them L2-normalises its output (the model does).

- MAC: maximum activation of convolutions (Tolias et al., ICLR 2016; Azizpour et al.).
- SPoC: sum-pooled (here: average-pooled) convolutions (Babenko & Lempitsky, ICCV 2015).
- GeM: generalised mean, ``(mean x^p)^(1/p)`` (Radenović et al., TPAMI 2018); p = 1 is
  SPoC, p -> inf is MAC.
- R-MAC: L2-normalised MACs of a multi-scale grid of square regions, summed
  (Tolias et al., ICLR 2016; Gordo et al., IJCV 2017).
- Regional GeM: the same grid with GeM in each region.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "mac",
    "spoc",
    "gem",
    "rmac_regions",
    "regional_pool",
    "rmac",
    "rgem",
    "MAC",
    "SPoC",
    "GeM",
    "RMAC",
    "RGeM",
    "create_pool",
    "list_pools",
]

# Candidate numbers of regions along the long side at the coarsest level (Tolias et al.).
_RMAC_STEPS = (2, 3, 4, 5, 6, 7)


def _check_map(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a feature map of shape (B, C, H, W), got shape {tuple(x.shape)}")


def mac(x: torch.Tensor) -> torch.Tensor:
    """Global max pooling: ``(B, C, H, W) -> (B, C)``."""
    _check_map(x)
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling (SPoC): ``(B, C, H, W) -> (B, C)``."""
    _check_map(x)
    return x.mean(dim=(-2, -1))


def _p_view(p: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    if isinstance(p, torch.Tensor):
        if p.numel() not in (1, x.shape[1]):
            raise ValueError(f"GeM p must have 1 or C={x.shape[1]} elements, got shape {tuple(p.shape)}")
        return p.reshape(1, -1, 1, 1).to(x.dtype)
    return float(p)


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling: ``(mean_{h,w} max(x, eps)^p)^(1/p)``, ``(B, C, H, W) -> (B, C)``.

    ``p`` is a float, a one-element tensor, or a ``(C,)`` tensor (one exponent per channel).
    Activations are clamped at ``eps`` so that the power is defined (Radenović et al., TPAMI 2018, eq. 3).
    """
    _check_map(x)
    pv = _p_view(p, x)
    y = x.clamp(min=eps).pow(pv).mean(dim=(-2, -1), keepdim=True).pow(1.0 / pv)
    return y.flatten(1)


def _rmac_grid(height: int, width: int, levels: int, overlap: float) -> list[tuple[int, list[int], list[int]]]:
    """Per level: ``(side, tops, lefts)``; the level's regions are all (top, left) pairs."""
    if height < 1 or width < 1:
        raise ValueError(f"feature map must be at least 1x1, got {height}x{width}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    w = min(height, width)
    extra = 0
    if height != width:
        best = None
        for i, s in enumerate(_RMAC_STEPS):
            b = (max(height, width) - w) / (s - 1)
            err = abs((w * w - w * b) / (w * w) - overlap)
            if best is None or err < best:
                best, extra = err, i + 1
    extra_w = extra if width > height else 0
    extra_h = extra if height > width else 0

    grid = []
    for level in range(1, levels + 1):
        side = math.floor(2 * w / (level + 1))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)

        def starts(n: int, length: int) -> list[int]:
            step = 0.0 if n == 1 else (length - side) / (n - 1)
            return [math.floor(half + i * step) - half for i in range(n)]

        grid.append((side, starts(level + extra_h, height), starts(level + extra_w, width)))
    return grid


def rmac_regions(
    height: int, width: int, levels: int = 3, overlap: float = 0.4, include_global: bool = True
) -> list[tuple[int, int, int, int]]:
    """The R-MAC region grid of Tolias et al. (ICLR 2016) on a ``height x width`` feature map.

    Regions are squares. At level ``l = 1..levels`` their side is ``floor(2 w / (l + 1))`` with
    ``w = min(height, width)``; ``l`` regions fit along the short side and ``l + m`` along the
    long side, where the extra count ``m`` (1..6, or 0 for a square map) is chosen so that
    neighbouring coarsest-level regions overlap by as close to ``overlap`` as possible.
    With ``include_global`` the whole map comes first (as cnnimageretrieval-pytorch does).

    Returns ``(top, left, height, width)`` boxes in feature-map cells.
    """
    out = [(0, 0, height, width)] if include_global else []
    for side, tops, lefts in _rmac_grid(height, width, levels, overlap):
        out.extend((t, l, side, side) for t in tops for l in lefts)
    return out


def _window_reduce(x: torch.Tensor, dim: int, starts: list[int], side: int, reduce: str) -> torch.Tensor:
    parts = []
    for s in starts:
        window = x.narrow(dim, s, side)
        parts.append(window.amax(dim=dim) if reduce == "max" else window.mean(dim=dim))
    return torch.stack(parts, dim=dim)


def regional_pool(
    x: torch.Tensor,
    reduce: str = "max",
    p: torch.Tensor | float = 1.0,
    levels: int = 3,
    overlap: float = 0.4,
    include_global: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Sum of L2-normalised regional descriptors over the R-MAC grid, ``(B, C, H, W) -> (B, C)``.

    ``reduce="max"`` gives R-MAC; ``reduce="gem"`` pools each region with GeM of exponent ``p``.
    Regions of one level share their size, so each level is reduced separably
    (rows, then columns) instead of region by region.
    """
    _check_map(x)
    if reduce not in ("max", "gem"):
        raise ValueError(f"unknown regional reduce {reduce!r}; available: 'max', 'gem'")
    height, width = x.shape[-2:]
    grid = _rmac_grid(height, width, levels, overlap)
    pv = _p_view(p, x) if reduce == "gem" else 1.0
    xp = x.clamp(min=eps).pow(pv) if reduce == "gem" else x
    inner = "max" if reduce == "max" else "mean"

    def finish(cells: torch.Tensor) -> torch.Tensor:  # (B, C, nT, nL) statistics -> summed unit vectors
        if reduce == "gem":
            cells = cells.pow(1.0 / pv)
        return F.normalize(cells, dim=1).sum(dim=(-2, -1))

    out = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    if include_global:  # the whole map as one (B, C, 1, 1) cell
        whole = xp.amax(dim=(-2, -1), keepdim=True) if inner == "max" else xp.mean(dim=(-2, -1), keepdim=True)
        out = out + finish(whole)
    for side, tops, lefts in grid:
        rows = _window_reduce(xp, 2, tops, side, inner)  # (B, C, nT, W)
        cells = _window_reduce(rows, 3, lefts, side, inner)  # (B, C, nT, nL)
        out = out + finish(cells)
    return out


def rmac(x: torch.Tensor, levels: int = 3, overlap: float = 0.4, include_global: bool = True) -> torch.Tensor:
    """R-MAC: sum of L2-normalised region MACs (Tolias et al., ICLR 2016), ``(B, C, H, W) -> (B, C)``."""
    return regional_pool(x, "max", levels=levels, overlap=overlap, include_global=include_global)


def rgem(
    x: torch.Tensor,
    p: torch.Tensor | float = 3.0,
    levels: int = 3,
    overlap: float = 0.4,
    include_global: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Regional GeM: sum of L2-normalised region GeMs on the R-MAC grid, ``(B, C, H, W) -> (B, C)``."""
    return regional_pool(x, "gem", p, levels, overlap, include_global, eps)


class MAC(nn.Module):
    """Global max pooling, ``(B, C, H, W) -> (B, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mac(x)


class SPoC(nn.Module):
    """Global average pooling, ``(B, C, H, W) -> (B, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spoc(x)


class _PowerMixin(nn.Module):
    """Holds the GeM exponent: a parameter when learnable, else a buffer; one or C values."""

    def _init_p(self, p: float, learn_p: bool, per_channel: bool, channels: int | None) -> None:
        if p <= 0:
            raise ValueError(f"GeM p must be > 0, got {p}")
        if per_channel and not channels:
            raise ValueError("per_channel=True needs the number of channels (channels=C)")
        n = channels if per_channel else 1
        value = torch.full((n,), float(p))
        if learn_p:
            self.p = nn.Parameter(value)
        else:
            self.register_buffer("p", value)
        self.learn_p = learn_p
        self.per_channel = per_channel


class GeM(_PowerMixin):
    """GeM pooling with exponent ``p`` (learnable by default; one value, or one per channel).

    ``(B, C, H, W) -> (B, C)``. Radenović, Tolias, Chum, TPAMI 2018. The default p = 3 is the
    paper's initialisation.
    """

    def __init__(
        self,
        p: float = 3.0,
        learn_p: bool = True,
        per_channel: bool = False,
        channels: int | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self._init_p(p, learn_p, per_channel, channels)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        p = self.p.detach()
        shown = f"{p.item():.4f}" if p.numel() == 1 else f"per-channel (mean {p.mean().item():.4f})"
        return f"p={shown}, learn_p={self.learn_p}, eps={self.eps}"


class RMAC(nn.Module):
    """R-MAC pooling (regions at ``levels`` scales with ~``overlap`` overlap), ``(B, C, H, W) -> (B, C)``."""

    def __init__(self, levels: int = 3, overlap: float = 0.4, include_global: bool = True) -> None:
        super().__init__()
        rmac_regions(8, 12, levels, overlap)  # validate arguments early
        self.levels, self.overlap, self.include_global = levels, overlap, include_global

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmac(x, self.levels, self.overlap, self.include_global)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, overlap={self.overlap}, include_global={self.include_global}"


class RGeM(_PowerMixin):
    """Regional GeM over the R-MAC grid, ``(B, C, H, W) -> (B, C)``."""

    def __init__(
        self,
        p: float = 3.0,
        learn_p: bool = True,
        per_channel: bool = False,
        channels: int | None = None,
        levels: int = 3,
        overlap: float = 0.4,
        include_global: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        rmac_regions(8, 12, levels, overlap)
        self._init_p(p, learn_p, per_channel, channels)
        self.levels, self.overlap, self.include_global, self.eps = levels, overlap, include_global, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rgem(x, self.p, self.levels, self.overlap, self.include_global, self.eps)


def _gem_factory(channels: int | None = None, **kw) -> GeM:
    return GeM(channels=channels, **kw)


def _rgem_factory(channels: int | None = None, **kw) -> RGeM:
    return RGeM(channels=channels, **kw)


_POOLS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "mac": (lambda channels=None: MAC(), "global max pooling"),
    "spoc": (lambda channels=None: SPoC(), "global average pooling"),
    "gem": (_gem_factory, "generalised mean, p learnable (p=3, learn_p=True, per_channel=False)"),
    "rmac": (lambda channels=None, **kw: RMAC(**kw), "regional MAC (levels=3, overlap=0.4)"),
    "rgem": (_rgem_factory, "regional GeM (p=3, levels=3, overlap=0.4)"),
}


def list_pools(pattern: str = "*") -> list[str]:
    """Names of the registered poolings matching a shell-style ``pattern``."""
    return sorted(n for n in _POOLS if fnmatch.fnmatch(n, pattern))


def create_pool(name: str, channels: int | None = None, **kwargs) -> nn.Module:
    """Build a pooling layer by name (see :func:`list_pools`); ``kwargs`` go to its constructor."""
    key = name.lower()
    if key not in _POOLS:
        raise ValueError(f"unknown pooling {name!r}; available: {', '.join(list_pools())}")
    factory = _POOLS[key][0]
    try:
        return factory(channels=channels, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments {kwargs} for pooling {name!r}: {e}") from e


def pool_descriptions() -> dict[str, str]:
    """Name -> one-line description of every registered pooling."""
    return {n: d for n, (_, d) in sorted(_POOLS.items())}
