"""A store is untrusted input: hostile store.json values, symlinks out, damaged rows and
databases, full disks, and hostile files handed to an add. Each case must end in a clear error
(or a skip with a reason) and leave everything outside the store, and the store itself, as it was."""

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, installed

from imret.cli import main
from imret.index.store import Preprocessing, Store, StoreCorruptError, StoreError
from imret.whitening import fit_pca_whitening

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRE = Preprocessing(image_size=64)
FAST = dict(workers=0)
D = 512


@pytest.fixture(scope="module")
def photos(make_photos):
    return make_photos(n_classes=4, per_class=5, size=(96, 80))


@pytest.fixture(scope="module")
def built(make_store, photos):
    return make_store(photos, PRE)


@pytest.fixture(scope="module")
def built_ann(tmp_path_factory, built):
    """The store with whitening (a vectors file) and a FAISS index (an index directory)."""
    if not installed("faiss"):
        pytest.skip("faiss-cpu is not installed (pip install -e '.[faiss]')")
    path = tmp_path_factory.mktemp("built_ann") / "store"
    shutil.copytree(built, path)
    with Store.open(path, writable=True) as st:
        w = fit_pca_whitening(np.asarray(st.descriptors()), dim=16)
        st.configure(whitening=w, backend="faiss:HNSW32")
        assert st.info()["backend"]["searching_with"].startswith("faiss:HNSW32")
    return path


@pytest.fixture
def store_copy(copy_store, built):
    return copy_store(built)


@pytest.fixture
def ann_copy(copy_store, built_ann):
    return copy_store(built_ann)


@pytest.fixture
def victim(tmp_path):
    """A directory and a file outside the store that nothing may read, change or remove."""
    d = tmp_path / "victim"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    f = tmp_path / "victim.f32"
    f.write_bytes(np.arange(10 * D, dtype=np.float32).tobytes())
    return d, f


def _snapshot(victim):
    d, f = victim
    return sorted(p.name for p in d.iterdir()), (d / "precious.txt").read_text(), f.read_bytes()


def _edit_config(store: Path, **changes):
    cfg = json.loads((store / "store.json").read_text())
    for key, value in changes.items():
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    (store / "store.json").write_text(json.dumps(cfg))
    return cfg


# --- item 1: store.json cannot reach outside the store ------------------------------------------


def test_index_dir_outside_the_store_is_refused_and_nothing_is_removed(store_copy, victim, capsys):
    """The reported defect: index.dir = "../victim", then `configure --backend ann` deleted it."""
    before = _snapshot(victim)
    _edit_config(store_copy, index={"dir": "../victim", "rows": 0, "remove_seq": 0})
    assert main(["index", "configure", str(store_copy), "--backend", "ann"]) == 1
    err = capsys.readouterr().err
    assert "index.dir" in err and "../victim" in err and "Traceback" not in err
    assert _snapshot(victim) == before


HOSTILE_NAMES = ["../victim", "../victim.f32", "/tmp", "/etc/passwd", "", ".", "..", "a/../../victim",
                 "index.1/../../victim", "vectors.1.f32\n", 7, None, ["index.1"], {"x": 1}]
PATH_KEYS = {
    "model.file": lambda v: {"model.file": v},
    "vectors": lambda v: {"vectors": v},
    "whitening.file": lambda v: {"whitening": {"file": v, "sha256": "0" * 64, "kind": "pca", "dim": 16}},
    "index.dir": lambda v: {"index": {"dir": v, "rows": 0, "remove_seq": 0}},
}


@pytest.mark.parametrize("key,value", [(k, v) for k in sorted(PATH_KEYS) for v in HOSTILE_NAMES
                                       if not (v is None and k in ("vectors", "index.dir"))],  # None: not set
                         ids=repr)
