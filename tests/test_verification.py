"""Geometric verification (imret.local.verification): known transforms recovered from synthetic
warps of real and generated photos, degenerate inputs, the DELG ordering against a brute-force
sort, and the GeometricVerifier re-ranker on a database whose true matches are known."""

from __future__ import annotations

import numpy as np
import pytest

from imret.local import LocalFeatures
from imret.local.matching import match_descriptors
from imret.local.sift import SiftExtractor
from imret.local.verification import GeometricVerifier, Verification, estimate_transform, geometric_order, verify_pair

cv2 = pytest.importorskip("cv2")

SIFT = SiftExtractor(max_keypoints=600, max_side=None)


def _generated(seed: int, size: int = 384) -> np.ndarray:
    from imret.synthetic import make_object

    return np.ascontiguousarray(np.asarray(make_object(np.random.default_rng(seed), size)))


def _affine(w: int, h: int) -> np.ndarray:
    a = cv2.getRotationMatrix2D((w / 2, h / 2), 15.0, 0.8)  # rotation 15 degrees, zoom 0.8
    a[:, 2] += (20.0, -10.0)
    return np.vstack([a, [0.0, 0.0, 1.0]])


def _homography(w: int, h: int) -> np.ndarray:
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[0.03 * w, 0.03 * h], [0.94 * w, 0.05 * h], [0.98 * w, 0.96 * h], [0.01 * w, 0.93 * h]])
    return cv2.getPerspectiveTransform(src, dst)


def _warp(img: np.ndarray, t: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    if np.allclose(t[2], [0, 0, 1]):
        return cv2.warpAffine(img, t[:2], (w, h), flags=cv2.INTER_LINEAR)
    return cv2.warpPerspective(img, t, (w, h), flags=cv2.INTER_LINEAR)


def _apply(t: np.ndarray, xy: np.ndarray) -> np.ndarray:
    p = np.c_[xy, np.ones(len(xy))] @ t.T
    return p[:, :2] / p[:, 2:]


def _check_recovery(img: np.ndarray, t: np.ndarray, model: str, threshold: float = 6.0) -> None:
    """SIFT on ``img`` and its warp by ``t``; the fit must find >= 90 % of the true correspondences
    and place the image corners within 2 px on average."""
    h, w = img.shape[:2]
    f1, f2 = SIFT(img), SIFT(_warp(img, t))
    m = match_descriptors(f1.descriptors, f2.descriptors)
    v = estimate_transform(f1.keypoints, f2.keypoints, m, model=model, threshold=threshold)
    err = np.linalg.norm(_apply(t, f1.keypoints[m[:, 0]]) - f2.keypoints[m[:, 1]], axis=1)
    true = err < threshold
    assert true.sum() >= 50
    assert (v.mask & true).sum() >= 0.9 * true.sum()
    assert v.inliers == v.mask.sum() and (v.mask & ~true).sum() <= 0.05 * true.sum()
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    assert np.linalg.norm(_apply(v.transform, corners) - _apply(t, corners), axis=1).mean() < 2.0


# --- estimate_transform ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["affine", "homography"])
@pytest.mark.parametrize("method", ["magsac", "ransac"])
def test_known_transform_from_points_with_outliers(model, method):
    rng = np.random.default_rng(0)
    kp1 = rng.uniform(0, 800, (300, 2))
    t = _affine(800, 600) if model == "affine" else _homography(800, 600)
    kp2 = _apply(t, kp1) + rng.normal(scale=0.5, size=(300, 2))
    outliers = rng.random(300) < 0.4
    kp2[outliers] = rng.uniform(0, 800, (outliers.sum(), 2))
    matches = np.stack([np.arange(300), np.arange(300)], 1)
    v = estimate_transform(kp1, kp2, matches, model=model, method=method, threshold=3.0)
    assert isinstance(v, Verification) and v.mask.shape == (300,) and v.transform.shape == (3, 3)
    assert v.inliers == int(v.mask.sum())
    assert (v.mask & ~outliers).sum() >= 0.95 * (~outliers).sum()
    assert (v.mask & outliers).sum() <= 3  # uniform outliers land within 3 px of the truth by chance only
    np.testing.assert_allclose(v.transform[2, 2], 1.0)
    corners = np.array([[0, 0], [800, 0], [800, 600], [0, 600]], float)
    assert np.linalg.norm(_apply(v.transform, corners) - _apply(t, corners), axis=1).mean() < 1.0
    if model == "affine":
        np.testing.assert_array_equal(v.transform[2], [0, 0, 1])
    # seeded: the same result again
    again = estimate_transform(kp1, kp2, matches, model=model, method=method, threshold=3.0)
    np.testing.assert_array_equal(again.mask, v.mask)


def test_degenerate_inputs_give_zero_inliers():
    kp = np.array([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]], float)
    few = np.array([[0, 0], [1, 1]])
    for model in ("affine", "homography"):
        v = estimate_transform(kp, kp, few, model=model)
        assert v.inliers == 0 and v.transform is None and v.mask.shape == (2,) and not v.mask.any()
    assert estimate_transform(kp, kp, np.array([[0, 0], [1, 1], [2, 2]]), model="homography").inliers == 0
    assert estimate_transform(kp, kp, np.zeros((0, 2), int)).inliers == 0
    same = np.zeros((6, 2))  # every point the same: no transform, and no exception
    five = np.stack([np.arange(5), np.arange(5)], 1)
    for model in ("affine", "homography"):
        v = estimate_transform(same, same, five, model=model)
        assert isinstance(v, Verification) and v.mask.shape == (5,)
    nan = kp.copy()
    nan[0] = np.nan
    assert estimate_transform(nan, kp, five).inliers == 0


