"""SuperGlobal refinement: pooling switches against loop references, extraction bit-identity
when off, and the top-M re-ranker against a literal per-query transcription of the paper's
code (MDescAug + RerankwMDA)."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imret.extract import describe_tensors, extract
from imret.model import create_model
from imret.models.pooling import gem
from imret.refinement import (
    Refinement,
    TopMRefiner,
    check_refinement,
    combine_scales_max,
    refined_descriptors,
    refined_power,
    regional_gem_map,
    relup_hooks,
    top_m_scores,
)
from imret.retrieval import Retriever
from imret.synthetic import make_object, random_view

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- pooling functions ---------------------------------------------------------------------------


def _reflect(i: int, n: int) -> int:
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def _regional_loop(x: np.ndarray, p: float, size: int, eps: float = 1e-6) -> np.ndarray:
    """Cell by cell: the mean of max(x, eps)^p over the size x size window of the reflected
    map (window shrunk to 2 * side - 1 on a side shorter than the half-window), ^(1/p), averaged with x."""
    b, c, h, w = x.shape
    half = (size - 1) // 2
    ph, pw = min(half, h - 1), min(half, w - 1)
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            acc = np.zeros((b, c))
            for di in range(-ph, ph + 1):
                for dj in range(-pw, pw + 1):
                    acc += np.maximum(x[:, :, _reflect(i + di, h), _reflect(j + dj, w)], eps) ** p
            local = (acc / ((2 * ph + 1) * (2 * pw + 1))) ** (1 / p)
            out[:, :, i, j] = 0.5 * local + 0.5 * x[:, :, i, j]
    return out


@pytest.mark.parametrize("shape,p,size", [((2, 3, 6, 7), 2.5, 5), ((1, 4, 5, 5), 3.0, 3), ((1, 2, 2, 6), 2.5, 5),
                                          ((1, 2, 1, 1), 2.5, 5), ((1, 2, 4, 4), 1.0, 1)])
def test_regional_gem_map_matches_window_loops(shape, p, size):
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.2, 2.0, shape)  # some negatives: clamped at eps inside the window
    got = regional_gem_map(torch.tensor(x), p, size).numpy()
    np.testing.assert_allclose(got, _regional_loop(x, p, size), rtol=1e-10, atol=1e-12)


def test_regional_gem_size_one_is_identity_on_positive_maps():
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.1
    torch.testing.assert_close(regional_gem_map(x, 2.5, 1), x)


@pytest.mark.parametrize("bad", [4, 0, -3, 2.5, True])
def test_regional_gem_rejects_even_or_bad_sizes(bad):
    with pytest.raises(ValueError, match="odd integer"):
        regional_gem_map(torch.rand(1, 1, 5, 5), 2.5, bad)


def test_combine_scales_max_matches_per_scale_computation():
    rng = np.random.default_rng(1)
    descs = [rng.normal(size=(4, 6)) * (s + 1) for s in range(3)]  # unnormalised, signed
    got = combine_scales_max([torch.tensor(d) for d in descs]).numpy()
    want = np.zeros((4, 6))
    for b in range(4):
        units = [d[b] / np.linalg.norm(d[b]) for d in descs]
        for c in range(6):
            want[b, c] = max(u[c] for u in units)
        want[b] /= np.linalg.norm(want[b])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    one = torch.tensor(descs[0])
    torch.testing.assert_close(combine_scales_max([one]), F.normalize(one.float(), dim=1))


# --- the Refinement switches ---------------------------------------------------------------------


def test_refinement_round_trip_and_validation():
    r = Refinement.superglobal()
    assert r == Refinement(gem_p=4.6, regional=(2.5, 5), scale_max=True, relup=0.014)
    assert Refinement.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert Refinement.from_dict({}) == Refinement() and not Refinement().active
    with pytest.raises(ValueError, match=r"unknown keys \['gemp'\].*valid"):
        Refinement.from_dict({"gemp": 4.6})
    for bad in ({"gem_p": 0}, {"gem_p": float("nan")}, {"regional": (2.5, 4)}, {"regional": 2.5},
                {"scale_max": "yes"}, {"relup": -0.1}):
        with pytest.raises(ValueError):
            Refinement(**bad)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("resnet18", "gem").eval()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("refine_photos")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(96, 80), (80, 96), (96, 80)]):
        p = d / f"img{i}.jpg"
        random_view(make_object(rng, 128), rng, size).save(p, quality=92)
        paths.append(str(p))
    return paths


def test_default_refinement_leaves_extraction_bit_identical(model, photos):
    kw = dict(scales=(1.0, 0.75), image_size=96, workers=0)
    base = extract(model, photos, **kw).descriptors
    np.testing.assert_array_equal(extract(model, photos, refinement=Refinement(), **kw).descriptors, base)
    np.testing.assert_array_equal(extract(model, photos, refinement=None, **kw).descriptors, base)
    t = [torch.rand(3, 64, 80)]
    np.testing.assert_array_equal(describe_tensors(model, t, refinement=Refinement()), describe_tensors(model, t))


def test_gem_plus_equals_gem_with_that_p(model):
    x = torch.randn(2, 3, 64, 96)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.pool.p.fill_(4.6)
        torch.testing.assert_close(refined_descriptors(model, x, Refinement(gem_p=4.6)), other(x))
    assert model.head.pool.p.item() == pytest.approx(3.0)  # the model's own p is untouched
    assert refined_power(model, Refinement(gem_p=4.6)) == pytest.approx(4.6)
    assert refined_power(model, Refinement(scale_max=True)) == pytest.approx(3.0)


def test_regional_then_gem_plus_matches_manual_pipeline(model):
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        got = refined_descriptors(model, x, Refinement(gem_p=4.6, regional=(2.5, 5)))
        fmap = model.features(x).double().numpy()
    v = gem(torch.tensor(_regional_loop(fmap, 2.5, 5)), 4.6, 1e-6)
    torch.testing.assert_close(got, F.normalize(v, dim=1).float(), rtol=1e-4, atol=1e-5)


def test_extract_with_scale_max_matches_per_scale_reference(model, photos):
    scales = (1.0, 0.75)
    got = extract(model, photos[:1], scales=scales, image_size=96, workers=0,
                  refinement=Refinement(scale_max=True, gem_p=4.6)).descriptors
    from imret.images import load_image, to_tensor

    x = to_tensor(load_image(photos[0], image_size=96), model.mean, model.std)[None]
    per_scale = []
    other = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        other.head.pool.p.fill_(4.6)
        for s in scales:
            xs = x if s == 1 else F.interpolate(x, size=(round(x.shape[2] * s), round(x.shape[3] * s)),
                                                mode="bilinear", align_corners=False, antialias=True)
            per_scale.append(other(xs)[0].numpy())
    want = np.max(per_scale, axis=0)
    np.testing.assert_allclose(got[0], want / np.linalg.norm(want), rtol=1e-4, atol=1e-5)


def test_relup_hooks_shift_and_are_removed(model):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
        with relup_hooks(model, 0.0):  # max(relu(x), 0) is relu(x)
            torch.testing.assert_close(model(x), base, rtol=0, atol=0)
        with relup_hooks(model, 0.5):
            shifted = model(x)
            fmap = model.features(x)
        torch.testing.assert_close(model(x), base, rtol=0, atol=0)  # hooks gone
    assert not torch.allclose(shifted, base)
    # layer3's output is floored at alpha; layer4 (the last stage) is not shifted
    seen = {}
    h = model.trunk.layer3.register_forward_hook(lambda m, i, o: seen.setdefault("l3", o.clone()))
    try:
        with torch.no_grad(), relup_hooks(model, 0.5):
            model(x)
    finally:
        h.remove()
    assert seen["l3"].min().item() >= 0.5
    assert fmap.min().item() < 0.5


def test_extract_with_relup_differs_and_restores(model, photos):
    kw = dict(image_size=96, workers=0)
    base = extract(model, photos[:1], **kw).descriptors
    shifted = extract(model, photos[:1], refinement=Refinement(relup=0.3), **kw).descriptors
    assert not np.allclose(base, shifted)
    np.testing.assert_array_equal(extract(model, photos[:1], **kw).descriptors, base)
    with pytest.raises(ValueError, match="relup"):
        describe_tensors(model, [torch.rand(3, 64, 64)], refinement=Refinement(relup=0.3))


def test_refinement_needs_a_matching_model():
    mac_model = create_model("resnet18", "mac")
    with pytest.raises(ValueError, match="GeM\\+.*MAC"):
        check_refinement(mac_model, Refinement(gem_p=4.6))
    assert check_refinement(mac_model, Refinement(regional=(2.5, 5))) is not None  # any pooling of the global head

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Identity()
            self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3))

    with pytest.raises(ValueError, match="'global' head"):
        check_refinement(Other(), Refinement(regional=(2.5, 5)))
    with pytest.raises(ValueError, match="ResNet trunk"):
        check_refinement(Other(), Refinement(relup=0.014))
    assert check_refinement(Other(), Refinement()) is None
    with pytest.raises(TypeError, match="Refinement"):
        check_refinement(Other(), {"gem_p": 4.6})


# --- the top-M re-ranker ----------------------------------------------------------------------------


def _reference_rerank(q, X, ranks, M, K, beta):
    """Literal per-query transcription of SuperGlobal's MDescAug + RerankwMDA (float64):
    returns the new ranking (all ids) and the final scores of the top M."""
    T = ranks[:M]
    XT = X[T]
    S = XT @ XT.T
    KK = K + 1  # the code's K counts the row itself
    x_dba = np.zeros_like(XT)
    for i in range(len(T)):
        nn_i = np.argsort(-S[i], kind="stable")[:KK]
        w = S[i][nn_i].copy()
        w[1:] *= beta
        w[0] = 1.0
        x_dba[i] = (w[:, None] * XT[nn_i]).sum(0) / w.sum()
    res = x_dba @ q
    pre = np.argsort(-res, kind="stable")
    values = res[pre]
    X1 = x_dba[pre[:KK]].max(0)
    X2 = x_dba[pre]
    final = (values + X2 @ X1) / 2.0
    fo = np.argsort(-final, kind="stable")
    return np.concatenate([T[pre][fo], ranks[M:]]), final[fo]


def _positive_data(rng, n, d):
    x = np.abs(rng.normal(size=(n, d))) + rng.uniform(0, 1, size=(n, 1)) * rng.normal(size=(1, d)) ** 2
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rows_fn(db):
    def rows(ids):
        return np.where((ids >= 0)[..., None], db[np.maximum(ids, 0)], 0.0).astype(np.float32)
    return rows


def _first_stage(q, db, width):
    s = q @ db.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :width]
    return np.take_along_axis(s, ids, 1).astype(np.float32), ids.astype(np.int64)


@pytest.mark.parametrize("m,k,width", [(40, 9, 60), (40, 39, 60), (25, 3, 25), (50, 9, 30), (10, 0, 20)])
def test_top_m_refiner_matches_literal_reference(m, k, width):
    rng = np.random.default_rng(m + k)
    db = _positive_data(rng, 80, 16)
    q = _positive_data(rng, 5, 16)
    scores, ids = _first_stage(q, db, width)
    new_s, new_i = TopMRefiner(_rows_fn(db), m=m, k=k, beta=0.15, chunk_size=2).rerank(q, scores, ids)
    mm = min(m, width)
    for r in range(len(q)):
        full = np.argsort(-(q[r] @ db.T.astype(np.float64)), kind="stable")
        want_ids, want_s = _reference_rerank(q[r].astype(np.float64), db.astype(np.float64), full, mm, k, 0.15)
        np.testing.assert_array_equal(new_i[r], want_ids[:width])
        np.testing.assert_allclose(new_s[r, :mm], want_s, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(new_s, axis=1) <= 0)
    np.testing.assert_array_equal(new_i[:, mm:], ids[:, mm:])  # ids past M untouched, in place


def test_top_m_scores_handles_padding_like_a_shorter_list():
    rng = np.random.default_rng(3)
    db = _positive_data(rng, 12, 8)
    q = _positive_data(rng, 1, 8)
    valid = np.array([[True] * 7 + [False] * 5])
    r_pad, f_pad = top_m_scores(q, np.where(valid[..., None], db[None], 99.0), valid, k=3)
    r_short, f_short = top_m_scores(q, db[None, :7], np.ones((1, 7), bool), k=3)
    np.testing.assert_allclose(f_pad[:, :7], f_short, rtol=1e-6)
    np.testing.assert_allclose(r_pad[:, :7], r_short, rtol=1e-6)
    assert np.all(np.isneginf(f_pad[:, 7:]))


def test_padded_results_stay_padded_and_decreasing():
    rng = np.random.default_rng(4)
    db = _positive_data(rng, 6, 8)
    q = _positive_data(rng, 2, 8)
    scores, ids = _first_stage(q, db, 6)
    scores = np.concatenate([scores, np.full((2, 4), -np.inf, np.float32)], 1)
    ids = np.concatenate([ids, np.full((2, 4), -1)], 1)
    new_s, new_i = TopMRefiner(_rows_fn(db), m=8, k=2).rerank(q, scores, ids)
    assert np.all(new_i[:, 6:] == -1) and np.all(np.isneginf(new_s[:, 6:]))
    assert sorted(new_i[0, :6]) == sorted(ids[0, :6])
    assert np.all(np.diff(new_s[:, :6], axis=1) <= 0)


def test_tail_scores_shift_only_when_needed():
    rng = np.random.default_rng(5)
    db = _positive_data(rng, 30, 8)
    q = _positive_data(rng, 3, 8)
    scores, ids = _first_stage(q, db, 30)
    new_s, new_i = TopMRefiner(_rows_fn(db), m=10, k=3).rerank(q, scores, ids)
    block_low = new_s[:, 9]
    for r in range(3):
        if scores[r, 10] < block_low[r]:
            np.testing.assert_array_equal(new_s[r, 10:], scores[r, 10:])
        else:  # one constant shift, first just below the block
            assert new_s[r, 10] < block_low[r]
            np.testing.assert_allclose(np.diff(new_s[r, 10:]), np.diff(scores[r, 10:]), atol=1e-6)
    # scores far above the block's: shifted down, still below it and decreasing
    s2, _ = TopMRefiner(_rows_fn(db), m=10, k=3).rerank(q, scores + 5.0, ids)
    assert np.all(s2[:, 10] < s2[:, 9]) and np.all(np.diff(s2, axis=1) <= 0)


def test_refinement_lifts_a_positive_that_is_close_to_the_other_positives():
    """Eight positives near q (cosine 0.6) in one tight cluster, a ninth positive in the same
    cluster but far from q (0.3), and 30 negatives at 0.45 that point in 30 different
    directions. Globally the ninth positive comes after every negative; refined with its
    cluster (and the expanded query, dominated by the cluster), it comes right after the
    other positives."""
    rng = np.random.default_rng(6)
    d, n_neg = 48, 30
    e = np.eye(d)
    q = e[0][None]

    def unit(v):
        return v / np.linalg.norm(v)

    pos = [unit(0.6 * e[0] + 0.8 * e[1] + 0.03 * rng.normal(size=d) * (np.arange(d) > 1)) for _ in range(8)]
    low = unit(0.3 * e[0] + 0.95 * e[1])
    neg = [unit(0.45 * e[0] + 0.89 * e[2 + j]) for j in range(n_neg)]
    db = np.array(pos + [low] + neg, np.float32)
    scores, ids = _first_stage(q.astype(np.float32), db, len(db))
    assert list(ids[0]).index(8) == len(db) - 1  # the low positive is last globally
    _, new_i = TopMRefiner(_rows_fn(db), m=400, k=9, beta=0.15).rerank(q, scores, ids)
    assert set(new_i[0, :9]) == set(range(9))


def test_top_m_refiner_argument_errors():
    rows = _rows_fn(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="k must be smaller than m.*k=9, m=9"):
        TopMRefiner(rows, m=9, k=9)
    with pytest.raises(ValueError, match="k must be smaller than m"):
        TopMRefiner(rows, m=5, k=12)
    TopMRefiner(rows, m=10, k=9)  # k = m - 1: every other candidate is a neighbour
    for bad in (dict(m=0), dict(m=2.5), dict(k=-1), dict(beta=-0.1), dict(beta=float("inf")), dict(chunk_size=0)):
        with pytest.raises(ValueError):
            TopMRefiner(rows, **{"m": 10, "k": 2, **bad})
    with pytest.raises(TypeError, match="callable"):
        TopMRefiner(np.eye(4), m=10, k=2)
    r = TopMRefiner(rows, m=4, k=1)
    with pytest.raises(ValueError, match=r"\(Q, k\)"):
        r.rerank(np.eye(4, dtype=np.float32)[:2], np.zeros((2, 3), np.float32), np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match="rows\\(ids\\) must return"):
        TopMRefiner(lambda ids: np.zeros((1, 1, 1)), m=4, k=1).rerank(
            np.eye(4, dtype=np.float32)[:1], np.zeros((1, 3), np.float32), np.zeros((1, 3), np.int64))


def test_top_m_refiner_in_the_retriever():
    rng = np.random.default_rng(7)
    db = _positive_data(rng, 50, 16).astype(np.float32)
    q = _positive_data(rng, 3, 16).astype(np.float32)
    refiner = TopMRefiner(_rows_fn(db), m=20, k=4)
    got = Retriever(rerankers=[refiner]).index(db).search(vectors=q, k=30)
    s, i = Retriever().index(db).search(vectors=q, k=30)
    want_s, want_i = refiner.rerank(q, s, i)
    np.testing.assert_array_equal(got.ids, want_i)
    np.testing.assert_array_equal(got.scores, want_s)
    assert not np.array_equal(got.ids, i)  # it did reorder something
