"""HTTP server under load: `imret serve` on loopback, a closed-loop load test bounded in time.

The store: the rParis6k-mini database photos (``imlist`` of the gnd pickle) indexed with the
shared ImageNet MobileNetV2-GeM at ``--image-size`` px, less ``--hold-back`` of them, which
with the 12 query photos are kept out to be added while the load runs. ``--synthetic N`` pads
the store with N generated images (small, so indexing is fast) to show the server on a larger
index; how long generating and indexing them took is reported. The store is built once under
``--work`` (or at ``--store DIR``) and reused by later runs; every phase runs on a fresh copy.

Each phase starts ``python -m imret.cli serve COPY --port P --token-file F`` as a real
subprocess on 127.0.0.1, waits for ``/api/health``, warms it up with a few requests, then runs
``C`` virtual users (asyncio + one ``httpx.AsyncClient`` with C connections) for the phase's
duration. Each user loops without pause, choosing an action by ``--mix`` weights:

    search   POST /api/search, a random real photo (all 250), k=20, with a crop box in a share
             ``--bbox-share`` of them (the official box for a query photo, else a random one)
    similar  GET /api/images/{id}/similar?k=20 for a random initially indexed image
    list     GET /api/images?offset=..&limit=50, then 4 thumbnails from the page (browsing)
    add      POST /api/images (with the token): a held-back photo, then generated ones
    remove   DELETE /api/images/{id} (with the token) of an image added in this phase

After the load come the checks, through the API and (once the server has stopped) on the store
opened directly: ``verify()`` finds no problem; the live images are exactly the initial ones
plus those added less those removed; each image added and kept comes first when searched with
its own photo (score > 0.99); a removed image is never returned by a request that started after
its removal finished, is 404 by id, and is not found by its own photo.

Phases: ``1 client`` (sequential, the baseline for the ratios), ``C clients`` (the load), and
``C clients, max_batch 1`` (the server with micro-batching off), each on a new server; the
request rates, latency percentiles, the batch sizes the server reports at ``/api/metrics``
(the difference over the load window), CPU used by the server and by this load generator, and
every non-2xx answer (printed with its request and body) are reported.

    .venv/bin/python benchmarks/serve.py [--clients 64] [--duration 60] [--baseline-duration 20]
        [--unbatched-duration 30] [--mix search=0.68,similar=0.15,list=0.1,add=0.05,remove=0.02]
        [--image-size 512] [--synthetic 100000] [--store DIR] [--json out.json] [--write]
    .venv/bin/python benchmarks/serve.py --render out.json --write   # re-render a saved run

``--write`` replaces the section between ``<!-- serve:begin -->`` and ``<!-- serve:end -->`` in
BENCHMARKS.md (appends it the first time). The exit status is 1 when any request failed or a
check did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import random
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, machine_line, write_section  # noqa: E402

BEGIN, END = "<!-- serve:begin -->", "<!-- serve:end -->"


def markers(section: str) -> tuple[str, str]:
    """The BENCHMARKS.md markers of a section (``serve`` by default; another name for another store)."""
    return f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
KINDS = ("search", "similar", "list", "thumbnail", "add", "remove")
ACTIONS = ("search", "similar", "list", "add", "remove")
DEFAULT_MIX = "search=0.68,similar=0.15,list=0.1,add=0.05,remove=0.02"
BACKBONE = "mobilenetv2_100.coral"
WEIGHTS = SHARED / "weights" / "mobilenetv2_100.coral_in1k.safetensors"


# -- photos and stores ----------------------------------------------------------------------------

@dataclass
class Photo:
    """An image the load generator uploads."""

    name: str
    data: bytes
    width: int
    height: int
    box: tuple[float, float, float, float] | None = None  # the official query box, if any
    path: str | None = None  # where it lies on disk (None for a generated image kept in memory)


def _photo(path: Path, box=None) -> Photo:
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    return Photo(path.name, data, w, h, None if box is None else tuple(float(v) for v in box), str(path))


def load_photos(data_dir: Path, hold_back: int, seed: int) -> tuple[list[Photo], list[str], list[str]]:
    """All photos of a revisitop folder (database then queries), the database names to index
    and the database names held back (``hold_back`` of them, chosen with ``seed``)."""
    from imret.evaluation import load_revisitop

    pkls = sorted(data_dir.glob("gnd_*.pkl"))
    if not pkls or not (data_dir / "jpg").is_dir():
        raise FileNotFoundError(f"{data_dir} has no gnd_*.pkl and jpg/ (the rParis6k-mini layout); pass --data DIR")
    gt = load_revisitop(pkls[0])
    jpg = data_dir / "jpg"
    photos = [_photo(p) for p in gt.db_paths(jpg)]
    photos += [_photo(p, box) for p, box in zip(gt.query_paths(jpg), gt.bbx)]
    if not 0 <= hold_back < len(gt.imlist):
        raise ValueError(f"--hold-back must be in 0..{len(gt.imlist) - 1}, got {hold_back}")
    held = sorted(random.Random(seed).sample(list(gt.imlist), hold_back))
    indexed = [n for n in gt.imlist if n not in set(held)]
    return photos, indexed, held


def generated_jpegs(n: int, size: tuple[int, int], seed: int, prefix: str) -> list[Photo]:
    """``n`` distinct generated photos (each a view of its own random object), JPEG in memory."""
    from imret.synthetic import make_object, random_view

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = random_view(make_object(rng, size=max(size) + 64), rng, size)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=88)
        out.append(Photo(f"{prefix}{i:05d}.jpg", buf.getvalue(), size[0], size[1]))
    return out


def _write_synthetic(job: tuple[str, int, int, int, int, int]) -> int:
    """Worker: write images [start, stop) of the padding set (deterministic per index)."""
    from imret.synthetic import make_object, random_view

    folder, start, stop, w, h, seed = job
    for i in range(start, stop):
        p = Path(folder) / f"{i // 1000:04d}" / f"syn_{i:07d}.jpg"
        if p.is_file():
            continue
        rng = np.random.default_rng([seed, i])
        img = random_view(make_object(rng, size=max(w, h) + 32), rng, (w, h))
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        img.save(tmp, format="JPEG", quality=85)
        os.replace(tmp, p)
    return stop - start


def synthetic_padding(folder: Path, n: int, size: tuple[int, int], seed: int) -> tuple[list[str], float]:
    """Paths of ``n`` generated images under ``folder`` (made now where missing, on every core) and
    the seconds spent making them."""
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    chunk = 1000
    jobs = [(str(folder), s, min(n, s + chunk), size[0], size[1], seed) for s in range(0, n, chunk)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        done = 0
        for k in pool.map(_write_synthetic, jobs):
            done += k
            if done % 10000 < chunk:
                print(f"  generated {done}/{n}", file=sys.stderr, flush=True)
    paths = [str(folder / f"{i // 1000:04d}" / f"syn_{i:07d}.jpg") for i in range(n)]
    return paths, time.perf_counter() - t0


def _side(store: Path) -> Path:
    """The file beside a store built here that says how it was built."""
    return store.parent / (store.name + ".bench.json")


def build_store(path: Path, args, photos: list[Photo], indexed: list[str], unpadded: Path | None) -> dict[str, Any]:
    """Create the base store: the indexed photos (or a copy of ``unpadded``, the same store
    without padding, when it exists), then the synthetic padding. Returns timings."""
    from imret.index.store import Preprocessing, Store

    info: dict[str, Any] = {}
    tmp = path.with_name(path.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    if unpadded is not None and (unpadded / "store.json").is_file():
        print(f"padding a copy of {unpadded}", file=sys.stderr, flush=True)
        shutil.copytree(unpadded, tmp)
        if _side(unpadded).is_file():
            info.update(json.loads(_side(unpadded).read_text()))
        st = Store.open(tmp, writable=True, device=args.device)
    else:
        import torch

        from imret import create_model
        from imret.weights import load_weights

        torch.manual_seed(0)
        model = create_model(BACKBONE, "gem", pretrained=False)
        if not Path(args.weights).is_file():
            raise FileNotFoundError(f"no weights at {args.weights}; pass --weights FILE")
        load_weights(model, args.weights)
        by_name = {Path(p.path).stem: p.path for p in photos}
        t0 = time.perf_counter()
        st = Store.create(tmp, model, model_source=f"{BACKBONE} + {Path(args.weights).name}",
                          preprocessing=Preprocessing(image_size=args.image_size), backend=args.backend,
                          device=args.device)
        rep = st.add([by_name[n] for n in indexed], workers=2)
        if rep.skipped:
            st.close()
            raise RuntimeError(f"photos could not be indexed: {rep.skipped[:5]}")
        info["photos_s"] = time.perf_counter() - t0
        info["photos"] = len(rep.added)
        print(f"indexed {len(rep.added)} photos at {args.image_size} px in {info['photos_s']:.1f} s",
              file=sys.stderr, flush=True)
    with st:
        if args.synthetic:
            w, h = args.synthetic_size
            folder = Path(args.work) / f"synthetic-{w}x{h}"
            paths, gen_s = synthetic_padding(folder, args.synthetic, (w, h), seed=args.seed)
            t1 = time.perf_counter()
            rep = st.add(paths, commit_every=4096, batch_size=64 if args.device == "cpu" else 256, workers=2,
                         progress=True)
            info.update(synthetic=len(rep.added), synthetic_size=[w, h], synthetic_generate_s=gen_s,
                        synthetic_index_s=time.perf_counter() - t1)
            print(f"padded with {len(rep.added)} generated {w}x{h} images: generated in {gen_s:.1f} s, indexed in "
                  f"{info['synthetic_index_s']:.1f} s", file=sys.stderr, flush=True)
    os.replace(tmp, path)
    _side(path).write_text(json.dumps(info, indent=1))
    return info


def store_facts(path: Path) -> dict[str, Any]:
    """Count, live ids, content hashes, backend and dimension of a store (opened read-only)."""
    from imret.index.store import Store

    with Store.open(path) as st:
        ids, shas = [], set()
        off = 0
        while True:
            page = st.list(off, 10000)
            if not page:
                break
            ids += [r.id for r in page]
            shas.update(r.sha256 for r in page)
            off += len(page)
        info = st.info()
        return {"images": len(st), "ids": ids, "sha256": shas, "backend": st.backend_spec, "dim": st.dim,
                "image_size": st.preprocessing.image_size, "info": info}


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# -- the server process -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``imret serve`` as a subprocess; stopped with SIGINT (then SIGTERM, then SIGKILL)."""

    def __init__(self, store: Path, token_file: Path, log: Path, *, max_batch: int, threads: int | None,
                 device: str, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "imret.cli", "serve", str(store), "--host", "127.0.0.1",
                    "--port", str(self.port), "--token-file", str(token_file), "--max-batch", str(max_batch),
                    "--device", device, *extra]
        if threads:
            self.cmd += ["--threads", str(threads)]
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.stop_s: float | None = None
        self.returncode: int | None = None

    def start(self, timeout: float = 300.0) -> float:
        import httpx

        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._logf, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} before answering:\n"
                                   f"{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/api/health", timeout=2.0)
                if r.status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"the server did not answer /api/health within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError, AttributeError):
            return None

    def stop(self) -> None:
        if self.proc is None or self.returncode is not None:
            return
        t0 = time.perf_counter()
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                print(f"server {self.proc.pid} did not stop within {wait} s of {sig.name}", file=sys.stderr)
        self.returncode = self.proc.wait()
        self.stop_s = time.perf_counter() - t0
        self._logf.close()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""


