"""The CLI end to end, in-process, on generated images."""

import json

import numpy as np
import pytest
from PIL import Image

from imret.cli import _scales, main
from imret.synthetic import make_labelled_folder, make_revisitop

MODEL = ["--model", "resnet18", "--no-pretrained", "--image-size", "128", "--no-progress", "--workers", "2"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return make_labelled_folder(tmp_path_factory.mktemp("lab"), n_classes=4, per_class=4, size=(160, 120))


@pytest.fixture(scope="module")
def revisitop(tmp_path_factory):
    return make_revisitop(tmp_path_factory.mktemp("rv"), n_objects=3, db_per_object=4, n_distractors=3, size=(160, 120))


def test_extract_folder_with_bad_file(labelled, tmp_path, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    rc = main(["extract", str(labelled), str(bad), "--out", str(tmp_path / "feats.npy"), *MODEL, "--scales", "1,1/sqrt2"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "skipped 1 image(s)" in err and "broken.jpg" in err
    d = np.load(tmp_path / "feats.npy")
    paths = (tmp_path / "feats.paths.txt").read_text().splitlines()
    assert d.shape == (16, 512) and len(paths) == 16 and d.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1, rtol=1e-5)
    meta = json.loads((tmp_path / "feats.json").read_text())
    assert meta["scales"] == pytest.approx([1, 2**-0.5]) and meta["skipped"][0]["path"].endswith("broken.jpg")


def test_extract_list_file(labelled, tmp_path):
    files = sorted(str(p) for p in labelled.rglob("*.jpg"))[:3]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(files) + "\n")
    assert main(["extract", "--list", str(lst), "--out", str(tmp_path / "f"), *MODEL]) == 0
    assert (tmp_path / "f.paths.txt").read_text().splitlines() == files


def test_eval_revisitop_writes_table_json_and_plots(revisitop, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["eval", str(revisitop.parent), "--out", str(out), *MODEL]) == 0
    text = capsys.readouterr().out
    assert "Easy" in text and "Medium" in text and "Hard" in text and "mAP (random)" in text
    res = json.loads((out / "results.json").read_text())
    assert set(res["result"]) >= {"easy", "medium", "hard"}
    assert 0 <= res["result"]["medium"]["map"] <= 1
    for png in ("ap_per_query.png", "topk.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100 and im.size[1] > 50


def test_eval_labelled_folder_and_csv(labelled, tmp_path, capsys):
    assert main(["eval", str(labelled), "--out", str(tmp_path / "a"), *MODEL]) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())["result"]
    assert 0 < res["map"] <= 1
    csv = tmp_path / "set.csv"
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(labelled.rglob("*.jpg"))]
    csv.write_text("\n".join(rows) + "\n")
    assert main(["eval", str(csv), "--out", str(tmp_path / "b"), *MODEL, "--no-plots"]) == 0
    res2 = json.loads((tmp_path / "b" / "results.json").read_text())["result"]
    assert res2["map"] == pytest.approx(res["map"], abs=1e-6)  # same images, same labels


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing"), *MODEL]) == 1
    assert "neither a gnd_*.pkl" in capsys.readouterr().err
    assert main(["extract", str(tmp_path), "--out", str(tmp_path / "x.npy"), *MODEL]) == 1
    assert "no images found" in capsys.readouterr().err
    assert main(["extract", "a.jpg", "--out", "x.npy", "--model", "resnet51", "--no-pretrained"]) == 1
    assert "unknown backbone 'resnet51'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["extract", "a.jpg", "--out", "x.npy", "--scales", "1,abc"])


def test_scale_parser():
    assert _scales("1,1/sqrt2,1/2") == pytest.approx((1, 2**-0.5, 0.5))
    assert _scales("0.5") == (0.5,)


def test_models_listing(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv2_100.coral" in out and "rgem" in out
