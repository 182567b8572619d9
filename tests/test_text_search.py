"""Text queries (issue 14): the Retriever and the store rank by θ(t)·φ, equal to brute force;
post-processing and re-rankers that cannot serve a text are refused; the store keeps a caption
model as untrusted input (wrong dimension, garbage, an image model, a symlink out of the store,
a tampered file or store.json refused with clear errors)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import installed

pytestmark = [pytest.mark.skipif(not installed("sklearn", "nltk"), reason="the text extra (scikit-learn, nltk) "
                                                                          "is not installed"),
              pytest.mark.usefixtures("one_torch_thread")]

from imret.expansion import QueryExpansion  # noqa: E402
from imret.index.store import Store, StoreCorruptError  # noqa: E402
from imret.retrieval import Retriever, needs_query_image  # noqa: E402
from imret.text import CaptionEncoder  # noqa: E402
from imret.text.queries import NoKnownWordError, check_text_queries, load_text_model, text_card  # noqa: E402
from imret.whitening import fit_pca_whitening  # noqa: E402

NAMES = ["red dog", "blue cat", "green bird", "yellow car"]
QUERIES = ["a red dog", "the blue cat sleeping", "green bird and a yellow car", "yellow car"]


def object_of(path) -> int:
    """The generated photo's object (its folder ``object_00c``)."""
    return int(Path(path).parent.name.split("_")[1])


def captions_of(paths) -> list[list[str]]:
    """Two generated captions per photo, naming its object."""
    return [[f"a {NAMES[object_of(p)]} in the park", f"the {NAMES[object_of(p)]} seen from afar"] for p in paths]


def joint_text_model(paths, descriptors) -> CaptionEncoder:
    """A caption encoder whose projection is fitted by ridge regression so that a photo's
    captions embed near its descriptor: W = Φᵀ T (TᵀT + λI)⁻¹ (a stand-in for a trained joint model)."""
    caps = captions_of(paths)
    flat = [c for cs in caps for c in cs]
    enc = CaptionEncoder(dim=int(descriptors.shape[1])).fit(flat)
    t = enc.transform(flat).toarray()
    phi = np.repeat(np.asarray(descriptors, np.float64), [len(c) for c in caps], axis=0)
    w = phi.T @ t @ np.linalg.inv(t.T @ t + 1e-2 * np.eye(t.shape[1]))
    with torch.no_grad():
        enc.proj.weight.copy_(torch.from_numpy(w).float())
    return enc


def brute_force(theta, phi):
    """Scores ``θ·φ`` (Q, N) and each query's ranking, best first (ties by lower row)."""
    s = np.asarray(theta, np.float64) @ np.asarray(phi, np.float64).T
    return s, np.argsort(-s, axis=1, kind="stable")


def assert_same_ranking(scores, ids, ref_scores, ref_order, k):
    """``(scores, ids)`` equal the brute-force top k (scores to float32 rounding; a swap only
    between scores equal to that rounding)."""
    for q in range(ids.shape[0]):
        want = ref_scores[q, ref_order[q, :k]]
        np.testing.assert_allclose(scores[q], want, atol=1e-5)
        np.testing.assert_allclose(ref_scores[q, ids[q]], want, atol=1e-5)  # a tie may swap, never a real miss
        assert len(set(ids[q].tolist())) == k


@pytest.fixture(scope="module")
def db(small_store):
    with Store.open(small_store) as st:
        recs = st.list(0, 1000)
        phi = np.asarray(st.descriptors(), np.float32)[[r.id for r in recs]]
    return [r.path for r in recs], np.array([r.id for r in recs]), phi


@pytest.fixture(scope="module")
def text_model(db):
    paths, _, phi = db
    return joint_text_model(paths, phi)


@pytest.fixture
def text_file(text_model, tmp_path):
    p = tmp_path / "text.safetensors"
    text_model.save(p)
    return p


# --- the Retriever ----------------------------------------------------------------------------------


def test_retriever_text_search_equals_brute_force(db, text_model):
    paths, ids, phi = db
    r = Retriever(text_encoder=text_model).index(phi, ids)
    res = r.search(text=QUERIES, k=len(ids))
    theta = text_model.encode_text(QUERIES)
    s, order = brute_force(theta, phi)
    assert_same_ranking(res.scores, np.searchsorted(ids, res.ids), s, order, len(ids))
    one = r.search(text=QUERIES[0], k=5)  # one string is one query
    assert one.ids.shape == (1, 5) and np.array_equal(one.ids[0], res.ids[0, :5])
    # the stand-in joint model finds the object named first
    for q, name in ((0, 0), (1, 1), (3, 3)):
        assert object_of(paths[int(np.searchsorted(ids, res.ids[q, 0]))]) == name