# -- the load ------------------------------------------------------------------------------------------

@dataclass
class LoadState:
    """What the virtual users share (one event loop: no locks needed)."""

    photos: list[Photo]
    initial_ids: list[int]
    add_pool: list[Photo]
    token: str
    k: int
    bbox_share: float
    mix: dict[str, float]
    recs: list[tuple[str, float, float, int]] = field(default_factory=list)  # kind, start, end, status
    errors: list[dict[str, Any]] = field(default_factory=list)
    results: list[tuple[float, np.ndarray]] = field(default_factory=list)  # start, ids returned
    added: dict[int, Photo] = field(default_factory=dict)
    removing: set[int] = field(default_factory=set)
    removed: dict[int, float] = field(default_factory=dict)  # id -> when its DELETE answered
    anomalies: list[str] = field(default_factory=list)
    fallbacks: dict[str, int] = field(default_factory=dict)
    record: bool = True
    during: str = "load"


def _random_box(p: Photo, rng: random.Random) -> tuple[float, float, float, float]:
    fw, fh = rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9)
    x1, y1 = rng.uniform(0, 1 - fw) * p.width, rng.uniform(0, 1 - fh) * p.height
    return x1, y1, x1 + fw * p.width, y1 + fh * p.height


async def _call(http, st: LoadState, kind: str, method: str, url: str, what: str, **kw):
    import httpx

    t0 = time.perf_counter()
    try:
        r = await http.request(method, url, **kw)
        status, body = r.status_code, r.content
    except httpx.HTTPError as e:
        r, status, body = None, 0, f"{type(e).__name__}: {e or 'no detail'} (no HTTP answer)".encode()
    t1 = time.perf_counter()
    if st.record:
        st.recs.append((kind, t0, t1, status))
    if not 200 <= status < 300:
        st.errors.append({"kind": kind, "request": f"{method} {url} {what}".rstrip(), "status": status,
                          "body": body[:1000].decode("utf-8", "replace"), "at_s": t0, "during": st.during})
        return None, t0, t1
    return r, t0, t1


