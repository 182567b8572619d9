"""PCA and learned whitening against closed forms, on seeded synthetic descriptors."""

import json

import numpy as np
import pytest

from imret.whitening import (
    WHITENING_KINDS,
    Whitening,
    fit_learned_whitening,
    fit_pca_whitening,
    fit_whitening,
    sorted_eigh,
)


def random_rotation(rng, c):
    q, r = np.linalg.qr(rng.standard_normal((c, c)))
    return q * np.sign(np.diag(r))


def anisotropic_gaussian(rng, n, stds, offset=3.0):
    """Samples with covariance ``Q diag(stds²) Qᵀ`` around a non-zero mean; returns (x, Q)."""
    c = len(stds)
    rot = random_rotation(rng, c)
    x = (rng.standard_normal((n, c)) * stds) @ rot.T + offset * rng.standard_normal(c)
    return x, rot


def cov(z):
    """Population covariance (1/N), the convention of the fitting code."""
    zc = z - z.mean(axis=0)
    return zc.T @ zc / len(z)


def l2n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- PCA


STDS = np.array([10.0, 6.0, 4.0, 2.0, 1.0, 0.5, 0.3, 0.1])


def test_pca_full_whitening_gives_identity_covariance():
    rng = np.random.default_rng(0)
    x, _ = anisotropic_gaussian(rng, 2000, STDS)
    x = x.astype(np.float32)
    w = fit_pca_whitening(x, power=0.5, eps=0.0)
    assert w.projection.shape == (8, 8) and w.kind == "pca" and w.params["rank"] == 8
    z = w.apply(x, normalize=False).astype(np.float64)
    np.testing.assert_allclose(cov(z), np.eye(8), atol=1e-4)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
    # With the default ridge eps * mean(λ), the whitened variances are λ / (λ + ε) exactly.
    lam = np.linalg.eigvalsh(cov(x.astype(np.float64)))[::-1]
    eps = 1e-6 * lam.mean()
    z = fit_pca_whitening(x).apply(x, normalize=False).astype(np.float64)
    np.testing.assert_allclose(cov(z), np.diag(lam / (lam + eps)), atol=1e-4)
    assert cov(z)[7, 7] < 1 - 1e-3  # the ridge is visible on the weakest component


def test_pca_power_zero_is_an_orthogonal_rotation_preserving_distances():
    rng = np.random.default_rng(1)
    x, _ = anisotropic_gaussian(rng, 300, STDS)
    w = fit_pca_whitening(x, power=0.0)
    P = w.projection.astype(np.float64)
    np.testing.assert_allclose(P @ P.T, np.eye(8), atol=1e-6)
    z = w.apply(x, normalize=False).astype(np.float64)
    d_in = np.linalg.norm(x[:, None] - x[None], axis=-1)
    d_out = np.linalg.norm(z[:, None] - z[None], axis=-1)
    np.testing.assert_allclose(d_out, d_in, rtol=1e-4, atol=1e-3)


def test_pca_dim_reduction_keeps_top_variance_directions():
    rng = np.random.default_rng(2)
    x, rot = anisotropic_gaussian(rng, 3000, STDS)
    w = fit_pca_whitening(x, dim=3)
    assert w.dim == 3 and w.input_dim == 8
    rows = l2n(w.projection.astype(np.float64))
    # Cosines of the principal angles between the learned and the true top-3 subspace.
    cosines = np.linalg.svd(rows @ rot[:, :3], compute_uv=False)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-3)
    # Each row individually matches the corresponding true axis (variances are distinct).
    np.testing.assert_allclose(np.abs(np.sum(rows * rot[:, :3].T, axis=1)), 1.0, atol=1e-3)
    # The variances of a power-0 projection are the top eigenvalues, decreasing.
    var = np.var(fit_pca_whitening(x, power=0.0).apply(x, normalize=False), axis=0)
    assert np.all(np.diff(var) < 0)
    np.testing.assert_allclose(var[:3], STDS[:3] ** 2, rtol=0.1)


