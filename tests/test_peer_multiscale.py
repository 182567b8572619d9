"""Multi-scale extraction of imported cirtorch / dirtorch checkpoints against slow references
written here from those projects' test code:

- cirtorch ``extract_ms``: ``input_t = interpolate(input, scale_factor=s, mode="bilinear",
  align_corners=False)`` (the input itself at s = 1), ``v += net(input_t) ** msp``, ``v /= S``,
  ``v **= 1 / msp``, ``v /= ||v||``; ``msp`` is the learned GeM p without whitening, else 1.
- dirtorch ``test_dir`` / ``extract_features`` with ``--trfs`` chains ``Scale(s)``: each scale is
  the 8-bit image resized by Pillow's bilinear filter to ``int(0.5 + s * side)`` (only when the
  short side changes), ``ToTensor``, ``Normalize``; the descriptors are pooled by
  ``sympow(mean_s sympow(v_s, 3), 1/3)`` with ``sympow(x, p) = sign(x) * max(|x|, 1e-6) ** p``,
  then L2-normalised.

The references use a timm ResNet-18 trunk and plain tensor code, not imret's network.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imret.extract import combine_scales_sympow, extract, scale_input
from imret.images import load_image
from imret.models.spec import ModelSpec
from imret.weights import load_model, save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALES = (1.0, 2 ** -0.5, 0.5)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 150  # long side of the network input: odd scaled sides, where the resize rules differ


def _trunk_sd(seed: int):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("resnet18", num_classes=0, global_pool="").state_dict()


def _reference_net(trunk_sd, p, W=None, b=None, l2_first=True):
    """``(1, 3, H, W) -> (D,)``: timm ResNet-18 trunk, GeM(p), [L2], [linear], L2."""
    import timm

    t = timm.create_model("resnet18", num_classes=0, global_pool="")
    t.load_state_dict(trunk_sd)
    t.eval()

    def f(x):
        with torch.no_grad():
            fm = t.forward_features(x).double()
            v = fm.clamp(min=1e-6).pow(p).mean((2, 3)).pow(1.0 / p)[0]
            if W is not None:
                if l2_first:
                    v = v / v.norm()
                v = W.double() @ v + b.double()
            return (v / v.norm()).float()

    return f


def _normalise(pixels: np.ndarray) -> torch.Tensor:
    """torchvision's ToTensor + Normalize on an ``(H, W, 3)`` uint8 array."""
    t = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)
    return ((t - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))[None]


def _cirtorch_reference(net, img: Image.Image, scales, msp) -> np.ndarray:
    x = _normalise(np.asarray(img))
    v = 0
    for s in scales:
        xs = x.clone() if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        v = v + net(xs).double() ** msp
    v = (v / len(scales)) ** (1.0 / msp)
    return (v / v.norm()).numpy()


def _dirtorch_reference(net, img: Image.Image, scales) -> np.ndarray:
    descs = []
    for s in scales:
        w, h = img.size
        ow, oh = int(0.5 + s * w), int(0.5 + s * h)
        im = img
        if (ow, oh) != (w, h) and min(ow, oh) != min(w, h):
            im = img.resize((ow, oh), Image.BILINEAR)
        descs.append(net(_normalise(np.asarray(im))).double().numpy())
    if len(descs) == 1:
        v = descs[0]
    else:
        def sympow(a, p):
            return np.sign(a) * np.maximum(np.abs(a), 1e-6) ** p

        v = sympow(np.mean([sympow(d, 3.0) for d in descs], axis=0), 1.0 / 3.0)
    return v / np.linalg.norm(v)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="module")
def photos(make_photos):
    # portrait and landscape, odd sides: 150 x 113 and 113 x 150 at SIZE
    return make_photos(2, 2, (200, 150), seed=3)[:2] + make_photos(1, 1, (150, 200), seed=4)


