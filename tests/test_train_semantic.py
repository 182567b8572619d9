"""Training of the joint image–caption embedding (imret.train.semantic), in-process on generated
images with generated captions (MobileNetV2 with random weights, 64 px, CPU)."""

from __future__ import annotations

import copy
import csv
import os
import random
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from imret import load_model
from imret.synthetic import make_labelled_folder
from imret.text import CaptionEncoder
from imret.train import Trainer, config_from_dict, load_config
from imret.train.distributed import DistInfo
from imret.train.semantic import (
    SemanticTrainConfig,
    SemanticTrainer,
    _SquareImages,
    describe_features,
    dev_metrics,
    read_log,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
CLASS_WORDS = [["red", "circle"], ["blue", "square"], ["green", "triangle"], ["yellow", "star"]]
FILLER = ["photo", "picture", "image", "view", "shot", "scene", "thing", "object", "nice", "small"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 objects x 6 views; captions from the object's two class words + random filler words;
    views 0-3 train (3 captions each), 4-5 dev."""
    root = tmp_path_factory.mktemp("semantic")
    make_labelled_folder(root / "img", n_classes=4, per_class=6, size=(80, 64), seed=0)
    rng = random.Random(0)
    train, dev = [], []
    for c, words in enumerate(CLASS_WORDS):
        for i in range(6):
            for _ in range(3):
                cap = " ".join(rng.sample(words + rng.sample(FILLER, 3), 5))
                (train if i < 4 else dev).append((f"img/object_{c:03d}/{i:03d}.jpg", cap))
    for name, rows in (("train.csv", train), ("dev.csv", dev)):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "caption"])
            w.writerows(rows)
    return root


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cfg_dict(root, out, **over) -> dict:
    base = {
        "out": str(out),
        "epochs": 2,
        "batch_size": 8,
        "device": "cpu",
        "model": {"backbone": "mobilenetv2_100", "pretrained": False, "whitening": 8},
        "data": {"kind": "captions", "captions_csv": str(root / "train.csv"), "dev_csv": str(root / "dev.csv"),
                 "image_size": 64, "workers": 0, "cache_dir": str(out / "cache")},
        "text": {"tfidf": {"min_df": 1}},
        "optim": {"lr": 0.01},
        "validation": {"ks": [3, 5]},
    }
    return _merge(base, over)


class Counter:
    def __init__(self):
        self.images = 0

    def __call__(self, n):
        self.images += n


def test_loss_falls_reload_matches_and_text_search_beats_random(data, tmp_path):
    cfg = config_from_dict(cfg_dict(data, tmp_path / "run", epochs=6, optim={"lr": 0.02, "schedule": "none"}))
    assert isinstance(cfg, SemanticTrainConfig)
    trainer = SemanticTrainer(cfg)
    res = trainer.fit()
    losses = [h.loss for h in res.history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(h.dev is not None and "rsum" in h.dev for h in res.history)
    rows = read_log(res.metrics)
    assert [r["epoch"] for r in rows] == list(range(1, 7)) and "t2i_r@1" in rows[0]
    assert res.curves.is_file() and res.steps_log.is_file() and res.config.is_file()
    assert res.best_epoch == max(rows, key=lambda r: r["rsum"])["epoch"]

    # the saved pair reloads and gives the trainer's embeddings, on decoded images too
    model = load_model(res.last_model)
    enc = CaptionEncoder.load(res.last_text)
    texts, owner = trainer.images.flat_captions()
    np.testing.assert_allclose(enc.encode_text(texts), trainer.encoder.encode_text(texts), atol=1e-6)
    with torch.no_grad():
        mine = describe_features(trainer.model.eval(), trainer.train_features(), "pooled").numpy()
        ds = _SquareImages(trainer.images.paths, 64, model.mean, model.std)
        theirs = model(torch.stack([ds[i][0] for i in range(len(ds))])).numpy()
    np.testing.assert_allclose(theirs, mine, atol=1e-5)

    # text -> image on the training set: far better than chance (16 images, 4 per class)
    from imret.semantic_eval import evaluate_cross_modal

    x = evaluate_cross_modal(theirs, enc.encode_text(texts), owner)
    assert x.text_to_image[5] > 0.6, x.text_to_image  # chance: 5 / 16
    assert x.text_to_image_median_rank <= 4  # chance: 8.5


def test_best_model_files_follow_the_dev_metric(data, tmp_path):
    res = SemanticTrainer(config_from_dict(cfg_dict(data, tmp_path / "run", epochs=3,
                                                    validation={"metric": "t2i_medr", "ks": [3]}))).fit()
    rows = read_log(res.metrics)
    best = min(rows, key=lambda r: (r["t2i_medr"], r["epoch"]))
    assert res.best_epoch == best["epoch"] and res.metric == "t2i_medr"
    assert res.best_model.is_file() and res.best_text.is_file()


def test_frozen_trunk_cache_is_used_after_the_first_pass(data, tmp_path):
    count = Counter()
    epochs_seen = []

    def on_epoch(s):
        epochs_seen.append((s.epoch, count.images))

    cfg = config_from_dict(cfg_dict(data, tmp_path / "run", epochs=3))
    SemanticTrainer(cfg, on_trunk_batch=count, on_epoch=on_epoch).fit()
    # one trunk pass over the 16 training and 8 dev images, in epoch 1; none after
    assert epochs_seen == [(1, 24), (2, 24), (3, 24)]
    # a second run on the same cache does not run the trunk at all
    again = Counter()
    d = cfg_dict(data, tmp_path / "run2", epochs=1)
    d["data"]["cache_dir"] = str(tmp_path / "run" / "cache")
    SemanticTrainer(config_from_dict(d), on_trunk_batch=again).fit()
    assert again.images == 0
    # another image size is another cache entry
    other = Counter()
    d = cfg_dict(data, tmp_path / "run3", epochs=1, data={"image_size": 48})
    d["data"]["cache_dir"] = str(tmp_path / "run" / "cache")
    SemanticTrainer(config_from_dict(d), on_trunk_batch=other).fit()
    assert other.images == 24


def test_visual_only_leaves_w_untouched_and_has_no_cross_modal_metrics(data, tmp_path):
    trainer = SemanticTrainer(config_from_dict(cfg_dict(data, tmp_path / "run", loss={"weights": [1, 0, 0]})))
    w0 = trainer.encoder.proj.weight.detach().clone()
    res = trainer.fit()
    assert torch.equal(trainer.encoder.proj.weight, w0)
    assert res.metric == "ndcg@5" and "rsum" not in res.history[-1].dev
    assert all(h.loss_t1 == 0 and h.loss_t2 == 0 for h in res.history)


def test_maps_cache_trains_gem_p_and_full_finetuning_runs(data, tmp_path):
    res = SemanticTrainer(config_from_dict(cfg_dict(data, tmp_path / "maps", cache="maps", epochs=1))).fit()
    assert res.history[-1].gem_p != 3.0
    count = Counter()
    trainer = SemanticTrainer(config_from_dict(cfg_dict(data, tmp_path / "full", freeze_trunk=False, epochs=1,
                                                        max_steps_per_epoch=1, fc_init="identity",
                                                        data={"augment": True})), on_trunk_batch=count)
    before = [p.detach().clone() for p in trainer.model.trunk.parameters()]
    trainer.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.trunk.parameters()))
    assert count.images == 8  # one training step of decoded images; dev through the network, uncounted


def test_resume_equals_an_uninterrupted_run(data, tmp_path):
    full = SemanticTrainer(config_from_dict(cfg_dict(data, tmp_path / "a", epochs=3)))
    full.fit()
    first = SemanticTrainer(config_from_dict(cfg_dict(data, tmp_path / "b", epochs=3)))
    first.fit(until_epoch=2)
    with pytest.raises(FileExistsError, match="resume"):
        SemanticTrainer(config_from_dict(cfg_dict(data, tmp_path / "b", epochs=3)))
    second = SemanticTrainer(config_from_dict(cfg_dict(data, tmp_path / "b", epochs=3, resume=True)))
    assert second.start_epoch == 2
    second.fit()
    for a, b in zip(full.model.state_dict().values(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(full.encoder.proj.weight, second.encoder.proj.weight)
    assert [r["epoch"] for r in read_log(tmp_path / "b" / "log.csv")] == [1, 2, 3]


def test_imret_train_dispatches_to_the_semantic_trainer(data, tmp_path, capsys):
    from imret.cli import main

    d = cfg_dict(data, tmp_path / "run", epochs=1)
    path = tmp_path / "semantic.yaml"
    path.write_text(yaml.safe_dump(d), encoding="utf-8")
    assert isinstance(Trainer(load_config(path)), SemanticTrainer)
    rc = main(["train", str(path), "--no-progress", "--set", "loss.margin=0.2", "--out", str(tmp_path / "cli")])
    assert rc == 0
    assert (tmp_path / "cli" / "model_best.safetensors").is_file() and (tmp_path / "cli" / "text_best.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert saved["loss"]["margin"] == 0.2 and saved["data"]["kind"] == "captions"
    out = capsys.readouterr().out
    assert "dev NDCG@3" in out and "t->i R@1" in out  # the epoch line shows the dev metrics
    assert f"best text   {tmp_path / 'cli' / 'text_best.safetensors'}" in out and "dev rsum" in out
    assert "Medium mAP" not in out


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"loss": {"wieghts": [1, 1, 1]}}, "wieghts"),
        ({"lr": 0.1}, "'lr'"),
        ({"cache": "disk"}, "cache"),
        ({"loss": {"weights": [1, 1]}}, "loss.weights"),
        ({"loss": {"weights": [0, 0, 0]}}, "loss.weights"),
        ({"loss": {"name": "triplet"}}, "loss.name"),
        ({"loss": {"margin": -0.1}}, "loss.margin"),
        ({"loss": {"min_gap": -1}}, "loss.min_gap"),
        ({"loss": {"per_anchor": 0}}, "loss.per_anchor"),
        ({"loss": {"cross_modal": "triplets"}}, "loss.cross_modal 'triplets' is unknown; available: 'pairs'"),
        ({"loss": {"cross_margin": -1}}, "loss.cross_margin"),
        ({"model": {"whitening": None}}, "model.whitening"),
        ({"text": {"tfidf": {"min_dff": 2}}}, "text.tfidf"),
        ({"validation": {"metric": "ndcg@7"}}, "validation.metric"),
        ({"loss": {"weights": [1, 0, 0]}, "validation": {"metric": "rsum"}}, "validation.metric"),
        ({"data": {"augment": True}}, "data.augment"),
        ({"data": {"captions_csv": None, "dev_csv": None, "flickr8k": "/x", "dev_split": "test"}}, "data.dev_split"),
        ({"batch_size": "big"}, "batch_size"),
    ],
)
def test_config_errors_name_the_bad_key(data, tmp_path, over, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        config_from_dict(cfg_dict(data, tmp_path / "run", **over))


def test_config_needs_one_data_source_and_an_image_per_process(data, tmp_path):
    d = cfg_dict(data, tmp_path / "run")
    d["data"]["flickr8k"] = "/somewhere"
    with pytest.raises(ValueError, match="exactly one of data.flickr8k"):
        config_from_dict(d)
    cfg = config_from_dict(cfg_dict(data, tmp_path / "run", batch_size=3))
    with pytest.raises(ValueError, match="batch_size 3 .* smaller than the 4 processes"):
        SemanticTrainer(cfg, dist=DistInfo(rank=1, world_size=4))


def test_shipped_config_is_valid():
    cfg = load_config(REPO / "configs" / "train_semantic.yaml")
    assert isinstance(cfg, SemanticTrainConfig)
    assert cfg.model.whitening == 512 and cfg.freeze_trunk and cfg.data.dev_split == "dev"
    assert cfg.selection_metric == "rsum"


def test_dev_metrics_against_direct_calls():
    from imret.semantic_eval import evaluate_cross_modal, evaluate_semantic

    rng = np.random.default_rng(0)
    phi = rng.standard_normal((6, 4))
    phi /= np.linalg.norm(phi, axis=1, keepdims=True)
    theta = rng.standard_normal((12, 4))
    owner = np.repeat(np.arange(6), 2)
    rel = np.abs(rng.standard_normal((6, 6)))
    rel = (rel + rel.T) / 2
    m = dev_metrics(phi, theta, owner, rel, [2, 4])
    s = evaluate_semantic(phi @ phi.T, rel, exclude_self=True, ks=[2, 4])
    x = evaluate_cross_modal(phi, theta, owner)
    assert m["ndcg@4"] == s.ndcg[4] and m["pcc_all"] == s.pcc_all
    assert m["t2i_r@5"] == x.text_to_image[5] and m["i2t_medr"] == x.image_to_text_median_rank
    assert m["rsum"] == pytest.approx(100 * sum(x.text_to_image[k] + x.image_to_text[k] for k in (1, 5, 10)))


def test_grouped_mining_fast_path_equals_the_sorting_one():
    """mine_hard_triplets takes a sort-free path for anchor-grouped triplets (semantic_triplets'
    order); it must pick exactly what the general path picks, ties included."""
    from imret.text.losses import mine_hard_triplets

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        t = int(torch.randint(1, 200, (1,), generator=g))
        anchors = torch.sort(torch.randint(0, 6, (t,), generator=g)).values
        losses = torch.randint(-2, 4, (t,), generator=g).float() / 2 if trial % 2 else torch.randn(t, generator=g)
        k = int(torch.randint(1, 6, (1,), generator=g))
        fast = mine_hard_triplets(losses, anchors, k)
        perm = torch.randperm(t, generator=g)  # unsorted anchors: the general path
        slow = perm[mine_hard_triplets(losses[perm], anchors[perm], k)]
        # the general path breaks ties by the (permuted) index: compare on distinct losses, sets on ties
        if trial % 2 == 0:
            assert fast.tolist() == sorted(slow.tolist())
        else:
            assert len(fast) == len(slow) and torch.equal(torch.sort(losses[fast]).values, torch.sort(losses[slow]).values)
            ref = []
            for a in anchors.unique():
                idx = [int(i) for i in torch.nonzero(anchors == a).flatten() if losses[i] > 0]
                ref += sorted(sorted(idx, key=lambda i: -float(losses[i]))[:k])
            assert fast.tolist() == sorted(ref)


# ------------------------------------------------------------------------- torchrun (2 CPU processes)


def _torchrun(args, cwd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={port}", "-m", "imret.cli", "train", *map(str, args), "--no-progress"]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    assert "2 process(es)" in proc.stdout
    return proc


def _max_difference(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# name -> config overrides. frozen: cached pooled trunk features, PCA start of the FC layer, head + W
# trained, and the torchrun run stopped after epoch 1 and resumed under torchrun for epoch 2.
# full: the whole network trained on decoded, augmented images (frozen BatchNorm), PCA start from
# rank 0's trunk pass, from the shared ImageNet MobileNetV2: the processes' float round-off (~1e-7
# after a step; gradients are summed in another order) stays round-off in a trained network, while
# the random one's ReLU6 kinks under BatchNorm statistics that do not fit it amplify it ~100-fold
# into the second step (2e-5 measured).
DDP_CASES = {
    "frozen-resumed": {"epochs": 2, "optim": {"schedule": "exponential", "gamma": 0.5}},
    "full": {"epochs": 1, "freeze_trunk": False, "data": {"augment": True},
             "model": {"backbone": "mobilenetv2_100.coral"},
             "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "none"}},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DDP_CASES))
def test_torchrun_two_processes_train_like_one(data, tmp_path, request, case):
    """Each rank embeds half of every batch; the gathered batch's loss and the summed gradients
    give the single-process run's weights, losses and dev metrics."""
    d = cfg_dict(data, tmp_path / "ddp", **DDP_CASES[case])
    if case == "full":
        d["model"]["weights"] = str(request.getfixturevalue("mobilenet_weights"))
    d["data"]["cache_dir"] = str(tmp_path / "ddp-cache")
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(d), encoding="utf-8")
    epochs = d["epochs"]
    if case == "frozen-resumed":
        first = _torchrun([path, "--set", "epochs=1"], tmp_path)
        assert first.stdout.count("epoch 1/1") == 1  # only rank 0 reports
        shutil.copytree(tmp_path / "ddp", tmp_path / "then-one")  # resumed below by one process
        proc = _torchrun([path, "--resume"], tmp_path)
        assert "resuming after epoch 1" in proc.stdout and proc.stdout.count(f"epoch 2/{epochs}") == 1
        # rank 0 described the training and dev images once; no temporary folder left behind
        assert sorted(p.name.isalnum() for p in (tmp_path / "ddp-cache").iterdir()) == [True, True]
    else:
        proc = _torchrun([path], tmp_path)
        assert proc.stdout.count(f"epoch {epochs}/{epochs}") == 1

    single = SemanticTrainer(config_from_dict({**d, "out": str(tmp_path / "single")}))
    single._init_fc()  # what fit() does first: the PCA start, so that "moved" below is training's doing
    init = {k: v.clone() for k, v in single.model.state_dict().items()}
    w0 = single.encoder.proj.weight.detach().clone()
    single.fit()
    a = torch.load(tmp_path / "ddp" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "single" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert a["epoch"] == b["epoch"] == epochs and a["global_step"] == b["global_step"] == 2 * epochs
    diff = max(_max_difference(a["model"], b["model"]), _max_difference(a["text"], b["text"]))
    moved = max(_max_difference(b["model"], init), float((b["text"]["proj.weight"] - w0).abs().max()))
    print(f"torchrun vs one process ({case}): max |parameter difference| {diff:.3g}, largest update {moved:.3g}")
    assert diff <= 1e-5 and diff <= 1e-3 * moved
    ra, rb = read_log(tmp_path / "ddp" / "log.csv"), read_log(tmp_path / "single" / "log.csv")
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb] == list(range(1, epochs + 1))
    for x, y in zip(ra, rb):
        assert set(x) == set(y)
        for key in ("loss", "loss_v", "loss_t1", "loss_t2", "triplets", "lr", "ndcg@5", "pcc_all", "rsum"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key
    # the files of rank 0 reload as a model that describes images like the single-process one
    ma, mb = load_model(tmp_path / "ddp" / "model_last.safetensors"), load_model(tmp_path / "single" / "model_last.safetensors")
    ds = _SquareImages(single.images.paths, 64, ma.mean, ma.std)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        torch.testing.assert_close(ma(x), mb(x), atol=1e-5, rtol=0)
    assert (tmp_path / "ddp" / "text_best.safetensors").is_file() and (tmp_path / "ddp" / "steps.csv").is_file()
    if case == "frozen-resumed":  # the checkpoint of 2 processes resumes in one, to the same model
        SemanticTrainer(config_from_dict({**d, "out": str(tmp_path / "then-one"), "resume": True})).fit()
        c = torch.load(tmp_path / "then-one" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
        assert c["global_step"] == 2 * epochs
        assert max(_max_difference(c["model"], b["model"]), _max_difference(c["text"], b["text"])) <= 1e-5
        assert [r["loss"] for r in read_log(tmp_path / "then-one" / "log.csv")] == [r["loss"] for r in ra[:1]] + [
            pytest.approx(rb[1]["loss"], rel=1e-5)]
