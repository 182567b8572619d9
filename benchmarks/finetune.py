"""Fine-tuning the shared ImageNet MobileNetV2 + GeM on real Paris photos, tested on held-out landmarks.

The data is ../shared/data/rparis6k-mini: 238 database photos of five Paris landmarks and 12
queries with the revisited ground truth. It is small, so the split is by landmark, with
cross-validation, so that every query is tested by a network that never saw its landmark:

1. **Landmark groups.** Images are grouped by the landmark in their file name, and groups
   are merged when a query's easy/hard/junk set reaches into another landmark (the Eiffel
   tower query has a positive in the Invalides set, so Eiffel + Invalides are one group).
2. **Folds.** The groups are dealt round-robin into ``--folds`` folds. For fold f the test
   queries are the queries of its groups; training uses only images of the *other* groups:
   their database photos and queries, labelled by the landmark in the file name, leaving out
   any image that is in the ground truth (easy/hard/junk) of a query of another landmark. No
   test query and no image of a test query's group is ever seen in training.
3. **Training** (``imret.train.Trainer``, the same code as ``imret train``): the listwise AP
   loss (Revaud et al.) over class-balanced batches of all training landmarks, multistage
   backpropagation, BatchNorm frozen (the TF-slim weights have it folded in), Adam, fixed
   epochs and learning rate chosen before looking at any test number (no early stopping: the
   *last* epoch's model is the one tested).
4. **Testing** with the revisited protocol (queries cropped to their boxes, 1024 px): the
   untuned network and, per query, the network of the fold that held its landmark out, each
   against the full 238-image database (whose other-landmark photos the tuned network saw
   in training, as negatives: the database is the same for both rows). Easy / Medium / Hard
   mAP over all 12 queries, per fold, and a training curve (loss per epoch, validation mAP of
   the held-out queries every ``--every`` epochs) as ``runs/finetune/curves.png``, copied to
   ``benchmarks/figures/finetune_curves.png`` with ``--write``.

    .venv/bin/python benchmarks/finetune.py [--folds 2] [--epochs 8] [--lr 1e-5] [--write]
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, components, landmark_of, machine_line, write_section  # noqa: E402

BEGIN, END = "<!-- finetune:begin -->", "<!-- finetune:end -->"
WEIGHTS = "mobilenetv2_100.coral_in1k.safetensors"


def landmark_groups(gnd: dict) -> dict[str, str]:
    """Landmark -> group name; landmarks are merged when a query's ground truth crosses them."""
    names = sorted({landmark_of(n) for n in list(gnd["imlist"]) + list(gnd["qimlist"])})
    index = {lm: i for i, lm in enumerate(names)}
    edges = [(index[landmark_of(q)], index[landmark_of(gnd["imlist"][j])])
             for qi, q in enumerate(gnd["qimlist"]) for key in ("easy", "hard", "junk") for j in gnd["gnd"][qi][key]]
    groups = components(len(names), edges)
    return {names[i]: "+".join(names[j] for j in g) for g in groups for i in g}


def make_folds(gnd: dict, n_folds: int) -> list[dict]:
    """Per fold: the test groups, test query indices, and the training (name, label) list."""
    group = landmark_groups(gnd)
    groups = sorted(set(group.values()))
    if not 2 <= n_folds <= len(groups):
        raise ValueError(f"--folds must be in 2..{len(groups)} (landmark groups: {groups}), got {n_folds}")
    # images that some query's ground truth puts with another landmark are ambiguous: not trained on
    crossing = set()
    for qi, q in enumerate(gnd["qimlist"]):
        g = gnd["gnd"][qi]
        for key in ("easy", "hard", "junk"):
            for j in g[key]:
                if landmark_of(gnd["imlist"][j]) != landmark_of(q):
                    crossing.add(gnd["imlist"][j])
    folds = []
    for f in range(n_folds):
        test_groups = set(groups[f::n_folds])
        test_q = [i for i, q in enumerate(gnd["qimlist"]) if group[landmark_of(q)] in test_groups]
        train = [(n, landmark_of(n)) for n in list(gnd["imlist"]) + list(gnd["qimlist"])
                 if group[landmark_of(n)] not in test_groups and n not in crossing]
        folds.append({"fold": f, "test_groups": sorted(test_groups), "test_queries": test_q, "train": train,
                      "train_landmarks": sorted({lab for _, lab in train})})
    return folds


