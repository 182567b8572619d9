"""A DOLG model everywhere a model goes: imret train -> extract, index, search, eval, serve (generated images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from imret import load_model
from imret.index.store import Store
from imret.cli import main
from imret.synthetic import make_labelled_folder, make_revisitop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = ["--no-progress", "--workers", "0", "--image-size", "96"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few CurricularFace steps of a DOLG MobileNetV2 (random start) through `imret train`."""
    root = tmp_path_factory.mktemp("dolg")
    images = make_labelled_folder(root / "images", n_classes=4, per_class=3, size=(96, 80), seed=0)
    gnd = make_revisitop(root / "val", n_objects=2, db_per_object=3, n_distractors=2, size=(96, 80), seed=1)
    cfg = {
        "out": str(root / "run"), "epochs": 1, "device": "cpu", "seed": 1,
        "model": {"backbone": "mobilenetv2_100", "pretrained": False, "head": "dolg",
                  "head_kwargs": {"dim": 32, "local_dim": 24, "atrous_rates": [1, 2, 3]}},
        "data": {"root": str(images), "image_size": 80, "workers": 0},
        "loss": {"name": "curricularface"},
        "mining": {"classes_per_batch": 2, "per_class": 3},
        "optim": {"name": "sgd", "lr": 0.01},
        "validation": {"gnd": str(gnd), "image_size": 96},
    }
    (root / "dolg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "dolg.yaml"), "--no-progress"]) == 0
    return {"model": root / "run" / "model_best.safetensors", "images": images, "gnd": gnd, "root": root}


def test_train_extract_index_search_eval(trained, tmp_path, capsys):
    model = str(trained["model"])
    net = load_model(model)
    assert net.spec.head == "dolg" and net.dim == 32 and net.head.atrous.rates == (1, 2, 3)
    capsys.readouterr()

    # extract: the checkpoint rebuilds the model; multi-scale with the DOLG preset
    out = tmp_path / "feats.npy"
    assert main(["extract", str(trained["images"]), "--out", str(out), "--model", model, "--scales", "dolg5", *RUN]) == 0
    d = np.load(out)
    meta = json.loads((tmp_path / "feats.json").read_text())
    assert d.shape == (12, 32) and meta["scales"] == pytest.approx([8 ** -0.5, 0.5, 2 ** -0.5, 1, 2 ** 0.5])
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1, rtol=1e-5)

    # index, search: the store records the DOLG spec and searches with it
    store = tmp_path / "store"
    assert main(["index", "build", str(trained["images"]), "--out", str(store), "--model", model, *RUN]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["spec"]["head"] == "dolg" and info["images"] == 12
    assert main(["index", "info", str(store)]) == 0
    assert "mobilenetv2_100 + gem (dolg head), 32-D" in capsys.readouterr().out
    query = sorted(trained["images"].rglob("*.jpg"))[0]
    assert main(["search", str(store), str(query), "-k", "3", "--format", "json", *RUN[:1]]) == 0
    first = json.loads(capsys.readouterr().out)[0]["results"][0]
    assert first["path"].endswith(query.name) and first["score"] == pytest.approx(1.0, abs=1e-4)
    with Store.open(store) as s:
        assert s.model.spec.head == "dolg"

    # eval: the revisited protocol with cropped queries, on the same model
    res = tmp_path / "res"
    assert main(["eval", str(trained["gnd"].parent), "--model", model, "--out", str(res), "--no-plots", *RUN]) == 0
    r = json.loads((res / "results.json").read_text())
    assert 0.0 <= r["result"]["medium"]["map"] <= 1.0 and r["model"]["head"] == "dolg"


def test_untrained_dolg_from_the_cli_and_bad_head_args(trained, tmp_path, capsys):
    out = tmp_path / "f.npy"
    args = ["extract", str(trained["images"]), "--out", str(out), "--model", "mobilenetv2_100", "--no-pretrained",
            "--head", "dolg", "--head-arg", "dim=16", "--head-arg", "fusion=concat", *RUN]
    assert main(args) == 0
    assert np.load(out).shape == (12, 16)
    spec = json.loads((tmp_path / "f.json").read_text())["model"]
    assert spec["head"] == "dolg" and spec["head_kwargs"] == {"dim": 16, "fusion": "concat"}
    capsys.readouterr()
    assert main([*args[:-len(RUN)], "--head-arg", "fusion=sum", *RUN]) == 1
    assert "unknown fusion 'sum'; available: orthogonal, concat, hadamard" in capsys.readouterr().err
    assert main(["extract", str(trained["images"]), "--out", str(out), "--model", str(trained["model"]),
                 "--head", "dolg", *RUN]) == 1
    assert "says its own head" in capsys.readouterr().err
    assert main(["extract", str(trained["images"]), "--out", str(out), "--model", "mobilenetv2_100",
                 "--no-pretrained", "--head-arg", "dim", *RUN]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_server_searches_with_a_dolg_store(trained, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from imret.server import ServerConfig, create_app

    store = tmp_path / "store"
    assert main(["index", "build", str(trained["images"]), "--out", str(store), "--model", str(trained["model"]),
                 *RUN]) == 0
    query = sorted(trained["images"].rglob("*.jpg"))[4]
    with Store.open(store) as s:
        expected = [h.id for h in s.search([str(query)], k=5)[0]]
    with TestClient(create_app(store, ServerConfig())) as c:
        with open(query, "rb") as f:
            r = c.post("/api/search", files={"image": (query.name, f, "image/jpeg")}, data={"k": "5"},
                       )
    assert r.status_code == 200, r.text
    got = [h["id"] for h in r.json()["results"]]
    assert got == expected and len(got) == 5
