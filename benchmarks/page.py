"""The web page in a real browser on a large store: how long each view takes to be ready.

Starts ``imret serve STORE --read-only`` on loopback and drives Debian's headless Chromium
(Selenium, the driver at /usr/bin/chromedriver; nothing downloaded) through the page the way a
user would, timing each step from the action until the page shows its result with every
visible thumbnail decoded:

- open ``/browse`` (first page of 60), jump to the last page, step back one page;
- upload a real photo in the search view (results grid ready), click the first result
  (search with an indexed image, grid ready).

Each step runs ``--repeats`` times; the median and worst are reported, with the server-side
search time (``took_ms``) for the searches. Default store: the 100k-image store that
``benchmarks/serve.py --synthetic 100000`` builds (real rParis6k-mini photos + generated ones).

    .venv/bin/python benchmarks/page.py [--store DIR] [--repeats 5] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, machine_line, publish  # noqa: E402

BEGIN, END = "<!-- page:begin -->", "<!-- page:end -->"
DEFAULT_STORE = REPO / "runs" / "bench-serve" / "store-512px-hold30-exact-syn100000-64x48"
READY_JS = """
const grid = document.getElementById(arguments[0]);
if (!grid || grid.dataset.state !== 'done') return false;
const imgs = [...grid.querySelectorAll('img')].filter(i => {
  const r = i.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; });
return imgs.every(i => i.complete && i.naturalWidth > 0);
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float = 120.0, what: str = "") -> float:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return time.perf_counter() - t0


def _took(drv) -> float:
    """The server's ``took_ms`` as the page shows it ("20 results · took 28 ms")."""
    m = re.search(r"took ([0-9.]+) ms", drv.find_element("id", "took").text)
    return float(m.group(1)) if m else float("nan")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(DEFAULT_STORE))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--photo", default=str(SHARED / "data" / "rparis6k-mini" / "jpg" / "paris_eiffel_000266.jpg"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    store = Path(args.store)
    if not (store / "store.json").is_file():
        print(f"page: no store at {store} (build one with benchmarks/serve.py --synthetic 100000)", file=sys.stderr)
        return 2
    for exe in (args.chromium, args.chromedriver):
        if not os.access(exe, os.X_OK):
            print(f"page: {exe} not found (scripts/install_browser.sh installs it)", file=sys.stderr)
            return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "imret.cli", "serve", str(store), "--port", str(port),
                               "--read-only"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    profile = tempfile.mkdtemp(prefix="imret-page-")
    drv = None
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(base + "/api/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait(healthy, 300, "the server")
        with urllib.request.urlopen(base + "/api/health") as r:
            n_images = json.load(r)["images"]
        opts = webdriver.ChromeOptions()
        opts.binary_location = args.chromium
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--window-size=1400,1000", "--no-first-run", f"--user-data-dir={profile}"):
            opts.add_argument(a)
        drv = webdriver.Chrome(service=Service(executable_path=args.chromedriver), options=opts)
        times: dict[str, list[float]] = {k: [] for k in ("open browse", "last page", "previous page",
                                                          "search by photo", "search by result")}
        took: dict[str, list[float]] = {"search by photo": [], "search by result": []}

        def ready(grid):
            return lambda: drv.execute_script(READY_JS, grid)

        for _ in range(args.repeats):
            drv.get("about:blank")
            t0 = time.perf_counter()
            drv.get(base + "/browse")
            _wait(ready("browse-grid"), what="the first page")
            times["open browse"].append(time.perf_counter() - t0)
            pages = int(drv.find_element("id", "browse-grid").get_attribute("data-total") or 0)
            last = max(1, -(-pages // 60))
            inp = drv.find_element("id", "page-input")
            inp.clear()
            inp.send_keys(str(last))
            t0 = time.perf_counter()
            drv.find_element("id", "page-go").click()
            _wait(lambda: drv.execute_script(
                "return document.getElementById('browse-grid').dataset.page === arguments[0]", str(last))
                and ready("browse-grid")(), what="the last page")
            times["last page"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            drv.find_element("id", "page-prev").click()
            _wait(lambda: drv.execute_script(
                "return document.getElementById('browse-grid').dataset.page === arguments[0]", str(last - 1))
                and ready("browse-grid")(), what="the previous page")
            times["previous page"].append(time.perf_counter() - t0)

            drv.get(base + "/")
            _wait(lambda: drv.execute_script("return !!document.getElementById('file-input')"), what="search view")
            seq = drv.execute_script("return document.getElementById('results').dataset.seq || '0'")
            t0 = time.perf_counter()
            drv.find_element("id", "file-input").send_keys(args.photo)
            _wait(lambda: drv.execute_script("return document.getElementById('results').dataset.seq") != seq
                  and ready("results")(), what="photo results")
            times["search by photo"].append(time.perf_counter() - t0)
            took["search by photo"].append(_took(drv))
            seq = drv.execute_script("return document.getElementById('results').dataset.seq")
            t0 = time.perf_counter()
            drv.find_element("css selector", "#results [data-testid=result] button.tile-btn").click()
            _wait(lambda: drv.execute_script("return document.getElementById('results').dataset.seq") != seq
                  and ready("results")(), what="results of a result")
            times["search by result"].append(time.perf_counter() - t0)
            took["search by result"].append(_took(drv))
    finally:
        if drv is not None:
            drv.quit()
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()

    lines = [BEGIN, f"## The web page on a {n_images:,}-image store (`benchmarks/page.py`)", "",
             f"- Command: `.venv/bin/python benchmarks/page.py {' '.join(argv)}`".rstrip(),
             f"- Machine: {machine_line()}; headless Chromium (Debian) and the server on the same 2 cores",
             f"- Date: {started}; store `{store.name}` (exact search, D = 1280), server `--read-only`, "
             f"{args.repeats} repeats; time from the action until the grid is rendered and every visible "
             "thumbnail decoded", "",
             "| step | median (ms) | worst (ms) | server search (took_ms, median) |", "|---|---:|---:|---:|"]
    for k, v in times.items():
        t = f"{statistics.median(took[k]):.0f}" if k in took and took[k] else ""
        lines.append(f"| {k} | {1000 * statistics.median(v):.0f} | {1000 * max(v):.0f} | {t} |")
    lines.append(END)
    text = "\n".join(lines) + "\n"
    publish(text, BEGIN, END, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
