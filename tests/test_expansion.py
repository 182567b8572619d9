"""AQE / αQE / αDBA against per-query loop references written out in full."""

import numpy as np
import pytest

from imret.expansion import alpha_database_augmentation, alpha_query_expansion, average_query_expansion


def l2n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_expansion(q, db, k, alpha, exclude_self=False):
    """One query at a time: explicit sort, explicit weighted sum, in float64."""
    q = l2n(np.asarray(q, dtype=np.float64))
    db = l2n(np.asarray(db, dtype=np.float64))
    out = []
    for i, qi in enumerate(q):
        sims = [float(qi @ db[j]) for j in range(len(db))]
        order = sorted(range(len(db)), key=lambda j: -sims[j])
        if exclude_self:
            order = [j for j in order if j != i]
        v = qi.copy()  # the query itself, weight 1
        for j in order[:k]:
            v = v + max(sims[j], 0.0) ** alpha * db[j]
        out.append(v / np.linalg.norm(v))
    return np.array(out).reshape(q.shape)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    q = l2n(rng.standard_normal((9, 16))).astype(np.float32)
    db = l2n(rng.standard_normal((25, 16))).astype(np.float32)
    return q, db


@pytest.mark.parametrize("k", [1, 2, 5, 25])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_alpha_qe_matches_loop(data, k, alpha):
    q, db = data
    out = alpha_query_expansion(q, db, k, alpha)
    assert out.shape == q.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, reference_expansion(q, db, k, alpha), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 25])
def test_aqe_matches_loop_and_alpha_zero(data, k):
    q, db = data
    out = average_query_expansion(q, db, k)
    assert out.dtype == np.float32
    # AQE by its definition: the mean of the query and its top-k neighbours, re-normalised.
    expected = []
    for qi in q.astype(np.float64):
        top = np.argsort(-(db @ qi), kind="stable")[:k]
        expected.append(np.mean(np.vstack([qi, db[top]]), axis=0))
    np.testing.assert_allclose(out, l2n(np.array(expected)), atol=2e-6)
    np.testing.assert_array_equal(out, alpha_query_expansion(q, db, k, alpha=0.0))


def test_alpha_weights_ignore_negative_similarities(data):
    q, db = data
    # With k = N every database row is a neighbour; with alpha > 0 the negatively similar
    # ones get weight 0, so the result equals expansion with only the positive ones.
    out = alpha_query_expansion(q[:1], db, len(db), alpha=2.0)
    s = db @ q[0]
    manual = q[0] + ((s[s > 0] ** 2)[:, None] * db[s > 0]).sum(axis=0)
    np.testing.assert_allclose(out[0], manual / np.linalg.norm(manual), atol=2e-6)
    assert (s < 0).any()


@pytest.mark.parametrize("k", [1, 2, 7, 24])
@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_dba_matches_loop(data, k, alpha):
    _, db = data
    out = alpha_database_augmentation(db, k, alpha)
    assert out.shape == db.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, reference_expansion(db, db, k, alpha, exclude_self=True), atol=2e-6)


def test_dba_does_not_double_count_self():
    a, b = l2n(np.array([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1]])).astype(np.float32)
    out = alpha_database_augmentation(np.stack([a, b]), k=1, alpha=0.0)
    both = (a + b) / np.linalg.norm(a + b)  # itself once plus the other row
    np.testing.assert_allclose(out, np.stack([both, both]), atol=1e-6)
    # A duplicate at another index is a genuine neighbour; the row itself still is not.
    out = alpha_database_augmentation(np.stack([a, a, b]), k=1, alpha=3.0)
    np.testing.assert_allclose(out, np.stack([a, a, reference_expansion(b[None], [a], 1, 3.0)[0]]), atol=1e-6)


def test_k_zero_is_a_normalised_copy(data):
    q, db = data
    raw = 3.0 * q
    for out in (
        alpha_query_expansion(raw, db, 0),
        average_query_expansion(raw, db, 0),
        alpha_database_augmentation(raw, 0),
    ):
        assert out.dtype == np.float32 and out is not raw
        np.testing.assert_allclose(out, q, atol=1e-6)
    np.testing.assert_array_equal(raw, 3.0 * q)  # inputs untouched


