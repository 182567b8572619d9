"""`imret index ...` and `imret search` end to end, in-process, on generated images."""

import json
import os
import shutil

import pytest
from PIL import Image

from imret.cli import main
from imret.synthetic import make_labelled_folder

MODEL = ["--model", "resnet18", "--no-pretrained", "--image-size", "96", "--no-progress"]
RUN = ["--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_labelled_folder(tmp_path_factory.mktemp("ph"), n_classes=4, per_class=4, size=(160, 120))


@pytest.fixture(scope="module")
def store(tmp_path_factory, photos):
    out = tmp_path_factory.mktemp("st") / "store"
    files = sorted(str(p) for p in photos.rglob("*.jpg"))
    assert main(["index", "build", *files[:10], "--out", str(out), *MODEL, "--workers", "0", "--commit-every", "4"]) == 0
    return out


@pytest.fixture
def store_copy(store, tmp_path):
    shutil.copytree(store, tmp_path / "s")
    return tmp_path / "s"


def test_build_add_info_remove(store_copy, photos, capsys):
    capsys.readouterr()
    assert main(["index", "add", str(store_copy), str(photos), *RUN]) == 0
    out = capsys.readouterr().out
    assert "added 6 image(s)" in out and "10 already indexed" in out and "16 images" in out
    assert main(["index", "info", str(store_copy), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "images     16 (0 removed)" in out and "verify     ok" in out and "resnet18 + gem, 512-D" in out
    assert main(["index", "remove", str(store_copy), "3", "4"]) == 0
    assert "removed 2 image(s); 14 left" in capsys.readouterr().out
    first = sorted(str(p) for p in photos.rglob("*.jpg"))[0]
    assert main(["index", "remove", str(store_copy), "--path", first]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(store_copy), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 13 and info["removed"] == 3 and info["problems"] == []
    assert main(["index", "remove", str(store_copy), "99"]) == 1
    assert "unknown image ids: [99]" in capsys.readouterr().err


def test_search_table_json_html_png(store, photos, tmp_path, capsys):
    files = sorted(str(p) for p in photos.rglob("*.jpg"))
    capsys.readouterr()
    assert main(["search", str(store), files[2], "-k", "3", *RUN]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query {files[2]}" and lines[2].split()[:3] == ["1", "1.0000", "2"]
    assert len(lines) == 2 + 3

    # several queries, one with a crop, JSON to stdout
    assert main(["search", str(store), files[0], files[5], "--bbox", "0,0,160,120", "--bbox", "20,10,120,100",
                 "-k", "4", "--format", "json", *RUN]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in res] == [files[0], files[5]]
    assert res[1]["bbox"] == [20, 10, 120, 100]
    assert [h["rank"] for h in res[0]["results"]] == [1, 2, 3, 4] and res[0]["results"][0]["id"] == 0
    scores = [h["score"] for h in res[1]["results"]]
    assert scores == sorted(scores, reverse=True)

    html = tmp_path / "r.html"
    assert main(["search", str(store), files[1], "--format", "html", "--out", str(html), "-k", "3", *RUN]) == 0
    text = html.read_text()
    assert text.count("data:image/jpeg;base64,") == 4 and os.path.basename(files[1]) in text
    png = tmp_path / "r.png"
    assert main(["search", str(store), files[1], "--format", "png", "--out", str(png), "-k", "3", *RUN]) == 0
    with Image.open(png) as im:
        assert im.size[0] > 4 * 128


def test_search_bad_input(store, photos, tmp_path, capsys):
    files = sorted(str(p) for p in photos.rglob("*.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    assert main(["search", str(store), str(bad), *RUN]) == 1
    assert "bad.jpg" in capsys.readouterr().err
    assert main(["search", str(store), str(tmp_path / "none.jpg"), *RUN]) == 1
    assert main(["search", str(store), files[0], "--format", "png", *RUN]) == 1
    assert "--out" in capsys.readouterr().err
    assert main(["search", str(store), files[0], files[1], "--bbox", "0,0,10,10", *RUN]) == 1
    with pytest.raises(SystemExit):
        main(["search", str(store), files[0], "--bbox", "10,10,5,5"])
    assert main(["search", str(tmp_path / "nostore"), files[0], *RUN]) == 1
    assert "no store" in capsys.readouterr().err


def test_configure_whitening_qe_dba_and_backend(store_copy, photos, tmp_path, capsys):
    files = sorted(str(p) for p in photos.rglob("*.jpg"))
    assert main(["index", "configure", str(store_copy), "--whiten", "pca", "--whiten-dim", "8",
                 "--qe", "alpha", "--qe-k", "2", "--dba-k", "2"]) == 0
    assert main(["index", "info", str(store_copy), "--json"]) == 0
    capsys.readouterr()
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("0,1\n1,2\n" + f"{files[4]},{files[5]}\n5,6\n8,9\n")
    assert main(["index", "configure", str(store_copy), "--whiten", "lw", "--pairs", str(pairs), "--whiten-dim", "4"]) == 0
    assert "learned whitening fitted on 5 matching pairs" in capsys.readouterr().out
    assert main(["search", str(store_copy), files[3], "-k", "2", "--format", "json", *RUN]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["results"][0]["id"] == 3
    assert main(["index", "configure", str(store_copy), "--whiten", "lw"]) == 1
    assert "--pairs" in capsys.readouterr().err
    assert main(["index", "configure", str(store_copy)]) == 1
    pytest.importorskip("faiss")
    assert main(["index", "configure", str(store_copy), "--backend", "faiss:HNSW8", "--whiten", "none", "--dba-k", "0", "--qe", "none"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(store_copy), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"]["spec"].startswith("faiss:HNSW8") and info["problems"] == [] and info["search_dim"] == 512
    assert main(["search", str(store_copy), files[7], "-k", "1", "--format", "json", *RUN]) == 0
    assert json.loads(capsys.readouterr().out)[0]["results"][0]["id"] == 7
    assert main(["index", "rebuild", str(store_copy)]) == 0


def test_build_refuses_existing_store(store, photos, capsys):
    assert main(["index", "build", str(photos), "--out", str(store), *MODEL]) == 1
    assert "already holds a store" in capsys.readouterr().err


def test_build_skips_a_jpeg_whose_header_overstates_its_size(photos, tmp_path, capsys):
    import struct

    src = tmp_path / "in"
    src.mkdir()
    files = sorted(photos.rglob("*.jpg"))[:2]
    for f in files:
        shutil.copy(f, src / f.name)
    data = bytearray(files[0].read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 9000, 9000)  # the data holds 160x120
    (src / "huge.jpg").write_bytes(bytes(data))
    out = tmp_path / "store"
    assert main(["index", "build", str(src), "--out", str(out), *MODEL, "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {src / 'huge.jpg'}: " in err and "9000x9000 pixels its header declares" in err
    assert main(["index", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2  # never indexed as a grey image
