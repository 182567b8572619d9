"""Retrieval quality of real ImageNet backbones on rParis6k-mini, through the one pipeline.

Backbones: the shared TF-slim MobileNetV2 (int8-derived, ``mobilenetv2_100.coral``) and the
original fp32 EfficientNet-Lite0/1/2 from pip (``tf_efficientnet_lite0/1/2``, ``imret[weights]``),
each with GeM (p = 3), at 512 and 1024 px, single scale and three scales (1, 1/√2, 1/2, GeM power
mean), queries cropped to their boxes (revisitop convention). Then the best of them (Medium mAP;
a choice made on this set, marked) with learned whitening Lw (leave-one-landmark-out, as in the
post-processing section), αQE (k = 2, α = 3) and αDBA (k = 2, α = 3) + αQE. Every row is ranked by
:class:`imret.retrieval.Retriever`, the pipeline of the store, the server and ``imret eval``.

Descriptors are cached in ``runs/cache/quality/`` (git-ignored), so an interrupted run resumes.

    .venv/bin/python benchmarks/quality.py [--write] [--only lite0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, machine_line, publish  # noqa: E402

CACHE = REPO / "runs" / "cache" / "quality"
BEGIN = "<!-- quality:begin -->"
END = "<!-- quality:end -->"
BACKBONES = {
    "mobilenetv2": ("mobilenetv2_100.coral", "weights/mobilenetv2_100.coral_in1k.safetensors"),
    "lite0": ("tf_efficientnet_lite0", None),
    "lite1": ("tf_efficientnet_lite1", None),
    "lite2": ("tf_efficientnet_lite2", None),
}
SIZES = (512, 1024)
SCALES = {"1 scale": (1.0,), "3 scales": (1.0, 2 ** -0.5, 0.5)}


def descriptors(key: str, size: int, scales: tuple[float, ...], gt, root: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(query, database)`` descriptors of one setting, from the cache or extracted."""
    import imret
    from imret.retrieval import Encoder

    name, weights = BACKBONES[key]
    tag = hashlib.sha256(json.dumps([name, size, scales, gt.name, gt.n_db]).encode()).hexdigest()[:16]
    f = CACHE / f"{key}-{size}-{len(scales)}-{tag}.npz"
    if f.is_file():
        z = np.load(f)
        return z["q"], z["db"], json.loads(str(z["meta"]))
    kw = {"weights": SHARED / weights} if weights else {"pretrained": True}
    model = imret.create_model(name, "gem", **kw)
    enc = Encoder(model, image_size=size, scales=scales, workers=2)
    t0 = time.perf_counter()
    db = enc.encode(gt.db_paths(root), on_error="raise").descriptors
    q = enc.encode(gt.query_paths(root), list(gt.bbx), on_error="raise").descriptors
    meta = {"seconds": time.perf_counter() - t0, "weights_sha256": model.weights_sha256, "dim": int(model.dim)}
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(f, q=q, db=db, meta=json.dumps(meta))
    return q, db, meta


def evaluate(q, db, gt, *, lw: bool = False, qe: bool = False, dba: bool = False) -> dict[str, float]:
    """E/M/H mAP and Medium mP@10 / R@1 of one pipeline, Lw leave-one-landmark-out when asked."""
    from imret.evaluation import evaluate_revisitop_scores, held_out_pairs, landmark_folds
    from imret.expansion import QueryExpansion
    from imret.retrieval import Retriever
    from imret.whitening import fit_learned_whitening

    folds = landmark_folds(gt) if lw else [list(range(gt.n_queries))]
    scores = np.empty((gt.n_queries, gt.n_db), np.float32)
    for f, fold in enumerate(folds):
        w = None
        if lw:
            fp = held_out_pairs(gt, folds, f)
            w = fit_learned_whitening(db[fp.images], fp.pairs)
        r = Retriever(whitening=w, dba=(2, 3.0) if dba else None,
                      query_expansion=QueryExpansion("alpha", 2, 3.0) if qe else QueryExpansion()).index(db)
        scores[fold] = r.search(vectors=q[fold], k=gt.n_db).dense(gt.n_db)
    res = evaluate_revisitop_scores(scores, gt)
    return {"easy": 100 * res.easy.map, "medium": 100 * res.medium.map, "hard": 100 * res.hard.map,
            "mp10": 100 * res.medium.mp_at_k[10], "r1": 100 * res.medium.recall_at_k[1]}


