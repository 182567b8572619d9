"""The trainer: fine-tune a retrieval network from a :class:`~imret.train.config.TrainConfig`.

Two ways to form a training step, chosen by the loss and ``mining.strategy``:

* **Epoch tuples** (contrastive / triplet with ``strategy: epoch``; Radenović et al., TPAMI
  2018): at the start of each epoch :func:`imret.mining.sample_epoch` draws queries, their
  positives and a random pool; the current network (eval mode, no augmentation) describes them;
  :func:`imret.mining.epoch_tuples` mines ``k`` hard negatives per query. A step processes
  ``batch_size`` tuples ``(q, p, n_1..n_k)`` per process, the loss runs over
  :func:`~imret.losses.tuples_to_pairs` / :func:`~imret.losses.tuples_to_triplets`.
* **Class-balanced batches** (ap, arcface, curricularface, and contrastive / triplet with an in-batch
  strategy): ``mining.classes_per_batch x per_class`` square crops per process and step.

With ``multistage: true`` the whole batch is back-propagated in three stages
(:func:`~imret.train.multistage.multistage_backward`, ``chunk_size`` images per forward),
otherwise in one ordinary backward; the two give the same gradients (BatchNorm frozen).

Distributed (``torchrun``; see :mod:`imret.train.distributed`). The network is wrapped in
DistributedDataParallel. Every step the descriptors of all processes are gathered so the loss
sees the global batch (the listwise AP loss needs it; for per-pair losses it is the same
thing), each process back-propagates its own rows with the gradient multiplied by the world
size to undo DDP's averaging, and the result equals single-process training on the
concatenated batch. The data is split so that this holds exactly: the global batch of a step
is built once (the same on every rank: tuples ``[s*B*W, (s+1)*B*W)``, or one class-balanced
batch of ``classes_per_batch * W`` classes) and rank ``r`` takes the ``r``-th contiguous
slice. Epoch mining: every rank describes a slice of the query + pool images, the
descriptors are all-gathered, rank 0 mines and broadcasts the tuples. Validation: every rank
describes a slice of the database and queries, the descriptors are all-gathered, every rank
computes the same mAP (so all agree on the best model); rank 0 writes files and logs.
Parameters of the loss (ArcFace's class weights) are not inside DDP: their gradient, computed
from the gathered batch, is already the same on every rank (and so is CurricularFace's running t).

Files in ``out``: ``config.yaml`` (the resolved config), ``checkpoint_last.pt`` (everything
needed for an exact resume, written atomically), ``model_epoch{N}.safetensors`` and
``model_best.safetensors`` (by validation Medium mAP; loadable with :func:`imret.load_model`),
``metrics.csv``, ``tb/`` (TensorBoard) and ``curves.png``.

The trainer prints nothing: progress bars go through tqdm (``progress=True``), messages
through ``logger``, and ``on_epoch`` receives each epoch's :class:`EpochStats`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data import (
    ClassBalancedBatchSampler,
    ImageListDataset,
    LabelledImages,
    LazyImages,
    RetrievalAugment,
    TupleDataset,
    collate_images,
    collate_tuples,
    load_csv_dataset,
    load_folder_dataset,
    load_sfm120k,
)
from ..fileio import atomic_path
from ..images import RESAMPLE
from ..losses import create_loss, tuples_to_pairs, tuples_to_triplets
from ..mining import batch_hard_triplets, epoch_tuples, hard_pairs, sample_epoch, semi_hard_triplets
from ..models import RetrievalNet, create_model, save_model
from ..precision import autocast_dtype
from .config import CLASSIFICATION_LOSSES, DataConfig, LossConfig, ModelConfig, TrainConfig, save_config
from .distributed import DistInfo, all_gather_rows, barrier, broadcast_object, broadcast_parameters
from .metrics_log import MetricsLog
from .multistage import chunks_of, freeze_batchnorm, multistage_backward

__all__ = [
    "Trainer",
    "TrainResult",
    "EpochStats",
    "train",
    "build_model",
    "build_loss",
    "load_training_images",
    "SquareResize",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint_last.pt"
CHECKPOINT_FORMAT = "imret.train"
CHECKPOINT_VERSION = 1
_AUG_MIN_SCALE = 0.5  # RetrievalAugment's default smallest crop area


@dataclass
class EpochStats:
    """What one epoch did (the columns of ``metrics.csv``)."""

    epoch: int  # epochs completed (1-based)
    step: int  # optimizer steps completed
    loss: float  # mean training loss over the epoch's steps
    lr: float  # learning rate of the network during the epoch
    gem_p: float | None  # mean GeM exponent after the epoch
    map_easy: float | None  # validation mAP, fractions (None: not validated this epoch)
    map_medium: float | None
    map_hard: float | None
    images_per_s: float  # training images per second, all processes
    seconds: float  # wall time of the epoch (mining and validation included)

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """The outcome of :meth:`Trainer.fit`; paths are in the run folder."""

    out: Path
    epochs: int  # epochs completed in total (resumed ones included)
    steps: int  # optimizer steps in total
    history: list[EpochStats] = field(default_factory=list)  # the epochs of this call
    best_map: float | None = None  # best validation Medium mAP
    checkpoint: Path | None = None
    last_model: Path | None = None
    best_model: Path | None = None
    metrics: Path | None = None
    curves: Path | None = None
    config: Path | None = None


class SquareResize:
    """The no-augmentation transform of batch training: resize to ``size x size`` (batches stack)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, img, rng):
        return img.convert("RGB").resize((self.size, self.size), RESAMPLE)

    def __repr__(self) -> str:
        return f"SquareResize({self.size})"


