"""`imret eval` ranks through the Retriever: its post-processing options against a reference
written out by hand, and a built store evaluated directly, with the store, the server and
`imret eval` giving identical rankings."""

import json
import shutil

import numpy as np
import pytest
import torch

from imret import create_model
from imret.cli import main
from imret.evaluation import evaluate_revisitop_scores, load_revisitop
from imret.expansion import alpha_database_augmentation, expand_with_neighbours
from imret.retrieval import Encoder
from imret.synthetic import make_labelled_folder, make_revisitop
from imret.whitening import fit_pca_whitening

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = ["--model", "resnet18", "--no-pretrained", "--seed", "0", "--image-size", "96", "--no-progress",
         "--workers", "0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_revisitop(tmp_path_factory.mktemp("rv"), n_objects=4, db_per_object=5, n_distractors=6,
                          size=(160, 120))


def run_eval(args, out):
    assert main(["eval", *args, *MODEL, "--out", str(out), "--no-plots"]) == 0
    return json.loads((out / "results.json").read_text())


def maps(payload):
    r = payload["result"]
    return [r[p]["map"] for p in ("easy", "medium", "hard")]


def test_post_processing_options_match_the_pipeline_written_out(dataset, tmp_path):
    got = run_eval([str(dataset), "--whiten", "pca", "--whiten-dim", "16", "--dba-k", "2", "--qe", "alpha",
                    "--qe-k", "2"], tmp_path / "o")
    gt = load_revisitop(dataset)
    torch.manual_seed(0)
    model = create_model("resnet18", "gem", pretrained=False)
    enc = Encoder(model, image_size=96, workers=0)
    db = enc.encode(gt.db_paths(dataset.parent / "jpg"), on_error="raise").descriptors
    q = enc.encode(gt.query_paths(dataset.parent / "jpg"), list(gt.bbx), on_error="raise").descriptors
    w = fit_pca_whitening(db, 16)
    v = alpha_database_augmentation(w.apply(db), 2, 3.0)
    x = w.apply(q)
    s = x @ v.T
    top = np.argsort(-s, axis=1, kind="stable")[:, :2]
    x = expand_with_neighbours(x, v[top], np.take_along_axis(s, top, 1), 3.0)
    ref = evaluate_revisitop_scores(x @ v.T, gt)
    assert maps(got) == pytest.approx([ref.easy.map, ref.medium.map, ref.hard.map], abs=1e-9)
    order = np.argsort(-(x @ v.T), axis=1, kind="stable")
    assert got["ranking"] == [[gt.imlist[j] for j in row[:len(got["ranking"][0])]] for row in order]
    assert got["pipeline"]["whitening"]["learned_on"].startswith("PCA on the")
    assert got["pipeline"]["dba"] == {"k": 2, "alpha": 3.0}


def test_a_store_the_server_and_eval_rank_alike(dataset, tmp_path, capsys):
    store = tmp_path / "store"
    jpg = dataset.parent / "jpg"
    gt = load_revisitop(dataset)
    assert main(["index", "build", *map(str, gt.db_paths(jpg)), "--out", str(store), *MODEL]) == 0
    assert main(["index", "configure", str(store), "--qe", "alpha", "--qe-k", "2"]) == 0
    plain = run_eval([str(dataset), "--qe", "alpha", "--qe-k", "2"], tmp_path / "plain")
    of_store = run_eval([str(dataset), "--store", str(store)], tmp_path / "store-eval")
    assert of_store["ranking"] == plain["ranking"]
    assert maps(of_store) == pytest.approx(maps(plain), abs=1e-12)
    assert of_store["pipeline"]["distractors"] == 0
    # the server answers the first query (cropped) with the same order
    from fastapi.testclient import TestClient

    from imret.server import ServerConfig, create_app

    box = ",".join(str(v) for v in gt.bbx[0])
    with TestClient(create_app(store, ServerConfig())) as c:
        with open(gt.query_paths(jpg)[0], "rb") as f:
            r = c.post("/api/search", files={"image": ("q.jpg", f.read(), "image/jpeg")},
                       data={"bbox": box, "k": str(gt.n_db), "qe": "true"})
    assert r.status_code == 200, r.text
    names = [h["name"].rsplit(".", 1)[0] for h in r.json()["results"]]
    assert names == plain["ranking"][0][:len(names)]
    # other images in the store are distractors: counted, and they can only push positives down
    extra = make_labelled_folder(tmp_path / "extra", n_classes=2, per_class=3, size=(120, 90), seed=5)
    assert main(["index", "add", str(store), str(extra), "--no-progress", "--workers", "0"]) == 0
    with_distractors = run_eval([str(dataset), "--store", str(store)], tmp_path / "distractors")
    assert with_distractors["pipeline"]["distractors"] == 6
    assert all(a <= b + 1e-12 for a, b in zip(maps(with_distractors), maps(of_store)))


def test_store_evaluation_refuses_what_it_cannot_honour(dataset, tmp_path, capsys):
    store = tmp_path / "store"
    jpg = dataset.parent / "jpg"
    gt = load_revisitop(dataset)
    assert main(["index", "build", *map(str, gt.db_paths(jpg)[:-1]), "--out", str(store), *MODEL]) == 0
    capsys.readouterr()
    assert main(["eval", str(dataset), "--store", str(store), "--whiten", "pca"]) == 1
    assert "its own settings" in capsys.readouterr().err
    assert main(["eval", str(dataset), "--store", str(store), "--no-plots"]) == 1
    assert "not in the store" in capsys.readouterr().err
    shutil.rmtree(store)