def _cirtorch_ckpt(path, *, whitening: bool, seed: int = 1):
    src = _trunk_sd(seed)
    names = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    sd = {f"features.{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in src.items()}
    sd["pool.p"] = torch.tensor([2.7])
    W = b = None
    if whitening:
        g = torch.Generator().manual_seed(seed)
        W, b = torch.randn(512, 512, generator=g) / 20, torch.randn(512, generator=g) / 20
        sd.update({"whiten.weight": W, "whiten.bias": b})
    meta = {"architecture": "resnet18", "pooling": "gem", "whitening": whitening, "local_whitening": False,
            "regional": False, "mean": list(MEAN), "std": list(STD), "outputdim": 512}
    torch.save({"meta": meta, "state_dict": sd}, path)
    return _reference_net(src, 2.7, W, b, l2_first=True)


def _dirtorch_ckpt(path, seed: int = 2):
    src = _trunk_sd(seed)
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(256, 512, generator=g) / 20, torch.randn(256, generator=g) / 20
    sd = {f"module.{k}": v for k, v in src.items()}
    sd.update({"module.adpool.p": torch.tensor([3.0]), "module.fc.weight": W, "module.fc.bias": b})
    ckpt = {"model_options": {"arch": "resnet18_rmac", "out_dim": 256, "pooling": "gem", "gemp": 3},
            "state_dict": sd, "preprocess": {"mean": list(MEAN), "std": list(STD)}}
    torch.save(ckpt, path)
    return _reference_net(src, 3.0, W, b, l2_first=False)


@pytest.mark.parametrize("whitening", [False, True])
def test_cirtorch_import_reproduces_extract_ms(tmp_path, photos, whitening):
    ref_net = _cirtorch_ckpt(tmp_path / "cir.pth", whitening=whitening)
    m = load_model(tmp_path / "cir.pth")
    assert m.spec.multiscale == "cirtorch"
    msp = 1.0 if whitening else 2.7
    assert m.multiscale_power() == pytest.approx(msp)
    imgs = [load_image(p, image_size=SIZE) for p in photos]
    ref = np.stack([_cirtorch_reference(ref_net, im, SCALES, msp) for im in imgs])
    got = extract(m, photos, scales=SCALES, image_size=SIZE).descriptors
    assert _cosines(got, ref).min() >= 0.99999
    # imret's own resize (antialiased, rounded sizes) is measurably different
    own = extract(m, photos, scales=SCALES, image_size=SIZE, multiscale="imret").descriptors
    assert _cosines(own, ref).min() < 0.99999  # the bar above tells them apart


def test_dirtorch_import_reproduces_scale_pooling(tmp_path, photos):
    ref_net = _dirtorch_ckpt(tmp_path / "dir.pt")
    m = load_model(tmp_path / "dir.pt")
    assert m.spec.multiscale == "dirtorch" and m.spec.whitening == 256
    imgs = [load_image(p, image_size=SIZE) for p in photos]
    ref = np.stack([_dirtorch_reference(ref_net, im, SCALES) for im in imgs])
    got = extract(m, photos, scales=SCALES, image_size=SIZE).descriptors
    assert _cosines(got, ref).min() >= 0.99999
    # the arithmetic mean over scales (imret's rule with a whitening layer) is not it
    own = extract(m, photos, scales=SCALES, image_size=SIZE, multiscale="imret").descriptors
    assert _cosines(own, ref).min() < 0.999
    # one scale: every mode gives the network's descriptor
    one = [extract(m, photos, image_size=SIZE, multiscale=mode).descriptors for mode in ("imret", "cirtorch", "dirtorch")]
    np.testing.assert_allclose(one[0], one[1], atol=1e-6)
    np.testing.assert_allclose(one[0], one[2], atol=1e-6)


def test_mode_survives_save_load_and_can_be_overridden(tmp_path, photos):
    _dirtorch_ckpt(tmp_path / "dir.pt")
    m = load_model(tmp_path / "dir.pt")
    base = extract(m, photos[:2], scales=SCALES, image_size=SIZE).descriptors
    for name in ("m.pt", "m.safetensors"):
        save_model(m, tmp_path / name)
        back = load_model(tmp_path / name)
        assert back.spec.multiscale == "dirtorch"
        np.testing.assert_allclose(extract(back, photos[:2], scales=SCALES, image_size=SIZE).descriptors, base, atol=1e-6)
    over = load_model(tmp_path / "m.pt", multiscale="imret")
    assert over.spec.multiscale == "imret"
    np.testing.assert_allclose(extract(over, photos[:2], scales=SCALES, image_size=SIZE).descriptors,
                               extract(m, photos[:2], scales=SCALES, image_size=SIZE, multiscale="imret").descriptors,
                               atol=1e-6)
    # the default mode is left out of the spec dict (checkpoints of imret models keep their bytes)
    assert "multiscale" not in ModelSpec().to_dict()
    assert ModelSpec.from_dict(m.spec.to_dict()).multiscale == "dirtorch"
    with pytest.raises(ValueError, match="unknown multiscale mode 'dir'; available: imret, cirtorch, dirtorch"):
        ModelSpec(multiscale="dir")
    with pytest.raises(ValueError, match="available: imret, cirtorch, dirtorch"):
        extract(m, photos[:1], multiscale="cir")


def test_cli_records_and_overrides_the_mode(tmp_path, photos):
    from imret.cli import main

    _cirtorch_ckpt(tmp_path / "cir.pth", whitening=False)
    args = ["extract", *photos[:2], "--model", str(tmp_path / "cir.pth"), "--image-size", str(SIZE),
            "--scales", "ms3", "--no-progress", "--workers", "0"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--multiscale", "imret"]) == 0
    meta_a = json.loads((tmp_path / "a.json").read_text())
    meta_b = json.loads((tmp_path / "b.json").read_text())
    assert meta_a["model"]["multiscale"] == "cirtorch" and "multiscale" not in meta_b["model"]
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert _cosines(a, b).min() < 0.9999  # the flag changed the extraction


def test_scale_input_sizes():
    x = torch.randn(2, 3, 113, 150)
    assert scale_input(x, 1.0, "cirtorch") is x
    assert scale_input(x, 2 ** -0.5, "cirtorch").shape[-2:] == (79, 106)  # floor
    assert scale_input(x, 2 ** -0.5, "imret").shape[-2:] == (80, 106)  # round
    u = np.random.default_rng(0).integers(0, 256, (2, 113, 150, 3), dtype=np.uint8)
    xn = torch.cat([_normalise(a) for a in u])
    y = scale_input(xn, 2 ** -0.5, "dirtorch", MEAN, STD)
    assert y.shape[-2:] == (80, 106)  # int(0.5 + s * side)
    want = _normalise(np.asarray(Image.fromarray(u[1]).resize((106, 80), Image.BILINEAR)))
    torch.testing.assert_close(y[1:], want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="available: imret, cirtorch, dirtorch"):
        scale_input(x, 0.5, "bilinear")


def test_combine_scales_sympow_matches_dirtorch_pool():
    g = torch.Generator().manual_seed(0)
    descs = [F.normalize(torch.randn(4, 64, generator=g), dim=1) for _ in range(3)]
    descs[0][0, :5] = 0.0  # zero stays zero, tiny magnitudes are clamped
    descs[1][0, :5] = 0.0
    descs[2][0, :5] = 0.0
    descs[2][1, :5] = 1e-9
    got = combine_scales_sympow(descs).numpy()
    a = np.stack([d.double().numpy() for d in descs])
    want = []
    for i in range(4):
        v = np.zeros(64)
        for j in range(64):
            cubes = [np.sign(a[s, i, j]) * max(abs(a[s, i, j]), 1e-6) ** 3 for s in range(3)]
            m = sum(cubes) / 3
            v[j] = np.sign(m) * max(abs(m), 1e-6) ** (1 / 3)
        want.append(v / np.linalg.norm(v))
    np.testing.assert_allclose(got, np.stack(want), atol=1e-6)
    assert (got[0, :5] == 0).all()


def test_store_keeps_the_imported_mode(tmp_path, photos):
    from imret.index.store import Preprocessing, Store

    _dirtorch_ckpt(tmp_path / "dir.pt")
    m = load_model(tmp_path / "dir.pt")
    pre = Preprocessing(image_size=SIZE, scales=SCALES)
    with Store.create(tmp_path / "store", m, preprocessing=pre) as st:
        st.add(photos, workers=0)
    want = extract(m, photos, scales=SCALES, image_size=SIZE).descriptors
    with Store.open(tmp_path / "store") as st:
        np.testing.assert_allclose(np.asarray(st.descriptors()), want, atol=1e-6)
        assert st.model.spec.multiscale == "dirtorch"  # the saved model carries it: queries match
        np.testing.assert_allclose(st.encode(photos[:1]).descriptors, want[:1], atol=1e-6)