def test_sorted_eigh_orders_and_uses_eigh(monkeypatch):
    rng = np.random.default_rng(3)
    rot = random_rotation(rng, 6)
    lam_true = np.array([1.0, 5.0, 5.0, 0.0, 3.0, 0.0])  # repeated eigenvalues, unsorted
    a = rot @ np.diag(lam_true) @ rot.T

    def forbidden(*args, **kwargs):
        raise AssertionError("np.linalg.eig must not be used on a symmetric matrix")

    monkeypatch.setattr(np.linalg, "eig", forbidden)
    lam, vecs = sorted_eigh(a)
    assert lam.dtype == np.float64 and vecs.dtype == np.float64
    np.testing.assert_allclose(lam, [5, 5, 3, 1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(6), atol=1e-12)  # orthonormal despite repeats
    np.testing.assert_allclose(vecs @ np.diag(lam) @ vecs.T, a, atol=1e-12)
    # fitting goes through eigh as well
    fit_pca_whitening(rng.standard_normal((50, 6)))
    fit_learned_whitening(rng.standard_normal((50, 6)), np.stack([np.arange(25), np.arange(25, 50)], 1))
    with pytest.raises(ValueError, match="symmetric"):
        sorted_eigh(np.triu(a + 10))


def test_pca_rank_deficient():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 16)).astype(np.float32)  # rank of the centred data: 4
    w = fit_pca_whitening(x)
    assert w.dim == 4 and w.params["rank"] == 4
    assert np.isfinite(w.projection).all()
    z = w.apply(x, normalize=False).astype(np.float64)
    np.testing.assert_allclose(cov(z), np.eye(4), atol=1e-4)
    with pytest.raises(ValueError, match=r"dim=10 exceeds the rank 4"):
        fit_pca_whitening(x, dim=10)
    rotation = fit_pca_whitening(x, dim=16, power=0.0)  # a rotation cannot blow up
    np.testing.assert_allclose(rotation.projection @ rotation.projection.T, np.eye(16), atol=1e-5)


def test_pca_eps_bounds_weak_components():
    rng = np.random.default_rng(5)
    x, _ = anisotropic_gaussian(rng, 500, np.array([1.0, 1.0, 1e-5]))
    plain = fit_pca_whitening(x, eps=0.0)
    reg = fit_pca_whitening(x, eps=1e-2)
    assert plain.dim == 3 and np.linalg.norm(plain.projection[2]) > 1e4
    lam_mean = np.trace(cov(x)) / 3
    assert np.linalg.norm(reg.projection[2]) <= (1e-2 * lam_mean) ** -0.5 * (1 + 1e-6)


# --------------------------------------------------------------------------- Lw


def make_views(rng, n_classes, per_class, c, nuisance, noise_std=5.0, class_std=1.0, iso=0.1):
    """Class centres plus view noise that is large along the ``nuisance`` directions."""
    centres = class_std * rng.standard_normal((n_classes, c))
    labels = np.repeat(np.arange(n_classes), per_class)
    noise = iso * rng.standard_normal((len(labels), c))
    noise += noise_std * rng.standard_normal((len(labels), nuisance.shape[1])) @ nuisance.T
    return centres[labels] + noise, labels


def class_pairs(labels):
    idx = np.arange(len(labels))
    same = (labels[:, None] == labels[None]) & (idx[:, None] != idx[None])
    return np.argwhere(same)


def intra_covariance(x, pairs):
    d = x[pairs[:, 0]] - x[pairs[:, 1]]
    return d.T @ d / len(pairs)


@pytest.fixture(scope="module")
def lw_data():
    rng = np.random.default_rng(10)
    c = 16
    nuisance = random_rotation(rng, c)[:, :3]
    x, labels = make_views(rng, 40, 4, c, nuisance)
    return x, labels, class_pairs(labels)


def test_lw_whitens_intra_class_covariance(lw_data):
    x, _, pairs = lw_data
    w = fit_learned_whitening(x, pairs, eps=0.0)
    assert w.kind == "lw" and w.projection.shape == (16, 16) and w.params["n_pairs"] == len(pairs)
    P = w.projection.astype(np.float64)
    np.testing.assert_allclose(P @ intra_covariance(x, pairs) @ P.T, np.eye(16), atol=1e-4)
    np.testing.assert_allclose(w.mean, x[pairs[:, 0]].mean(axis=0), atol=1e-5)


