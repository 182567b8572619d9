"""`imret search --text`, `imret index build/configure --text-model`, `imret index info` and
`imret eval --captions` end to end, in-process, on generated photos with generated captions."""

import csv
import json

import numpy as np
import pytest

from conftest import installed

pytestmark = [pytest.mark.skipif(not installed("sklearn", "nltk"), reason="the text extra (scikit-learn, nltk) "
                                                                          "is not installed"),
              pytest.mark.usefixtures("one_torch_thread")]

from imret import semantic_eval as se  # noqa: E402
from imret.cli import main  # noqa: E402
from imret.index.store import Store  # noqa: E402
from imret.text import CaptionEncoder, tfidf_similarity  # noqa: E402
from test_text_search import NAMES, captions_of, joint_text_model, object_of  # noqa: E402

RUN = ["--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def db(small_store):
    with Store.open(small_store) as st:
        recs = st.list(0, 1000)
        phi = np.asarray(st.descriptors(), np.float32)[[r.id for r in recs]]
    return [r.path for r in recs], phi


@pytest.fixture(scope="module")
def text_path(db, tmp_path_factory):
    paths, phi = db
    p = tmp_path_factory.mktemp("text") / "text.safetensors"
    joint_text_model(paths, phi).save(p)
    return p


@pytest.fixture(scope="module")
def model_path(tiny_model, tmp_path_factory):
    from imret.models.checkpoints import save_model

    p = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(tiny_model, p)
    return p


@pytest.fixture(scope="module")
def text_store(small_store, text_path, tmp_path_factory):
    """A copy of the small store with the caption model added by `imret index configure`."""
    import shutil

    path = tmp_path_factory.mktemp("store") / "store"
    shutil.copytree(small_store, path)
    assert main(["index", "configure", str(path), "--text-model", str(text_path)]) == 0
    return path


def expected(store, texts, k):
    with Store.open(store) as st:
        res = st.search(text=texts, k=k)
    return [(t, rank, h.id, h.path, h.score) for t, hits in zip(texts, res) for rank, h in enumerate(hits, 1)]


TEXTS = ["a red dog", "the yellow car"]


def test_search_text_jsonl_csv_json_equal_store_search(text_store, capsys):
    want = expected(text_store, TEXTS, 4)
    assert main(["search", str(text_store), "--text", TEXTS[0], "--text", TEXTS[1], "-k", "4", "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["query"], r["rank"], r["id"], r["path"]) for r in rows] == [w[:4] for w in want]
    assert all(abs(r["score"] - w[4]) < 1e-6 for r, w in zip(rows, want))
    assert main(["search", str(text_store), "--text", TEXTS[0], "--text", TEXTS[1], "-k", "4", "--format", "csv"]) == 0
    got = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [(r["query"], int(r["rank"]), int(r["id"])) for r in got] == [w[:3] for w in want]
    assert main(["search", str(text_store), "--text", TEXTS[0], "-k", "3", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc[0]["query"] == TEXTS[0] and [h["id"] for h in doc[0]["results"]] == [w[2] for w in want[:3]]
    assert all(object_of(h["path"]) == NAMES.index("red dog") for h in doc[0]["results"][:2])  # the object named


def test_search_text_table_html_png(text_store, tmp_path, capsys):
    assert main(["search", str(text_store), "--text", "blue cat", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("text blue cat") and len([ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]) == 3
    html = tmp_path / "r.html"
    assert main(["search", str(text_store), "--text", "blue cat", "-k", "3", "--format", "html", "--out", str(html)]) == 0
    page = html.read_text()
    assert "text: blue cat" in page and page.count("<img") == 4  # the text's card and 3 hits
    png = tmp_path / "r.png"
    assert main(["search", str(text_store), "--text", "blue cat", "-k", "3", "--format", "png", "--out", str(png)]) == 0
    from PIL import Image

    assert Image.open(png).size[0] > 3 * 64


def test_search_text_skips_unknown_words_and_refuses_what_cannot_serve_a_text(text_store, small_store, capsys,
                                                                              small_photos, tmp_path):
    assert main(["search", str(text_store), "--text", "zebra", "--text", "red dog", "-k", "2"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 of 2" in captured.err and "zebra" in captured.err and "vocabulary" in captured.err
    assert main(["search", str(text_store), "--text", "zebra"]) == 1
    assert "could be searched" in capsys.readouterr().err
    for extra, message in ((["--rerank", "sift:10"], "pixels"), (["--localize"], "no object"),
                           (["--list", str(tmp_path / "l.txt")], "not both")):
        assert main(["search", str(text_store), "--text", "dog", *extra]) == 1
        assert message in capsys.readouterr().err
    assert main(["search", str(text_store), small_photos[0], "--text", "dog"]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["search", str(small_store), "--text", "red dog"]) == 1  # no caption model
    assert "no caption model" in capsys.readouterr().err
    small = tmp_path / "small.safetensors"
    CaptionEncoder(dim=32).fit(["a dog", "a dog runs", "a cat", "a cat sits"]).save(small)
    assert main(["search", str(text_store), "--text", "dog", "--text-model", str(small)]) == 1
    assert "32-D" in capsys.readouterr().err
    assert main(["search", str(text_store), small_photos[0], "--text-model", str(small)]) == 1
    assert "--text" in capsys.readouterr().err


def test_search_text_with_another_caption_model(text_store, tmp_path, capsys, db):
    other = CaptionEncoder(dim=512).fit(["a red dog", "a red dog runs", "a cat", "a cat sits"])
    f = tmp_path / "other.safetensors"
    other.save(f)
    assert main(["search", str(text_store), "--text", "red dog", "--text-model", str(f), "-k", "3",
                 "--format", "jsonl"]) == 0
    ids = [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]
    with Store.open(text_store) as st:
        raw = np.asarray(st.descriptors(), np.float32)
    assert ids == np.argsort(-(other.encode_text(["red dog"]) @ raw.T)[0], kind="stable")[:3].tolist()


def test_info_configure_and_refusals(text_store, text_path, small_store, tmp_path, capsys, model_path):
    import shutil

    assert main(["index", "info", str(text_store)]) == 0
    out = capsys.readouterr().out
    assert "caption model" in out and "-> 512-D" in out and str(text_path) in out
    assert main(["index", "info", str(text_store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["text"]["dim"] == 512 and info["text"]["searchable"] is True
    copy = tmp_path / "store"
    shutil.copytree(text_store, copy)
    assert main(["index", "configure", str(copy), "--whiten", "pca", "--whiten-dim", "8"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(copy)]) == 0
    assert "text search off" in capsys.readouterr().out
    assert main(["search", str(copy), "--text", "red dog"]) == 1
    assert "whitening" in capsys.readouterr().err
    assert main(["index", "configure", str(copy), "--text-model", "none"]) == 0
    assert "dropped" in capsys.readouterr().out
    assert main(["index", "info", str(copy)]) == 0
    assert "text       none" in capsys.readouterr().out
    assert main(["index", "configure", str(copy), "--text-model", str(model_path)]) == 1  # an image model
    assert "image model" in capsys.readouterr().err


def test_build_with_a_text_model(small_photos, model_path, text_path, tmp_path, capsys):
    out = tmp_path / "built"
    assert main(["index", "build", *small_photos[:4], "--out", str(out), "--model", str(model_path),
                 "--image-size", "96", "--text-model", str(text_path), *RUN]) == 0
    capsys.readouterr()
    assert main(["search", str(out), "--text", "red dog", "-k", "2", "--format", "jsonl"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    bad = tmp_path / "small.safetensors"
    CaptionEncoder(dim=32).fit(["a dog", "a dog runs", "a cat", "a cat sits"]).save(bad)
    assert main(["index", "build", *small_photos[:2], "--out", str(tmp_path / "b2"), "--model", str(model_path),
                 "--image-size", "96", "--text-model", str(bad), *RUN]) == 1
    assert "32-D" in capsys.readouterr().err and not (tmp_path / "b2").exists()


# --- imret eval --captions -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def captions_csv(small_photos, tmp_path_factory):
    d = tmp_path_factory.mktemp("captions")
    with open(d / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for p, caps in zip(small_photos, captions_of(small_photos)):
            for c in caps:
                w.writerow([p, c])
    return d / "captions.csv"


def test_eval_captions_equals_semantic_eval(captions_csv, small_photos, model_path, text_path, db, tmp_path,
                                            capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--captions", str(captions_csv), "--model", str(model_path), "--text-model",
                 str(text_path), "--image-size", "96", "--ndcg-k", "3", "--ndcg-k", "10", "--out", str(out),
                 *RUN]) == 0
    printed = capsys.readouterr().out
    assert "text -> image" in printed and "image -> text" in printed and "NDCG" in printed
    res = json.loads((out / "results.json").read_text())
    # the reference: the store's descriptors of the same photos (same model, 96 px)
    paths, phi = db
    row = {p: i for i, p in enumerate(paths)}
    phi = phi[[row[p] for p in small_photos]]
    caps = captions_of(small_photos)
    flat = [c for cs in caps for c in cs]
    owner = np.repeat(np.arange(len(caps)), [len(c) for c in caps])
    ref = se.evaluate_cross_modal(phi, CaptionEncoder.load(text_path).encode_text(flat), owner).to_dict()
    cm = res["cross_modal"]
    for key in ("text_to_image", "image_to_text"):
        assert cm[key] == pytest.approx({str(k): v for k, v in ref[key].items()})
        assert cm[key + "_median_rank"] == ref[key + "_median_rank"]
    assert cm["num_images"] == 20 and cm["num_texts"] == 40
    rel = tfidf_similarity(CaptionEncoder(dim=1).fit(flat).transform_images(caps))
    sem = se.evaluate_semantic(phi @ phi.T, rel, exclude_self=True, ks=(3, 10)).to_dict()
    assert res["semantic"]["ndcg"] == pytest.approx({str(k): v for k, v in sem["ndcg"].items()}, abs=1e-6)
    assert res["semantic"]["pcc_all"] == pytest.approx(sem["pcc_all"], abs=1e-6)
    assert cm["text_to_image"]["10"] > 0.5  # the stand-in joint model does find the images


def test_eval_captions_split_file_and_refusals(captions_csv, small_photos, model_path, text_path, tmp_path, capsys):
    base = ["eval", "--model", str(model_path), "--text-model", str(text_path), "--image-size", "96", *RUN]
    split = tmp_path / "split.txt"
    split.write_text("000.jpg\n002.jpg\n003.jpg\n")
    one = tmp_path / "one.csv"  # the photos of one object: their file names are unique
    with open(one, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for p, caps in zip(small_photos[:5], captions_of(small_photos[:5])):
            w.writerows([p, c] for c in caps)
    out = tmp_path / "eval"
    assert main(base + ["--captions", str(one), "--split-file", str(split), "--ndcg-k", "2", "--out", str(out)]) == 0
    assert "(split.txt)" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["cross_modal"]["num_images"] == 3
    # the same file names in several folders: a split list by name is ambiguous
    assert main(base + ["--captions", str(captions_csv), "--split-file", str(split)]) == 1
    assert "share the file name" in capsys.readouterr().err
    missing = tmp_path / "missing.txt"
    missing.write_text("nope.jpg\n")
    assert main(base + ["--captions", str(one), "--split-file", str(missing)]) == 1
    assert "no caption" in capsys.readouterr().err
    base += ["--captions", str(captions_csv)]
    for extra, message in ((["--whiten", "pca"], "post-processing"), (["--split", "test"], "--split-file"),
                           (["--flickr8k", str(tmp_path)], "not both")):
        assert main(base + extra) == 1
        assert message in capsys.readouterr().err
    assert main(["eval", "--captions", str(captions_csv), "--model", str(model_path), *RUN]) == 1
    assert "--text-model" in capsys.readouterr().err
    assert main(["eval", str(captions_csv), "--text-model", str(text_path)]) == 1
    assert "--captions" in capsys.readouterr().err