def open_run(gnd_path: Path, out: Path):
    """``(gnd dict, RevisitopGroundTruth, image folder, out)`` with ``out`` emptied for this run."""
    from imret.evaluation import load_revisitop

    with open(gnd_path, "rb") as f:
        gnd = pickle.load(f)  # noqa: S301 - the shared, trusted ground truth file
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return gnd, load_revisitop(gnd_path), gnd_path.parent / "jpg", out


def subset_gnd(gnd: dict, queries: list[int]) -> dict:
    return {"imlist": list(gnd["imlist"]), "qimlist": [gnd["qimlist"][i] for i in queries],
            "gnd": [gnd["gnd"][i] for i in queries]}


def describe(model, gt, root: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    from imret.retrieval import Encoder

    enc = Encoder(model, image_size=size, workers=2)
    db = enc.encode(gt.db_paths(root), on_error="raise").descriptors
    q = enc.encode(gt.query_paths(root), list(gt.bbx), on_error="raise").descriptors
    return q, db


def write_fold_files(fold: dict, gnd: dict, root: Path, out: Path) -> Path:
    """``out/fold<i>/``: the fold's training images as ``train.csv`` (``path,label``) and its
    test queries' ground truth as ``gnd_test.pkl``; returns the folder."""
    fdir = out / f"fold{fold['fold']}"
    fdir.mkdir()
    with open(fdir / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for name, lab in fold["train"]:
            w.writerow([str(root / f"{name}.jpg"), lab])
    with open(fdir / "gnd_test.pkl", "wb") as f:
        pickle.dump(subset_gnd(gnd, fold["test_queries"]), f)
    return fdir


def scores(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """``(Nq, Ndb)`` scores through the pipeline the store and ``imret eval`` use (exact, no post-processing)."""
    from imret.retrieval import Retriever

    return Retriever().index(db).search(vectors=q, k=len(db)).dense(len(db))


def result_row(res) -> dict:
    return {p: round(100 * getattr(res, p).map, 2) for p in ("easy", "medium", "hard")}


def plot_curves(fold_runs: list[dict], baseline: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for fr in fold_runs:
        h = fr["history"]
        ax1.plot([e["epoch"] for e in h], [e["loss"] for e in h], marker="o", label=f"fold {fr['fold']}")
        pts = [(0, fr["untuned_fold"]["medium"])] + [(e["epoch"], e["map_medium"]) for e in h if e["map_medium"] is not None]
        ax2.plot(*zip(*pts), marker="o", label=f"fold {fr['fold']} ({', '.join(fr['test_groups'])})")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("AP loss (1 - quantised mAP of the batch)")
    ax1.set_title("training loss")
    ax1.legend()
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("Medium mAP of the held-out queries (%)")
    ax2.set_title("held-out landmarks (epoch 0 = untuned)")
    ax2.legend(fontsize=8)
    fig.suptitle("MobileNetV2 + GeM fine-tuned on rParis6k-mini, leave-landmarks-out")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "rparis6k-mini"))
    ap.add_argument("--weights", default=str(SHARED / "weights" / WEIGHTS))
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--per-class", type=int, default=16, help="images per landmark in a batch")
    ap.add_argument("--train-size", type=int, default=362, help="training long side (px)")
    ap.add_argument("--test-size", type=int, default=1024, help="test long side (px)")
    ap.add_argument("--every", type=int, default=2, help="validate the held-out queries every this many epochs")
    ap.add_argument("--chunk", type=int, default=8, help="multistage chunk size")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "runs" / "finetune"))
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md and the curve PNG "
                                                         "into benchmarks/figures/")
    args = ap.parse_args(argv)

    import torch

    from imret.evaluation import evaluate_revisitop_scores, load_revisitop
    from imret.train.config import config_from_dict
    from imret.train.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    gnd_path = data / f"gnd_{data.name}.pkl"
    if not gnd_path.is_file() or not Path(args.weights).is_file():
        print(f"finetune: needs {gnd_path} and {args.weights} (set IMRET_SHARED)", file=sys.stderr)
        return 2
    gnd, gt_all, root, out = open_run(gnd_path, Path(args.out))
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t_start = time.perf_counter()
    folds = make_folds(gnd, args.folds)

    base_cfg = {
        "epochs": args.epochs, "batch_size": 1, "multistage": True, "chunk_size": args.chunk, "precision": "fp32",
        "seed": 0, "device": "cpu", "log_every": 1,
        "model": {"backbone": "mobilenetv2_100.coral", "pool": "gem", "gem_p": 3.0, "pretrained": False,
                  "weights": str(args.weights), "whitening": None, "freeze_batchnorm": True},
        "data": {"kind": "csv", "image_size": args.train_size, "augment": True, "workers": 2},
        "loss": {"name": "ap", "bins": 20, "tie_aware": False, "class_balanced": True},
        "mining": {"strategy": "all", "per_class": args.per_class},
        "optim": {"name": "adam", "lr": args.lr, "weight_decay": 1e-6, "p_lr_mult": 10.0,
                  "schedule": "exponential", "gamma": 0.95},
        "validation": {"images": str(root), "image_size": args.test_size, "every": args.every},
    }

    untuned_q = untuned_db = None
    tuned_scores = np.full((gt_all.n_queries, gt_all.n_db), np.nan, dtype=np.float32)
    fold_runs = []
    for fold in folds:
        fdir = write_fold_files(fold, gnd, root, out)
        cfg = copy.deepcopy(base_cfg)
        cfg["out"] = str(fdir / "run")
        cfg["data"]["csv"] = str(fdir / "train.csv")
        cfg["data"]["root"] = str(root)
        cfg["validation"]["gnd"] = str(fdir / "gnd_test.pkl")
        cfg["mining"]["classes_per_batch"] = len(fold["train_landmarks"])
        trainer = Trainer(config_from_dict(cfg), progress=False)
        gt_fold = load_revisitop(fdir / "gnd_test.pkl")
        print(f"fold {fold['fold']}: test {fold['test_groups']} ({len(fold['test_queries'])} queries); "
              f"train {fold['train_landmarks']} ({len(fold['train'])} images)", file=sys.stderr, flush=True)
        if untuned_q is None:  # the untuned network, once, on every query (the same weights in every fold)
            t0 = time.perf_counter()
            untuned_q, untuned_db = describe(trainer.model, gt_all, root, args.test_size)
            print(f"  untuned extraction {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        untuned_fold = result_row(evaluate_revisitop_scores(scores(untuned_q[fold["test_queries"]], untuned_db), gt_fold))
        t0 = time.perf_counter()
        result = trainer.fit()
        train_s = time.perf_counter() - t0
        tuned = trainer.model.eval()
        q, db = describe(tuned, gt_fold, root, args.test_size)
        tuned_scores[fold["test_queries"]] = scores(q, db)
        tuned_fold = result_row(evaluate_revisitop_scores(tuned_scores[fold["test_queries"]], gt_fold))
        history = [{"epoch": h.epoch, "loss": h.loss, "map_medium": None if h.map_medium is None else 100 * h.map_medium,
                    "gem_p": h.gem_p, "images_per_s": h.images_per_s} for h in result.history]
        fold_runs.append({**{k: fold[k] for k in ("fold", "test_groups", "train_landmarks")},
                          "test_queries": [gnd["qimlist"][i] for i in fold["test_queries"]],
                          "train_images": len(fold["train"]), "untuned_fold": untuned_fold, "tuned_fold": tuned_fold,
                          "history": history, "train_s": train_s, "steps": result.steps})
        print(f"  untuned {untuned_fold} -> tuned {tuned_fold} ({train_s:.0f} s training)", file=sys.stderr, flush=True)

    untuned = result_row(evaluate_revisitop_scores(scores(untuned_q, untuned_db), gt_all))
    tuned = result_row(evaluate_revisitop_scores(tuned_scores, gt_all))
    plot_curves(fold_runs, untuned, out / "curves.png")
    wall = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps({"untuned": untuned, "tuned": tuned, "folds": fold_runs}, indent=1))

    lines = [BEGIN, "## Fine-tuning on real photos, tested on held-out landmarks (`benchmarks/finetune.py`)", "",
             f"- Command: `.venv/bin/python benchmarks/finetune.py {' '.join(argv)}`".rstrip(),
             f"- Machine: {machine_line()}",
             f"- Date: {started}; wall time {wall / 60:.1f} min (CPU)",
             f"- Network: the shared ImageNet MobileNetV2 (TF-slim weights, BatchNorm folded and frozen) + GeM "
             f"(p from 3, learned); AP loss (20 bins, class-balanced) over batches of {args.per_class} images per "
             f"training landmark, multistage backprop (chunks of {args.chunk}), Adam lr {args.lr:g} (GeM p ×10), "
             f"weight decay 1e-6, lr × 0.95 per epoch, {args.epochs} epochs, train {args.train_size} px with random "
             f"resized crops and colour jitter; test at {args.test_size} px, queries cropped to their boxes. "
             "Settings fixed before the run; the last epoch is tested (no model selection on test queries).",
             f"- Split: {args.folds}-fold leave-landmarks-out over the landmark groups "
             f"{sorted(set(landmark_groups(gnd).values()))}; each query is ranked by the network of the fold that "
             "never saw its group. Database: all 238 photos for both rows.", "",
             "| fold | test groups (queries) | trained on (images) | untuned E / M / H | tuned E / M / H |",
             "|---|---|---|---|---|"]
    for fr in fold_runs:
        u, t = fr["untuned_fold"], fr["tuned_fold"]
        lines.append(f"| {fr['fold']} | {', '.join(fr['test_groups'])} ({len(fr['test_queries'])}) | "
                     f"{', '.join(fr['train_landmarks'])} ({fr['train_images']}) | "
                     f"{u['easy']:.2f} / {u['medium']:.2f} / {u['hard']:.2f} | "
                     f"{t['easy']:.2f} / {t['medium']:.2f} / {t['hard']:.2f} |")
    lines.append(f"| all | {gt_all.n_queries} queries | | {untuned['easy']:.2f} / {untuned['medium']:.2f} / "
                 f"{untuned['hard']:.2f} | {tuned['easy']:.2f} / {tuned['medium']:.2f} / {tuned['hard']:.2f} |")
    delta = {p: tuned[p] - untuned[p] for p in tuned}
    lines += ["", f"Change over all queries: Easy {delta['easy']:+.2f}, Medium {delta['medium']:+.2f}, "
                  f"Hard {delta['hard']:+.2f} mAP points.", "",
              "Per-epoch loss and held-out Medium mAP:", "",
              "| fold | epoch | loss | held-out Medium mAP | GeM p | train images/s |", "|---|---:|---:|---:|---:|---:|"]
    for fr in fold_runs:
        lines.append(f"| {fr['fold']} | 0 | | {fr['untuned_fold']['medium']:.2f} | 3.000 | |")
        for h in fr["history"]:
            m = "" if h["map_medium"] is None else f"{h['map_medium']:.2f}"
            p = "" if h["gem_p"] is None else f"{h['gem_p']:.3f}"
            lines.append(f"| {fr['fold']} | {h['epoch']} | {h['loss']:.4f} | {m} | {p} | {h['images_per_s']:.1f} |")
    lines += ["", "![fine-tuning curves](benchmarks/figures/finetune_curves.png)", "",
              "Caveat: 12 queries and two to three training landmarks per fold; differences of a few points are "
              "within the noise of so small a test.", END]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        fig = REPO / "benchmarks" / "figures"
        fig.mkdir(exist_ok=True)
        shutil.copy(out / "curves.png", fig / "finetune_curves.png")
        write_section(text, REPO / "BENCHMARKS.md", BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
