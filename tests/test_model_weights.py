import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import imret
from imret.backbones import WeightsUnavailableError, create_trunk, list_backbones
from imret.model import ModelSpec, create_model
from imret.pooling import gem
from imret.weights import load_model, load_weights, save_model

X = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))


def _out(m, x=X):
    with torch.inference_mode():
        return m.eval()(x)


def test_registry_errors_list_choices():
    assert "resnet50" in list_backbones() and "mobilenetv2_100.coral" in list_backbones()
    with pytest.raises(ValueError, match="unknown backbone 'resnet51'.*presets: .*resnet50"):
        create_model("resnet51")
    with pytest.raises(ValueError, match="unknown pooling 'foo'; available: gem, mac"):
        create_model("resnet18", "foo")
    with pytest.raises(ValueError, match="only fully convolutional"):
        create_model("vit_tiny_patch16_224")


def test_spec_rejects_unknown_keys_and_round_trips():
    spec = ModelSpec(backbone="resnet18", pool="rmac", whitening=64)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown model spec keys \\['pooling'\\]"):
        ModelSpec.from_dict({"backbone": "resnet18", "pooling": "gem"})


@pytest.mark.parametrize("pool", ["mac", "spoc", "gem", "rmac", "rgem"])
def test_model_output_normalised(pool):
    m = create_model("resnet18", pool, whitening=32 if pool == "rmac" else None)
    y = _out(m)
    assert y.shape == (2, m.dim) and y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2))


