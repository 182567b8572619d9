"""Class-balanced batch sampling ("m per class") for in-batch pair and triplet losses.

Every batch holds ``classes_per_batch`` (P) distinct classes with ``per_class`` (K)
images each, as the batch-hard triplet loss needs (Hermans et al. 2017 use P=18, K=4).
The batches of an epoch are a pure function of ``(seed, epoch)``; in a distributed run
every process builds the same list and takes every ``world_size``-th batch from its
``rank``, so the processes see disjoint batches and the same number of steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["ClassBalancedBatchSampler"]


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of P classes x K images, class-balanced, seeded per epoch, rank-aware.

    How an epoch is drawn (all from ``numpy.random.default_rng((seed, epoch))``):

    * Classes are visited in rounds: each round is a random permutation of the eligible
      classes, consumed P at a time, so every class appears once per round (classes
      are balanced, not images: a class of 3 images is drawn as often as one of 3000).
      A batch never repeats a class; a class that would repeat at a round boundary is
      moved to the next batch.
    * Within a class, images are taken K at a time from a random permutation, which is
      refreshed when used up, so each class's images are all used before any repeats.
      A class with fewer than K images gives all of them plus ``K - n`` drawn again at
      random (with replacement): those batches hold duplicate images, which still make
      valid (if easy) positives under different augmentations.
    * Classes with fewer than ``min_class_size`` images are never drawn (by default
      singletons, which have no positive).

    Args:
        labels: ``(N,)`` integer label of every dataset image.
        classes_per_batch: P.
        per_class: K.
        seed: base seed; :meth:`set_epoch` selects the epoch.
        num_batches: batches per epoch over all processes; default
            ``N // (P * K)`` (about one pass over the images).
        rank, world_size: this process and the number of processes (defaults: 0, 1).
        drop_last: with ``num_batches`` not a multiple of ``world_size``, drop the last
            batches (True) or repeat the first ones (False) so every rank gets the same
            number. Every batch is always full.
        min_class_size: smallest class that is sampled (at least 1).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        classes_per_batch: int,
        per_class: int,
        *,
        seed: int = 0,
        num_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        min_class_size: int = 2,
    ) -> None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if lab.ndim != 1 or lab.size == 0 or lab.dtype.kind not in "iu":
            raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {lab.shape} dtype {lab.dtype}")
        for name, value in (("classes_per_batch", classes_per_batch), ("per_class", per_class),
                            ("world_size", world_size), ("min_class_size", min_class_size)):
            _check_int(name, value, 1)
        _check_int("seed", seed, 0)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1} for world_size={world_size}, got {rank}")
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be a bool, got {drop_last!r}")
        classes, codes, counts = np.unique(lab, return_inverse=True, return_counts=True)
        order = np.argsort(codes, kind="stable")
        members = np.split(order, np.cumsum(counts)[:-1])
        keep = counts >= min_class_size
        self._members = [m.astype(np.int64) for m, k in zip(members, keep) if k]
        self.classes = classes[keep]
        if len(self._members) < classes_per_batch:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} but only {len(self._members)} classes have at least "
                f"{min_class_size} images (of {len(classes)} classes)"
            )
        self.classes_per_batch = int(classes_per_batch)
        self.per_class = int(per_class)
        self.batch_size = self.classes_per_batch * self.per_class
        if num_batches is None:
            num_batches = len(lab) // self.batch_size
        _check_int("num_batches", num_batches, 0)
        self.num_batches = int(num_batches)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches :meth:`__iter__` yields (call before each epoch)."""
        _check_int("epoch", epoch, 0)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_batches // self.world_size
        return -(-self.num_batches // self.world_size)

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of an epoch over every process, before the split by rank."""
        epoch = self.epoch if epoch is None else epoch
        _check_int("epoch", epoch, 0)
        rng = np.random.default_rng((self.seed, int(epoch)))
        n_classes = len(self._members)
        queues = [np.empty(0, dtype=np.int64) for _ in range(n_classes)]
        pending: deque[int] = deque()
        batches: list[list[int]] = []
        for _ in range(self.num_batches):
            chosen: list[int] = []
            held: list[int] = []
            while len(chosen) < self.classes_per_batch:
                if not pending:
                    pending.extend(rng.permutation(n_classes).tolist())
                c = pending.popleft()
                (held if c in chosen else chosen).append(c)
            pending.extendleft(reversed(held))
            batch: list[int] = []
            for c in chosen:
                take, queues[c] = self._take(c, queues[c], rng)
                batch.extend(take.tolist())
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches()
        total = len(self) * self.world_size
        if total > len(batches):  # drop_last=False: pad by repeating from the start
            batches = batches + [batches[i % len(batches)] for i in range(total - len(batches))]
        yield from batches[self.rank : total : self.world_size]

    def _take(self, c: int, queue: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """K images of class ``c`` from its queue, refilled from a fresh permutation."""
        members = self._members[c]
        k = self.per_class
        if len(members) < k:
            extra = rng.choice(members, size=k - len(members), replace=True)
            return np.concatenate([rng.permutation(members), extra]), queue
        if len(queue) < k:
            fresh = rng.permutation(members)
            # keep the leftovers first, then new images not already among them
            fresh = fresh[~np.isin(fresh, queue)]
            queue = np.concatenate([queue, fresh])
        return queue[:k], queue[k:]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(classes_per_batch={self.classes_per_batch}, per_class={self.per_class}, "
            f"classes={len(self._members)}, num_batches={self.num_batches}, rank={self.rank}, "
            f"world_size={self.world_size}, seed={self.seed}, epoch={self.epoch})"
        )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
