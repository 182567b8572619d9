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
5. **Mined labels** (``--labels mined|both``; issue 17): the same folds, the same training
   images, the same trainer, loss, schedule, seed and settings, but no landmark labels: each
   fold's training images are mined with :func:`imret.selfmine.mine` (kNN graph of the untuned
   network's descriptors, RootSIFT + MAGSAC verification of the candidate edges, the library's
   defaults unless ``--mine KEY=VALUE`` sets one, e.g. ``expand=2``), only images in a
   pseudo-class are kept, and each component is a pseudo-class. By default (``--mined-batches
   true``) the mined run takes as many batches per epoch as the true-label run of the fold, so
   the two take the same optimizer steps although mining keeps fewer images. The untuned, tuned-on-true-labels and tuned-on-mined-labels rows are
   compared, with the mined gain as a share of the labelled gain, and the mining statistics
   per fold (images kept, pseudo-classes, purity against the landmarks). The true-label run
   is the same code and seeds as with ``--labels true`` (the global random state is saved
   around everything the mined run does).

    .venv/bin/python benchmarks/finetune.py [--folds 2] [--epochs 8] [--lr 1e-5] [--labels both] [--write]
    .venv/bin/python benchmarks/finetune.py --labels both --every 8 --mined-every 0 --mine k=30 --mine min_inliers=10 \
        --mine expand=5 --mine attach_members=5 --mine min_size=8   # the settings benchmarks/mine_sweep.py chose
    .venv/bin/python benchmarks/finetune.py --render runs/finetune/results.json [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import json
import pickle
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, components, landmark_of, machine_line, write_section  # noqa: E402

BEGIN, END = "<!-- finetune:begin -->", "<!-- finetune:end -->"
WEIGHTS = "mobilenetv2_100.coral_in1k.safetensors"
LABEL_SOURCES = ("true", "mined", "both")
RUN_TITLES = {"true": "tuned, true labels", "mined": "tuned, mined labels (no labels)"}
BAR = 80.0  # issue 17: mined gain >= 80 % of the labelled gain in Medium and Hard mAP


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
    write_train_csv(fdir / "train.csv", fold["train"], root)
    with open(fdir / "gnd_test.pkl", "wb") as f:
        pickle.dump(subset_gnd(gnd, fold["test_queries"]), f)
    return fdir


def write_train_csv(path: Path, rows: list[tuple[str, str]], root: Path) -> None:
    """``path,label`` rows (absolute image paths), the layout ``imret train`` reads."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for name, lab in rows:
            w.writerow([str(root / f"{name}.jpg"), lab])


@contextlib.contextmanager
def saved_random_state():
    """Restore the global torch / NumPy / Python random states on exit, so that what runs inside
    (mining, the mined-label training) leaves the true-label runs exactly as without it."""
    import torch

    state = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])


def parse_mine_settings(items: list[str]) -> dict:
    """``["expand=1", "attach_inliers=10"]`` -> ``{"expand": 1, "attach_inliers": 10}`` (ints, or None)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--mine takes KEY=VALUE, got {item!r}")
        v = value.strip()
        out[key.strip()] = None if v.lower() == "none" else (float(v) if "." in v else int(v))
    mine_settings(out)  # unknown keys are an error now, not after the untuned extraction
    return out


def mine_settings(overrides: dict | None = None) -> dict:
    """The :func:`imret.selfmine.mine` settings of a run: the library defaults, updated by ``overrides``."""
    import inspect

    from imret.selfmine import mine

    params = inspect.signature(mine).parameters
    keys = ("k", "min_inliers", "min_size", "expand", "attach_members", "attach_min", "attach_inliers", "attach_votes")
    out = {key: params[key].default for key in keys}
    unknown = sorted(set(overrides or {}) - set(keys))
    if unknown:
        raise ValueError(f"unknown mining setting(s) {unknown}; available: {', '.join(keys)}")
    out.update(overrides or {})
    return out


def mine_fold(fold: dict, gnd: dict, root: Path, db_desc: np.ndarray, model, size: int,
              mine_kw: dict | None = None) -> tuple[list, dict]:
    """Pseudo-labels of the fold's training images from :func:`imret.selfmine.mine`, with no
    landmark label used: descriptors of the untuned network (the database rows already
    extracted at ``size``; the training queries, uncropped, extracted here the same way),
    RootSIFT at the library defaults, verification at the library defaults, mining at
    ``mine_kw`` (:func:`mine_settings`). Returns the ``(name, pseudo-label)`` rows of images in
    a pseudo-class, and the mining statistics (purity etc. measured against the landmarks
    afterwards)."""
    from imret.retrieval import Encoder
    from imret.selfmine import mine

    t0 = time.perf_counter()
    mine_kw = mine_settings(mine_kw)
    names = [n for n, _ in fold["train"]]
    truth = [lab for _, lab in fold["train"]]
    row = {n: i for i, n in enumerate(gnd["imlist"])}
    x = np.zeros((len(names), db_desc.shape[1]), np.float32)
    rest = [i for i, n in enumerate(names) if n not in row]
    for i, n in enumerate(names):
        if n in row:
            x[i] = db_desc[row[n]]
    if rest:
        x[rest] = Encoder(model, image_size=size, workers=2).encode(
            [root / f"{names[i]}.jpg" for i in rest], on_error="raise").descriptors
    feats = rootsift_features(names, root)
    mined = mine(x, feats, [str(root / f"{n}.jpg") for n in names], workers=2, **mine_kw)
    labels = mined.labels
    ls = label_stats(truth, labels)
    same = int(sum(truth[i] == truth[j] for i, j in mined.positives))
    s = mined.summary()
    stats = {"images": len(names), "kept": ls["kept"], "pseudo_classes": mined.num_classes,
             "component_sizes": ls["sizes"], "purity": ls["purity"],
             "candidate_pairs": s["candidate_pairs"], "verified_pairs": s["verified_pairs"],
             "verified_same_landmark": same,
             "per_landmark": {lm: {"images": v["images"], "kept": v["kept"], "components": v["classes"]}
                              for lm, v in ls["per_landmark"].items()},
             "seconds": round(time.perf_counter() - t0, 1), "settings": mine_kw,
             "components": [[names[i] for i in c] for c in mined.components]}
    return [(names[i], f"m{int(labels[i]):03d}") for i in np.flatnonzero(labels >= 0)], stats


def rootsift_features(names: list[str], root: Path) -> list:
    """RootSIFT features (library defaults) of the photos ``root/NAME.jpg``, two threads."""
    from imret.local.sift import SiftExtractor

    sift = SiftExtractor()
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda n: sift.encode(str(root / f"{n}.jpg"))[0], names))


