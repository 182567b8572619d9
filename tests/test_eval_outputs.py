"""What `imret eval` writes for people to read: one unit (%), a chart whose title and legend fit,
a top-k grid whose rows name their query and AP, no paths of this machine, and --cache."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from imret import cli
from imret.cli import eval_cache_key, main, portable_path
from imret.evaluation import RevisitopGroundTruth, evaluate_revisitop, format_table, percent_summary
from imret.plots import draw_topk_grid, revisitop_row_labels, topk_grid_size, wrap_title
from imret.synthetic import make_revisitop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = ["--model", "resnet18", "--no-pretrained", "--image-size", "64", "--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A revisitop set with one unreadable database image (it is skipped and reported)."""
    pkl = make_revisitop(tmp_path_factory.mktemp("rv"), n_objects=3, db_per_object=3, n_distractors=2,
                         size=(96, 72))
    from imret.evaluation import load_revisitop

    gt = load_revisitop(pkl)
    (pkl.parent / "jpg" / f"{gt.imlist[-1]}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return pkl.parent


def _toy():
    gt = RevisitopGroundTruth("toy", [f"d{i}" for i in range(6)], ["q0", "q1"], [None, None],
                              [np.array([0]), np.array([4, 5])], [np.array([1]), np.array([], np.int64)],
                              [np.array([2]), np.array([], np.int64)])
    return gt, evaluate_revisitop(np.array([[3, 2, 0, 1, 4, 5], [4, 0, 5, 1, 2, 3]]), gt)


def test_percent_summary_is_the_table_in_numbers():
    _, r = _toy()
    s = percent_summary(r)
    assert s["unit"] == "%" and s["medium"]["mAP"] == round(100 * r.medium.map, 2)
    assert s["hard"]["mAP"] == 25.0 and set(s["easy"]) == {"mAP", "mP@1", "mP@5", "mP@10", "R@1", "R@5", "R@10"}
    table = format_table(r)
    assert "values in %" in table.splitlines()[0]
    assert f"{s['medium']['mAP']:.2f}" in table.splitlines()[2]


def test_ap_chart_wraps_its_title_and_keeps_the_legend_off_the_bars():
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from imret.plots import ap_per_query_figure

    _, r = _toy()
    title = "rparis6k: store photos (+12 distractors); " + ", ".join(f"step {i} with options" for i in range(12))
    fig = ap_per_query_figure(r, title=title, dpi=60)
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    whole = fig.bbox
    head = fig._suptitle.get_window_extent(renderer)
    assert head.x0 >= whole.x0 and head.x1 <= whole.x1 and head.y1 <= whole.y1  # not cut
    assert fig._suptitle.get_text().count("\n") >= 2  # wrapped
    ax = fig.axes[0]
    legend = fig.legends[0].get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer))  # beside the axes, not on the bars
    assert legend.y1 <= ax.get_window_extent(renderer).y0 and legend.y0 >= whole.y0
    assert ax.get_ylabel() == "AP (%)" and ax.get_ylim()[1] > 100
    heights = sorted(p.get_height() for p in ax.patches)
    best = max(np.nanmax(r.protocol(p).ap) for p in ("easy", "medium", "hard"))
    assert heights[-1] == pytest.approx(100 * best) and 50 < heights[-1] <= 100  # AP in percent
    assert any("mAP 60.42 %" in t.get_text() for t in fig.legends[0].get_texts())
    lines = wrap_title("a " * 200, 6.0).splitlines()
    assert len(lines) > 1 and all(len(x) <= 66 for x in lines)


def test_topk_rows_name_their_query_and_ap(tmp_path):
    _, r = _toy()
    labels = revisitop_row_labels(["q0", "q1"], r.medium.ap)
    assert labels == [f"q0  Medium AP {100 * r.medium.ap[0]:.2f} %", "q1  Medium AP 79.17 %"]  # ranks 1 and 3: (1 + 1)/4 + (1/2 + 2/3)/4
    assert revisitop_row_labels(["q0"], [float("nan")]) == ["q0  Medium AP n/a"]
    with pytest.raises(ValueError, match="ap has 1 values but there are 2 queries"):
        revisitop_row_labels(["q0", "q1"], [0.5])
    tile = Image.new("RGB", (40, 30), (0, 0, 255))
    out = draw_topk_grid([tile, tile], [[tile], [tile]], None, tmp_path / "g.png", k=2, thumb=32,
                         row_labels=labels)
    im = Image.open(out).convert("RGB")
    assert im.size == topk_grid_size(2, 2, 32, labels=True) == (topk_grid_size(2, 2, 32)[0],
                                                                 topk_grid_size(2, 2, 32)[1] + 2 * 14)
    strip = np.asarray(im.convert("L"))[4:4 + 14, :]  # the first row's label strip: dark text on white
    assert (strip < 100).sum() > 20 and (strip == 255).mean() > 0.7
    assert im.getpixel((5, 4 + 14 + 1)) == (40, 90, 200)  # the query's frame starts below the strip
    assert im.getpixel((5, 5)) != (40, 90, 200)
    plain = Image.open(draw_topk_grid([tile], [[tile]], None, tmp_path / "p.png", k=2, thumb=32)).convert("RGB")
    assert plain.getpixel((5, 5)) == (40, 90, 200)  # without labels: no strip


