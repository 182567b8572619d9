"""``torchrun`` with 2 CPU processes (gloo) trains exactly like one process on the concatenated batch.

Each rank takes a contiguous half of every global batch (see :mod:`imret.train.trainer`), so a
single process with twice the per-process batch sees the same data; the descriptors are
gathered, so the AP loss and the mined tuples are those of the global batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from imret.synthetic import make_labelled_folder, make_revisitop
from imret.train import Trainer, config_from_dict, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return {
        "images": make_labelled_folder(root / "images", n_classes=4, per_class=4, size=(80, 64), seed=2),
        "gnd": make_revisitop(root / "val", n_objects=2, db_per_object=2, n_distractors=1, size=(80, 64), seed=3),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg_path, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "imret.cli", "train", str(cfg_path), "--no-progress"]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    return proc


# name -> (per-process config, the key doubled for the single process). Two optimizer steps
# each: from the second step on the runs start from parameters that differ by float round-off
# (~1e-7; gradients are summed in another order), and a randomly initialised MobileNet with
# ReLU6 kinks and the AP loss's bin kinks can amplify that ~1e4-fold per step at a large
# learning rate; at a small one the comparison stays well inside 1e-5.
CASES = {
    "ap-multistage": ({"epochs": 1, "loss": {"name": "ap"}, "multistage": True, "chunk_size": 2,
                       "mining": {"classes_per_batch": 1, "per_class": 4},
                       "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}},
                      ("mining", "classes_per_batch")),
    "arcface-plain-accumulate": ({"epochs": 2, "loss": {"name": "arcface"}, "model": {"whitening": 16}, "accumulate": 2,
                                  "mining": {"classes_per_batch": 1, "per_class": 4},
                                  "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}},
                                 ("mining", "classes_per_batch")),
    "curricularface-dolg-multistage": ({"epochs": 1, "loss": {"name": "curricularface"}, "multistage": True,
                                        "chunk_size": 2,
                                        "model": {"head": "dolg", "head_kwargs": {"dim": 16, "local_dim": 16}},
                                        "mining": {"classes_per_batch": 1, "per_class": 4},
                                        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}},
                                       ("mining", "classes_per_batch")),
    "contrastive-tuples-accumulate": ({"epochs": 1, "loss": {"name": "contrastive"}, "batch_size": 1, "accumulate": 2,
                                       "mining": {"queries": 8, "pool": 16, "negatives": 2},
                                       "optim": {"name": "sgd", "lr": 0.002, "momentum": 0.0, "weight_decay": 0.0}},
                                      ("batch_size",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_on_the_concatenated_batch(data, tmp_path, case):
    torch.set_num_threads(1)
    over, doubled = CASES[case]
    d = {
        "out": str(tmp_path / "ddp"),
        "device": "cpu",
        "seed": 5,
        "model": {"backbone": "mobilenetv2_100", "pretrained": False},
        "data": {"root": str(data["images"]), "image_size": 64, "workers": 0},
        "optim": {"schedule": "exponential", "gamma": 0.5},
        "validation": {"gnd": str(data["gnd"]), "image_size": 64},
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    proc = _torchrun(cfg_path, tmp_path)
    epochs = d["epochs"]
    assert proc.stdout.count(f"epoch {epochs}/{epochs}") == 1  # only rank 0 reports
    assert "2 process(es)" in proc.stdout

    single = config_from_dict(d)
    sd = single.to_dict()
    node = sd
    for k in doubled[:-1]:
        node = node[k]
    node[doubled[-1]] *= 2
    sd["out"] = str(tmp_path / "single")
    Trainer(config_from_dict(sd)).fit()

    a = torch.load(tmp_path / "ddp" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "single" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 2
    init = Trainer(config_from_dict({**sd, "out": str(tmp_path / "init")})).model.state_dict()
    moved = max(float((a["model"][k] - init[k]).abs().max()) for k in init if init[k].is_floating_point())
    diff = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"] if a["model"][k].is_floating_point())
    for k, v in a["loss"].items():  # ArcFace class weights
        diff = max(diff, float((v - b["loss"][k]).abs().max()))
    print(f"DDP vs single process ({case}): max |param difference| = {diff:.3g}, largest update {moved:.3g}",
          file=sys.stderr)
    assert diff <= 1e-5 and diff <= 1e-2 * moved
    ra, rb = read_metrics(tmp_path / "ddp" / "metrics.csv"), read_metrics(tmp_path / "single" / "metrics.csv")
    assert [r["epoch"] for r in ra] == list(range(1, epochs + 1))
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["gem_p"] == pytest.approx(y["gem_p"], abs=1e-6)
        for key in ("map_easy", "map_medium", "map_hard"):  # validation split over the ranks, then gathered
            assert x[key] == pytest.approx(y[key], abs=1e-6)