def test_lw_is_rotation_of_inverse_cholesky(lw_data):
    x, _, pairs = lw_data
    w = fit_learned_whitening(x, pairs, eps=0.0)
    chol = np.linalg.cholesky(intra_covariance(x, pairs))
    rotation_t = w.projection.astype(np.float64) @ chol  # = Eᵀ since P = Eᵀ L⁻¹
    np.testing.assert_allclose(rotation_t @ rotation_t.T, np.eye(16), atol=1e-4)
    np.testing.assert_allclose(rotation_t.T @ rotation_t, np.eye(16), atol=1e-4)


def test_lw_dims_sorted_by_whitened_variance(lw_data):
    x, _, pairs = lw_data
    pairs = pairs[pairs[:, 0] < pairs[:, 1]]  # one direction only: the query side is a subset of x
    w = fit_learned_whitening(x, pairs)
    # The rotation diagonalises the second moment of all whitened rows about the fitted
    # mean (as in the paper's code), with decreasing variances.
    z = w.apply(x, normalize=False).astype(np.float64)
    moment = z.T @ z / len(z)
    np.testing.assert_allclose(moment, np.diag(np.diag(moment)), atol=1e-6 * np.abs(moment).max())
    assert np.all(np.diff(np.diag(moment)) < 0)
    # truncation keeps the leading rows
    w4 = fit_learned_whitening(x, pairs, dim=4)
    np.testing.assert_allclose(w4.projection, w.projection[:4], rtol=1e-4, atol=1e-6 * np.abs(w.projection).max())
    np.testing.assert_array_equal(w.truncated(4).projection, w.projection[:4])


def nn_accuracy(desc, labels):
    s = desc @ desc.T
    np.fill_diagonal(s, -np.inf)
    return float(np.mean(labels[s.argmax(axis=1)] == labels))


def test_lw_improves_nearest_neighbour_retrieval():
    rng = np.random.default_rng(11)
    c = 24
    nuisance = random_rotation(rng, c)[:, :4]
    x_train, lab_train = make_views(rng, 60, 4, c, nuisance)
    x_test, lab_test = make_views(rng, 60, 4, c, nuisance)  # unseen classes, same nuisance
    x_train, x_test = l2n(x_train).astype(np.float32), l2n(x_test).astype(np.float32)
    w = fit_learned_whitening(x_train, class_pairs(lab_train), dim=c - 4)
    raw = nn_accuracy(x_test, lab_test)
    whitened = nn_accuracy(w.apply(x_test), lab_test)
    assert whitened >= raw + 0.3, (raw, whitened)
    assert whitened > 0.9


def test_lw_singular_intra_covariance_is_regularised():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((30, 20))
    pairs = np.array([[0, 1], [2, 3], [4, 5]])  # C_S has rank 3 < 20
    with pytest.raises(ValueError, match="singular"):
        fit_learned_whitening(x, pairs, eps=0.0)
    w = fit_learned_whitening(x, pairs)
    assert np.isfinite(w.projection).all()
    with pytest.raises(ValueError, match="identical"):
        fit_learned_whitening(np.repeat(x[:1], 4, axis=0), [[0, 1], [2, 3]])


# --------------------------------------------------------------------------- Whitening object


@pytest.fixture
def small_whitening():
    rng = np.random.default_rng(20)
    return fit_pca_whitening(rng.standard_normal((40, 6)), dim=4)


def test_apply_shapes_dtype_and_normalisation(small_whitening):
    rng = np.random.default_rng(21)
    x = rng.standard_normal((7, 6))
    y = small_whitening.apply(x)
    assert y.shape == (7, 4) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-6)
    raw = small_whitening.apply(x, normalize=False)
    expected = (x - small_whitening.mean) @ small_whitening.projection.T.astype(np.float64)
    np.testing.assert_allclose(raw, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, l2n(expected), rtol=1e-5, atol=1e-6)
    assert small_whitening.apply(np.zeros((0, 6))).shape == (0, 4)
    zero_row = small_whitening.apply(small_whitening.mean[None])
    assert np.all(zero_row == 0)


