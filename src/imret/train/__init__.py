"""Training: the trainer, its typed config, multistage backpropagation, distributed helpers.

``Trainer(load_config("run.yaml")).fit()`` or ``imret train run.yaml`` (see :mod:`imret.train.trainer`).
"""

from .config import TrainConfig, config_from_dict, load_config, save_config
from .distributed import DistInfo, all_gather_rows, init_distributed
from .metrics_log import MetricsLog, plot_training_curves, read_metrics
from .multistage import (
    MultistageResult,
    chunks_of,
    deterministic_forward_problems,
    freeze_batchnorm,
    iter_chunks,
    multistage_backward,
    plain_backward,
)
from .trainer import EpochStats, Trainer, TrainResult, train

__all__ = [
    "DistInfo",
    "EpochStats",
    "MetricsLog",
    "MultistageResult",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "all_gather_rows",
    "chunks_of",
    "config_from_dict",
    "deterministic_forward_problems",
    "freeze_batchnorm",
    "init_distributed",
    "iter_chunks",
    "load_config",
    "multistage_backward",
    "plain_backward",
    "plot_training_curves",
    "read_metrics",
    "save_config",
    "train",
]