def test_leave_one_landmark_out_lw_matches_the_folds_written_out(dataset, tmp_path):
    """Each query's Lw is learned only on db-db pairs of the other landmarks (here each
    synthetic query is its own landmark) and never on an image of its own ground truth."""
    from imret.evaluation import ground_truth_set
    from imret.whitening import fit_learned_whitening

    got = run_eval([str(dataset), "--whiten", "lw", "--whiten-on", "landmarks"], tmp_path / "o")
    gt = load_revisitop(dataset)
    torch.manual_seed(0)
    enc = Encoder(create_model("resnet18", "gem", pretrained=False), image_size=96, workers=0)
    db = enc.encode(gt.db_paths(dataset.parent / "jpg"), on_error="raise").descriptors
    q = enc.encode(gt.query_paths(dataset.parent / "jpg"), list(gt.bbx), on_error="raise").descriptors
    scores = np.empty((gt.n_queries, gt.n_db), np.float32)
    for i in range(gt.n_queries):
        banned = ground_truth_set(gt, i)
        pairs = sorted({(a, b) for j in range(gt.n_queries) if j != i
                        for a in ground_truth_set(gt, j, ("easy", "hard")) - banned
                        for b in ground_truth_set(gt, j, ("easy", "hard")) - banned if a < b})
        images = sorted({a for p in pairs for a in p})
        local = {g: k for k, g in enumerate(images)}
        p = np.array([(local[a], local[b]) for a, b in pairs] + [(local[b], local[a]) for a, b in pairs])
        w = fit_learned_whitening(db[images], p, eps=1e-6)
        scores[i] = w.apply(q[i:i + 1]) @ w.apply(db).T
    ref = evaluate_revisitop_scores(scores, gt)
    assert maps(got) == pytest.approx([ref.easy.map, ref.medium.map, ref.hard.map], abs=1e-6)
    learned = got["pipeline"]["whitening"]["learned_on"]
    assert len(learned) == gt.n_queries and all("held out" in f["learned_on"] for f in learned)


def test_landmark_folds_of_rparis6k_mini(paris_mini):
    """The four groups BENCHMARKS.md reports, and held-out pairs that never touch the held-out
    queries' ground truth."""
    from imret.evaluation import fold_name, ground_truth_set, held_out_pairs, landmark_folds

    gt = load_revisitop(paris_mini / "gnd_rparis6k-mini.pkl")
    folds = landmark_folds(gt)
    assert sorted(fold_name(gt, f) for f in folds) == ["defense", "eiffel+invalides", "louvre", "moulinrouge"]
    reported = {"defense": (186, 4281), "eiffel+invalides": (138, 3016), "louvre": (187, 4237),
                "moulinrouge": (188, 4282)}  # BENCHMARKS.md, post-processing section: images, unordered pairs
    for f, fold in enumerate(folds):
        fp = held_out_pairs(gt, folds, f)
        assert (len(fp.images), fp.n_pairs) == reported[fold_name(gt, fold)]
        banned = set().union(*(ground_truth_set(gt, i) for i in fold))
        assert not banned & set(fp.images.tolist())
        assert fp.pairs.shape == (2 * fp.n_pairs, 2)


def test_lw_from_a_pairs_file_and_a_saved_whitening(dataset, tmp_path):
    """--whiten lw --pairs CSV learns Lw on those images (paths relative to the CSV); the same
    whitening saved and applied with --whiten-file gives the same evaluation."""
    from imret.whitening import Whitening

    gt = load_revisitop(dataset)
    jpg = dataset.parent / "jpg"
    pos = [sorted(gt.easy[i].tolist() + gt.hard[i].tolist()) for i in range(gt.n_queries)]
    lines = [f"jpg/{gt.imlist[p[0]]}.jpg,jpg/{gt.imlist[b]}.jpg" for p in pos for b in p[1:]]
    pairs = dataset.parent / "pairs.csv"
    pairs.write_text("# matching pairs\n" + "\n".join(lines) + "\n")
    got = run_eval([str(dataset), "--whiten", "lw", "--pairs", str(pairs)], tmp_path / "lw")
    assert got["pipeline"]["whitening"]["learned_on"].startswith(f"Lw from {len(lines)} matching pairs")
    # the same Lw, fitted here and applied from a file
    torch.manual_seed(0)
    enc = Encoder(create_model("resnet18", "gem", pretrained=False), image_size=96, workers=0)
    names = {}
    idx = [[names.setdefault(str(jpg / a.split("/")[1]), len(names)) for a in line.split(",")] for line in lines]
    from imret.whitening import fit_learned_whitening

    w = fit_learned_whitening(enc.encode(list(names), on_error="raise").descriptors, np.array(idx))
    w.save(tmp_path / "w.npz")
    again = run_eval([str(dataset), "--whiten-file", str(tmp_path / "w.npz")], tmp_path / "file")
    assert maps(again) == pytest.approx(maps(got), abs=1e-9) and again["ranking"] == got["ranking"]
    assert isinstance(Whitening.load(tmp_path / "w.npz"), Whitening)