async def op_search(http, st: LoadState, rng: random.Random, photo: Photo | None = None, k: int | None = None,
                    box: bool | None = None):
    p = photo or rng.choice(st.photos)
    data = {"k": str(k or st.k)}
    if box if box is not None else rng.random() < st.bbox_share:
        b = p.box or _random_box(p, rng)
        data["bbox"] = ",".join(f"{v:.1f}" for v in b)
    r, t0, _ = await _call(http, st, "search", "POST", "/api/search",
                           f"image={p.name} ({len(p.data)} bytes) {' '.join(f'{a}={v}' for a, v in data.items())}",
                           files={"image": (p.name, p.data, "image/jpeg")}, data=data)
    if r is not None:
        res = r.json()["results"]
        st.results.append((t0, np.array([h["id"] for h in res], dtype=np.int64)))
        return res
    return None


async def op_similar(http, st: LoadState, rng: random.Random):
    i = rng.choice(st.initial_ids)
    r, t0, _ = await _call(http, st, "similar", "GET", f"/api/images/{i}/similar?k={st.k}", "")
    if r is not None:
        st.results.append((t0, np.array([h["id"] for h in r.json()["results"]], dtype=np.int64)))


async def op_list(http, st: LoadState, rng: random.Random, total: list[int]):
    off = rng.randrange(max(1, total[0] - 50))
    r, t0, _ = await _call(http, st, "list", "GET", f"/api/images?offset={off}&limit=50", "")
    if r is None:
        return
    page = r.json()
    total[0] = page["total"]
    st.results.append((t0, np.array([it["id"] for it in page["items"]], dtype=np.int64)))
    initial = set(st.initial_ids)
    ids = [it["id"] for it in page["items"] if it["id"] in initial] or st.initial_ids
    for i in rng.sample(ids, min(4, len(ids))):  # thumbnails only of images nobody removes
        await _call(http, st, "thumbnail", "GET", f"/api/images/{i}/thumbnail?size=256", "")


async def op_add(http, st: LoadState, rng: random.Random) -> bool:
    if not st.add_pool:
        return False
    p = st.add_pool.pop()
    r, _, _ = await _call(http, st, "add", "POST", "/api/images", f"images={p.name} ({len(p.data)} bytes)",
                          files=[("images", (p.name, p.data, "image/jpeg"))],
                          headers={"Authorization": f"Bearer {st.token}"})
    if r is not None:
        rep = r.json()
        if r.status_code != 201:
            st.anomalies.append(f"POST /api/images {p.name}: status {r.status_code}, expected 201")
        if len(rep.get("added", [])) != 1 or rep.get("duplicates") or rep.get("skipped"):
            st.anomalies.append(f"POST /api/images {p.name}: expected one image added, got {json.dumps(rep)}")
        for a in rep.get("added", []):
            st.added[int(a["id"])] = p
    return True


async def op_remove(http, st: LoadState, rng: random.Random) -> bool:
    cand = [i for i in st.added if i not in st.removing]
    if not cand:
        return False
    i = rng.choice(cand)
    st.removing.add(i)
    r, _, t1 = await _call(http, st, "remove", "DELETE", f"/api/images/{i}", "",
                           headers={"Authorization": f"Bearer {st.token}"})
    if r is not None:
        if r.json() != {"removed": i}:
            st.anomalies.append(f"DELETE /api/images/{i}: body {r.text[:200]}, expected {{\"removed\": {i}}}")
        st.removed[i] = t1
    return True


