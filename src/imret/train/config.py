"""The typed training configuration: YAML in, dataclasses out, unknown keys rejected.

Every key has a documented default; the resolved configuration (defaults filled in) is saved
beside every checkpoint so a run can be reproduced or resumed exactly.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..precision import PRECISIONS

__all__ = [
    "ModelConfig",
    "DataConfig",
    "LossConfig",
    "MiningConfig",
    "OptimConfig",
    "ValidationConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "save_config",
]

LOSSES = ("contrastive", "triplet", "ap", "arcface", "curricularface")
CLASSIFICATION_LOSSES = ("arcface", "curricularface")  # own (num_classes, D) weights
DATA_KINDS = ("folder", "csv", "sfm120k")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "exponential", "cosine", "step")
STRATEGIES = ("epoch", "batch_hard", "semihard", "all")

# YAML 1.1 (PyYAML) reads "1e-6" (no dot) as a string; a float field accepts such text
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # preset or timm CNN name
    pool: str = "gem"  # mac | spoc | gem | rmac | rgem
    gem_p: float = 3.0  # initial GeM p (learned)
    pretrained: bool = True  # download ImageNet weights the timm way (ignored with weights)
    weights: str | None = None  # local weights or imret checkpoint to start from
    whitening: int | None = None  # learnable whitening layer of this dimension
    freeze_batchnorm: bool = True  # BatchNorm with running statistics (needed by multistage)
    head: str = "global"  # global (pooling [+ whitening]) | dolg (imret.models.list_heads())
    head_kwargs: dict[str, Any] = field(default_factory=dict)  # the head's own options, e.g. dolg: {dim: 512, fusion: orthogonal}


@dataclass
class DataConfig:
    kind: str = "folder"  # folder (one folder per class) | csv (path,label or GLDv2) | sfm120k (cirtorch pickle)
    root: str = ""  # image root (folder dataset: the class folders)
    csv: str | None = None  # for kind=csv
    pkl: str | None = None  # for kind=sfm120k
    image_size: int = 512  # long side of training images in pixels
    augment: bool = True  # random resized crop, colour jitter (see imret.data.transforms)
    workers: int = 2  # data loading processes
    stream: bool = False  # multistage, in-batch losses: decode each chunk when needed (twice) instead of holding the batch


@dataclass
class LossConfig:
    name: str = "contrastive"  # contrastive | triplet | ap | arcface | curricularface
    margin: float | None = None  # contrastive / triplet / arcface / curricularface margin (None: the loss's default)
    bins: int = 20  # AP loss: number of quantisation bins M
    tie_aware: bool = False  # AP loss: tie-aware variant
    class_balanced: bool = True  # AP loss: per-query class-balancing weights
    scale: float = 30.0  # ArcFace / CurricularFace scale s


@dataclass
class MiningConfig:
    # contrastive / triplet: "epoch" mines hard negatives once per epoch into (query, positive,
    # n_1..n_k) tuples (cirtorch); "batch_hard" | "semihard" (triplet) | "all" mine inside
    # class-balanced batches. ap, arcface and curricularface always train on class-balanced batches.
    strategy: str = "epoch"
    queries: int = 2000  # tuples per epoch (contrastive/triplet with tuples)
    pool: int = 20000  # random pool in which hard negatives are mined each epoch
    negatives: int = 5  # hard negatives per query, at most one per class
    classes_per_batch: int = 16  # class-balanced batches (ap / arcface / curricularface / in-batch mining), per process
    per_class: int = 4  # images per class in a batch
    batches_per_epoch: int | None = None  # class-balanced batches per epoch (all processes); null: images // batch


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-6
    weight_decay: float = 1e-6
    momentum: float = 0.9  # sgd
    p_lr_mult: float = 10.0  # GeM p: this multiple of lr, no weight decay (Radenović et al.)
    schedule: str = "exponential"  # none | exponential | cosine | step
    gamma: float = 0.99  # exponential/step decay factor per epoch (step: every step_epochs)
    step_epochs: int = 10
    warmup_epochs: int = 0


@dataclass
class ValidationConfig:
    gnd: str | None = None  # a revisitop gnd_*.pkl evaluated every `every` epochs
    images: str | None = None  # its image folder (default: <gnd folder>/jpg)
    image_size: int = 1024
    every: int = 1


@dataclass
class TrainConfig:
    out: str = "runs/train"  # checkpoints, resolved config, logs, curves
    epochs: int = 30
    batch_size: int = 5  # tuples per step, per process (tuple mining); batches: mining.classes_per_batch x per_class
    accumulate: int = 1  # gradient accumulation steps
    multistage: bool = False  # multistage backpropagation (memory flat in batch size)
    chunk_size: int = 1  # images per forward pass in multistage mode
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: bool = False  # continue from <out>/checkpoint_last.pt
    log_every: int = 10  # optimizer steps between loss points in the log / TensorBoard
    max_steps_per_epoch: int | None = None  # cap on steps (batches) per epoch, e.g. for smoke tests
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        _choice("loss.name", self.loss.name, LOSSES)
        _choice("data.kind", self.data.kind, DATA_KINDS)
        _choice("optim.name", self.optim.name, OPTIMIZERS)
        _choice("optim.schedule", self.optim.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("mining.strategy", self.mining.strategy, STRATEGIES)
        from ..models.heads import list_heads

        _choice("model.head", self.model.head, tuple(list_heads()))
        if self.mining.strategy == "semihard" and self.loss.name != "triplet":
            raise ValueError(f"mining.strategy: semihard needs loss.name: triplet, got {self.loss.name!r}")
        for name in ("epochs", "batch_size", "accumulate", "chunk_size", "log_every"):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.mining.batches_per_epoch is not None and self.mining.batches_per_epoch < 1:
            raise ValueError(f"mining.batches_per_epoch must be >= 1 or null, got {self.mining.batches_per_epoch}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 or null, got {self.max_steps_per_epoch}")
        if self.optim.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.optim.lr}")
        if self.multistage and not self.model.freeze_batchnorm:
            raise ValueError("multistage: true needs model.freeze_batchnorm: true (two identical forward passes)")
        if self.data.stream and not self.multistage:
            raise ValueError("data.stream: true needs multistage: true (the batch is read twice, chunk by chunk)")
        if self.data.stream and self.loss.name in ("contrastive", "triplet") and self.mining.strategy == "epoch":
            raise ValueError("data.stream: true works with in-batch losses (ap, arcface, curricularface, or mining.strategy other "
                             "than epoch), not with mined tuples")
        if self.loss.bins < 2:
            raise ValueError(f"loss.bins must be >= 2, got {self.loss.bins}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: unknown value {value!r}; available: {', '.join(choices)}")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} is not a valid {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{where}: expected a mapping with string keys, got {value!r}")
        return dict(value)
    return value


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where or 'the config'}; valid: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()}
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested mappings; unknown keys and wrong types raise ``ValueError``.

    ``data.kind: captions`` gives a :class:`imret.train.semantic.SemanticTrainConfig` instead.
    """
    if not isinstance(d, dict):
        raise ValueError(f"a training config is a mapping, got {type(d).__name__}")
    if isinstance(d.get("data"), dict) and d["data"].get("kind") == "captions":
        # the joint image–caption trainer has its own config (imret.train.semantic)
        from .semantic import semantic_config_from_dict

        return semantic_config_from_dict(d)
    return _build(TrainConfig, d, "")


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a YAML (or JSON) training config."""
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    try:
        return config_from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
