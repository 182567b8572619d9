"""Index images with several processes (``torchrun``): every process extracts, one process writes.

    torchrun --nnodes N --nproc-per-node M -m imret.cli index build PHOTOS --out STORE ...
    imret index build PHOTOS --out STORE --procs M          (the same on this machine)

Design. A store has one writer (its ``lock`` file) and its crash safety rests on that writer
committing batches in order (rows fsynced first, then the SQLite transaction that lists them),
so rank 0 is the only process that opens the store writable and the only one that commits; the
others open it read-only, for the model and the preprocessing, and do the expensive parts:

1. hashing: rank 0 lists the input (folders expanded, absolute paths) and gives every rank a
   contiguous shard to hash (SHA-256 and size, or the reason the file is refused, as
   :meth:`Store.add <imret.index.store.Store.add>` hashes them);
2. extraction: rank 0 runs the ordinary :meth:`Store.add` with those hashes, so the
   deduplication (content already in the store, the same content twice in the input), the
   bad-file policy and the reports are those of a single process. Each batch of
   ``commit_every x processes`` new images is cut into contiguous slices, one per rank; each
   rank extracts its slice (:meth:`Store.prepare_rows`: descriptors, and local features when
   the store keeps them), rank 0 gathers the slices in rank order and commits the batch.
   (All files are hashed before the first batch, so a file rewritten during the run keeps
   the hash it had then: the same as in one process, over a longer window.)

Rows therefore reach the store in input order, exactly as a single process adds them: a
finished run gives the same ids, paths and descriptors as ``imret index build`` without
``torchrun``. A process killed at any point (``torchrun`` then stops the others and the run
fails) loses nothing that was committed, and, the store being content-addressed, rerunning the
same ``imret index add`` (with any number of processes) skips what is there and adds each
remaining image exactly once, in the same order, so the finished store again equals the
single-process build.

Why results travel to rank 0 rather than through per-rank spill files that rank 0 ingests:
the store stays the only durable state (no second set of files to make crash-safe, clean up,
or trust as input), and commits happen in input order without rank 0 waiting for whole shards.
The cost is that ranks work in lock step, one batch at a time: a batch takes as long as its
slowest slice, and rank 0's commit (and its own slice) is not overlapped with the next batch.
With ``commit_every`` images per rank per batch (64 by default) that overhead stays small
while extraction dominates.

Communication uses a gloo process group (the default group when it is gloo, else a gloo group
made for this): what moves are Python objects and CPU arrays (paths, reasons, descriptor
rows), which gloo carries directly and NCCL's object collectives do not. Models run on
``cuda:LOCAL_RANK`` when the device asked for is CUDA (:func:`rank_device`), one GPU per
process. On several machines every process must see the images and the store under the same
absolute paths (a shared file system).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..extract import Extraction, SkippedImage
from ..train.distributed import DistInfo
from .store import AddReport, Store, StoreError, _hash_image_file, _image_files, _NotAnImageFile

__all__ = [
    "IndexRun",
    "RankStopped",
    "shard_bounds",
    "merge_prepared",
    "hash_files",
    "rank_device",
    "index_distributed",
    "torchrun_command",
]

Prepared = tuple[Extraction, "np.ndarray | None"]  # what Store.prepare_rows returns


class RankStopped(RuntimeError):
    """Raised on ranks other than 0 when rank 0 stopped the run with an error (rank 0 raises
    the error itself; the others need not repeat it)."""


@dataclass(frozen=True)
class IndexRun:
    """What :func:`index_distributed` did.

    Attributes:
        report: the :class:`~imret.index.store.AddReport` of the whole run on rank 0; None on
            the other ranks.
        images: images in the store at the end (rank 0; 0 elsewhere).
        backend: the store's backend spec (rank 0; "" elsewhere).
        processes: how many processes took part.
        seconds: wall time of the add on rank 0, from every rank having the store open and
            its model loaded to the last commit (hashing included).
        busy: per rank, the seconds it spent hashing and extracting within ``seconds`` (rank
            0; empty elsewhere): the rest is waiting for the slowest slice and for rank 0's
            commits.
    """

    report: AddReport | None
    images: int
    backend: str
    processes: int
    seconds: float = 0.0
    busy: tuple[float, ...] = ()


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[start, stop)`` slices covering ``range(n)`` in order, sizes
    differing by at most one (the first ``n % parts`` slices hold one more)."""
    if n < 0 or parts < 1:
        raise ValueError(f"need n >= 0 and parts >= 1, got n={n}, parts={parts}")
    q, r = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + q + (i < r)
        out.append((start, stop))
        start = stop
    return out


