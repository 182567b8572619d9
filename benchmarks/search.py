"""Vector search: imret's backends against exact search and the machine's floor, in one run.

For each database size N (default 100k and 1M, D = 512, 1000 queries, k = 100) it generates
seeded synthetic descriptors, measures the floor of exact search on this machine (the time to
stream the N x D float32 matrix once, and the matrix-product time at the measured peak
GFLOP/s), then builds each backend through ``imret.index.create_backend`` exactly as the store
does (train on a seeded sample of ``max(min_train_size, 100k)`` rows, add in 65536-row chunks)
and reports build time, 1000-query batch time and QPS, single-query latency, recall@100
against exact search (``tie_aware_recall``), memory (RSS growth of the process while the index
is held, and its peak while building) and disk (bytes written by ``save``).

Backends (``--backends``, names or literal specs; ``{nlist}`` / ``{nprobe}`` are filled from the
``ann`` default for N, so the IVF variants share its coarse quantiser size)::

    exact     the reference: batched matrix product + running top-k
    ann       the default approximate index (default_ann_spec(N))
    auto      auto?recall=0.95&k={k}: index and nprobe tuned on 1000 held-out rows of the database
              (imret.index.tuning.tune, as the store does); build time includes the tuning
    ivfflat   faiss:IVF{nlist},Flat?nprobe={nprobe}
    ivfpq     faiss:IVF{nlist},PQ64x8,RFlat?nprobe={nprobe}&k_factor=8   (PQ codes re-ranked exactly)
    hnsw      faiss:HNSW32?efSearch=128                (N <= --hnsw-max-n)
    milvus    milvus:<tmp>/bench.db, Milvus Lite's default index (N <= --milvus-max-n)

The data: a mixture of 1000 Gaussians, each with the same anisotropic covariance (a power-law
spectrum lambda_i ~ 1/i over 512 dimensions, randomly rotated; participation ratio about 28),
component means drawn from that covariance and points spread around them by the same amount,
L2-normalised. Like real descriptors, it is clustered (a query's nearest rows mostly share its
component, as images of one landmark do), has a moderate intrinsic dimension (the local
intrinsic dimension at k = 100 is measured and reported) and is not isotropic noise, on which
approximate search means nothing. Rows are generated in seeded 65536-row chunks, so a smaller N
is a prefix of a larger one; queries are a separate seeded stream, distinct from the database.

    .venv/bin/python benchmarks/search.py [--sizes 100000,1000000] [--queries 1000] [--k 100]
        [--backends exact,ann,auto,ivfflat,ivfpq,hnsw,milvus] [--json out.json] [--write | --write-auto]
    .venv/bin/python benchmarks/search.py --render out.json --write   # re-render a saved run

``--exact-precision`` adds, per size, the two first-pass precisions of exact search
(``imret.index.exact``): the fp32 and bf16 matmul peaks of this machine at the search's shape,
exact search with an fp32 first pass against the fp32 matmul floor, with a bf16 first pass
(+ exact re-scoring) against fp32 and whether the two results are identical (ids and scores);
``--exact-only`` runs only that (no backend is built)::

    .venv/bin/python benchmarks/search.py --sizes 100000,1000000 --exact-only --write-exact

``--write`` replaces the section between ``<!-- search:begin -->`` and ``<!-- search:end -->``
in BENCHMARKS.md (appends it the first time). ``--write-auto`` replaces only its subsection on
the ``auto`` backend (``<!-- search-auto:begin -->`` ... ``<!-- search-auto:end -->``, put just
before ``<!-- search:end -->`` the first time), for a run of ``--backends exact,ann,auto``.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import gc
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from imret.index import create_backend, load_backend, parse_spec, resolve_spec, tie_aware_recall
from imret.index.exact import ExactBackend, bf16_speedup, exact_search, prepare_rows, resolve_precision
from imret.index.tuning import auto_target, tune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cpu_name, write_section  # noqa: E402

BEGIN, END = "<!-- search:begin -->", "<!-- search:end -->"
AUTO_BEGIN, AUTO_END = "<!-- search-auto:begin -->", "<!-- search-auto:end -->"
EXACT_BEGIN, EXACT_END = "<!-- search-exact:begin -->", "<!-- search-exact:end -->"

TEMPLATES = {
    "exact": "exact",
    "ann": "ann",
    "auto": "auto?recall=0.95&k={k}",
    "ivfflat": "faiss:IVF{nlist},Flat?nprobe={nprobe}",
    "ivfpq": "faiss:IVF{nlist},PQ64x8,RFlat?nprobe={nprobe}&k_factor=8",
    "hnsw": "faiss:HNSW32?efSearch=128",
    "milvus": "milvus:{tmp}/bench.db",
}
#: search-parameter sweeps run on a saved index (reloaded with other parameters, no rebuild)
SWEEPS = {"ann": ("nprobe", (8, 16, 32, 64, 128)), "ivfflat": ("nprobe", (8, 16, 32, 64, 128)),
          "hnsw": ("efSearch", (128, 256, 512))}
DATA = {"components": 1000, "spectrum_power": 1.0, "spread": 1.0, "seed": 0, "chunk_rows": 65536}
ADD_CHUNK = 65536  # rows per add() call, as the store does
MIB = 1 << 20


# -- data -------------------------------------------------------------------------------------

class Descriptors:
    """Seeded synthetic L2-normalised descriptors: a Gaussian mixture with a power-law spectrum."""

    def __init__(self, dim: int, *, components: int, spectrum_power: float, spread: float, seed: int,
                 chunk_rows: int):
        self.dim, self.spread, self.seed, self.chunk_rows = dim, spread, seed, chunk_rows
        rs = np.random.default_rng([seed, 2])
        lam = np.arange(1, dim + 1, dtype=np.float64) ** (-spectrum_power)
        lam /= lam.sum()
        self.participation_ratio = float(lam.sum() ** 2 / (lam ** 2).sum())
        self.sd = np.sqrt(lam).astype(np.float32)
        self.rotation = torch.from_numpy(np.linalg.qr(rs.standard_normal((dim, dim)))[0].astype(np.float32))
        self.means = rs.standard_normal((components, dim)).astype(np.float32) * self.sd
        self.components = components

    def sample(self, n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        """``(n, dim)`` float32 rows and their ``(n,)`` component labels from seeded ``stream``."""
        out = np.empty((n, self.dim), np.float32)
        labels = np.empty(n, np.int32)
        for j, start in enumerate(range(0, n, self.chunk_rows)):
            stop = min(n, start + self.chunk_rows)
            rs = np.random.default_rng([self.seed, stream, j])
            c = rs.integers(self.components, size=self.chunk_rows)[: stop - start]
            g = rs.standard_normal((self.chunk_rows, self.dim), dtype=np.float32)[: stop - start]
            g *= self.spread * self.sd
            g += self.means[c]
            x = torch.from_numpy(g) @ self.rotation
            x /= torch.linalg.vector_norm(x, dim=1, keepdim=True)
            out[start:stop] = x.numpy()
            labels[start:stop] = c
        return out, labels


# -- machine ----------------------------------------------------------------------------------

def machine() -> dict:
    cpu = cpu_name()
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    import faiss

    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                "faiss": faiss.__version__}
    for mod in ("pymilvus", "milvus_lite"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # optional; a broken install is reported as missing
            pass
    amx = avx512_bf16 = False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
        amx = any(fl.startswith("amx") for fl in flags)
        avx512_bf16 = "avx512_bf16" in flags
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "versions": versions,
            "threads": torch.get_num_threads(), "amx": amx, "avx512_bf16": avx512_bf16}


def code_version() -> str:
    """The git commit measured, and whether the index sources differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/imret/index"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = sorted({line[3:] for line in dirty if line.strip()})
    return f"commit {head}" + (f" with uncommitted changes in {', '.join(changed)}" if changed else "")


