"""Memory-allocator settings for CPU inference (glibc on Linux).

A ResNet50 at 1024 px allocates and frees feature maps of 1-25 MB at every layer, some hundred
MB alive at a time. glibc's ``malloc`` serves blocks above its mmap threshold (128 KiB at start,
raised by itself up to 32 MiB as such blocks are freed) with fresh ``mmap`` pages, and returns
the top of its heap to the system whenever more than its trim threshold (twice the mmap
threshold once raised: at most 64 MiB) is free there; so after each forward pass much of the
memory goes back, and the next pass pays a page fault on first touch of every 4 KiB of it.
Measured on a 2-core AVX512-BF16 EPYC (BENCHMARKS.md, extraction speed): the compiled bf16
ResNet50-GeM ran at 2.70 images/s with the default settings and 2.75-2.85 with the ones below
(+2-6 %), and +20 % on half-size inputs (8.3 against 9.9 images/s), whose shorter layers pay a
larger share of page faults.

:func:`tune_malloc` keeps freed memory in the process instead: blocks up to 32 MiB come from
the heap, up to ``trim_threshold`` bytes of free heap top are kept, and the heap grows by
``top_pad`` at a time. The price is memory the process holds after a peak (at most the peak
itself, and the trim threshold of free top). It changes the whole process and cannot be
undone cleanly, so the library never calls it by itself: the ``imret`` command does at start
(``IMRET_MALLOC_TUNING=0`` turns that off), and a program that embeds imret may call it.
Settings given in glibc's own environment variables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``) are left as the user set them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from dataclasses import dataclass

__all__ = ["MallocTuning", "MMAP_THRESHOLD_MAX", "DEFAULT_MMAP_THRESHOLD", "DEFAULT_TRIM_THRESHOLD",
           "DEFAULT_TOP_PAD", "tune_malloc", "malloc_tuning", "glibc_version"]

MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's largest mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``); mallopt refuses more."""
DEFAULT_MMAP_THRESHOLD = MMAP_THRESHOLD_MAX  # a ResNet50's largest map at 1024 px in bf16 is 25 MB
DEFAULT_TRIM_THRESHOLD = 1 << 30
DEFAULT_TOP_PAD = 256 << 20

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_ENV = {"mmap_threshold": "MALLOC_MMAP_THRESHOLD_", "trim_threshold": "MALLOC_TRIM_THRESHOLD_",
        "top_pad": "MALLOC_TOP_PAD_"}
_PARAM = {"mmap_threshold": _M_MMAP_THRESHOLD, "trim_threshold": _M_TRIM_THRESHOLD, "top_pad": _M_TOP_PAD}


@dataclass(frozen=True)
class MallocTuning:
    """What :func:`tune_malloc` did.

    Attributes:
        applied: setting name -> the value now in force by this call.
        left: setting name -> why it was not changed (set in the environment by the user, or
            refused by mallopt).
        reason: why nothing could be done (not glibc), else "".
    """

    applied: dict[str, int]
    left: dict[str, str]
    reason: str = ""

    @property
    def active(self) -> bool:
        return bool(self.applied)

    def describe(self) -> str:
        """One line for logs and benchmark headers."""
        if self.reason:
            return f"default allocator ({self.reason})"
        parts = [f"{k.replace('_', ' ')} {_size(v)}" for k, v in self.applied.items()]
        parts += [f"{k.replace('_', ' ')} {why}" for k, why in self.left.items()]
        return "glibc malloc tuned: " + ", ".join(parts)


_LOCK = threading.Lock()
_LAST: MallocTuning | None = None


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _libc():
    """glibc as a ctypes library, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):  # musl and others have no gnu_get_libc_version
        return None
    return libc


def glibc_version() -> str | None:
    """The running glibc's version (e.g. ``"2.36"``), or None where the C library is not glibc."""
    libc = _libc()
    return None if libc is None else libc.gnu_get_libc_version().decode()


def _check(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (bytes), got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high} bytes, got {value}")
    return value


def tune_malloc(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
    trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
    top_pad: int = DEFAULT_TOP_PAD,
) -> MallocTuning:
    """Make glibc keep freed memory for reuse (see the module docstring); process-wide.

    Args:
        mmap_threshold: blocks of at most this many bytes come from the heap
            (0..:data:`MMAP_THRESHOLD_MAX`).
        trim_threshold: free bytes at the top of the heap kept before returning them (0..2**31-1).
        top_pad: extra bytes asked of the system each time the heap grows (0..2**31-1).

    Returns:
        A :class:`MallocTuning`: what was applied, what was left (the user's environment
        settings win), or why nothing was done (not glibc). Calling it again applies the new
        values.
    """
    global _LAST
    values = {"mmap_threshold": _check("mmap_threshold", mmap_threshold, 0, MMAP_THRESHOLD_MAX),
              "trim_threshold": _check("trim_threshold", trim_threshold, 0, 2**31 - 1),
              "top_pad": _check("top_pad", top_pad, 0, 2**31 - 1)}
    libc = _libc()
    if libc is None:
        result = MallocTuning({}, {}, reason=f"not glibc ({sys.platform})")
    else:
        applied: dict[str, int] = {}
        left: dict[str, str] = {}
        with _LOCK:
            for name, value in values.items():
                if os.environ.get(_ENV[name], "") != "":
                    left[name] = f"from {_ENV[name]}"
                elif libc.mallopt(_PARAM[name], value) == 1:
                    applied[name] = value
                else:
                    left[name] = "refused by mallopt"
        result = MallocTuning(applied, left)
    _LAST = result
    return result


def malloc_tuning() -> MallocTuning | None:
    """The result of the last :func:`tune_malloc` call in this process, or None."""
    return _LAST
