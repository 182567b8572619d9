"""The one retrieval pipeline (imret.retrieval) against brute-force references, and against the store."""

import numpy as np
import pytest

from conftest import installed

from imret.expansion import QueryExpansion, alpha_database_augmentation, expand_with_neighbours
from imret.index.exact import ExactBackend
from imret.index.store import Preprocessing, Store
from imret.retrieval import Encoder, Retriever, SearchResult, expand_and_search, fill_short, rescore
from imret.whitening import fit_pca_whitening

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = unit(rng, 12, 32)
    db = centres[rng.integers(0, 12, 300)] + 0.4 * rng.standard_normal((300, 32)).astype(np.float32)
    q = centres[rng.integers(0, 12, 20)] + 0.4 * rng.standard_normal((20, 32)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return db, q


def reference(db, q, k, *, whitening=None, dba=None, qe=None):
    """The pipeline written out with plain matrix products."""
    v = db if whitening is None else whitening.apply(db)
    x = q if whitening is None else whitening.apply(q)
    if dba is not None:
        v = alpha_database_augmentation(v, dba[0], dba[1])
    s = x @ v.T
    if qe is not None and qe.method != "none":
        top = np.argsort(-s, axis=1, kind="stable")[:, : qe.k]
        x = expand_with_neighbours(x, v[top], np.take_along_axis(s, top, 1), qe.weight_alpha)
        s = x @ v.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("dba", [None, (3, 3.0)])
@pytest.mark.parametrize("qe", [QueryExpansion(), QueryExpansion("aqe", 2), QueryExpansion("alpha", 3, 3.0)])
def test_exact_pipeline_matches_the_reference(data, whiten, dba, qe):
    db, q = data
    w = fit_pca_whitening(db, dim=24) if whiten else None
    r = Retriever(whitening=w, dba=dba, query_expansion=qe).index(db)
    scores, ids = r.search(vectors=q, k=15)
    ref_s, ref_i = reference(db, q, 15, whitening=w, dba=dba, qe=qe)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == (20, 15)


def test_query_expansion_override_and_custom_ids(data):
    db, q = data
    ids = np.arange(300) * 7 + 5
    r = Retriever(query_expansion=QueryExpansion("alpha", 2, 3.0)).index(db, ids)
    plain = r.search(vectors=q, k=5, query_expansion=QueryExpansion())
    ref_s, ref_i = reference(db, q, 5)
    np.testing.assert_array_equal(plain.ids, ids[ref_i])
    expanded = r.search(vectors=q, k=5)
    _, ref_qe = reference(db, q, 5, qe=QueryExpansion("alpha", 2, 3.0))
    np.testing.assert_array_equal(expanded.ids, ids[ref_qe])


def test_k_beyond_the_database_is_padded(data):
    db, q = data
    r = Retriever().index(db[:4])
    scores, ids = r.search(vectors=q[:2], k=6)
    assert (ids[:, 4:] == -1).all() and np.isneginf(scores[:, 4:]).all() and (ids[:, :4] >= 0).all()


@pytest.mark.skipif(not installed("faiss"), reason="faiss-cpu is not installed")
def test_approximate_backend_is_rescored_and_filled(data):
    db, q = data
    r = Retriever(backend="faiss:HNSW8?efSearch=4").index(db)
    scores, ids = r.search(vectors=q, k=300)  # k = N: a small graph search misses rows; filled exactly
    assert (ids >= 0).all()
    assert all(len(set(row)) == 300 for row in ids.tolist())
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, ids, 1), atol=1e-5)  # exact cosines
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    s10, i10 = r.search(vectors=q, k=10)
    ref_s, _ = reference(db, q, 10)
    assert (s10[:, 0] <= ref_s[:, 0] + 1e-6).all()