def _status_kib(pid: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: str) -> list[str]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = f.read().split()
                out += kids
                todo += kids
        except OSError:
            continue
    return out


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise), so that
    the next backend's RSS growth is not hidden by memory the previous one freed."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def rss_bytes() -> int:
    """Resident memory of this process and its descendants (an embedded engine may fork one)."""
    return 1024 * sum(_status_kib(p, "VmRSS") for p in ["self", *_descendants(str(os.getpid()))])


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: write 5 to clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    return 1024 * _status_kib("self", "VmHWM")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class one_thread:
    """Run a block with one torch and one FAISS thread (for the single-query latencies)."""

    def __enter__(self):
        import faiss

        self.n = torch.get_num_threads()
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)

    def __exit__(self, *exc):
        import faiss

        torch.set_num_threads(self.n)
        faiss.omp_set_num_threads(self.n)


class Clock:
    """Wall seconds, process CPU seconds (user + system) and system seconds of a block."""

    def __enter__(self):
        self.w0, self.c0, self.s0 = time.perf_counter(), time.process_time(), os.times().system
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0
        self.sys = os.times().system - self.s0


# -- floors -----------------------------------------------------------------------------------

def stream_seconds(x: np.ndarray, repeats: int = 3) -> float:
    """Fastest full read of ``x`` (torch multi-threaded sums, NumPy reduce), best of ``repeats``."""
    t = torch.from_numpy(x)
    best = math.inf
    for _ in range(repeats):
        for fn in (lambda: t.sum(), lambda: t.sum(dim=0), lambda: np.add.reduce(x, axis=0)):
            with Clock() as c:
                fn()
            best = min(best, c.wall)
    return best


def peak_gflops(q: int, d: int, repeats: int = 3) -> dict:
    """Best fp32 matmul GFLOP/s: the search's shape (Q x D) @ (D x 65536) and a square 4096^3.

    ``peak`` is by wall clock; ``peak_cpu`` divides by CPU seconds per thread instead, which
    discounts the time the threads were descheduled on a shared machine; ``<shape>_cpu`` the
    same per shape. ``rows_by_queries`` (not in the peaks): the same product computed the other
    way round, (65536 x D) @ (D x Q), the orientation ``exact_search`` uses.
    """
    out, cpu = {}, {}
    threads = torch.get_num_threads()
    shapes = {"search_shape": (q, d, 65536), "square_4096": (4096, 4096, 4096), "rows_by_queries": (65536, d, q)}
    for name, (m, kk, n) in shapes.items():
        a, b = torch.randn(m, kk), torch.randn(kk, n)
        a @ b  # warm-up
        best, best_cpu = math.inf, math.inf
        for _ in range(repeats):
            with Clock() as c:
                a @ b
            best, best_cpu = min(best, c.wall), min(best_cpu, c.cpu / threads)
        out[name] = 2 * m * kk * n / best / 1e9
        cpu[name] = 2 * m * kk * n / best_cpu / 1e9
    out.update({f"{name}_cpu": v for name, v in cpu.items()})
    out["peak"] = max(out["search_shape"], out["square_4096"])
    out["peak_cpu"] = max(cpu["search_shape"], cpu["square_4096"])
    return out


def bf16_gflops(q: int, d: int, repeats: int = 3) -> float:
    """Best bf16 matmul GFLOP/s at the search's shape (Q x D) @ (D x 65536), by wall clock."""
    a, b = torch.randn(q, d).bfloat16(), torch.randn(65536, d).bfloat16()
    a @ b.T  # warm-up
    best = math.inf
    for _ in range(repeats):
        with Clock() as c:
            a @ b.T
        best = min(best, c.wall)
    return 2 * q * d * 65536 / best / 1e9


def bench_exact_precision(x: np.ndarray, q: np.ndarray, k: int, repeats: int) -> dict:
    """Exact search with an fp32 and a bf16 first pass, against the matmul floors of this run.

    Both paths search as ``ExactBackend`` does (rows prepared once: the norm bounds, and for
    bf16 the bfloat16 copy; preparing is timed apart). The floors are the bare products
    (Q x D) @ (D x N) at the peaks measured just before and just after.
    """
    n, d = x.shape
    flops = 2 * q.shape[0] * n * d
    out: dict = {"gflops_fp32_before": peak_gflops(q.shape[0], d), "gflops_bf16_before": bf16_gflops(q.shape[0], d),
                 "bf16_speedup_probe": bf16_speedup(), "auto_chooses": resolve_precision("auto")}
    results = {}
    for precision in ("fp32", "bf16"):
        with Clock() as prep:
            prepared = prepare_rows(x, precision)
        exact_search(q[:10], x, k, precision=precision, prepared=prepared)  # warm-up
        best = None
        for _ in range(repeats):
            with Clock() as c:
                res = exact_search(q, x, k, precision=precision, prepared=prepared)
            if best is None or c.wall < best[0].wall:
                best = (c, res)
        results[precision] = best[1]
        out[precision] = {"search_s": best[0].wall, "search_cpu_s": best[0].cpu, "prepare_s": prep.wall}
        del prepared
        release_memory()
        print(f"  exact {precision}: {best[0].wall:.3f} s (CPU {best[0].cpu:.2f} s), prepare {prep.wall:.2f} s", flush=True)
    out["gflops_fp32_after"] = peak_gflops(q.shape[0], d)
    out["gflops_bf16_after"] = bf16_gflops(q.shape[0], d)
    threads = torch.get_num_threads()
    peak32 = max(out["gflops_fp32_before"]["peak"], out["gflops_fp32_after"]["peak"])
    peak32_cpu = max(out["gflops_fp32_before"]["peak_cpu"], out["gflops_fp32_after"]["peak_cpu"])
    peak16 = max(out["gflops_bf16_before"], out["gflops_bf16_after"])
    out.update(peak_fp32=peak32, peak_fp32_cpu=peak32_cpu, peak_bf16=peak16, floor_fp32_s=flops / (peak32 * 1e9),
               floor_bf16_s=flops / (peak16 * 1e9), floor_fp32_cpu_s=flops / (peak32_cpu * 1e9))
    for precision in ("fp32", "bf16"):
        r = out[precision]
        r["vs_floor_fp32"] = r["search_s"] / out["floor_fp32_s"]
        r["vs_floor_fp32_cpu"] = r["search_cpu_s"] / threads / out["floor_fp32_cpu_s"]
    out["bf16"]["vs_floor_bf16"] = out["bf16"]["search_s"] / out["floor_bf16_s"]
    out["bf16_vs_fp32"] = out["fp32"]["search_s"] / out["bf16"]["search_s"]
    out["bf16_vs_fp32_cpu"] = out["fp32"]["search_cpu_s"] / out["bf16"]["search_cpu_s"]
    a, b = results["fp32"], results["bf16"]
    out["identical"] = bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))
    out["differing_ids"] = int((a[1] != b[1]).sum())
    print(f"  exact: fp32 {out['fp32']['vs_floor_fp32']:.2f}x its floor ({out['fp32']['vs_floor_fp32_cpu']:.2f}x by CPU), "
          f"bf16 {out['bf16_vs_fp32']:.2f}x faster ({out['bf16_vs_fp32_cpu']:.2f}x by CPU), identical: {out['identical']}",
          flush=True)
    return out


# -- one backend ------------------------------------------------------------------------------

def pq_code_bytes(factory: str, n: int) -> int | None:
    m = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    if not m:
        return None
    return n * int(m.group(1)) * int(m.group(2) or 8) // 8