def test_retriever_text_equals_its_embedding_as_a_vector_query(db, text_model):
    """A text query is its embedding θ(t) searched like any descriptor: with query expansion and
    a descriptor re-ranker (sg) too."""
    from imret.refinement import TopMRefiner

    _, ids, phi = db
    r = Retriever(text_encoder=text_model, query_expansion=QueryExpansion("alpha", 3, 3.0)).index(phi, ids)
    sg = TopMRefiner(r.rows, m=8, k=3)
    theta = text_model.encode_text(QUERIES)
    got = r.search(text=QUERIES, k=6, rerankers=[sg])
    want = r.search(vectors=theta, k=6, rerankers=[sg])
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores)
    plain = r.search(text=QUERIES, k=6, query_expansion=QueryExpansion())
    assert not np.array_equal(plain.scores, got.scores)  # the expansion and the re-ranker did change something


def test_retriever_text_encoder_from_a_path(db, text_file):
    _, ids, phi = db
    r = Retriever(text_encoder=str(text_file)).index(phi, ids)
    s, order = brute_force(CaptionEncoder.load(text_file).encode_text(["red dog"]), phi)
    res = r.search(text="red dog", k=4)
    assert_same_ranking(res.scores, np.searchsorted(ids, res.ids), s, order, 4)


def test_retriever_refuses_whitening_and_dba_for_text(db, text_model):
    _, ids, phi = db
    w = fit_pca_whitening(phi, 8)
    r = Retriever(whitening=w, text_encoder=text_model).index(phi, ids)
    with pytest.raises(ValueError, match="whitening .*pca.*raw image descriptors"):
        r.search(text="red dog")
    r.search(vectors=phi[:1])  # images still search
    r = Retriever(dba=(2, 3.0), text_encoder=text_model).index(phi, ids)
    with pytest.raises(ValueError, match="alpha-DBA"):
        r.search(text="red dog")


def test_retriever_refuses_rerankers_that_need_pixels(db, text_model):
    class Verifier:  # a stage that looks at the query's pixels
        needs_query_image = True

        def rerank(self, x, scores, ids, images=None):
            return scores, ids

    _, ids, phi = db
    r = Retriever(text_encoder=text_model, rerankers=[Verifier()]).index(phi, ids)
    with pytest.raises(ValueError, match="pixels"):
        r.search(text="red dog")
    assert r.search(text="red dog", rerankers=[], k=3).ids.shape == (1, 3)
    assert needs_query_image("sift:10") and needs_query_image("aml") and not needs_query_image("sg:20")


def test_retriever_text_dimension_and_bad_queries(db, text_model):
    _, ids, phi = db
    small = CaptionEncoder(dim=16).fit([c for cs in captions_of(["x/object_000/a.jpg"] * 2) for c in cs])
    r = Retriever(text_encoder=small).index(phi, ids)
    with pytest.raises(ValueError, match="16-D.*512-D"):
        r.search(text="red dog")
    with pytest.raises(ValueError, match="no caption encoder"):
        Retriever().index(phi, ids).search(text="red dog")
    r = Retriever(text_encoder=text_model).index(phi, ids)
    with pytest.raises(NoKnownWordError, match="zebra"):
        r.search(text=["red dog", "zebra xylophone"])
    with pytest.raises(ValueError, match="blank"):
        r.search(text="   ")
    with pytest.raises(ValueError, match="2000 characters"):
        r.search(text="dog " * 500)
    with pytest.raises(TypeError, match="not a str"):
        r.search(text=["dog", 3])
    with pytest.raises(ValueError, match="text=... alone"):
        r.search(text="dog", vectors=phi[:1])


def test_check_text_queries_and_text_card():
    assert check_text_queries("a dog") == ["a dog"]
    with pytest.raises(ValueError, match="NUL"):
        check_text_queries(["a\x00b"])
    with pytest.raises(ValueError, match="limit is 3"):
        check_text_queries(["a", "b", "c", "d"], max_queries=3)
    with pytest.raises(TypeError):
        check_text_queries(b"bytes")
    img = text_card("a dog catching a frisbee " * 20, 128)
    assert img.size == (128, 128) and img.mode == "RGB"
    assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 2  # text was drawn on the background


# --- the store ---------------------------------------------------------------------------------------


