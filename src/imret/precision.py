"""Numeric precision of a model run: the one place that turns ``fp32 | bf16 | fp16`` into an
autocast dtype for a device, and checks the hardware can do it.

``bf16`` on the CPU needs native support (AVX512-BF16 or AMX; elsewhere PyTorch emulates it,
slower than fp32); ``fp16`` is for CUDA devices (training with it uses a gradient scaler).
Extraction, the store, the server and the trainer all choose their precision here.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "autocast_dtype", "autocast"]

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None for fp32).

    Raises ``ValueError`` naming the valid choices, or saying why the device cannot run it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision 'bf16' is not supported by this GPU; use 'fp16' or 'fp32'")
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu":
        if precision == "fp16":
            raise ValueError("precision 'fp16' is for GPUs; on the CPU use 'bf16' (if supported) or 'fp32'")
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise ValueError("this CPU has no native bf16 support (AVX512-BF16/AMX); use precision 'fp32'")
        return torch.bfloat16
    raise ValueError(f"precision {precision!r} is not supported on device type {device.type!r}; use 'fp32'")


def autocast(device: str | torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``'s type; a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
