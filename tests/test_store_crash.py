"""Crash test: a process adding images is killed (SIGKILL) at random moments, many times.

After every kill the store must open, pass a full consistency check (metadata, descriptors
and search index agree, no content twice), and a final rerun must finish with every image
present exactly once.
"""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from conftest import installed

from imret import create_model
from imret.index.store import Preprocessing, Store
from imret.synthetic import make_labelled_folder

pytestmark = pytest.mark.slow

WORKER = textwrap.dedent(
    """
    import sys
    from imret.index.store import Store
    store, folder = sys.argv[1], sys.argv[2]
    paths = sorted(str(p) for p in __import__("pathlib").Path(folder).rglob("*.jpg"))
    with Store.open(store, writable=True) as st:
        print("started", flush=True)
        st.add(paths, commit_every=2, save_every=4, workers=0)
    print("done", flush=True)
    """
)


def _cases():
    cases = [("exact", None)]
    if installed("faiss"):
        cases.append(("faiss:HNSW16", None))
    if installed("cv2"):  # local features are a rows file of their own, written with the descriptors
        cases.append(("exact", "sift?max_keypoints=32&max_side=96"))
    return cases


@pytest.mark.parametrize("backend,local", _cases())
def test_kill_9_at_random_points_never_breaks_the_store(tmp_path, backend, local):
    folder = make_labelled_folder(tmp_path / "photos", n_classes=10, per_class=4, size=(96, 72), seed=1)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    torch.manual_seed(0)
    model = create_model("resnet18", "gem", pretrained=False)
    store = tmp_path / "store"
    with Store.create(store, model, preprocessing=Preprocessing(image_size=64), backend=backend) as st:
        if local:
            st.configure(local=local)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    rng = random.Random(1234)
    counts, kills = [], 0
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(store), str(folder)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        # wait for the worker to start writing, then kill it a random time later
        line = proc.stdout.readline()
        assert line.strip() == b"started", proc.stderr.read().decode()
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        with Store.open(store) as st:  # a reader sees a consistent store
            assert st.verify() == [], f"after kill {attempt}"
            counts.append(len(st))
            recs = st.list(0, 10_000)
            assert len({r.sha256 for r in recs}) == len(recs)
            if len(st):
                x = np.asarray(st.descriptors())
                hits = st.search_vectors(x[-1:], 1)[1]
                assert hits[0, 0] == st.n_rows() - 1
        with Store.open(store, writable=True) as st:  # a writer recovers and still agrees
            assert st.verify() == []
        if counts[-1] == len(paths):
            break
    assert kills >= 3, f"only {kills} kills landed; the worker finished too fast to test anything"
    assert counts == sorted(counts)  # committed work is never lost
    # the final rerun completes the job
    done = subprocess.run([sys.executable, "-c", WORKER, str(store), str(folder)], capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    with Store.open(store) as st:
        assert st.verify() == []
        recs = st.list(0, 10_000)
        assert sorted(r.path for r in recs) == paths  # every image exactly once
        x = np.asarray(st.descriptors())
        ids = st.search_vectors(x, 1)[1][:, 0]
        np.testing.assert_array_equal(ids, np.arange(len(paths)))
        if local:  # every committed image has its own features, as a fresh extraction gives them
            ex = st.local_extractor()
            for r, f in zip(recs, st.local_features([r.id for r in recs])):
                g = ex(r.path)
                assert f is not None and len(f) == len(g)
                np.testing.assert_allclose(f.keypoints, g.keypoints, atol=0.01)