def test_estimate_transform_validates_arguments():
    kp = np.zeros((5, 2))
    m = np.stack([np.arange(5), np.arange(5)], 1)
    with pytest.raises(ValueError, match="unknown model 'similarity'; available: affine, homography"):
        estimate_transform(kp, kp, m, model="similarity")
    with pytest.raises(ValueError, match="unknown method 'lmeds'; available: magsac, ransac"):
        estimate_transform(kp, kp, m, method="lmeds")
    with pytest.raises(ValueError, match="out of range"):
        estimate_transform(kp[:3], kp, m)
    with pytest.raises(ValueError, match="threshold must be"):
        estimate_transform(kp, kp, m, threshold=0)


@pytest.mark.parametrize("model", ["affine", "homography"])
def test_sift_recovers_a_warp_of_a_generated_image(model):
    img = _generated(0)
    h, w = img.shape[:2]
    _check_recovery(img, _affine(w, h) if model == "affine" else _homography(w, h), model)


@pytest.mark.realdata
@pytest.mark.parametrize("model", ["affine", "homography"])
def test_sift_recovers_a_warp_of_a_real_photo(paris_mini, model):
    from imret.images import load_image

    img = np.asarray(load_image(str(paris_mini / "jpg" / "paris_defense_000000.jpg"), image_size=640))
    h, w = img.shape[:2]
    _check_recovery(img, _affine(w, h) if model == "affine" else _homography(w, h), model)


def test_verify_pair_refuses_mixed_kinds():
    a = LocalFeatures(np.zeros((1, 2)), np.ones((1, 4)), (10, 10), kind="sift")
    b = LocalFeatures(np.zeros((1, 2)), np.ones((1, 4)), (10, 10), kind="cnn")
    with pytest.raises(ValueError, match="kind 'sift' with kind 'cnn'"):
        verify_pair(a, b)


# --- the DELG ordering -----------------------------------------------------------------------------


def _brute_order(scores, inliers, top_k, min_inliers):
    k = len(scores)
    head = list(range(min(top_k, k)))
    ver = [p for p in head if inliers[p] >= min_inliers and np.isfinite(scores[p])]
    ver.sort(key=lambda p: (-inliers[p], -scores[p], p))
    rest = [p for p in head if p not in ver]
    return ver + rest + list(range(len(head), k))


