"""Training logs you can plot: ``metrics.csv`` (one row per epoch), TensorBoard, ``curves.png``.

Only the main process logs. TensorBoard is optional: when ``torch.utils.tensorboard`` (the
``tensorboard`` package) cannot be imported the run goes on without it and a warning says so;
the same for matplotlib and the curves.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..fileio import atomic_path

__all__ = ["METRIC_COLUMNS", "MetricsLog", "read_metrics", "plot_training_curves"]

METRIC_COLUMNS = (
    "epoch",  # epochs completed (1-based)
    "step",  # optimizer steps completed
    "loss",  # mean training loss of the epoch
    "lr",  # learning rate of the network during the epoch
    "gem_p",  # mean GeM exponent after the epoch (empty without GeM)
    "map_easy",  # validation mAP (fractions; empty when not validated this epoch)
    "map_medium",
    "map_hard",
    "images_per_s",  # training images per second over all processes (mining and validation excluded)
    "seconds",  # wall time of the epoch, mining and validation included
)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def read_metrics(path: str | os.PathLike) -> list[dict[str, float | None]]:
    """Rows of a ``metrics.csv``: numbers as floats (``epoch`` and ``step`` as ints), empty cells as ``None``."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out: dict[str, float | None] = {}
            for k, v in row.items():
                if v is None or v == "":
                    out[k] = None
                elif k in ("epoch", "step"):
                    out[k] = int(v)
                else:
                    out[k] = float(v)
            rows.append(out)
    return rows


def plot_training_curves(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Write a PNG: training loss (left) and validation mAP E/M/H (right) against the epoch."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError("training curves need matplotlib: pip install 'imret[train]'") from e
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_map = fig.subplots(1, 2)
    ep = [r["epoch"] for r in rows]
    ax_loss.plot(ep, [r["loss"] for r in rows], marker="o", color="tab:blue")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    shown = False
    for key, name, colour in (("map_easy", "Easy", "tab:green"), ("map_medium", "Medium", "tab:orange"),
                              ("map_hard", "Hard", "tab:red")):
        pts = [(r["epoch"], 100 * r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax_map.plot(*zip(*pts), marker="o", label=name, color=colour)
            shown = True
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("validation mAP (%)")
    ax_map.grid(alpha=0.3)
    if shown:
        ax_map.legend()
    else:
        ax_map.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax_map.transAxes)
    for ax in (ax_loss, ax_map):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


class MetricsLog:
    """Appends epoch rows to ``<out>/metrics.csv``, scalars to TensorBoard (``<out>/tb``), redraws ``curves.png``.

    Args:
        out: the run folder.
        enabled: ``False`` on every process but the main one (then nothing is written).
        tensorboard: try to open a TensorBoard writer.
        keep_epochs: when resuming, rows of later epochs (written after the last checkpoint)
            are dropped; ``None`` starts a new file.
        title: title of the curves.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        keep_epochs: int | None = None,
        title: str = "",
    ) -> None:
        self.out = Path(out)
        self.enabled = enabled
        self.title = title
        self.csv_path = self.out / "metrics.csv"
        self.curves_path = self.out / "curves.png"
        self.writer = None
        self.rows: list[dict[str, Any]] = []
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if keep_epochs is not None and self.csv_path.is_file():
            self.rows = [r for r in read_metrics(self.csv_path) if r["epoch"] is not None and r["epoch"] <= keep_epochs]
        self._rewrite()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is an optional extra
                warnings.warn(f"TensorBoard logging is off ({e}); install it with pip install 'imret[train]'", stacklevel=2)
            else:
                self.writer = SummaryWriter(log_dir=str(self.out / "tb"))

    def _rewrite(self) -> None:
        with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(METRIC_COLUMNS)
            for r in self.rows:
                w.writerow([_cell(r.get(c)) for c in METRIC_COLUMNS])

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One TensorBoard point (nothing without TensorBoard)."""
        if self.writer is not None and value is not None and math.isfinite(value):
            self.writer.add_scalar(tag, value, step)

    def epoch(self, row: dict[str, Any]) -> None:
        """Record an epoch: a CSV row (keys :data:`METRIC_COLUMNS`), TensorBoard scalars, the curves."""
        if not self.enabled:
            return
        unknown = set(row) - set(METRIC_COLUMNS)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; columns: {', '.join(METRIC_COLUMNS)}")
        self.rows.append(dict(row))
        with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([_cell(row.get(c)) for c in METRIC_COLUMNS])
        e = int(row["epoch"])
        for key in ("loss", "lr", "gem_p", "images_per_s"):
            if row.get(key) is not None:
                self.scalar(f"epoch/{key}", float(row[key]), e)
        for key in ("map_easy", "map_medium", "map_hard"):
            if row.get(key) is not None:
                self.scalar(f"val/{key}", 100 * float(row[key]), e)
        if self.writer is not None:
            self.writer.flush()
        try:
            plot_training_curves(self.rows, self.curves_path, self.title)
        except ImportError as e:
            warnings.warn(f"no training curves: {e}", stacklevel=2)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