def time_search(b, q: np.ndarray, k: int, repeats: int) -> tuple[Clock, np.ndarray, np.ndarray]:
    """The fastest of ``repeats`` batch searches: its clock and its ``(scores, ids)``."""
    best = (None, None, None)
    for _ in range(repeats):
        with Clock() as c:
            s, i = b.search(q, k)
        if best[0] is None or c.wall < best[0].wall:
            best = (c, s, i)
    return best


def single_query_ms(b, q: np.ndarray, k: int, n: int, budget_s: float) -> tuple[float, int]:
    """Median latency (ms) of one-query searches, over up to ``n`` queries or ``budget_s`` seconds."""
    lat = []
    t_end = time.perf_counter() + budget_s
    for i in range(min(n, q.shape[0])):
        t0 = time.perf_counter()
        b.search(q[i:i + 1], k)
        lat.append(time.perf_counter() - t0)
        if len(lat) >= 10 and time.perf_counter() > t_end:
            break
    return 1000 * float(np.median(lat)), len(lat)


def bench_backend(name: str, spec: str, x: np.ndarray, q: np.ndarray, k: int, gt, tmp: Path, args) -> tuple[dict, tuple]:
    """Build, time, check and save one backend; ``gt`` is the exact ``(scores, ids)`` (None for exact itself)."""
    n, dim = x.shape
    ids = np.arange(n, dtype=np.int64)
    release_memory()
    rss0 = rss_bytes()
    can_peak = reset_peak_rss()
    row: dict = {"name": name, "spec_asked": spec}
    print(f"  {name}: building {spec}", flush=True)
    with Clock() as build:
        train_rows = 0
        if parse_spec(spec).kind == "auto":
            # what Store._build_backend does for auto: tune on held-out rows, build the choice
            tuned = tune(x, None, auto_target(parse_spec(spec).params))
            row["tuning"] = tuned.record.to_dict()
            b = tuned.backend if tuned.backend is not None else ExactBackend.from_matrix(x)
        else:
            b = create_backend(spec, dim, root=tmp, n_hint=n)
        if not b.is_trained:
            # what Store._build_backend samples, unless --train-rows says otherwise
            train_rows = min(n, args.train_rows or max(b.min_train_size, 100_000))
            sample = np.sort(np.random.default_rng(0).choice(n, size=train_rows, replace=False))
            b.train(x[sample])
            del sample
        for start in range(0, n if "tuning" not in row else 0, ADD_CHUNK):  # a tuned index is full
            b.add(x[start:start + ADD_CHUNK], ids[start:start + ADD_CHUNK])
        if hasattr(b, "flush"):
            b.flush()  # Milvus: rows persisted before the build counts as done
    release_memory()
    row.update(spec=b.spec, train_rows=train_rows, build_s=build.wall, build_cpu_s=build.cpu,
               rss_held_bytes=rss_bytes() - rss0,
               rss_peak_bytes=(peak_rss_bytes() - rss0) if can_peak else None)
    print(f"  {name}: {b.spec} built in {build.wall:.1f} s (CPU {build.cpu:.1f} s)", flush=True)

    save_dir = tmp / f"saved_{name}"
    shutil.rmtree(save_dir, ignore_errors=True)
    save_dir.mkdir(parents=True)
    if b.external:
        # an external engine may index in the background (Milvus Lite does): time one batch as
        # built, then save, close and reopen it as a later process would, and time that
        b.search(q[:10], k)
        c0, _, f0 = time_search(b, q, k, 1)
        wall = row["fresh_search_s"] = c0.wall
        row["fresh_recall"] = tie_aware_recall(q, x, ids, gt[0], f0, k) if gt is not None else 1.0
        with Clock() as c:
            b.save(save_dir)
            b.close()
        row["save_s"] = c.wall
        with Clock() as c:
            b = load_backend(row["spec"], dim, save_dir, root=tmp)
        row["reopen_s"] = c.wall
        print(f"  {name}: as built {q.shape[0] / wall:.0f} QPS, recall {row['fresh_recall']:.4f}; save + close "
              f"{row['save_s']:.1f} s, reopen {row['reopen_s']:.1f} s", flush=True)
    with Clock() as first:
        b.search(q[:10], k)  # warm-up (lazy index loads, allocator); not in the timings
    row["first_search_s"] = first.wall
    c, scores, found = time_search(b, q, k, args.repeats)
    row.update(search_s=c.wall, search_cpu_s=c.cpu, search_sys_s=c.sys)
    row["qps"] = q.shape[0] / row["search_s"]
    row["single_ms"], row["single_n"] = single_query_ms(b, q, k, args.single, args.single_budget)
    with one_thread():
        row["single_1t_ms"], _ = single_query_ms(b, q, k, args.single, args.single_budget)
    if gt is None:  # the exact backend is the reference; check it against a plain NumPy product
        m = min(16, q.shape[0])
        s_np = np.partition(q[:m] @ x.T, n - k, axis=1)[:, n - k:]
        top = -np.sort(-s_np, axis=1)
        row["numpy_check_recall"] = tie_aware_recall(q[:m], x, ids, top, found[:m], k)
        row["recall"] = 1.0
        gt = (scores, found)
    else:
        row["recall"] = tie_aware_recall(q, x, ids, gt[0], found, k)
    print(f"  {name}: search {row['search_s']:.3f} s ({row['qps']:.0f} QPS), recall@{k} {row['recall']:.4f}, "
          f"single {row['single_ms']:.2f} ms ({row['single_1t_ms']:.2f} ms 1 thread), held {row['rss_held_bytes'] / MIB:.0f} MiB", flush=True)

    info = b.describe()
    if "index_bytes" in info:
        row["index_bytes"] = int(info["index_bytes"])
    elif spec == "exact":
        row["index_bytes"] = n * (dim * 4 + 8 + 1)  # rows, ids, alive mask
    factory = getattr(b, "factory", "")
    codes = pq_code_bytes(factory, n)
    if codes is not None:
        row["pq_code_bytes"] = codes
        row["raw_bytes"] = n * dim * 4
    if not b.external:
        with Clock() as save:
            b.save(save_dir)
        row["save_s"] = save.wall
    b.close()
    row["disk_bytes"] = dir_bytes(save_dir)
    del b
    release_memory()
    target = resolve_spec(row["spec"]).target
    if row["spec"].startswith("milvus:") and target.endswith(".db"):
        row["disk_bytes"] += dir_bytes(Path(target))  # Milvus Lite writes its index files on close

    sweep = SWEEPS.get(name)
    if sweep and args.sweep and not row["spec"].startswith("milvus"):
        param, values = sweep
        base = resolve_spec(row["spec"])
        limit = None
        m = re.match(r"IVF(\d+)", base.target)
        if m:
            limit = int(m.group(1))
        row["sweep"] = []
        for v in values:
            if limit is not None and v > limit:
                continue
            params = dict(base.params, **{param: str(v)})
            s2 = f"{base.kind}:{base.target}?" + "&".join(f"{a}={c}" for a, c in params.items())
            b2 = load_backend(s2, dim, save_dir)
            b2.search(q[:10], k)
            c2, _, f2 = time_search(b2, q, k, args.repeats)
            wall, cpu = c2.wall, c2.cpu
            r2 = tie_aware_recall(q, x, ids, gt[0], f2, k)
            row["sweep"].append({param: v, "search_s": wall, "search_cpu_s": cpu, "qps": q.shape[0] / wall,
                                 "recall": r2})
            print(f"    {param}={v}: {q.shape[0] / wall:.0f} QPS, recall {r2:.4f}", flush=True)
            b2.close()
            del b2
            release_memory()
    shutil.rmtree(save_dir, ignore_errors=True)
    return row, gt