def merge_prepared(parts: Sequence[Prepared | None], offsets: Sequence[int]) -> Prepared:
    """One batch's :meth:`Store.prepare_rows` result from its slices: ``parts[r]`` describes
    the paths starting at position ``offsets[r]`` of the batch (None: an empty slice); rows,
    positions, skipped and small images are concatenated in slice order with the positions
    shifted to the batch. Slices must come in batch order."""
    if len(parts) != len(offsets):
        raise ValueError(f"{len(parts)} parts but {len(offsets)} offsets")
    descs, idx, paths, skipped, small, recs = [], [], [], [], [], []
    has_recs = None
    for part, off in zip(parts, offsets):
        if part is None:
            continue
        ex, r = part
        descs.append(np.asarray(ex.descriptors, dtype=np.float32))
        idx.append(np.asarray(ex.indices, dtype=np.int64) + off)
        paths.extend(ex.paths)
        skipped.extend(SkippedImage(s.index + off, s.path, s.reason) for s in ex.skipped)
        small.extend(i + off for i in ex.small)
        if len(ex.indices):
            if has_recs is None:
                has_recs = r is not None
            elif has_recs != (r is not None):
                raise ValueError("some slices carry local-feature records and others do not")
            if r is not None:
                recs.append(r)
    if not descs:
        raise ValueError("no slice to merge")
    ex = Extraction(descriptors=np.concatenate(descs), indices=np.concatenate(idx), paths=paths,
                    skipped=skipped, small=small)
    return ex, (np.concatenate(recs) if recs else None)


def hash_files(paths: Sequence[str]) -> list[tuple[str, int] | str]:
    """``(sha256, size)`` of each image file, as :meth:`Store.add` hashes it, or the reason it
    is refused (a FIFO, a device, an empty file, a type this install cannot decode, ...)."""
    out: list[tuple[str, int] | str] = []
    for p in paths:
        try:
            out.append(_hash_image_file(p))
        except _NotAnImageFile as e:
            out.append(str(e))
    return out


def rank_device(device: str, info: DistInfo, cuda_available: bool) -> str:
    """The device of this process: ``"cuda"`` (or ``"auto"`` with a GPU) becomes
    ``cuda:LOCAL_RANK``, one GPU per process; ``"auto"`` without one and ``"cpu"`` stay on the
    CPU. A numbered GPU (``cuda:1``) is refused with several processes (they would share it)."""
    d = str(device)
    if d == "auto":
        d = "cuda" if cuda_available else "cpu"
    if d == "cpu" or not d.startswith("cuda"):
        return d
    if not cuda_available:
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if d == "cuda":
        return f"cuda:{info.local_rank}" if info.enabled else "cuda"
    if info.enabled:
        raise ValueError(f"device {device!r} names one GPU, but {info.world_size} processes index: "
                         "pass --device cuda (each process takes cuda:LOCAL_RANK)")
    return d


def torchrun_command(procs: int, argv: Sequence[str], *, python: str = sys.executable) -> list[str]:
    """The command that runs ``imret ARGV`` in ``procs`` processes on this machine
    (``torchrun --standalone``: a local rendezvous on a free port)."""
    if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
        raise ValueError(f"procs must be a positive integer, got {procs!r}")
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            "-m", "imret.cli", *argv]


# --- the run ------------------------------------------------------------------------------------


