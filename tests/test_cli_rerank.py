"""The second stage from the command line: `index configure --local/--rerank`, `search
--rerank/--localize` (JSON, CSV, table, PNG) and `eval --rerank`, checked against the library
calls they stand for."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import installed

from imret.cli import main
from imret.index.store import Store

pytestmark = [pytest.mark.skipif(not installed("cv2"), reason="needs opencv-python-headless"),
              pytest.mark.usefixtures("one_torch_thread")]

RUN = ["--no-progress", "--workers", "0"]
LOCAL = "sift?max_keypoints=64&max_side=320"


@pytest.fixture(scope="module")
def photos(view_photos):
    return view_photos


@pytest.fixture(scope="module")
def base(view_store):
    return view_store


def test_configure_info_search_json_csv_table(base, copy_store, photos, capsys, tmp_path):
    path = copy_store(base)
    assert main(["index", "configure", str(path), "--local", LOCAL, "--rerank", "sift:8?min_inliers=6",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "sift local features" in out and "re-ranked by sift:8?min_inliers=6" in out
    assert main(["index", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "local      sift, at most 64 x 128-D (u8)" in out and "re-rank    sift:8?min_inliers=6" in out
    q = photos[8]  # a third view of the object of stored photos 6 and 7
    with Store.open(path) as st:
        want = st.search(q, k=4, workers=0)
    assert {h.id for h in want[:2]} == {6, 7}
    assert main(["search", str(path), q, "-k", "4", "--format", "json", *RUN]) == 0
    got = json.loads(capsys.readouterr().out)[0]["results"]
    assert [r["id"] for r in got] == [h.id for h in want]
    assert [r.get("inliers") for r in got] == [h.extras.get("inliers") for h in want]
    assert all(isinstance(r["inliers"], int) and len(r["transform"]) == 3 for r in got[:2])
    assert main(["search", str(path), q, "-k", "4", "--format", "csv", *RUN]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(r["id"]) for r in rows] == [h.id for h in want] and rows[0]["inliers"] == str(want[0].extras["inliers"])
    assert main(["search", str(path), q, "-k", "4", *RUN]) == 0
    assert "inliers" in capsys.readouterr().out
    # --rerank none: the first stage alone
    assert main(["search", str(path), q, "-k", "4", "--format", "json", "--rerank", "none", *RUN]) == 0
    plain = json.loads(capsys.readouterr().out)[0]["results"]
    with Store.open(path) as st:
        assert [r["id"] for r in plain] == [h.id for h in st.search(q, k=4, rerank=[], workers=0)]
    assert all("inliers" not in r for r in plain)
    assert main(["index", "configure", str(path), "--rerank", "none", "--local", "none", "--no-progress"]) == 0
    with Store.open(path) as st:
        assert st.info()["rerank"] == [] and st.local_kind is None


def test_localize_boxes_in_json_and_png(base, copy_store, photos, capsys, tmp_path):
    path = copy_store(base)
    q = photos[8]
    assert main(["search", str(path), q, "-k", "3", "--localize", "--format", "json", *RUN]) == 0
    got = json.loads(capsys.readouterr().out)[0]["results"]
    with Store.open(path) as st:
        want = st.search(q, k=3, rerank=["aml:3"], workers=0)
        sizes = {r.id: (r.width, r.height) for r in st.records([h.id for h in want])}
    assert [r["id"] for r in got] == [h.id for h in want]
    for r in got:
        x1, y1, x2, y2 = r["box"]
        w, h = sizes[r["id"]]
        assert 0 <= x1 < x2 <= w + 1e-3 and 0 <= y1 < y2 <= h + 1e-3
    png = tmp_path / "sheet.png"
    assert main(["search", str(path), q, "-k", "3", "--localize", "--format", "png", "--out", str(png), *RUN]) == 0
    with Image.open(png) as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    yellow = (a[..., 0] > 200) & (a[..., 1] > 180) & (a[..., 2] < 80)
    assert yellow.sum() > 50  # the boxes are drawn


def test_bad_rerank_options_fail_before_any_work(base, copy_store, photos, capsys):
    path = copy_store(base)
    for args, msg in ((["--rerank", "surf:5"], "available: sift, cnn, aml, sg"),
                      (["--rerank", "sift:5?min_inlier=3"], "unknown parameter 'min_inlier'"),
                      (["--rerank", "none", "--rerank", "sg:5"], "give it alone")):
        assert main(["search", str(path), photos[8], *args, *RUN]) != 0
        assert msg in capsys.readouterr().err
    assert main(["search", str(path), photos[8], "--rerank", "sift:5", *RUN]) != 0
    assert "--local sift" in capsys.readouterr().err
    assert main(["index", "configure", str(path), "--local", "sift?max_keypoint=5"]) != 0
    assert "max_keypoint" in capsys.readouterr().err


def test_eval_rerank_matches_the_retriever(tmp_path, capsys):
    from imret.synthetic import make_revisitop

    gnd = make_revisitop(tmp_path / "rv", n_objects=3, db_per_object=4, n_distractors=3, size=(320, 240))
    model = ["--model", "resnet18", "--no-pretrained", "--image-size", "96"]
    assert main(["eval", str(gnd.parent), "--no-plots", "--out", str(tmp_path / "a"), *model, *RUN]) == 0
    assert main(["eval", str(gnd.parent), "--no-plots", "--out", str(tmp_path / "b"), "--rerank", "sift:12?min_inliers=6",
                 *model, *RUN]) == 0
    text = capsys.readouterr().out
    assert "re-ranked by sift:12?min_inliers=6" in text
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert b["pipeline"]["rerank"] == ["sift:12?min_inliers=6"]
    # verification finds the other views of each query's object: they move up
    assert b["result"]["medium"]["map"] >= a["result"]["medium"]["map"]
    assert b["ranking"] != a["ranking"]
    from imret.synthetic import make_labelled_folder

    lab = make_labelled_folder(tmp_path / "lab", n_classes=2, per_class=2, size=(64, 48))
    assert main(["eval", str(lab), "--rerank", "sg:5", *model, *RUN]) != 0
    assert "--rerank applies to revisitop datasets" in capsys.readouterr().err