def render(rows: list[dict], extra: list[dict], best: str, machine: str, command: str, minutes: float) -> str:
    out = [BEGIN, "## Retrieval quality of real ImageNet backbones (`benchmarks/quality.py`)", "",
           f"`{command}` — {dt.date.today().isoformat()}, {machine}; {minutes:.0f} min (extraction dominates; "
           "descriptors cached in runs/cache/quality/, so a rerun may take its rows from earlier runs; no speed "
           "figures here: see `benchmarks/extract.py`).", "",
           "rParis6k-mini (12 queries cropped to their boxes, 238 database images), GeM p = 3, no fine-tuning; "
           "every row ranked by `imret.retrieval.Retriever`. MobileNetV2: the shared TF-slim weights "
           "(int8-derived). EfficientNet-Lite0/1/2: the original fp32 ImageNet weights from pip (`imret[weights]`). "
           "Three scales: 1, 1/√2, 1/2, GeM power mean. Medium mP@10 and Recall@1 in the last columns.", "",
           "| backbone | size | scales | D | Easy | Medium | Hard | M mP@10 | M R@1 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        out.append(f"| {r['backbone']} | {r['size']} | {r['scales']} | {r['dim']} | {m['easy']:.2f} | {m['medium']:.2f} | "
                   f"{m['hard']:.2f} | {m['mp10']:.2f} | {m['r1']:.2f} |")
    out += ["", f"Post-processing on the best row by Medium mAP ({best}; chosen on this set). Lw: learned whitening "
            "(Radenović et al.), leave-one-landmark-out: each landmark group's queries use an Lw fitted on "
            "database-database pairs of the other groups only (eps 1e-6, full dimension). αQE / αDBA: k = 2, α = 3, "
            "fixed before the run.", "",
            "| pipeline | Easy | Medium | Hard | M mP@10 | M R@1 |", "|---|---|---|---|---|---|"]
    for r in extra:
        m = r["metrics"]
        out.append(f"| {r['name']} | {m['easy']:.2f} | {m['medium']:.2f} | {m['hard']:.2f} | {m['mp10']:.2f} | "
                   f"{m['r1']:.2f} |")
    out.append(END)
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "rparis6k-mini"))
    ap.add_argument("--only", help="comma-separated backbones (default all): " + ", ".join(BACKBONES))
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args()
    from imret.evaluation import load_revisitop

    data = Path(args.data)
    gt = load_revisitop(data / "gnd_rparis6k-mini.pkl")
    keys = args.only.split(",") if args.only else list(BACKBONES)
    t0 = time.perf_counter()
    rows = []
    for key in keys:
        for size in SIZES:
            for label, scales in SCALES.items():
                q, db, meta = descriptors(key, size, scales, gt, data / "jpg")
                rows.append({"backbone": BACKBONES[key][0], "key": key, "size": size, "scales": label,
                             "dim": meta["dim"], "seconds": meta["seconds"], "metrics": evaluate(q, db, gt),
                             "scales_tuple": scales})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "scales_tuple"}), file=sys.stderr, flush=True)
    best = max(rows, key=lambda r: r["metrics"]["medium"])
    q, db, _ = descriptors(best["key"], best["size"], best["scales_tuple"], gt, data / "jpg")
    label = f"{best['backbone']}, {best['size']} px, {best['scales']}"
    extra = [{"name": f"{label}: GeM", "metrics": best["metrics"]},
             {"name": "+ Lw (leave-one-landmark-out)", "metrics": evaluate(q, db, gt, lw=True)},
             {"name": "+ αQE", "metrics": evaluate(q, db, gt, qe=True)},
             {"name": "+ αDBA + αQE", "metrics": evaluate(q, db, gt, qe=True, dba=True)},
             {"name": "+ Lw + αQE", "metrics": evaluate(q, db, gt, lw=True, qe=True)},
             {"name": "+ Lw + αDBA + αQE", "metrics": evaluate(q, db, gt, lw=True, qe=True, dba=True)}]
    command = "python benchmarks/quality.py " + " ".join(a for a in sys.argv[1:] if a != "--write")
    text = render(rows, extra, label, machine_line(), command.strip(), (time.perf_counter() - t0) / 60)
    publish(text, BEGIN, END, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
