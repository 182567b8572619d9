"""Mining settings against the landmark labels, per fold of ``benchmarks/finetune.py`` (issue 17).

What decides how much fine-tuning on mined labels can gain is how many training photos the
mining puts into pseudo-classes (coverage), whether a class holds one landmark (purity) and
whether a landmark stays one class (a landmark split in two serves as its own negative). This
script measures all three for a grid of :func:`imret.selfmine.mine` settings, cheaply:

1. Each fold's training images (the same list as ``benchmarks/finetune.py``: database photos
   and queries of the training landmarks) are described by the untuned network of the
   fine-tuning benchmark (ImageNet MobileNetV2 + GeM, 1024 px) and by RootSIFT (library
   defaults).
2. **Every** pair of a fold's images is verified once (library defaults, two threads) into a
   checkpoint of :func:`imret.selfmine.verify_edges` (``runs/cache/mine_sweep``; resumable).
   That gives the ceiling of verification: the inlier counts of same-landmark and
   cross-landmark pairs, and the components that perfect candidate generation would find.
3. Each setting runs the library's :func:`imret.selfmine.mine` on the fold with that checkpoint:
   the pairs mining asks for are read from it instead of verified again, so every row is the
   exact result of ``mine()`` (``imret mine``) with those settings, and "pairs" is how many
   verifications it would have cost.

Labels are only read to score the result.

    .venv/bin/python benchmarks/mine_sweep.py [--write] [--json runs/mine_sweep.json]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, machine_line, publish  # noqa: E402
from finetune import (WEIGHTS, label_stats, make_folds, mine_settings, rootsift_features,  # noqa: E402
                      untuned_model)

BEGIN, END = "<!-- minesweep:begin -->", "<!-- minesweep:end -->"

# (label, mine() keywords other than the defaults); the first is the library default, the second the
# setting of the first published mined fine-tuning run
SETTINGS: list[tuple[str, dict]] = [
    ("library defaults", {}),
    ("first fine-tuning run", {"expand": 2, "attach_inliers": 10, "min_size": 4}),
    ("k 20", {"k": 20, "expand": 2, "attach_inliers": 10, "min_size": 4}),
    ("5 rounds", {"expand": 5, "attach_inliers": 10, "min_size": 4}),
    ("min inliers 12", {"min_inliers": 12, "expand": 2, "attach_inliers": 10, "min_size": 4}),
    ("min inliers 10", {"min_inliers": 10, "expand": 2, "min_size": 4}),
    ("k 20, min 10, 5 rounds", {"k": 20, "min_inliers": 10, "expand": 5, "min_size": 4}),
    ("k 30, min 10, 5 rounds, 5 members", {"k": 30, "min_inliers": 10, "expand": 5, "attach_members": 5,
                                           "min_size": 4}),
    ("the same, classes >= 8", {"k": 30, "min_inliers": 10, "expand": 5, "attach_members": 5, "min_size": 8}),
] + [(f"the same, votes {share}", {"k": 30, "min_inliers": 10, "expand": 5, "attach_members": 5, "min_size": 8,
                                  "attach_votes": share}) for share in (0.6, 0.7, 0.8, 0.9)]
CEILING_BARS = (10, 12, 15)


def fold_features(names: list[str], root: Path, weights: Path, size: int, cache: Path):
    """Untuned MobileNetV2-GeM descriptors (cached as .npy) and RootSIFT features of ``names``."""
    from imret.retrieval import Encoder
    from imret.selfmine import paths_tag
    from imret.train.config import config_from_dict
    from imret.train.trainer import build_model

    path = cache / f"desc-{paths_tag(names, weights.name, size)}.npy"
    if path.is_file():
        x = np.load(path)
    else:
        cfg = config_from_dict({"model": untuned_model(weights), "data": {"kind": "csv", "csv": "unused.csv"}})
        model = build_model(cfg.model).eval()
        x = Encoder(model, image_size=size, workers=2).encode([root / f"{n}.jpg" for n in names],
                                                              on_error="raise").descriptors
        np.save(path, x)
    return x, rootsift_features(names, root)


def pair_stats(n: int, truth: list[str], inl: dict[tuple[int, int], int]) -> dict:
    """Inliers of same- and cross-landmark pairs, and the all-pairs components (the ceiling)."""
    from imret.selfmine import components_of

    same = np.array([m for (i, j), m in inl.items() if truth[i] == truth[j]])
    cross = np.array([m for (i, j), m in inl.items() if truth[i] != truth[j]])
    ceiling = {}
    for bar in CEILING_BARS:
        comp = components_of(n, np.array([p for p, m in inl.items() if m >= bar], np.int64).reshape(-1, 2))
        sizes = np.bincount(comp)
        ceiling[bar] = label_stats(truth, np.where(sizes[comp] >= 4, np.unique(comp, return_inverse=True)[1], -1))
    return {"pairs": len(inl), "same_pairs": int(same.size), "cross_pairs": int(cross.size),
            "cross_max": int(cross.max()) if cross.size else None,
            "same_at": {bar: round(100 * float((same >= bar).mean()), 1) for bar in (8, 10, 12, 15, 20)},
            "ceiling": ceiling}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "rparis6k-mini"))
    ap.add_argument("--weights", default=str(SHARED / "weights" / WEIGHTS))
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024, help="descriptor long side (px), as the fine-tuning test")
    ap.add_argument("--cache", default=str(REPO / "runs" / "cache" / "mine_sweep"))
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    ap.add_argument("--render", metavar="JSON", help="only rebuild the section from a finished run's --json file")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        publish(render(res, res.get("argv", [])), BEGIN, END, write=args.write)
        return 0

    import torch

    from imret.selfmine import mine, paths_tag, verify_edges

    torch.set_num_threads(2)
    data, weights = Path(args.data), Path(args.weights)
    gnd_path = data / f"gnd_{data.name}.pkl"
    if not gnd_path.is_file() or not weights.is_file():
        print(f"mine_sweep: needs {gnd_path} and {weights} (set IMRET_SHARED)", file=sys.stderr)
        return 2
    with open(gnd_path, "rb") as f:
        gnd = pickle.load(f)  # noqa: S301 - the shared, trusted ground truth file
    root = data / "jpg"
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res = {"argv": list(sys.argv[1:] if argv is None else argv), "machine": machine_line(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "settings": [(label, mine_settings(kw)) for label, kw in SETTINGS], "folds": []}
    for fold in make_folds(gnd, args.folds):
        names = [n for n, _ in fold["train"]]
        truth = [lab for _, lab in fold["train"]]
        paths = [str(root / f"{n}.jpg") for n in names]
        t0 = time.perf_counter()
        x, feats = fold_features(names, root, weights, args.size, cache)
        t_feat = time.perf_counter() - t0
        tag = paths_tag(paths, "mine_sweep", args.size)
        ckpt = cache / f"fold{fold['fold']}-{tag}.jsonl"
        pairs = np.array(list(itertools.combinations(range(len(names)), 2)), np.int64)
        # the seconds of the run that verified the pairs, kept beside its checkpoint: a later run reads
        # the pairs from the checkpoint and reports that run's time, not its own near-zero one
        timing = ckpt.with_suffix(".timing.json")
        earlier = json.loads(timing.read_text()) if timing.is_file() and ckpt.is_file() else None
        resumed = ckpt.is_file() and earlier is None
        t0 = time.perf_counter()
        inl = verify_edges(pairs, feats, workers=2, checkpoint=ckpt, tag=tag, progress=True)
        t_all = time.perf_counter() - t0
        if earlier is None:
            earlier = {"seconds": round(t_all, 1), "date": res["date"], "resumed": resumed}
            timing.write_text(json.dumps(earlier))
        fr = {"fold": fold["fold"], "landmarks": fold["train_landmarks"], "features_s": round(t_feat, 1),
              "all_pairs_s": earlier["seconds"], "all_pairs_date": earlier["date"],
              "all_pairs_resumed": earlier["resumed"], "all_pairs_this_run_s": round(t_all, 1),
              "stats": pair_stats(len(names), truth, {(int(i), int(j)): int(m) for (i, j), m in zip(pairs, inl)}),
              "rows": []}
        for label, kw in SETTINGS:
            mined = mine(x, feats, paths, workers=2, checkpoint=ckpt, tag=tag, negatives=0, **kw)
            fr["rows"].append({"label": label, "pairs": int(mined.edges.shape[0]), **label_stats(truth, mined.labels)})
        res["folds"].append(fr)
        print(f"fold {fold['fold']}: {len(names)} images, all pairs {t_all:.0f} s", file=sys.stderr, flush=True)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    publish(render(res, res["argv"]), BEGIN, END, write=args.write,
            json_path=args.json, data=res)
    return 0


def _setting_cell(kw: dict) -> str:
    d = mine_settings({})
    out = [f"{k}={v}" for k, v in kw.items() if d.get(k) != v]
    return ", ".join(out) or "defaults"


def _verified_when(fr: dict, date: str) -> str:
    """How long verifying all pairs took, and in which run when this one read them from its checkpoint."""
    when = f"{fr['all_pairs_s']:.0f} s"
    if fr.get("all_pairs_resumed"):
        when += " (the part left after an interrupted run)"
    if fr.get("all_pairs_date", date) != date:
        when += f" on {fr['all_pairs_date']} (this run read them from that run's checkpoint)"
    return when


def render(res: dict, argv: list[str]) -> str:
    lines = [BEGIN, "### Mining settings against the landmarks, per fine-tuning fold (`benchmarks/mine_sweep.py`)", "",
             f"- Command: `.venv/bin/python benchmarks/mine_sweep.py {' '.join(argv)}`".rstrip() + "",
             f"- Machine: {res['machine']}", f"- Date: {res['date']}; wall time {res['wall_s'] / 60:.1f} min",
             "- Each fold's training images of the fine-tuning benchmark, the untuned network's 1024 px descriptors, "
             "RootSIFT and verification at the library defaults. Every pair of a fold is verified once; each row is "
             "`imret.selfmine.mine()` with those settings reading its pairs from that checkpoint (pairs: the "
             "verifications the setting costs). Labels only score the result. Purity: share of kept images whose "
             "class's majority landmark is their own; a landmark in two classes is its own negative in training.", ""]
    for fr in res["folds"]:
        st = fr["stats"]
        lines += [f"**Fold {fr['fold']}** (training landmarks {', '.join(fr['landmarks'])}; {fr['rows'][0]['images']} "
                  f"images; all {st['pairs']} pairs verified in {_verified_when(fr, res['date'])}): cross-landmark pairs reach "
                  f"at most **{st['cross_max']}** inliers; same-landmark pairs with at least 8 / 10 / 12 / 15 / 20 "
                  "inliers: " + " / ".join(f"{v:.1f} %" for v in st["same_at"].values()) + ".", "",
                  "| setting | mine() options | pairs verified | kept | classes (sizes) | purity | per landmark: kept / "
                  "images (classes) |", "|---|---|---:|---:|---|---:|---|"]
        rows = [(r["label"], _setting_cell(dict(s)), r) for r, (_, s) in zip(fr["rows"], res["settings"])]
        rows += [(f"ceiling: all pairs >= {bar}", "every pair verified, classes >= 4", st["ceiling"][str(bar)]
                  if str(bar) in st["ceiling"] else st["ceiling"][bar]) for bar in CEILING_BARS]
        for label, opts, r in rows:
            per = "; ".join(f"{lm} {v['kept']}/{v['images']} ({v['classes']})" for lm, v in r["per_landmark"].items())
            lines.append(f"| {label} | {opts} | {r.get('pairs', st['pairs'])} | {r['kept']} of {r['images']} | "
                         f"{len(r['sizes'])} ({', '.join(map(str, r['sizes']))}) | {r['purity']:.1f} % | {per} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
