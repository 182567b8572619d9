"""ArcFace: additive angular margin softmax (Deng et al., CVPR 2019), as used by DELG and DOLG.

Deng, Guo, Xue & Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
CVPR 2019. With ``cos theta_c = <x / |x|, W_c / |W_c|>`` for every class ``c`` and ``y`` the
sample's class, the logits are::

    z_y = s * cos(theta_y + m)        z_c = s * cos(theta_c)   (c != y)

and the loss is the cross-entropy of ``softmax(z)`` against ``y``. Defaults ``s = 30``,
``m = 0.15`` are DOLG's (Yang et al., ICCV 2021; ``MODEL.HEADS.SCALE: 30``, ``MARGIN: 0.15`` in
feymanpriv/DOLG's ResNet-101 config); DELG (Cao et al., ECCV 2020) trains with a smaller margin
and a learnt scale, face recognition (the ArcFace paper) with ``s = 64, m = 0.5``. DOLG's head
also reweights hard negatives (CurricularFace-style); this is the plain ArcFace.

Past ``theta_y > pi - m`` the function ``cos(theta_y + m)`` would increase again with the angle;
as in insightface (the "th / mm" rule) the target logit there becomes
``cos theta_y - m sin m``, which keeps it decreasing in ``theta_y``. ``easy_margin=True`` instead
applies the margin only where ``cos theta_y > 0``.

The loss owns the class weights ``W`` (``(num_classes, dim)``); they are only used for training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .contrastive import _check_descriptors, _check_labels, _no_autocast

__all__ = ["arcface_logits", "arcface_loss", "ArcFaceLoss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_scale_margin(scale: float, margin: float) -> tuple[float, float]:
    scale, margin = float(scale), float(margin)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    if not math.isfinite(margin) or not 0.0 <= margin < math.pi / 2:
        raise ValueError(f"margin must be an angle in radians in [0, pi/2), got {margin}")
    return scale, margin


def _check_classifier(dim: int, num_classes: int, reduction: str) -> None:
    """The constructor arguments every margin-softmax loss with its own ``(num_classes, dim)`` weights takes."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; available: {', '.join(_REDUCTIONS)}")


def _check_inputs(x: torch.Tensor, labels, weight: torch.Tensor) -> torch.Tensor:
    _check_descriptors(x)
    _check_descriptors(weight, "weight")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight has dimension {weight.shape[1]} but x has D={x.shape[1]} (weight is (num_classes, D))"
        )
    labels = _check_labels(torch.as_tensor(labels), x.shape[0]).to(x.device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]):
        raise ValueError(
            f"labels must be class indices in [0, {weight.shape[0]}), "
            f"got min {int(labels.min())}, max {int(labels.max())}"
        )
    return labels.long()


def _cosines(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    xn = F.normalize(x.to(dtype), dim=1)
    wn = F.normalize(weight.to(dtype), dim=1)
    return (xn @ wn.T).clamp(-1.0, 1.0)


def _scaled_cosines(x: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """``s cos theta_c`` for every class, without a margin (e.g. for a training accuracy)."""
    _check_descriptors(x)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} but the loss was built for dim={weight.shape[1]}")
    with _no_autocast(x.device):
        return scale * _cosines(x, weight)


def _margin_target(cos_y: torch.Tensor, margin: float, easy_margin: bool) -> torch.Tensor:
    """``cos(theta + m)`` from ``cos(theta)``, with the easy-margin or th/mm rule past the valid range."""
    sin_y = (1.0 - cos_y * cos_y).clamp_min(1e-12).sqrt()
    shifted = cos_y * math.cos(margin) - sin_y * math.sin(margin)
    if easy_margin:
        return torch.where(cos_y > 0, shifted, cos_y)
    th = math.cos(math.pi - margin)
    mm = math.sin(math.pi - margin) * margin
    return torch.where(cos_y > th, shifted, cos_y - mm)


def arcface_logits(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: float = 30.0,
    margin: float = 0.15,
    easy_margin: bool = False,
) -> torch.Tensor:
    """ArcFace logits ``(N, C)``: ``s cos(theta_y + m)`` at each sample's class, ``s cos(theta_c)`` elsewhere.

    ``x`` is ``(N, D)`` (need not be normalised), ``labels`` ``(N,)`` class indices in
    ``[0, C)``, ``weight`` ``(C, D)``. Computed in at least float32 with autocast off.
    """
    scale, margin = _check_scale_margin(scale, margin)
    labels = _check_inputs(x, labels, weight)
    with _no_autocast(x.device):
        cos = _cosines(x, weight)
        cos_y = cos.gather(1, labels[:, None])
        target = _margin_target(cos_y, margin, easy_margin)
        return scale * cos.scatter(1, labels[:, None], target)


def arcface_loss(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: float = 30.0,
    margin: float = 0.15,
    easy_margin: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of :func:`arcface_logits` against ``labels``; ``reduction`` in mean (default), sum, none.

    An empty batch gives 0 (attached to the graph of ``x`` and ``weight``).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; available: {', '.join(_REDUCTIONS)}")
    logits = arcface_logits(x, labels, weight, scale=scale, margin=margin, easy_margin=easy_margin)
    if logits.shape[0] == 0 and reduction != "none":
        return logits.sum() * 0.0 + weight.sum() * 0.0
    with _no_autocast(x.device):
        return F.cross_entropy(logits, torch.as_tensor(labels, device=x.device).long(), reduction=reduction)


class ArcFaceLoss(nn.Module):
    """ArcFace loss with its own class weights ``weight`` of shape ``(num_classes, dim)``.

    ``forward(x, labels)`` returns the loss; :meth:`logits` the margin logits (or, without
    labels, the plain scaled cosines, e.g. for a training accuracy).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        scale: float = 30.0,
        margin: float = 0.15,
        easy_margin: bool = False,
        reduction: str = "mean",
    ):
        super().__init__()
        _check_classifier(dim, num_classes, reduction)
        self.dim, self.num_classes = dim, num_classes
        self.scale, self.margin = _check_scale_margin(scale, margin)
        self.easy_margin = bool(easy_margin)
        self.reduction = reduction
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform class weights (only their directions matter)."""
        nn.init.xavier_uniform_(self.weight)

    def logits(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return _scaled_cosines(x, self.weight, self.scale)
        return arcface_logits(
            x, labels, self.weight, scale=self.scale, margin=self.margin, easy_margin=self.easy_margin
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return arcface_loss(
            x,
            labels,
            self.weight,
            scale=self.scale,
            margin=self.margin,
            easy_margin=self.easy_margin,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_classes={self.num_classes}, scale={self.scale}, margin={self.margin}, "
            f"easy_margin={self.easy_margin}, reduction={self.reduction!r}"
        )
