"""Multistage backpropagation (Revaud et al., "Learning with Average Precision", ICCV 2019, Sec. 3.3).

A listwise loss such as the AP loss needs the descriptors of the whole batch at once, but a
batch of thousands of high-resolution images cannot keep its activations in memory. The
gradient is computed in three stages instead:

1. descriptors ``d = f(x)`` of every image (or chunk of images), without keeping activations;
2. the loss ``L(d)`` and its gradient ``g = ∂L/∂d`` with respect to the ``(N, D)`` descriptors
   (cheap: only ``N x D`` numbers);
3. each chunk again, this time with autograd, back-propagating ``g`` of its rows:
   ``∂L/∂θ = Σ_chunks (∂d_chunk/∂θ)ᵀ g_chunk``.

By the chain rule the parameter gradients equal plain backpropagation through the whole batch,
provided the two forward passes compute the same function: BatchNorm must use fixed statistics
(frozen / eval mode), dropout must be off, and each image must be augmented once and reused.
Peak memory is that of one chunk plus the ``N x D`` descriptors, whatever ``N`` is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .._checks import positive_int
from ..precision import autocast

__all__ = [
    "MultistageResult",
    "multistage_backward",
    "plain_backward",
    "chunks_of",
    "iter_chunks",
    "deterministic_forward_problems",
    "freeze_batchnorm",
]

Images = torch.Tensor | Sequence[torch.Tensor]


@dataclass
class MultistageResult:
    """What one multistage step produced."""

    loss: torch.Tensor  # scalar, detached
    descriptors: torch.Tensor  # (N, D), detached


def iter_chunks(images: Images, chunk_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, tensor)`` chunks of at most ``chunk_size`` images, loading lazily.

    ``images`` is an ``(N, C, H, W)`` tensor or a sequence of ``(C, H, W)`` tensors that may
    differ in size (high-resolution images keep their aspect ratio); consecutive images of
    equal size are stacked into one chunk. A sequence is indexed item by item as the chunks
    are consumed, so a lazy one (a dataset that decodes and augments on ``__getitem__``) holds
    only one chunk in memory at a time.
    """
    positive_int(chunk_size, "chunk_size")
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W) or a list of (C, H, W), got shape {tuple(images.shape)}")
        for s in range(0, images.shape[0], chunk_size):
            yield s, min(s + chunk_size, images.shape[0]), images[s:s + chunk_size]
        return
    n = len(images)

    def get(i: int) -> torch.Tensor:
        t = images[i]
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"image {i} must be a (C, H, W) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        return t

    s, pending = 0, None
    while s < n:
        group = [pending if pending is not None else get(s)]
        pending = None
        e = s + 1
        while e < n and e - s < chunk_size:
            t = get(e)
            if t.shape != group[0].shape:
                pending = t
                break
            group.append(t)
            e += 1
        yield s, e, torch.stack(group)
        s = e


def chunks_of(images: Images, chunk_size: int) -> list[tuple[int, int, torch.Tensor]]:
    """All chunks of :func:`iter_chunks` at once (loads every image)."""
    return list(iter_chunks(images, chunk_size))


def _chunk_again(images: Images, s: int, e: int) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[s:e]
    return torch.stack([images[i] for i in range(s, e)])


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return autocast(device, dtype)