def test_save_load_round_trip(small_whitening, tmp_path):
    path = small_whitening.save(tmp_path / "w.npz")
    with np.load(path, allow_pickle=False) as z:  # readable without pickle
        assert sorted(z.files) == ["mean", "meta", "projection"]
        assert json.loads(z["meta"].item())["kind"] == "pca"
    back = Whitening.load(path)
    np.testing.assert_array_equal(back.mean, small_whitening.mean)
    np.testing.assert_array_equal(back.projection, small_whitening.projection)
    assert back.kind == "pca" and back.params == small_whitening.params
    other = small_whitening.save(tmp_path / "no_suffix")
    assert other.name == "no_suffix" and Whitening.load(other).dim == 4


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="missing arrays"):
        Whitening.load(tmp_path / "other.npz")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    with pytest.raises(ValueError, match="not an imret whitening file"):
        Whitening.load(tmp_path / "arr.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not an imret whitening file"):
        Whitening.load(tmp_path / "obj.npy")


def test_state_round_trip(small_whitening):
    state = small_whitening.to_state()
    json.dumps({k: v for k, v in state.items() if k not in ("mean", "projection")})
    back = Whitening.from_state(state)
    np.testing.assert_array_equal(back.projection, small_whitening.projection)
    assert back.params == small_whitening.params
    with pytest.raises(ValueError, match="unknown whitening state keys.*'projecton'"):
        Whitening.from_state({**state, "projecton": state["projection"]})
    with pytest.raises(ValueError, match="missing"):
        Whitening.from_state({"kind": "pca", "mean": state["mean"]})


def test_whitening_validates_shapes():
    with pytest.raises(ValueError, match=r"mean must have shape \(C,\) = \(3,\)"):
        Whitening(np.zeros(4), np.zeros((2, 3)), "pca")
    with pytest.raises(ValueError, match="projection must have shape"):
        Whitening(np.zeros(3), np.zeros(3), "pca")
    with pytest.raises(TypeError, match="JSON"):
        Whitening(np.zeros(3), np.zeros((2, 3)), "pca", {"bad": object()})
    w = Whitening(np.zeros(3), np.eye(3)[:2], "custom")
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3\), got \(2, 4\)"):
        w.apply(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        w.apply(np.zeros(3))


def test_fit_errors():
    rng = np.random.default_rng(30)
    x = rng.standard_normal((10, 4))
    with pytest.raises(ValueError, match=r"unknown whitening kind 'zca'; available: pca, lw"):
        fit_whitening(x, "zca")
    assert WHITENING_KINDS == ("pca", "lw")
    with pytest.raises(ValueError, match="needs pairs"):
        fit_whitening(x, "lw")
    with pytest.raises(ValueError, match="only by kind='lw'"):
        fit_whitening(x, "pca", pairs=[[0, 1]])
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        fit_pca_whitening(x[0])
    with pytest.raises(ValueError, match="at least 2"):
        fit_pca_whitening(x[:1])
    with pytest.raises(ValueError, match=r"dim must be in \[1, 4\], got 5"):
        fit_pca_whitening(x, dim=5)
    with pytest.raises(ValueError, match="power must be finite and >= 0"):
        fit_pca_whitening(x, power=-0.5)
    with pytest.raises(ValueError, match="zero variance"):
        fit_pca_whitening(np.ones((5, 4)))
    with pytest.raises(ValueError, match="pairs is empty"):
        fit_learned_whitening(x, np.zeros((0, 2), dtype=int))
    with pytest.raises(ValueError, match=r"pairs\[1, 1\] = 10 is out of range for 10 descriptors"):
        fit_learned_whitening(x, [[0, 1], [2, 10]])
    with pytest.raises(ValueError, match=r"shape \(P, 2\)"):
        fit_learned_whitening(x, [[0, 1, 2]])
    with pytest.raises(TypeError, match="integer indices"):
        fit_learned_whitening(x, [[0.0, 1.0]])
    assert fit_whitening(x, "lw", pairs=[[0, 1], [2, 3]], dim=2).kind == "lw"
    assert fit_whitening(x, "pca", dim=2, power=0.25).params["power"] == 0.25