def test_every_path_key_refuses_hostile_values(store_copy, victim, key, value):
    before = _snapshot(victim)
    _edit_config(store_copy, **PATH_KEYS[key](value))
    for writable in (False, True):
        with pytest.raises(StoreCorruptError) as e:
            Store.open(store_copy, writable=writable)
        assert key in str(e.value) and "store.json" in str(e.value)
    assert _snapshot(victim) == before


@pytest.mark.parametrize("target", ["dir", "file"])
def test_generated_names_that_are_symlinks_out_are_refused(ann_copy, victim, target):
    before = _snapshot(victim)
    cfg = json.loads((ann_copy / "store.json").read_text())
    name = cfg["index"]["dir"] if target == "dir" else cfg["vectors"]
    _remove = shutil.rmtree if target == "dir" else os.unlink
    _remove(ann_copy / name)
    os.symlink(victim[0] if target == "dir" else victim[1], ann_copy / name)
    with pytest.raises(StoreCorruptError, match="outside the store"):
        with Store.open(ann_copy, writable=True) as st:
            st.search_ids([0], k=3)
            st.configure(backend="exact")
    assert _snapshot(victim) == before
    assert os.path.islink(ann_copy / name)


@pytest.mark.parametrize("name", ["descriptors.f32", "meta.sqlite", "model.safetensors", "lock"])
def test_fixed_files_that_are_symlinks_out_are_refused(store_copy, victim, tmp_path, name):
    outside = tmp_path / f"outside-{name}"
    shutil.move(store_copy / name, outside)
    os.symlink(outside, store_copy / name)
    before = outside.read_bytes()
    with pytest.raises(StoreCorruptError, match="outside the store"):
        with Store.open(store_copy, writable=True) as st:
            st.add([], **FAST)
            st.model  # noqa: B018 - the model file is read on first use
    assert outside.read_bytes() == before


@pytest.mark.parametrize("change", [
    {"dim": -1}, {"dim": 10**12}, {"dim": "512"}, {"dim": True}, {"generation": "1"}, {"generation": -3},
    {"store_id": "../x"}, {"model": "model.safetensors"}, {"model.sha256": "abc"},
    {"preprocessing.image_size": 10**12}, {"preprocessing.image_size": 0}, {"preprocessing.scales": []},
    {"preprocessing.scales": [1, -1]}, {"preprocessing.scales": "1"}, {"preprocessing.crop_resize": "zoom"},
    {"preprocessing.max_pixels": -5}, {"preprocessing.draft": "yes"},
    {"query_expansion.k": 0}, {"query_expansion.method": "magic"},
    {"backend.requested": "milvus:../outside.db"}, {"backend.requested": "milvus:/tmp/outside.db"},
    {"backend.spec": "milvus:~/x.db"}, {"backend.requested": "nonsense"}, {"backend.requested": 5},
    {"dba": {"k": 0, "alpha": 3, "rows": None}}, {"dba": {"k": 2, "alpha": -1, "rows": None}},
    {"index": {"dir": "index.1", "rows": -1, "remove_seq": 0}}, {"index": {"dir": "index.1"}},
], ids=lambda c: json.dumps(c))
def test_hostile_values_give_a_clear_error(store_copy, change):
    _edit_config(store_copy, **change)
    with pytest.raises(StoreCorruptError) as e:
        Store.open(store_copy)
    assert "store.json" in str(e.value)


@pytest.mark.parametrize("text", ['{"format": "imret.store", "version": 1, "dim": NaN}', "[" * 100000,
                                  '{"format": "imret.store", "pad": "' + "x" * (5 << 20) + '"}', "\xff\xfe"])
def test_unparseable_store_json_gives_a_clear_error(store_copy, text):
    (store_copy / "store.json").write_bytes(text.encode("utf-8", "surrogateescape")
                                            if isinstance(text, str) else text)
    with pytest.raises(StoreCorruptError, match="store.json"):
        Store.open(store_copy)


def test_configure_refuses_a_milvus_file_outside_the_store(store_copy):
    with Store.open(store_copy, writable=True) as st:
        for spec in ("milvus:../x.db", "milvus:/tmp/x.db"):
            with pytest.raises(ValueError, match="inside the store"):
                st.configure(backend=spec)
        assert st.verify() == []