async def user(http, st: LoadState, rng: random.Random, until: float, total: list[int]) -> None:
    kinds, weights = list(st.mix), list(st.mix.values())
    while time.perf_counter() < until:
        kind = rng.choices(kinds, weights)[0]
        if kind == "add" and not await op_add(http, st, rng):
            st.fallbacks["add (pool used up): searched instead"] = st.fallbacks.get(
                "add (pool used up): searched instead", 0) + 1
            kind = "search"
        if kind == "remove" and not await op_remove(http, st, rng):
            st.fallbacks["remove (nothing added yet): searched instead"] = st.fallbacks.get(
                "remove (nothing added yet): searched instead", 0) + 1
            kind = "search"
        if kind == "search":
            await op_search(http, st, rng)
        elif kind == "similar":
            await op_similar(http, st, rng)
        elif kind == "list":
            await op_list(http, st, rng, total)


def _client(url: str, connections: int, timeout: float):
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout),
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def run_load(url: str, st: LoadState, clients: int, duration: float, seed: int, timeout: float) -> dict:
    async with _client(url, clients, timeout) as http:
        t0 = time.perf_counter()
        total = [len(st.initial_ids)]
        until = t0 + duration
        await asyncio.gather(*(user(http, st, random.Random(seed * 7919 + u), until, total) for u in range(clients)))
        wall = time.perf_counter() - t0
    return {"t0": t0, "wall_s": wall}


async def warm_up(url: str, st: LoadState, rng: random.Random) -> None:
    """A few unrecorded requests: model, first batch, thumbnails, listing."""
    st.record, st.during = False, "warm-up"
    async with _client(url, 2, 120.0) as http:
        for _ in range(3):
            await op_search(http, st, rng)
        await op_similar(http, st, rng)
        await op_list(http, st, rng, [len(st.initial_ids)])
    st.results.clear()
    st.record, st.during = True, "load"


async def get_json(url: str, path: str) -> dict:
    async with _client(url, 1, 60.0) as http:
        r = await http.get(path)
        r.raise_for_status()
        return r.json()


# -- checks after the load -----------------------------------------------------------------------------

async def check_api(url: str, st: LoadState, expected: int, timeout: float) -> dict[str, Any]:
    """Counts, every kept added image found first by its own photo, removed ones gone."""
    out: dict[str, Any] = {"problems": []}
    probs = out["problems"]
    st.record, st.during = False, "check"
    n_err = len(st.errors)
    async with _client(url, 4, timeout) as http:
        h = (await http.get("/api/health")).json()
        lst = (await http.get("/api/images?offset=0&limit=1")).json()
        out["health_images"], out["list_total"] = h["images"], lst["total"]
        if h["images"] != expected or lst["total"] != expected:
            probs.append(f"API: /api/health says {h['images']} images, /api/images total {lst['total']}; "
                         f"expected {expected} (initial {len(st.initial_ids)} + added {len(st.added)} - removed "
                         f"{len(st.removed)})")
        sem = asyncio.Semaphore(4)
        kept = [i for i in st.added if i not in st.removed]
        found, scores = 0, []

        async def own(i: int) -> None:
            nonlocal found
            async with sem:
                res = await op_search(http, st, random.Random(i), photo=st.added[i], k=5, box=False)
            if res is None:
                probs.append(f"API: search with the photo of added image {i} ({st.added[i].name}) failed")
            elif res and res[0]["id"] == i and res[0]["score"] > 0.99:
                found += 1
                scores.append(res[0]["score"])
            else:
                probs.append(f"API: added image {i} ({st.added[i].name}) is not first for its own photo: "
                             f"{[(x['id'], x['score']) for x in res[:3]]}")

        async def gone(i: int) -> None:
            async with sem:
                for path in (f"/api/images/{i}", f"/api/images/{i}/similar?k=5", f"/api/images/{i}/thumbnail"):
                    r = await http.get(path)
                    if r.status_code != 404:
                        probs.append(f"API: GET {path} of removed image {i}: {r.status_code}, expected 404")
                res = await op_search(http, st, random.Random(i), photo=st.added[i], k=20, box=False)
            if res is not None and any(x["id"] == i for x in res):
                probs.append(f"API: removed image {i} ({st.added[i].name}) is returned for its own photo")

        await asyncio.gather(*(own(i) for i in kept), *(gone(i) for i in st.removed))
    st.record, st.during = True, "load"
    # requests of the checks that failed are problems of the checks, not of the load
    for e in st.errors[n_err:]:
        probs.append(f"API check request failed: {e['request']} -> {e['status']} {e['body'][:300]}")
    del st.errors[n_err:]
    out.update(kept=len(kept), found_first=found, min_score=min(scores) if scores else None)
    return out


def check_returned_after_removal(st: LoadState) -> dict[str, Any]:
    """A removed id in the answer of a request that started after its removal was answered."""
    bad = []
    for t0, ids in st.results:
        for i in ids:
            t = st.removed.get(int(i))
            if t is not None and t0 > t:
                bad.append(f"image {int(i)} returned by a request started {t0 - t:.3f} s after its removal")
    return {"answers_checked": len(st.results), "problems": bad}


