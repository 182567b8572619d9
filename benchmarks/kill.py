"""Kill test: ``kill -9`` a process writing a store at random moments, many times.

Each round starts a worker process that does one random write (add a batch of photos, remove
some images, configure whitening / αDBA / the backend, rebuild the index) and kills it with
SIGKILL after a random delay (some rounds let it finish). After every round a reader must open
the store and find it consistent (``verify()``: metadata, descriptors and their checksums,
post-processed rows and theirs, the search index), with no content twice, nothing lost (every
acknowledged add that was not later removed is there; every acknowledged removal holds), and
each live image finding itself first. At the end one more add of every photo must give each
photo exactly once. Counts go into BENCHMARKS.md.

    python benchmarks/kill.py [--rounds 64] [--seed 0] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_line, write_section  # noqa: E402

BEGIN = "<!-- kill:begin -->"
END = "<!-- kill:end -->"

WORKER = r"""
import json, sys
import numpy as np
from imret.index.store import Store, QueryExpansion
from imret.whitening import fit_pca_whitening
store, op, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with Store.open(store, writable=True) as st:
    print("started", flush=True)
    if op == "add":
        r = st.add(arg, commit_every=2, save_every=4, workers=0)
        out = {"added": [p for p in arg if p not in {q for q, _ in r.skipped}]}
    elif op == "remove":
        live = [rec.id for rec in st.list(0, 100000)]
        ids = [i for i in arg if i in set(live)]
        st.remove(ids)
        out = {"removed": [rec.path for rec in st.records(ids)]}
    elif op == "whiten":
        x = np.asarray(st.descriptors())
        st.configure(whitening=fit_pca_whitening(x, dim=min(arg, x.shape[0] - 1)) if arg else None)
        out = {}
    elif op == "dba":
        st.configure(dba=(2, 3.0) if arg else None)
        out = {}
    elif op == "backend":
        st.configure(backend=arg, query_expansion=QueryExpansion("alpha", 2, 3.0))
        out = {}
    elif op == "rebuild":
        st.rebuild()
        out = {}
