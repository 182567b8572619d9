"""The retrieval network: trunk (one or several feature maps) -> head -> ``(B, D)`` descriptors.

:class:`RetrievalNet` joins a timm trunk (:mod:`imret.models.backbones`) and a head
(:mod:`imret.models.heads`) and carries the :class:`~imret.models.spec.ModelSpec` that rebuilds
it. Build one with :func:`imret.models.create_model`.

Parameter names: ``trunk.*`` (timm's own names) and ``head.*``. Before heads existed the
global head's layers sat at the top (``pool.*``, ``whiten.*``); state dicts in that layout
still load (:func:`from_legacy_keys`, applied by ``load_state_dict``), and checkpoints of a
global-head model are still written in it (:func:`to_legacy_keys`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from .backbones import FeatureLevels, feature_maps, resolve_spec
from .heads import GlobalHead, Head
from .spec import DEFAULT_HEAD, ModelSpec

__all__ = ["RetrievalNet", "from_legacy_keys", "to_legacy_keys"]

_LEGACY = ("pool", "whiten")  # the global head's layers, at the top of the first layout


def from_legacy_keys(sd: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``pool.* -> head.pool.*``, ``whiten.* -> head.whiten.*`` (keys under ``prefix``); the rest as is."""
    out = {}
    for k, v in sd.items():
        rest = k[len(prefix):] if k.startswith(prefix) else None
        if rest is not None and rest.split(".", 1)[0] in _LEGACY:
            k = f"{prefix}head.{rest}"
        out[k] = v
    return out


def to_legacy_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`from_legacy_keys`: ``head.pool.* -> pool.*``, ``head.whiten.* -> whiten.*``."""
    out = {}
    for k, v in sd.items():
        if k.startswith("head.") and k.split(".", 2)[1] in _LEGACY:
            k = k[len("head."):]
        out[k] = v
    return out


def _upgrade_legacy_keys(module: "RetrievalNet", state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook: rename a global head's first-layout keys in place."""
    if not isinstance(module.head, GlobalHead):
        return
    renamed = from_legacy_keys(state_dict, prefix)
    if list(renamed) != list(state_dict):
        state_dict.clear()
        state_dict.update(renamed)


class RetrievalNet(nn.Module):
    """Fully convolutional retrieval network producing L2-normalised ``(B, D)`` descriptors.

    ``forward(x)`` takes ``(B, 3, H, W)`` normalised images of any size (all the same within
    a batch) and returns ``(B, D)``. ``feature_maps(x)`` returns the trunk's maps the head
    reads and ``head(maps)`` turns them into descriptors, so callers can split the work;
    ``features(x)`` is the last of those maps.

    Attributes:
        trunk: the timm model without classifier (``forward_features`` for the final map,
            ``forward_intermediates`` for several).
        head: a :class:`~imret.models.heads.Head`.
        feature_levels: the maps the trunk gives the head (:class:`~imret.models.backbones.FeatureLevels`).
        spec: the :class:`ModelSpec` (mean/std filled in from the backbone preset).
        weights_sha256: the SHA-256 (hex) of the file the weights were loaded from (a
            ``weights=`` file, a checkpoint, a pip package's file or timm's cached download),
            or None for random weights or an unknown source. Changes made in memory afterwards
            (training, :meth:`set_whitening`) do not update it.
    """

    def __init__(self, trunk: nn.Module, head: Head, spec: ModelSpec, feature_levels: FeatureLevels) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.feature_levels = feature_levels
        self.spec = resolve_spec(spec)
        self.weights_sha256: str | None = None
        self.register_load_state_dict_pre_hook(_upgrade_legacy_keys)

    # The global head's layers, where callers of the first layout look for them (None when
    # the head has no such layer). Assigning them assigns the head's.
    @property
    def pool(self) -> nn.Module | None:
        return getattr(self.head, "pool", None)

    @property
    def whiten(self) -> nn.Linear | None:
        return getattr(self.head, "whiten", None)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LEGACY and "head" in self._modules:
            setattr(self.head, name, value)
            return
        super().__setattr__(name, value)

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.spec.mean  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return self.spec.std  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        """Descriptor dimension D."""
        return self.head.dim

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W) -> [(B, C_i, H/r_i, W/r_i)]``: the unpooled maps the head reads."""
        return feature_maps(self.trunk, self.feature_levels, x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, C, H/s, W/s)``: the last of :meth:`feature_maps`."""
        return self.feature_maps(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, D)`` L2-normalised descriptors."""
        return self.head(self.feature_maps(x))

    def multiscale_power(self) -> float:
        """Exponent for combining descriptors over scales (see the head's ``multiscale_power``).

        For the global head: the learned p of a scalar-p GeM pooling when there is no
        whitening (GeM power mean, Radenović et al.); 1 (the arithmetic mean) otherwise.
        """
        return self.head.multiscale_power()

    def set_whitening(self, projection: torch.Tensor, mean: torch.Tensor | None = None) -> None:
        """Fold a whitening ``y = P (x - m)`` into the head's whitening layer: weight = P, bias = -P m.

        ``projection`` is ``(D_out, C)``; ``mean`` is ``(C,)``. Creates or replaces the layer
        and updates the spec.
        """
        device = next(self.parameters()).device
        self.head.set_whitening(projection, mean, device=device)
        self.spec = dataclasses.replace(self.spec, whitening=int(torch.as_tensor(projection).shape[0]))

    def extra_repr(self) -> str:
        head = "" if self.spec.head == DEFAULT_HEAD else f", head={self.spec.head!r}"
        return f"backbone={self.spec.backbone!r}{head}, dim={self.dim}"
