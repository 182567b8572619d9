"""A real `imret serve` process killed (SIGKILL) while clients add and remove images.

Every add and remove the server acknowledged before the kill must be in the store when it is
reopened, the store must pass its full consistency check, and a new server on it must answer.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import free_port, installed

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not installed("fastapi", "httpx", "multipart", "uvicorn"),
                                 reason="the serve extra (fastapi, uvicorn, python-multipart) and httpx are not installed")]

from imret import create_model  # noqa: E402
from imret.index.store import Preprocessing, Store  # noqa: E402
from imret.synthetic import make_labelled_folder  # noqa: E402

TOKEN = "crash-test-token"


def _start(store, token_file, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "imret.cli", "serve", str(store), "--port", str(port),
                             "--token-file", str(token_file), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start")


def test_kill_9_during_adds_keeps_every_acknowledged_write(tmp_path):
    import httpx

    folder = make_labelled_folder(tmp_path / "photos", n_classes=12, per_class=4, size=(96, 72), seed=3)
    photos = sorted(folder.rglob("*.jpg"))
    torch.manual_seed(0)
    store = tmp_path / "store"
    with Store.create(store, create_model("resnet18", "gem", pretrained=False),
                      preprocessing=Preprocessing(image_size=64)) as st:
        st.add([str(p) for p in photos[:8]], workers=0)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    acked_added: dict[int, str] = {}
    acked_removed: set[int] = set()
    uncertain: set[int] = set()  # a remove cut off by the kill: it may or may not have happened
    lock = threading.Lock()
    pending = list(photos[8:])

    for round_ in range(3):
        port = free_port()
        proc = _start(store, token_file, port)
        base = f"http://127.0.0.1:{port}"
        stop = threading.Event()

        def adder(i):
            with httpx.Client(base_url=base, timeout=30) as c:
                while not stop.is_set():
                    with lock:
                        if not pending:
                            return
                        p = pending.pop()
                    try:
                        r = c.post("/api/images", files=[("images", (p.name, p.read_bytes(), "image/jpeg"))],
                                   headers=auth)
                    except httpx.HTTPError:
                        with lock:
                            pending.append(p)  # not acknowledged: may or may not be in; retried later
                        return
                    assert r.status_code == 201, r.text
                    body = r.json()
                    with lock:
                        for a in body["added"]:
                            acked_added[a["id"]] = p.name
                        for d in body["duplicates"]:  # an earlier unacknowledged add that did land
                            acked_added[d["id"]] = p.name
                    if body["added"] and len(acked_added) % 5 == 0:
                        victim = body["added"][0]["id"]
                        try:
                            r = c.delete(f"/api/images/{victim}", headers=auth)
                        except httpx.HTTPError:
                            with lock:
                                uncertain.add(victim)
                            return
                        assert r.status_code == 200, r.text
                        with lock:
                            acked_removed.add(victim)

        threads = [threading.Thread(target=adder, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(2.0 + round_)  # let writes happen, then kill the server mid-flight
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(60)
        with Store.open(store) as st:  # the store opens and is consistent after every kill
            assert st.verify() == []
            for i, name in acked_added.items():
                rec = st.records([i])[0]
                assert rec.path.endswith(name)
                if i not in uncertain:
                    assert st.is_live(i) == (i not in acked_removed), (i, name)

    assert len(acked_added) > 5, "the test did not get enough writes through before the kills"
    port = free_port()
    proc = _start(store, token_file, port)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=10)
        with Store.open(store) as st:
            assert r.json()["images"] == len(st)
        live = next(i for i in acked_added if i not in acked_removed and i not in uncertain)
        r = httpx.get(f"http://127.0.0.1:{port}/api/images/{live}/similar?k=1", timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["id"] == live
    finally:
        proc.terminate()
        proc.wait(30)

