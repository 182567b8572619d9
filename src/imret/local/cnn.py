"""CNN local features from a retrieval model's own feature maps (DELF / DELG style).

The trunk's map at one stage (default the stage before the last, stride 16) is read at every
location; the strongest locations become keypoints: by the DOLG head's local attention when the
model has one on that stage (DELF's attention-based selection, Noh et al. ICCV 2017, as DELG
uses it), else by the L2 norm of the activations over channels. Descriptors are the
L2-normalised channel vectors (for DOLG, the local branch's ``y / ||y||``), keypoints the
receptive-field centres ``((j + 0.5) * stride, (i + 0.5) * stride)`` mapped back to the
original image.

Storage: :func:`quantize_int8` keeps a unit-norm descriptor in D bytes (``round(127 x)``) and
:func:`dequantize_int8` restores it (cosine with the original above 0.999 for D >= 64).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .sift import load_local_image
from .types import LocalFeatures

__all__ = ["CnnLocalExtractor", "quantize_int8", "dequantize_int8"]

INT8_SCALE = 127.0


def quantize_int8(desc: np.ndarray) -> np.ndarray:
    """``(N, D)`` descriptors with entries in [-1, 1] (unit-norm rows) -> int8 ``round(127 x)``, clipped."""
    d = np.asarray(desc, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"desc must be (N, D) rows, got shape {d.shape}")
    if d.size and not np.isfinite(d).all():
        raise ValueError("descriptors to quantise must be finite")
    return np.clip(np.rint(d * INT8_SCALE), -127, 127).astype(np.int8)


def dequantize_int8(codes: np.ndarray) -> np.ndarray:
    """int8 codes ``(N, D)`` from :func:`quantize_int8` -> float32 rows renormalised to unit L2 norm."""
    c = np.asarray(codes)
    if c.dtype != np.int8 or c.ndim != 2:
        raise ValueError(f"codes must be (N, D) int8, got {c.dtype} {c.shape}")
    x = c.astype(np.float64) / INT8_SCALE
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


class CnnLocalExtractor:
    """Local features from a :class:`~imret.models.RetrievalNet`'s feature map at one trunk stage.

    ``extractor(image, box=None) -> LocalFeatures`` (kind ``"cnn"``, ``D`` = the map's channels,
    or the DOLG local branch's width with attention).

    Args:
        model: the retrieval network (its trunk, head and preprocessing are used; it is put in
            eval mode for the call and its mode restored afterwards; it stays on its device).
        level: trunk stage, as :func:`imret.models.backbones.create_backbone` counts them
            (-1: the final map, -2: the stage before it, stride 16 in ResNets/MobileNets, the
            stage DELF and DELG take local features from).
        max_keypoints: 500, the strongest locations kept (about a quarter of a 1024 px image's
            stride-16 grid; DELG keeps up to 1000 over several scales).
        image_size: 1024, the long side the image is brought down to (DELG's largest scale
            and the revisited Oxford/Paris image size).
        attention: use the DOLG head's local attention to select the locations and its local
            branch for the descriptors. None (default): when the head is DOLG with a local
            branch on this stage; True: required (an error otherwise); False: never.
        min_score: drop locations scored at or below this (default 0: zero activations, whose
            descriptor is undefined).
    """

    kind = "cnn"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        level: int = -2,
        max_keypoints: int = 500,
        image_size: int = 1024,
        attention: bool | None = None,
        min_score: float = 0.0,
    ) -> None:
        for name, v in (("max_keypoints", max_keypoints), ("image_size", image_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(level, bool) or not isinstance(level, int):
            raise ValueError(f"level must be an integer stage index, got {level!r}")
        if attention not in (None, True, False):
            raise ValueError(f"attention must be True, False or None (automatic), got {attention!r}")
        if not hasattr(model, "trunk") or not hasattr(model, "mean"):
            raise TypeError(f"model must be an imret RetrievalNet (with .trunk, .mean, .std), got {type(model).__name__}")
        self.model = model
        self.level = int(level)
        self.max_keypoints = int(max_keypoints)
        self.image_size = int(image_size)
        self.min_score = float(min_score)
        from ..models.backbones import level_stage

        self.stage, self.stride = level_stage(model.trunk, self.level)
        head = getattr(model, "head", None)
        available = bool(getattr(head, "attention", None) is not None and getattr(head, "local", False))
        if available:
            head_stage, _ = level_stage(model.trunk, int(head.levels[0]))
            available = head_stage == self.stage
        if attention is True and not available:
            raise ValueError(
                f"attention=True needs a DOLG head whose local branch reads trunk level {self.level}; "
                f"this model's head is {type(head).__name__}"
                + (f" reading level {head.levels[0]}" if getattr(head, "attention", None) is not None else "")
            )
        self.attention = available if attention is None else bool(attention)

    def __repr__(self) -> str:
        return (f"CnnLocalExtractor(level={self.level}, max_keypoints={self.max_keypoints}, "
                f"image_size={self.image_size}, attention={self.attention})")

    def _maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, 3, H, W) -> (descriptor map (C, h, w), score map (h, w))``, float32."""
        from ..models.backbones import FeatureLevels, feature_maps

        levels = FeatureLevels((self.level,), (), (self.stride,), (self.stage,))
        fmap = feature_maps(self.model.trunk, levels, x)[0]
        if self.attention:
            fl, att = self.model.head.local_map(fmap)
            return fl[0].float(), att[0, 0].float()
        f = fmap[0].float()
        return f, torch.linalg.vector_norm(f, dim=0)

    def __call__(self, image: Any, box: Sequence[float] | None = None) -> LocalFeatures:
        """Keypoints ``(N, 2)`` in original pixels, unit-norm descriptors ``(N, D)``, scores ``(N,)``; N <= max_keypoints."""
        from ..images import to_tensor

        img, frame = load_local_image(image, box, self.image_size)
        model = self.model
        device = next(model.parameters()).device
        x = to_tensor(img, model.mean, model.std)[None].to(device)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                desc, score = self._maps(x)
        finally:
            model.train(was_training)
        c, h, w = desc.shape
        s = score.reshape(-1).cpu().numpy().astype(np.float64)
        valid = np.flatnonzero(np.isfinite(s) & (s > self.min_score))
        top = valid[np.argsort(-s[valid], kind="stable")[: self.max_keypoints]]
        d = F.normalize(desc.reshape(c, -1)[:, torch.as_tensor(top, device=desc.device)].T, dim=1)
        rows, cols = top // w, top % w
        H, W = x.shape[-2:]
        sx = float(self.stride) if self.stride else W / w
        sy = float(self.stride) if self.stride else H / h
        # receptive-field centres in prepared pixels (edges at integers), inside the image,
        # then in the pixel-centre convention the keypoints use
        u = np.clip((cols + 0.5) * sx, 0.5, W - 0.5) - 0.5
        v = np.clip((rows + 0.5) * sy, 0.5, H - 0.5) - 0.5
        xy = frame.to_original(np.stack([u, v], axis=1))
        return LocalFeatures(xy, d.cpu().numpy().astype(np.float32), frame.size, s[top].astype(np.float32), self.kind)