def test_eval_results_are_in_percent_and_portable(dataset, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["eval", str(dataset), "--out", str(out), *MODEL]) == 0
    printed = capsys.readouterr().out
    text = (out / "results.json").read_text()
    res = json.loads(text)
    assert res["format"] == "imret-eval-results" and res["version"] == 2
    assert res["units"] == {"result": "fraction (0-1)", "summary": "%"}
    med = res["result"]["medium"]["map"]
    assert 0 <= med <= 1 and res["summary"]["medium"]["mAP"] == round(100 * med, 2)
    assert f"{res['summary']['medium']['mAP']:.2f}" in printed and "values in %" in printed
    # no path of this machine: the dataset by name, skipped images relative to the image folder
    assert str(tmp_path) not in text and str(dataset) not in text and os.path.expanduser("~") not in text
    assert res["dataset"] == dataset.name
    assert len(res["skipped"]) == 1 and not os.path.isabs(res["skipped"][0]["path"])
    assert res["skipped"][0]["path"].endswith(".jpg") and "/" not in res["skipped"][0]["path"]
    with Image.open(out / "topk.png") as im:  # one labelled row per query
        assert im.size == topk_grid_size(3, 10, 128, labels=True)
    with Image.open(out / "ap_per_query.png") as im:
        assert im.size[0] >= 500


def test_portable_path():
    assert portable_path("/data/set/jpg/a.jpg", "/data/set") == os.path.join("jpg", "a.jpg")
    assert portable_path("/home/me/other/b.jpg", "/data/set") == "b.jpg"
    assert portable_path("/data/settings/c.jpg", "/data/set") == "c.jpg"


def test_eval_cache_reuses_descriptors_until_something_changes(dataset, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    cache = tmp_path / "cache"
    args = ["eval", str(data), *MODEL, "--cache", str(cache)]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "descriptors cached in" in first.err and len(list(cache.glob("*.npz"))) == 1

    from imret.retrieval import Encoder

    calls = []
    real = Encoder.encode

    def counting(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(Encoder, "encode", counting)
    assert main(args) == 0  # nothing changed: no image is read again, same table
    second = capsys.readouterr()
    assert "reusing the descriptors cached in" in second.err and not calls
    assert second.out.split("(")[0] == first.out.split("(")[0]

    # a database image rewritten: extracted again (a second cache file)
    img = sorted((data / "jpg").glob("*.jpg"))[0]
    st = os.stat(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert main(args) == 0
    assert "descriptors cached in" in capsys.readouterr().err and calls
    # other crops: extracted again (other weights: see the next test)
    calls.clear()
    assert main(args + ["--no-crop"]) == 0
    assert "descriptors cached in" in capsys.readouterr().err and calls
    assert len(list(cache.glob("*.npz"))) == 3
    assert main(["eval", str(data), *MODEL, "--cache", str(cache / next(cache.glob("*.npz")).name)]) == 1
    assert "is a file" in capsys.readouterr().err


def test_weights_hash_follows_the_weights():
    import torch

    def linear(seed):
        torch.manual_seed(seed)
        return torch.nn.Linear(3, 2)

    assert cli._state_sha256(linear(0)) == cli._state_sha256(linear(0))
    assert cli._state_sha256(linear(0)) != cli._state_sha256(linear(1))
    m = linear(0)
    with torch.no_grad():
        m.bias[0] += 1e-6
    assert cli._state_sha256(m) != cli._state_sha256(linear(0))


def test_eval_cache_key_names_what_it_depends_on():
    key = eval_cache_key(model_spec={"backbone": "resnet18"}, weights="ab", extraction={"image_size": 64},
                         parts={"queries": {"files": [["q.jpg", 3, 4]], "boxes": None}}, dataset_files=[])
    assert set(key) == {"imret", "model", "weights_sha256", "extraction", "parts", "dataset_files"}
    a = cli._eval_cache_file("/c", key)
    b = cli._eval_cache_file("/c", dict(key, extraction={"image_size": 65}))
    assert a != b and a.parent.as_posix() == "/c"