def test_geometric_order_against_a_brute_force_sort():
    rng = np.random.default_rng(0)
    for trial in range(30):
        k = int(rng.integers(1, 15))
        s = np.sort(rng.uniform(-1, 1, k))[::-1].astype(np.float32)
        s[rng.random(k) < 0.2] = s.max() if k else 0  # ties
        s = np.sort(s)[::-1]
        n_pad = int(rng.integers(0, 3)) if k > 2 else 0
        if n_pad:
            s[-n_pad:] = -np.inf
        inl = rng.integers(-1, 40, k).astype(np.int32)
        inl[rng.random(k) < 0.3] = 20  # equal inlier counts
        top_k, min_inl = int(rng.integers(1, 16)), int(rng.integers(2, 25))
        order, new = geometric_order(s[None], inl[None], top_k=top_k, min_inliers=min_inl)
        assert order[0].tolist() == _brute_order(s, inl, top_k, min_inl), trial
        fin = new[0][np.isfinite(new[0])]
        assert np.all(np.diff(fin) <= 0)
        nver = sum(1 for p in range(min(top_k, k)) if inl[p] >= min_inl and np.isfinite(s[p]))
        for r in range(nver):  # verified: inliers + (1 + cos) / 2
            p = order[0, r]
            assert new[0, r] == pytest.approx(inl[p] + (1 + s[p]) / 2, abs=1e-5)
        np.testing.assert_array_equal(new[0, nver:], s[order[0, nver:]])


def test_geometric_order_keeps_scores_decreasing_for_scores_above_one():
    s = np.array([[30.0, 20.0, 10.0, 5.0]], np.float32)  # not cosines
    inl = np.array([[-1, 3, 50, 2]])
    order, new = geometric_order(s, inl, top_k=4, min_inliers=2)
    assert order.tolist() == [[2, 1, 3, 0]]
    assert np.all(np.diff(new[0]) <= 0) and new[0, 2] >= 30.0
    with pytest.raises(ValueError, match="min_inliers must be an integer >= 2"):
        geometric_order(s, inl, top_k=4, min_inliers=1)


# --- GeometricVerifier -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gv_world():
    """A query photo, four warps of it (true matches) and six unrelated photos, with SIFT features.

    Database id -> features; id 9 has none stored (None)."""
    query = _generated(10, 320)
    h, w = query.shape[:2]
    rng = np.random.default_rng(5)
    warps = []
    for n in range(4):
        a = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-20, 20)), float(rng.uniform(0.7, 1.1)))
        warps.append(_warp(query, np.vstack([a, [0, 0, 1]])))
    others = [_generated(100 + n, 320) for n in range(6)]
    images = {0: others[0], 1: others[1], 2: warps[0], 3: others[2], 4: others[3], 5: warps[1],
              6: others[4], 7: warps[2], 8: others[5], 9: warps[3]}
    feats = {i: SIFT(img) for i, img in images.items() if i != 9}
    return query, feats


def _database(feats, calls=None):
    def lookup(ids):
        if calls is not None:
            calls.append(np.asarray(ids).copy())
        return [feats.get(int(i)) for i in ids]
    return lookup