class _Comm:
    """Rank 0 hands out one job per rank and gathers the replies, over a gloo group."""

    def __init__(self, info: DistInfo):
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() != info.world_size:
            raise RuntimeError(f"no process group of {info.world_size} processes: call "
                               "imret.train.distributed.init_distributed first")
        self.dist = dist
        self.info = info
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.busy = [0.0] * info.world_size  # rank 0: seconds each rank spent on its jobs

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def receive(self) -> Any:
        """Ranks > 0: the next job."""
        box = [None]
        self.dist.scatter_object_list(box, None, src=0, group=self.group)
        return box[0]

    def reply(self, obj: Any) -> None:
        """Ranks > 0: the answer to the job."""
        self.dist.gather_object(obj, None, dst=0, group=self.group)

    def stop(self, reason: str | None) -> None:
        """Rank 0: tell the other ranks to finish (``reason`` None) or to fail with ``reason``."""
        self.dist.scatter_object_list([None], [("stop", reason)] * self.info.world_size, src=0, group=self.group)

    def run(self, jobs: list[Any], own: Callable[[Any], Any]) -> list[Any]:
        """Rank 0: send ``jobs[r]`` to rank ``r``, do ``jobs[0]`` here with ``own``, and return
        every rank's result in rank order; an error anywhere raises after all replies are in
        (so the ranks stay in step for the stop message)."""
        box = [None]
        self.dist.scatter_object_list(box, jobs, src=0, group=self.group)
        t0 = time.perf_counter()
        try:
            mine: tuple[str, Any, float] = ("ok", own(box[0]), time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - collected, then raised below with the others
            mine = ("error", e, 0.0)
        replies: list[Any] = [None] * self.info.world_size
        self.dist.gather_object(("ok", None, 0.0), replies, dst=0, group=self.group)
        replies[0] = mine
        if mine[0] == "error":
            raise mine[1]
        for r, (status, value, seconds) in enumerate(replies):
            if status != "ok":
                raise StoreError(f"process {r} of {self.info.world_size} failed: {value}")
            self.busy[r] += float(seconds)
        return [value for _, value, _ in replies]


def _do(job: tuple[str, Any], store: Store | None, extract_kw: dict[str, Any]) -> Any:
    kind, arg = job
    if kind == "open":  # the store is open (see _follow): load the model now, not in the first batch
        return store.model.dim
    if kind == "hash":
        return hash_files(arg)
    if kind == "extract":
        return store.prepare_rows(arg, **extract_kw) if arg else None
    raise ValueError(f"unknown job {kind!r}; available: 'open', 'hash', 'extract', 'stop'")


def _follow(comm: _Comm, device: str, extract_kw: dict[str, Any]) -> None:
    """Ranks > 0: open the store read-only once rank 0 holds it, then do jobs until told to stop."""
    path, error = comm.broadcast(None)
    if path is None:
        raise RankStopped(f"rank 0 could not open the store: {error}")
    store: Store | None = None
    try:
        while True:
            kind, arg = comm.receive()
            if kind == "stop":
                if arg is not None:
                    raise RankStopped(f"rank 0 stopped: {arg}")
                return
            t0 = time.perf_counter()
            try:
                if store is None and kind in ("open", "extract"):
                    store = Store.open(path, device=device)
                out: tuple[str, Any, float] = ("ok", _do((kind, arg), store, extract_kw), time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - rank 0 reports it and stops the run
                out = ("error", f"{type(e).__name__}: {e}", 0.0)
            comm.reply(out)
    finally:
        if store is not None:
            store.close()


def _lead(comm: _Comm, open_writer, commit_every: int, progress: bool, extract_kw: dict[str, Any]) -> IndexRun:
    world = comm.info.world_size
    try:
        store, paths = open_writer()
    except Exception as e:
        comm.broadcast((None, f"{type(e).__name__}: {e}"))
        raise
    stop_reason: str | None = "rank 0 failed"
    try:
        with store:
            comm.broadcast((str(store.path.resolve()), None))
            comm.run([("open", None)] * world, lambda job: _do(job, store, extract_kw))
            comm.busy = [0.0] * world
            t0 = time.perf_counter()
            files, _ = _image_files(paths)
            files = [os.path.abspath(p) for p in files]
            bounds = shard_bounds(len(files), world)
            shards = comm.run([("hash", files[a:b]) for a, b in bounds], lambda job: _do(job, None, extract_kw))
            hashes = {p: h for (a, b), part in zip(bounds, shards) for p, h in zip(files[a:b], part)}

            from tqdm.auto import tqdm

            bar = tqdm(total=len(files), desc=f"index ({world} processes)", unit="img", disable=not progress)

            def extract_batch(batch: list[str]) -> Prepared:
                cuts = shard_bounds(len(batch), world)
                parts = comm.run([("extract", batch[a:b]) for a, b in cuts], lambda job: _do(job, store, extract_kw))
                bar.update(len(batch))
                return merge_prepared(parts, [a for a, _ in cuts])

            try:
                report = store.add(paths, commit_every=commit_every * world, hashes=hashes, extractor=extract_batch)
            finally:
                bar.update(bar.total - bar.n)
                bar.close()
            run = IndexRun(report, len(store), store.backend_spec, world, time.perf_counter() - t0, tuple(comm.busy))
        stop_reason = None
        return run
    except Exception as e:
        stop_reason = f"{type(e).__name__}: {e}"
        raise
    finally:
        try:
            comm.stop(stop_reason)
        except Exception:  # noqa: BLE001 - a rank already gone: torchrun stops the rest
            if stop_reason is None:
                raise


def index_distributed(
    info: DistInfo,
    open_writer: Callable[[], tuple[Store, Sequence[str]]],
    *,
    commit_every: int = 64,
    device: str = "cpu",
    progress: bool = False,
    **extract_kw: Any,
) -> IndexRun:
    """Add images to a store with every process of the current ``torchrun`` job (see the
    module docstring); call it on every rank.

    Args:
        info: this process's place in the job (:func:`imret.train.distributed.init_distributed`).
        open_writer: called on rank 0 only: ``() -> (store, paths)``, the store opened (or
            created) writable and the image files and folders to add to it. An error it
            raises stops every rank.
        commit_every: images per rank in each committed batch (a batch holds
            ``commit_every x processes``).
        device: the device of the read-only stores of ranks > 0 (rank 0's store has its own);
            see :func:`rank_device`.
        progress: a progress bar on rank 0 (stderr).
        extract_kw: run-time extraction settings for every rank (batch_size, workers, precision).

    Returns:
        an :class:`IndexRun`; its report is rank 0's. Ranks > 0 raise :class:`RankStopped`
        when rank 0 failed; rank 0 raises its own error, or a :class:`StoreError` naming the
        rank whose extraction failed.
    """
    commit_every = int(commit_every)
    if commit_every < 1:
        raise ValueError(f"commit_every must be >= 1, got {commit_every}")
    if not info.enabled:
        store, paths = open_writer()
        with store:
            t0 = time.perf_counter()
            report = store.add(paths, commit_every=commit_every, progress=progress, **extract_kw)
            return IndexRun(report, len(store), store.backend_spec, 1, time.perf_counter() - t0)
    comm = _Comm(info)
    if info.is_main:
        return _lead(comm, open_writer, commit_every, progress, extract_kw)
    _follow(comm, device, extract_kw)
    return IndexRun(None, 0, "", info.world_size)
