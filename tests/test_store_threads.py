"""One Store shared by threads: searches while another thread adds and removes, extraction
outside the lock, lazy loading done once, and the same end state as doing it all in order."""

import threading
import time

import numpy as np
import pytest

from conftest import installed

import imret.index.store as store_module
import imret.models.factory
from imret.index.exact import exact_search
from imret.index.store import Preprocessing, Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRE = Preprocessing(image_size=64)
FAST = dict(workers=0)
N0 = 8  # images in the store before the threads start


@pytest.fixture(scope="module")
def photos(make_photos):
    return make_photos(n_classes=4, per_class=6, size=(96, 72))


def _writes(photos):
    """The writer's operations, in order: adds only until the first removal."""
    return [
        ("add", photos[8:12]),
        ("add", photos[12:16]),
        ("add", photos[16:19]),
        ("remove", [1, 9]),
        ("add", photos[19:22] + [photos[1]]),  # photos[1] again: a new id for its content
        ("remove_paths", [photos[13]]),
        ("add", photos[22:]),
    ]


def _apply(st, op, arg):
    if op == "add":
        return st.add(arg, commit_every=2, **FAST)
    return getattr(st, op)(arg)


def _backends():
    out = ["exact"]
    if installed("faiss"):
        out.append("faiss:HNSW8")
    if installed("pymilvus", "milvus_lite"):
        out.append("milvus:./vectors.db?index=FLAT")
    return out


@pytest.mark.parametrize("backend", _backends())
def test_searches_during_adds_and_removes(tmp_path, photos, tiny_model, backend):
    writes = _writes(photos)
    # the reference: the same operations, one after the other
    with Store.create(tmp_path / "ref", tiny_model, preprocessing=PRE, backend=backend) as ref:
        ref.add(photos[:N0], **FAST)
        for op, arg in writes:
            _apply(ref, op, arg)
        ref_records = {r.id: r for r in ref.records(range(ref.n_rows()))}
        ref_live = [r.id for r in ref.list(0, 1000)]
        ref_x = np.asarray(ref.descriptors()).copy()

    st = Store.create(tmp_path / "s", tiny_model, preprocessing=PRE, backend=backend)
    st.add(photos[:N0], **FAST)
    q = np.asarray(st.descriptors()).copy()  # queries: the first images' descriptors
    removing = threading.Event()  # set before the first removal starts
    writer_done = threading.Event()
    gone: list[int] = []  # ids whose removal has returned
    errors: list[BaseException] = []
    seen_ids: set[int] = set()
    seen_paths: dict[int, str] = {}
    counts: list[list[tuple[int, int, bool]]] = [[] for _ in range(4)]  # (len, n_rows, removing), per reader
    rounds = [0] * 4

    def writer():
        try:
            for op, arg in writes:
                if op != "add":
                    removing.set()
                _apply(st, op, arg)
                if op == "remove":
                    gone.extend(arg)
                elif op == "remove_paths":
                    gone.extend(i for i, r in ref_records.items() if r.path in arg and i not in ref_live)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            writer_done.set()

    def check_hits(hits, dead):
        for row in hits:
            for h in row:
                assert h.id not in dead, f"id {h.id} returned after its removal"
                assert h.path, f"id {h.id} without a path"
                seen_ids.add(h.id)
                seen_paths[h.id] = h.path

    def reader(r):
        try:
            j = 0
            while not writer_done.is_set() or rounds[r] < 3:
                dead = set(gone)
                c, n = len(st), st.n_rows()
                counts[r].append((c, n, removing.is_set()))
                if r < 2:  # by image
                    check_hits(st.search([photos[j % N0]], k=5, **FAST), dead)
                elif r == 2:  # by vector, then hits
                    s, i = st.search_vectors(q[j % N0:j % N0 + 2], 5)
                    assert ((i >= 0).sum(axis=1) == 5).all() and (np.diff(s, axis=1) <= 1e-6).all()
                    check_hits(st.hits(s, i), dead)
                else:  # by stored image, and the listing calls
                    s, i = st.search_ids([0, 2 + j % 6], k=5)
                    assert i[0, 0] == 0  # an image finds itself first
                    check_hits(st.hits(s, i), dead)
                    page = st.list(0, 1000)
                    ids = [p.id for p in page]
                    assert ids == sorted(ids) and not set(ids) & dead
                    assert st.records(ids[:3])[0].path == page[0].path
                    info = st.info()
                    assert info["images"] >= 0 and info["backend"]["ntotal"] >= 0
                j += 1
                rounds[r] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(r,)) for r in range(4)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not any(t.is_alive() for t in threads), "a thread hangs"
        if errors:
            raise errors[0]
        assert min(rounds) >= 3
        # readers saw the store grow one committed batch at a time, never shrink while adding
        for seq in counts:
            growing = [c for c, _, rm in seq if not rm]
            assert growing == sorted(growing), growing
            rows = [n for _, n, _ in seq]
            assert rows == sorted(rows)
            assert all(N0 <= n <= len(ref_records) and 0 < c <= n for c, n, _ in seq)
        assert max(c for seq in counts for c, _, rm in seq if not rm) > N0  # some reads saw adds
        # every hit was a committed image, with its path
        assert seen_ids <= set(ref_records)
        assert all(ref_records[i].path == p for i, p in seen_paths.items())
        # the end state is the sequential one
        assert st.n_rows() == len(ref_records)
        assert [r.id for r in st.list(0, 1000)] == ref_live
        got = {r.id: r for r in st.records(range(st.n_rows()))}
        assert {i: (r.path, r.sha256) for i, r in got.items()} == {
            i: (r.path, r.sha256) for i, r in ref_records.items()}
        np.testing.assert_allclose(np.asarray(st.descriptors()), ref_x, atol=1e-5)
        assert st.verify() == []
        x = np.asarray(st.descriptors())
        alive = np.isin(np.arange(len(x)), ref_live)
        np.testing.assert_array_equal(st.search_vectors(x, 4)[1], exact_search(x, x, 4, alive=alive)[1])
    finally:
        st.close()


