"""The trainer and ``imret train``, in-process on tiny generated data (MobileNetV2, 64 px, CPU)."""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch
import yaml
from conftest import free_port

from imret import load_model
from imret.cli import _override, main
from imret.synthetic import make_labelled_folder, make_revisitop
from imret.train import MetricsLog, Trainer, config_from_dict, load_config, read_metrics
from imret.train.distributed import DistInfo, all_gather_rows, broadcast_object, init_distributed
from imret.train.trainer import _EpochSchedule

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    images = make_labelled_folder(root / "images", n_classes=4, per_class=3, size=(80, 64), seed=0)
    gnd = make_revisitop(root / "val", n_objects=2, db_per_object=2, n_distractors=1, size=(80, 64), seed=1)
    return {"images": images, "gnd": gnd}


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_dict(paths, out, **over) -> dict:
    base = {
        "out": str(out),
        "epochs": 2,
        "batch_size": 2,
        "device": "cpu",
        "model": {"backbone": "mobilenetv2_100", "pretrained": False},
        "data": {"root": str(paths["images"]), "image_size": 64, "workers": 0},
        "mining": {"queries": 4, "pool": 12, "negatives": 2, "classes_per_batch": 2, "per_class": 3},
        "optim": {"lr": 1e-3},
    }
    return _merge(base, over)


def write_config(path, d: dict):
    path.write_text(yaml.safe_dump(d), encoding="utf-8")
    return path


