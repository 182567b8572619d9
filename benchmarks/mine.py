"""Label-free mining and label cleaning on rParis6k-mini (imret.selfmine, issue 17).

The 250 photos of ../shared/data/rparis6k-mini/jpg (238 database + 12 queries, five
landmarks, 50 photos each) are used with their labels hidden:

1. **Mining.** Global descriptors: EfficientNet-Lite0 with its original fp32 ImageNet weights
   from pip (``imret.create_model("tf_efficientnet_lite0", "gem", pretrained=True)``), GeM,
   512 px, one scale. Each photo's ``--k`` nearest neighbours are verified with RootSIFT (1000
   keypoints at 1024 px, the library's verification defaults), pairs with at least
   ``--min-inliers`` inliers are positives and their connected components pseudo-classes.
2. **Ground truth.** Two photos are a true pair when they show the same landmark, by the
   landmark in their file names (``_common.landmark_of``: ``paris_louvre_000081 -> louvre``).
   Because the Eiffel query has a positive among the Invalides photos (the Invalides dome
   seen from the tower), a second ground truth merges landmarks whose query ground truth
   crosses them, as ``benchmarks/finetune.py`` does (Eiffel + Invalides become one group).
   Landmark names are a coarse truth: two photos of one landmark need not share any visible
   structure, so recall is bounded well below 1 by what verification can see.
3. **Figures.** Precision and recall of the mined positive pairs (recall over all same-landmark
   pairs), the same for the pairs implied by the components (same component), component
   purity (images of the majority landmark of their component), coverage; a sweep over the
   inlier bar on the same verified counts.
4. **Cleaning.** The landmark labels with 20 % of the photos (seeded) given another landmark's
   label; :func:`imret.selfmine.clean` in both modes (labels of 50-60 photos: each photo's
   ``--k`` nearest neighbours within its label are verified); removed injected errors (bar
   >= 80 %) and kept correct photos (bar >= 90 %).

    .venv/bin/python benchmarks/mine.py [--write] [--k 10] [--min-inliers 15] [--workers 2]

TODO (later step, not run here): fine-tune with the mined pairs instead of the true labels in
``benchmarks/finetune.py``'s leave-landmarks-out folds (mine on the training landmarks only,
write the class CSV with :func:`imret.selfmine.write_class_csv`, train with ``data.kind: csv``),
and compare held-out mAP with training on the true labels.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, components, landmark_of, machine_line, publish  # noqa: E402

BEGIN, END = "<!-- mine:begin -->", "<!-- mine:end -->"


def merged_groups(gnd: dict) -> dict[str, str]:
    """Landmark -> group; landmarks are merged when a query's ground truth crosses them."""
    names = sorted({landmark_of(n) for n in list(gnd["imlist"]) + list(gnd["qimlist"])})
    index = {lm: i for i, lm in enumerate(names)}
    edges = [(index[landmark_of(q)], index[landmark_of(gnd["imlist"][j])])
             for qi, q in enumerate(gnd["qimlist"]) for key in ("easy", "hard", "junk") for j in gnd["gnd"][qi][key]]
    return {names[i]: "+".join(names[j] for j in g) for g in components(len(names), edges) for i in g}


