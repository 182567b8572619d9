"""The milvus backend on a Milvus server process against Milvus Lite and exact search.

Starts the Milvus standalone server of the ``milvus`` package (``pip install
'imret[milvus-server]'``) on free loopback ports with a temporary data directory (cold: the
binaries are unpacked into it first; warm: started again on the same directory), then for
N seeded 512-D descriptors (the mixture of :mod:`search`, default 100k) and 1000 queries
measures, per backend: insert throughput (``add`` in 65536-row chunks, as the store does),
flush, the wait until the server has indexed every row (Milvus Lite: the reload that
``flush`` does), the best of 2 batch searches of all queries at k = 100, the median one-query
latency, and recall@100 against exact search (``tie_aware_recall``). The server and Milvus
Lite use the same spec parameters (HNSW, M 16, efConstruction 200, ef 128: the backend's
defaults); ``--flat`` adds the server with a FLAT index, which must match exact search.

CPU seconds count this process and its children (the server, Milvus Lite's engine), read
from /proc, so they include the engines' work.

    .venv/bin/python benchmarks/milvus_server.py [--n 100000] [--queries 1000] [--k 100] [--flat] [--write]

``--write`` replaces the section between ``<!-- milvus-server:begin -->`` and
``<!-- milvus-server:end -->`` in BENCHMARKS.md (appends it the first time).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, publish  # noqa: E402
from search import DATA, Descriptors, _descendants, code_version, single_query_ms  # noqa: E402

from imret.index import create_backend, tie_aware_recall  # noqa: E402

BEGIN, END = "<!-- milvus-server:begin -->", "<!-- milvus-server:end -->"
ADD_CHUNK = 65536


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for pid in _descendants(str(os.getpid())):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


class Clock:
    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = cpu_seconds() - self.c0


def wait_indexed(b, timeout: float = 1800.0) -> int:
    """Poll the server until its index covers every row; returns the indexed row count."""
    deadline = time.monotonic() + timeout
    while True:
        info = b._client.describe_index(b.config.collection, "vector") or {}
        done, total = int(info.get("indexed_rows", 0)), int(info.get("total_rows", 0))
        if (total and done >= total and not int(info.get("pending_index_rows", 0))) or time.monotonic() > deadline:
            return done
        time.sleep(0.5)


def bench(name: str, spec: str, x: np.ndarray, q: np.ndarray, k: int, gt, args, *, root: Path) -> dict:
    n, dim = x.shape
    ids = np.arange(n, dtype=np.int64)
    print(f"{name}: {spec}", flush=True)
    row: dict = {"name": name, "spec": spec}
    b = create_backend(spec, dim, root=root)
    try:
        with Clock() as add:
            for s in range(0, n, ADD_CHUNK):
                b.add(x[s:s + ADD_CHUNK], ids[s:s + ADD_CHUNK])
        with Clock() as flush:
            if hasattr(b, "flush"):
                b.flush()  # Milvus Lite: also the reload that builds the index
        with Clock() as index:
            if spec.startswith("milvus:http") and b.config.index_type != "FLAT":
                row["indexed_rows"] = wait_indexed(b)
        row.update(add_s=add.wall, add_cpu=add.cpu, rows_per_s=n / add.wall, flush_s=flush.wall,
                   flush_cpu=flush.cpu, index_s=index.wall, index_cpu=index.cpu)
        best = None
        for _ in range(args.repeats):
            with Clock() as c:
                s, i = b.search(q, k)
            if best is None or c.wall < best[0].wall:
                best = (c, s, i)
        c, s, i = best
        row.update(search_s=c.wall, search_cpu=c.cpu, qps=q.shape[0] / c.wall,
                   qps_by_cpu=q.shape[0] * os.cpu_count() / max(c.cpu, 1e-9))
        row["one_query_ms"], row["one_query_n"] = single_query_ms(b, q, k, args.single, args.single_budget)
        if spec.startswith("milvus:http"):  # the same searches with Strong reads: a time tick each
            session = b.config
            b.config = dataclasses.replace(session, consistency="Strong")
            row["one_query_strong_ms"], _ = single_query_ms(b, q, k, 50, args.single_budget)
            b.config = session
        row["recall"] = 1.0 if gt is None else tie_aware_recall(q, x, ids, gt[0], i, k)
        print(f"  add {add.wall:.1f} s ({n / add.wall:,.0f} rows/s), flush {flush.wall:.1f} s, index "
              f"{index.wall:.1f} s, search {c.wall:.2f} s ({row['qps']:,.0f} QPS), 1-query "
              f"{row['one_query_ms']:.2f} ms, recall@{k} {row['recall']:.4f}", flush=True)
        return row, (s, i)
    finally:
        b.close()


def start_server(milvus, data_dir: Path):
    srv = milvus.MilvusServer(milvus.MilvusServerConfig(data_dir=str(data_dir)))
    t0 = time.perf_counter()
    srv.start()
    return srv, time.perf_counter() - t0


def render(run: dict) -> str:
    k, n = run["k"], run["n"]
    lines = [
        BEGIN,
        f"### Milvus server vs Milvus Lite vs exact: `benchmarks/milvus_server.py` ({run['date']})",
        "",
        f"Command: `{run['command']}` (total {run['total_s'] / 60:.1f} min), on {run['code']}.",
        "",
        f"Machine: {run['cpu']}, {run['cores']} logical cores, AMX: {'yes' if run['amx'] else 'no'}, no GPU; "
        f"Milvus server {run['milvus']} (the `milvus` package's standalone binary, embedded etcd and "
        f"RocksMQ, reached at 127.0.0.1), pymilvus {run['pymilvus']}, milvus_lite {run['milvus_lite']}. Shared "
        f"2-core VM: load average {run['loadavg_start'][0]:.1f} at the start, "
        f"{run['loadavg_end'][0]:.1f} at the end. CPU seconds count this process and its children "
        f"(the server, Milvus Lite's engine); *QPS by CPU* = queries × {run['cores']} / CPU seconds, the "
        f"throughput had the run had the cores to itself (the steadier figure on a busy machine). "
        f"1-query ms: median over up to 200 one-query searches, in brackets the server's with "
        f"`consistency=Strong` (50 queries).",
        "",
        f"Data: N = {n:,} × {run['dim']} and {run['queries']} queries from the seeded mixture of "
        f"`benchmarks/search.py`, k = {k}. Server start: {run['start_cold_s']:.1f} s on a fresh data "
        f"directory (unpacking {run['bin_mib']:.0f} MiB of binaries first), {run['start_warm_s']:.1f} s "
        f"again on the same directory; its data directory held {run['data_mib']:.0f} MiB (etcd, RocksMQ, "
        f"segments) after the run.",
        "",
        "| backend | spec | insert s (CPU s) | rows/s | flush s | index wait s (CPU s) | "
        f"search s (CPU s) | QPS | QPS by CPU | × exact by CPU | 1-query ms (Strong) | recall@{k} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    exact = run["rows"][0]
    for r in run["rows"]:
        strong = f" ({r['one_query_strong_ms']:.1f})" if "one_query_strong_ms" in r else ""
        by_cpu = r.get("qps_by_cpu", r["qps"])
        lines.append(
            f"| {r['name']} | `{r['spec_shown']}` | {r['add_s']:.1f} ({r['add_cpu']:.1f}) | {r['rows_per_s']:,.0f} | "
            f"{r['flush_s']:.1f} | {r['index_s']:.1f} ({r['index_cpu']:.1f}) | {r['search_s']:.3f} "
            f"({r['search_cpu']:.1f}) | {r['qps']:,.0f} | {by_cpu:,.0f} | "
            f"{by_cpu / exact.get('qps_by_cpu', exact['qps']):.2f} | {r['one_query_ms']:.2f}{strong} | "
            f"{r['recall']:.4f} |")
    lines += ["", *run.get("notes", []), END]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--flat", action="store_true", help="also the server with a FLAT index")
    ap.add_argument("--no-lite", dest="lite", action="store_false", help="skip Milvus Lite")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--single", type=int, default=200)
    ap.add_argument("--single-budget", type=float, default=10.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--render", default=None, metavar="JSON", help="only re-render a saved run (with --notes)")
    ap.add_argument("--notes", default=None, metavar="FILE", help="markdown lines added under the table")
    args = ap.parse_args(argv)
    if args.render:
        run = json.loads(Path(args.render).read_text())
        if args.notes:
            run["notes"] = Path(args.notes).read_text().strip().splitlines()
        publish(render(run), BEGIN, END, write=args.write)
        return 0

    import milvus
    import milvus_lite
    import pymilvus

    t_start = time.perf_counter()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    run = {"date": datetime.date.today().isoformat(), "n": args.n, "dim": args.dim, "queries": args.queries,
           "k": args.k, "cpu": cpu_name(), "cores": os.cpu_count(), "amx": "amx_tile" in flags,
           "milvus": milvus.__version__, "pymilvus": pymilvus.__version__,
           "milvus_lite": getattr(milvus_lite, "__version__", "?"), "code": code_version(),
           "platform": platform.platform(), "loadavg_start": os.getloadavg(),
           "command": " ".join([".venv/bin/python", "benchmarks/milvus_server.py",
                                *map(shlex.quote, sys.argv[1:] if argv is None else argv)])}
    data = Descriptors(args.dim, **DATA)
    x, _ = data.sample(args.n, stream=0)
    q, _ = data.sample(args.queries, stream=1)

    tmp = Path(tempfile.mkdtemp(prefix="imret-bench-milvus-"))
    srv = None
    try:
        srv, run["start_cold_s"] = start_server(milvus, tmp / "server")
        srv.stop()
        srv, run["start_warm_s"] = start_server(milvus, tmp / "server")
        uri = f"http://127.0.0.1:{srv.listen_port}"
        print(f"server at {uri}: cold start {run['start_cold_s']:.1f} s, warm {run['start_warm_s']:.1f} s", flush=True)
        specs = [("exact", "exact"), ("server HNSW", f"milvus:{uri}?collection=bench_hnsw")]
        if args.flat:
            specs.append(("server FLAT", f"milvus:{uri}?collection=bench_flat&index=FLAT"))
        if args.lite:
            specs.append(("Milvus Lite HNSW", "milvus:./bench.db"))
        rows, gt = [], None
        for name, spec in specs:
            row, res = bench(name, spec, x, q, args.k, gt, args, root=tmp)
            row["spec_shown"] = spec.replace(uri, "http://127.0.0.1:PORT")
            rows.append(row)
            if name == "exact":
                gt = res
        run["rows"] = rows
        run["bin_mib"] = sum(p.stat().st_size for p in (tmp / "server" / "bin").iterdir()
                             if not p.name.endswith(".md5")) / 2**20
        run["data_mib"] = sum(p.stat().st_size for p in (tmp / "server" / "data").rglob("*") if p.is_file()) / 2**20
    finally:
        if srv is not None:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    run["loadavg_end"] = os.getloadavg()
    run["total_s"] = time.perf_counter() - t_start
    publish(render(run), BEGIN, END, write=args.write, json_path=args.json, data=run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