def test_pure_steps():
    x = np.eye(3, dtype=np.float32)
    rows = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]], np.float32)
    ids = np.array([[1, 2, -1]])
    s, i = rescore(x[:1], np.zeros((1, 3), np.float32), ids, lambda j: np.where((j >= 0)[..., None], rows[j], 0))
    np.testing.assert_array_equal(i, [[2, 1, -1]])
    np.testing.assert_allclose(s, [[0.6, 0.0, -np.inf]])
    exact = ExactBackend.from_matrix(rows)
    s, i = fill_short(x[:1], 3, np.full((1, 3), -np.inf, np.float32), np.full((1, 3), -1), 3, lambda: exact)
    np.testing.assert_array_equal(i, [[0, 2, 1]])
    calls = []

    def search(q, k):
        calls.append(k)
        return exact.search(q, k)

    expand_and_search(x[:1], 1, search, lambda j: rows[j], QueryExpansion("aqe", 2), 3)
    assert calls == [1, 2, 1]  # first search, the top 2 for the expansion, the expanded search


def test_dense_scores_and_unpacking():
    r = SearchResult(np.array([[0.9, 0.5, -np.inf]], np.float32), np.array([[2, 0, -1]]))
    scores, ids = r
    assert ids is r.ids
    np.testing.assert_array_equal(r.dense(4), np.array([[0.5, -np.inf, 0.9, -np.inf]], np.float32))


def test_errors_name_the_problem(data):
    db, q = data
    with pytest.raises(ValueError, match="nothing indexed"):
        Retriever().search(vectors=q, k=3)
    r = Retriever().index(db)
    with pytest.raises(ValueError, match="give images=... or vectors="):
        r.search(k=3)
    with pytest.raises(ValueError, match="one image per row"):
        r.search(vectors=q[:2], images=["a.jpg"], k=3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        r.search(vectors=q, k=0)
    with pytest.raises(ValueError, match="no encoder"):
        r.search(images=["a.jpg"], k=3)
    with pytest.raises(ValueError, match="available"):
        Retriever(backend="nonsense")
    with pytest.raises(ValueError, match="dba"):
        Retriever(dba=(0, 3.0))
    with pytest.raises(TypeError, match="rerank"):
        Retriever(rerankers=[object()])
    with pytest.raises(ValueError, match="distinct"):
        Retriever().index(db[:3], [1, 1, 2])


class Reverse:
    """A toy re-ranker: reverses each query's candidates and records what it saw."""

    def __init__(self):
        self.seen = []

    def rerank(self, x, scores, ids, images=None):
        self.seen.append(images)
        return scores[:, ::-1].copy(), ids[:, ::-1].copy()


@pytest.fixture(scope="module")
def photos(make_photos):
    return make_photos(n_classes=4, per_class=4, size=(96, 80))


def test_images_rerankers_and_the_store_give_the_same_rankings(tmp_path, photos, tiny_model):
    """Retriever over images == Store over the same images and settings (whitening + αQE)."""
    pre = Preprocessing(image_size=64)
    enc = Encoder(tiny_model, image_size=64, workers=0)
    ex = enc.encode(photos)
    w = fit_pca_whitening(ex.descriptors, dim=8)
    qe = QueryExpansion("alpha", 2, 3.0)
    r = Retriever(encoder=enc, whitening=w, query_expansion=qe)
    r.index_images(photos)
    mine = r.search(images=photos[:3], bboxes=[None, (5, 5, 60, 50), None], k=6)
    with Store.create(tmp_path / "s", tiny_model, preprocessing=pre) as st:
        st.add(photos, workers=0)
        st.configure(whitening=w, query_expansion=qe)
        hits = st.search(photos[:3], bboxes=[None, (5, 5, 60, 50), None], k=6, workers=0)
    assert [[h.id for h in row] for row in hits] == mine.ids.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], mine.scores, atol=1e-5)
    rev = Reverse()
    r.rerankers = [rev]
    again = r.search(images=photos[:1], k=6)
    assert again.ids.tolist() == [mine.ids[0, ::-1].tolist()]
    assert rev.seen == [[(photos[0], None)]]