print("ack " + json.dumps(out), flush=True)
"""

OPS = ("add", "add", "add", "remove", "whiten", "dba", "backend", "rebuild")


def _run(store: Path, op: str, arg, delay: float | None, env) -> tuple[bool, dict | None, str]:
    """Start the worker; kill it ``delay`` s after it opened the store (None: let it finish)."""
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(store), op, json.dumps(arg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    line = proc.stdout.readline()
    if line.strip() != b"started":
        proc.wait()
        raise RuntimeError(f"worker did not start: {line!r} {proc.stderr.read().decode()[-2000:]}")
    killed = False
    started = time.monotonic()
    if delay is not None:
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
    out, err = proc.communicate(timeout=600)
    _run.last_duration = time.monotonic() - started
    ack = None
    for ln in out.decode().splitlines():
        if ln.startswith("ack "):
            ack = json.loads(ln[4:])
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"worker {op} failed: {err.decode()[-3000:]}")
    return killed, ack, err.decode()


def check(store: Path, must_have: set[str], must_not_have: set[str]) -> dict:
    from imret.index.store import QueryExpansion, Store

    with Store.open(store) as st:
        problems = st.verify()
        recs = st.list(0, 1_000_000)
        paths = [r.path for r in recs]
        dup = len(paths) - len(set(paths)) + (len(recs) - len({r.sha256 for r in recs}))
        lost = sorted(must_have - set(paths))
        resurrected = sorted(must_not_have & set(paths))
        wrong_first = 0
        if recs and st.info()["dba"] is None:  # (an αDBA row is its neighbours' mean: not always first)
            ids = np.array([r.id for r in recs])
            _, found = st.search_ids(ids, k=1, query_expansion=QueryExpansion("none"))
            wrong_first = int(np.count_nonzero(found[:, 0] != ids))
    with Store.open(store, writable=True) as st:  # a writer recovers and agrees
        problems += [f"after writer recovery: {p}" for p in st.verify()]
    return {"problems": problems, "duplicated": dup, "lost": lost, "resurrected": resurrected,
            "wrong_first": wrong_first, "live": len(recs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=64)
    ap.add_argument("--photos", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import torch

    from imret import create_model
    from imret.index import faiss_backend  # noqa: F401 - faiss must be installed for the backend ops
    from imret.index.store import Preprocessing, Store
    from imret.synthetic import make_labelled_folder

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="imret-kill-"))
    folder = make_labelled_folder(work / "photos", n_classes=args.photos // 4, per_class=4, size=(96, 72), seed=1)
    photos = sorted(str(p) for p in folder.rglob("*.jpg"))
    torch.manual_seed(0)
    store = work / "store"
    with Store.create(store, create_model("resnet18", "gem", pretrained=False),
                      preprocessing=Preprocessing(image_size=64)) as st:  # a start big enough to whiten
        st.add(photos[: args.photos // 2], workers=0)
    must_have: set[str] = set(photos[: args.photos // 2])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    must_not_have: set[str] = set()
    tally: Counter = Counter()
    killed_by_op: Counter = Counter()
    totals = Counter()
    durations: dict[str, float] = {}
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        op = rng.choice(OPS)
        with Store.open(store) as st:
            live = {r.path: r.id for r in st.list(0, 1_000_000)}
        if op == "add":
            arg = rng.sample(photos, rng.randint(4, 16))
        elif op == "remove":
            if not live:
                op, arg = "add", rng.sample(photos, 6)
            else:
                arg = rng.sample(sorted(live.values()), min(len(live), rng.randint(1, 4)))
        elif op == "whiten":
            arg = rng.choice([0, 16, 32]) if len(live) > 33 else 0
        elif op == "dba":
            arg = rng.choice([0, 1])
        elif op == "backend":
            arg = rng.choice(["exact", "faiss:HNSW16", "ann"])
        else:
            arg = None
        # a random moment of the operation: up to 1.1x how long it took when it last finished
        delay = None if rng.random() < 0.15 else rng.uniform(0.0, 1.1 * durations.get(op, 3.0))
        if op == "remove":  # whatever was asked may have been removed: no longer required
            must_have -= {p for p, i in live.items() if i in set(arg)}
        killed, ack, _ = _run(store, op, arg, delay, env)
        if not killed:
            durations[op] = _run.last_duration
        tally[op] += 1
        if killed:
            killed_by_op[op] += 1
        if ack is not None:
            if op == "add":
                must_have |= set(ack["added"])
                must_not_have -= set(ack["added"])
            elif op == "remove":
                must_not_have |= set(ack["removed"])
        res = check(store, must_have, must_not_have)
        for key in ("duplicated", "wrong_first"):
            totals[key] += res[key]
        totals["lost"] += len(res["lost"])
        totals["resurrected"] += len(res["resurrected"])
        totals["problems"] += len(res["problems"])
        print(f"round {rnd:3d} {op:8s} {'killed' if killed else 'finished':8s} live {res['live']:3d} "
              f"problems {len(res['problems'])} lost {len(res['lost'])} dup {res['duplicated']}",
              file=sys.stderr, flush=True)
        if res["problems"] or res["lost"] or res["duplicated"] or res["resurrected"] or res["wrong_first"]:
            print(json.dumps(res, indent=1), file=sys.stderr)
    # finish: one add of every photo must give each exactly once
    _run(store, "add", photos, None, env)
    with Store.open(store) as st:
        final = st.list(0, 1_000_000)
        final_ok = sorted(r.path for r in final) == photos and st.verify() == []
    minutes = (time.perf_counter() - t0) / 60
    kills = sum(killed_by_op.values())
    ops = ", ".join(f"{op} {tally[op]} ({killed_by_op[op]} killed)" for op in sorted(tally))
    command = "python benchmarks/kill.py " + " ".join(a for a in sys.argv[1:] if a != "--write")
    text = "\n".join([
        BEGIN, "## Kill test: `kill -9` while writing (`benchmarks/kill.py`)", "",
        f"`{command.strip()}` — {dt.date.today().isoformat()}, {machine_line()}; {minutes:.1f} min.", "",
        f"{args.rounds} rounds of one random write each, killed with SIGKILL at a random moment in "
        f"{kills} of them: {ops}. After every round a reader and then a writer open the store and check it.", "",
        "| kills | verify problems | lost acknowledged adds | duplicated | removals undone | live images not found first "
        "| final add: every photo exactly once |", "|---|---|---|---|---|---|---|",
        f"| {kills} | {totals['problems']} | {totals['lost']} | {totals['duplicated']} | {totals['resurrected']} | "
        f"{totals['wrong_first']} | {'yes' if final_ok else 'NO'} |", END])
    print(text)
    if args.write:
        write_section(text + "\n", REPO / "BENCHMARKS.md", BEGIN, END)
    bad = totals["problems"] + totals["lost"] + totals["duplicated"] + totals["resurrected"] + totals["wrong_first"]
    return 0 if bad == 0 and final_ok else 1


if __name__ == "__main__":
    sys.exit(main())
