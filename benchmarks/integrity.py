"""What the store's row checksums cost a search.

Every row file of a store (``descriptors.f32``, ``vectors.<g>.f32``) has a CRC32 per row, recorded
when the row was written. A process checks each row once before it searches with it: exact
search checks the whole matrix when it first maps it (and new rows as they come), approximate
backends check the k rows they re-score on every search. This script measures that against the
same searches with the check switched off, each condition in a fresh process, on the same store,
with the files in the page cache (what a server or a warm CLI sees):

- exact search: open + first query (pays the full check) and the median of the next queries;
- HNSW (``faiss:HNSW32``) + exact re-scoring: median per-query latency (pays k row checks each).

Stores are synthetic: clustered unit rows written straight into a store made for a
``mobilenetv2_100`` GeM model (1280-D), without extracting images.

    python benchmarks/integrity.py [--sizes 100000,1000000] [--hnsw 100000] [--work DIR] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_line, publish  # noqa: E402

DIM = 1280
BEGIN = "<!-- integrity:begin -->"
END = "<!-- integrity:end -->"


def _rows(n: int, seed: int, start: int) -> np.ndarray:
    rng = np.random.default_rng(seed + start)
    centres = np.random.default_rng(seed).standard_normal((256, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 256, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _inject(store, x: np.ndarray) -> None:
    """Append rows the way Store.add commits them (rows fsynced, then the metadata), without images."""
    n = store.n_rows()
    store._write_rows("descriptors.f32", store.dim, n, x)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    recs = [(n + i, f"synthetic/{n + i}.jpg", 0, 0, 0, hashlib.sha256(str(n + i).encode()).hexdigest(), now,
             zlib.crc32(x[i])) for i in range(x.shape[0])]
    with store._lock, store._db:
        store._db.executemany("INSERT INTO images(id, path, size, width, height, sha256, added, removed, crc32) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)", recs)


def build(path: Path, n: int, backend: str) -> None:
    import torch

    from imret import create_model
    from imret.index.store import Store

    if (path / "store.json").exists():
        return
    torch.manual_seed(0)
    model = create_model("mobilenetv2_100", "gem", pretrained=False)
    t0 = time.perf_counter()
    with Store.create(path, model, backend="exact") as st:
        for start in range(0, n, 100_000):
            _inject(st, _rows(min(100_000, n - start), 0, start))
        if backend != "exact":
            st.configure(backend=backend)
    print(f"built {path} ({n:,} rows, {backend}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def measure(path: Path, check: bool, queries: int) -> dict:
    """One condition, in this (fresh) process."""
    from imret.index.store import Store

    if not check:
        Store._check_rows = lambda self, name, m, ids: None  # the store as it was before checksums
    for f in path.iterdir():  # page cache warm for both conditions
        if f.is_file() and f.suffix in (".f32", ".crc32"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    q = _rows(queries + 1, 1, 10**9)
    t0 = time.perf_counter()
    st = Store.open(path)
    st.search_vectors(q[:1], k=100)
    first = time.perf_counter() - t0
    lat = []
    for i in range(1, queries + 1):
        t = time.perf_counter()
        st.search_vectors(q[i:i + 1], k=100)
        lat.append(time.perf_counter() - t)
    st.close()
    return {"first_s": first, "p50_ms": 1000 * statistics.median(lat), "p90_ms": 1000 * float(np.percentile(lat, 90))}


def _child(path: Path, check: bool, queries: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--check", str(int(check)),
                          "--queries", str(queries)], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(rows: list[dict], machine: str, command: str) -> str:
    lines = [BEGIN, "## Row checksums: cost on search", "",
             f"`{command}` — {dt.date.today().isoformat()}, {machine}.", "",
             "Every row a search uses is checked against the CRC32 recorded when it was written (once per "
             "process for exact search, the k re-scored rows per query for approximate backends), so a damaged or "
             "edited row file fails with an error naming it instead of giving wrong results. Same store, each "
             "condition in a fresh process, files in the page cache, k = 100, single-query latency.", "",
             "| store | backend | open + first query, checked | unchecked | ratio | median query, checked | "
             "unchecked | ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, u = r["checked"], r["unchecked"]
        lines.append(f"| {r['n']:,} × {DIM} | {r['backend']} | {c['first_s']:.2f} s | {u['first_s']:.2f} s | "
                     f"{c['first_s'] / u['first_s']:.2f}x | {c['p50_ms']:.2f} ms | {u['p50_ms']:.2f} ms | "
                     f"{c['p50_ms'] / u['p50_ms']:.2f}x |")
    lines += ["", "The one-off check at the first exact search reads every row once more (zlib CRC32, about "
              "3.5 GB/s on this CPU) plus the expected checksums from SQLite; after that, exact queries pay nothing. "
              "An approximate backend checks the re-scored rows it has not checked before in this process (at "
              "first nearly all k of them; fewer as a long-running server has seen more rows).", END]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="exact-search store sizes")
    ap.add_argument("--hnsw", type=int, default=100_000, help="HNSW store size (0: none)")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--work", default=str(REPO / "runs" / "bench-integrity"))
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--check", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), bool(args.check), args.queries)))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    jobs = [(int(s), "exact") for s in args.sizes.split(",") if s]
    if args.hnsw:
        jobs.append((args.hnsw, "faiss:HNSW32?efSearch=128"))
    rows = []
    for n, backend in jobs:
        path = work / f"{'exact' if backend == 'exact' else 'hnsw'}-{n}"
        build(path, n, backend)
        res = {"n": n, "backend": backend}
        for check in (False, True, False, True):  # interleaved, best of two each
            r = _child(path, check, args.queries)
            key = "checked" if check else "unchecked"
            if key not in res or r["p50_ms"] < res[key]["p50_ms"]:
                res[key] = {**r, "first_s": min(r["first_s"], res.get(key, r)["first_s"])}
        print(json.dumps(res), file=sys.stderr, flush=True)
        rows.append(res)
    command = "python benchmarks/integrity.py " + " ".join(a for a in sys.argv[1:] if a != "--write")
    text = render(rows, machine_line(), command.strip())
    publish(text, BEGIN, END, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
