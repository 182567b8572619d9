"""Distributed indexing: images/s of ``imret index build`` with 1 and with 2 processes.

The same build (real photos, a real backbone) runs as one process and as ``--procs 2``
(``torchrun --standalone``, gloo, rank 0 the one writer; see imret.index.distributed), each
process on one torch thread and decoding in its own thread (``--threads 1 --workers 0``,
``OMP_NUM_THREADS=1``), alternating, ``--repeats`` times each. Reported: images/s of the add
(what the CLI prints: from every process having the store open and its model loaded to the
last commit, hashing included) and of the
whole command (process start, model load and store creation included), and the largest
difference between the two stores' descriptors (they must be the same build).

    python benchmarks/distributed_index.py [--n 250] [--repeats 2] [--image-size 512] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, machine_line, publish  # noqa: E402

BEGIN = "<!-- distributed-index:begin -->"
END = "<!-- distributed-index:end -->"
BACKBONE = "tf_efficientnet_lite0"


def _build(photos: Path, out: Path, procs: int, image_size: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "imret.cli", "index", "build", str(photos), "--out", str(out),
           "--model", BACKBONE, "--image-size", str(image_size), "--threads", "1", "--workers", "0", "--no-progress"]
    if procs > 1:
        cmd += ["--procs", str(procs)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    m = re.search(r"added (\d+) image\(s\) in ([\d.]+) s", proc.stdout)
    n, secs = int(m.group(1)), float(m.group(2))
    busy = re.search(r"each working (.+?) of the time", proc.stdout)
    return {"procs": procs, "images": n, "add_s": secs, "wall_s": wall, "add_ips": n / secs, "wall_ips": n / wall,
            "busy": busy.group(1) if busy else "-"}


def _descriptors(store: Path) -> tuple[list[str], np.ndarray]:
    from imret.index.store import Store

    with Store.open(store) as st:
        return [r.path for r in st.list(0, 10**6)], np.asarray(st.descriptors()).copy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default=str(SHARED / "data" / "rparis6k-mini" / "jpg"))
    ap.add_argument("--n", type=int, default=250, help="photos to index (the first N, sorted)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for p in sorted(Path(args.photos).glob("*.jpg"))[:args.n]:
            (photos / p.name).symlink_to(p.resolve())
        load = os.getloadavg()[0]
        for r in range(args.repeats):
            for procs in (1, 2):
                out = Path(tmp) / f"store-{procs}-{r}"
                rows.append(_build(photos, out, procs, args.image_size))
                print(rows[-1], file=sys.stderr)
        load = max(load, os.getloadavg()[0])
        paths1, x1 = _descriptors(Path(tmp) / "store-1-0")
        paths2, x2 = _descriptors(Path(tmp) / "store-2-0")
    same = paths1 == paths2 and x1.shape == x2.shape
    diff = float(np.abs(x1 - x2).max()) if same else float("nan")

    best = {p: max((row for row in rows if row["procs"] == p), key=lambda row: row["add_ips"]) for p in (1, 2)}
    out = [BEGIN, "## Distributed indexing: 1 and 2 processes (`benchmarks/distributed_index.py`)", "",
           f"`.venv/bin/python benchmarks/distributed_index.py --n {args.n} --repeats {args.repeats} "
           f"--image-size {args.image_size}` on {machine_line()} (no AMX), {dt.date(2026, 12, 7)}; "
           f"load average up to {load:.1f} from other jobs on the 2 cores during the run.", "",
           f"`imret index build` of {len(paths1)} rParis6k-mini photos with {BACKBONE} (ImageNet, pip weights) "
           f"at {args.image_size} px, each process on one thread (`--threads 1 --workers 0`, OMP_NUM_THREADS=1); "
           "two processes = `--procs 2` (torchrun, gloo, rank 0 the one writer). Best of the repeats "
           "(by images/s of the add); every run on the line below the table.", "",
           "| processes | images | add (s) | add images/s | × 1 process | whole command (s) | command images/s | "
           "ranks working (share of the add) |",
           "|---|---|---|---|---|---|---|---|"]
    for p in (1, 2):
        b = best[p]
        out.append(f"| {p} | {b['images']} | {b['add_s']:.1f} | {b['add_ips']:.2f} | "
                   f"{b['add_ips'] / best[1]['add_ips']:.2f} | {b['wall_s']:.1f} | {b['wall_ips']:.2f} | {b['busy']} |")
    out += ["", f"Same build: paths {'identical' if paths1 == paths2 else 'DIFFERENT'}, largest descriptor "
            f"difference {diff:.2g}. All runs (processes: add images/s, command images/s): "
            + "; ".join(f"{row['procs']}: {row['add_ips']:.2f}, {row['wall_ips']:.2f}" for row in rows) + ".", END]
    publish("\n".join(out) + "\n", BEGIN, END, write=args.write, data=rows)


if __name__ == "__main__":
    main()