def test_verifier_moves_the_true_matches_to_the_top(gv_world):
    query, feats = gv_world
    calls = []
    gv = GeometricVerifier(SIFT_box, _database(feats, calls), top_k=8, min_inliers=15, workers=2)
    ids = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1]])  # ranked by a poor global descriptor
    scores = np.array([[0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, -np.inf]], np.float32)
    new_s, new_i, extras = gv.rerank(np.zeros((1, 4)), scores, ids, [(query, None)])
    assert calls and calls[0].tolist() == list(range(8))  # the first top_k candidates only
    inl, tr = extras["inliers"], extras["transform"]
    assert inl.shape == (1, 11) and inl.dtype == np.int32 and tr.shape == (1, 11, 3, 3) and tr.dtype == np.float32
    # the warps of the query within the top 8 (ids 2, 5, 7) come first, by inlier count
    assert set(new_i[0, :3].tolist()) == {2, 5, 7}
    assert np.all(np.diff(inl[0, :3]) <= 0) and inl[0, 2] >= 15
    assert np.all(inl[0, 3:8] < 15) and np.all(inl[0, 3:8] >= 0)  # verified, but not enough inliers
    # the rest keep their global order, and past top_k nothing moves (id 9: not verified)
    assert new_i[0, 3:8].tolist() == [0, 1, 3, 4, 6]
    assert new_i[0, 8:].tolist() == [8, 9, -1] and inl[0, 8:].tolist() == [-1, -1, -1]
    np.testing.assert_array_equal(new_s[0, 3:], scores[0, [0, 1, 3, 4, 6, 8, 9, 10]])
    assert np.all(np.diff(new_s[0, :-1]) <= 0) and new_s[0, -1] == -np.inf
    # extras are aligned with the returned ids: recompute one pair directly
    pos = 1
    direct = gv.verify(SIFT(query), feats[int(new_i[0, pos])])
    assert inl[0, pos] == direct.inliers
    np.testing.assert_allclose(tr[0, pos], direct.transform, rtol=1e-5, atol=1e-3)
    assert np.isnan(tr[0, 8:]).all() and np.isfinite(tr[0, :3]).all()
    np.testing.assert_allclose(new_s[0, 0], inl[0, 0] + (1 + scores[0, ids[0] == new_i[0, 0]][0]) / 2, rtol=1e-6)
    # serial and threaded give the same
    serial = GeometricVerifier(SIFT_box, _database(feats), top_k=8, min_inliers=15, workers=0)
    s2, i2, e2 = serial.rerank(None, scores, ids, [(query, None)])
    np.testing.assert_array_equal(i2, new_i)
    np.testing.assert_array_equal(e2["inliers"], inl)


def SIFT_box(image, box):  # noqa: N802 - the query extractor, (image, box) -> LocalFeatures
    return SIFT(image, box)


def test_verifier_without_images_or_time_changes_nothing(gv_world):
    query, feats = gv_world
    ids = np.array([[0, 2, 5, -1], [7, 1, -1, -1]])
    scores = np.array([[0.9, 0.5, 0.4, -np.inf], [0.8, 0.3, -np.inf, -np.inf]], np.float32)
    calls = []

    def never(image, box):
        calls.append(image)
        return SIFT(image, box)

    for gv, images in [
        (GeometricVerifier(never, _database(feats), time_budget=0), [(query, None), (query, None)]),
        (GeometricVerifier(never, _database(feats)), None),  # a search from vectors
    ]:
        s, i, extras = gv.rerank(np.zeros((2, 3)), scores, ids, images)
        np.testing.assert_array_equal(i, ids)
        np.testing.assert_array_equal(s, scores)
        assert (extras["inliers"] == -1).all() and np.isnan(extras["transform"]).all()
    assert calls == []


def test_verifier_validates_arguments(gv_world):
    _, feats = gv_world
    db = _database(feats)
    with pytest.raises(ValueError, match="min_inliers must be an integer >= 2"):
        GeometricVerifier(SIFT_box, db, min_inliers=1)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        GeometricVerifier(SIFT_box, db, top_k=0)
    with pytest.raises(ValueError, match="unknown model 'rigid'"):
        GeometricVerifier(SIFT_box, db, model="rigid")
    with pytest.raises(ValueError, match="time_budget must be"):
        GeometricVerifier(SIFT_box, db, time_budget=-1)
    with pytest.raises(ValueError, match="ratio must be"):
        GeometricVerifier(SIFT_box, db, ratio=2.0)
    gv = GeometricVerifier(SIFT_box, lambda ids: [None], top_k=3)
    with pytest.raises(ValueError, match="database returned 1 entries for 2 ids"):
        gv.rerank(None, np.array([[0.5, 0.4]], np.float32), np.array([[0, 1]]), [(np.zeros((64, 64, 3), np.uint8), None)])
    with pytest.raises(ValueError, match="2 query images for 1 result rows"):
        gv.rerank(None, np.array([[0.5]], np.float32), np.array([[0]]), [(None, None), (None, None)])