def bench_size(n: int, args, data: Descriptors, tmp: Path) -> dict:
    from imret.index.faiss_backend import default_ann_spec

    print(f"N = {n}: generating", flush=True)
    with Clock() as gen:
        x, x_labels = data.sample(n, stream=0)
        q, q_labels = data.sample(args.queries, stream=1)
    res: dict = {"n": n, "dim": args.dim, "queries": args.queries, "k": args.k, "generate_s": gen.wall,
                 "loadavg_start": os.getloadavg()}
    ann = resolve_spec(default_ann_spec(n))
    nlist = int(re.match(r"IVF(\d+)", ann.target).group(1)) if ann.target.startswith("IVF") else 1024
    nprobe = ann.params.get("nprobe", "16")
    if args.exact_precision or args.exact_only:
        res["exact_precision"] = bench_exact_precision(x, q, args.k, args.repeats)
        release_memory()
    if args.exact_only:
        res.update(backends=[], skipped=[], loadavg_end=os.getloadavg())
        return res
    res["stream_s"] = stream_seconds(x)
    res["stream_gbs"] = x.nbytes / res["stream_s"] / 1e9
    res["gflops_before"] = peak_gflops(args.queries, args.dim)  # again after exact search
    print(f"  floor: stream {res['stream_s']:.3f} s ({res['stream_gbs']:.1f} GB/s), matmul peak "
          f"{res['gflops_before']['peak']:.0f} GFLOP/s", flush=True)

    rows, skipped, gt = [], [], None
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "exact" in names:
        names.remove("exact")
    names.insert(0, "exact")  # always first: it is the reference for recall
    for name in names:
        if name == "hnsw" and n > args.hnsw_max_n:
            skipped.append({"name": name, "why": f"N > --hnsw-max-n {args.hnsw_max_n}"})
            continue
        if name == "milvus" and n > args.milvus_max_n:
            skipped.append({"name": name, "why": f"N > --milvus-max-n {args.milvus_max_n}"})
            continue
        tmpl = TEMPLATES.get(name, name)
        if ":" not in tmpl and tmpl.split("?")[0] not in ("exact", "ann", "auto"):
            raise SystemExit(f"unknown backend {name!r}; available: {', '.join(TEMPLATES)} or a spec string")
        spec = tmpl.format(nlist=nlist, nprobe=nprobe, tmp=tmp, k=args.k)
        if spec.startswith("milvus:"):
            shutil.rmtree(Path(spec[len("milvus:"):]), ignore_errors=True)
        try:
            row, gt = bench_backend(name, spec, x, q, args.k, gt, tmp, args)
        except Exception as e:  # a broken optional backend is reported, the others still run
            if name == "exact":
                raise
            print(f"  {name}: FAILED {type(e).__name__}: {e}", flush=True)
            skipped.append({"name": name, "spec": spec, "why": f"failed: {type(e).__name__}: {e}"})
            continue
        if name == "exact":
            # data statistics from the exact result: top-1 / top-k similarity, the fraction of the
            # top-k sharing the query's component, and the MLE local intrinsic dimension
            s, i = gt
            d = np.sqrt(np.maximum(2 - 2 * s.astype(np.float64), 1e-12))
            lid = -1 / np.mean(np.log(d[:, :-1] / d[:, -1:]), axis=1)
            res["data_stats"] = {"sim_top1": float(s[:, 0].mean()), "sim_topk": float(s[:, -1].mean()),
                                 "same_component": float((x_labels[i] == q_labels[:, None]).mean()),
                                 "lid_median": float(np.median(lid))}
            res["gflops_after"] = peak_gflops(args.queries, args.dim)
            flops = 2 * args.queries * n * args.dim
            res["gflops"] = {key: max(res["gflops_before"][key], res["gflops_after"][key])
                             for key in res["gflops_before"]}
            res["matmul_floor_s"] = flops / (res["gflops"]["peak"] * 1e9)
            res["floor_s"] = max(res["stream_s"], res["matmul_floor_s"])
            res["exact_vs_floor"] = row["search_s"] / res["floor_s"]
            # the same ratio from CPU seconds per thread, for a machine shared with other jobs
            res["exact_vs_floor_cpu"] = (row["search_cpu_s"] / torch.get_num_threads()) / max(
                res["stream_s"], flops / (res["gflops"]["peak_cpu"] * 1e9))
            print(f"  floor {res['floor_s']:.2f} s (peak {res['gflops']['peak']:.0f} GFLOP/s): exact "
                  f"{res['exact_vs_floor']:.2f}x wall, {res['exact_vs_floor_cpu']:.2f}x CPU-normalised", flush=True)
        rows.append(row)
        if args.json:  # partial results survive a crash of a later backend
            _dump_partial(args, n, res, rows, skipped)
    # QPS by CPU: the queries per second had the process kept all its threads busy on cores of
    # its own (queries x threads / CPU seconds); steadier than wall clock on a shared machine
    threads = torch.get_num_threads()
    for r in [*rows, *(s for r in rows for s in r.get("sweep", []))]:
        r["qps_cpu"] = args.queries * threads / max(r["search_cpu_s"], 1e-9)
    exact_qps, exact_qps_cpu = rows[0]["qps"], rows[0]["qps_cpu"]
    for r in [*rows, *(s for r in rows for s in r.get("sweep", []))]:
        r["qps_vs_exact"] = r["qps"] / exact_qps
        r["qps_cpu_vs_exact"] = r["qps_cpu"] / exact_qps_cpu
    res.update(backends=rows, skipped=skipped, exact_single_vs_stream=rows[0]["single_ms"] / 1000 / res["stream_s"],
               loadavg_end=os.getloadavg())
    del x, q
    release_memory()
    return res


_RUN: dict = {}  # the run so far, for the partial dumps


def _dump_partial(args, n, res, rows, skipped) -> None:
    """Write the finished sizes and the size in progress, so a killed run leaves its figures."""
    current = dict(res, backends=rows, skipped=skipped, partial=True)
    done = _RUN.get("sizes", [])
    Path(args.json).write_text(json.dumps(dict(_RUN, sizes=[*done, current], partial=True), indent=1, default=float))


# -- report -----------------------------------------------------------------------------------

def _mib(b) -> str:
    return "–" if b is None else f"{b / MIB:,.0f}"


