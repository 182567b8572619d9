"""Training losses on ``(N, D)`` descriptors: contrastive, triplet, quantised AP, ArcFace, CurricularFace.

Each loss is a pure function and a thin ``nn.Module``; :func:`create_loss` builds a module by
name. Metric losses (contrastive, triplet, AP) expect L2-normalised descriptors (their margins and
the AP bins assume distances in ``[0, 2]`` / cosines in ``[-1, 1]``); ArcFace and CurricularFace
normalise themselves.

==============  ===========================================  ====================================
name            inputs                                       paper, defaults
==============  ===========================================  ====================================
contrastive     labels, or pairs / :func:`tuples_to_pairs`   Radenović et al. TPAMI 2018, m=0.7
triplet         labels, or triplets / tuples_to_triplets     Gordo et al. IJCV 2017, m=0.1
ap              labels                                       Revaud et al. ICCV 2019, M=20 bins
arcface         labels (class indices), owns W (C, D)        Deng et al. CVPR 2019, s=30, m=0.15
curricularface  labels (class indices), owns W (C, D), t     Huang et al. CVPR 2020, s=30, m=0.15
==============  ===========================================  ====================================

Importing this package does no I/O.
"""

from __future__ import annotations

import fnmatch
from typing import Callable

from torch import nn

from .ap import APLoss, ap_loss, ap_per_query, bin_centers, quantized_ap
from .arcface import ArcFaceLoss, arcface_logits, arcface_loss
from .curricularface import CurricularFaceLoss, curricular_logits, curricularface_loss
from .contrastive import ContrastiveLoss, contrastive_loss, tuples_to_pairs
from .triplet import TripletLoss, triplet_loss, tuples_to_triplets

__all__ = [
    "contrastive_loss",
    "ContrastiveLoss",
    "tuples_to_pairs",
    "triplet_loss",
    "TripletLoss",
    "tuples_to_triplets",
    "quantized_ap",
    "ap_per_query",
    "ap_loss",
    "APLoss",
    "bin_centers",
    "arcface_logits",
    "arcface_loss",
    "ArcFaceLoss",
    "curricular_logits",
    "curricularface_loss",
    "CurricularFaceLoss",
    "create_loss",
    "list_losses",
    "loss_descriptions",
]

_LOSSES: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "contrastive": (ContrastiveLoss, "contrastive loss on pairs (margin 0.7; Radenović et al., TPAMI 2018)"),
    "triplet": (TripletLoss, "triplet margin loss, squared distances (margin 0.1; Gordo et al., IJCV 2017)"),
    "ap": (APLoss, "listwise quantised-AP loss (20 bins over [-1, 1]; Revaud et al., ICCV 2019)"),
    "arcface": (ArcFaceLoss, "additive angular margin softmax, needs dim and num_classes (s 30, m 0.15; Deng et al.)"),
    "curricularface": (CurricularFaceLoss, "ArcFace with adaptively weighted hard negatives, needs dim and "
                       "num_classes (s 30, m 0.15; Huang et al.; DOLG's head)"),
}


def list_losses(pattern: str = "*") -> list[str]:
    """Names of the registered losses matching a shell-style ``pattern``."""
    return sorted(n for n in _LOSSES if fnmatch.fnmatch(n, pattern))


def loss_descriptions() -> dict[str, str]:
    """Name -> one-line description of every registered loss."""
    return {n: d for n, (_, d) in sorted(_LOSSES.items())}


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss module by name (see :func:`list_losses`); ``kwargs`` go to its constructor.

    ``create_loss("arcface", dim=512, num_classes=81313)`` needs the descriptor size and class count.
    """
    key = str(name).lower()
    if key not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(list_losses())}")
    factory = _LOSSES[key][0]
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments {kwargs} for loss {name!r}: {e}") from e