def test_chunking_does_not_change_results(data):
    q, db = data
    np.testing.assert_allclose(
        alpha_query_expansion(q, db, 3, chunk_size=2), alpha_query_expansion(q, db, 3), atol=1e-7
    )
    np.testing.assert_allclose(
        alpha_database_augmentation(db, 3, chunk_size=4), alpha_database_augmentation(db, 3), atol=1e-7
    )


def average_precision(scores, positives):
    order = np.argsort(-scores, kind="stable")
    hits = positives[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def test_alpha_qe_improves_a_query_whose_nearest_neighbour_is_positive():
    e = np.eye(8)
    # Query = clutter e0 plus the object e1; positives share the object, negatives the clutter.
    q = l2n((e[0] + 0.5 * e[1])[None]).astype(np.float32)
    p1 = e[1] + 0.5 * e[0]  # the nearest neighbour of the query, a positive
    p2 = e[1] + 0.3 * e[2]
    p3 = e[1] - 0.3 * e[2] + 0.1 * e[0]
    negatives = [e[0] + e[3 + i] for i in range(4)]
    db = l2n(np.array([p1, p2, p3, *negatives])).astype(np.float32)
    positives = np.array([1, 1, 1, 0, 0, 0, 0], dtype=bool)
    before = db @ q[0]
    assert np.argmax(before) == 0
    ap_before = average_precision(before, positives)
    ap_after = average_precision(db @ alpha_query_expansion(q, db, k=1, alpha=3.0)[0], positives)
    assert ap_before < 0.6 and ap_after == 1.0
    assert average_precision(db @ alpha_query_expansion(q, db, k=2, alpha=3.0)[0], positives) > ap_before + 0.1


def test_parameter_errors(data):
    q, db = data
    with pytest.raises(ValueError, match=r"k must be in \[0, 25\].*got 26"):
        alpha_query_expansion(q, db, 26)
    with pytest.raises(ValueError, match=r"k must be in \[0, 25\].*got -1"):
        average_query_expansion(q, db, -1)
    with pytest.raises(TypeError, match="k must be an integer, got 2.0"):
        alpha_query_expansion(q, db, 2.0)
    with pytest.raises(ValueError, match=r"k must be in \[0, 24\].*got 25"):
        alpha_database_augmentation(db, 25)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0, got -1"):
        alpha_query_expansion(q, db, 2, alpha=-1)
    with pytest.raises(ValueError, match="alpha must be finite"):
        alpha_database_augmentation(db, 2, alpha=float("nan"))
    with pytest.raises(ValueError, match="same dimension"):
        alpha_query_expansion(q[:, :8], db)
    with pytest.raises(ValueError, match=r"q must be descriptors of shape \(N, D\)"):
        alpha_query_expansion(q[0], db)
    with pytest.raises(ValueError, match="db contains NaN"):
        alpha_database_augmentation(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        alpha_query_expansion(q, db, 2, chunk_size=0)


def test_expand_with_given_neighbours_matches_alpha_qe():
    from imret.expansion import expand_with_neighbours

    rng = np.random.default_rng(5)
    db = rng.standard_normal((40, 8)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:3] + 0.1 * rng.standard_normal((3, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    s = q @ db.T
    nn = np.argsort(-s, axis=1)[:, :3]
    sims = np.take_along_axis(s, nn, 1)
    np.testing.assert_allclose(expand_with_neighbours(q, db[nn], sims, 3.0), alpha_query_expansion(q, db, 3, 3.0), atol=1e-6)
    # padding (-inf similarity) adds nothing, for alpha = 0 too
    padded = np.concatenate([sims, np.full((3, 1), -np.inf, np.float32)], 1)
    neigh = np.concatenate([db[nn], np.ones((3, 1, 8), np.float32)], 1)
    np.testing.assert_allclose(expand_with_neighbours(q, neigh, padded, 0.0), alpha_query_expansion(q, db, 3, 0.0), atol=1e-6)