def pair_scores(pairs: np.ndarray, truth: np.ndarray) -> tuple[float, float, int]:
    """Precision and recall of ``pairs`` against same-``truth`` pairs, and the pair count."""
    if len(pairs) == 0:
        return float("nan"), 0.0, 0
    good = int((truth[pairs[:, 0]] == truth[pairs[:, 1]]).sum())
    _, counts = np.unique(truth, return_counts=True)
    total = int((counts * (counts - 1) // 2).sum())
    return good / len(pairs), good / total, len(pairs)


def component_pairs(labels: np.ndarray) -> np.ndarray:
    out = []
    for c in range(int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0):
        idx = np.flatnonzero(labels == c)
        a, b = np.triu_indices(idx.size, 1)
        out.append(np.stack([idx[a], idx[b]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def purity(labels: np.ndarray, truth: np.ndarray) -> float:
    inside = labels >= 0
    if not inside.any():
        return float("nan")
    major = sum(np.unique(truth[labels == c], return_counts=True)[1].max() for c in np.unique(labels[inside]))
    return major / int(inside.sum())


def pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=10, help="neighbours verified per photo (default 10)")
    ap.add_argument("--min-inliers", type=int, default=15, help="inliers that make a pair verified (default 15)")
    ap.add_argument("--workers", type=int, default=2, help="SIFT and verification threads (default 2)")
    ap.add_argument("--clean-k", type=int, default=None, help="neighbours verified per photo within its label "
                    "when cleaning (default: --k)")
    ap.add_argument("--clean-min-inliers", type=int, default=None, help="inlier bar of cleaning (default: --min-inliers)")
    ap.add_argument("--noise", type=float, default=0.2, help="fraction of wrong labels injected (default 0.2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    import torch

    import imret
    from imret.extract import extract
    from imret.local.sift import SiftExtractor
    from imret.safepickle import load_data_pickle
    from imret.selfmine import clean, mine, paths_tag

    torch.set_num_threads(args.workers)
    root = SHARED / "data" / "rparis6k-mini"
    gnd = load_data_pickle(root / "gnd_rparis6k-mini.pkl", what="a revisitop ground-truth pickle")
    paths = sorted(str(p) for p in (root / "jpg").glob("*.jpg"))
    names = [Path(p).stem for p in paths]
    lm = [landmark_of(n) for n in names]
    group = merged_groups(gnd)
    classes = sorted(set(lm))
    truth = np.array([classes.index(x) for x in lm])
    gnames = sorted(set(group.values()))
    truth_merged = np.array([gnames.index(group[x]) for x in lm])
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    model = imret.create_model("tf_efficientnet_lite0", "gem", pretrained=True)
    res = extract(model, paths, image_size=512, workers=args.workers, progress=True, on_error="raise")
    desc = res.descriptors
    times["global descriptors"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ex = SiftExtractor()
    with ThreadPoolExecutor(args.workers) as pool:
        feats = list(pool.map(ex, paths))
    times["RootSIFT"] = time.perf_counter() - t0

    work = Path(tempfile.mkdtemp(prefix="imret-mine-bench-"))
    ck = work / "verified.jsonl"
    tag = paths_tag(paths)
    t0 = time.perf_counter()
    mined = mine(desc, feats, paths, k=args.k, min_inliers=args.min_inliers, workers=args.workers, checkpoint=ck,
                 tag=tag, progress=True)
    times["kNN + verification + mining"] = time.perf_counter() - t0
    s = mined.summary()

    rows = []
    from imret.selfmine import _labels_from_verified  # the same step mine() takes, for the sweep

    for bar in sorted({10, 15, 20, 30, args.min_inliers}):
        pos = mined.edges[mined.inliers >= bar]
        labels = _labels_from_verified(len(paths), pos)
        p1, r1, n1 = pair_scores(pos, truth)
        p2, _, _ = pair_scores(pos, truth_merged)
        cp = component_pairs(labels)
        p3, r3, n3 = pair_scores(cp, truth)
        rows.append({"min_inliers": bar, "positives": n1, "precision": p1, "precision_merged": p2, "recall": r1,
                     "component_pairs": n3, "component_precision": p3, "component_recall": r3,
                     "purity": purity(labels, truth), "purity_merged": purity(labels, truth_merged),
                     "components": int(labels.max()) + 1 if (labels >= 0).any() else 0,
                     "coverage": float((labels >= 0).mean())})
    main_row = next(r for r in rows if r["min_inliers"] == args.min_inliers)
    wrong = [(names[i], names[j], int(m)) for (i, j), m, v in zip(mined.edges.tolist(), mined.inliers, mined.verified)
             if v and truth_merged[i] != truth_merged[j]]
    sizes = sorted((len(c) for c in mined.components), reverse=True)

    # cleaning: 20 % wrong labels
    rng = np.random.default_rng(args.seed)
    n = len(paths)
    bad = np.sort(rng.choice(n, int(round(args.noise * n)), replace=False))
    noisy = list(lm)
    for i in bad:
        noisy[i] = str(rng.choice([c for c in classes if c != lm[i]]))
    injected = np.zeros(n, bool)
    injected[bad] = True
    clean_rows = []
    ck_k = args.k if args.clean_k is None else args.clean_k
    ck_bar = args.min_inliers if args.clean_min_inliers is None else args.clean_min_inliers
    for mode in ("largest", "flag", "vote"):
        t0 = time.perf_counter()
        cr = clean(paths, noisy, feats, mode=mode, descriptors=desc, min_inliers=ck_bar, k=ck_k,
                   workers=args.workers, checkpoint=ck, tag=tag, progress=True)
        dt_clean = time.perf_counter() - t0
        # an injected label that happens to name a merged group's other landmark is still wrong here
        clean_rows.append({"mode": mode, "removed_injected": float((~cr.keep[injected]).mean()),
                           "kept_correct": float(cr.keep[~injected].mean()),
                           "kept": int(cr.keep.sum()), "pairs_checked": int(cr.edges.shape[0]),
                           "seconds": dt_clean})

    total = sum(times.values()) + sum(r["seconds"] for r in clean_rows)
    command = "python benchmarks/mine.py " + " ".join(a for a in sys.argv[1:] if a not in ("--write",))
    out = [BEGIN, "## Label-free mining and cleaning (rParis6k-mini)", "",
           f"`{command.strip()}` on {machine_line()}, {dt.date.today().isoformat()}.", "",
           f"250 photos of five Paris landmarks, labels hidden. EfficientNet-Lite0 + GeM (ImageNet weights from pip, "
           f"512 px) for the kNN graph (k = {args.k}: {s['candidate_pairs']} candidate pairs), RootSIFT (1000 "
           f"keypoints, 1024 px) + MAGSAC++ affine verification with the library defaults. A true pair shows the "
           f"same landmark by file name; \"merged\" also counts Eiffel + Invalides as one (the Eiffel query's ground "
           f"truth reaches into the Invalides photos). Recall is over all 6,125 same-landmark pairs.", "",
           "| min inliers | positives | precision | precision (merged) | recall | components | purity | purity (merged) "
           "| coverage | component-pair precision | component-pair recall |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **(default)**" if r["min_inliers"] == args.min_inliers else ""
        out.append(f"| {r['min_inliers']}{mark} | {r['positives']} | {pct(r['precision'])} | "
                   f"{pct(r['precision_merged'])} | {pct(r['recall'])} | {r['components']} | {pct(r['purity'])} | "
                   f"{pct(r['purity_merged'])} | {pct(r['coverage'])} | {pct(r['component_precision'])} | "
                   f"{pct(r['component_recall'])} |")
    out += ["", f"At {args.min_inliers} inliers: component sizes {sizes}; "
                f"{s['hard_positives']} hard positives; negatives for {s['queries_with_negatives']} queries. "
                f"Bar: positive-pair precision >= 95 %: **{'met' if main_row['precision'] >= 0.95 else 'missed'}** "
                f"({pct(main_row['precision'])}).",
            "", f"Verified pairs across (merged) landmarks at {args.min_inliers}: "
                + (", ".join(f"{a}-{b} ({m})" for a, b, m in wrong[:8]) or "none") + ".", "",
            f"Cleaning: {len(bad)} of {n} landmark labels ({pct(args.noise)}, seed {args.seed}) replaced by another "
            f"landmark; each photo's {ck_k} nearest neighbours within its label verified, "
            f">= {ck_bar} inliers.", "",
            "| mode | injected errors removed (bar >= 80 %) | correct photos kept (bar >= 90 %) | kept | pairs checked | time |",
            "|---|---|---|---|---|---|"]
    for r in clean_rows:
        out.append(f"| {r['mode']} | {pct(r['removed_injected'])} | {pct(r['kept_correct'])} | {r['kept']} | "
                   f"{r['pairs_checked']} | {r['seconds']:.0f} s |")
    out += ["", "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
            + f"; cleaning reuses the pairs verified while mining (one checkpoint); total {total:.0f} s.", END]
    publish("\n".join(out) + "\n", BEGIN, END, write=args.write, json_path=args.json,
            data={"mining": rows, "cleaning": clean_rows, "times": times, "summary": s, "wrong_pairs": wrong})


if __name__ == "__main__":
    main()
