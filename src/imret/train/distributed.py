"""Multi-process training helpers for ``torchrun``: process group, descriptor gathering, broadcasts.

The trainer never reads the environment: the CLI calls :func:`init_distributed` with
``os.environ`` and hands the resulting :class:`DistInfo` to :class:`~imret.train.Trainer`.
Without ``torchrun`` (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) everything here is a no-op on a
single process, so the same trainer code runs both ways.

Backends: NCCL when training on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on the
CPU. Collectives run on the backend's device (CUDA for NCCL, CPU for gloo); the helpers move
tensors there and back.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_distributed",
    "all_gather_rows",
    "broadcast_object",
    "broadcast_parameters",
    "barrier",
    "cleanup",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: global rank ``0..world_size-1``.
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        backend: ``"nccl"``, ``"gloo"``, or ``None`` for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"bad rank {self.rank} for world_size {self.world_size}")

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(
    env: Mapping[str, str], device: str = "auto", *, timeout_minutes: float = 60.0
) -> DistInfo:
    """Join the process group that ``torchrun`` set up, or return a single-process :class:`DistInfo`.

    Args:
        env: the launcher's environment (the CLI passes ``os.environ``): ``RANK``,
            ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``, which
            ``torch.distributed`` reads itself through its ``env://`` rendezvous).
        device: the training device setting; ``"cpu"`` selects gloo, CUDA (or ``"auto"`` with
            a GPU present) selects NCCL and pins this process to ``cuda:LOCAL_RANK``.
        timeout_minutes: collective timeout (mining and validation are shared between
            processes, so no rank idles for long; this only bounds a hang).
    """
    world = _int_env(env, "WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    rank = _int_env(env, "RANK", 0)
    local = _int_env(env, "LOCAL_RANK", 0)
    dev = str(device)
    use_cuda = torch.cuda.is_available() and (dev == "auto" or dev.startswith("cuda"))
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {dev!r} requested but CUDA is not available")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        _init_process_group(backend, rank, world, timeout_minutes)
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend)


def _init_process_group(backend: str, rank: int, world: int, timeout_minutes: float) -> None:
    """``dist.init_process_group``, once ``torch.distributed.nn`` is imported.

    That module binds ``group=group.WORLD`` as default arguments when it is first imported
    (timm's import brings it in): imported after the group exists, its functions hold the
    default group for the life of the process, :func:`cleanup` cannot free it, and its gloo
    threads are still running when the interpreter exits; under load the process then died at
    exit with SIGABRT ("terminate called without an active exception") after finishing its work.
    Imported first, the defaults are ``None`` (the default group at call time).
    """
    import torch.distributed.nn  # noqa: F401 - see above: before the group exists

    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_minutes))


def is_distributed() -> bool:
    """A process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every process's rows of ``t`` in rank order: ``(all rows, offset of ours)``.

    ``t`` is ``(n_r, ...)``; the row counts ``n_r`` may differ between processes (they are
    exchanged first and the tensors padded). The result is on ``t``'s device and is not
    differentiable (the trainer re-inserts its own rows where gradients must flow; see
    :func:`imret.train.multistage.multistage_backward`). Single process: ``(t, 0)``.
    """
    if not is_distributed():
        return t, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    dev = _comm_device()
    x = t.detach().to(dev).contiguous()
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    most = max(sizes)
    if x.shape[0] < most:
        x = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    full = torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)
    return full, sum(sizes[:rank])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every process (pickled; for small things such as mined tuples)."""
    if not is_distributed():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def broadcast_parameters(params, src: int = 0) -> None:
    """Overwrite ``params`` (tensors, in place) with rank ``src``'s values."""
    if not is_distributed():
        return
    dev = _comm_device()
    for p in params:
        buf = p.data.to(dev)
        dist.broadcast(buf, src=src)
        if buf.data_ptr() != p.data.data_ptr():
            p.data.copy_(buf)


def barrier() -> None:
    """Wait for every process (no-op on one)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
