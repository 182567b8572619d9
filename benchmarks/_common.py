"""Helpers shared by the benchmark scripts: the machine line, the BENCHMARKS.md sections and
the end of a run (print, write the section, dump the figures)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMRET_SHARED", REPO.parent / "shared"))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``) with its family and model numbers (virtual machines
    show "AMD EPYC" for several generations), else what ``platform`` knows."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip() and fields:
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
        name = fields.get("model name")
        if name:
            family = fields.get("cpu family")
            return f"{name} (cpu family {family}, model {fields.get('model', '?')})" if family else name
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line naming the CPU, core count, memory, OS and torch build (and the GPU if any)."""
    import torch

    cpu = cpu_name()
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def write_section(text: str, path: Path, begin: str, end: str) -> None:
    """Replace the text between ``begin`` and ``end`` in ``path`` (markers included), or append it."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if begin in old and end in old:
        head, _, rest = old.partition(begin)
        _, _, tail = rest.partition(end)
        new = head + text.rstrip("\n") + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    path.write_text(new, encoding="utf-8")


def publish(text: str, begin: str, end: str, *, write: bool = False, json_path: str | Path | None = None,
            data: Any = None) -> None:
    """The end of every benchmark: print the markdown ``text``; with ``write``, put it into
    BENCHMARKS.md between ``begin`` and ``end`` (:func:`write_section`); with ``json_path``,
    also write ``data`` there as JSON (numbers that JSON lacks, such as NumPy floats, as floats)."""
    print(text)
    if write:
        write_section(text, REPO / "BENCHMARKS.md", begin, end)
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=1, default=float))


# the leave-one-landmark-out helpers live in the library (imret eval uses them too)
from imret.evaluation import connected_components as components  # noqa: E402,F401
from imret.evaluation import landmark_of  # noqa: E402,F401