def test_store_round_trip_with_a_text_model(small_store, copy_store, text_model, db, text_file):
    _, ids, phi = db
    path = copy_store(small_store)
    with Store.open(path, writable=True) as st:
        assert st.text_model is None and st.info()["text"] is None
        st.set_text_model(text_file)
        first = st._config["text"]["file"]
        st.set_text_model(text_file)  # again: a new file, the old one removed
        second = st._config["text"]["file"]
        assert first != second and not (path / first).exists() and (path / second).is_file()
    with Store.open(path, writable=True):  # a writable open keeps the file (not a leftover)
        pass
    assert (path / second).is_file()
    with Store.open(path) as st:
        info = st.info()["text"]
        assert info["dim"] == 512 and info["terms"] == text_model.num_terms and info["searchable"]
        assert info["source"] == os.path.abspath(text_file)
        loaded = st.text_model
        assert loaded.vocabulary == text_model.vocabulary
        assert torch.equal(loaded.proj.weight, text_model.proj.weight)
        res = st.search(text=QUERIES, k=len(ids))
        one = st.search(text="red dog", k=3)
        live = np.asarray(st.descriptors(), np.float32)
    theta = text_model.encode_text(QUERIES)
    s, order = brute_force(theta, live)
    for q, hits in enumerate(res):
        assert hits.query == QUERIES[q] and hits.error is None and hits.image.size == (256, 256)
        got_ids = np.array([h.id for h in hits])
        assert_same_ranking(np.array([[h.score for h in hits]]), got_ids[None], s[q:q + 1], order[q:q + 1], len(ids))
        assert all(h.path == paths_by_id(path)[h.id] for h in hits)
    assert [h.id for h in one] == [h.id for h in res[0][:3]]
    with Store.open(path, writable=True) as st:
        st.set_text_model(None)
        assert st.text_model is None
    assert not (path / second).exists()


def paths_by_id(path) -> dict:
    with Store.open(path) as st:
        return {r.id: r.path for r in st.list(0, 1000)}


def test_store_text_search_unknown_words_and_refusals(small_store, copy_store, text_model):
    path = copy_store(small_store)
    with Store.open(path, writable=True) as st:
        with pytest.raises(ValueError, match="no caption model.*--text-model"):
            st.search(text="red dog")
        st.set_text_model(text_model, source="test")
        res = st.search(text=["red dog", "zebra"], k=3, on_error="skip")
        assert len(res[0]) == 3 and res[1].error and "vocabulary" in res[1].error and len(res[1]) == 0
        with pytest.raises(NoKnownWordError):
            st.search(text="zebra")
        with pytest.raises(ValueError, match="pixels"):
            st.search(text="red dog", rerank="aml:5")
        with pytest.raises(ValueError, match="not both"):
            st.search(st.list(0, 1)[0].path, text="red dog")
        # the store's own re-rankers that need pixels are left out for text; sg stays
        st.configure(rerank=["aml:5", "sg:12"])
        got = st.search(text="red dog", k=4)
        want = st.search(text="red dog", k=4, rerank=["sg:12"])
        assert [h.id for h in got] == [h.id for h in want]
        st.configure(rerank=[])
        raw = np.asarray(st.descriptors(), np.float32)
        st.configure(whitening=fit_pca_whitening(raw, 16))
        assert st.info()["text"]["searchable"] is False
        with pytest.raises(ValueError, match="whitening.*--whiten none"):
            st.search(text="red dog")
        st.configure(whitening=None, dba=(2, 3.0))
        with pytest.raises(ValueError, match="alpha-DBA"):
            st.search(text="red dog")


def test_store_text_model_with_another_model_for_one_search(small_store, copy_store, text_model):
    other = CaptionEncoder(dim=512).fit(["a red dog", "a red dog runs", "a cat", "a cat sits"])
    path = copy_store(small_store)
    with Store.open(path, writable=True) as st:
        st.set_text_model(text_model)
        got = st.search(text="red dog", k=5, text_model=other)
        raw = np.asarray(st.descriptors(), np.float32)
    s, order = brute_force(other.encode_text(["red dog"]), raw)
    assert [h.id for h in got] == order[0, :5].tolist()


# --- hostile caption model files ---------------------------------------------------------------------


def test_set_text_model_refuses_bad_files(small_store, copy_store, tmp_path, tiny_model):
    from imret.models.checkpoints import save_model

    path = copy_store(small_store)
    wrong_dim = tmp_path / "wrong.safetensors"
    CaptionEncoder(dim=64).fit(["a dog", "a dog runs", "a cat", "a cat sits"]).save(wrong_dim)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    image_model = tmp_path / "model.safetensors"
    save_model(tiny_model, image_model)
    def files():
        return sorted(p.name for p in path.iterdir() if not p.name.startswith(("meta.sqlite-", "lock")))

    before = files()
    with Store.open(path, writable=True) as st:
        with pytest.raises(ValueError, match="64-D.*512-D"):
            st.set_text_model(wrong_dim)
        with pytest.raises(ValueError, match="not a readable safetensors"):
            st.set_text_model(garbage)
        with pytest.raises(ValueError, match="image model"):
            st.set_text_model(image_model)
        with pytest.raises(FileNotFoundError, match="not found"):
            st.set_text_model(tmp_path / "missing.safetensors")
        with pytest.raises(ValueError, match="not a regular file"):
            st.set_text_model(tmp_path)
        with pytest.raises(TypeError, match="CaptionEncoder"):
            st.set_text_model(object())
        assert st.text_model is None
    assert files() == before  # nothing written