def check_store(path: Path, st: LoadState, expected: int, tmp: Path, device: str) -> dict[str, Any]:
    """The store opened directly after the server stopped."""
    from imret.index.store import Store

    probs: list[str] = []
    out: dict[str, Any] = {"problems": probs}
    with Store.open(path, device=device) as s:
        t0 = time.perf_counter()
        out["verify"] = s.verify()
        out["verify_s"] = time.perf_counter() - t0
        probs += [f"store: verify(): {p}" for p in out["verify"]]
        out["images"] = len(s)
        live, off = set(), 0
        while page := s.list(off, 10000):
            live.update(r.id for r in page)
            off += len(page)
        kept = {i for i in st.added if i not in st.removed}
        want = set(st.initial_ids) | kept
        if len(s) != expected or live != want:
            probs.append(f"store: {len(s)} images, {len(live)} listed; expected {expected}; "
                         f"missing {sorted(want - live)[:10]}, unexpected {sorted(live - want)[:10]}")
        ids = sorted(st.added)
        files = []
        for i in ids:
            p = st.added[i]
            f = tmp / f"{i}_{p.name}"
            f.write_bytes(p.data)
            files.append(str(f))
        firsts = []
        if files:
            for i, hits in zip(ids, s.search(files, k=5)):
                if i in st.removed:
                    if any(h.id == i for h in hits):
                        probs.append(f"store: removed image {i} is returned for its own photo")
                elif not hits or hits[0].id != i or hits[0].score <= 0.99:
                    probs.append(f"store: added image {i} not first for its own photo: "
                                 f"{[(h.id, round(h.score, 4)) for h in hits[:3]]}")
                else:
                    firsts.append(hits[0].score)
        out.update(found_first=len(firsts), kept=len(kept), min_score=min(firsts) if firsts else None)
    return out


# -- one phase ----------------------------------------------------------------------------------------------

def _percentiles(x: list[float]) -> dict[str, float | None]:
    if not x:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    a = np.asarray(x) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99))}


def _batch_diff(before: dict, after: dict) -> dict[str, Any]:
    b0, b1 = before.get("batches", {}), after.get("batches", {})
    s0 = {int(k): v for k, v in (b0.get("sizes") or {}).items()}
    s1 = {int(k): v for k, v in (b1.get("sizes") or {}).items()}
    sizes = {k: s1.get(k, 0) - s0.get(k, 0) for k in s1 if s1.get(k, 0) - s0.get(k, 0) > 0}
    n = sum(sizes.values())
    items = sum(k * v for k, v in sizes.items())
    return {"batches": n, "items": items, "mean_size": items / n if n else None,
            "max_size": max(sizes) if sizes else None, "sizes": {str(k): v for k, v in sorted(sizes.items())},
            "busy_s": (b1.get("busy_s") or 0) - (b0.get("busy_s") or 0),
            "server_mean_size": b1.get("mean_size"), "server_max_size": b1.get("max_size")}


def run_phase(name: str, base: Path, facts: dict, photos: list[Photo], held: list[Photo], generated: list[Photo],
              args, *, clients: int, duration: float, max_batch: int, seed: int) -> dict[str, Any]:
    print(f"== phase '{name}': {clients} client(s), {duration:g} s, max_batch {max_batch}", file=sys.stderr, flush=True)
    phase_dir = Path(args.work) / "phases" / name.replace(" ", "_").replace(",", "")
    if phase_dir.exists():
        shutil.rmtree(phase_dir)
    phase_dir.mkdir(parents=True)
    store = phase_dir / "store"
    t0 = time.perf_counter()
    shutil.copytree(base, store)
    copy_s = time.perf_counter() - t0
    token = secrets.token_urlsafe(24)
    token_file = phase_dir / "token"
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    held = list(held)
    random.Random(seed).shuffle(held)
    pool = list(reversed(generated)) + held  # popped from the end: the held-back photos first
    st = LoadState(photos=photos, initial_ids=list(facts["ids"]), add_pool=pool, token=token, k=args.k,
                   bbox_share=args.bbox_share, mix=args.mix)
    out: dict[str, Any] = {"name": name, "clients": clients, "duration_s": duration, "max_batch": max_batch,
                           "copy_s": copy_s}
    server = Server(store, token_file, phase_dir / "server.log", max_batch=max_batch, threads=args.server_threads,
                    device=args.device, extra=args.server_arg)
    out["server_command"] = " ".join(shlex.quote(c) for c in server.cmd)
    try:
        out["startup_s"] = server.start()
        asyncio.run(warm_up(server.url, st, random.Random(seed)))
        m0 = asyncio.run(get_json(server.url, "/api/metrics"))
        cpu0_server, cpu0_self = server.cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF)
        load = asyncio.run(run_load(server.url, st, clients, duration, seed, args.timeout))
        cpu1_server, cpu1_self = server.cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF)
        m1 = asyncio.run(get_json(server.url, "/api/metrics"))
        wall = load["wall_s"]
        out["wall_s"] = wall
        out["cpu_server_s"] = None if cpu0_server is None or cpu1_server is None else cpu1_server - cpu0_server
        out["cpu_client_s"] = (cpu1_self.ru_utime + cpu1_self.ru_stime) - (cpu0_self.ru_utime + cpu0_self.ru_stime)
        out["batching"] = _batch_diff(m0, m1)
        out["server_routes"] = m1.get("requests")
        kinds = {}
        for kind in KINDS:
            lat = [t1 - ts for k, ts, t1, s in st.recs if k == kind and 200 <= s < 300]
            n = sum(1 for k, *_ in st.recs if k == kind)
            if n:
                kinds[kind] = {"requests": n, "ok": len(lat), "rps": n / wall, **_percentiles(lat)}
        out["kinds"] = kinds
        out["requests"] = len(st.recs)
        out["rps"] = len(st.recs) / wall
        out["queries_rps"] = sum(kinds.get(k, {}).get("requests", 0) for k in ("search", "similar")) / wall
        out["errors"] = [dict(e, at_s=round(e["at_s"] - load["t0"], 3)) for e in st.errors]
        out["fallbacks"] = dict(st.fallbacks)
        out["added"], out["removed"] = len(st.added), len(st.removed)
        expected = len(st.initial_ids) + len(st.added) - len(st.removed)
        out["expected_images"] = expected
        checks = {"anomalies": list(st.anomalies)}
        checks["during_load"] = check_returned_after_removal(st)
        if not args.no_checks:
            checks["api"] = asyncio.run(check_api(server.url, st, expected, args.timeout))
        server.stop()
        out["stop_s"], out["server_returncode"] = server.stop_s, server.returncode
        if not args.no_checks:
            with tempfile.TemporaryDirectory(dir=phase_dir) as tmp:
                checks["store"] = check_store(store, st, expected, Path(tmp), args.device)
        out["checks"] = checks
        out["latencies_ms"] = {kind: [round((t1 - ts) * 1000, 2) for k, ts, t1, s in st.recs if k == kind]
                               for kind in KINDS}
    finally:
        server.stop()
        out.setdefault("stop_s", server.stop_s)
        out.setdefault("server_returncode", server.returncode)
        if server.returncode not in (0, None):
            out.setdefault("server_log_tail", server.log_tail())
    if not args.keep:
        shutil.rmtree(phase_dir, ignore_errors=True)
        try:
            phase_dir.parent.rmdir()  # when it was the last one
        except OSError:
            pass
    _print_phase(out)
    return out


