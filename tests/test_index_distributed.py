"""Indexing with several processes (imret.index.distributed): the same store as one process.

Fast tests check the pieces in one process (the partition, the merge of slices, the hooks of
``Store.add`` that rank 0 runs with); the slow ones run ``torchrun`` with 2 gloo processes on
the CPU: a build equals the single-process build (ids, paths, descriptors), and a build whose
rank is killed by ``kill -9`` mid-way, then finished by a rerun, equals it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, installed

from imret.cli import main
from imret.index.distributed import hash_files, merge_prepared, rank_device, shard_bounds, torchrun_command
from imret.index.store import Preprocessing, Store, StoreError
from imret.synthetic import make_labelled_folder
from imret.train.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL_ARGS = ["--model", "resnet18", "--pool", "gem", "--no-pretrained", "--seed", "0", "--image-size", "64",
              "--workers", "0", "--no-progress"]


def _photos_with_trouble(root: Path, n_classes: int, per_class: int) -> Path:
    """Generated photos plus a file that is not an image and a second copy of one photo."""
    folder = make_labelled_folder(root, n_classes=n_classes, per_class=per_class, size=(96, 72), seed=3)
    (folder / "object_000" / "broken.jpg").write_bytes(b"this is not a jpeg" * 8)
    shutil.copy(folder / "object_000" / "001.jpg", folder / f"object_{n_classes - 1:03d}" / "zz_copy.jpg")
    return folder


def _content(store: Path) -> tuple[list[tuple[int, str, str]], np.ndarray]:
    with Store.open(store) as st:
        assert st.verify() == []
        recs = st.list(0, 100_000)
        return [(r.id, r.path, r.sha256) for r in recs], np.asarray(st.descriptors()).copy()


def _assert_same_store(a: Path, b: Path) -> None:
    ra, xa = _content(a)
    rb, xb = _content(b)
    assert ra == rb  # same ids, paths and contents, in the same order
    assert len({sha for _, _, sha in rb}) == len(rb)  # every image once
    assert xa.shape == xb.shape
    np.testing.assert_allclose(xa, xb, atol=1e-6, rtol=0)


# --- the pieces --------------------------------------------------------------------------------


def test_shard_bounds_cover_the_range_in_order_with_near_equal_sizes():
    for n in range(0, 23):
        for parts in range(1, 6):
            b = shard_bounds(n, parts)
            assert len(b) == parts
            assert [i for s, e in b for i in range(s, e)] == list(range(n))
            sizes = [e - s for s, e in b]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="parts"):
        shard_bounds(3, 0)


def test_merged_slices_equal_one_extraction_of_the_batch(small_photos, tiny_model, tmp_path):
    batch = list(small_photos[:7])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    batch.insert(3, str(bad))
    with Store.create(tmp_path / "s", tiny_model, preprocessing=Preprocessing(image_size=64)) as st:
        whole, _ = st.prepare_rows(batch, workers=0)
        cuts = shard_bounds(len(batch), 3)
        parts = [st.prepare_rows(batch[a:b], workers=0) for a, b in cuts]
        ex, recs = merge_prepared(parts + [None], [a for a, _ in cuts] + [len(batch)])
    assert recs is None
    np.testing.assert_array_equal(ex.indices, whole.indices)
    assert ex.paths == whole.paths
    assert ex.skipped == whole.skipped and [s.index for s in ex.skipped] == [3]
    np.testing.assert_allclose(ex.descriptors, whole.descriptors, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="offsets"):
        merge_prepared(parts, [0])


def test_add_with_precomputed_hashes_and_a_slicing_extractor_equals_a_plain_add(
        small_photos, tiny_model, make_store, tmp_path):
    """What rank 0 runs: Store.add with the hashes of the other ranks and an extractor that
    describes each batch in slices (here in reverse order, as ranks may finish) and merges them."""
    pre = Preprocessing(image_size=96)
    reference = make_store(small_photos, pre, commit_every=6)
    empty = tmp_path / "empty.jpg"
    empty.touch()
    paths = [str(empty), *small_photos, small_photos[0]]
    calls = []
    with Store.create(tmp_path / "s", tiny_model, preprocessing=pre) as st:
        def extractor(batch):
            calls.append(len(batch))
            cuts = shard_bounds(len(batch), 3)
            done = {}
            for k, (a, b) in reversed(list(enumerate(cuts))):
                done[k] = st.prepare_rows(batch[a:b], workers=0) if b > a else None
            return merge_prepared([done[k] for k in range(len(cuts))], [a for a, _ in cuts])

        hashes = dict(zip((os.path.abspath(p) for p in paths), hash_files(paths)))
        assert isinstance(hashes[str(empty)], str)  # the reason, as the store gives it
        report = st.add(paths, commit_every=4, hashes=hashes, extractor=extractor)
    assert calls == [4, 4, 4, 4, 4]
    assert report.skipped == [(str(empty), hashes[str(empty)])]
    assert report.duplicates == [(os.path.abspath(small_photos[0]), 0)]
    _assert_same_store(tmp_path / "s", reference)


@pytest.mark.skipif(not installed("cv2"), reason="SIFT needs opencv")
def test_local_features_travel_with_the_slices(small_photos, tiny_model, tmp_path):
    """A store that keeps local features gets them from the slices, as a plain add computes them."""
    pre, local = Preprocessing(image_size=64), "sift?max_keypoints=32&max_side=96"
    photos = small_photos[:9]
    stores = []
    for name, sliced in (("plain", False), ("sliced", True)):
        with Store.create(tmp_path / name, tiny_model, preprocessing=pre) as st:
            st.configure(local=local)

            def extractor(batch, st=st):
                cuts = shard_bounds(len(batch), 2)
                return merge_prepared([st.prepare_rows(batch[a:b], workers=0) for a, b in cuts], [a for a, _ in cuts])

            st.add(photos, commit_every=4, workers=0, extractor=extractor if sliced else None)
        stores.append(tmp_path / name)
    _assert_same_store(*stores)
    with Store.open(stores[0]) as a, Store.open(stores[1]) as b:
        fa, fb = a.local_features(range(len(photos))), b.local_features(range(len(photos)))
    assert all(f is not None and len(f) > 0 for f in fa)
    for f, g in zip(fa, fb):
        np.testing.assert_array_equal(f.keypoints, g.keypoints)
        np.testing.assert_array_equal(f.descriptors, g.descriptors)


def test_add_refuses_what_a_bad_extractor_returns(small_photos, tiny_model, tmp_path):
    with Store.create(tmp_path / "s", tiny_model, preprocessing=Preprocessing(image_size=64)) as st:
        good, _ = st.prepare_rows(small_photos[:2], workers=0)
        bad_rows = (type(good)(good.descriptors[:, :10], good.indices, good.paths), None)
        bad_positions = (type(good)(good.descriptors, good.indices[::-1].copy(), good.paths), None)
        for bad, match in ((bad_rows, "float32"), (bad_positions, "increasing")):
            with pytest.raises(StoreError, match=match):
                st.add(small_photos[:2], extractor=lambda batch, bad=bad: bad)
        assert len(st) == 0


def test_rank_device():
    two = DistInfo(rank=1, world_size=2, local_rank=1)
    assert rank_device("cpu", two, True) == "cpu"
    assert rank_device("cuda", two, True) == "cuda:1"
    assert rank_device("auto", two, True) == "cuda:1"
    assert rank_device("auto", two, False) == "cpu"
    assert rank_device("cuda:0", DistInfo(), True) == "cuda:0"
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        rank_device("cuda:0", two, True)
    with pytest.raises(ValueError, match="not available"):
        rank_device("cuda", two, False)


def test_torchrun_command():
    cmd = torchrun_command(3, ["index", "add", "s", "p"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "imret.cli",
                   "index", "add", "s", "p"]
    with pytest.raises(ValueError, match="procs"):
        torchrun_command(0, [])


# --- torchrun, 2 gloo processes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return _photos_with_trouble(tmp_path_factory.mktemp("dist") / "photos", n_classes=6, per_class=6)


@pytest.fixture(scope="module")
def single(photos, tmp_path_factory) -> Path:
    """The single-process build, in this process."""
    out = tmp_path_factory.mktemp("single") / "store"
    assert main(["index", "build", str(photos), "--out", str(out), "--commit-every", "4", *MODEL_ARGS]) == 0
    return out


def _env(tag: str = "") -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "IMRET_TEST_RUN": tag,
            "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "imret.cli", *args]


@pytest.mark.slow
def test_torchrun_build_equals_the_single_process_build(photos, single, tmp_path):
    out = tmp_path / "store"
    proc = subprocess.run(_torchrun(["index", "build", str(photos), "--out", str(out), "--commit-every", "2",
                                     *MODEL_ARGS]), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_same_store(out, single)
    # rank 0 alone reports, as one process does: 36 photos, the copy, the broken file
    assert proc.stdout.count("added 36 image(s)") == 1, proc.stdout
    assert "1 already indexed (same content), 1 skipped" in proc.stdout
    assert proc.stdout.count("(2 processes, each working") == 1
    assert proc.stderr.count("broken.jpg: not a recognised image format") == 1, proc.stderr[-3000:]


def _rank_pid(tag: str, rank: int) -> int | None:
    """The process of this test's run whose torchrun rank is ``rank`` (found by its environment)."""
    want = {f"IMRET_TEST_RUN={tag}".encode(), f"RANK={rank}".encode()}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = set((d / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= env:
            return int(d.name)
    return None


def _committed(store: Path) -> int:
    try:
        with Store.open(store) as st:
            return len(st)
    except (OSError, StoreError):  # not created yet
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_way_then_a_rerun_leaves_every_image_once(photos, single, tmp_path, victim):
    out = tmp_path / "store"
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(_torchrun(["index", "build", str(photos), "--out", str(out), "--commit-every", "1",
                                       *MODEL_ARGS]), env=_env(tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while _committed(out) < 4:  # two batches of one image per rank are in
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the run never committed"
            time.sleep(0.05)
        pid = _rank_pid(tag, victim)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0  # the run fails ...
    committed = _committed(out)
    assert 4 <= committed < 36, f"the kill landed after the run ({committed} images)"
    reference, xref = _content(single)
    part, xpart = _content(out)
    assert part == reference[:committed]  # ... keeping a consistent prefix of the single-process build
    np.testing.assert_allclose(xpart, xref[:committed], atol=1e-6, rtol=0)
    # the rerun (2 processes on this machine, through --procs) finishes it
    rerun = subprocess.run([sys.executable, "-m", "imret.cli", "index", "add", str(out), str(photos), "--procs", "2",
                            "--commit-every", "3", "--workers", "0", "--no-progress"],
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"added {36 - committed} image(s)" in rerun.stdout
    assert f"{committed + 1} already indexed" in rerun.stdout  # the committed photos and the copy
    _assert_same_store(out, single)


FAILING_RANK = """
import os, sys
from imret.index.store import Store
from imret.cli import main

if os.environ["RANK"] == "1":  # this rank's extraction fails at its third batch
    calls = []
    plain = Store.prepare_rows

    def failing(self, paths, **kw):
        calls.append(paths)
        if len(calls) == 3:
            raise MemoryError("out of memory (simulated)")
        return plain(self, paths, **kw)

    Store.prepare_rows = failing
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_failing_rank_or_store_stops_the_run_with_one_clear_error(photos, single, tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    out = tmp_path / "store"
    cmd = _torchrun(["index", "build", str(photos), "--out", str(out), "--commit-every", "2", *MODEL_ARGS])
    cmd[cmd.index("-m", 2):cmd.index("imret.cli") + 1] = [str(script)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("imret: error: process 1 of 2 failed: MemoryError: out of memory (simulated)") == 1, \
        proc.stderr[-3000:]
    reference, _ = _content(single)
    # two batches of 2 x 2 files committed (one of them broken.jpg), nothing of the third
    assert _content(out)[0] == reference[:7]
    # rank 0 cannot open the store: it says why, the other rank stops quietly
    proc = subprocess.run(_torchrun(["index", "add", str(tmp_path / "missing"), str(photos), "--no-progress"]),
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("imret: error: no store at") == 1, proc.stderr[-3000:]
    assert "RankStopped" not in proc.stderr and "rank 0 could not open" not in proc.stderr