def render(run: dict) -> str:
    m = run["machine"]
    v = m["versions"]
    lines = [BEGIN, f"## Vector search: `benchmarks/search.py` ({run['date']})", ""]
    lines += [f"Command: `{run['command']}` (total {run['total_s'] / 60:.1f} min), "
              f"on {run.get('code', 'unknown code')}.", ""]
    lib = ", ".join(f"{k} {v[k]}" for k in ("torch", "faiss", "numpy", "pymilvus", "milvus_lite") if k in v)
    lines += [f"Machine: {m['cpu']}, {m['cores']} logical cores, {m['ram_bytes'] / (1 << 30):.1f} GiB RAM, no GPU; "
              f"{lib}; {m['threads']} threads for torch and FAISS (Milvus Lite runs its own). "
              "**Figures are wall-clock seconds on a possibly shared 2-core VM** (the load average "
              "at the start and end of each size is given); the process CPU seconds are beside them "
              f"(CPU ≈ {m['threads']} × wall when both cores were ours), and *QPS by CPU* = queries × "
              f"{m['threads']} threads / CPU seconds is the throughput had the process had both cores to "
              "itself, the steadier figure when others share the machine. Each batch time is the best of "
              f"{run['args']['repeats']}; single-query latency is the median over up to {run['args']['single']} "
              "queries searched one at a time, with the same threads and, in brackets, with one thread: on a "
              "busy 2-core machine a parallel region that waits for a descheduled second thread costs a "
              "whole scheduler time slice (the 4 / 8 / 24 ms figures), which one thread avoids.", ""]
    d = run["data"]
    lines += [f"Data: {run['args']['queries']} queries, k = {run['args']['k']}, D = {run['args']['dim']}: "
              f"seeded synthetic descriptors, a mixture of {d['components']} Gaussians sharing one "
              f"covariance with a power-law spectrum (λᵢ ∝ i^-{d['spectrum_power']:g}, participation ratio "
              f"{d['participation_ratio']:.0f} of {run['args']['dim']}, randomly rotated), component means drawn "
              f"from the same covariance and points spread around them by {d['spread']:g}× as much, L2-normalised; "
              "queries from the same distribution, distinct from the database; smaller N is a prefix of larger. "
              "Per size the table below gives what the exact result says about the data: mean top-1 and "
              "top-k similarity, the share of the top-k from the query's own component, and the median "
              "MLE local intrinsic dimension (LID) at k.", ""]
    lines += ["Build = create + train (on a seeded sample of max(min_train_size, 100k) rows, as the store "
              "does) + add in 65536-row chunks (+ flush for Milvus). Recall@k is `tie_aware_recall` against "
              "exact search. RSS = growth of the process's resident memory while the index is held "
              "(peak while building in brackets; freed heap is handed back to the OS between backends); "
              "index = the backend's own size (FAISS: serialised bytes); disk = bytes written by `save` "
              "(for Milvus Lite, its database directory).", ""]
    for res in run["sizes"]:
        n = res["n"]
        st = res.get("data_stats", {})
        lines += [f"### N = {n:,}", ""]
        lines += [f"- Floor of exact search: streaming {n:,} × {res['dim']} × 4 B = "
                  f"{n * res['dim'] * 4 / 1e9:.2f} GB takes {res['stream_s']:.3f} s ({res['stream_gbs']:.1f} GB/s); "
                  f"the product 2·Q·N·D = {2 * res['queries'] * n * res['dim'] / 1e12:.2f} TFLOP at the measured "
                  f"peak {res['gflops']['peak']:.0f} GFLOP/s (best of (Q×D)@(D×65536): "
                  f"{res['gflops']['search_shape']:.0f}, 4096³: {res['gflops']['square_4096']:.0f}) takes "
                  f"{res['matmul_floor_s']:.2f} s. Floor = {res['floor_s']:.2f} s; exact search took "
                  f"{res['backends'][0]['search_s']:.2f} s = **{res['exact_vs_floor']:.2f}× the floor** "
                  f"({res['exact_vs_floor_cpu']:.2f}× counted in CPU seconds per thread against the peak so "
                  f"counted, {res['gflops']['peak_cpu']:.0f} GFLOP/s; the peak is the best of measurements just "
                  "before and just after exact search; of the search's "
                  f"{res['backends'][0]['search_cpu_s']:.1f} CPU s, {res['backends'][0].get('search_sys_s', 0):.2f} s "
                  "were system time). The wall-clock peak being "
                  f"{res['gflops']['peak'] / res['gflops']['peak_cpu']:.0%} of the CPU-second one says how much of "
                  "the two cores this process had. "
                  f"One query alone: {res['backends'][0]['single_ms']:.1f} ms = "
                  f"{res['exact_single_vs_stream']:.2f}× the streaming time.",
                  f"- Data: top-1 similarity {st.get('sim_top1', float('nan')):.3f}, top-{res['k']} "
                  f"{st.get('sim_topk', float('nan')):.3f}, {100 * st.get('same_component', float('nan')):.0f}% of "
                  f"the top-{res['k']} from the query's component, LID {st.get('lid_median', float('nan')):.1f}. "
                  f"Load average {res['loadavg_start'][0]:.1f} at the start, {res['loadavg_end'][0]:.1f} at the end.",
                  ""]
        lines += ["| backend | spec | build s (CPU s) | search s (CPU s) | QPS | × exact | QPS by CPU | × exact by CPU | "
                  f"recall@{res['k']} | 1-query ms (1 thread) | RSS MiB (peak) | index MiB | disk MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["backends"]:
            spec = r["spec"].replace(str(run.get("tmp", "")), "<tmp>").replace("|", "\\|")
            peak = f" ({_mib(r['rss_peak_bytes'])})" if r.get("rss_peak_bytes") is not None else ""
            lines.append(f"| {r['name']} | `{spec}` | {r['build_s']:.1f} ({r['build_cpu_s']:.1f}) | "
                         f"{r['search_s']:.3f} ({r['search_cpu_s']:.2f}) | {r['qps']:,.0f} | "
                         f"{r['qps_vs_exact']:.1f} | {r['qps_cpu']:,.0f} | {r['qps_cpu_vs_exact']:.1f} | {r['recall']:.4f} | {r['single_ms']:.2f} ({r['single_1t_ms']:.2f}) | "
                         f"{_mib(r['rss_held_bytes'])}{peak} | {_mib(r.get('index_bytes'))} | "
                         f"{_mib(r['disk_bytes'])} |")
        lines.append("")
        sweeps = [r for r in res["backends"] if r.get("sweep")]
        if sweeps:
            lines.append("Search-parameter sweeps on the same saved index (reloaded with the parameter, best of "
                         f"{run['args']['repeats']} batches each): QPS / × exact (by wall clock; by CPU) / "
                         f"recall@{res['k']}.")
            lines.append("")
            for r in sweeps:
                cells, first = [], None
                for s in r["sweep"]:
                    p = next(k for k in s if k in ("nprobe", "efSearch"))
                    cells.append(f"{p} {s[p]}: {s['qps']:,.0f} / {s['qps_vs_exact']:.1f}×; "
                                 f"{s['qps_cpu_vs_exact']:.1f}× / {s['recall']:.3f}")
                    if first is None and s["recall"] >= 0.95:
                        first = f"{p} {s[p]}, at {s['qps_vs_exact']:.1f}× exact ({s['qps_cpu_vs_exact']:.1f}× by CPU)"
                reach = f" (recall ≥ 0.95 first at {first})" if first else " (recall < 0.95 throughout)"
                lines.append(f"- {r['name']} (`{r['spec'].split('?')[0]}`): " + "; ".join(cells) + reach)
            lines.append("")
        for r in res["backends"]:
            if "pq_code_bytes" in r:
                lines.append(f"- {r['name']}: the PQ64x8 codes take {_mib(r['pq_code_bytes'])} MiB against "
                             f"{_mib(r['raw_bytes'])} MiB of raw float32 rows ({r['raw_bytes'] / r['pq_code_bytes']:.0f}× "
                             f"smaller); the RFlat re-ranking stage keeps the raw rows too, so the index as a whole "
                             f"is {_mib(r.get('index_bytes'))} MiB.")
            if r["name"] == "exact" and "numpy_check_recall" in r:
                lines.append(f"- exact: checked against a plain NumPy product on 16 queries, recall "
                             f"{r['numpy_check_recall']:.4f}.")
            if "fresh_search_s" in r:
                brute = " (all exact: the engine was still scanning raw rows)" if r["fresh_recall"] > 0.9999 else ""
                lines.append(f"- {r['name']}: searched right after the rows went in and were flushed, a batch took "
                             f"{r['fresh_search_s']:.2f} s ({res['queries'] / r['fresh_search_s']:,.0f} QPS) at recall "
                             f"{r['fresh_recall']:.4f}{brute}; save + close took {r['save_s']:.1f} s and reopening "
                             f"{r['reopen_s']:.1f} s. The table row is the reopened collection, as a later process "
                             "sees it.")
            if r["first_search_s"] > max(1.0, r["search_s"]):
                lines.append(f"- {r['name']}: the first (warm-up) search took {r['first_search_s']:.1f} s.")
        for s in res["skipped"]:
            lines.append(f"- {s['name']}: not run at this size ({s['why']}).")
        lines.append("")
    lines += run.get("notes", [])
    if any(r["name"] == "auto" for res in run["sizes"] for r in res["backends"]):
        lines += ["", render_auto(run).rstrip("\n"), ""]
    if any("exact_precision" in res for res in run["sizes"]):
        lines += ["", render_exact(run).rstrip("\n"), ""]
    targets = run.get("targets")
    if targets:
        lines += ["", f"Targets at N = {targets['n']:,}:", ""]
        for t in targets["checks"]:
            lines.append(f"- {t['what']}: {t['value']} → **{'pass' if t['ok'] else 'FAIL'}**")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def targets(run: dict) -> dict | None:
    big = max(run["sizes"], key=lambda r: r["n"], default=None)
    if big is None:
        return None
    by = {r["name"]: r for r in big["backends"]}
    checks = [{"what": "exact search within 1.5× of the floor", "ok": big["exact_vs_floor"] <= 1.5,
               "value": f"{big['exact_vs_floor']:.2f}× wall-clock ({big['exact_vs_floor_cpu']:.2f}× in CPU seconds)"}]
    if "ann" in by:
        a = by["ann"]
        checks.append({"what": f"ANN default (`{a['spec']}`) recall@{big['k']} ≥ 0.95", "ok": a["recall"] >= 0.95,
                       "value": f"{a['recall']:.4f}"})
        checks.append({"what": "ANN default ≥ 10× exact QPS", "ok": a["qps_vs_exact"] >= 10,
                       "value": f"{a['qps_vs_exact']:.1f}× wall-clock ({a['qps']:,.0f} vs {by['exact']['qps']:,.0f} QPS), "
                                f"{a['qps_cpu_vs_exact']:.1f}× by CPU seconds"})
    if "auto" in by:
        a = by["auto"]
        checks.append({"what": f"auto (`{a['spec_asked']}` → `{a['spec']}`) recall@{big['k']} ≥ 0.95 on queries "
                               "outside the database", "ok": a["recall"] >= 0.95, "value": f"{a['recall']:.4f}"})
        checks.append({"what": "auto ≥ 50× exact QPS", "ok": a["qps_vs_exact"] >= 50,
                       "value": f"{a['qps_vs_exact']:.1f}× wall-clock ({a['qps']:,.0f} vs {by['exact']['qps']:,.0f} QPS), "
                                f"{a['qps_cpu_vs_exact']:.1f}× by CPU seconds"})
    return {"n": big["n"], "checks": checks}


def render_auto(run: dict) -> str:
    """The subsection on the ``auto`` backend: what it chose at each N and how it measured."""
    m = run["machine"]
    lines = [AUTO_BEGIN, f"### The `auto` backend: index and nprobe tuned for a recall target ({run['date']})", ""]
    lines += [f"Command: `{run['command']}` (total {run['total_s'] / 60:.1f} min), on {run.get('code', 'unknown code')}. "
              f"Machine: {m['cpu']} ({'with' if m.get('amx') else 'no'} AMX), {m['cores']} logical cores, no GPU, "
              f"{m['threads']} threads for torch and FAISS; wall-clock figures on a shared VM (load average at the "
              "start and end of each size below; *by CPU* = queries × threads / CPU seconds, the steadier figure).", ""]
    lines += ["`auto?recall=0.95&k=100` is tuned as the store tunes it (`imret.index.tuning.tune`): 1000 database rows "
              "drawn with seed 0 are held out as queries, each candidate index is built from the *other* rows (no "
              "query can find itself), recall@100 is measured against exact search over those rows, and the "
              "smallest nprobe whose one-sided 95 % lower bound reaches 0.95 is taken; then the held-out rows are "
              "added. The choice is then measured like every backend of the tables above: the benchmark's own "
              "queries (a separate stream, not in the database), recall@100 against exact search, QPS against "
              "exact search in the same run. *Total build* = tuning included; *chosen index* = training and "
              "filling the chosen index only.", ""]
    lines += ["| N | chose | held-out recall (lower bound) | held-out QPS × exact | queries recall@100 | QPS | × exact "
              "(by CPU) | 1-query ms | total build s (CPU s; of it the chosen index) | RSS MiB (peak) | index MiB | "
              "default `ann` at this N: recall, × exact, build s (CPU s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for res in run["sizes"]:
        by = {r["name"]: r for r in res["backends"]}
        a = by.get("auto")
        if a is None or "tuning" not in a:
            continue
        t = a["tuning"]
        ann = by.get("ann")
        ann_cell = (f"{ann['recall']:.4f}, {ann['qps_vs_exact']:.1f}×, {ann['build_s']:.1f} ({ann['build_cpu_s']:.1f}) "
                    f"(`{ann['spec']}`)" if ann else "–")
        peak = f" ({_mib(a['rss_peak_bytes'])})" if a.get("rss_peak_bytes") is not None else ""
        lines.append(f"| {res['n']:,} | `{a['spec']}` | {t['recall']:.4f} ({t['recall_lower']:.4f}) | "
                     f"{t['qps'] / max(t['exact_qps'], 1e-9):.1f} | **{a['recall']:.4f}** | {a['qps']:,.0f} | "
                     f"**{a['qps_vs_exact']:.1f}** ({a['qps_cpu_vs_exact']:.1f}) | {a['single_ms']:.2f} | "
                     f"{a['build_s']:.1f} ({a['build_cpu_s']:.1f}; {t['build_s']:.1f}) | {_mib(a['rss_held_bytes'])}{peak} | "
                     f"{_mib(a.get('index_bytes'))} | {ann_cell} |")
        families: dict[str, list[str]] = {}
        for x in t["tried"]:
            fam, _, param = x["spec"].partition("?")
            families.setdefault(fam.removeprefix("faiss:"), []).append(
                f"{param.replace('=', ' ')} {x['recall']:.3f} ({x['recall_lower']:.3f}, {x['qps']:,.0f} QPS)")
        tried = "; ".join(f"`{fam}`: " + ", ".join(v) for fam, v in families.items()) or "none"
        ex = by["exact"]
        notes.append(f"- N = {res['n']:,} (load {res['loadavg_start'][0]:.1f} → {res['loadavg_end'][0]:.1f}; exact "
                     f"search {ex['qps']:,.0f} QPS, matmul peak {res['gflops']['peak']:.0f} GFLOP/s by wall clock, "
                     f"{res['gflops']['peak_cpu']:.0f} by CPU seconds): "
                     f"{t['reason']}. Tuning took {t['tuning_s']:.1f} s: exact reference search of the "
                     f"{t['sample']} held-out rows ({t['exact_qps']:,.0f} QPS), the index built from the other "
                     f"{t['n'] - t['sample']:,} rows, then per setting the held-out recall (lower bound): {tried}.")
    lines += [""] + notes
    done = [res for res in run["sizes"] if any(r["name"] == "auto" and "tuning" in r for r in res["backends"])]
    if done:
        autos = [next(r for r in res["backends"] if r["name"] == "auto") for res in done]
        gap = max(abs(r["tuning"]["recall"] - r["recall"]) for r in autos)
        lines += ["", f"The recall measured on the held-out database rows and the recall on the benchmark's own "
                      f"queries differ by at most {gap:.4f}. On a busy machine exact search (one large matrix "
                      "product) loses more to the other processes than IVF search does, so the wall-clock "
                      "× exact is higher than the by-CPU one; the by-CPU figure is the one to compare across runs."]
        big = max(done, key=lambda res: res["n"])
        a = next(r for r in big["backends"] if r["name"] == "auto")
        ok = a["recall"] >= 0.95 and a["qps_vs_exact"] >= 50
        lines += ["", f"Bar at N = {big['n']:,}: recall@100 ≥ 0.95 at ≥ 50× exact QPS: recall {a['recall']:.4f} at "
                      f"{a['qps_vs_exact']:.1f}× wall-clock ({a['qps_cpu_vs_exact']:.1f}× by CPU) → "
                      f"**{'pass' if ok else 'FAIL'}**."]
    return "\n".join(lines + ["", AUTO_END]) + "\n"


def write_auto_section(text: str, path: Path) -> None:
    """Replace the auto subsection in BENCHMARKS.md; the first time, put it just before the end
    of the search section."""
    old = path.read_text(encoding="utf-8")
    if AUTO_BEGIN not in old and END in old:
        head, _, tail = old.partition(END)
        path.write_text(head + AUTO_BEGIN + "\n" + AUTO_END + "\n\n" + END + tail, encoding="utf-8")
    write_section(text, path, AUTO_BEGIN, AUTO_END)


def _exact_rates(res: dict) -> dict:
    """This size's fp32 product rates (best of before and after the searches) and floors."""
    e = res["exact_precision"]
    g = (e["gflops_fp32_before"], e["gflops_fp32_after"])
    flops = 2 * res["queries"] * res["n"] * res["dim"]
    best = {key: max(x.get(key, 0.0) for x in g)
            for key in ("search_shape", "square_4096", "search_shape_cpu", "rows_by_queries", "rows_by_queries_cpu")}
    out = {"shape": best["search_shape"], "square": best["square_4096"], "rq": best["rows_by_queries"],
           "floor": flops / (best["search_shape"] * 1e9),  # the bare (Q x D) @ (D x N) product
           "floor_cpu": flops / (best["search_shape_cpu"] * 1e9) if best["search_shape_cpu"] else None}
    if best["rows_by_queries"]:
        out["rq_floor"] = flops / (best["rows_by_queries"] * 1e9)
        out["rq_floor_cpu"] = flops / (best["rows_by_queries_cpu"] * 1e9)
    return out


def _by_cpu(r: dict, rates: dict, threads: int) -> str:
    """CPU seconds per thread of a search over those of the same-shape floor (– if not recorded)."""
    return f"{r['search_cpu_s'] / threads / rates['floor_cpu']:.2f}" if rates["floor_cpu"] else "–"


def render_exact(run: dict) -> str:
    """The subsection on exact search's first-pass precision (fp32, bf16 + exact re-scoring)."""
    m = run["machine"]
    lines = [EXACT_BEGIN, f"### Exact search: fp32 or bf16 first pass, against the matmul floor ({run['date']})", ""]
    lines += [f"Command: `{run['command']}`, on {run.get('code', 'unknown code')}. Machine: {m['cpu']} "
              f"({'with' if m.get('amx') else '**no**'} AMX; AVX512-BF16 per `/proc/cpuinfo`: "
              f"{'yes' if m.get('avx512_bf16') else 'no'}), {m['cores']} logical cores, no GPU, {m['threads']} torch "
              "threads; a shared VM, so wall-clock figures vary with the load (given per size) and the CPU-second "
              "figures are beside them.", ""]
    lines += ["Exact search (`imret.index.exact`) multiplies the rows with the queries in blocks of 65,536 rows "
              "(first pass, in fp32 or bf16; fp32 from 32 queries on as (rows×D)@(D×Q), the orientation this machine's MKL runs "
              "fastest), keeps per query a set of rows that holds its top `keep` first-pass scores (fp32: the "
              "`keep` groups of 64 rows with the largest maxima, one streaming pass plus a gather; bf16: "
              "`torch.topk`), less rows the blocks before rule out, then every row whose first-pass score could "
              "reach the top k within a proven error bound (`error_bound`: for bf16 the actual rounding errors "
              "of the factors by Cauchy–Schwarz, the float32 accumulation γ_D, the bfloat16 rounding of the "
              "output, and the re-scoring's own error), re-scores those exactly (float32 products summed along "
              "the row, `exact_scores`) and returns the top k, ties by row. Both precisions therefore return the "
              "same ids and scores bit for bit (`tests/test_exact_bf16.py` checks it on adversarial near-ties "
              "and clustered rows against a brute-force reference, and that a bound 10⁶× too small breaks it). "
              "`exact` (precision `auto`) takes bf16 where a bf16 product is measured ≥ 1.5× faster than fp32 "
              "once per process. Both searches use rows prepared once as the backend keeps them (bf16: a "
              "bfloat16 copy, half the size, and the norm bounds; its preparation time is given apart). "
              "*fp32 floor*: the bare product (Q×D)@(D×N) at the search's shape, at the best rate of "
              "(Q×D)@(D×65536) measured just before and just after (the bar's floor); *by CPU*: CPU seconds per "
              "thread against the same product's, the steadier figure on a loaded machine; *× 4096³ peak*: "
              "against the best fp32 rate of any shape; *× rows×queries product*: against the same product "
              "computed as (65536×D)@(D×Q), the orientation the search runs, i.e. what the search adds to its "
              "own matrix product. bf16 figures are against the bf16 product (Q×D)@(D×65536).", ""]
    lines += ["| N | load | fp32 GFLOP/s: search shape / 4096³ / rows×queries; bf16 | fp32 floor s (same shape) | "
              "fp32 exact s (CPU s) | × fp32 floor (by CPU) | × 4096³ peak (by CPU) | × rows×queries product (by CPU) | "
              "bf16 exact s (CPU s) | × fp32 floor | × bf16 floor | bf16 speed-up (by CPU) | identical | auto |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    threads = m["threads"]
    for res in run["sizes"]:
        e = res.get("exact_precision")
        if e is None:
            continue
        f, b = e["fp32"], e["bf16"]
        r = _exact_rates(res)
        rq = f"{r['rq']:.0f}" if r["rq"] else "–"
        by_rq = (f"{f['search_s'] / r['rq_floor']:.2f} ({f['search_cpu_s'] / threads / r['rq_floor_cpu']:.2f})"
                 if r["rq"] else "–")
        lines.append(f"| {res['n']:,} | {res['loadavg_start'][0]:.1f} → {res['loadavg_end'][0]:.1f} | "
                     f"{r['shape']:.0f} / {r['square']:.0f} / {rq}; {e['peak_bf16']:.0f} | {r['floor']:.3f} | "
                     f"{f['search_s']:.3f} ({f['search_cpu_s']:.2f}) | **{f['search_s'] / r['floor']:.2f}** "
                     f"({_by_cpu(f, r, threads)}) | {f['vs_floor_fp32']:.2f} ({f['vs_floor_fp32_cpu']:.2f}) | {by_rq} | "
                     f"{b['search_s']:.3f} ({b['search_cpu_s']:.2f}) | "
                     f"**{b['search_s'] / r['floor']:.2f}** | {b['vs_floor_bf16']:.2f} | **{e['bf16_vs_fp32']:.2f}×** "
                     f"({e['bf16_vs_fp32_cpu']:.2f}×) | {'yes' if e['identical'] else 'NO (' + str(e['differing_ids']) + ' ids)'} | "
                     f"{e['auto_chooses']} |")
    lines.append("")
    for res in run["sizes"]:
        e = res.get("exact_precision")
        if e is None:
            continue
        lines.append(f"- N = {res['n']:,}: fp32 peak {e['peak_fp32']:.0f} GFLOP/s by wall clock ({e['peak_fp32_cpu']:.0f} "
                     f"by CPU seconds), bf16 {e['peak_bf16']:.0f}; the process's probe (`bf16_speedup`, a "
                     f"(256×512)@(512×8192) product) measured bf16 {e['bf16_speedup_probe']:.2f}× fp32, so `auto` took "
                     f"{e['auto_chooses']}. Preparing the rows took {e['fp32']['prepare_s']:.2f} s (fp32: norm bounds) "
                     f"and {e['bf16']['prepare_s']:.2f} s (bf16 copy + bounds), once per index state.")
    lines.append("")
    bars = []
    for res in run["sizes"]:
        e = res.get("exact_precision")
        if e is None:
            continue
        r = _exact_rates(res)
        floor = r["floor"]
        used = e[e["auto_chooses"]]["search_s"] / floor
        fp32 = e["fp32"]["search_s"] / floor
        bars.append(f"- N = {res['n']:,}: `exact` as shipped (auto → {e['auto_chooses']}) took {used:.2f}× the fp32 "
                    f"floor → **{'pass' if used <= 1.2 else 'FAIL'}** (bar ≤ 1.2×); the fp32 path alone {fp32:.2f}× "
                    f"({_by_cpu(e['fp32'], r, m['threads'])} by CPU) → **{'pass' if fp32 <= 1.2 else 'FAIL'}**; bf16 + re-scoring {e['bf16_vs_fp32']:.2f}× faster "
                    f"than fp32 exact ({e['bf16_vs_fp32_cpu']:.2f}× by CPU) with "
                    f"{'identical ids and scores' if e['identical'] else 'DIFFERENT results'}"
                    + (" (the ≥ 3× bar is for AMX; this machine has none)." if not m.get("amx") else
                       f" → **{'pass' if e['bf16_vs_fp32'] >= 3 and e['identical'] else 'FAIL'}** (bar ≥ 3× on AMX)."))
    lines += ["Bars:", ""] + bars + [""]
    return "\n".join(lines + [EXACT_END]) + "\n"


def write_exact_section(text: str, path: Path) -> None:
    """Replace the exact-precision subsection in BENCHMARKS.md; the first time, put it just before
    the auto subsection (or the end of the search section)."""
    old = path.read_text(encoding="utf-8")
    if EXACT_BEGIN not in old:
        anchor = AUTO_BEGIN if AUTO_BEGIN in old else END
        if anchor in old:
            head, _, tail = old.partition(anchor)
            path.write_text(head + EXACT_BEGIN + "\n" + EXACT_END + "\n\n" + anchor + tail, encoding="utf-8")
    write_section(text, path, EXACT_BEGIN, EXACT_END)


# -- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated database sizes")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--backends", default="exact,ann,auto,ivfflat,ivfpq,hnsw,milvus",
                    help=f"comma-separated names ({', '.join(TEMPLATES)}) or spec strings")
    ap.add_argument("--hnsw-max-n", type=int, default=1_000_000, help="skip HNSW above this N (slow to build)")
    ap.add_argument("--milvus-max-n", type=int, default=100_000, help="skip Milvus Lite above this N (slow inserts)")
    ap.add_argument("--repeats", type=int, default=2, help="batch searches per backend; the best counts")
    ap.add_argument("--single", type=int, default=200, help="queries searched one at a time")
    ap.add_argument("--single-budget", type=float, default=10.0, help="seconds for the one-at-a-time searches")
    ap.add_argument("--train-rows", type=int, default=None,
                    help="training sample for trained indexes (default: the store's max(min_train_size, 100k))")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the nprobe / efSearch sweeps")
    ap.add_argument("--tmp", default=str(REPO / "runs" / "bench_search_tmp"), help="scratch directory (on disk)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--write", action="store_true", help="update the search section of BENCHMARKS.md")
    ap.add_argument("--write-auto", action="store_true",
                    help="update only the auto-backend subsection of the search section of BENCHMARKS.md")
    ap.add_argument("--exact-precision", action="store_true",
                    help="also measure exact search with fp32 and bf16 first passes against the matmul floors")
    ap.add_argument("--exact-only", action="store_true", help="measure only that (no backend is built)")
    ap.add_argument("--write-exact", action="store_true",
                    help="update only the exact-precision subsection of the search section of BENCHMARKS.md")
    ap.add_argument("--render", default=None, metavar="JSON", help="only re-render a saved run's section")
    args = ap.parse_args(argv)
    faulthandler.enable()  # a crash inside FAISS or Milvus leaves a traceback in the log

    if args.render:
        run = json.loads(Path(args.render).read_text())
    else:
        import faiss

        t_start = time.perf_counter()
        threads = torch.get_num_threads()
        faiss.omp_set_num_threads(threads)  # one thread count for every backend
        tmp = Path(args.tmp).resolve()
        tmp.mkdir(parents=True, exist_ok=True)
        data = Descriptors(args.dim, **DATA)
        run = {"date": datetime.date.today().isoformat(), "machine": machine(), "args": vars(args),
               "command": " ".join([".venv/bin/python", "benchmarks/search.py", *map(shlex.quote, sys.argv[1:])]
                                   if argv is None else ["benchmarks/search.py", *argv]),
               "data": dict(DATA, participation_ratio=data.participation_ratio), "tmp": str(tmp),
               "code": code_version(), "sizes": []}
        _RUN.update(run)
        _RUN["sizes"] = run["sizes"]  # the same list: finished sizes appear as they are appended
        print(f"machine: {run['machine']}", flush=True)
        for n in (int(s) for s in args.sizes.split(",")):
            run["sizes"].append(bench_size(n, args, data, tmp))
        run["total_s"] = time.perf_counter() - t_start
        shutil.rmtree(tmp, ignore_errors=True)
    if args.exact_only:
        text = render_exact(run)
        print(text)
        if args.json and not args.render:
            Path(args.json).write_text(json.dumps(run, indent=1, default=float))
        if args.write_exact:
            write_exact_section(text, REPO / "BENCHMARKS.md")
        return 0
    run["targets"] = targets(run)
    run["notes"] = notes(run)
    text = render(run)
    print(text)
    if args.json and not args.render:
        Path(args.json).write_text(json.dumps(run, indent=1, default=float))
    if args.write:
        write_section(text, REPO / "BENCHMARKS.md", BEGIN, END)
    elif args.write_auto:
        write_auto_section(render_auto(run), REPO / "BENCHMARKS.md")
    if args.write_exact and not args.write and any("exact_precision" in r for r in run["sizes"]):
        write_exact_section(render_exact(run), REPO / "BENCHMARKS.md")
    return 0


def notes(run: dict) -> list[str]:
    """Why some backends were not run at every size, with this run's figures."""
    out = []
    for res in run["sizes"]:
        by = {r["name"]: r for r in res["backends"]}
        big = max(r["n"] for r in run["sizes"])
        at_big = {r["name"] for r in next(r for r in run["sizes"] if r["n"] == big)["backends"]}
        if "hnsw" in by and big > res["n"] and "hnsw" not in at_big:
            h = by["hnsw"]
            out.append(f"- HNSW32 was built at N = {res['n']:,} only: its build took {h['build_s']:.0f} s there, and "
                       f"HNSW insertion grows faster than N (each insert searches the graph), so N = {big:,} would "
                       f"take over {big / res['n'] * h['build_s'] / 60:.0f} min on these 2 cores and hold the raw rows "
                       "plus the graph in memory.")
        if "milvus" in by and big > res["n"] and "milvus" not in at_big:
            mv = by["milvus"]
            rate = res["n"] / mv["build_s"]
            scale = big / res["n"]
            out.append(f"- Milvus Lite was run at N = {res['n']:,} only: rows went in at {rate:,.0f} rows/s "
                       f"(build {mv['build_s']:.0f} s), its index was built on close ({mv.get('save_s', 0):.0f} s), "
                       f"and the search before reopening scans raw rows ({mv.get('fresh_search_s', 0):.0f} s for "
                       f"the batch), so N = {big:,} would take at least "
                       f"{scale * (mv['build_s'] + mv.get('save_s', 0) + mv.get('fresh_search_s', 0)) / 60:.0f} min "
                       "(each part at least linear in N).")
    return out


if __name__ == "__main__":
    sys.exit(main())