def test_head_matches_manual_pipeline():
    m = create_model("resnet18", "gem", whitening=16, pool_kwargs={"p": 2.0})
    with torch.no_grad():
        m.whiten.weight.normal_()
        m.whiten.bias.normal_()
        fmap = m.trunk.forward_features(X)
        ref = F.normalize(m.whiten(F.normalize(gem(fmap, 2.0), dim=1)), dim=1)
    torch.testing.assert_close(_out(m), ref)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_imret_checkpoint_round_trip(tmp_path, suffix):
    m = create_model("resnet18", "gem", whitening=24, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    with torch.no_grad():
        m.pool.p.fill_(2.2)
        m.whiten.weight.normal_()
    path = tmp_path / f"net{suffix}"
    save_model(m, path)
    m2 = load_model(path)
    assert m2.spec == m.spec and m2.mean == (0.1, 0.2, 0.3)
    torch.testing.assert_close(_out(m2), _out(m))
    # the same file also loads into a freshly built model of the same architecture
    m3 = create_model("resnet18", "gem", whitening=24, weights=str(path))
    torch.testing.assert_close(_out(m3), _out(m))


def test_whole_model_state_dict_and_backbone_file(tmp_path):
    m = create_model("resnet18", "spoc")
    torch.save(m.state_dict(), tmp_path / "sd.pth")
    m2 = create_model("resnet18", "spoc", weights=str(tmp_path / "sd.pth"))
    torch.testing.assert_close(_out(m2), _out(m))
    with pytest.raises(ValueError, match="holds weights without a model spec"):
        load_model(tmp_path / "sd.pth")

    # a backbone file with its classifier (timm names): classifier dropped, rest strict
    import timm

    full = timm.create_model("resnet18", num_classes=10)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "bb.safetensors"))
    m3 = create_model("resnet18", "gem", weights=str(tmp_path / "bb.safetensors"))
    for k, v in full.state_dict().items():
        if not k.startswith("fc."):
            torch.testing.assert_close(m3.trunk.state_dict()[k], v)

    # strictness: a missing key and a wrong shape are errors naming the key
    sd = {k: v for k, v in full.state_dict().items() if k != "layer1.0.conv1.weight"}
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing keys \\(1\\).*layer1.0.conv1.weight"):
        create_model("resnet18", weights=str(tmp_path / "missing.pth"))
    sd = dict(full.state_dict())
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="shape mismatch.*conv1.weight"):
        create_model("resnet18", weights=str(tmp_path / "shape.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("resnet18", weights=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read weights file"):
        create_model("resnet18", weights=str(tmp_path / "junk.pth"))


def _reference_net(trunk_sd, p, W=None, b=None, l2_first=True):
    """Independent reference: a timm resnet18 trunk, then GeM, [L2], linear, L2."""
    import timm

    t = timm.create_model("resnet18", num_classes=0, global_pool="")
    t.load_state_dict(trunk_sd)
    t.eval()

    def f(x):
        with torch.no_grad():
            v = gem(t.forward_features(x), p)
            if W is not None:
                if l2_first:
                    v = F.normalize(v, dim=1)
                v = v @ W.T + b
            return F.normalize(v, dim=1)

    return f


def test_import_cirtorch_checkpoint(tmp_path):
    import timm

    src = timm.create_model("resnet18", num_classes=0, global_pool="").state_dict()
    names = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    sd = {f"features.{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in src.items()}
    g = torch.Generator().manual_seed(1)
    W, b = torch.randn(512, 512, generator=g) / 20, torch.randn(512, generator=g) / 20
    sd.update({"pool.p": torch.tensor([2.6]), "whiten.weight": W, "whiten.bias": b})
    meta = {"architecture": "resnet18", "pooling": "gem", "whitening": True, "local_whitening": False,
            "regional": False, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "outputdim": 512}
    torch.save({"epoch": 3, "meta": meta, "state_dict": sd, "min_loss": 0.1}, tmp_path / "cir.pth")
    m = load_model(tmp_path / "cir.pth")
    assert m.spec.pool == "gem" and m.spec.whitening == 512 and m.spec.l2_before_whiten
    torch.testing.assert_close(_out(m), _reference_net(src, 2.6, W, b)(X))

    meta2 = dict(meta, pooling="gemmp", whitening=False)
    sd2 = {k: v for k, v in sd.items() if not k.startswith("whiten")}
    sd2["pool.p"] = torch.linspace(2, 4, 512)
    torch.save({"meta": meta2, "state_dict": sd2}, tmp_path / "cir_mp.pth")
    m2 = load_model(tmp_path / "cir_mp.pth")
    assert m2.pool.p.shape == (512,)
    torch.testing.assert_close(_out(m2), _reference_net(src, torch.linspace(2, 4, 512))(X))


def test_import_dirtorch_checkpoint(tmp_path):
    import timm

    src = timm.create_model("resnet18", num_classes=0, global_pool="").state_dict()
    g = torch.Generator().manual_seed(2)
    W, b = torch.randn(256, 512, generator=g) / 20, torch.randn(256, generator=g) / 20
    sd = {f"module.{k}": v for k, v in src.items()}
    sd.update({"module.adpool.p": torch.tensor([3.3]), "module.fc.weight": W, "module.fc.bias": b})
    ckpt = {"model_options": {"arch": "resnet18_rmac", "out_dim": 256, "pooling": "gem", "gemp": 3},
            "state_dict": sd, "preprocess": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    torch.save(ckpt, tmp_path / "dir.pt")
    m = load_model(tmp_path / "dir.pt")
    assert m.dim == 256 and not m.spec.l2_before_whiten
    torch.testing.assert_close(_out(m), _reference_net(src, 3.3, W, b, l2_first=False)(X))

    # a checkpoint with an arbitrary pickled object is refused unless trusted
    ckpt["pca"] = {"mean": np.arange(3.0), "P": np.eye(3, dtype=np.float32)}  # numpy arrays are allowed
    torch.save(ckpt, tmp_path / "plain.pt")
    load_model(tmp_path / "plain.pt")
    import argparse

    ckpt["pca"] = argparse.Namespace(whiten=True)  # any class: refused by the weights-only loader
    torch.save(ckpt, tmp_path / "dir_pickle.pt")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_model(tmp_path / "dir_pickle.pt")

    bad = dict(ckpt, model_options={"arch": "resnet101_fpn_rmac"})
    del bad["pca"]
    torch.save(bad, tmp_path / "fpn.pt")
    with pytest.raises(ValueError, match="dirtorch architecture 'resnet101_fpn_rmac' is not supported"):
        load_model(tmp_path / "fpn.pt")


def test_shared_mobilenet_weights_load(mobilenet_weights):
    import timm
    from safetensors.torch import load_file

    m = create_model("mobilenetv2_100.coral", "gem", weights=str(mobilenet_weights))
    assert m.mean == pytest.approx((128 / 255,) * 3) and m.dim == 1280
    ref = timm.create_model("mobilenetv2_100", num_classes=1001, pad_type="same")
    ref.load_state_dict(load_file(str(mobilenet_weights)), strict=True)
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(m.trunk.forward_features(X), ref.forward_features(X))
    assert m.weights_sha256 == json.loads(mobilenet_weights.with_suffix(".json").read_text())["weights_sha256"]
    # without pad_type="same" (plain timm name) the keys and shapes fit but the features
    # would differ: the file is recognised and refused, naming the preset to use
    with pytest.raises(ValueError, match=r"preset 'mobilenetv2_100.coral'.*Conv2dSame.*input mean.*--model mobilenetv2_100.coral"):
        create_model("mobilenetv2_100", "gem", weights=str(mobilenet_weights))
    plain = create_model("mobilenetv2_100", "gem")
    with pytest.raises(ValueError, match="mobilenetv2_100.coral"):
        load_weights(plain, mobilenet_weights)
    assert plain.weights_sha256 is None
    v1 = mobilenet_weights.parent / "mobilenetv1_100.coral_in1k.safetensors"
    if v1.is_file():
        with pytest.raises(ValueError, match="--model mobilenetv1_100.coral"):
            create_model("mobilenetv1_100", "gem", weights=str(v1))
        assert create_model("mobilenetv1_100.coral", "gem", weights=str(v1)).dim == 1024


def test_weights_metadata_and_sidecar_are_checked(tmp_path):
    """Files outside the registry: safetensors metadata naming the timm model and its
    arguments, and a .json beside the file giving its mean/std, are checked too."""
    import timm

    src = timm.create_model("mobilenetv2_100", num_classes=0, pad_type="same").state_dict()
    f = tmp_path / "mnv2.safetensors"
    save_file({k: v.contiguous() for k, v in src.items()}, str(f),
              metadata={"timm_model": "mobilenetv2_100", "timm_kwargs": json.dumps({"num_classes": 1001, "pad_type": "same"})})
    with pytest.raises(ValueError, match=r"timm model 'mobilenetv2_100' with \{'pad_type': 'same'\}.*--model mobilenetv2_100.coral"):
        create_model("mobilenetv2_100", weights=str(f))
    m = create_model("mobilenetv2_100.coral", weights=str(f))
    assert m.weights_sha256 == imret.weights.file_sha256(f)
    create_model("mobilenetv2_100", weights=str(f), backbone_kwargs={"pad_type": "same"})  # the same model, spelled out

    # a sidecar that describes this file (same SHA-256): its mean/std must be the model's
    g = tmp_path / "plain.pth"
    torch.save(timm.create_model("mobilenetv2_100", num_classes=0).state_dict(), g)
    side = {"weights_sha256": imret.weights.file_sha256(g), "mean": [0.5] * 3, "std": [0.5] * 3}
    g.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match=r"input mean \(0.5, 0.5, 0.5\) for these weights but \(0.485"):
        create_model("mobilenetv2_100", weights=str(g))
    create_model("mobilenetv2_100", weights=str(g), mean=(0.5,) * 3, std=(0.5,) * 3)
    # a sidecar of another file is not about this one
    g.with_suffix(".json").write_text(json.dumps(dict(side, weights_sha256="0" * 64)))
    create_model("mobilenetv2_100", weights=str(g))


def test_checkpoint_into_a_different_trunk_is_an_error(tmp_path):
    """A whole-network checkpoint whose trunk needs TF padding, loaded into a model built
    without it: same keys and shapes, refused."""
    m = create_model("mobilenetv2_100.coral", "gem")
    save_model(m, tmp_path / "coral.safetensors")
    with pytest.raises(ValueError, match=r"'mobilenetv2_100.coral' network whose trunk differs.*Conv2dSame.*load_model"):
        create_model("mobilenetv2_100", "gem", weights=str(tmp_path / "coral.safetensors"))
    assert load_model(tmp_path / "coral.safetensors").spec.backbone == "mobilenetv2_100.coral"


def test_weights_sha256_names_the_loaded_file(tmp_path):
    m = create_model("resnet18", "gem")
    assert m.weights_sha256 is None  # random weights
    save_model(m, tmp_path / "a.pt")
    torch.save(m.trunk.state_dict(), tmp_path / "trunk.pth")
    assert load_model(tmp_path / "a.pt").weights_sha256 == imret.weights.file_sha256(tmp_path / "a.pt")
    assert load_weights(m, tmp_path / "trunk.pth").weights_sha256 == imret.weights.file_sha256(tmp_path / "trunk.pth")
    import hashlib

    assert imret.weights.file_sha256(tmp_path / "a.pt") == hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    # the spec is unchanged: old checkpoints and stores keep loading, new ones add no key
    assert set(ModelSpec().to_dict()) == {"backbone", "pool", "pool_kwargs", "whitening", "l2_before_whiten",
                                          "backbone_kwargs", "mean", "std"}


def test_preset_without_download_fails_clearly():
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        create_trunk("mobilenetv2_100.coral", pretrained=True)


def test_offline_without_cache_gives_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    code = "import imret\ntry:\n    imret.create_model('resnet18', pretrained=True)\nexcept imret.WeightsUnavailableError as e:\n    print('ERR', e)\n"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR no pretrained weights for backbone 'resnet18': the Hugging Face hub cannot be reached " \
           "(HF_HUB_OFFLINE is set)" in r.stdout, r.stdout + r.stderr
    assert "--weights" in r.stdout


def test_set_whitening_folds_projection():
    m = create_model("resnet18", "gem")
    P = torch.randn(8, 512, generator=torch.Generator().manual_seed(3))
    mu = torch.randn(512, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        v = F.normalize(m.pool(m.trunk.forward_features(X)), dim=1)
    m.set_whitening(P, mu)
    assert m.dim == 8 and m.spec.whitening == 8
    torch.testing.assert_close(_out(m), F.normalize((v - mu) @ P.T, dim=1), atol=1e-5, rtol=1e-5)