def test_searches_are_answered_while_an_add_extracts(tmp_path, photos, tiny_model, monkeypatch):
    st = Store.create(tmp_path / "s", tiny_model, preprocessing=PRE)
    st.add(photos[:6], **FAST)
    x = np.asarray(st.descriptors()).copy()
    entered, release = threading.Event(), threading.Event()
    adder: list[int] = []
    real = st._extract

    def blocking_extract(paths, bboxes=None, **kw):
        if threading.get_ident() in adder:  # only the adding thread waits
            entered.set()
            assert release.wait(60)
        return real(paths, bboxes, **kw)

    monkeypatch.setattr(st, "_extract", blocking_extract)
    report = []

    def add():
        adder.append(threading.get_ident())
        report.append(st.add(photos[6:10], **FAST))

    writer = threading.Thread(target=add)
    writer.start()
    try:
        assert entered.wait(60)
        # the add is inside extraction now, holding the write lock but not the read lock
        assert st._lock.acquire(blocking=False)
        st._lock.release()
        done = {}

        def read():
            done["hits"] = st.search([photos[0]], k=3, **FAST)
            done["vectors"] = st.search_vectors(x[:2], 3)
            done["ids"] = st.search_ids([4], k=3)
            done["len"], done["list"], done["info"] = len(st), st.list(), st.info()

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(30)
        assert not reader.is_alive(), "searching waited for an add's extraction"
        assert done["hits"][0][0].id == 0
        assert done["vectors"][1][:, 0].tolist() == [0, 1] and done["ids"][1][0, 0] == 4
        assert done["len"] == 6 and len(done["list"]) == 6 and done["info"]["images"] == 6
        assert writer.is_alive()  # still blocked: nothing of it is visible yet
    finally:
        release.set()
        writer.join(60)
    assert report and report[0].added == [6, 7, 8, 9]
    assert len(st) == 10 and st.search([photos[8]], k=1, **FAST)[0][0].id == 8
    st.close()


def test_search_ids(tmp_path, photos, tiny_model):
    with Store.create(tmp_path / "s", tiny_model, preprocessing=PRE) as st:
        st.add(photos[:6], **FAST)
        x = np.asarray(st.descriptors()).copy()
        s, i = st.search_ids([3, 0, 3], k=4)
        s_ref, i_ref = st.search_vectors(x[[3, 0, 3]], 4)
        np.testing.assert_array_equal(i, i_ref)
        np.testing.assert_array_equal(s, s_ref)
        assert i[:, 0].tolist() == [3, 0, 3]
        assert st.search_ids([], k=2)[1].shape == (0, 2)
        st.remove([2])
        with pytest.raises(KeyError, match="image id 2 was removed"):
            st.search_ids([1, 2])
        with pytest.raises(KeyError, match="unknown image id 99"):
            st.search_ids([99])
        with pytest.raises(TypeError, match="integers"):
            st.search_ids([1.5])
        with pytest.raises(ValueError, match="k must be"):
            st.search_ids([1], k=0)


def test_concurrent_first_use_loads_model_and_backend_once(tmp_path, photos, tiny_model, monkeypatch):
    backend = "faiss:HNSW8" if installed("faiss") else "exact"
    path = tmp_path / "s"
    with Store.create(path, tiny_model, preprocessing=PRE, backend=backend) as st:
        st.add(photos[:6], **FAST)
        x = np.asarray(st.descriptors()).copy()
    loads = {"model": 0, "backend": 0}
    real_model, real_backend = imret.models.factory.load_model, store_module.load_backend

    def slow(kind, real):
        def load(*a, **kw):
            loads[kind] += 1
            time.sleep(0.3)  # a wide window for a second thread to come in
            return real(*a, **kw)
        return load

    monkeypatch.setattr(imret.models.factory, "load_model", slow("model", real_model))
    monkeypatch.setattr(store_module, "load_backend", slow("backend", real_backend))
    with Store.open(path) as st:
        start = threading.Barrier(4)
        models, results, errors = [], [], []

        def use(r):
            try:
                start.wait()
                if r % 2:
                    models.append(st.model)
                else:
                    by_image = st.search(photos[:2], k=3, **FAST)
                    results.append((st.search_vectors(x, 3)[1], np.array([[h.id for h in row] for row in by_image])))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=use, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        assert loads["model"] == 1 and all(m is models[0] for m in models) and len(models) == 2
        assert loads["backend"] == (1 if backend != "exact" else 0)
        expect = exact_search(x, x, 3)[1]
        assert len(results) == 2
        for by_vector, by_image in results:
            np.testing.assert_array_equal(by_vector, expect)
            np.testing.assert_array_equal(by_image, expect[:2])