class _Reverse:
    """Reverses each row's top ``n`` and reports the reversed positions as an extra."""

    def __init__(self, n, name="flag"):
        self.n, self.name = n, name
        self.seen = None

    def rerank(self, x, scores, ids, images=None):
        self.seen = images
        ids = ids.copy()
        ids[:, :self.n] = ids[:, :self.n][:, ::-1]
        flag = np.full(ids.shape, -1, np.int32)
        flag[:, :self.n] = np.arange(self.n)[::-1]
        return scores, ids, {self.name: flag}


def test_rerankers_extras_follow_their_hits(data):
    db, q = data
    r = Retriever(rerankers=[_Reverse(3, "first"), _Reverse(2, "second")]).index(db)
    plain = Retriever().index(db).search(vectors=q, k=5)
    res = r.search(vectors=q, k=5)
    # first: [a b c d e] -> [c b a d e] (first = 2 1 0 -1 -1); second: -> [b c a d e]
    want = plain.ids[:, [1, 2, 0, 3, 4]]
    np.testing.assert_array_equal(res.ids, want)
    np.testing.assert_array_equal(res.extras["first"], np.tile([1, 2, 0, -1, -1], (len(q), 1)))
    np.testing.assert_array_equal(res.extras["second"], np.tile([1, 0, -1, -1, -1], (len(q), 1)))


def test_carry_extras_fills_hits_it_never_saw():
    from imret.retrieval import carry_extras

    old = np.array([[5, 3, -1]])
    new = np.array([[3, 7, 5]])
    ex = {"box": np.arange(12, dtype=np.float32).reshape(1, 3, 4), "n": np.array([[1, 2, -1]], np.int32)}
    got = carry_extras(ex, old, new)
    np.testing.assert_array_equal(got["box"][0, 0], [4, 5, 6, 7])
    assert np.isnan(got["box"][0, 1]).all()
    np.testing.assert_array_equal(got["box"][0, 2], [0, 1, 2, 3])
    np.testing.assert_array_equal(got["n"], [[2, -1, 1]])


def test_rerankers_get_the_images_given_with_vectors(data):
    db, q = data
    rr = _Reverse(1)
    r = Retriever(rerankers=[rr]).index(db)
    r.search(vectors=q[:2], images=["a.jpg", "b.jpg"], bboxes=[None, (0, 0, 4, 4)], k=3)
    assert rr.seen == [("a.jpg", None), ("b.jpg", (0, 0, 4, 4))]
    r.search(vectors=q[:2], k=3)
    assert rr.seen is None


def test_a_reranker_returning_the_wrong_shape_is_named(data):
    db, q = data

    class Bad:
        def rerank(self, x, scores, ids, images=None):
            return scores[:, :2], ids[:, :2]

    r = Retriever(rerankers=[Bad()]).index(db)
    with pytest.raises(ValueError, match="Bad"):
        r.search(vectors=q, k=4)


def test_rerankers_see_their_depth_whatever_k_is(data):
    db, q = data

    class Last:
        """Moves each row's last candidate (of its top_k) to the front."""

        top_k = 6

        def rerank(self, x, scores, ids, images=None):
            self.width = ids.shape[1]
            ids = np.concatenate([ids[:, 5:6], ids[:, :5], ids[:, 6:]], axis=1)
            return scores, ids, {"moved": np.where(np.arange(ids.shape[1]) == 0, 1, 0)[None].repeat(len(ids), 0)}

    rr = Last()
    res = Retriever(rerankers=[rr]).index(db).search(vectors=q, k=2)
    plain = Retriever().index(db).search(vectors=q, k=6)
    assert rr.width == 6 and res.ids.shape == (len(q), 2) and res.extras["moved"].shape == (len(q), 2)
    np.testing.assert_array_equal(res.ids, plain.ids[:, [5, 0]])