def label_stats(truth: list[str], labels: np.ndarray) -> dict:
    """Pseudo-labels (``-1``: unlabelled) scored against the landmark of each image: images kept,
    class sizes, purity (share of kept images whose class's majority landmark is their own, %)
    and per landmark its images, how many are kept and in how many classes."""
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])]
    kept = int((labels >= 0).sum())
    majority = sum(max(sum(truth[i] == lm for i in c) for lm in {truth[i] for i in c}) for c in classes)
    per = {lm: {"images": truth.count(lm),
                "kept": int(sum(t == lm and lab >= 0 for t, lab in zip(truth, labels))),
                "classes": int(sum(any(truth[i] == lm for i in c) for c in classes))} for lm in sorted(set(truth))}
    return {"kept": kept, "images": len(truth), "sizes": sorted((len(c) for c in classes), reverse=True),
            "purity": round(100 * majority / max(1, kept), 2), "per_landmark": per}


def untuned_model(weights: str | Path) -> dict:
    """The ``model`` section of the benchmark's configuration: ImageNet MobileNetV2 (the shared
    timm weights at ``weights``) + GeM p=3, no whitening, BatchNorm frozen."""
    return {"backbone": "mobilenetv2_100.coral", "pool": "gem", "gem_p": 3.0, "pretrained": False,
            "weights": str(weights), "whitening": None, "freeze_batchnorm": True}


def fold_config(base_cfg: dict, fdir: Path, csv_path: Path, run_dir: Path, root: Path, classes: int) -> dict:
    cfg = copy.deepcopy(base_cfg)
    cfg["out"] = str(run_dir)
    cfg["data"]["csv"] = str(csv_path)
    cfg["data"]["root"] = str(root)
    cfg["validation"]["gnd"] = str(fdir / "gnd_test.pkl")
    cfg["mining"]["classes_per_batch"] = classes
    return cfg