def test_verifier_time_budget_stops_verification(gv_world):
    import time

    query, feats = gv_world
    qf = SIFT(query)

    class SlowVerifier(GeometricVerifier):
        def verify(self, q, c):
            time.sleep(0.25)
            return super().verify(q, c)

    ids = np.array([[2, 5, 7, 0, 1, 3]])
    scores = np.linspace(0.9, 0.4, 6, dtype=np.float32)[None]
    for workers in (0, 2):
        gv = SlowVerifier(lambda image, box: qf, _database(feats), top_k=6, workers=workers, time_budget=0.6)
        t0 = time.monotonic()
        s, i, extras = gv.rerank(None, scores, ids, [(query, None)])
        assert time.monotonic() - t0 < 1.5
        n = int((extras["inliers"] >= 0).sum())
        assert 0 < n < 6, workers  # some verified in time (serial: 2, two threads: 4), the rest not
        assert np.all(np.diff(s[0]) <= 0)
        unverified = [int(x) for x, c in zip(i[0], extras["inliers"][0]) if c < 15]
        assert unverified == [x for x in ids[0].tolist() if x in unverified]  # in their global order


def test_plausible_transforms_against_their_definition():
    from imret.local.verification import plausible

    assert plausible(np.eye(3))
    rot = np.array([[0.0, -2.0, 5.0], [2.0, 0.0, 1.0], [0, 0, 1]])  # rotate 90 degrees, scale 2
    assert plausible(rot)
    assert not plausible(np.diag([0.05, 0.05, 1.0]))  # shrinks 20x
    assert not plausible(np.diag([-1.0, 1.0, 1.0]))  # a mirror
    assert not plausible(np.diag([3.0, 0.5, 1.0]))  # aspect changed 6x
    assert plausible(np.diag([3.0, 0.5, 1.0]), max_anisotropy=6.0)
    assert not plausible(None) and not plausible(np.full((3, 3), np.nan))
    h = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.0, -0.01, 1.0]])  # w = 1 - 0.01 y: behind the camera for y > 100
    assert plausible(h, np.array([[10.0, 10.0]]))
    assert not plausible(h, np.array([[10.0, 500.0]]))


def test_a_collapsed_fit_is_set_aside_and_the_true_transform_found():
    from imret.local.verification import estimate_transform

    rng = np.random.default_rng(3)
    true = np.array([[0.9, -0.2, 40.0], [0.2, 0.9, -15.0], [0, 0, 1]])
    src_good = rng.uniform(0, 800, (25, 2))
    dst_good = src_good @ true[:2, :2].T + true[:2, 2]
    # 120 query points all "matched" into one 3-pixel patch of image 2: a transform that
    # collapses image 1 onto it explains them all
    src_bad = rng.uniform(0, 800, (120, 2))
    dst_bad = np.array([500.0, 300.0]) + rng.uniform(-1.5, 1.5, (120, 2))
    kp1 = np.concatenate([src_good, src_bad]).astype(np.float32)
    kp2 = np.concatenate([dst_good, dst_bad]).astype(np.float32)
    m = np.stack([np.arange(145), np.arange(145)], 1)
    v = estimate_transform(kp1, kp2, m, threshold=4.0)
    assert v.inliers >= 23 and v.mask[:25].sum() >= 23
    np.testing.assert_allclose(v.transform[:2], true[:2], atol=0.05 * 100 / 100 + 1.0)
    raw = estimate_transform(kp1, kp2, m, threshold=4.0, max_scale=None)  # no check: the collapse wins
    assert raw.inliers > 100
    # one-to-one counting: the same keypoint matched many times counts once
    kp2_dup = np.concatenate([dst_good, np.repeat(dst_good[:1], 120, 0)]).astype(np.float32)
    kp1_dup = np.concatenate([src_good, np.repeat(src_good[:1], 120, 0)]).astype(np.float32)
    m_dup = np.stack([np.r_[np.arange(25), np.zeros(120, int)], np.r_[np.arange(25), np.zeros(120, int)]], 1)
    assert 23 <= estimate_transform(kp1_dup, kp2_dup, m_dup, threshold=4.0).inliers <= 25