def _problems(ph: dict) -> list[str]:
    c = ph.get("checks", {})
    probs = list(c.get("anomalies", []))
    for part in ("during_load", "api", "store"):
        probs += c.get(part, {}).get("problems", [])
    if ph.get("server_returncode") not in (0, None):
        probs.append(f"the server exited with status {ph['server_returncode']} when stopped")
    return probs


def _print_phase(ph: dict) -> None:
    w = sys.stderr
    print(f"   {ph.get('requests', 0)} requests in {ph.get('wall_s', 0):.1f} s = {ph.get('rps', 0):.1f} req/s; "
          f"errors {len(ph.get('errors', []))}; added {ph.get('added')}, removed {ph.get('removed')}", file=w)
    for e in ph.get("errors", [])[:20]:
        print(f"   ERROR {e['status']} ({e['during']}, at {e['at_s']} s): {e['request']}\n         {e['body'][:500]}",
              file=w)
    if len(ph.get("errors", [])) > 20:
        print(f"   ... and {len(ph['errors']) - 20} more errors", file=w)
    for p in _problems(ph)[:20]:
        print(f"   PROBLEM: {p}", file=w)
    w.flush()


# -- the report ----------------------------------------------------------------------------------------------

def _f(x, fmt="{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def render(res: dict) -> str:
    s, a = res["store"], res["args"]
    phases = res["phases"]
    section = res.get("section", "serve")
    begin, end = markers(section)
    title = "## HTTP server under load (`benchmarks/serve.py`)"
    if section != "serve":
        title += f", {res['store'].get('images', '')} images".rstrip(", ")
    lines = [begin, title, "",
             f"- Command: `{res['command']}`",
             f"- Machine: {res['machine']}",
             f"- Date: {res['date']}; wall time {res['wall_s'] / 60:.1f} min (load generator and server share the "
             "machine's cores, over loopback)"]
    pad = ""
    if s.get("synthetic"):
        pad = (f" + {s['synthetic']:,} generated {s['synthetic_size'][0]}×{s['synthetic_size'][1]} images "
               f"(made in {_f(s.get('synthetic_generate_s'))} s, indexed in {_f(s.get('synthetic_index_s'))} s = "
               f"{s['synthetic'] / s['synthetic_index_s']:,.0f} images/s)" if s.get("synthetic_index_s") else
               f" + {s['synthetic']:,} generated images")
    built = (f"photos indexed in {s['photos_s']:.1f} s" if s.get("photos_s") is not None else "")
    built = f"reused, {built} when built" if s.get("reused") and built else "reused" if s.get("reused") else built
    lines += [f"- Store: {s['images']:,} images = {s.get('photos', '?')} rParis6k-mini database photos{pad}; "
              f"{BACKBONE}-GeM (ImageNet weights), D = {s['dim']}, {s['image_size']} px, backend `{s['backend']}` "
              f"({built}); held back for adds: {s['held_back']} photos (the queries and {a['hold_back']} database "
              f"photos), then generated 320×240 images",
              f"- Load: closed loop, no think time; mix {', '.join(f'{k} {v:g}' for k, v in a['mix'].items())} "
              f"(list = one page of 50 + 4 thumbnails); searches upload a random one of {s['query_photos']} real "
              f"photos, k = {a['k']}, {a['bbox_share']:.0%} with a crop box; server `imret serve` defaults "
              f"(max_batch {res['default_max_batch']}, max_wait 2 ms, torch threads "
              f"{a.get('server_threads') or 'default'}{''.join(' ' + x for x in a.get('server_arg', []))}) "
              "unless noted",
              "",
              "| phase | clients | wall (s) | requests | req/s | queries/s | errors | batch mean / max | batcher busy | "
              "CPU server / client (cores) |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for ph in phases:
        b = ph.get("batching", {})
        cs, cc = ph.get("cpu_server_s"), ph.get("cpu_client_s")
        w = ph.get("wall_s") or None
        lines.append(f"| {ph['name']} | {ph['clients']} | {_f(ph.get('wall_s'))} | {ph.get('requests', 0):,} | "
                     f"{_f(ph.get('rps'))} | {_f(ph.get('queries_rps'))} | {len(ph.get('errors', []))} | "
                     f"{_f(b.get('mean_size'), '{:.2f}')} / {_f(b.get('max_size'), '{}')} | "
                     f"{_f(_ratio(b.get('busy_s'), w), '{:.0%}')} | "
                     f"{_f(_ratio(cs, w), '{:.2f}')} / {_f(_ratio(cc, w), '{:.2f}')} |")
    lines += ["", "Per kind of request: rate (req/s) and latency p50 / p90 / p99 (ms, successful requests):", "",
              "| kind | " + " | ".join(f"{ph['name']}: req/s | p50 / p90 / p99" for ph in phases) + " |",
              "|---|" + "---:|---:|" * len(phases)]
    for kind in KINDS:
        if not any(kind in ph.get("kinds", {}) for ph in phases):
            continue
        cells = []
        for ph in phases:
            k = ph.get("kinds", {}).get(kind)
            cells.append("– | –" if k is None else
                         f"{k['rps']:.2f} | {_f(k['p50_ms'], '{:.0f}')} / {_f(k['p90_ms'], '{:.0f}')} / "
                         f"{_f(k['p99_ms'], '{:.0f}')}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    by = {ph["role"]: ph for ph in phases}
    lines += ["", "Ratios (same run):", ""]
    n_before = len(lines)
    one, load, unb = by.get("baseline"), by.get("load"), by.get("unbatched")
    if one and load and one.get("rps") and load.get("rps"):
        r = load["rps"] / one["rps"]
        q = _ratio(load.get("queries_rps"), one.get("queries_rps"))
        worst = min(r, q if q is not None else r)
        verdict = "grows" if worst >= 1.1 else "holds" if worst >= 0.8 else "COLLAPSES"
        lines.append(f"- Throughput at {load['clients']} clients / at 1 client: {r:.2f}× requests/s, "
                     f"{_f(q, '{:.2f}')}× queries/s (searches + similar): throughput {verdict} under load.")
        for kind in ("search", "similar"):
            k1, kn = one.get("kinds", {}).get(kind), load.get("kinds", {}).get(kind)
            if k1 and kn and k1.get("p50_ms") and kn.get("p50_ms"):
                lines.append(f"- {kind}: {kn['rps'] / k1['rps']:.2f}× the rate, p50 latency "
                             f"{kn['p50_ms'] / k1['p50_ms']:.1f}× ({kn['p50_ms']:.0f} vs {k1['p50_ms']:.0f} ms) "
                             f"with {load['clients']}× the clients.")
    if load and unb and unb.get("queries_rps"):
        qb = load["batching"].get("mean_size")
        lines.append(f"- Micro-batching at {load['clients']} clients, max_batch {res['default_max_batch']} vs 1: "
                     f"{load['queries_rps'] / unb['queries_rps']:.2f}× queries/s, "
                     f"{load['rps'] / unb['rps']:.2f}× requests/s (mean batch {_f(qb, '{:.2f}')} vs "
                     f"{_f(unb['batching'].get('mean_size'), '{:.2f}')}).")
    if len(lines) == n_before:
        lines.append("- none: this run has no 1-client phase and no max_batch 1 phase to compare with.")
    lines += ["", "Checks after each phase (through the API, then on the store opened directly):", ""]
    for ph in phases:
        c = ph.get("checks", {})
        api, sto, dl = c.get("api", {}), c.get("store", {}), c.get("during_load", {})
        probs = _problems(ph)
        txt = (f"- {ph['name']}: {len(ph.get('errors', []))} failed requests; {ph.get('added', 0)} added, "
               f"{ph.get('removed', 0)} removed → {ph.get('expected_images', '?'):,} images expected")
        if api:
            txt += f", API says {api.get('health_images', '?'):,}"
        if sto:
            txt += (f", store {sto.get('images', '?'):,}, `verify()` {'clean' if not sto.get('verify') else 'PROBLEMS'}"
                    f"; kept adds first for their own photo: {api.get('found_first', '?')}/{api.get('kept', '?')} "
                    f"(API), {sto.get('found_first', '?')}/{sto.get('kept', '?')} (store), min score "
                    f"{_f(sto.get('min_score'), '{:.4f}')}")
        if dl:
            txt += f"; removed never returned afterwards ({dl.get('answers_checked', 0):,} answers checked)"
        txt += ": **OK**." if not probs else f": **{len(probs)} problem(s)**, e.g. {probs[0]}"
        lines.append(txt)
        if ph.get("fallbacks"):
            lines.append(f"  ({', '.join(f'{k}: {v}' for k, v in ph['fallbacks'].items())})")
    lines.append(end)
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------------------------

def _mix(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in ACTIONS:
            raise argparse.ArgumentTypeError(f"unknown action {k!r} in --mix; available: {', '.join(ACTIONS)}")
        try:
            out[k] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix {k}={v!r}: not a number") from None
        if out[k] < 0:
            raise argparse.ArgumentTypeError(f"--mix {k}={v}: must be >= 0")
    if not sum(out.values()) > 0:
        raise argparse.ArgumentTypeError("--mix needs a positive weight")
    return {k: v / sum(out.values()) for k, v in out.items() if v > 0}


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 96x72, got {text!r}") from None
    return w, h


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64, help="virtual users of the load phase (default 64)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the load phase (default 60)")
    ap.add_argument("--baseline-duration", type=float, default=20.0,
                    help="seconds of the 1-client phase (default 20; 0 skips it)")
    ap.add_argument("--unbatched-duration", type=float, default=30.0,
                    help="seconds of the load phase with the server at --max-batch 1 (default 30; 0 skips it)")
    ap.add_argument("--mix", type=_mix, default=_mix(DEFAULT_MIX),
                    help=f"relative weights of the actions (default {DEFAULT_MIX})")
    ap.add_argument("--k", type=int, default=20, help="results per search (default 20)")
    ap.add_argument("--bbox-share", type=float, default=0.25, help="share of uploads searched with a crop box")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds before a request counts as failed")
    ap.add_argument("--data", default=str(SHARED / "data" / "rparis6k-mini"), help="revisitop folder of photos")
    ap.add_argument("--weights", default=str(WEIGHTS), help="MobileNetV2 weights (safetensors)")
    ap.add_argument("--image-size", type=int, default=512, help="store image size when building (default 512)")
    ap.add_argument("--backend", default="exact", help="store backend when building (default exact)")
    ap.add_argument("--hold-back", type=int, default=30, help="database photos left out of the store, added "
                                                              "during the load with the queries (default 30)")
    ap.add_argument("--synthetic", type=int, default=0, help="pad the store with N generated images (default 0)")
    ap.add_argument("--synthetic-size", type=_size, default=(64, 48), help="their size WxH (default 64x48)")
    ap.add_argument("--add-pool", type=int, default=300, help="generated photos available to adds per phase")
    ap.add_argument("--store", default=None, help="base store: reused if it exists, built there otherwise "
                                                  "(default: under --work, named by image size and padding)")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench-serve"), help="scratch folder")
    ap.add_argument("--device", default="cpu", help="model device, for the server and the checks")
    ap.add_argument("--server-threads", type=int, default=None, help="torch threads of the server")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of this process (building, padding, checks); on a busy 2-core machine 1 "
                         "indexes small padding images many times faster than 2")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `imret serve` option (repeatable), "
                                                                      "e.g. --server-arg=--max-wait-ms=5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-checks", action="store_true", help="skip the checks after each phase")
    ap.add_argument("--keep", action="store_true", help="keep each phase's store copy and server log")
    ap.add_argument("--json", default=None, help="also write the raw figures here")
    ap.add_argument("--write", action="store_true", help="update the serve section of BENCHMARKS.md")
    ap.add_argument("--render", default=None, metavar="JSON", help="only re-render a saved run's section")
    ap.add_argument("--section", default="serve", help="BENCHMARKS.md section name (markers <!-- NAME:begin -->), "
                                                       "e.g. serve-100k for a run on a padded store")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        res["section"] = args.section
        text = render(res)
        print(text)
        if args.write:
            write_section(text, REPO / "BENCHMARKS.md", *markers(args.section))
        return 0
    if args.clients < 1 or args.duration <= 0:
        ap.error("--clients must be >= 1 and --duration > 0")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    photos, indexed, held_names = load_photos(Path(args.data), args.hold_back, args.seed)
    plain = work / f"store-{args.image_size}px-hold{args.hold_back}-{args.backend.replace(':', '_')}"
    if args.store:
        base = Path(args.store)
    else:
        pad = f"-syn{args.synthetic}-{args.synthetic_size[0]}x{args.synthetic_size[1]}" if args.synthetic else ""
        base = plain.with_name(plain.name + pad)
    store_info: dict[str, Any] = {}
    if (base / "store.json").is_file():
        if args.store and args.synthetic:
            ap.error(f"--store {base} exists: it is used as it is; --synthetic applies only when building")
        print(f"reusing the store {base}", file=sys.stderr, flush=True)
        if _side(base).is_file():  # how it was built, when this script built it
            store_info.update(json.loads(_side(base).read_text()))
        store_info["reused"] = True
    else:
        store_info.update(build_store(base, args, photos, indexed, plain if args.synthetic and not args.store else None))
    facts = store_facts(base)
    # the photos to add: every real photo whose content the store does not hold
    held = [p for p in photos if _sha256(p.data) not in facts["sha256"]]
    store_info.update(images=facts["images"], dim=facts["dim"], image_size=facts["image_size"],
                      backend=facts["backend"], held_back=len(held), query_photos=len(photos),
                      path=str(base))
    store_info.setdefault("photos", facts["images"] - store_info.get("synthetic", 0))
    print(f"store: {facts['images']} images, D={facts['dim']}, {facts['image_size']} px, {facts['backend']}; "
          f"{len(held)} photos held back for adds", file=sys.stderr, flush=True)

    default_max_batch = 16
    for extra in args.server_arg:
        if extra.startswith("--max-batch"):
            ap.error("set micro-batching through the phases, not --server-arg --max-batch")
    plan = []
    if args.baseline_duration > 0:
        plan.append(("baseline", "1 client", 1, args.baseline_duration, default_max_batch))
    plan.append(("load", f"{args.clients} clients", args.clients, args.duration, default_max_batch))
    if args.unbatched_duration > 0:
        plan.append(("unbatched", f"{args.clients} clients, max_batch 1", args.clients, args.unbatched_duration, 1))
    # photos to add once the held-back ones are used up (each phase adds to its own copy of the store)
    generated = generated_jpegs(args.add_pool, (320, 240), seed=args.seed + 1, prefix="gen_")
    phases = []
    for n, (role, name, clients, duration, mb) in enumerate(plan):
        ph = run_phase(name, base, facts, photos, held, generated, args, clients=clients, duration=duration,
                       max_batch=mb, seed=args.seed * 100 + n + 1)
        ph["role"] = role
        phases.append(ph)

    res = {"command": ".venv/bin/python benchmarks/serve.py " + " ".join(shlex.quote(x) for x in argv),
           "machine": machine_line(), "date": started, "wall_s": time.perf_counter() - t_start,
           "args": {"clients": args.clients, "duration": args.duration, "mix": args.mix, "k": args.k,
                    "bbox_share": args.bbox_share, "hold_back": args.hold_back, "image_size": args.image_size,
                    "synthetic": args.synthetic, "device": args.device, "server_threads": args.server_threads,
                    "server_arg": args.server_arg},
           "default_max_batch": default_max_batch, "store": store_info, "phases": phases}
    res["command"] = res["command"].strip()
    res["section"] = args.section
    text = render(res)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    if args.write:
        write_section(text, REPO / "BENCHMARKS.md", *markers(args.section))
    failed = sum(len(ph.get("errors", [])) for ph in phases) + sum(len(_problems(ph)) for ph in phases)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
