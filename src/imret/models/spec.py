"""What a retrieval network is, as plain data: :class:`ModelSpec`.

A spec says everything needed to rebuild a :class:`~imret.models.net.RetrievalNet` except the
weights, so checkpoints and stores carry it next to them. This module imports nothing from
imret: every other part of the model layer may use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelSpec", "DEFAULT_HEAD", "MULTISCALE_MODES"]

DEFAULT_HEAD = "global"
# How descriptors at several scales are made and combined (see imret.extract): imret's own
# way, or the test-time code of the project a checkpoint was imported from.
MULTISCALE_MODES: dict[str, str] = {
    "imret": "antialiased bilinear resize to round(s * side); GeM power mean (learned p) without whitening, "
             "else the arithmetic mean",
    "cirtorch": "cnnimageretrieval-pytorch's extract_ms: bilinear interpolate(scale_factor=s), no antialiasing, "
                "sides floor(s * side); the same power rule as imret",
    "dirtorch": "deep-image-retrieval's test_dir / extract_features: Pillow bilinear resize of the 8-bit image to "
                "int(0.5 + s * side) (its Scale(s)); sign-preserving power mean with p = 3 (its --pooling gem "
                "--gemp 3, magnitudes clamped at 1e-6), then L2",
}
# Keys that a spec written before heads existed does not have. ``to_dict`` leaves them out
# while they hold their defaults, so a spec of such a model is written exactly as before
# (the same checkpoint bytes, readable by earlier imret).
_OPTIONAL_DEFAULTS: dict[str, Any] = {"head": DEFAULT_HEAD, "head_kwargs": {}, "multiscale": "imret"}


@dataclass
class ModelSpec:
    """Everything needed to rebuild a :class:`~imret.models.net.RetrievalNet` (weights aside).

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
        head: head name (``imret.models.list_heads()``); ``"global"`` is pooling -> L2 ->
            [whitening -> L2] on the last feature map, the only head before heads had names
            (a spec without this key means it).
        head_kwargs: constructor arguments of the head beyond the pooling and whitening above.
        multiscale: how :func:`imret.extract.extract` resizes the input for each scale and
            combines the per-scale descriptors (:data:`MULTISCALE_MODES`): ``"imret"``, or
            ``"cirtorch"`` / ``"dirtorch"``, which reproduce those projects' multi-scale test
            code (checkpoints imported from them get theirs). Single-scale extraction is the
            same in every mode.
    """

    backbone: str = "resnet50"
    pool: str = "gem"
    pool_kwargs: dict[str, Any] = field(default_factory=dict)
    whitening: int | None = None
    l2_before_whiten: bool = True
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    head: str = DEFAULT_HEAD
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    multiscale: str = "imret"

    def __post_init__(self) -> None:
        if self.multiscale not in MULTISCALE_MODES:
            raise ValueError(f"unknown multiscale mode {self.multiscale!r}; available: {', '.join(MULTISCALE_MODES)}")

    def with_preprocessing(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> "ModelSpec":
        """A copy whose unset ``mean`` / ``std`` are these (a backbone preset's)."""
        return dataclasses.replace(
            self,
            mean=tuple(float(v) for v in (self.mean if self.mean is not None else mean)),
            std=tuple(float(v) for v in (self.std if self.std is not None else std)),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; keys added after the first checkpoint format are left out while
        they hold their defaults (see the module source)."""
        d = dataclasses.asdict(self)
        for k in ("mean", "std"):
            if d[k] is not None:
                d[k] = [float(v) for v in d[k]]
        for k, default in _OPTIONAL_DEFAULTS.items():
            if d[k] == default:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        """Build from a dict, rejecting unknown keys (a typo must not pass silently).

        Keys missing from the dict take their defaults; a spec saved before heads existed
        therefore reads as ``head="global"``.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model spec keys {unknown}; valid keys: {sorted(known)}")
        d = dict(d)
        for k in ("mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)