# --- item 2 and 11: hostile files handed to an add ----------------------------------------------


def test_add_skips_fifos_devices_directories_and_empty_files_without_hanging(store_copy, photos, tmp_path):
    """Run as a subprocess with a timeout: the old add blocked forever hashing a FIFO."""
    bad = tmp_path / "bad"
    bad.mkdir()
    os.mkfifo(bad / "x.jpg")
    os.symlink("/dev/zero", bad / "zero.jpg")
    (bad / "d.jpg").mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    names = ["x.jpg", "zero.jpg", "d.jpg", "empty.jpg"]
    code = ("import sys, json; from imret.index.store import Store\n"
            "with Store.open(sys.argv[1], writable=True) as st:\n"
            "    r = st.add(sys.argv[2:], workers=0)\n"
            "print(json.dumps({'added': r.added, 'skipped': r.skipped, 'duplicates': r.duplicates}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(store_copy), *(str(bad / n) for n in names), photos[0]],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    reasons = dict((os.path.basename(p), why) for p, why in r["skipped"])
    assert r["added"] == [] and len(r["duplicates"]) == 1
    assert "FIFO" in reasons["x.jpg"] and "device" in reasons["zero.jpg"]
    assert "directory" in reasons["d.jpg"] and reasons["empty.jpg"].startswith("empty file")


def test_many_empty_files_are_reported_as_empty_not_as_copies(store_copy, tmp_path):
    for i in range(40):
        (tmp_path / f"e{i}.jpg").write_bytes(b"")
    with Store.open(store_copy, writable=True) as st:
        r = st.add([tmp_path / f"e{i}.jpg" for i in range(40)], **FAST)
    assert r.added == [] and r.duplicates == []
    assert len(r.skipped) == 40 and all(why.startswith("empty file") for _, why in r.skipped)


# --- item 4: damaged rows never give silent results ---------------------------------------------


def _swap_rows(f: Path, width: int, a: int, b: int) -> None:
    x = np.fromfile(f, dtype=np.float32).reshape(-1, width)
    x[[a, b]] = x[[b, a]]
    x.tofile(f)


def _zero_row(f: Path, width: int, a: int) -> None:
    x = np.fromfile(f, dtype=np.float32).reshape(-1, width)
    x[a] = 0
    x.tofile(f)


@pytest.mark.parametrize("damage", ["swap", "zero"])
def test_damaged_descriptors_fail_searches_naming_the_file(store_copy, photos, damage):
    f = store_copy / "descriptors.f32"
    _swap_rows(f, D, 2, 3) if damage == "swap" else _zero_row(f, D, 3)
    with Store.open(store_copy) as st:
        for search in (lambda: st.search([photos[2]], k=3, **FAST), lambda: st.search_ids([0], k=3),
                       lambda: st.search_vectors(np.ones((1, D), np.float32), k=3)):
            with pytest.raises(StoreCorruptError, match="descriptors.f32 is damaged") as e:
                search()
            assert "3" in str(e.value)
        problems = st.verify()
    assert any("image 3" in p for p in problems)


def test_search_ids_checks_the_rows_it_reads(store_copy):
    _zero_row(store_copy / "descriptors.f32", D, 5)
    with Store.open(store_copy) as st:
        with pytest.raises(StoreCorruptError, match="ids \\[5\\]"):
            st.search_ids([5], k=3)


@pytest.mark.parametrize("damage", ["swap", "zero"])
def test_damaged_vectors_fail_approximate_searches_too(ann_copy, damage):
    cfg = json.loads((ann_copy / "store.json").read_text())
    f = ann_copy / cfg["vectors"]
    _swap_rows(f, 16, 2, 3) if damage == "swap" else _zero_row(f, 16, 3)
    with Store.open(ann_copy) as st:
        q = np.asarray(st.descriptors()[[3]])
        with pytest.raises(StoreCorruptError, match=f"{cfg['vectors']} is damaged"):
            st.search_vectors(q, k=5)  # FAISS candidates are re-scored with the stored rows
        assert any("post-processed vector of image 3" in p for p in st.verify())


def test_vectors_checksums_follow_adds_and_survive_reopening(ann_copy, photos, tmp_path):
    extra = tmp_path / "extra.jpg"
    from PIL import Image

    Image.new("RGB", (90, 70), (200, 10, 30)).save(extra)
    with Store.open(ann_copy, writable=True) as st:
        assert st.add([extra], **FAST).added == [len(photos)]
        assert st.verify() == []
    with Store.open(ann_copy) as st:
        assert st.search_ids([len(photos)], k=1)[1][0, 0] == len(photos)
        assert st.verify() == []


def test_vector_checksums_are_mapped_once_and_follow_adds(ann_copy, photos, tmp_path, monkeypatch):
    """Approximate searches map the checksum file once, not once per search; after an add it
    is mapped again, so the new rows are checked (a damaged new row is caught, a sound one is
    not mistaken for damage)."""
    from PIL import Image

    import imret.index.store as store_module

    maps = []
    real = store_module._map_checksums
    monkeypatch.setattr(store_module, "_map_checksums", lambda f, n: maps.append(n) or real(f, n))
    n = len(photos)
    extra = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    Image.new("RGB", (90, 70), (200, 10, 30)).save(extra[0])
    Image.new("RGB", (90, 70), (10, 30, 200)).save(extra[1])
    with Store.open(ann_copy, writable=True) as st:
        q = np.asarray(st.descriptors()[[3]])
        st.search_vectors(q, k=3)  # re-scores (and checks) 3 rows ...
        st.search_vectors(q, k=n)  # ... then all of them: the rest are checked with the same map
        assert maps == [n]
        assert st.add(extra, **FAST).added == [n, n + 1]
        vectors = ann_copy / st._config["vectors"]
        _zero_row(vectors, 16, n + 1)
        assert st.search_ids([n], k=1)[1][0, 0] == n  # row n: checked against the appended checksums
        assert maps == [n, n + 2]
        with pytest.raises(StoreCorruptError, match=rf"{vectors.name} is damaged.*ids \[{n + 1}\]"):
            st.search_vectors(np.asarray(st.descriptors()[[n + 1]]), k=1)


def test_a_store_without_vector_checksums_gets_them_from_its_writer(ann_copy):
    cfg = json.loads((ann_copy / "store.json").read_text())
    side = ann_copy / cfg["vectors"].replace(".f32", ".crc32")
    good = side.read_bytes()
    side.unlink()
    with Store.open(ann_copy) as st:  # a reader of an older store: no checksums to check, no error
        st.search_ids([0], k=3)
    with Store.open(ann_copy, writable=True) as st:
        assert st.verify() == []
    assert side.read_bytes() == good


# --- item 9: full disks and damaged databases ----------------------------------------------------


def _fail_with_enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_add_on_a_full_disk_says_so_and_leaves_the_store_intact(store_copy, tmp_path, monkeypatch, capsys):
    from PIL import Image

    new = tmp_path / "new.jpg"
    Image.new("RGB", (90, 70), (10, 200, 30)).save(new)
    with Store.open(store_copy) as st:
        n, before = len(st), st.search_ids([1], k=5)
    monkeypatch.setattr(os, "pwrite", _fail_with_enospc)
    assert main(["index", "add", str(store_copy), str(new), "--no-progress", "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "intact" in err and f"{n} images" in err and "Traceback" not in err
    monkeypatch.undo()
    with Store.open(store_copy, writable=True) as st:
        assert len(st) == n and st.verify() == []
        after = st.search_ids([1], k=5)
        assert np.array_equal(before[1], after[1])
        assert st.add([new], **FAST).added == [n]  # and it works once there is space


@pytest.mark.skipif(not installed("faiss"), reason="faiss-cpu is not installed")
def test_configure_on_a_full_disk_keeps_the_committed_configuration(store_copy, monkeypatch, capsys):
    from imret.index.faiss_backend import FaissBackend

    committed = (store_copy / "store.json").read_bytes()
    monkeypatch.setattr(FaissBackend, "save", _fail_with_enospc)
    assert main(["index", "configure", str(store_copy), "--backend", "ann"]) == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "intact" in err and "Traceback" not in err
    monkeypatch.undo()
    assert (store_copy / "store.json").read_bytes() == committed
    assert not [p.name for p in store_copy.iterdir() if p.name.startswith((".", "index."))]
    with Store.open(store_copy) as st:
        assert st.verify() == [] and st.backend_spec == "exact"


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for block in (1 << 16, 512, 1):  # to the last byte
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_real_full_disk(tmp_path, tiny_model, photos, capsys):
    """A tmpfs filled to the last byte (root only; elsewhere the simulated tests above stand):
    while the store is open (the add's own writes fail), and before it is opened."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64m"):
        pytest.skip("needs root and tmpfs to make a real full disk")
    try:
        store = disk / "store"
        with Store.create(store, tiny_model, preprocessing=PRE) as st:
            st.add(photos[:5], **FAST)
            _fill(disk)
            with pytest.raises(StoreError, match="no space left") as e:
                st.add(photos[5:], commit_every=2, **FAST)
            assert "intact" in str(e.value) and "5 images" in str(e.value)
        capsys.readouterr()
        rc = main(["index", "add", str(store), *photos[5:], "--no-progress", "--workers", "0"])
        err = capsys.readouterr().err
        assert rc == 1 and "no space left" in err and "Traceback" not in err, err
        (disk / "filler").unlink()
        with Store.open(store, writable=True) as st:
            assert len(st) == 5 and st.verify() == []
            assert len(st.add(photos[5:], **FAST).added) == len(photos) - 5
            assert st.verify() == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_damaged_sqlite_page_gives_a_clear_error(store_copy, capsys):
    db = store_copy / "meta.sqlite"
    with sqlite3.connect(db) as c:
        root = c.execute("SELECT rootpage FROM sqlite_master WHERE name = 'images'").fetchone()[0]
        page = c.execute("PRAGMA page_size").fetchone()[0]
    with open(db, "r+b") as f:
        f.seek((root - 1) * page)
        f.write(bytes([0x0D]) + os.urandom(page - 1))  # a leaf-page flag, then garbage
    capsys.readouterr()
    for argv in (["index", "info", str(store_copy)], ["index", "add", str(store_copy), str(db)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "meta.sqlite" in err and "damaged" in err and "Traceback" not in err, err
    with pytest.raises(StoreCorruptError, match="meta.sqlite is damaged"):
        with Store.open(store_copy) as st:
            st.search_ids([0], k=3)


# --- item 11: approximate indexes fill k ----------------------------------------------------------


@pytest.mark.skipif(not installed("faiss"), reason="faiss-cpu is not installed")
def test_hnsw_after_removals_returns_k_results_whenever_k_fits(tmp_path, tiny_model, make_photos):
    """HNSW misses rows when k nears the number of images (more so with tombstones): up to 18 of
    60 were missing. A search must return min(k, live) results."""
    files = make_photos(n_classes=8, per_class=10, size=(96, 80))
    with Store.create(tmp_path / "s", tiny_model, preprocessing=PRE, backend="faiss:HNSW32?efSearch=16") as st:
        st.add(files, **FAST)
        st.remove(list(range(0, 80, 4)))
        live = len(st)
        queries = list(range(1, 80, 4))
        for k in (10, 55, 60, 70):
            scores, ids = st.search_ids(queries, k=k)
            assert ((ids >= 0).sum(axis=1) == min(k, live)).all(), k
            assert not np.isin(ids, np.arange(0, 80, 4)).any()
            assert (np.diff(scores[:, : min(k, live)], axis=1) <= 1e-6).all()
