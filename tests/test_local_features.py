"""Local features (imret.local.sift, imret.local.cnn) and descriptor matching (imret.local.matching):
closed forms, brute-force references and coordinate checks on real and generated photos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from imret.local import matching as matching_mod
from imret.local.cnn import CnnLocalExtractor, dequantize_int8, quantize_int8
from imret.local.matching import match_descriptors
from imret.local.sift import ImageFrame, SiftExtractor, load_local_image, rootsift, sift_from_uint8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def generated() -> np.ndarray:
    """A generated 'photo' (shapes on texture), 384 x 288 RGB uint8."""
    from imret.synthetic import make_object

    obj = make_object(np.random.default_rng(3), 384)
    return np.ascontiguousarray(np.asarray(obj)[:288])


@pytest.fixture(scope="module")
def paris_photo(paris_mini) -> str:
    return str(paris_mini / "jpg" / "paris_defense_000000.jpg")


# --- RootSIFT ------------------------------------------------------------------------------------


def test_rootsift_hand_computed_rows():
    d = np.array([[1, 3, 0, 0], [2, 2, 2, 2], [0, 0, 0, 0], [9, 0, 0, 16]], dtype=np.float32)
    want = np.array([
        [0.5, math.sqrt(0.75), 0, 0],  # L1 = 4: (1/4, 3/4) -> square roots
        [0.5, 0.5, 0.5, 0.5],  # L1 = 8: 1/4 each
        [0, 0, 0, 0],  # a zero row stays zero
        [0.6, 0, 0, 0.8],  # L1 = 25: 9/25, 16/25
    ])
    out = rootsift(d)
    assert out.dtype == np.float32 and out.shape == (4, 4)
    np.testing.assert_allclose(out, want, atol=1e-7)


def test_rootsift_unit_norms_and_hellinger_kernel():
    rng = np.random.default_rng(0)
    d = rng.integers(0, 256, (50, 128)).astype(np.float32)
    r = rootsift(d)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-6)
    # <r_a, r_b> is the Hellinger kernel sum(sqrt(p_a p_b)) of the L1-normalised histograms
    p = d / d.sum(1, keepdims=True)
    np.testing.assert_allclose(r[:5] @ r[5:10].T, np.sqrt(p[:5, None, :] * p[None, 5:10, :]).sum(-1), atol=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        rootsift(-d)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        rootsift(d[0])


def test_sift_bytes_round_trip_exactly(generated):
    ex = SiftExtractor(max_keypoints=200, max_side=None)
    feats, raw = ex.encode(generated)
    assert raw.dtype == np.uint8 and raw.shape == (len(feats), 128) and 0 < len(feats) <= 200
    np.testing.assert_array_equal(sift_from_uint8(raw, root=True), feats.descriptors)
    plain = SiftExtractor(max_keypoints=200, max_side=None, root=False)(generated)
    np.testing.assert_array_equal(sift_from_uint8(raw, root=False), plain.descriptors)
    np.testing.assert_allclose(np.linalg.norm(plain.descriptors, axis=1), 1.0, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        sift_from_uint8(raw.astype(np.float32))


# --- SIFT extraction -----------------------------------------------------------------------------


def test_sift_on_a_generated_image_box_offset_is_exact(generated):
    ex = SiftExtractor(max_keypoints=150, max_side=None)
    f = ex(generated)
    assert f.kind == "sift" and f.size == (384, 288) and f.dim == 128
    assert 0 < len(f) <= 150
    assert np.all(np.diff(f.scores) <= 0)  # strongest first
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-6)
    # a box crops before detection: the same as detecting on the crop, plus the offset;
    # a fractional box is rounded outward to whole pixels
    box = (40.3, 31.0, 300.0, 250.5)
    crop = np.ascontiguousarray(generated[31:251, 40:300])
    fb, fc = ex(generated, box), ex(crop)
    np.testing.assert_allclose(fb.keypoints, fc.keypoints + np.float32([40, 31]), atol=1e-4)
    np.testing.assert_array_equal(fb.descriptors, fc.descriptors)
    assert fb.size == (384, 288)
    assert np.all(fb.keypoints >= [39.5, 30.5]) and np.all(fb.keypoints <= [299.5, 250.5])


def test_load_local_image_frame_maps_resized_pixels_back(generated):
    img, frame = load_local_image(generated, None, 192)
    assert img.size == (192, 144) and frame == ImageFrame((384, 288), (0, 0), (2.0, 2.0), (384, 288))
    # pixel centres: the centre of prepared pixel (0, 0) covers original pixels 0..1, centre 0.5
    np.testing.assert_allclose(frame.to_original(np.array([[0.0, 0.0], [191.0, 143.0]])), [[0.5, 0.5], [382.5, 286.5]])
    # a box keeps the whole image's factor (2), as database images are scaled
    img, frame = load_local_image(generated, (100, 50, 300, 250), 192)
    assert img.size == (100, 100) and frame.origin == (100, 50) and frame.scale == (2.0, 2.0)
    with pytest.raises(ValueError, match="empty or inverted"):
        load_local_image(generated, (10, 10, 5, 20), 192)


def test_sift_validates_its_options():
    with pytest.raises(ValueError, match="max_keypoints must be an integer >= 1"):
        SiftExtractor(max_keypoints=0)
    with pytest.raises(ValueError, match="max_side must be an integer >= 1 or None"):
        SiftExtractor(max_side=0)
    with pytest.raises(ValueError, match="contrast_threshold"):
        SiftExtractor(contrast_threshold=-1)


@pytest.mark.realdata
def test_sift_on_a_real_photo_in_original_pixels(paris_photo):
    from imret.images import load_image

    small = SiftExtractor(max_keypoints=300, max_side=512)
    f = small(paris_photo)
    w, h = f.size
    assert (w, h) == Image.open(paris_photo).size == (1024, 768)
    assert len(f) == 300 and f.descriptors.shape == (300, 128)
    assert np.all(f.keypoints >= -0.5) and np.all(f.keypoints <= [w - 0.5, h - 0.5])
    # the same as detecting on a 512 px copy and mapping by (x + 0.5) * 2 - 0.5
    copy = np.asarray(load_image(paris_photo, image_size=512))
    g = SiftExtractor(max_keypoints=300, max_side=None)(copy)
    np.testing.assert_allclose(f.keypoints, (g.keypoints + 0.5) * 2.0 - 0.5, atol=1e-3)
    np.testing.assert_array_equal(f.descriptors, g.descriptors)
    # and physically: keypoints found at half resolution lie where full resolution finds them
    full = SiftExtractor(max_keypoints=4000, max_side=None)(paris_photo)
    dist = np.linalg.norm(f.keypoints[:, None] - full.keypoints[None], axis=2).min(1)
    assert np.median(dist) < 0.75 and (dist < 1.0).mean() > 0.5
    # a query box: keypoints inside it, in original pixels
    box = (200.0, 100.0, 800.0, 600.0)
    fb = small(paris_photo, box)
    assert len(fb) > 50 and fb.size == (1024, 768)
    assert np.all(fb.keypoints >= [199.5, 99.5]) and np.all(fb.keypoints <= [799.5, 599.5])


# --- matching ------------------------------------------------------------------------------------


def _brute_matches(d1, d2, ratio, mutual, max_distance):
    """Mutual nearest neighbours / ratio test / distance threshold, one pair at a time."""
    def dist(a, b):
        return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))

    D = [[dist(a, b) for b in d2] for a in d1]
    out = []
    for i, row in enumerate(D):
        j = min(range(len(row)), key=lambda c: (row[c], c))
        if ratio is not None and len(row) > 1:
            second = min(row[c] for c in range(len(row)) if c != j)
            if not row[j] < ratio * second:
                continue
        if mutual:
            col = [D[r][j] for r in range(len(D))]
            if min(range(len(col)), key=lambda r: (col[r], r)) != i:
                continue
        if max_distance is not None and not row[j] <= max_distance:
            continue
        out.append((i, j))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


@pytest.mark.parametrize("ratio,mutual,max_distance", [
    (None, False, None), (None, True, None), (0.8, False, None), (0.8, True, None), (0.95, True, 1.1), (None, True, 1.0),
])
def test_matching_against_a_brute_force_loop(ratio, mutual, max_distance, monkeypatch):
    rng = np.random.default_rng(1)
    d2 = rng.normal(size=(23, 8))
    d2 /= np.linalg.norm(d2, axis=1, keepdims=True)
    d1 = d2[rng.permutation(23)[:15]] + rng.normal(scale=0.25, size=(15, 8))  # true matches plus noise
    d1 = np.vstack([d1, rng.normal(size=(10, 8)), d1[:2]])  # distractors and repeated rows (ties)
    d1 /= np.linalg.norm(d1, axis=1, keepdims=True)
    want = _brute_matches(d1, d2, ratio, mutual, max_distance)
    got = match_descriptors(d1.astype(np.float32), d2.astype(np.float32), ratio=ratio, mutual=mutual,
                            max_distance=max_distance)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    assert len(want) > 0
    # chunked processing gives the same
    monkeypatch.setattr(matching_mod, "_CHUNK_ELEMENTS", 50)
    np.testing.assert_array_equal(match_descriptors(d1, d2, ratio=ratio, mutual=mutual, max_distance=max_distance), want)


def test_matching_edge_cases():
    a = np.eye(3, dtype=np.float32)
    np.testing.assert_array_equal(match_descriptors(a, a), [[0, 0], [1, 1], [2, 2]])
    assert match_descriptors(a[:0], a).shape == (0, 2)
    # a single candidate passes the ratio test
    np.testing.assert_array_equal(match_descriptors(a, a[:1]), [[0, 0]])
    # exact duplicates in d2 fail the ratio test (best == second)
    assert len(match_descriptors(a[:1], np.vstack([a[:1], a[:1]]), mutual=False)) == 0
    with pytest.raises(ValueError, match="dimensions differ"):
        match_descriptors(a, np.eye(4))
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\] or None"):
        match_descriptors(a, a, ratio=1.5)


# --- CNN local features --------------------------------------------------------------------------


def test_cnn_features_on_the_tiny_model_against_the_feature_map(tiny_model, generated):
    ex = CnnLocalExtractor(tiny_model, max_keypoints=40, image_size=384)
    assert ex.attention is False and ex.stride == 16
    f = ex(generated)
    assert f.kind == "cnn" and f.size == (384, 288)
    assert len(f) == 40 and f.dim == 256  # ResNet-18 layer3: 256 channels at stride 16
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    assert np.all(np.diff(f.scores) <= 0)
    assert np.all(f.keypoints >= 0) and np.all(f.keypoints <= [383, 287])
    # brute force: the stage-3 map, its strongest locations, their cells' centres
    from imret.images import to_tensor

    x = to_tensor(Image.fromarray(generated), tiny_model.mean, tiny_model.std)[None]
    tiny_model.eval()
    with torch.no_grad():
        fmap = tiny_model.trunk.forward_intermediates(x, indices=[3], intermediates_only=True)[0][0]
    assert fmap.shape == (256, 18, 24)
    norms = fmap.norm(dim=0)
    for n in range(5):
        i, j = divmod(int(np.argsort(-norms.flatten().numpy(), kind="stable")[n]), 24)
        np.testing.assert_allclose(f.keypoints[n], [(j + 0.5) * 16 - 0.5, (i + 0.5) * 16 - 0.5])
        np.testing.assert_allclose(f.scores[n], norms[i, j], rtol=1e-5)
        np.testing.assert_allclose(f.descriptors[n], (fmap[:, i, j] / norms[i, j]).numpy(), atol=1e-5)
    # deterministic, and the model's mode is restored
    tiny_model.train()
    g = ex(generated)
    assert tiny_model.training
    tiny_model.eval()
    np.testing.assert_array_equal(f.keypoints, g.keypoints)
    np.testing.assert_array_equal(f.descriptors, g.descriptors)


def test_cnn_features_with_a_box_and_downscaling(tiny_model, generated):
    ex = CnnLocalExtractor(tiny_model, max_keypoints=1000, image_size=192)
    f = ex(generated, (64, 32, 320, 288))  # factor 0.5 -> 128 x 128 crop -> 8 x 8 grid
    assert len(f) <= 64 and f.size == (384, 288)
    # cell centres: (j + 0.5) * 16 prepared pixels = (j + 0.5) * 32 original pixels, + offset
    xs = np.unique(f.keypoints[:, 0])
    assert set(np.round(xs - 64 + 0.5, 3)) <= {(j + 0.5) * 32 for j in range(8)}
    assert np.all(f.keypoints >= [64, 32]) and np.all(f.keypoints <= [319, 287])


def test_cnn_features_use_the_dolg_attention():
    from imret.models import create_model

    torch.manual_seed(0)
    net = create_model("test_resnet", head="dolg", head_kwargs={"local_dim": 24, "dim": 16}).eval()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (160, 224, 3), dtype=np.uint8)
    ex = CnnLocalExtractor(net, max_keypoints=30, image_size=224)
    assert ex.attention is True
    f = ex(img)
    assert f.dim == 24 and len(f) == 30  # the local branch's width, not the trunk's 192 channels
    from imret.images import to_tensor

    x = to_tensor(Image.fromarray(img), net.mean, net.std)[None]
    with torch.no_grad():
        f3, _ = net.feature_maps(x)
        fl, att = net.head.local_map(f3)
    att = att[0, 0]
    h, w = att.shape
    top = np.argsort(-att.flatten().numpy(), kind="stable")[:30]
    np.testing.assert_allclose(f.scores, att.flatten().numpy()[top], rtol=1e-5)
    i, j = divmod(int(top[0]), w)
    np.testing.assert_allclose(f.descriptors[0], torch.nn.functional.normalize(fl[0, :, i, j], dim=0).numpy(), atol=1e-5)
    # attention off: the trunk map and its norms
    plain = CnnLocalExtractor(net, max_keypoints=30, image_size=224, attention=False)(img)
    assert plain.dim == 192


def test_cnn_attention_requires_a_dolg_head(tiny_model):
    with pytest.raises(ValueError, match="attention=True needs a DOLG head"):
        CnnLocalExtractor(tiny_model, attention=True)
    with pytest.raises(ValueError, match="max_keypoints must be an integer >= 1"):
        CnnLocalExtractor(tiny_model, max_keypoints=0)
    with pytest.raises(ValueError, match="not a stage index"):
        CnnLocalExtractor(tiny_model, level=9)


def test_int8_round_trip():
    np.testing.assert_array_equal(quantize_int8(np.array([[0.6, -0.8], [1.0, 0.0]])), [[76, -102], [127, 0]])
    rng = np.random.default_rng(0)
    d = rng.normal(size=(100, 128))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = quantize_int8(d)
    assert q.dtype == np.int8
    back = dequantize_int8(q)
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1.0, atol=1e-6)
    assert np.min(np.sum(back * d, axis=1)) > 0.999
    with pytest.raises(ValueError, match="int8"):
        dequantize_int8(q.astype(np.int16))



@pytest.mark.realdata
def test_cnn_features_of_imagenet_mobilenet_verify_a_warp(paris_mini, mobilenet_weights):
    """Keypoint positions are right when the features of a photo and of its affine warp agree with
    the known warp; an unrelated landmark gets far fewer inliers."""
    import cv2

    from imret import create_model
    from imret.images import load_image
    from imret.local.verification import verify_pair

    net = create_model("mobilenetv2_100.coral", "gem", weights=str(mobilenet_weights))
    ex = CnnLocalExtractor(net, max_keypoints=300, image_size=512)
    assert ex.stride == 16 and ex.attention is False
    img = np.asarray(load_image(str(paris_mini / "jpg" / "paris_defense_000000.jpg"), image_size=512))
    h, w = img.shape[:2]
    a = cv2.getRotationMatrix2D((w / 2, h / 2), 10.0, 0.9)
    f1, f2 = ex(img), ex(cv2.warpAffine(img, a, (w, h)))
    other = ex(str(paris_mini / "jpg" / sorted(p.name for p in (paris_mini / "jpg").glob("paris_louvre_*.jpg"))[0]))
    assert f1.dim == 96  # MobileNetV2 stage 3 (stride 16): 96 channels
    v, v_other = verify_pair(f1, f2, threshold=10.0), verify_pair(f1, other, threshold=10.0)
    assert v.inliers >= 40 and v.inliers >= 3 * v_other.inliers
    corners = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], float)
    err = np.linalg.norm(corners @ v.transform[:2].T - corners @ a.T, axis=1).mean()
    assert err < 8.0  # half the feature stride