def freeze_batchnorm(model: nn.Module, *, affine: bool = True) -> nn.Module:
    """Put every BatchNorm layer in eval mode (running statistics), keeping it there.

    Call after ``model.train()``. With ``affine=False`` their scale and shift stop learning too.
    Retrieval fine-tuning commonly freezes BatchNorm (batches of one high-resolution image,
    cirtorch); multistage backpropagation needs it.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            if not affine:
                for p in m.parameters():
                    p.requires_grad_(False)
    return model


def deterministic_forward_problems(model: nn.Module) -> list[str]:
    """Modules that would make two forward passes differ: BatchNorm in training mode, active dropout."""
    problems = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            problems.append(f"{name or type(m).__name__}: BatchNorm in training mode (freeze it: eval mode)")
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)) and m.training and m.p > 0:
            problems.append(f"{name or type(m).__name__}: dropout p={m.p} is active")
    return problems


def multistage_backward(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: Images,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_size: int = 1,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_scale: float = 1.0,
    gather: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    check: bool = True,
) -> MultistageResult:
    """Accumulate into ``.grad`` the parameter gradients of ``loss_fn(model(images))`` in three stages.

    Args:
        model: maps ``(B, C, H, W)`` images to ``(B, D)`` descriptors; its forward must be
            deterministic (see :func:`deterministic_forward_problems`, checked when ``check``).
        images: ``(N, C, H, W)``, or a sequence of ``(C, H, W)`` tensors (sizes may differ),
            which may be lazy (a dataset indexed on demand): it is read twice, chunk by chunk,
            and must return the same tensor both times (augment deterministically per index).
        loss_fn: maps the ``(N_total, D)`` descriptors to a scalar loss.
        chunk_size: images per forward pass; memory grows with it, not with ``N``.
        device: where to run (default: the device of the model's first parameter).
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` to run the network under autocast
            (the loss runs in float32).
        grad_scale: multiplies the descriptor gradient before stage 3 (a loss scaler for fp16,
            or ``world_size`` to undo DistributedDataParallel's gradient averaging).
        gather: distributed training: maps this process's ``(N, D)`` descriptors to
            ``(all descriptors of all processes, offset of this process's rows)``; the loss is
            computed on the global batch and each process back-propagates its own rows.
        no_sync: a context manager factory (``ddp_model.no_sync``) used for every chunk but the
            last, so gradients are all-reduced once.
        check: refuse a model whose forward is not deterministic.

    Returns:
        :class:`MultistageResult` with the detached loss and local descriptors.
    """
    if check and isinstance(model, nn.Module):
        problems = deterministic_forward_problems(model)
        if problems:
            raise ValueError("multistage backpropagation needs a deterministic forward; " + "; ".join(problems))
    if device is None:
        p = next(model.parameters()) if isinstance(model, nn.Module) else None
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    # stage 1: descriptors without activations (a lazy image sequence is read chunk by chunk)
    bounds, shapes, descs = [], [], []
    with torch.no_grad():
        for s, e, x in iter_chunks(images, chunk_size):
            bounds.append((s, e))
            shapes.append(x.shape)
            with _autocast(device, autocast_dtype):
                descs.append(_upcast(model(x.to(device, non_blocking=True))))
            del x
        local = torch.cat(descs)
        del descs
    # stage 2: the loss and its gradient w.r.t. the descriptors
    if gather is not None:
        full, offset = gather(local)
    else:
        full, offset = local, 0
    d = full.detach().requires_grad_(True)
    loss = loss_fn(d)
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    (g_full,) = torch.autograd.grad(loss, d)
    g = g_full[offset:offset + local.shape[0]] * grad_scale
    # stage 3: recompute each chunk with autograd and push its rows' gradient through it
    for n, ((s, e), shape) in enumerate(zip(bounds, shapes)):
        last = n == len(bounds) - 1
        x = _chunk_again(images, s, e)
        if x.shape != shape:
            raise ValueError(
                f"images {s}..{e - 1} changed shape between the two passes ({tuple(shape)} then "
                f"{tuple(x.shape)}): a lazy image sequence must return the same tensor every time"
            )
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with _autocast(device, autocast_dtype):
                out = _upcast(model(x.to(device, non_blocking=True)))
            out.backward(g[s:e])
        del x, out
    return MultistageResult(loss.detach(), local.detach())


def plain_backward(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: Images,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> MultistageResult:
    """Ordinary backpropagation through the whole batch at once (the reference; memory grows with N)."""
    if device is None:
        p = next(model.parameters()) if isinstance(model, nn.Module) else None
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    parts = chunks_of(images, 1 << 30)
    with _autocast(device, autocast_dtype):
        out = _upcast(torch.cat([model(x.to(device)) for _, _, x in parts]))
    loss = loss_fn(out)
    loss.backward()
    return MultistageResult(loss.detach(), out.detach())