def make_trainer(cfg: dict):
    from imret.train.config import config_from_dict
    from imret.train.trainer import Trainer

    return Trainer(config_from_dict(cfg), progress=False)


def train_and_test(trainer, gt_fold, root: Path, size: int) -> tuple[dict, np.ndarray]:
    """Train (the last epoch is kept) and score the fold's test queries against the database."""
    from imret.evaluation import evaluate_revisitop_scores

    t0 = time.perf_counter()
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    q, db = describe(trainer.model.eval(), gt_fold, root, size)
    sc = scores(q, db)
    history = [{"epoch": h.epoch, "loss": h.loss, "map_medium": None if h.map_medium is None else 100 * h.map_medium,
                "gem_p": h.gem_p, "images_per_s": h.images_per_s} for h in result.history]
    return {"tuned_fold": result_row(evaluate_revisitop_scores(sc, gt_fold)), "history": history,
            "train_s": train_s, "steps": result.steps}, sc


def scores(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """``(Nq, Ndb)`` scores through the pipeline the store and ``imret eval`` use (exact, no post-processing)."""
    from imret.retrieval import Retriever

    return Retriever().index(db).search(vectors=q, k=len(db)).dense(len(db))


def result_row(res) -> dict:
    return {p: round(100 * getattr(res, p).map, 2) for p in ("easy", "medium", "hard")}


def plot_curves(folds: list[dict], runs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    style = {"true": "-", "mined": "--"}
    for fr in folds:
        for run in runs:
            if run not in fr["runs"]:
                continue
            h = fr["runs"][run]["history"]
            name = f"fold {fr['fold']}" + (f", {run} labels" if len(runs) > 1 else "")
            color = f"C{fr['fold']}"
            ax1.plot([e["epoch"] for e in h], [e["loss"] for e in h], style[run], marker="o", color=color, label=name)
            pts = [(0, fr["untuned_fold"]["medium"])] + [(e["epoch"], e["map_medium"]) for e in h
                                                         if e["map_medium"] is not None]
            ax2.plot(*zip(*pts), style[run], marker="o", color=color,
                     label=f"{name} ({', '.join(fr['test_groups'])})")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("AP loss (1 - quantised mAP of the batch)")
    ax1.set_title("training loss")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("Medium mAP of the held-out queries (%)")
    ax2.set_title("held-out landmarks (epoch 0 = untuned)")
    ax2.legend(fontsize=7)
    title = "MobileNetV2 + GeM fine-tuned on rParis6k-mini, leave-landmarks-out"
    fig.suptitle(title + (" (solid: true labels, dashed: mined labels)" if len(runs) > 1 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _emh(r: dict) -> str:
    return f"{r['easy']:.2f} / {r['medium']:.2f} / {r['hard']:.2f}"


def share(gain: float, ref: float) -> str:
    """``gain`` as a percentage of ``ref`` (the labelled gain); n/a when the labelled gain is not positive."""
    return f"{100 * gain / ref:.0f} %" if ref > 0 else "n/a (no labelled gain)"


def min_kept(folds: list[dict]) -> int:
    """The smallest component size kept as a pseudo-class in a run (2 before the setting was recorded)."""
    st = next((fr["mining"].get("settings") for fr in folds if fr.get("mining")), None)
    return 2 if st is None else st["min_size"]


def mine_line(folds: list[dict]) -> str:
    """The mining settings of a run in words (the same in every fold)."""
    st = next((fr["mining"].get("settings") for fr in folds if fr.get("mining")), None)
    if st is None:  # runs before the settings were recorded: the library defaults of then
        return "k 10, pair verified at >= 15 inliers, images in a verified component of >= 2 images kept"
    words = [f"k {st['k']}, pair verified at >= {st['min_inliers']} inliers"]
    if st["expand"]:
        words.append(f"{st['expand']} expansion round(s) (each component's mean descriptor proposes {st['k']} outside "
                     f"images, each verified against its {st['attach_members']} most similar members)")
    if st["attach_inliers"] is not None and st["attach_inliers"] < st["min_inliers"]:
        words.append(f"an image joins a component when >= {st['attach_min']} of its members verify with it at "
                     f">= {st['attach_inliers']} inliers")
    words.append(f"images in a component of >= {st['min_size']} images kept")
    if st.get("attach_votes") is not None:
        words.append(f"then every image left out joins the class holding >= {st['attach_votes']:g} of the cosine "
                     "similarity of its 10 nearest kept images (descriptor votes, not verified)")
    return "; ".join(words)


def render(res: dict) -> str:
    """The BENCHMARKS.md section from ``results.json``."""
    a, runs, folds = res["args"], res["runs"], res["folds"]
    untuned = res.get("untuned")
    lines = [BEGIN, "## Fine-tuning on real photos, tested on held-out landmarks (`benchmarks/finetune.py`)", "",
             f"- Command: `.venv/bin/python benchmarks/finetune.py {' '.join(res['argv'])}`".rstrip(),
             f"- Machine: {res['machine']}",
             f"- Date: {res['started']}; wall time {res['wall_s'] / 60:.1f} min (CPU)",
             f"- Network: the shared ImageNet MobileNetV2 (TF-slim weights, BatchNorm folded and frozen) + GeM "
             f"(p from 3, learned); AP loss (20 bins, class-balanced) over batches of {a['per_class']} images per "
             f"training landmark, multistage backprop (chunks of {a['chunk']}), Adam lr {a['lr']:g} (GeM p ×10), "
             f"weight decay 1e-6, lr × 0.95 per epoch, {a['epochs']} epochs, seed 0, train {a['train_size']} px with "
             f"random resized crops and colour jitter; test at {a['test_size']} px, queries cropped to their boxes. "
             "Settings fixed before the run; the last epoch is tested (no model selection on test queries).",
             f"- Split: {a['folds']}-fold leave-landmarks-out over the landmark groups {res['groups']}; each query is "
             "ranked by the network of the fold that never saw its group. Database: all 238 photos for every row."]
    if "mined" in runs:
        lines.append(
            "- Mined labels (issue 17): the same training images per fold, labelled by no one: "
            "`imret.selfmine.mine` on that fold's training images only (kNN graph of the untuned "
            f"network's {a['test_size']} px descriptors; RootSIFT, 1000 keypoints at 1024 px; affine MAGSAC++; "
            f"{mine_line(folds)}), each component a pseudo-class. Trained with the same trainer, loss, schedule, "
            "seed and "
            f"settings; a batch holds as many classes as the true-label batch of that fold ({a['per_class']} images "
            "each, so the same images per step), drawn from the pseudo-classes (a class smaller than "
            f"{a['per_class']} is topped up with repeats, as the sampler does)"
            + ("; as many batches per epoch as the true-label run of the fold (the same number of optimizer steps, "
               "although mining keeps fewer images)" if a.get("mined_batches") == "true" else "")
            + ". The true-label run is the same code path and seeds as without the mined run.")
    tr = res.get("true_reference")
    if tr:
        same = all(abs(tr["folds"][str(fr["fold"])]["untuned"][p] - fr["untuned_fold"][p]) < 0.005
                   for fr in folds for p in ("easy", "medium", "hard")) if all(
            str(fr["fold"]) in tr["folds"] for fr in folds) else False
        lines.append(
            f"- The true-label rows are the published run ({tr.get('command', '?')}, {tr.get('date', '?')}; same "
            "folds, code path, seeds and settings), not rerun in this run (`--labels mined --true-from`). This "
            "run's untuned rows "
            + ("equal the published untuned rows to 0.01 mAP, so the evaluation is the same." if same else
               "differ from the published untuned rows (" + "; ".join(
                   f"fold {k}: {_emh(v['untuned'])}" for k, v in tr["folds"].items()) + "): compare with care."))
    lines += ["", "| fold | test groups (queries) | model | trained on | Easy | Medium | Hard |",
              "|---|---|---|---|---:|---:|---:|"]
    for fr in folds:
        u = fr["untuned_fold"]
        lines.append(f"| {fr['fold']} | {', '.join(fr['test_groups'])} ({len(fr['test_queries'])}) | untuned | | "
                     f"{u['easy']:.2f} | {u['medium']:.2f} | {u['hard']:.2f} |")
        for run in runs:
            if run not in fr["runs"]:
                continue
            t = fr["runs"][run]["tuned_fold"]
            if run == "true":
                on = f"{fr['train_images']} images of {', '.join(fr['train_landmarks'])}"
            else:
                m = fr["mining"]
                on = f"{m['kept']} of {fr['train_images']} images, {m['pseudo_classes']} pseudo-classes"
            lines.append(f"| {fr['fold']} | | {RUN_TITLES[run]} | {on} | {t['easy']:.2f} | {t['medium']:.2f} | "
                         f"{t['hard']:.2f} |")
    nq = sum(len(fr["test_queries"]) for fr in folds)
    complete = untuned is not None and all(r in res["tuned"] for r in runs)
    delta = {}
    if complete:
        lines.append(f"| all | {nq} queries | untuned | | {untuned['easy']:.2f} | {untuned['medium']:.2f} | "
                     f"{untuned['hard']:.2f} |")
        for run in runs:
            t = res["tuned"][run]
            lines.append(f"| all | | {RUN_TITLES[run]} | | {t['easy']:.2f} | {t['medium']:.2f} | {t['hard']:.2f} |")
        lines.append("")
        delta = {run: {p: res["tuned"][run][p] - untuned[p] for p in untuned} for run in runs}
        for run, d in delta.items():
            lines.append(f"Change over all queries, {RUN_TITLES[run]}: Easy {d['easy']:+.2f}, "
                         f"Medium {d['medium']:+.2f}, Hard {d['hard']:+.2f} mAP points.")
    else:
        done = [str(fr["fold"]) for fr in folds if all(r in fr["runs"] for r in runs)]
        lines += ["", f"**Partial run: {len(done)} of {a['folds']} folds finished ({', '.join(done) or 'none'}); "
                      "no all-query rows.**"]
    if set(runs) == {"true", "mined"}:
        lines += ["", "Mined gain as a share of the labelled gain (the issue's bar: >= 80 % in Medium and Hard):", "",
                  "| fold | Medium: true / mined gain | mined share | Hard: true / mined gain | mined share |",
                  "|---|---:|---:|---:|---:|"]
        for fr in folds:
            if not {"true", "mined"} <= set(fr["runs"]):
                continue
            u, t, m = fr["untuned_fold"], fr["runs"]["true"]["tuned_fold"], fr["runs"]["mined"]["tuned_fold"]
            gm = {p: (t[p] - u[p], m[p] - u[p]) for p in ("medium", "hard")}
            lines.append(f"| {fr['fold']} | {gm['medium'][0]:+.2f} / {gm['medium'][1]:+.2f} | "
                         f"{share(gm['medium'][1], gm['medium'][0])} | {gm['hard'][0]:+.2f} / {gm['hard'][1]:+.2f} | "
                         f"{share(gm['hard'][1], gm['hard'][0])} |")
        if complete:
            dt, dm = delta["true"], delta["mined"]
            lines.append(f"| all | {dt['medium']:+.2f} / {dm['medium']:+.2f} | {share(dm['medium'], dt['medium'])} | "
                         f"{dt['hard']:+.2f} / {dm['hard']:+.2f} | {share(dm['hard'], dt['hard'])} |")
            met = {p: dt[p] > 0 and 100 * dm[p] / dt[p] >= BAR for p in ("medium", "hard")}
            verdict = ("met" if all(met.values()) else
                       "not met" + (f" (met in {', '.join(p.title() for p, v in met.items() if v)} only)"
                                    if any(met.values()) else ""))
            lines += ["", f"**The 80 % bar over all {nq} queries: {verdict}.**"]
        else:
            lines += ["", "**The 80 % bar over all queries: not decided (partial run).**"]
    if "mined" in runs:
        lines += ["", "Mining per fold (statistics against the landmark labels, which mining never saw; purity: "
                      "share of kept images whose pseudo-class's majority landmark is their own):", "",
                  f"| fold | training images | kept (in components >= {min_kept(folds)}) | pseudo-classes (sizes) | "
                  "purity | verified pairs (same landmark) | per landmark: kept / images (components) | mining s |",
                  "|---|---:|---:|---|---:|---|---|---:|"]
        for fr in folds:
            m = fr.get("mining")
            if m is None:
                continue
            per = "; ".join(f"{lm} {v['kept']}/{v['images']} ({v['components']})" for lm, v in m["per_landmark"].items())
            lines.append(f"| {fr['fold']} | {m['images']} | {m['kept']} ({100 * m['kept'] / m['images']:.0f} %) | "
                         f"{m['pseudo_classes']} ({', '.join(map(str, m['component_sizes']))}) | {m['purity']:.1f} % | "
                         f"{m['verified_pairs']} of {m['candidate_pairs']} candidates ({m['verified_same_landmark']}) | "
                         f"{per} | {m['seconds']:.0f} |")
    lines += ["", "Per-epoch loss and held-out Medium mAP:", "",
              "| fold | labels | epoch | loss | held-out Medium mAP | GeM p | train images/s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for fr in folds:
        for run in runs:
            if run not in fr["runs"]:
                continue
            lines.append(f"| {fr['fold']} | {run} | 0 | | {fr['untuned_fold']['medium']:.2f} | 3.000 | |")
            for h in fr["runs"][run]["history"]:
                mm = "" if h["map_medium"] is None else f"{h['map_medium']:.2f}"
                p = "" if h["gem_p"] is None else f"{h['gem_p']:.3f}"
                lines.append(f"| {fr['fold']} | {run} | {h['epoch']} | {h['loss']:.4f} | {mm} | {p} | "
                             f"{h['images_per_s']:.1f} |")
    lines += ["", "![fine-tuning curves](benchmarks/figures/finetune_curves.png)", "",
              "Caveat: 12 queries and two to three training landmarks per fold; differences of a few points are "
              "within the noise of so small a test.", END]
    return "\n".join(lines) + "\n"


def _floats(cell: str) -> dict:
    e, m, h = (float(v) for v in cell.split("/"))
    return {"easy": e, "medium": m, "hard": h}


def true_reference(markdown: str) -> dict:
    """The true-label run of a published section (the layout before the mined option: one row per
    fold and an ``all`` row with untuned and tuned E / M / H, and the per-epoch table), parsed
    from BENCHMARKS.md text, for ``--true-from`` when only the mined run was measured."""
    if BEGIN not in markdown or END not in markdown:
        raise ValueError(f"no {BEGIN} ... {END} section in the given file")
    sec = markdown.split(BEGIN, 1)[1].split(END, 1)[0]
    ref: dict = {"folds": {}, "history": {}}
    for line in sec.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("- Date:"):
            ref["date"] = line[len("- Date:"):].split(";")[0].strip()
        elif line.startswith("- Command:"):
            ref["command"] = line[len("- Command:"):].strip()
        elif len(cells) == 5 and cells[0].isdigit() and "/" in cells[3]:
            ref["folds"][int(cells[0])] = {"untuned": _floats(cells[3]), "tuned": _floats(cells[4])}
        elif len(cells) == 5 and cells[0] == "all":
            ref["untuned"], ref["tuned"] = _floats(cells[3]), _floats(cells[4])
        elif len(cells) == 6 and cells[0].isdigit() and cells[1].isdigit() and cells[1] != "0":
            ref["history"].setdefault(int(cells[0]), []).append(
                {"epoch": int(cells[1]), "loss": float(cells[2]), "map_medium": float(cells[3]) if cells[3] else None,
                 "gem_p": float(cells[4]) if cells[4] else None, "images_per_s": float(cells[5])})
    if "tuned" not in ref or not ref["folds"]:
        raise ValueError("the section has no true-label result table in the layout before the mined option")
    return ref


def merge_true_reference(res: dict, ref: dict) -> dict:
    """Put a published true-label run into ``res`` (a mined-only run) as its ``true`` rows."""
    if "true" in res["runs"] and not res.get("true_reference"):
        raise ValueError("this run measured the true-label run itself; --true-from is for --labels mined runs")
    for fr in res["folds"]:
        if fr["fold"] not in ref["folds"]:
            raise ValueError(f"the published section has no fold {fr['fold']} (folds {sorted(ref['folds'])})")
        fr["runs"]["true"] = {"tuned_fold": ref["folds"][fr["fold"]]["tuned"],
                              "history": ref["history"].get(fr["fold"], []), "published": True}
        fr["runs"] = {k: fr["runs"][k] for k in ("true", "mined") if k in fr["runs"]}
    res["tuned"] = {"true": ref["tuned"], **{k: v for k, v in res["tuned"].items() if k != "true"}}
    res["runs"] = ["true", "mined"]
    res["true_reference"] = json.loads(json.dumps({k: ref[k] for k in ("date", "command", "untuned", "folds")
                                                   if k in ref}))  # fold keys as in results.json: strings
    return res


def publish_results(res: dict, out: Path, write: bool) -> None:
    plot_curves(res["folds"], res["runs"], out / "curves.png")
    text = render(res)
    print(text)
    if write:
        fig = REPO / "benchmarks" / "figures"
        fig.mkdir(exist_ok=True)
        shutil.copy(out / "curves.png", fig / "finetune_curves.png")
        write_section(text, REPO / "BENCHMARKS.md", BEGIN, END)


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
    ap.add_argument("--mined-every", type=int, default=None,
                    help="validation interval of the mined-label run (default --every; 0: none, only the final test; "
                         "validation does not change training, only the curve's points and the time)")
    ap.add_argument("--mined-batches", choices=("true", "images"), default="true",
                    help="batches per epoch of the mined-label run: as many as the true-label run of the fold (the "
                         "same optimizer steps; default), or its kept images // batch size (fewer steps when mining "
                         "keeps fewer images)")
    ap.add_argument("--mine", action="append", default=[], metavar="KEY=VALUE",
                    help="a mining setting other than the library default (imret.selfmine.mine keyword: k, "
                         "min_inliers, min_size, expand, attach_members, attach_min, attach_inliers); repeatable")
    ap.add_argument("--chunk", type=int, default=8, help="multistage chunk size")
    ap.add_argument("--labels", choices=LABEL_SOURCES, default="both",
                    help="train on the true landmark labels, on labels mined from the same images with "
                         "imret.selfmine (no labels), or both and compare (default both)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "runs" / "finetune"))
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only rebuild the section and figure from a finished "
                                                             "run's results.json")
    ap.add_argument("--true-from", metavar="BENCHMARKS_MD", help="with --render of a --labels mined run: take the "
                    "true-label rows from the finetune section of this file (a published true-label run)")
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md and the curve PNG "
                                                         "into benchmarks/figures/")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        if args.true_from:
            res = merge_true_reference(res, true_reference(Path(args.true_from).read_text(encoding="utf-8")))
            Path(args.render).write_text(json.dumps(res, indent=1))
        publish_results(res, Path(args.render).parent, args.write)
        return 0

    import torch

    from imret.evaluation import evaluate_revisitop_scores, load_revisitop

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
    runs = ["true", "mined"] if args.labels == "both" else [args.labels]
    mine_overrides = parse_mine_settings(args.mine)

    base_cfg = {
        "epochs": args.epochs, "batch_size": 1, "multistage": True, "chunk_size": args.chunk, "precision": "fp32",
        "seed": 0, "device": "cpu", "log_every": 1,
        "model": untuned_model(args.weights),
        "data": {"kind": "csv", "image_size": args.train_size, "augment": True, "workers": 2},
        "loss": {"name": "ap", "bins": 20, "tie_aware": False, "class_balanced": True},
        "mining": {"strategy": "all", "per_class": args.per_class},
        "optim": {"name": "adam", "lr": args.lr, "weight_decay": 1e-6, "p_lr_mult": 10.0,
                  "schedule": "exponential", "gamma": 0.95},
        "validation": {"images": str(root), "image_size": args.test_size, "every": args.every},
    }

    res = {"argv": argv, "args": vars(args), "machine": machine_line(), "started": started, "runs": runs,
           "groups": sorted(set(landmark_groups(gnd).values())), "folds": [], "tuned": {}, "wall_s": 0.0}
    untuned_q = untuned_db = None
    mined_rows: dict[int, list] = {}
    tuned_scores = {run: np.full((gt_all.n_queries, gt_all.n_db), np.nan, dtype=np.float32) for run in runs}
    for fold in folds:
        fdir = write_fold_files(fold, gnd, root, out)
        # the true-label trainer is built first, as before the mined option, also when only its untuned model is used
        trainer = make_trainer(fold_config(base_cfg, fdir, fdir / "train.csv", fdir / "run", root,
                                           len(fold["train_landmarks"])))
        gt_fold = load_revisitop(fdir / "gnd_test.pkl")
        print(f"fold {fold['fold']}: test {fold['test_groups']} ({len(fold['test_queries'])} queries); "
              f"train {fold['train_landmarks']} ({len(fold['train'])} images)", file=sys.stderr, flush=True)
        if untuned_q is None:  # the untuned network, once, on every query (the same weights in every fold)
            t0 = time.perf_counter()
            untuned_q, untuned_db = describe(trainer.model, gt_all, root, args.test_size)
            print(f"  untuned extraction {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if "mined" in runs:  # mine every fold now, with the untuned network (fails early, not after training)
                from imret.data.samplers import ClassBalancedBatchSampler

                with saved_random_state():
                    for fo in folds:
                        mined_rows[fo["fold"]], stats = mine_fold(fo, gnd, root, untuned_db, trainer.model,
                                                                  args.test_size, mine_overrides)
                        fo["mining"] = stats
                        lab = np.unique([r[1] for r in mined_rows[fo["fold"]]], return_inverse=True)[1]
                        ClassBalancedBatchSampler(lab.astype(np.int64), len(fo["train_landmarks"]), args.per_class)
                        print(f"  mined fold {fo['fold']}: kept {stats['kept']} of {stats['images']} images in "
                              f"{stats['pseudo_classes']} pseudo-classes {stats['component_sizes']}, purity "
                              f"{stats['purity']:.1f} % ({stats['seconds']:.0f} s)", file=sys.stderr, flush=True)
        untuned_fold = result_row(evaluate_revisitop_scores(scores(untuned_q[fold["test_queries"]], untuned_db), gt_fold))
        fr = {**{k: fold[k] for k in ("fold", "test_groups", "train_landmarks")},
              "test_queries": [gnd["qimlist"][i] for i in fold["test_queries"]],
              "train_images": len(fold["train"]), "untuned_fold": untuned_fold, "runs": {}}
        if "mining" in fold:
            fr["mining"] = fold["mining"]
        res["folds"].append(fr)
        for run in runs:
            if run == "true":
                got, sc = train_and_test(trainer, gt_fold, root, args.test_size)
            else:
                del trainer  # the true-label run's model is not needed any more
                trainer = None
                mdir = fdir / "mined"
                mdir.mkdir()
                write_train_csv(mdir / "train.csv", mined_rows[fold["fold"]], root)
                with saved_random_state():
                    mcfg = fold_config(base_cfg, fdir, mdir / "train.csv", mdir / "run", root,
                                       len(fold["train_landmarks"]))
                    if args.mined_every == 0:  # no validation: the final test below is the only evaluation
                        mcfg["validation"]["gnd"] = None
                    else:
                        mcfg["validation"]["every"] = args.mined_every or args.every
                    if args.mined_batches == "true":  # the true-label run's steps: images // (classes x per class)
                        mcfg["mining"]["batches_per_epoch"] = len(fold["train"]) // (
                            len(fold["train_landmarks"]) * args.per_class)
                    mtrainer = make_trainer(mcfg)
                    got, sc = train_and_test(mtrainer, gt_fold, root, args.test_size)
                    del mtrainer
            tuned_scores[run][fold["test_queries"]] = sc
            fr["runs"][run] = got
            print(f"  {run} labels: untuned {untuned_fold} -> tuned {got['tuned_fold']} ({got['train_s']:.0f} s "
                  "training)", file=sys.stderr, flush=True)
            res["wall_s"] = time.perf_counter() - t_start
            (out / "results.json").write_text(json.dumps(res, indent=1))  # after every run: a partial result survives

    res["untuned"] = result_row(evaluate_revisitop_scores(scores(untuned_q, untuned_db), gt_all))
    res["tuned"] = {run: result_row(evaluate_revisitop_scores(tuned_scores[run], gt_all)) for run in runs}
    res["wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(res, indent=1))
    publish_results(res, out, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
