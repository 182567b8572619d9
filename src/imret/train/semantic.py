"""Training of the joint image–caption embedding (Gordo & Larlus, CVPR 2017) from captioned images.

Two embeddings of one ``D``-dimensional space, both L2-normalised:

* images: an imret :class:`~imret.models.RetrievalNet`, trunk → GeM → L2 → FC (``model.whitening``
  = ``D``) → L2, written as an imret checkpoint that :func:`imret.load_model` rebuilds;
* captions: a :class:`~imret.text.CaptionEncoder`, tf-idf fitted on the training captions and a
  learned ``W``: ``θ(t) = Wᵀt / ‖Wᵀt‖``, written with :meth:`~imret.text.CaptionEncoder.save`.

A step takes ``batch_size`` random training images, their image embeddings ``φ`` and, per image,
the embedding ``θ`` of *one* of its captions drawn at random (a new draw every step); the
semantic relevance of two images is the cosine similarity of their caption tf-idf vectors (all
captions of an image as one document, :meth:`~imret.text.CaptionEncoder.transform_images`). The
loss is the paper's ``w_v L_v + w_t1 L_t1 + w_t2 L_t2`` (:func:`imret.text.joint_ranking_loss`):
``L_v`` over the batch's relevance triplets (``loss.min_gap``, optionally the hardest
``loss.per_anchor`` per anchor), the cross-modal terms over each image's own caption against the
rest of the batch (``loss.cross_modal: pairs``, the default; ``relevance`` is the paper's literal
reading, which leaves text → image search near chance on Flickr8k); ``loss.weights: [1, 0, 0]``
trains the visual-only model (no ``θ``, ``W`` untouched). The defaults (weights ``[5, 1, 1]``,
margins 0.1 / 0.2, ``min_gap`` 0.1, every triplet, Adam at 2e-3, cosine) were chosen on Flickr8k dev.

``freeze_trunk: true`` (the CPU-practical mode) describes every training and dev image with the
trunk once, caches the result on disk (``data.cache_dir``, default ``<out>/cache``; reused by
later runs with the same trunk, weights, image size and image list) and trains only the head
and ``W``. With a global head the cache holds the GeM-pooled trunk vector (``cache: pooled``,
``(N, C)`` float32): exact for a frozen trunk, with the GeM exponent frozen at ``model.gem_p`` too
(the pooled vector depends on it); ``cache: maps`` keeps the trunk's feature maps instead (float16,
``(N, C, h, w)`` per level) so that ``p`` and any head train. Gordo & Larlus fine-tune the whole
network (a ResNet-101); ``freeze_trunk: false`` does that here too, on decoded images every step
(``data.augment`` then applies :class:`~imret.data.RetrievalAugment`).

Before the first epoch the FC layer can start from the PCA of the (L2-normalised) pooled training
vectors (``fc_init: pca``; ``identity`` keeps imret's truncated identity). Images are resized to
``data.image_size`` squared (Flickr8k's photos are 224 × 224 squares already).

Every ``validation.every`` epochs the dev split is scored (:mod:`imret.semantic_eval`): NDCG@k
and PCC of image → image retrieval with the dev captions' tf-idf relevance (idf of the training
split), and text → image / image → text Recall@1/5/10 and median rank. The model of the best
dev ``validation.metric`` is kept (``model_best.safetensors`` + ``text_best.safetensors``); the
test split is never read.

Files in ``out``: ``config.yaml`` (resolved), ``model_last.safetensors`` / ``text_last.safetensors``,
``model_best.safetensors`` / ``text_best.safetensors``, ``log.csv`` (one row per epoch: losses,
learning rate, dev metrics), ``steps.csv`` (loss every ``log_every`` steps), ``curves.png`` and
``checkpoint_last.pt`` (``resume: true`` continues from it). ``log.csv`` and the checkpoint are
rewritten after every epoch, the curves at the end of :meth:`SemanticTrainer.fit`.

Distributed (``torchrun``, :mod:`imret.train.distributed`): ``batch_size`` is the *global*
batch, and a run of ``W`` processes trains the same model as one process (to float round-off).
Every rank draws the same step batches and caption rows (seeded by ``seed`` and the epoch);
rank ``r`` takes the ``r``-th contiguous slice of each batch (``np.array_split``) and embeds
its images (``φ``) and their drawn captions (``θ``); the slices are all-gathered with this
rank's rows put back into its autograd graph, so every rank computes the loss of the whole
batch (with the whole batch's relevance matrix) and back-propagates it into its own rows. The
gradients of all ranks are then *summed* (an all-reduce, not DDP's mean): the gradient of a
loss with respect to a parameter is the sum of what flows through each row, so the sum is the
single-process gradient, and the identical optimizer step on every rank keeps the parameters
(head, GeM ``p``, trunk, ``W``) equal. Rank 0 computes the frozen-trunk cache (the others wait,
then read it; a rank that cannot see the cache folder computes its own, written under its own
temporary name and moved in place atomically) and the PCA start of the FC layer, which it
broadcasts. Dev evaluation: each rank embeds a slice of the dev images, the slices are
all-gathered and every rank computes the same metrics (so all agree on the best epoch).
Rank 0 alone writes files and logs. ``checkpoint_last.pt`` does not depend on the number of
processes: a run can resume with another. Not exact across process counts: BatchNorm with
``model.freeze_batchnorm: false`` (each rank's statistics come from its slice; rank 0's
running statistics are saved) and random layers in a trained trunk (dropout, drop-path). Each
rank needs at least one image per step (``batch_size >= W``).

    torchrun --nproc-per-node 2 -m imret.cli train configs/train_semantic.yaml
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_path
from ..models import RetrievalNet, save_model
from .config import ModelConfig, OptimConfig, SCHEDULES, OPTIMIZERS, _build, _choice
from .distributed import DistInfo, all_gather_rows, barrier, broadcast_object, broadcast_parameters

__all__ = [
    "CaptionDataConfig",
    "SemanticLossConfig",
    "TextConfig",
    "SemanticValidationConfig",
    "SemanticTrainConfig",
    "SemanticEpochStats",
    "SemanticTrainResult",
    "SemanticTrainer",
    "semantic_config_from_dict",
    "is_semantic_config",
    "load_captioned_splits",
    "trunk_features",
    "describe_features",
    "dev_metrics",
    "plot_semantic_curves",
    "train",
]

CACHE_MODES = ("auto", "pooled", "maps")
FC_INITS = ("pca", "identity")
CHECKPOINT_NAME = "checkpoint_last.pt"
_CACHE_VERSION = 1


# ----------------------------------------------------------------------------------- config


@dataclass
class CaptionDataConfig:
    kind: str = "captions"  # captions: the joint image–caption trainer (this module)
    flickr8k: str | None = None  # Flickr8k root (captions.csv, images/, splits/); or captions_csv
    captions_csv: str | None = None  # a path,caption CSV of training images (instead of flickr8k)
    dev_csv: str | None = None  # with captions_csv: a path,caption CSV of dev images (none: no validation)
    root: str = ""  # image root of the CSVs' relative paths (default: each CSV's folder)
    train_split: str = "train"  # flickr8k: the split trained on
    dev_split: str | None = "dev"  # flickr8k: the split validated on (null: no validation); never test
    image_size: int = 224  # images resized to image_size x image_size pixels
    augment: bool = False  # RetrievalAugment crops / colour jitter (freeze_trunk: false only)
    workers: int = 2  # data loading processes
    cache_dir: str | None = None  # frozen-trunk feature cache (default <out>/cache)


@dataclass
class SemanticLossConfig:
    name: str = "semantic"  # the only loss of this trainer: w_v L_v + w_t1 L_t1 + w_t2 L_t2
    margin: float = 0.1  # m of L_v (and of L_t1 / L_t2 with cross_modal: relevance), on cosine similarities
    weights: list[float] = field(default_factory=lambda: [5.0, 1.0, 1.0])  # (w_v, w_t1, w_t2); [1, 0, 0]: visual only
    per_anchor: int | None = None  # hardest violating triplets kept per anchor (null: every valid triplet)
    min_gap: float = 0.1  # a positive must be this much more relevant than the negative
    cross_modal: str = "pairs"  # pairs: own caption / image vs the rest of the batch | relevance: L_v's triplets
    cross_margin: float = 0.2  # m of L_t1 / L_t2 with cross_modal: pairs
    cross_modal_self: bool = True  # cross_modal: relevance: an image's own caption is a positive too


@dataclass
class TextConfig:
    tfidf: dict[str, Any] = field(default_factory=dict)  # imret.text.TfidfConfig fields, e.g. {min_df: 2}
    lr_mult: float = 1.0  # learning rate of W: this multiple of optim.lr
    image_docs: str = "concat"  # relevance documents: concat (all captions of an image as one) | mean


@dataclass
class SemanticValidationConfig:
    every: int = 1  # epochs between dev evaluations (and the last epoch always)
    metric: str = "auto"  # best-model selection: auto (rsum, or ndcg@<largest k> when visual only) or a log column
    ks: list[int] = field(default_factory=lambda: [10, 50, 100])  # NDCG@k / PCC@k cut-offs


def _default_model() -> ModelConfig:
    return ModelConfig(backbone="tf_efficientnet_lite0", pool="gem", whitening=512)


def _default_optim() -> OptimConfig:
    return OptimConfig(name="adam", lr=2e-3, weight_decay=0.0, schedule="cosine", p_lr_mult=1.0)


@dataclass
class SemanticTrainConfig:
    out: str = "runs/semantic"  # run folder: models, caption encoders, logs, curves
    epochs: int = 30
    batch_size: int = 128  # images per step (each with one random caption of its own)
    freeze_trunk: bool = True  # train head + W on cached trunk features (false: the whole network, as the paper)
    cache: str = "auto"  # freeze_trunk: auto (pooled for a global head) | pooled | maps
    trunk_lr_mult: float = 0.1  # freeze_trunk false: trunk learning rate = this x optim.lr
    fc_init: str = "pca"  # FC (whitening) layer start: pca of the pooled training vectors | identity
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast of the trunk)
    resume: bool = False  # continue from <out>/checkpoint_last.pt
    log_every: int = 10  # steps between loss points in steps.csv
    max_steps_per_epoch: int | None = None  # cap on steps per epoch (smoke tests)
    model: ModelConfig = field(default_factory=_default_model)
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    loss: SemanticLossConfig = field(default_factory=SemanticLossConfig)
    text: TextConfig = field(default_factory=TextConfig)
    optim: OptimConfig = field(default_factory=_default_optim)
    validation: SemanticValidationConfig = field(default_factory=SemanticValidationConfig)

    def __post_init__(self) -> None:
        from ..precision import PRECISIONS
        from ..text.encoder import TfidfConfig

        _choice("data.kind", self.data.kind, ("captions",))
        _choice("loss.name", self.loss.name, ("semantic",))
        _choice("cache", self.cache, CACHE_MODES)
        _choice("fc_init", self.fc_init, FC_INITS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("optim.name", self.optim.name, OPTIMIZERS)
        _choice("optim.schedule", self.optim.schedule, SCHEDULES)
        _choice("text.image_docs", self.text.image_docs, ("concat", "mean"))
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 3:
            raise ValueError(f"batch_size must be >= 3 (a triplet needs three images), got {self.batch_size}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 or null, got {self.max_steps_per_epoch}")
        if self.optim.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.optim.lr}")
        for name in ("trunk_lr_mult",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.text.lr_mult < 0:
            raise ValueError(f"text.lr_mult must be >= 0, got {self.text.lr_mult}")
        d = self.data
        if (d.flickr8k is None) == (d.captions_csv is None):
            raise ValueError("data: give exactly one of data.flickr8k (a Flickr8k root) or data.captions_csv (path,caption)")
        if d.dev_csv is not None and d.captions_csv is None:
            raise ValueError("data.dev_csv goes with data.captions_csv (with data.flickr8k use data.dev_split)")
        if d.flickr8k is not None and d.dev_split == "test":
            raise ValueError("data.dev_split: test is the held-out split; validate on dev (or null for none)")
        if d.image_size < 16:
            raise ValueError(f"data.image_size must be >= 16, got {d.image_size}")
        if d.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {d.workers}")
        if d.augment and self.freeze_trunk:
            raise ValueError("data.augment: the frozen-trunk cache holds one feature per image; "
                             "set data.augment: false or freeze_trunk: false")
        w = self.loss.weights
        if not isinstance(w, list):
            raise ValueError(f"loss.weights: expected a list [w_v, w_t1, w_t2], got {w!r}")
        from ..text.losses import check_joint_options

        try:
            o = check_joint_options(margin=self.loss.margin, weights=w, min_gap=self.loss.min_gap,
                                    per_anchor=self.loss.per_anchor, cross_modal=self.loss.cross_modal,
                                    cross_margin=self.loss.cross_margin)
        except ValueError as e:
            raise ValueError(f"loss.{e}") from None
        self.loss.weights = list(o.weights)
        if self.model.whitening is None:
            raise ValueError("model.whitening: the joint embedding needs the FC layer to D dims, e.g. model.whitening: 512")
        try:
            TfidfConfig.from_dict(dict(self.text.tfidf))
        except (ValueError, TypeError) as e:
            raise ValueError(f"text.tfidf: {e}") from None
        v = self.validation
        if v.every < 1:
            raise ValueError(f"validation.every must be >= 1, got {v.every}")
        if not isinstance(v.ks, list) or not v.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in v.ks):
            raise ValueError(f"validation.ks: expected a list of positive integers, got {v.ks!r}")
        names = metric_names(v.ks, self.visual_only)
        if v.metric != "auto" and v.metric not in names:
            raise ValueError(f"validation.metric: unknown value {v.metric!r}; available: auto, {', '.join(names)}")

    @property
    def visual_only(self) -> bool:
        """``w_t1 = w_t2 = 0``: no caption embedding is trained."""
        return self.loss.weights[1] == 0 and self.loss.weights[2] == 0

    @property
    def multistage(self) -> bool:  # what imret train's summary line asks of a config
        return False

    @property
    def selection_metric(self) -> str:
        m = self.validation.metric
        if m != "auto":
            return m
        return f"ndcg@{max(self.validation.ks)}" if self.visual_only else "rsum"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def metric_names(ks: Sequence[int], visual_only: bool) -> list[str]:
    """The dev metrics (columns of ``log.csv``) for cut-offs ``ks``."""
    ks = sorted(set(int(k) for k in ks))
    names = [f"ndcg@{k}" for k in ks] + [f"pcc@{k}" for k in ks] + ["pcc_all"]
    if not visual_only:
        names += [f"{d}_r@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)] + ["t2i_medr", "i2t_medr", "rsum"]
    return names


def is_semantic_config(d: Any) -> bool:
    """Whether a config mapping is for this trainer (``data.kind: captions``)."""
    return isinstance(d, dict) and isinstance(d.get("data"), dict) and d["data"].get("kind") == "captions"


def semantic_config_from_dict(d: dict[str, Any]) -> SemanticTrainConfig:
    """Build a :class:`SemanticTrainConfig`; unknown keys and wrong types raise ``ValueError`` naming them."""
    if not isinstance(d, dict):
        raise ValueError(f"a training config is a mapping, got {type(d).__name__}")
    d = dict(d)
    for key, default in (("model", _default_model), ("optim", _default_optim)):
        if isinstance(d.get(key), dict):  # this trainer's defaults under the keys a file gives
            d[key] = {**dataclasses.asdict(default()), **d[key]}
    return _build(SemanticTrainConfig, d, "")


# ------------------------------------------------------------------------------------- data


def load_captioned_splits(data: CaptionDataConfig):
    """``(train, dev)`` :class:`~imret.text.CaptionedImages` of a data config (``dev`` may be None)."""
    from ..text import load_flickr8k, read_captions_csv

    if data.flickr8k is not None:
        every = load_flickr8k(data.flickr8k)
        train = every.subset(data.train_split)
        dev = every.subset(data.dev_split) if data.dev_split else None
        if data.train_split == data.dev_split:
            raise ValueError(f"data.train_split and data.dev_split are both {data.train_split!r}")
        return train, dev
    root = data.root or None
    train = read_captions_csv(data.captions_csv, root)
    dev = read_captions_csv(data.dev_csv, root) if data.dev_csv else None
    return train, dev


class _SquareImages(torch.utils.data.Dataset):
    """``dataset[i] = (image (3, S, S), i)``: decoded, [augmented], resized to a square, normalised."""

    def __init__(self, paths: Sequence[str], size: int, mean, std, augment=None, seed: int = 0) -> None:
        self.paths, self.size, self.mean, self.std = list(paths), int(size), mean, std
        self.augment, self.seed, self.epoch = augment, seed, 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ..data.transforms import sample_rng
        from ..images import RESAMPLE, load_image, to_tensor

        img = load_image(self.paths[i])
        if self.augment is not None:
            img = self.augment(img, sample_rng(self.seed, self.epoch, i))
        img = img.convert("RGB").resize((self.size, self.size), RESAMPLE)
        return to_tensor(img, self.mean, self.std), i


def _loader(ds, batches, workers: int, device: torch.device):
    def collate(items):
        return torch.stack([x for x, _ in items]), torch.tensor([i for _, i in items], dtype=torch.long)

    return torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                                       pin_memory=device.type == "cuda")


# ---------------------------------------------------------------------------- trunk cache


def _cache_key(model: RetrievalNet, paths: Sequence[str], size: int, mode: str, gem_p: list[float] | None) -> str:
    h = hashlib.sha256()
    spec = {k: v for k, v in model.spec.to_dict().items() if k not in ("whitening", "head", "head_kwargs", "pool_kwargs")}
    trunk_sha = hashlib.sha256()
    for k, v in sorted(model.trunk.state_dict().items()):  # every byte: a float sum would depend on the thread count
        trunk_sha.update(k.encode())
        trunk_sha.update(str((tuple(v.shape), str(v.dtype))).encode())
        trunk_sha.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({"v": _CACHE_VERSION, "spec": spec, "size": size, "mode": mode, "p": gem_p,
                         "levels": str(model.feature_levels), "trunk": trunk_sha.hexdigest()}, sort_keys=True).encode())
    for p in paths:
        h.update(os.path.abspath(os.fspath(p)).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def trunk_features(
    model: RetrievalNet,
    paths: Sequence[str],
    *,
    image_size: int,
    mode: str,
    cache_dir: str | os.PathLike | None,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """What a frozen trunk makes of each image, cached on disk: a list of arrays, row ``i`` for ``paths[i]``.

    ``mode="pooled"``: ``[(N, C) float32]``, the head's pooling of the last map (a global head);
    ``mode="maps"``: one ``(N, C_l, h_l, w_l)`` float16 array per map the head reads. Images are
    resized to ``image_size`` squared. The cache (``cache_dir/<key>/``, the key a hash of the
    trunk's spec and weights, the pooling exponent, the size and the path list) is written
    atomically and read back as memory maps; ``cache_dir=None`` keeps everything in memory.
    ``on_batch`` is called with the number of images of every trunk forward (tests count them).
    """
    if mode not in ("pooled", "maps"):
        raise ValueError(f"unknown mode {mode!r}; available: 'pooled', 'maps'")
    device = torch.device(device)
    pool = model.head.pool if mode == "pooled" else None
    if mode == "pooled" and pool is None:
        raise ValueError(f"cache: pooled needs a head with a pooling layer (the global head), got {model.spec.head!r}")
    p = getattr(pool, "p", None)
    gem_p = None if p is None else [round(float(x), 6) for x in p.detach().flatten().tolist()]
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / _cache_key(model, paths, image_size, mode, gem_p)
        meta_path = folder / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            return [np.load(folder / f"level{i}.npy", mmap_mode="r") for i in range(meta["levels"])]
    ds = _SquareImages(paths, image_size, model.mean, model.std)
    n = len(ds)
    batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    outs: list[np.ndarray] | None = None
    tmp = None
    if folder is not None:
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    was_training = model.training
    model.eval()
    from tqdm.auto import tqdm

    try:
        with torch.no_grad():
            for x, idx in tqdm(_loader(ds, batches, workers, device), total=len(batches), disable=not progress,
                               desc="trunk features", unit="batch", leave=False):
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    maps = model.feature_maps(x.to(device))
                if on_batch is not None:
                    on_batch(int(x.shape[0]))
                got = [pool(maps[-1].float()).float()] if mode == "pooled" else [m.half() for m in maps]
                if outs is None:
                    dt = np.float32 if mode == "pooled" else np.float16
                    shapes = [(n,) + tuple(g.shape[1:]) for g in got]
                    if tmp is not None:
                        outs = [np.lib.format.open_memmap(tmp / f"level{i}.npy", mode="w+", dtype=dt, shape=s)
                                for i, s in enumerate(shapes)]
                    else:
                        outs = [np.empty(s, dtype=dt) for s in shapes]
                ids = idx.numpy()
                for o, g in zip(outs, got):
                    o[ids] = g.cpu().numpy()
    finally:
        model.train(was_training)
    assert outs is not None  # n >= 1: every split has images
    if tmp is not None:
        for o in outs:
            o.flush()
        (tmp / "meta.json").write_text(json.dumps({"levels": len(outs), "images": n, "mode": mode,
                                                    "image_size": image_size}))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
        levels = len(outs)
        del outs
        return [np.load(folder / f"level{i}.npy", mmap_mode="r") for i in range(levels)]
    return outs


def describe_features(model: RetrievalNet, feats: Sequence[np.ndarray | torch.Tensor], mode: str, rows=None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, D)`` descriptors from cached trunk features (all rows, or ``rows``); differentiable in the head."""
    device = torch.device(device)
    sel = [torch.from_numpy(np.array(f[rows] if rows is not None else f)) for f in feats]
    sel = [s.to(device=device, dtype=torch.float32) for s in sel]
    if mode == "pooled":
        return model.head.describe_pooled(sel[0])
    return model.head(sel)


# ------------------------------------------------------------------------------ evaluation


def dev_metrics(phi: np.ndarray, theta: np.ndarray | None, owner: Sequence[int], relevance: np.ndarray,
                ks: Sequence[int]) -> dict[str, float]:
    """The dev metrics of :func:`metric_names`: semantic (NDCG@k, PCC@k, PCC over all) and, with
    ``theta`` (all captions, ``owner[j]`` the image of caption ``j``), cross-modal recalls, median
    ranks and ``rsum`` (the sum of the six recalls, in percent)."""
    from ..semantic_eval import evaluate_cross_modal, evaluate_semantic

    phi = np.asarray(phi, dtype=np.float64)
    sem = evaluate_semantic(phi @ phi.T, relevance, exclude_self=True, ks=list(ks))
    out: dict[str, float] = {}
    for k, v in sem.ndcg.items():
        out[f"ndcg@{k}"] = v
    for k, v in sem.pcc.items():
        out[f"pcc@{k}"] = v
    out["pcc_all"] = sem.pcc_all
    if theta is not None:
        xm = evaluate_cross_modal(phi, theta, np.asarray(owner), ks=(1, 5, 10))
        for k in (1, 5, 10):
            out[f"t2i_r@{k}"] = xm.text_to_image[k]
            out[f"i2t_r@{k}"] = xm.image_to_text[k]
        out["t2i_medr"] = xm.text_to_image_median_rank
        out["i2t_medr"] = xm.image_to_text_median_rank
        out["rsum"] = 100 * sum(xm.text_to_image[k] + xm.image_to_text[k] for k in (1, 5, 10))
    return out


def plot_semantic_curves(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "",
                         metrics: Sequence[str] | None = None) -> None:
    """Loss (total and parts) and dev metrics per epoch, two panels, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "total"), ("loss_v", "L_v"), ("loss_t1", "L_t1"), ("loss_t2", "L_t2")):
        ys = [r.get(key) for r in rows]
        if any(y is not None and y != 0 for y in ys):
            a.plot(ep, [math.nan if y is None else y for y in ys], marker="o", ms=3, label=label)
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    a.legend()
    a.grid(alpha=0.3)
    shown = list(metrics) if metrics is not None else [k for k in ("ndcg@10", "ndcg@50", "pcc_all", "t2i_r@1", "t2i_r@5", "t2i_r@10")
                                                         if any(r.get(k) is not None for r in rows)]
    for key in shown:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            b.plot(*zip(*pts), marker="o", ms=3, label=key)
    b.set_xlabel("epoch")
    b.set_ylabel("dev metric (fraction)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------- trainer


@dataclass
class SemanticEpochStats:
    """One epoch (a row of ``log.csv``). ``map_*`` are always None (the instance-level trainer's
    columns, kept so that callers of :class:`~imret.train.EpochStats` can read these too)."""

    epoch: int
    step: int
    loss: float
    loss_v: float
    loss_t1: float
    loss_t2: float
    triplets: float  # mean kept triplets per step
    lr: float
    gem_p: float | None
    images_per_s: float
    seconds: float
    dev: dict[str, float] | None = None  # dev metrics (None: not validated this epoch)
    map_easy: None = None
    map_medium: None = None
    map_hard: None = None

    def row(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("dev", "map_easy", "map_medium", "map_hard")}
        d.update(self.dev or {})
        return d


@dataclass
class SemanticTrainResult:
    """The outcome of :meth:`SemanticTrainer.fit`; paths in the run folder."""

    out: Path
    epochs: int
    steps: int
    history: list[SemanticEpochStats] = field(default_factory=list)
    metric: str = ""  # the dev metric that chose the best epoch
    best_value: float | None = None
    best_epoch: int | None = None
    checkpoint: Path | None = None
    last_model: Path | None = None
    last_text: Path | None = None
    best_model: Path | None = None
    best_text: Path | None = None
    metrics: Path | None = None  # log.csv
    steps_log: Path | None = None
    curves: Path | None = None
    config: Path | None = None

    @property
    def best_map(self) -> float | None:  # the name imret train's summary reads
        return self.best_value


def _gem_p(model: RetrievalNet) -> float | None:
    p = getattr(model.pool, "p", None)
    return float(p.detach().float().mean()) if isinstance(p, torch.Tensor) else None


class SemanticTrainer:
    """Builds the image model, caption encoder, data, loss and optimizer of a
    :class:`SemanticTrainConfig`; :meth:`fit` trains (see the module docstring).

    Args:
        config: the configuration.
        dist: this process's place in a ``torchrun`` job (:func:`~imret.train.distributed.init_distributed`);
            with more than one process every rank runs :meth:`fit` (and :meth:`evaluate`) together.
        progress: tqdm progress bars.
        logger: where messages go (default ``logging.getLogger("imret.train")``).
        on_epoch: called with each epoch's :class:`SemanticEpochStats`.
        on_trunk_batch: called with the image count of every trunk forward pass (tests, profiling).
    """

    def __init__(
        self,
        config: SemanticTrainConfig,
        *,
        dist: DistInfo | None = None,
        progress: bool = False,
        logger: logging.Logger | None = None,
        on_epoch: Callable[[SemanticEpochStats], None] | None = None,
        on_trunk_batch: Callable[[int], None] | None = None,
    ) -> None:
        from ..text import CaptionEncoder, JointRankingLoss
        from ..text.encoder import TfidfConfig
        from .trainer import _autocast_dtype, _resolve_device, build_model

        if not isinstance(config, SemanticTrainConfig):
            raise TypeError(f"config must be a SemanticTrainConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.dist = dist or DistInfo()
        self.progress, self.on_epoch, self.on_trunk_batch = progress, on_epoch, on_trunk_batch
        self.log = logger or logging.getLogger("imret.train")
        self.out = Path(cfg.out)
        self.device = _resolve_device(cfg.device, self.dist)
        self.amp_dtype = _autocast_dtype(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        if cfg.resume and not (self.out / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(f"resume: true but there is no {self.out / CHECKPOINT_NAME}")
        if not cfg.resume and (self.out / CHECKPOINT_NAME).is_file():
            raise FileExistsError(f"{self.out / CHECKPOINT_NAME} exists: set resume: true to continue it, or use another out")

        self.images, self.dev = load_captioned_splits(cfg.data)
        if min(cfg.batch_size, len(self.images)) < self.dist.world_size:
            raise ValueError(
                f"batch_size {min(cfg.batch_size, len(self.images))} (images per step, all processes together) is "
                f"smaller than the {self.dist.world_size} processes: every process needs an image per step; "
                f"raise batch_size or use fewer processes")
        self.model = build_model(cfg.model).to(self.device)
        self.dim = self.model.dim
        # text side: tf-idf of the training captions, W at random (seeded)
        texts, owner = self.images.flat_captions()
        self.encoder = CaptionEncoder(self.dim, TfidfConfig.from_dict(dict(cfg.text.tfidf))).fit(texts, seed=cfg.seed)
        self.encoder.to(self.device)
        self.caption_tfidf = self.encoder.transform(texts)  # (Nc, V), one row per training caption
        self.caption_start = np.concatenate([[0], np.cumsum([len(c) for c in self.images.captions])]).astype(np.int64)
        self.image_tfidf = self.encoder.transform_images(self.images.captions, how=cfg.text.image_docs)
        if self.dev is not None:
            dev_texts, dev_owner = self.dev.flat_captions()
            self.dev_caption_tfidf = self.encoder.transform(dev_texts)
            self.dev_owner = np.asarray(dev_owner)
            from ..text import tfidf_similarity

            self.dev_relevance = tfidf_similarity(self.encoder.transform_images(self.dev.captions, how=cfg.text.image_docs))
        w = cfg.loss.weights
        self.loss = JointRankingLoss(cfg.loss.margin, tuple(w), min_gap=cfg.loss.min_gap,
                                     per_anchor=cfg.loss.per_anchor, cross_modal_self=cfg.loss.cross_modal_self,
                                     cross_modal=cfg.loss.cross_modal, cross_margin=cfg.loss.cross_margin)

        # trunk: frozen (features cached) or trained
        self.mode = None
        if cfg.freeze_trunk:
            self.mode = cfg.cache if cfg.cache != "auto" else ("pooled" if cfg.model.head == "global" else "maps")
            for p in self.model.trunk.parameters():
                p.requires_grad_(False)
            if self.mode == "pooled":
                for p in self.model.head.pool.parameters():
                    p.requires_grad_(False)
        self.start_epoch, self.global_step = 0, 0
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.rows: list[dict[str, Any]] = []
        self._train_feats: list[np.ndarray] | None = None
        self._dev_feats: list[np.ndarray] | None = None
        self._fc_ready = False
        self._cache_ready = False
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        if cfg.resume:
            self._load_checkpoint()
        # the same seeded start on every rank already; made certain (a no-op on one process)
        broadcast_parameters(list(self.model.parameters()) + list(self.encoder.parameters()))

    # ------------------------------------------------------------------------- pieces

    @property
    def cache_dir(self) -> Path:
        return Path(self.config.data.cache_dir) if self.config.data.cache_dir else self.out / "cache"

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg, o = self.config, self.config.optim
        pool = [p for p in self.model.pool.parameters() if p.requires_grad] if self.model.pool is not None else []
        in_pool = {id(p) for p in pool}
        trunk = [p for p in self.model.trunk.parameters() if p.requires_grad]
        in_trunk = {id(p) for p in trunk}
        head = [p for p in self.model.parameters() if p.requires_grad and id(p) not in in_pool and id(p) not in in_trunk]
        groups = [{"name": "head", "params": head, "lr": o.lr, "weight_decay": o.weight_decay}]
        if pool:
            groups.append({"name": "pool", "params": pool, "lr": o.lr * o.p_lr_mult, "weight_decay": 0.0})
        if trunk:
            groups.append({"name": "trunk", "params": trunk, "lr": o.lr * cfg.trunk_lr_mult, "weight_decay": o.weight_decay})
        if not cfg.visual_only:
            groups.append({"name": "text", "params": [self.encoder.proj.weight], "lr": o.lr * cfg.text.lr_mult,
                           "weight_decay": o.weight_decay})
        if o.name == "adam":
            return torch.optim.Adam(groups, lr=o.lr)
        if o.name == "adamw":
            return torch.optim.AdamW(groups, lr=o.lr)
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)

    def _scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        from .trainer import _EpochSchedule

        o = self.config.optim
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _EpochSchedule(o.schedule, self.config.epochs, o.gamma, o.step_epochs, o.warmup_epochs))

    def _trunk(self, paths: Sequence[str]) -> list[np.ndarray]:
        d = self.config.data
        return trunk_features(self.model, paths, image_size=d.image_size, mode=self.mode, cache_dir=self.cache_dir,
                              device=self.device, workers=d.workers, autocast_dtype=self.amp_dtype,
                              progress=self.progress and self.dist.is_main, on_batch=self.on_trunk_batch)

    def train_features(self) -> list[np.ndarray]:
        """The cached trunk features of the training images (computed on the first call)."""
        if self._train_feats is None:
            self._train_feats = self._trunk(self.images.paths)
        return self._train_feats

    def _prepare_cache(self) -> None:
        """Frozen trunk: the training (and dev) trunk features, computed by rank 0 first and then
        read by the other ranks, so that one trunk pass serves the whole job."""
        if self.mode is None or self._cache_ready:  # (a flag, the same on every rank: each waits at the barrier once)
            return
        self._cache_ready = True
        if self.dist.is_main:
            self.train_features()
            if self.dev is not None and self._dev_feats is None:
                self._dev_feats = self._trunk(self.dev.paths)
        barrier()
        self.train_features()
        if self.dev is not None and self._dev_feats is None:
            self._dev_feats = self._trunk(self.dev.paths)

    def _set_trainable_mode(self) -> None:
        from .multistage import freeze_batchnorm

        self.model.train()
        if self.config.freeze_trunk:
            self.model.trunk.eval()
        elif self.config.model.freeze_batchnorm:
            freeze_batchnorm(self.model)

    @torch.no_grad()
    def _init_fc(self) -> None:
        """``fc_init: pca``: the FC layer := the top-D PCA of the L2-normalised pooled training vectors."""
        self._fc_ready = True
        if self.config.fc_init != "pca" or self.model.whiten is None:
            return
        pca: tuple[torch.Tensor, torch.Tensor] | str | None = None
        if self.dist.is_main:  # one trunk pass (freeze_trunk: false) and one SVD for the job, broadcast
            if self.mode == "pooled":
                v = torch.tensor(np.asarray(self.train_features()[0]), dtype=torch.float64)
            else:
                v = torch.cat([self.model.pool(m.float()).double().cpu() for m in self._pooled_batches()])
            if self.model.head.l2_before_whiten:
                v = torch.nn.functional.normalize(v, dim=1)
            n, c = v.shape
            if self.dim > min(n, c):
                pca = (f"fc_init: pca gives at most min(images, channels) = {min(n, c)} components, "
                       f"model.whitening is {self.dim}; use fc_init: identity or a smaller dimension")
            else:
                mean = v.mean(0)
                _, _, vt = torch.linalg.svd(v - mean, full_matrices=False)
                pca = (vt[: self.dim].float(), mean.float())
        pca = broadcast_object(pca)
        if isinstance(pca, str):  # raised on every rank, so that none waits for the others
            raise ValueError(pca)
        self.model.set_whitening(*pca)
        self.model.to(self.device)
        self.optimizer = self._optimizer()  # the FC layer is a new module
        self.scheduler = self._scheduler()

    def _pooled_batches(self):
        """Last trunk maps of the training images, batch by batch (maps cache or a trunk pass)."""
        if self.mode == "maps":
            f = self.train_features()[-1]
            for s in range(0, f.shape[0], 256):
                yield torch.from_numpy(np.array(f[s:s + 256]))
            return
        d = self.config.data
        ds = _SquareImages(self.images.paths, d.image_size, self.model.mean, self.model.std)
        n = len(ds)
        self.model.eval()
        for x, _ in _loader(ds, [list(range(s, min(n, s + 32))) for s in range(0, n, 32)], d.workers, self.device):
            if self.on_trunk_batch is not None:
                self.on_trunk_batch(int(x.shape[0]))
            yield self.model.feature_maps(x.to(self.device))[-1].cpu()

    def _epoch_batches(self, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """This epoch's image batches and, per image of each, the training caption row drawn."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch])
        n = len(self.images)
        perm = rng.permutation(n)
        b = min(cfg.batch_size, n)
        steps = n // b
        if cfg.max_steps_per_epoch is not None:
            steps = min(steps, cfg.max_steps_per_epoch)
        batches = [perm[s * b:(s + 1) * b] for s in range(steps)]
        counts = np.diff(self.caption_start)
        caps = [self.caption_start[bt] + (rng.random(len(bt)) * counts[bt]).astype(np.int64) for bt in batches]
        return batches, caps

    def _embed_batch(self, idx: np.ndarray, images=None) -> torch.Tensor:
        if self.mode is not None:
            return describe_features(self.model, self.train_features(), self.mode, rows=idx, device=self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            return self.model(images.to(self.device, non_blocking=True)).float()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The dev metrics of the current model (:func:`dev_metrics`). Distributed: every rank must
        call it; each embeds a contiguous slice of the dev images and all get the same metrics."""
        self.model.eval()
        n = len(self.dev)
        mine = np.array_split(np.arange(n), self.dist.world_size)[self.dist.rank]
        parts = [torch.empty(0, self.dim)]
        if self.mode is not None:
            if self._dev_feats is None:
                self._dev_feats = self._trunk(self.dev.paths)
            parts += [describe_features(self.model, self._dev_feats, self.mode, rows=mine[s:s + 512], device=self.device).cpu()
                      for s in range(0, len(mine), 512)]
        else:
            d = self.config.data
            ds = _SquareImages(self.dev.paths, d.image_size, self.model.mean, self.model.std)
            for x, _ in _loader(ds, [mine[s:s + 32].tolist() for s in range(0, len(mine), 32)], d.workers, self.device):
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                    parts.append(self.model(x.to(self.device)).float().cpu())
        phi, _ = all_gather_rows(torch.cat([p.float() for p in parts]).to(self.device))
        theta = None if self.config.visual_only else self.encoder(self.dev_caption_tfidf).cpu().numpy()
        return dev_metrics(phi.float().cpu().numpy(), theta, self.dev_owner, self.dev_relevance, self.config.validation.ks)

    # ------------------------------------------------------------------------- training

    def _train_epoch(self, epoch: int, steps_log) -> dict[str, float]:
        from ..text import tfidf_similarity
        from tqdm.auto import tqdm

        cfg = self.config
        batches, caps = self._epoch_batches(epoch)
        # this rank's contiguous slice of every batch (all batches have one size)
        size = len(batches[0]) if batches else 0
        mine = np.array_split(np.arange(size), self.dist.world_size)[self.dist.rank]
        lo, hi = (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)
        self._set_trainable_mode()
        self.encoder.train()
        if self.mode is None:
            from ..data import RetrievalAugment

            d = cfg.data
            aug = RetrievalAugment(d.image_size) if d.augment else None
            ds = _SquareImages(self.images.paths, d.image_size, self.model.mean, self.model.std, augment=aug, seed=cfg.seed)
            ds.epoch = epoch
            source = _loader(ds, [b[lo:hi].tolist() for b in batches], d.workers, self.device)
        else:
            self.train_features()
            source = ((None, torch.as_tensor(b[lo:hi])) for b in batches)
        sums = np.zeros(5)
        window, in_window = 0.0, 0
        bar = tqdm(source, total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not (self.progress and self.dist.is_main), leave=False)
        for step, (images, idx) in enumerate(bar):
            idx = idx.numpy()
            if self.mode is None and self.on_trunk_batch is not None:
                self.on_trunk_batch(len(idx))
            phi = self._gathered(self._embed_batch(idx, images))
            theta = None if cfg.visual_only else self._gathered(self.encoder(self.caption_tfidf[caps[step][lo:hi]]))
            rel = tfidf_similarity(self.image_tfidf[batches[step]])  # the whole batch's, on every rank
            out = self.loss(phi, theta, rel)
            self.optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            self._sum_gradients()
            self.optimizer.step()
            self.global_step += 1
            v = float(out.total.detach())
            if not math.isfinite(v):
                raise RuntimeError(f"training loss is {v} in epoch {epoch + 1} (step {self.global_step}); lower optim.lr or train in fp32")
            sums += [v, float(out.visual.detach()), float(out.image_text.detach()), float(out.text_image.detach()), out.num_triplets]
            window += v
            in_window += 1
            if self.global_step % cfg.log_every == 0:
                if steps_log is not None:
                    steps_log.writerow([epoch + 1, self.global_step, repr(window / in_window)])
                bar.set_postfix(loss=f"{window / in_window:.4f}")
                window, in_window = 0.0, 0
        bar.close()
        m = sums / max(1, len(batches))
        return {"loss": float(m[0]), "loss_v": float(m[1]), "loss_t1": float(m[2]), "loss_t2": float(m[3]),
                "triplets": float(m[4]), "steps": len(batches)}

    def _gathered(self, local: torch.Tensor) -> torch.Tensor:
        """The whole batch's rows (rank order) with this rank's own rows kept in its autograd
        graph, the others' as constants (one process: ``local``)."""
        if self.dist.world_size == 1:
            return local
        full, off = all_gather_rows(local)
        return torch.cat([full[:off], local, full[off + local.shape[0]:]])

    def _sum_gradients(self) -> None:
        """Sum the optimizer's gradients over the ranks (in place; a no-op on one process).

        Each rank's gradient is the part of the whole-batch loss's gradient that flows through
        its own rows; the sum is the single-process gradient. A parameter with no gradient on
        any rank keeps none (as in one process: the optimizer skips it)."""
        if self.dist.world_size == 1:
            return
        import torch.distributed as tdist

        from .distributed import _comm_device

        dev = _comm_device()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        seen = torch.tensor([float(p.grad is not None) for p in params], device=dev)
        tdist.all_reduce(seen)
        params = [p for p, k in zip(params, seen.tolist()) if k > 0]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for i, p in enumerate(params):  # buckets of ~16M values: one collective each
            bucket.append(p)
            size += p.numel()
            if i + 1 == len(params) or size + params[i + 1].numel() > 1 << 24:
                flat = torch.cat([q.grad.reshape(-1).to(dev, torch.float32) for q in bucket])
                tdist.all_reduce(flat)
                at = 0
                for q in bucket:
                    q.grad.copy_(flat[at:at + q.numel()].view_as(q.grad))
                    at += q.numel()
                bucket, size = [], 0

    def _save_pair(self, stem: str) -> tuple[Path, Path]:
        model_path, text_path = self.out / f"model_{stem}.safetensors", self.out / f"text_{stem}.safetensors"
        save_model(self.model, model_path)
        self.encoder.save(text_path)
        return model_path, text_path

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": "imret.train.semantic", "version": 1, "epoch": self.start_epoch, "global_step": self.global_step,
            "best_value": self.best_value, "best_epoch": self.best_epoch, "rows": self.rows,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "text": {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()},
            "text_meta": self.encoder.metadata(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "config": self.config.to_dict(), "torch_rng": torch.get_rng_state(),
        }

    def _load_checkpoint(self) -> None:
        from ..models.checkpoints import load_state_strict

        ck = torch.load(self.out / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
        if ck.get("format") != "imret.train.semantic":
            raise ValueError(f"{self.out / CHECKPOINT_NAME} is not a semantic training checkpoint")
        if ck["text_meta"]["vocabulary"] != self.encoder.vocabulary:
            raise ValueError("resume: the training captions changed since the checkpoint (another vocabulary)")
        if self.config.fc_init == "pca" and self.model.whiten is not None:
            self._fc_ready = True
        load_state_strict(self.model, ck["model"], f"resuming from {self.out / CHECKPOINT_NAME}")
        self.encoder.load_state_dict(ck["text"])
        self.model.to(self.device)
        self.encoder.to(self.device)
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()  # before the optimizer's state: building it resets the learning rates
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.start_epoch, self.global_step = int(ck["epoch"]), int(ck["global_step"])
        self.best_value, self.best_epoch, self.rows = ck["best_value"], ck["best_epoch"], list(ck["rows"])
        torch.set_rng_state(ck["torch_rng"])

    def fit(self, until_epoch: int | None = None) -> SemanticTrainResult:
        """Train from the current epoch to ``config.epochs`` (or stop after ``until_epoch``)."""
        from .config import save_config

        cfg, main = self.config, self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        if not self._fc_ready:
            self._init_fc()
        metric = cfg.selection_metric
        history: list[SemanticEpochStats] = []
        end = cfg.epochs if until_epoch is None else min(int(until_epoch), cfg.epochs)
        steps_path = self.out / "steps.csv"
        new_steps = not (cfg.resume and steps_path.is_file())
        last = (None, None)
        with contextlib.ExitStack() as stack:
            steps_log = None
            if main:
                f = stack.enter_context(open(steps_path, "w" if new_steps else "a", newline="", encoding="utf-8"))
                steps_log = csv.writer(f)
                if new_steps:
                    steps_log.writerow(["epoch", "step", "loss"])
            for epoch in range(self.start_epoch, end):
                t0 = time.perf_counter()
                self._prepare_cache()  # the one trunk pass, outside the epoch's timing of steps
                t1 = time.perf_counter()
                parts = self._train_epoch(epoch, steps_log)
                if main:
                    f.flush()
                train_s = time.perf_counter() - t1
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                done = epoch + 1
                dev = None
                if self.dev is not None and (done % cfg.validation.every == 0 or done == cfg.epochs):
                    dev = self.evaluate()
                improved = dev is not None and math.isfinite(dev[metric]) and (
                    self.best_value is None or _better(metric, dev[metric], self.best_value))
                stats = SemanticEpochStats(
                    epoch=done, step=self.global_step, loss=parts["loss"], loss_v=parts["loss_v"], loss_t1=parts["loss_t1"],
                    loss_t2=parts["loss_t2"], triplets=parts["triplets"], lr=lr, gem_p=_gem_p(self.model),
                    images_per_s=parts["steps"] * min(cfg.batch_size, len(self.images)) / max(train_s, 1e-9),
                    seconds=time.perf_counter() - t0, dev=dev)
                self.rows.append(stats.row())
                last = self.out / "model_last.safetensors", self.out / "text_last.safetensors"
                if improved:
                    self.best_value, self.best_epoch = float(dev[metric]), done
                self.start_epoch = done
                if main:
                    self._save_pair("last")
                    if improved or self.dev is None:  # no dev split: the last epoch is the model
                        self._save_pair("best")
                    self._write_log()
                    with atomic_path(self.out / CHECKPOINT_NAME) as tmp:
                        torch.save(self._checkpoint_state(), tmp)
                barrier()  # the epoch's files are there for every rank
                self.log.info("epoch %d/%d: loss %.5f (L_v %.4f, L_t1 %.4f, L_t2 %.4f), %s", done, cfg.epochs, parts["loss"],
                              parts["loss_v"], parts["loss_t1"], parts["loss_t2"],
                              "" if dev is None else f"dev {metric} {dev[metric]:.4f}")
                history.append(stats)
                if self.on_epoch is not None:
                    self.on_epoch(stats)
        if history and main:
            self._write_log(curves=True)
        barrier()
        best_model = self.out / "model_best.safetensors"
        return SemanticTrainResult(
            out=self.out, epochs=self.start_epoch, steps=self.global_step, history=history, metric=metric,
            best_value=self.best_value, best_epoch=self.best_epoch, checkpoint=self.out / CHECKPOINT_NAME,
            last_model=last[0] or (self.out / "model_last.safetensors"), last_text=last[1] or (self.out / "text_last.safetensors"),
            best_model=best_model if best_model.is_file() else None,
            best_text=self.out / "text_best.safetensors" if best_model.is_file() else None,
            metrics=self.out / "log.csv", steps_log=steps_path, curves=self.out / "curves.png", config=self.out / "config.yaml",
        )

    def _write_log(self, curves: bool = False) -> None:
        cols: list[str] = []
        for r in self.rows:
            cols.extend(k for k in r if k not in cols)
        with atomic_path(self.out / "log.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in self.rows:
                w.writerow(["" if r.get(c) is None else (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in cols])
        if not curves:
            return
        try:
            plot_semantic_curves(self.rows, self.out / "curves.png",
                                 f"{self.config.model.backbone}, weights {self.config.loss.weights}")
        except ImportError:
            self.log.warning("no training curves: matplotlib is not installed")


def _better(metric: str, new: float, old: float) -> bool:
    return new < old if metric.endswith("_medr") else new > old


def read_log(path: str | os.PathLike) -> list[dict[str, float | None]]:
    """Rows of a ``log.csv``: numbers as floats (``epoch``, ``step`` as ints), empty cells as None."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows.append({k: (None if v == "" else int(v) if k in ("epoch", "step") else float(v)) for k, v in row.items()})
    return rows


def train(config: SemanticTrainConfig, **kwargs: Any) -> SemanticTrainResult:
    """``SemanticTrainer(config, **kwargs).fit()``."""
    return SemanticTrainer(config, **kwargs).fit()