def _with_text(small_store, copy_store, text_model) -> tuple[Path, str]:
    path = copy_store(small_store)
    with Store.open(path, writable=True) as st:
        st.set_text_model(text_model)
        return path, st._config["text"]["file"]


def test_text_model_file_symlinked_out_of_the_store_is_refused(small_store, copy_store, text_model, tmp_path):
    path, name = _with_text(small_store, copy_store, text_model)
    outside = tmp_path / "outside.safetensors"
    shutil.move(path / name, outside)
    os.symlink(outside, path / name)
    with Store.open(path) as st:
        with pytest.raises(StoreCorruptError, match="outside the store"):
            st.search(text="red dog")


def test_tampered_text_model_file_is_refused(small_store, copy_store, text_model):
    path, name = _with_text(small_store, copy_store, text_model)
    data = bytearray((path / name).read_bytes())
    data[-3] ^= 0xFF
    (path / name).write_bytes(bytes(data))
    with Store.open(path) as st:
        with pytest.raises(StoreCorruptError, match="checksum"):
            st.text_model
    (path / name).unlink()
    with Store.open(path) as st:
        with pytest.raises(StoreCorruptError, match="missing"):
            st.search(text="red dog")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(file="../text.1.safetensors"), "text.file"),
    (lambda t: t.update(file="model.safetensors"), "text.file"),
    (lambda t: t.update(dim=64), "text.dim is 64"),
    (lambda t: t.update(sha256="abc"), "text.sha256"),
    (lambda t: t.update(terms=-1), "text.terms"),
    (lambda t: t.update(extra=1), "unknown keys"),
    (lambda t: t.pop("source"), "missing keys"),
])
def test_hostile_text_entry_in_store_json_is_refused(small_store, copy_store, text_model, change, message):
    path, _ = _with_text(small_store, copy_store, text_model)
    cfg = json.loads((path / "store.json").read_text())
    change(cfg["text"])
    (path / "store.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreCorruptError, match=message):
        Store.open(path)


def test_text_model_of_a_valid_checksum_but_wrong_content_is_refused(small_store, copy_store, text_model, tmp_path):
    """A store.json whose checksum matches a file that is no caption model (someone wrote both):
    refused when loaded, not used."""
    from imret.index.store import _sha256_file

    path, name = _with_text(small_store, copy_store, text_model)
    CaptionEncoder(dim=64).fit(["a dog", "a dog runs", "a cat", "a cat sits"]).save(path / name)
    cfg = json.loads((path / "store.json").read_text())
    cfg["text"]["sha256"] = _sha256_file(path / name)[0]
    (path / "store.json").write_text(json.dumps(cfg))
    with Store.open(path) as st:
        with pytest.raises(StoreCorruptError, match="64-D"):
            st.search(text="red dog")


def test_load_text_model_size_limit(text_file):
    with pytest.raises(ValueError, match="limit"):
        load_text_model(text_file, max_bytes=100)
    assert load_text_model(text_file, dim=512).dim == 512


def test_verify_checks_the_text_model_file(small_store, copy_store, text_model):
    path, name = _with_text(small_store, copy_store, text_model)
    with Store.open(path) as st:
        assert st.verify() == []
    data = bytearray((path / name).read_bytes())
    data[-1] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with Store.open(path) as st:
        assert any("text model file" in p and "checksum" in p for p in st.verify())


def test_retriever_checks_the_caption_encoder_when_built(tiny_model, text_model, db):
    from imret.retrieval import Encoder

    small = CaptionEncoder(dim=16).fit(["a dog", "a dog runs", "a cat", "a cat sits"])
    with pytest.raises(ValueError, match="16-D, but the encoder's model is 512-D"):
        Retriever(encoder=Encoder(tiny_model), text_encoder=small)
    _, _, phi = db
    with pytest.raises(ValueError, match="16-D, but the whitening's input is 512-D"):
        Retriever(whitening=fit_pca_whitening(phi, 8), text_encoder=small)
    with pytest.raises(TypeError, match="CaptionEncoder"):
        Retriever(text_encoder=object())
    with pytest.raises(FileNotFoundError):
        Retriever(text_encoder="/nonexistent/text.safetensors")
    assert Retriever(encoder=Encoder(tiny_model), text_encoder=text_model).text_encoder is text_model