class _EpochSchedule:
    """Learning-rate factor of an epoch: linear warmup, then none / exponential / step / cosine."""

    def __init__(self, kind: str, epochs: int, gamma: float, step_epochs: int, warmup: int) -> None:
        self.kind, self.epochs, self.gamma = kind, int(epochs), float(gamma)
        self.step_epochs, self.warmup = max(1, int(step_epochs)), max(0, int(warmup))

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup:
            return (epoch + 1) / (self.warmup + 1)
        t = epoch - self.warmup
        if self.kind == "exponential":
            return self.gamma**t
        if self.kind == "step":
            return self.gamma ** (t // self.step_epochs)
        if self.kind == "cosine":
            span = max(1, self.epochs - self.warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))
        return 1.0


# ------------------------------------------------------------------------------- builders


def _resolve_device(name: str, dist: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available")
        if dist.enabled:
            dev = torch.device("cuda", dist.local_rank)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (it trains with a gradient scaler); on the CPU use bf16 or fp32")
    return autocast_dtype(precision, device)


def load_training_images(data: DataConfig) -> LabelledImages:
    """The labelled training set a :class:`DataConfig` points at."""
    if data.kind == "folder":
        if not data.root:
            raise ValueError("data.root: the folder of class folders is required for data.kind: folder")
        return load_folder_dataset(data.root)
    if data.kind == "csv":
        if not data.csv:
            raise ValueError("data.csv is required for data.kind: csv")
        return load_csv_dataset(data.csv, data.root or None)
    if not data.pkl or not data.root:
        raise ValueError("data.pkl (retrieval-SfM-120k.pkl) and data.root (its image folder) are required for data.kind: sfm120k")
    return load_sfm120k(data.pkl, data.root, "train")


def describe_model_config(m: ModelConfig) -> str:
    """``"resnet50 + gem"``, or with another head ``"resnet50 + dolg head (gem)"``."""
    if m.head == "global":
        return f"{m.backbone} + {m.pool}"
    return f"{m.backbone} + {m.head} head ({m.pool})"


def build_model(m: ModelConfig) -> RetrievalNet:
    """The network a :class:`ModelConfig` describes (GeM p initialised to ``gem_p``)."""
    pool_kwargs = {"p": m.gem_p} if m.pool in ("gem", "rgem") else {}
    return create_model(
        m.backbone,
        m.pool,
        pretrained=m.pretrained and m.weights is None,
        weights=m.weights,
        whitening=m.whitening,
        pool_kwargs=pool_kwargs,
        head=m.head,
        head_kwargs=m.head_kwargs,
    )


def build_loss(c: LossConfig, dim: int, num_classes: int) -> nn.Module:
    """The loss module of a :class:`LossConfig` (ArcFace owns ``(num_classes, dim)`` weights)."""
    kw: dict[str, Any] = {}
    if c.name in ("contrastive", "triplet") + CLASSIFICATION_LOSSES and c.margin is not None:
        kw["margin"] = c.margin
    if c.name == "ap":
        kw.update(bins=c.bins, tie_aware=c.tie_aware, class_balanced=c.class_balanced)
    if c.name in CLASSIFICATION_LOSSES:
        kw.update(dim=dim, num_classes=num_classes, scale=c.scale)
    return create_loss(c.name, **kw)


def _param_groups(model: RetrievalNet, loss: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Network at ``lr`` with weight decay; pooling (GeM p) at ``lr * p_lr_mult`` without; loss weights at ``lr``."""
    o = cfg.optim
    pool = [p for p in model.pool.parameters() if p.requires_grad]
    in_pool = {id(p) for p in pool}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pool]
    groups = [{"name": "network", "params": rest, "lr": o.lr, "weight_decay": o.weight_decay}]
    if pool:
        groups.append({"name": "pool", "params": pool, "lr": o.lr * o.p_lr_mult, "weight_decay": 0.0})
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"name": "loss", "params": loss_params, "lr": o.lr, "weight_decay": o.weight_decay})
    return groups


def _optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)


def _rng_state(device: torch.device) -> dict[str, Any]:
    py = random.getstate()
    npst = np.random.get_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _gem_p(model: RetrievalNet) -> float | None:
    p = getattr(model.pool, "p", None)
    return float(p.detach().float().mean()) if isinstance(p, torch.Tensor) else None


# -------------------------------------------------------------------------------- trainer


class Trainer:
    """Builds the network, data, loss and optimizer of a config; :meth:`fit` trains.

    Args:
        config: the training configuration (``config.resume`` continues from
            ``<out>/checkpoint_last.pt``; without it an existing checkpoint there is an error).
        dist: this process's place in a ``torchrun`` job (:func:`~imret.train.distributed.init_distributed`);
            default a single process.
        progress: tqdm progress bars (main process only).
        logger: where messages go (default ``logging.getLogger("imret.train")``).
        on_epoch: called with each epoch's :class:`EpochStats` (every process).
    """

    def __new__(cls, config: Any = None, *args: Any, **kwargs: Any):
        # data.kind: captions configs train the joint image–caption embedding (imret.train.semantic)
        from .semantic import SemanticTrainConfig, SemanticTrainer

        if cls is Trainer and isinstance(config, SemanticTrainConfig):
            return SemanticTrainer(config, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        config: TrainConfig,
        *,
        dist: DistInfo | None = None,
        progress: bool = False,
        logger: logging.Logger | None = None,
        on_epoch: Callable[[EpochStats], None] | None = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.dist = dist or DistInfo()
        self.progress = progress
        self.log = logger or logging.getLogger("imret.train")
        self.on_epoch = on_epoch
        self.out = Path(cfg.out)
        self.device = _resolve_device(cfg.device, self.dist)
        self.amp_dtype = _autocast_dtype(cfg.precision, self.device)
        self.tuple_mode = cfg.loss.name in ("contrastive", "triplet") and cfg.mining.strategy == "epoch"
        if self.tuple_mode and cfg.mining.negatives < 1:
            raise ValueError(f"mining.negatives must be >= 1 for {cfg.loss.name} tuples, got {cfg.mining.negatives}")
        ckpt = self.out / CHECKPOINT_NAME
        if cfg.resume and not ckpt.is_file():
            raise FileNotFoundError(f"resume: no checkpoint {str(ckpt)!r} to continue from")
        if not cfg.resume and ckpt.is_file():
            raise FileExistsError(f"{str(self.out)!r} already holds a run ({CHECKPOINT_NAME}); resume it (--resume) or choose another out")

        self.images = load_training_images(cfg.data)
        self.gt = None
        if cfg.validation.gnd:
            from ..evaluation import load_revisitop  # evaluation comes after training in the data flow

            self.gt = load_revisitop(cfg.validation.gnd)
            self.val_root = Path(cfg.validation.images) if cfg.validation.images else Path(cfg.validation.gnd).parent / "jpg"

        # seeded construction: random layers and ArcFace weights are the same on every rank
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model)
        self.loss = build_loss(cfg.loss, self.model.dim, self.images.num_classes)
        state = None
        if cfg.resume:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"{str(ckpt)!r} is not an imret training checkpoint of version {CHECKPOINT_VERSION}")
            self.model.load_state_dict(state["model"])
            self.loss.load_state_dict(state["loss"])
            now = cfg.to_dict()
            changed = sorted(k for k in now if k not in ("resume", "out") and state["config"].get(k) != now[k])
            if changed:
                self.log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
        self.model.to(self.device)
        self.loss.to(self.device)
        self._train_mode()
        self.loss_params = [p for p in self.loss.parameters() if p.requires_grad]

        self.net: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            broadcast_parameters(self.loss.parameters())
            # every parameter takes part in the descriptor, so no unused-parameter search;
            # frozen BatchNorm statistics never change, so there are no buffers to broadcast
            sync_buffers = not cfg.model.freeze_batchnorm
            # torch >= 2.10 renamed broadcast_buffers (and warns); both still sync at construction
            params = inspect.signature(DistributedDataParallel.__init__).parameters
            buffers = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": sync_buffers}
            self.net = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
                **buffers,
            )

        self.optimizer = _optimizer(_param_groups(self.model, self.loss, cfg), cfg)
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _EpochSchedule(o.schedule, cfg.epochs, o.gamma, o.step_epochs, o.warmup_epochs)
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.start_epoch = 0
        self.global_step = 0
        self.best_map: float | None = None
        self._pending_rng: dict[str, Any] | None = None
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.start_epoch = int(state["epoch"])
            self.global_step = int(state["global_step"])
            self.best_map = state.get("best_map")
            self._pending_rng = state["rng"]

        self.dataset = self._make_dataset()
        self.class_sampler = None
        if not self.tuple_mode:
            w = self.dist.world_size
            try:
                self.class_sampler = ClassBalancedBatchSampler(
                    self.images.labels, cfg.mining.classes_per_batch * w, cfg.mining.per_class, seed=cfg.seed,
                    num_batches=cfg.mining.batches_per_epoch,
                )
            except ValueError as e:
                raise ValueError(f"class-balanced batches of mining.classes_per_batch={cfg.mining.classes_per_batch} "
                                 f"x {w} process(es): {e}") from None

    # ---------------------------------------------------------------------------- helpers

    def _train_mode(self) -> None:
        self.model.train()
        if self.config.model.freeze_batchnorm:
            freeze_batchnorm(self.model)

    def _make_dataset(self) -> ImageListDataset:
        d = self.config.data
        size = d.image_size
        load_size = math.ceil(size / math.sqrt(_AUG_MIN_SCALE)) if d.augment else size
        if self.tuple_mode:
            transform = RetrievalAugment(size, output="long_side") if d.augment else None
        else:
            transform = RetrievalAugment(size, output="square") if d.augment else SquareResize(size)
        return ImageListDataset.from_images(
            self.images, image_size=load_size, transform=transform, mean=self.model.mean, std=self.model.std,
            seed=self.config.seed,
        )

    def _steps(self, available: int, what: str) -> int:
        cfg = self.config
        n = available if cfg.max_steps_per_epoch is None else min(available, cfg.max_steps_per_epoch)
        n -= n % cfg.accumulate
        if n < 1:
            raise ValueError(
                f"an epoch has {available} step(s) of {what}, fewer than accumulate={cfg.accumulate} "
                "(use more data, a smaller batch or fewer processes)"
            )
        return n

    def _describe(self, paths: Sequence[Any], image_size: int, bboxes: Sequence[Any] | None = None) -> torch.Tensor:
        """``(N, D)`` descriptors of ``paths`` with the current network (eval mode, one scale), on ``device``.

        Each process describes a contiguous slice; the slices are all-gathered.
        """
        from ..extract import extract_descriptors

        w, r = self.dist.world_size, self.dist.rank
        mine = np.array_split(np.arange(len(paths)), w)[r]
        d = extract_descriptors(
            self.model,
            [paths[i] for i in mine],
            image_size=image_size,
            bboxes=None if bboxes is None else [bboxes[i] for i in mine],
            device=self.device,
            workers=self.config.data.workers,
            precision=self.config.precision if self.device.type == "cuda" else "fp32",
            channels_last=False,  # keep the parameters' memory format (DDP buckets, exact resume)
            compile="off",  # the weights change every step: a frozen graph would be rebuilt each epoch
            progress=self.progress and self.dist.is_main,
        )
        self._train_mode()  # extraction put the network in eval mode
        full, _ = all_gather_rows(torch.from_numpy(d).to(self.device))
        return full

    def _mine(self, epoch: int) -> np.ndarray:
        """The epoch's ``(T, 2 + k)`` tuples: sample, describe, mine on rank 0, broadcast."""
        cfg, im = self.config, self.images
        src = {"pairs": im.pairs} if im.pairs is not None else {"labels": im.labels}
        sample = sample_epoch((cfg.seed, epoch), num_images=len(im), qsize=cfg.mining.queries,
                              poolsize=cfg.mining.pool, **src)
        ids = np.unique(np.concatenate([sample.query_ids, sample.pool_ids]))
        desc = self._describe([im.paths[i] for i in ids], cfg.data.image_size)
        tuples = None
        if self.dist.is_main:
            q = desc[torch.as_tensor(np.searchsorted(ids, sample.query_ids), device=desc.device)]
            pool = desc[torch.as_tensor(np.searchsorted(ids, sample.pool_ids), device=desc.device)]
            tuples = epoch_tuples(sample, q, pool, im.labels, k=cfg.mining.negatives)
        return broadcast_object(tuples)

    def _epoch_data(self, epoch: int) -> tuple[torch.utils.data.DataLoader, int, int]:
        """This rank's loader for ``epoch``, its number of steps and the images per global step."""
        cfg = self.config
        w, r = self.dist.world_size, self.dist.rank
        self.dataset.set_epoch(epoch)
        if self.tuple_mode:
            tuples = self._mine(epoch)
            b = cfg.batch_size
            n = self._steps(len(tuples) // (b * w), f"{b} tuples x {w} process(es) ({len(tuples)} tuples mined)")
            batches = [list(range(s * b * w + r * b, s * b * w + (r + 1) * b)) for s in range(n)]
            dataset: torch.utils.data.Dataset = TupleDataset(self.dataset, tuples)
            collate = collate_tuples
            per_step = b * w * tuples.shape[1]
        else:
            per_rank = cfg.mining.classes_per_batch * cfg.mining.per_class
            every = self.class_sampler.epoch_batches(epoch)
            n = self._steps(len(every), f"{per_rank} images x {w} process(es) ({len(self.images)} images)")
            batches = [b[r * per_rank:(r + 1) * per_rank] for b in every[:n]]
            dataset, collate = self.dataset, collate_images
            per_step = per_rank * w
        if cfg.data.stream and not self.tuple_mode:  # images decoded chunk by chunk inside multistage_backward
            ds = self.dataset

            def streamed():
                for b in batches:
                    lazy = LazyImages(ds, b, epoch, workers=max(1, cfg.data.workers))
                    try:
                        yield lazy, lazy.labels(), torch.tensor(b, dtype=torch.long)
                    finally:
                        lazy.close()

            return streamed(), n, per_step
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=cfg.data.workers,
            persistent_workers=False,  # workers must see this epoch's set_epoch
            pin_memory=self.device.type == "cuda",
        )
        return loader, n, per_step

    def _loss_of(self, labels: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The loss as a function of the global batch's ``(N, D)`` descriptors."""
        cfg, loss = self.config, self.loss
        if self.tuple_mode:
            size = 2 + cfg.mining.negatives
            if cfg.loss.name == "contrastive":
                return lambda d: loss(d, pairs=tuples_to_pairs(d.shape[0] // size, size, d.device))
            return lambda d: loss(d, triplets=tuples_to_triplets(d.shape[0] // size, size, d.device))
        if cfg.loss.name == "ap" or cfg.loss.name in CLASSIFICATION_LOSSES:
            return lambda d: loss(d, labels)
        strategy = cfg.mining.strategy
        if cfg.loss.name == "triplet":
            if strategy == "batch_hard":
                return lambda d: loss(d, triplets=batch_hard_triplets(d, labels))
            if strategy == "semihard":
                return lambda d: loss(d, triplets=semi_hard_triplets(d, labels, loss.margin))
            return lambda d: loss(d, labels)
        if strategy == "batch_hard":
            return lambda d: loss(d, pairs=hard_pairs(d, labels, neg_margin=loss.margin))
        return lambda d: loss(d, labels)

    def _forward_backward(self, images: Any, labels: torch.Tensor | None, sync: bool) -> torch.Tensor:
        """Accumulate one step's gradients; returns the (detached) loss of the global batch."""
        cfg = self.config
        w = self.dist.world_size
        # gradients carry (loss scale) x (world size, undoing DDP's mean) / (accumulation steps)
        scale = float(self.scaler.scale(torch.ones((), device=self.device))) if self.scaler is not None else 1.0
        factor = scale * w / cfg.accumulate
        if labels is not None:
            labels, _ = all_gather_rows(labels.to(self.device))
        compute = self._loss_of(labels)
        ddp = self.net if self.dist.enabled else None
        outer = ddp.no_sync() if (ddp is not None and not sync) else contextlib.nullcontext()
        with outer:
            if cfg.multistage:
                def loss_fn(d: torch.Tensor) -> torch.Tensor:
                    value = compute(d)
                    if self.loss_params:  # multistage differentiates w.r.t. d only: the loss's own weights here
                        grads = torch.autograd.grad(value * factor, self.loss_params, retain_graph=True, allow_unused=True)
                        for p, g in zip(self.loss_params, grads):
                            if g is not None:
                                p.grad = g.detach().clone() if p.grad is None else p.grad.add_(g)
                    return value

                res = multistage_backward(
                    self.net, images, loss_fn, chunk_size=cfg.chunk_size, device=self.device,
                    autocast_dtype=self.amp_dtype, grad_scale=factor,
                    gather=all_gather_rows if w > 1 else None,
                    no_sync=ddp.no_sync if ddp is not None else None,
                )
                return res.loss
            outs = []
            for _, _, x in chunks_of(images, 1 << 30):  # one forward per image size
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                    outs.append(self.net(x.to(self.device, non_blocking=True)).float())
            local = torch.cat(outs)
            d = local
            if w > 1:  # the global batch, with this process's rows attached to its graph
                full, off = all_gather_rows(local)
                d = torch.cat([full[:off], local, full[off + local.shape[0]:]])
            value = compute(d)
            (value * factor).backward()
            return value.detach()

    def _optimizer_step(self) -> None:
        if self.dist.world_size > 1:  # loss weights saw the gathered batch times world size; nothing averaged them
            for p in self.loss_params:
                if p.grad is not None:
                    p.grad.div_(self.dist.world_size)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _check_loss(self, value: float, epoch: int) -> None:
        if not math.isfinite(value) and self.scaler is None:
            raise RuntimeError(
                f"training loss is {value} in epoch {epoch + 1} (step {self.global_step}); "
                "lower optim.lr or train in fp32"
            )

    def _validate(self) -> dict[str, float]:
        from ..evaluation import evaluate_revisitop_scores
        from ..retrieval import Retriever

        gt, size = self.gt, self.config.validation.image_size
        db = self._describe(gt.db_paths(self.val_root), size).float().cpu().numpy()
        q = self._describe(gt.query_paths(self.val_root), size, bboxes=list(gt.bbx)).float().cpu().numpy()
        ranked = Retriever().index(db).search(vectors=q, k=len(db))  # the pipeline imret eval and the store use
        res = evaluate_revisitop_scores(ranked.dense(len(db)), gt)
        return {"easy": res.easy.map, "medium": res.medium.map, "hard": res.hard.map}

    # ------------------------------------------------------------------------- training

    def _train_epoch(self, epoch: int, loader, n_steps: int, writer: MetricsLog) -> float:
        cfg = self.config
        from tqdm.auto import tqdm

        self._train_mode()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        window = torch.zeros((), device=self.device)
        in_window = 0
        bar = tqdm(loader, total=n_steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not (self.progress and self.dist.is_main), leave=False)
        for i, batch in enumerate(bar):
            if self.tuple_mode:
                tuples, _ = batch
                images, labels = [x for t in tuples for x in t], None
            else:
                images, labels, _ = batch
            sync = (i + 1) % cfg.accumulate == 0
            value = self._forward_backward(images, labels, sync)
            total += value
            window += value
            in_window += 1
            if sync:
                self._optimizer_step()
                if self.global_step % cfg.log_every == 0:
                    v = float(window) / in_window
                    self._check_loss(v, epoch)
                    writer.scalar("train/loss", v, self.global_step)
                    writer.scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.global_step)
                    bar.set_postfix(loss=f"{v:.4f}")
                    self.log.debug("epoch %d step %d loss %.5f", epoch + 1, self.global_step, v)
                    window.zero_()
                    in_window = 0
        bar.close()
        mean = float(total) / max(1, n_steps)
        self._check_loss(mean, epoch)
        return mean

    def _checkpoint_state(self, epochs_done: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": epochs_done,
            "global_step": self.global_step,
            "best_map": self.best_map,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "loss": {k: v.detach().cpu() for k, v in self.loss.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": _rng_state(self.device),
            "config": self.config.to_dict(),
        }

    def fit(self, until_epoch: int | None = None) -> TrainResult:
        """Train from the current epoch to ``config.epochs`` (or stop after ``until_epoch`` epochs).

        Every epoch: mining (tuple losses), the steps, the learning-rate schedule, validation
        when due, then (main process) the epoch's files and a checkpoint.
        """
        cfg, main = self.config, self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        title = f"{describe_model_config(cfg.model)}, {cfg.loss.name} loss"
        writer = MetricsLog(self.out, enabled=main, keep_epochs=self.start_epoch if cfg.resume else None, title=title)
        if self._pending_rng is not None:  # exact resume: the random streams continue where they stopped
            _set_rng_state(self._pending_rng, self.device)
            self._pending_rng = None
        end = cfg.epochs if until_epoch is None else min(int(until_epoch), cfg.epochs)
        history: list[EpochStats] = []
        last_model = None
        try:
            for epoch in range(self.start_epoch, end):
                t0 = time.perf_counter()
                loader, n_steps, per_step = self._epoch_data(epoch)
                t1 = time.perf_counter()
                loss = self._train_epoch(epoch, loader, n_steps, writer)
                train_s = time.perf_counter() - t1
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                done = epoch + 1
                val = None
                if self.gt is not None and (done % cfg.validation.every == 0 or done == cfg.epochs):
                    val = self._validate()
                improved = val is not None and math.isfinite(val["medium"]) and (
                    self.best_map is None or val["medium"] > self.best_map)
                if improved:
                    self.best_map = float(val["medium"])
                stats = EpochStats(
                    epoch=done, step=self.global_step, loss=loss, lr=lr, gem_p=_gem_p(self.model),
                    map_easy=None if val is None else float(val["easy"]),
                    map_medium=None if val is None else float(val["medium"]),
                    map_hard=None if val is None else float(val["hard"]),
                    images_per_s=n_steps * per_step / max(train_s, 1e-9),
                    seconds=time.perf_counter() - t0,
                )
                last_model = self.out / f"model_epoch{done}.safetensors"
                if main:
                    writer.epoch(stats.row())
                    save_model(self.model, last_model)
                    if improved:
                        save_model(self.model, self.out / "model_best.safetensors")
                    ckpt = self.out / CHECKPOINT_NAME
                    with atomic_path(ckpt) as tmp:
                        torch.save(self._checkpoint_state(done), tmp)
                self.start_epoch = done
                barrier()
                self.log.info(
                    "epoch %d/%d: loss %.5f, lr %.3g%s, %.1f images/s, %.1f s", done, cfg.epochs, loss, lr,
                    "" if val is None else f", mAP E/M/H {100 * val['easy']:.2f}/{100 * val['medium']:.2f}/{100 * val['hard']:.2f}",
                    stats.images_per_s, stats.seconds,
                )
                history.append(stats)
                if self.on_epoch is not None:
                    self.on_epoch(stats)
        finally:
            writer.close()
        best = self.out / "model_best.safetensors"
        if last_model is None and self.start_epoch > 0:
            last_model = self.out / f"model_epoch{self.start_epoch}.safetensors"
        return TrainResult(
            out=self.out,
            epochs=self.start_epoch,
            steps=self.global_step,
            history=history,
            best_map=self.best_map,
            checkpoint=self.out / CHECKPOINT_NAME,
            last_model=last_model,
            best_model=best if best.is_file() else None,
            metrics=writer.csv_path,
            curves=writer.curves_path,
            config=self.out / "config.yaml",
        )


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """``Trainer(config, **kwargs).fit()``."""
    return Trainer(config, **kwargs).fit()
