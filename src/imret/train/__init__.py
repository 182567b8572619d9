"""Training: multistage backpropagation, the trainer and its config (see :mod:`imret.train.multistage`)."""

from .multistage import (
    MultistageResult,
    chunks_of,
    deterministic_forward_problems,
    freeze_batchnorm,
    multistage_backward,
    plain_backward,
)

__all__ = ["MultistageResult", "chunks_of", "deterministic_forward_problems", "freeze_batchnorm", "multistage_backward", "plain_backward"]
