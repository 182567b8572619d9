"""The persistent store: adding, deduplication, removal, reopening, errors, post-processing."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import installed

from imret.expansion import alpha_database_augmentation, alpha_query_expansion
from imret.index.exact import exact_search
from imret.index.store import (
    Preprocessing,
    QueryExpansion,
    Store,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreVersionError,
)
from imret.whitening import fit_pca_whitening

PRE = Preprocessing(image_size=96)
FAST = dict(workers=0)


@pytest.fixture(scope="module")
def photos(small_photos):
    return small_photos


@pytest.fixture(scope="module")
def built(small_store):
    """A store with all photos, closed; tests copy it before changing it."""
    return small_store


@pytest.fixture
def store_copy(copy_store, built):
    return copy_store(built)


def test_add_assigns_ids_in_order_and_dedupes_by_content(tmp_path, photos, tiny_model):
    with Store.create(tmp_path / "s", tiny_model, preprocessing=PRE) as st:
        r = st.add(photos[:7], commit_every=3, **FAST)
        assert r.added == list(range(7)) and not r.duplicates and not r.skipped
        copy = tmp_path / "copy.jpg"
        shutil.copy(photos[2], copy)
        r = st.add([photos[0], str(copy), *photos[7:9], photos[8]], **FAST)
        assert r.added == [7, 8]
        assert sorted(r.duplicates) == sorted([(photos[0], 0), (str(copy), 2), (photos[8], 8)])
        assert len(st) == 9 and st.n_rows() == 9
        rec = st.records([2])[0]
        assert rec.path == photos[2] and rec.size == os.path.getsize(photos[2]) and (rec.width, rec.height) == (160, 120)
        assert len(rec.sha256) == 64
        assert st.verify() == []


def test_unreadable_files_are_reported_not_indexed(tmp_path, photos, tiny_model):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with Store.create(tmp_path / "s", tiny_model, preprocessing=PRE) as st:
        r = st.add([photos[0], str(bad), str(tmp_path / "missing.jpg")], **FAST)
        assert r.added == [0]
        assert {p for p, _ in r.skipped} == {str(bad), str(tmp_path / "missing.jpg")}
        assert len(st) == 1


def test_search_matches_brute_force_over_descriptors(built, photos):
    with Store.open(built) as st:
        x = np.asarray(st.descriptors())
        assert x.shape == (len(photos), 512) and x.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, rtol=1e-5)
        hits = st.search([photos[3], photos[11]], k=5, **FAST)
        assert [h[0].id for h in hits] == [3, 11]  # an indexed image finds itself first
        assert hits[0][0].path == photos[3] and hits[0][0].score == pytest.approx(1, abs=1e-4)
        q = x[[3, 11]]
        s, i = exact_search(q, x, 5)
        s2, i2 = st.search_vectors(q, 5)
        np.testing.assert_array_equal(i2, i)
        np.testing.assert_allclose(s2, s, rtol=1e-6)
        # many queries at once, k larger than the store pads
        s3, i3 = st.search_vectors(x, 50)
        assert s3.shape == (len(photos), 50) and (i3[:, len(photos):] == -1).all()
        with pytest.raises(ValueError, match="k must be"):
            st.search_vectors(q, 0)


def test_query_crop_changes_the_descriptor(built, photos):
    with Store.open(built) as st:
        full = st.search([photos[0]], k=3, **FAST)[0]
        crop = st.search([photos[0]], bboxes=[(10, 10, 90, 80)], k=3, **FAST)[0]
        assert full[0].score > crop[0].score


def test_remove_hides_images_everywhere_and_survives_reopen(store_copy, photos):
    with Store.open(store_copy, writable=True) as st:
        assert st.remove([0, 5]) == 2
        assert st.remove([0]) == 0  # already removed
        with pytest.raises(KeyError, match="999"):
            st.remove([999])
        assert st.remove_paths([photos[6]]) == 1
        ids = st.search_vectors(np.asarray(st.descriptors()), 30)[1]
        assert not np.isin(ids, [0, 5, 6]).any()
        assert len(st) == len(photos) - 3
        # a removed image's content can be added again, under a new id
        r = st.add([photos[0]], **FAST)
        assert r.added == [len(photos)]
    with Store.open(store_copy) as st:
        assert len(st) == len(photos) - 2
        assert [h.id for h in st.search([photos[0]], k=1, **FAST)[0]] == [len(photos)]
        assert st.verify() == []


def test_read_only_and_lock(store_copy, photos):
    with Store.open(store_copy) as ro:
        with pytest.raises(StoreError, match="read-only"):
            ro.add(photos[:1])
    with Store.open(store_copy, writable=True):
        with pytest.raises(StoreLockedError):
            Store.open(store_copy, writable=True)
        with Store.open(store_copy) as reader:  # readers do not need the lock
            assert len(reader) == len(photos)
    with Store.open(store_copy, writable=True):  # the lock is released on close
        pass


def test_create_refuses_existing_directory(built, tmp_path, tiny_model):
    with pytest.raises(FileExistsError, match="already holds a store"):
        Store.create(built, tiny_model)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("hi")
    with pytest.raises(FileExistsError, match="not empty"):
        Store.create(tmp_path / "x", tiny_model)
    with pytest.raises(ValueError, match="unknown backend"):
        Store.create(tmp_path / "y", tiny_model, backend="annoy")


def _edit_config(path, **changes):
    cfg = json.loads((path / "store.json").read_text())
    cfg.update(changes)
    (path / "store.json").write_text(json.dumps(cfg))


def test_other_version_and_corrupt_files_give_clear_errors(store_copy, built, tmp_path):
    _edit_config(store_copy, version=99)
    with pytest.raises(StoreVersionError, match="format 99.*upgrade imret"):
        Store.open(store_copy)
    shutil.rmtree(store_copy)

    cases = {
        "garbage json": lambda p: (p / "store.json").write_text("{not json"),
        "no store.json": lambda p: (p / "store.json").unlink(),
        "truncated descriptors": lambda p: os.truncate(p / "descriptors.f32", 4 * 512 * 3),
        "sqlite garbage": lambda p: ((p / "meta.sqlite").write_bytes(b"\0" * 4096),
                                     [f.unlink() for f in p.glob("meta.sqlite-*")]),
        "model missing": lambda p: (p / "model.safetensors").unlink(),
    }
    for name, damage in cases.items():
        dst = tmp_path / name.replace(" ", "_")
        shutil.copytree(built, dst)
        damage(dst)
        with pytest.raises(StoreCorruptError):
            Store.open(dst)
    with pytest.raises(FileNotFoundError):
        Store.open(tmp_path / "nowhere")


def test_verify_detects_a_flipped_descriptor(store_copy):
    with open(store_copy / "descriptors.f32", "r+b") as f:
        f.seek(4 * 512 * 4 + 17)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with Store.open(store_copy) as st:
        problems = st.verify()
    assert any("image 4" in p for p in problems)


def test_interrupted_add_leftovers_are_cleaned_and_add_resumes(store_copy, photos):
    n = len(photos)
    # what a kill between writing rows and committing them leaves behind
    with open(store_copy / "descriptors.f32", "ab") as f:
        f.write(np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32).tobytes())
    (store_copy / ".index.7.tmp").mkdir()
    (store_copy / "vectors.9.f32").write_bytes(b"junk")
    with Store.open(store_copy) as reader:  # readers ignore uncommitted rows
        assert reader.n_rows() == n and reader.verify() == []
    with Store.open(store_copy, writable=True) as st:
        assert (store_copy / "descriptors.f32").stat().st_size == n * 512 * 4
        assert not (store_copy / ".index.7.tmp").exists() and not (store_copy / "vectors.9.f32").exists()
        r = st.add(photos, **FAST)
        assert r.added == [] and len(r.duplicates) == n


def test_whitening_qe_and_dba_follow_their_formulas(store_copy, photos):
    with Store.open(store_copy, writable=True) as st:
        raw = np.asarray(st.descriptors()).copy()
        w = fit_pca_whitening(raw, 16)
        st.configure(whitening=w)
        assert st.search_dim == 16
        vec = np.asarray(st.vectors())
        np.testing.assert_allclose(vec, w.apply(raw), atol=1e-6)
        q = raw[[1, 7]]
        s, i = st.search_vectors(q, 4)
        s_ref, i_ref = exact_search(w.apply(q), vec, 4)
        np.testing.assert_array_equal(i, i_ref)

        # alpha-QE with the store's neighbours == the brute-force formula
        qe = QueryExpansion("alpha", k=3, alpha=3.0)
        s, i = st.search_vectors(q, 4, query_expansion=qe)
        expanded = alpha_query_expansion(w.apply(q), vec, k=3, alpha=3.0)
        s_ref, i_ref = exact_search(expanded, vec, 4)
        np.testing.assert_array_equal(i, i_ref)
        np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-6)

        # alpha-DBA over the database, then saved QE parameters used by default
        st.configure(dba=(2, 3.0), query_expansion=QueryExpansion("aqe", k=2))
        np.testing.assert_allclose(np.asarray(st.vectors()), alpha_database_augmentation(w.apply(raw), 2, 3.0), atol=1e-5)
    with Store.open(store_copy) as st:  # everything persisted
        assert st.query_expansion == QueryExpansion("aqe", k=2)
        info = st.info()
        assert info["whitening"]["kind"] == "pca" and info["dba"]["k"] == 2 and info["search_dim"] == 16
        hits = st.search([photos[2]], k=3, **FAST)[0]
        assert hits[0].id == 2
    with Store.open(store_copy, writable=True) as st:
        st.configure(whitening=None, dba=None)
        assert st.search_dim == 512 and st._config["vectors"] is None
        assert not list(store_copy.glob("vectors.*")) and not list(store_copy.glob("whitening.*"))
        with pytest.raises(ValueError, match="whitening takes 16-D"):
            st.configure(whitening=fit_pca_whitening(np.random.default_rng(0).standard_normal((50, 16)), 8))


def test_tampered_whitening_is_detected(store_copy):
    with Store.open(store_copy, writable=True) as st:
        st.configure(whitening=fit_pca_whitening(np.asarray(st.descriptors()), 8))
    (f,) = store_copy.glob("whitening.*.npz")
    data = bytearray(f.read_bytes())
    data[-30] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="checksum"):
        Store.open(store_copy)


def test_a_reader_follows_a_writer_in_another_handle(tmp_path, photos, tiny_model):
    path = tmp_path / "s"
    with Store.create(path, tiny_model, preprocessing=PRE) as w:
        w.add(photos[:4], **FAST)
        with Store.open(path) as r:
            x = np.asarray(w.descriptors()).copy()
            assert r.search_vectors(x[:1], 10)[1][0, :4].tolist() == [0] + sorted(r.search_vectors(x[:1], 10)[1][0, 1:4].tolist(), key=lambda i: -float(x[0] @ x[i]))
            w.add(photos[4:8], **FAST)
            w.configure(whitening=fit_pca_whitening(np.asarray(w.descriptors()), 6))
            s, i = r.search_vectors(x[:1], 10)
            assert r.search_dim == 6 and (i[0] >= 0).sum() == 8
            w.remove([0])
            assert 0 not in r.search_vectors(x[:1], 10)[1][0]


def _approx_backends():
    out = ["faiss:IVF2,Flat?nprobe=2", "faiss:HNSW8"] if installed("faiss") else []
    if installed("pymilvus", "milvus_lite"):
        out.append("milvus:./vectors.db?index=FLAT")
    return out


@pytest.mark.parametrize("backend", _approx_backends())
def test_other_backends_agree_with_exact_through_the_store(copy_store, built, photos, backend):
    """Same results as exact search (these indexes are exhaustive at this size), across
    adds, removes and reopening; an IVF index searches exactly until it can be trained."""
    with Store.open(built) as ref:
        x = np.asarray(ref.descriptors()).copy()
    path = copy_store(built)
    with Store.open(path, writable=True) as st:
        st.remove([1])
        st.configure(backend=backend)
        info = st.info()
        if backend.startswith("faiss:IVF"):
            # 19 rows are fewer than IVF2 wants (39 per list): exact search until then
            assert info["backend"]["searching_with"].startswith("exact")
        else:
            assert info["backend"]["searching_with"] == info["backend"]["spec"]
        s, i = st.search_vectors(x, 5)
        alive = np.ones(len(x), bool)
        alive[1] = False
        s_ref, i_ref = exact_search(x, x, 5, alive=alive)
        np.testing.assert_array_equal(i, i_ref)
        np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-6)
        assert st.verify() == []
    with Store.open(path, writable=True) as st:
        assert st.remove([2]) == 1
        alive[2] = False
        s, i = st.search_vectors(x, 5)
        np.testing.assert_array_equal(i, exact_search(x, x, 5, alive=alive)[1])
        assert st.verify() == []
    with Store.open(path) as st:
        np.testing.assert_array_equal(st.search_vectors(x, 5)[1], exact_search(x, x, 5, alive=alive)[1])


def test_ivf_trains_once_enough_rows_exist(tmp_path, tiny_model, make_photos):
    pytest.importorskip("faiss")
    files = make_photos(n_classes=9, per_class=9, size=(64, 48), seed=3)
    with Store.create(tmp_path / "s", tiny_model, preprocessing=Preprocessing(image_size=48),
                      backend="faiss:IVF2,Flat?nprobe=2") as st:
        st.add(files[:40], **FAST)
        assert st.info()["backend"]["searching_with"].startswith("exact")
        st.add(files[40:], **FAST)  # 81 rows >= 39 * 2: the IVF is trained and used
        info = st.info()
        assert info["backend"]["searching_with"].startswith("faiss:IVF2,Flat") and info["backend"]["ntotal"] == 81
        x = np.asarray(st.descriptors()).copy()
        np.testing.assert_array_equal(st.search_vectors(x, 3)[1], exact_search(x, x, 3)[1])
