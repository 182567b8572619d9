"""CurricularFace: ArcFace whose hard negatives gain weight as training goes (Huang et al., CVPR 2020).

Huang, Wang, Tai, Liu, Shen, Li, Li & Huang, "CurricularFace: Adaptive Curriculum Learning Loss
for Deep Face Recognition", CVPR 2020; the classification head of DOLG (Yang et al., ICCV 2021:
``s = 30``, ``m = 0.15``). With ``cos theta_c`` the cosine between the normalised sample and class
``c``'s normalised weight, ``y`` the sample's class and ``T = cos(theta_y + m)`` (ArcFace's target,
with the same rule past ``theta_y > pi - m``)::

    z_y = s * T
    z_c = s * cos theta_c                        if cos theta_c <= cos(theta_y + m)   (easy)
    z_c = s * cos theta_c * (t + cos theta_c)    otherwise                            (hard)

so a hard negative is down-weighted early (``t`` near 0) and up-weighted late (``t`` near 1).
``t`` is a running average of the batch's mean target cosine, updated before the logits of
each training batch: ``t <- momentum * t + (1 - momentum) * mean_i cos theta_{y_i}``, from
``t = 0``. The paper writes the update with ``alpha = 0.99`` on the new value; its code (and
DOLG's) keeps 0.99 of the old one, which is what ``momentum = 0.99`` does here. ``t`` is a
buffer: it is saved with the loss and is the same on every process when the loss sees the
global batch (as imret's trainer computes it). Outside training mode it is not updated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .arcface import (_REDUCTIONS, _check_classifier, _check_inputs, _check_scale_margin, _cosines,
                      _margin_target, _scaled_cosines)
from .contrastive import _no_autocast

__all__ = ["curricular_logits", "curricularface_loss", "CurricularFaceLoss"]


def curricular_logits(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    t: float | torch.Tensor,
    *,
    scale: float = 30.0,
    margin: float = 0.15,
) -> torch.Tensor:
    """CurricularFace logits ``(N, C)`` for a given ``t`` (see the module docstring).

    ``x`` ``(N, D)``, ``labels`` ``(N,)`` in ``[0, C)``, ``weight`` ``(C, D)``; float32 at least,
    autocast off. Where no negative is hard the logits are ArcFace's.
    """
    scale, margin = _check_scale_margin(scale, margin)
    labels = _check_inputs(x, labels, weight)
    with _no_autocast(x.device):
        cos = _cosines(x, weight)
        cos_y = cos.gather(1, labels[:, None])
        sin_y = (1.0 - cos_y * cos_y).clamp_min(1e-12).sqrt()
        shifted = cos_y * math.cos(margin) - sin_y * math.sin(margin)  # cos(theta_y + m), before the rule
        target = _margin_target(cos_y, margin, easy_margin=False)
        tt = torch.as_tensor(t, dtype=cos.dtype, device=cos.device)
        hard = cos > shifted
        modulated = torch.where(hard, cos * (tt + cos), cos)
        return scale * modulated.scatter(1, labels[:, None], target)


def curricularface_loss(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    t: float | torch.Tensor,
    *,
    scale: float = 30.0,
    margin: float = 0.15,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of :func:`curricular_logits` against ``labels`` for a fixed ``t``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; available: {', '.join(_REDUCTIONS)}")
    logits = curricular_logits(x, labels, weight, t, scale=scale, margin=margin)
    if logits.shape[0] == 0 and reduction != "none":
        return logits.sum() * 0.0 + weight.sum() * 0.0
    with _no_autocast(x.device):
        return F.cross_entropy(logits, torch.as_tensor(labels, device=x.device).long(), reduction=reduction)


class CurricularFaceLoss(nn.Module):
    """CurricularFace with its own class weights ``(num_classes, dim)`` and running ``t``.

    ``forward(x, labels)``: in training mode first moves ``t`` towards the batch's mean target
    cosine, then returns the loss; in eval mode ``t`` stays.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        scale: float = 30.0,
        margin: float = 0.15,
        momentum: float = 0.99,
        reduction: str = "mean",
    ):
        super().__init__()
        _check_classifier(dim, num_classes, reduction)
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.dim, self.num_classes = dim, num_classes
        self.scale, self.margin = _check_scale_margin(scale, margin)
        self.momentum = momentum
        self.reduction = reduction
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.register_buffer("t", torch.zeros(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform class weights (only their directions matter) and ``t = 0``."""
        nn.init.xavier_uniform_(self.weight)
        with torch.no_grad():
            self.t.zero_()

    def update_t(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """``t <- momentum * t + (1 - momentum) * mean cos theta_y`` over this batch."""
        labels = _check_inputs(x, labels, self.weight)
        if labels.numel() == 0:
            return
        with torch.no_grad(), _no_autocast(x.device):
            cos_y = _cosines(x.detach(), self.weight.detach()).gather(1, labels[:, None])
            self.t.mul_(self.momentum).add_((1.0 - self.momentum) * cos_y.mean().to(self.t.dtype))

    def logits(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The curriculum logits at the current ``t`` (without labels: the plain scaled cosines)."""
        if labels is None:
            return _scaled_cosines(x, self.weight, self.scale)
        return curricular_logits(x, labels, self.weight, self.t, scale=self.scale, margin=self.margin)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update_t(x, labels)
        return curricularface_loss(x, labels, self.weight, self.t, scale=self.scale, margin=self.margin,
                                   reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_classes={self.num_classes}, scale={self.scale}, margin={self.margin}, "
                f"momentum={self.momentum}, t={float(self.t):.4f}, reduction={self.reduction!r}")