def model_state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("loss, extra", [
    ("contrastive", {}),  # epoch tuples, hard negatives mined each epoch
    ("triplet", {"mining": {"strategy": "batch_hard"}, "multistage": True, "chunk_size": 2}),
    ("ap", {"multistage": True, "chunk_size": 4, "optim": {"schedule": "cosine", "warmup_epochs": 1}}),
    ("arcface", {"model": {"whitening": 32}, "optim": {"name": "sgd", "lr": 0.01}}),
    ("curricularface", {"model": {"head": "dolg", "head_kwargs": {"dim": 24, "local_dim": 16}}, "multistage": True,
                        "chunk_size": 3, "optim": {"name": "sgd", "lr": 0.01}}),
])
def test_cli_trains_each_loss(data, tmp_path, capsys, loss, extra):
    out = tmp_path / "run"
    d = config_dict(data, out, loss={"name": loss}, validation={"gnd": str(data["gnd"]), "image_size": 64}, **extra)
    cfg_path = write_config(tmp_path / "c.yaml", d)
    rc = main(["train", str(cfg_path), "--no-progress", "--set", "seed=3", "--set", "log_every=1"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "epoch 2/2" in printed.out and "mAP E/M/H" in printed.out and str(out / "checkpoint_last.pt") in printed.out

    for name in ("config.yaml", "checkpoint_last.pt", "model_epoch1.safetensors", "model_epoch2.safetensors",
                 "model_best.safetensors", "metrics.csv", "curves.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp*"))
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "curves.png").read_bytes()[:8] == PNG

    saved = load_config(out / "config.yaml")  # the resolved config, overrides applied
    assert saved.seed == 3 and saved.loss.name == loss and saved.to_dict() == config_from_dict(
        {**d, "seed": 3, "log_every": 1}).to_dict()

    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["step"] > rows[0]["step"] > 0
    for r in rows:
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["images_per_s"] > 0 and r["seconds"] > 0
        assert r["gem_p"] is not None and abs(r["gem_p"] - 3.0) < 0.5
        assert all(0.0 <= r[k] <= 1.0 for k in ("map_easy", "map_medium", "map_hard"))

    model = load_model(out / "model_epoch2.safetensors")  # what `imret eval --model` loads
    ck = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 2 and ck["global_step"] == rows[1]["step"]
    assert max_diff(model.state_dict(), ck["model"]) == 0.0
    if loss == "arcface":
        assert ck["loss"]["weight"].shape == (4, 32) and model.dim == 32
    if loss == "curricularface":  # a DOLG model, rebuilt from the file alone; t moved off 0 and was saved
        assert model.spec.head == "dolg" and model.dim == 24 and model.head.local_dim == 16
        assert ck["loss"]["weight"].shape == (4, 24) and float(ck["loss"]["t"]) != 0.0
        assert "dolg head" in printed.out
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x).norm(dim=1), torch.ones(2), atol=1e-5)

    # a second run into the same folder must not overwrite it silently
    assert main(["train", str(cfg_path), "--no-progress"]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_loss_decreases_on_repeated_batches(data, tmp_path):
    cfg = config_dict(data, tmp_path / "run", epochs=6, loss={"name": "ap"}, data={"augment": False},
                      optim={"lr": 1e-3, "schedule": "none"})
    result = Trainer(config_from_dict(cfg)).fit()
    losses = [s.loss for s in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses


def test_batches_per_epoch_sets_the_steps(data, tmp_path):
    # 12 images, batches of 2 classes x 3: 2 steps by default, 5 when asked (images are repeated)
    for want, over in ((2, {}), (5, {"batches_per_epoch": 5})):
        cfg = config_dict(data, tmp_path / f"run{want}", epochs=1, loss={"name": "ap"}, data={"augment": False},
                          mining=over)
        result = Trainer(config_from_dict(cfg), progress=False).fit()
        assert result.steps == want


# --------------------------------------------------------------------------------- resume


def test_exact_resume(data, tmp_path, capsys):
    """2 epochs straight == 1 epoch, stop, resume for 1 more (tuple mining, augmentation,
    gradient accumulation, Adam, warmup + cosine)."""
    over = dict(epochs=2, batch_size=1, accumulate=2, loss={"name": "contrastive"},
                mining={"queries": 6}, optim={"name": "adam", "lr": 1e-3, "schedule": "cosine", "warmup_epochs": 1})
    straight = Trainer(config_from_dict(config_dict(data, tmp_path / "a", **over))).fit()

    d = config_dict(data, tmp_path / "b", **over)
    first = Trainer(config_from_dict(d)).fit(until_epoch=1)
    assert first.epochs == 1 and (tmp_path / "b" / "checkpoint_last.pt").is_file()
    rc = main(["train", str(write_config(tmp_path / "b.yaml", d)), "--resume", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "resuming after epoch 1" in capsys.readouterr().out

    a = torch.load(tmp_path / "a" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    diff = max_diff(a["model"], b["model"])
    print(f"exact resume: max |param difference| = {diff:.3g}", file=sys.stderr)
    assert diff <= 1e-6
    assert a["global_step"] == b["global_step"] == 6  # 6 tuples, 1 per step, an update every 2 steps, 2 epochs
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert max(float((sa[k]["exp_avg_sq"] - sb[k]["exp_avg_sq"]).abs().max()) for k in sa) <= 1e-9
    ra, rb = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert [r["epoch"] for r in rb] == [1, 2]  # no duplicated rows
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-6)
    assert straight.history[-1].lr == pytest.approx(rb[1]["lr"])


def test_resume_without_checkpoint_errors(data, tmp_path, capsys):
    cfg_path = write_config(tmp_path / "c.yaml", config_dict(data, tmp_path / "none", loss={"name": "ap"}))
    assert main(["train", str(cfg_path), "--resume"]) == 1
    assert "no checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------ multistage == plain


@pytest.mark.parametrize("loss", ["ap", "arcface", "contrastive"])
def test_multistage_step_equals_plain_step(data, tmp_path, loss):
    """One SGD step with multistage backpropagation == one with ordinary backpropagation."""
    over = dict(epochs=1, max_steps_per_epoch=1, loss={"name": loss}, model={"whitening": 16},
                optim={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "schedule": "none"})
    states, losses = {}, {}
    for ms in (False, True):
        t = Trainer(config_from_dict(config_dict(data, tmp_path / f"ms{ms}", multistage=ms, chunk_size=2, **over)))
        init = {k: v.clone() for k, v in t.model.state_dict().items()}
        init_loss = {k: v.clone() for k, v in t.loss.state_dict().items()}
        res = t.fit()
        losses[ms] = res.history[0].loss
        states[ms] = {**t.model.state_dict(), **{"loss." + k: v for k, v in t.loss.state_dict().items()}}
    moved = max_diff(init, {k: states[True][k] for k in init})
    diff = max_diff(states[False], states[True])
    print(f"multistage vs plain ({loss}): max |param difference| = {diff:.3g}, largest update {moved:.3g}",
          file=sys.stderr)
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert moved > 1e-4
    assert diff <= 1e-5 * moved  # float32 round-off of differently batched forwards
    if loss == "arcface":  # the class weights are trained in both modes, identically
        assert max_diff(init_loss, {k: states[True]["loss." + k] for k in init_loss}) > 1e-4


@pytest.mark.parametrize("loss", ["ap", "arcface"])
def test_streamed_batches_train_like_held_batches(data, tmp_path, loss):
    """data.stream decodes each chunk when multistage needs it (twice): the same steps as a held batch."""
    over = dict(epochs=2, max_steps_per_epoch=2, multistage=True, chunk_size=2, loss={"name": loss},
                optim={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "schedule": "none"})
    states, hist = {}, {}
    for stream in (False, True):
        cfg = config_dict(data, tmp_path / f"s{stream}", **_merge(over, {"data": {"stream": stream, "workers": 1}}))
        t = Trainer(config_from_dict(cfg))
        res = t.fit()
        hist[stream] = [h.loss for h in res.history]
        states[stream] = t.model.state_dict()
    assert hist[True] == pytest.approx(hist[False], rel=1e-6)
    assert max_diff(states[False], states[True]) <= 1e-6


def test_stream_needs_multistage_and_in_batch_losses(data, tmp_path):
    with pytest.raises(ValueError, match="data.stream: true needs multistage: true"):
        config_from_dict(config_dict(data, tmp_path / "x", data={"stream": True}, loss={"name": "ap"}))
    with pytest.raises(ValueError, match="not with mined tuples"):
        config_from_dict(config_dict(data, tmp_path / "x", multistage=True, data={"stream": True}))


def test_bf16_autocast_on_cpu(data, tmp_path):
    over = dict(epochs=1, max_steps_per_epoch=1, precision="bf16", loss={"name": "ap"})
    plain = Trainer(config_from_dict(config_dict(data, tmp_path / "p", **over))).fit()
    multi = Trainer(config_from_dict(config_dict(data, tmp_path / "m", multistage=True, chunk_size=3, **over))).fit()
    assert math.isfinite(plain.history[0].loss)
    assert multi.history[0].loss == pytest.approx(plain.history[0].loss, rel=1e-2)


def test_fp16_needs_cuda(data, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(config_from_dict(config_dict(data, tmp_path / "x", precision="fp16", loss={"name": "ap"})))


# ------------------------------------------------------------ optimizer and schedule


def test_param_groups_gem_p_at_10x_lr_without_weight_decay(data, tmp_path):
    cfg = config_from_dict(config_dict(data, tmp_path / "g", loss={"name": "arcface"}, model={"whitening": 16},
                                       optim={"name": "adamw", "lr": 2e-4, "weight_decay": 1e-3}))
    t = Trainer(cfg)
    assert isinstance(t.optimizer, torch.optim.AdamW)
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert set(groups) == {"network", "pool", "loss"}
    assert groups["pool"]["params"] == [t.model.pool.p]
    assert groups["pool"]["lr"] == pytest.approx(2e-3) and groups["pool"]["weight_decay"] == 0.0
    assert groups["network"]["lr"] == pytest.approx(2e-4) and groups["network"]["weight_decay"] == 1e-3
    assert groups["loss"]["params"] == [t.loss.weight]
    seen = [id(p) for g in t.optimizer.param_groups for p in g["params"]]
    trainable = [id(p) for p in t.model.parameters() if p.requires_grad] + [id(t.loss.weight)]
    assert sorted(seen) == sorted(trainable)  # every parameter exactly once
    assert any(id(p) == id(t.model.whiten.weight) for p in groups["network"]["params"])
    # BatchNorm is frozen: eval mode while training
    bns = [m for m in t.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and t.model.training and not any(m.training for m in bns)


def test_epoch_schedules():
    warm_cos = _EpochSchedule("cosine", epochs=6, gamma=0.5, step_epochs=2, warmup=2)
    assert [warm_cos(e) for e in range(6)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5,
                                                             0.5 + 0.5 * math.cos(3 * math.pi / 4)])
    assert [_EpochSchedule("exponential", 5, 0.5, 1, 0)(e) for e in range(3)] == [1.0, 0.5, 0.25]
    assert [_EpochSchedule("step", 5, 0.1, 2, 0)(e) for e in range(5)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert _EpochSchedule("none", 5, 0.1, 2, 1)(4) == 1.0


# ------------------------------------------------------------------------------ CLI config


def test_set_overrides_are_yaml_scalars():
    assert _override("optim.lr=1e-5") == (["optim", "lr"], "1e-5")  # PyYAML keeps 1e-5 text; the config reads it
    assert config_from_dict({"optim": {"lr": "1e-5"}}).optim.lr == 1e-5
    assert _override("model.whitening=null") == (["model", "whitening"], None)
    assert _override("multistage=true") == (["multistage"], True)
    assert _override("epochs=3") == (["epochs"], 3)
    with pytest.raises(ValueError, match="expected key.sub=value"):
        _override("optim.lr")
    with pytest.raises(ValueError, match="must be a scalar"):
        _override("optim=[1, 2]")


@pytest.mark.parametrize("setting, message", [
    ("optim.lrr=1e-5", r"unknown key\(s\) \['lrr'\] in optim; valid: name, lr"),
    ("nosuch.key=1", r"unknown key\(s\) \['nosuch'\] in the config"),
    ("epochs.x=1", "epochs is not a section"),
    ("loss.name=focal", "loss.name: unknown value 'focal'; available: contrastive, triplet, ap, arcface"),
    ("mining.strategy=semihard", "semihard needs loss.name: triplet"),
])
def test_bad_set_errors(data, tmp_path, capsys, setting, message):
    cfg_path = write_config(tmp_path / "c.yaml", config_dict(data, tmp_path / "r", loss={"name": "ap"}))
    assert main(["train", str(cfg_path), "--set", setting]) == 1
    err = capsys.readouterr().err
    assert err.startswith("imret: error:")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------- logs


def test_metrics_log_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.warns(UserWarning, match="TensorBoard logging is off"):
        log = MetricsLog(tmp_path)
    row = dict(epoch=1, step=4, loss=0.5, lr=1e-3, gem_p=3.0, map_easy=None, map_medium=None, map_hard=None,
               images_per_s=10.0, seconds=2.0)
    log.epoch(row)
    log.epoch({**row, "epoch": 2, "step": 8, "loss": 0.25, "map_easy": 0.9, "map_medium": 0.5, "map_hard": 0.25})
    log.close()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert rows[0]["map_medium"] is None and rows[1]["map_hard"] == 0.25 and rows[1]["step"] == 8
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "tb").exists()
    # resuming after epoch 1 drops the later row
    MetricsLog(tmp_path, tensorboard=False, keep_epochs=1).close()
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.csv")] == [1]
    with pytest.raises(ValueError, match="unknown metric"):
        MetricsLog(tmp_path, tensorboard=False).epoch({**row, "acc": 1.0})


# ------------------------------------------------------------------- example and helpers


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_example_config_lists_every_key_and_trains(data, tmp_path, monkeypatch, capsys, mobilenet_weights):
    example = REPO / "configs" / "train_example.yaml"
    cfg = load_config(example)
    assert _keys(yaml.safe_load(example.read_text())) == _keys(cfg.to_dict())  # every key shown
    assert cfg.model.weights and cfg.optim.lr == 1e-6
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root
    rc = main(["train", str(example), "--no-progress", "--out", str(tmp_path / "run"), "--device", "cpu",
               "--set", "epochs=1", "--set", "data.kind=folder", f"--set=data.root={data['images']}",
               "--set", "data.image_size=64", "--set", "data.workers=0", "--set", "batch_size=2",
               "--set", "mining.queries=4", "--set", "mining.pool=12", "--set", "mining.negatives=2",
               f"--set=validation.gnd={data['gnd']}", "--set", "validation.image_size=64"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "epoch 1/1" in printed.out
    assert load_model(tmp_path / "run" / "model_best.safetensors").spec.backbone == "mobilenetv2_100.coral"


def test_distributed_helpers_on_one_process():
    info = init_distributed({}, "cpu")
    assert info == DistInfo() and info.is_main and not info.enabled
    assert init_distributed({"WORLD_SIZE": "1", "RANK": "0"}, "cpu") == DistInfo()
    t = torch.arange(6.0).reshape(3, 2)
    full, offset = all_gather_rows(t)
    assert full is t and offset == 0
    assert broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="not an integer"):
        init_distributed({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="bad rank"):
        DistInfo(rank=2, world_size=2)


LEAVE_GROUP = """
import os, sys
from imret.train.distributed import _init_process_group, cleanup
assert "torch.distributed.nn" not in sys.modules
_init_process_group("gloo", 0, 1, 1.0)
import timm  # what loading a model does in a rank: it imports torch.distributed.nn
assert "torch.distributed.nn" in sys.modules
cleanup()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sorted(n for n in names if "gloo" in n))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc (Linux)")
def test_leaving_the_group_stops_its_gloo_threads_even_after_timm_is_imported():
    """torch.distributed.nn, imported after the group exists, held it in its default arguments:
    the gloo threads outlived cleanup() and a rank could abort at exit (SIGABRT)."""
    import subprocess

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "-c", LEAVE_GROUP], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_dolg_config_loads_and_trains(data, tmp_path, capsys):
    """configs/train_dolg.yaml: the DOLG recipe (CurricularFace, SGD, cosine), run on tiny data."""
    cfg = load_config(REPO / "configs" / "train_dolg.yaml")
    assert cfg.model.head == "dolg" and cfg.loss.name == "curricularface" and cfg.loss.margin == 0.15
    assert cfg.model.head_kwargs["atrous_rates"] == [3, 6, 9] and cfg.optim.schedule == "cosine"
    rc = main(["train", str(REPO / "configs" / "train_dolg.yaml"), "--no-progress", "--out", str(tmp_path / "run"),
               "--device", "cpu", "--set", "epochs=1", "--set", "model.backbone=mobilenetv2_100",
               "--set", "model.pretrained=false", "--set", "model.head_kwargs.local_dim=16",
               "--set", "model.head_kwargs.dim=8", "--set", "data.kind=folder", f"--set=data.root={data['images']}",
               "--set", "data.image_size=64", "--set", "data.workers=0", "--set", "precision=fp32",
               "--set", "optim.warmup_epochs=0", "--set", "mining.classes_per_batch=2", "--set", "mining.per_class=3",
               f"--set=validation.gnd={data['gnd']}", "--set", "validation.image_size=64"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    model = load_model(tmp_path / "run" / "model_best.safetensors")
    assert model.spec.head == "dolg" and model.dim == 8 and model.head.fusion == "orthogonal"
