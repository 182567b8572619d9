"""Post-processing steps on rParis6k-mini: whitening (PCA, learned Lw) and query expansion.

Every row starts from the same descriptors: the shared ImageNet MobileNetV2 (TF-slim
weights, not fine-tuned for retrieval) with GeM pooling (p = 3) at 1024 px, queries cropped
to their boxes with the revisitop convention (as ``scripts/demo.py``). They are extracted
once and cached under ``runs/cache/postprocess/`` (git-ignored), keyed by model, weights,
size, scales and data. Then, with the Easy / Medium / Hard mAP of each step:

- PCA whitening (power 0.5 and 0.25, full rank and reduced) fitted on the 238 database
  descriptors only (no query image; unsupervised, the database of the evaluation itself);
- learned whitening Lw (Radenović et al., TPAMI 2018) from database-database matching
  pairs, with leave-one-landmark-out: queries are grouped into landmarks (same landmark in
  the file name, or overlapping ground-truth sets), and the queries of each landmark are
  evaluated with an Lw fitted on pairs from the *other* landmarks only, never using an
  image of the held-out landmark's easy / hard / junk sets;
- AQE, αQE and αDBA + αQE with fixed literature-style parameters, on the plain descriptors
  and on the best whitening, plus a k sweep (on this same set, so its best cells are optimistic);
- optionally the same at three scales (1, 1/√2, 1/2).

    .venv/bin/python benchmarks/postprocess.py [--write] [--no-multiscale] [--no-cache]

``--write`` puts the section into BENCHMARKS.md between its begin/end markers (replacing
an earlier run's section, or appending one at the end).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import imret
from imret.evaluation import (
    RevisitopGroundTruth,
    RevisitopResult,
    evaluate_revisitop_scores,
    fold_name,
    ground_truth_set,
    held_out_pairs,
    landmark_folds,
    landmark_of,
    load_revisitop,
    random_baseline_revisitop,
)
from imret.expansion import QueryExpansion
from imret.extract import extract_descriptors
from imret.retrieval import Retriever
from imret.whitening import Whitening, fit_learned_whitening, fit_pca_whitening

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, components, cpu_name, write_section  # noqa: E402

CACHE = REPO / "runs" / "cache" / "postprocess"
MODEL = "mobilenetv2_100.coral"
WEIGHTS = "mobilenetv2_100.coral_in1k.safetensors"
GEM_P = 3.0
MULTISCALE = (1.0, 2**-0.5, 0.5)
BEGIN = "<!-- begin: benchmarks/postprocess.py -->"
END = "<!-- end: benchmarks/postprocess.py -->"

# Fixed before looking at any result: αQE as in the GeM paper (k = 2, α = 3); AQE and
# αDBA with the same small k; the sweep below shows what other choices would have given.
QE_K, ALPHA, DBA_K = 2, 3.0, 2
SWEEP_K = (1, 2, 3, 5, 10, 20)
LW_EPS = 1e-6  # the library default ridge (relative to the mean eigenvalue of C_S)
LW_EPS_STRONG = 0.1
PCA_DIMS_REDUCED = 64
LW_PCA_DIM = 128


# --------------------------------------------------------------------------- descriptors


def machine() -> str:
    cpu = cpu_name()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} logical cores{gpu}, torch {torch.__version__}, numpy {np.__version__}"


def cached_descriptors(
    gt: RevisitopGroundTruth, data: Path, weights: Path, scales: Sequence[float], image_size: int, *,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(queries (Nq, D), database (Ndb, D), seconds spent extracting)``; read from the cache
    when there and ``use_cache``, else extracted and (re)written to it."""
    key = {
        "imret": imret.__version__, "model": MODEL, "pool": "gem", "p": GEM_P, "image_size": image_size,
        "scales": [round(s, 6) for s in scales], "crop": "revisitop bbx, crop_resize=image",
        "weights": [weights.name, weights.stat().st_size],
        "gnd": [gt.name, gt.n_queries, gt.n_db, str(data.resolve())],
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"{MODEL}-gem-{image_size}-{len(scales)}scale-{digest}.npz"
    if use_cache and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return z["q"], z["db"], 0.0
    model = imret.create_model(MODEL, "gem", weights=str(weights), pool_kwargs={"p": GEM_P})
    t0 = time.perf_counter()
    db = extract_descriptors(model, gt.db_paths(data / "jpg"), scales=scales, image_size=image_size)
    q = extract_descriptors(model, gt.query_paths(data / "jpg"), scales=scales, image_size=image_size,
                            bboxes=list(gt.bbx))
    seconds = time.perf_counter() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, q=q, db=db, key=np.array(json.dumps(key)))
    return q, db, seconds


# --------------------------------------------------------------------------- landmark folds


def within_class_rank(x: np.ndarray, pairs: np.ndarray) -> int:
    """Rank of the intra-class covariance ``C_S`` of the pairs: the dimension Lw can whiten.

    The pair differences span the same space as ``x_i - x_root(i)`` over the connected
    components of the pair graph, a much smaller matrix to decompose.
    """
    diffs = [x[c[1:]] - x[c[0]] for c in components(len(x), pairs) if len(c) > 1]
    d = np.concatenate(diffs).astype(np.float64)
    s = np.linalg.svd(d, compute_uv=False)
    return int((s > max(d.shape) * np.finfo(np.float64).eps * s[0]).sum())


def compose_after_rotation(outer: Whitening, inner: Whitening) -> Whitening:
    """One whitening equal to ``outer`` applied (unnormalised) after ``inner``.

    ``y = P_o (P_i (x - m_i) - m_o) = P_o P_i (x - m)`` with ``m = m_i + P_iᵀ m_o``, which
    holds when ``P_i`` has orthonormal rows (a PCA rotation, power 0).
    """
    pi = inner.projection.astype(np.float64)
    if not np.allclose(pi @ pi.T, np.eye(len(pi)), atol=1e-4):
        raise ValueError("the inner whitening must have orthonormal rows (PCA with power=0)")
    mean = inner.mean + pi.T @ outer.mean
    params = {"outer": outer.params, "inner": inner.params}
    return Whitening(mean, outer.projection.astype(np.float64) @ pi, f"{inner.kind}+{outer.kind}", params)


def pca_powers(x: np.ndarray, powers: Sequence[float]) -> dict[float, Whitening]:
    """Full-rank PCA whitenings of ``x`` at several powers from one eigen-decomposition.

    :func:`fit_pca_whitening` with power 0.5 has rows ``p_i = (λ_i + ε)^-1/2 e_i``, so
    ``|p_i| = (λ_i + ε)^-1/2`` and the row for power ``a`` is ``|p_i|^(2a - 1) p_i``.
    """
    half = fit_pca_whitening(x, None, power=0.5)
    norms = np.linalg.norm(half.projection.astype(np.float64), axis=1, keepdims=True)
    return {a: Whitening(half.mean, norms ** (2 * a - 1) * half.projection, "pca", dict(half.params, power=a))
            for a in powers}


# --------------------------------------------------------------------------- pipelines


@dataclass
class Step:
    """One row: descriptors, a whitening per fold (or one for all), then expansion."""

    name: str
    learned_on: str = ""
    whitening: str | None = None  # key into the fitted whitenings
    aqe_k: int = 0
    qe: tuple[int, float] | None = None  # (k, alpha) of αQE
    dba: tuple[int, float] | None = None  # (k, alpha) of αDBA
    looked: bool = False  # a setting chosen after seeing results on this set


def retrieve(q: np.ndarray, db: np.ndarray, step: Step, whitening: Whitening | None = None) -> np.ndarray:
    """``(Nq, Ndb)`` scores of the step's pipeline (whitening, αDBA, AQE / αQE), run by
    :class:`imret.retrieval.Retriever`, the pipeline the store and ``imret eval`` use."""
    if step.aqe_k and step.qe is not None:
        raise ValueError(f"step {step.name!r} asks for both AQE and αQE")
    qe = (QueryExpansion("aqe", step.aqe_k) if step.aqe_k else
          QueryExpansion("alpha", step.qe[0], float(step.qe[1])) if step.qe is not None else QueryExpansion())
    r = Retriever(whitening=whitening, dba=step.dba, query_expansion=qe).index(db)
    return r.search(vectors=q, k=len(db)).dense(len(db))


def step_scores(q: np.ndarray, db: np.ndarray, folds: list[list[int]], whitenings: list[Whitening] | None,
                step: Step) -> np.ndarray:
    """Scores of every query; with one whitening per fold, each fold's queries use their own."""
    if whitenings is None:
        return retrieve(q, db, step)
    scores = np.empty((len(q), len(db)), dtype=np.float32)
    for fold, w in zip(folds, whitenings):
        scores[fold] = retrieve(q[fold], db, step, w)
    return scores


def summary(r: RevisitopResult) -> dict[str, float]:
    return {"easy": r.easy.map, "medium": r.medium.map, "hard": r.hard.map, "medium_mp10": r.medium.mp_at_k[10]}


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}"


def delta(a: dict[str, float], b: dict[str, float], protocol: str = "medium") -> str:
    return f"{100 * (a[protocol] - b[protocol]):+.2f}"


def versus(a: dict[str, float], b: dict[str, float]) -> str:
    """``Easy +1.00 / Medium -2.00 / Hard +3.00``: the change from ``b`` to ``a``."""
    return " / ".join(f"{p.capitalize()} {delta(a, b, p)}" for p in ("easy", "medium", "hard"))


# --------------------------------------------------------------------------- report


def markdown(ctx: dict) -> str:
    lines = [
        BEGIN,
        f"## Post-processing: whitening and query expansion on rParis6k-mini ({ctx['date']})",
        "",
        f"Command: `{ctx['command']}`; {ctx['runtime']:.0f} s in all, of which {ctx['extract_s']:.0f} s "
        "extracting descriptors (0 when they come from the cache in `runs/cache/postprocess/`).",
        f"Machine: {ctx['machine']}; shared with other jobs while it ran, so the times are loose.",
        "",
        f"Data: `../shared/data/rparis6k-mini` ({ctx['nq']} queries cropped to their boxes, revisitop "
        f"convention; {ctx['ndb']} database images; revisited ground truth). Network: the shared TF-slim "
        f"ImageNet MobileNetV2 (`{WEIGHTS}`, not fine-tuned for retrieval), GeM p = 3, 1024 px, single "
        "scale unless the row says 1, 0.707, 0.5 (GeM power mean over scales). Scores are cosines; mP@10 is "
        "the revisitop definition, Medium protocol; the Hard protocol has one query without positives, "
        "excluded as the official code does. The random row is the mean of 100 seeded random rankings.",
        "",
        "What the whitenings were learned on:",
        "",
        f"- **PCAw** (Jégou & Chum 2012): the {ctx['ndb']} database descriptors only: no query image, no "
        "label, but the evaluation's own database (transductive, unsupervised). Their covariance has rank "
        f"{ctx['pca_rank']}, so with power > 0 at most {ctx['pca_rank']} of the 1280 dimensions can be "
        "kept; ridge eps = 1e-6 relative to the mean eigenvalue.",
        "- **Lw** (Radenović et al., TPAMI 2018; Mikolajczyk & Matas 2007), leave-one-landmark-out: the "
        f"queries fall into {len(ctx['folds'])} landmark groups (same landmark in the file name, or sharing "
        "a ground-truth image: the Eiffel query's positives include Invalides photos, so those two form "
        "one group). Each group's queries are evaluated with an Lw fitted on database-database pairs "
        "(two images that are both easy or hard positives of one query) of the other groups only; no "
        "image in the held-out queries' easy / hard / junk sets and no query image enters the fit. The "
        "training descriptors are the images of the pairs; both orders of each pair are used. AP is "
        "pooled over all 12 queries.",
        "",
        "| held-out group (queries) | pairs from | images | unordered pairs | rank of C_S | "
        f"dominant Lw outputs | held-out energy in Lw's first {LW_PCA_DIM} outputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in ctx["folds"]:
        lines.append(f"| {f['held']} ({f['n_queries']}) | {f['from']} | {f['images']} | {f['pairs']} | "
                     f"{f['rank']} | {f['dominant']} | {100 * f['energy']:.1f} % |")
    lines += [
        "",
        "Dominant Lw outputs: output dimensions (eps = 1e-6) whose variance over the training images is "
        "over 1000 times the median of the first rank-of-C_S outputs. Held-out energy: the share of the "
        "squared, unnormalised Lw output of the held-out queries' easy and hard images that falls in the "
        f"first {LW_PCA_DIM} output dimensions.",
        "",
        f"The intra-class covariance C_S has rank {ctx['rank_range']} out of 1280 (the number of training "
        "images minus the number of connected components of the pair graph), so Lw is only defined with "
        "its ridge (eps relative to the mean eigenvalue of C_S). `Lw, 1280-d` keeps every output "
        "dimension; the final rotation is then orthogonal and changes no cosine, so it amounts to the ridge-regularised C_S^-1/2: directions of "
        "within-landmark variation seen in the training pairs are damped by about sqrt(λ / (eps · mean λ)) "
        "relative to all others, nearly a projection onto their complement at eps = 1e-6. "
        f"`Lw, {LW_PCA_DIM}-d` is the same Lw truncated to {LW_PCA_DIM} <= rank dimensions; "
        f"`PCA {LW_PCA_DIM} -> Lw` projects onto the top {LW_PCA_DIM} PCA directions of the training "
        "images first, where C_S has full rank, and learns Lw there.",
        "",
        f"Expansion parameters were fixed before any run: AQE k = {QE_K}; αQE k = {QE_K}, α = {ALPHA:g} "
        f"(α as in the GeM paper); αDBA k = {DBA_K}, α = {ALPHA:g}, then the same αQE. The whitening "
        f"they are stacked on, **{ctx['best']}**, is the best Medium mAP among the whitening rows, a "
        "choice made on this same set. † marks a setting added after seeing results on this set.",
        "",
        "| step | whitening learned on | Easy mAP | Medium mAP | Hard mAP | Medium mP@10 |",
        "|---|---|---|---|---|---|",
    ]
    for r in ctx["rows"]:
        m = r["metrics"]
        lines.append(f"| {r['name']} | {r['learned_on']} | {pct(m['easy'])} | {pct(m['medium'])} | "
                     f"{pct(m['hard'])} | {pct(m['medium_mp10'])} |")
    lines += [
        "",
        f"k sweep, Medium / Hard mAP (α = {ALPHA:g}; αDBA + αQE use the same k). It was run on the same 12 "
        "queries, so its best cells are an optimistic, test-set choice: it shows the sensitivity, the "
        "table above does not use it.",
        "",
        "| descriptors | method | " + " | ".join(f"k = {k}" for k in SWEEP_K) + " |",
        "|---|---|" + "---|" * len(SWEEP_K),
    ]
    for r in ctx["sweep"]:
        cells = " | ".join(f"{pct(m['medium'])} / {pct(m['hard'])}" for m in r["metrics"])
        lines.append(f"| {r['base']} | {r['method']} | {cells} |")
    lines += ["", ctx["fold_check"], "", "Reading:", ""]
    lines += [f"- {n}" for n in ctx["notes"]]
    lines += [END]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "rparis6k-mini"))
    ap.add_argument("--weights", default=str(SHARED / "weights" / WEIGHTS))
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--no-multiscale", action="store_true", help="skip the three-scale rows")
    ap.add_argument("--no-cache", action="store_true", help="extract again even if cached descriptors exist")
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    data, weights = Path(args.data), Path(args.weights)
    gnd = data / f"gnd_{data.name}.pkl"
    if not gnd.is_file() or not weights.is_file():
        print(f"need {gnd} and {weights} (set IMRET_SHARED)", file=sys.stderr)
        return 1
    gt = load_revisitop(gnd)
    q, db, extract_s = cached_descriptors(gt, data, weights, (1.0,), args.image_size, use_cache=not args.no_cache)
    folds = landmark_folds(gt)
    pairs = [held_out_pairs(gt, folds, f) for f in range(len(folds))]

    # ---- whitenings: one for all queries (PCA on the database) or one per fold (Lw)
    global_w: dict[str, Whitening] = {}
    for power, w in pca_powers(db, (0.5, 0.25)).items():
        global_w[f"pcaw{power:g}-full"] = w
        global_w[f"pcaw{power:g}-{PCA_DIMS_REDUCED}"] = w.truncated(PCA_DIMS_REDUCED)
    global_w[f"pca0-{LW_PCA_DIM}"] = fit_pca_whitening(db, LW_PCA_DIM, power=0.0)
    pca_rank = global_w["pcaw0.5-full"].dim

    def fit_lw_folds(x_db: np.ndarray, eps: float, pca_dim: int | None = None) -> list[Whitening]:
        out = []
        for tp in pairs:
            x = x_db[tp.images]
            if pca_dim is None:
                out.append(fit_learned_whitening(x, tp.pairs, eps=eps))
            else:
                rot = fit_pca_whitening(x, pca_dim, power=0.0)
                lw = fit_learned_whitening(rot.apply(x, normalize=False), tp.pairs, eps=eps)
                out.append(compose_after_rotation(lw, rot))
        return out

    fold_w: dict[str, list[Whitening]] = {"lw": fit_lw_folds(db, LW_EPS)}
    fold_w[f"lw-{LW_PCA_DIM}"] = [w.truncated(LW_PCA_DIM) for w in fold_w["lw"]]
    fold_w["lw-eps"] = fit_lw_folds(db, LW_EPS_STRONG)
    fold_w[f"pca-lw-{LW_PCA_DIM}"] = fit_lw_folds(db, LW_EPS, pca_dim=LW_PCA_DIM)

    fold_info = []
    for f, (fold, tp, w) in enumerate(zip(folds, pairs, fold_w["lw"])):
        held_images = sorted(set().union(*(ground_truth_set(gt, i, ("easy", "hard")) for i in fold)))
        y = w.apply(db[held_images], normalize=False).astype(np.float64) ** 2
        train_var = w.apply(db[tp.images], normalize=False).astype(np.float64).var(axis=0)  # decreasing
        rank = within_class_rank(db[tp.images], tp.pairs)
        fold_info.append({"held": fold_name(gt, fold), "n_queries": len(fold), "from": tp.landmarks,
                          "images": len(tp.images), "pairs": tp.n_pairs,
                          "rank": rank,
                          "dominant": int((train_var > 1000 * np.median(train_var[:rank])).sum()),
                          "energy": float(y[:, :LW_PCA_DIM].sum() / y.sum())})
    print(f"whitenings fitted ({time.perf_counter() - t_start:.0f} s)", flush=True)

    def evaluate(step: Step, qd: np.ndarray = q, dbd: np.ndarray = db) -> dict[str, float]:
        if step.whitening is None:
            s = step_scores(qd, dbd, folds, None, step)
        elif step.whitening in global_w:
            s = step_scores(qd, dbd, [list(range(gt.n_queries))], [global_w[step.whitening]], step)
        else:
            s = step_scores(qd, dbd, folds, fold_w[step.whitening], step)
        return summary(evaluate_revisitop_scores(s, gt))

    rows: list[dict] = []

    def add(step: Step, qd: np.ndarray = q, dbd: np.ndarray = db) -> dict[str, float]:
        m = evaluate(step, qd, dbd)
        name = step.name + (" †" if step.looked else "")
        rows.append({"name": name, "learned_on": step.learned_on, "metrics": m})
        return m

    rows.append({"name": "random ranking", "learned_on": "",
                 "metrics": summary(random_baseline_revisitop(gt, n_trials=100, seed=0))})
    gem = add(Step("GeM (no post-processing)"))
    on_db = f"the {gt.n_db} database images (unsupervised)"
    on_pairs = "db-db pairs of the other landmark groups"
    whitening_steps = [
        Step(f"+ PCAw, power 0.5, {pca_rank}-d (full rank)", on_db, "pcaw0.5-full"),
        Step(f"+ PCAw, power 0.5, {PCA_DIMS_REDUCED}-d", on_db, f"pcaw0.5-{PCA_DIMS_REDUCED}"),
        Step(f"+ PCAw, power 0.25, {pca_rank}-d (full rank)", on_db, "pcaw0.25-full"),
        Step(f"+ PCAw, power 0.25, {PCA_DIMS_REDUCED}-d", on_db, f"pcaw0.25-{PCA_DIMS_REDUCED}"),
        Step(f"+ PCA rotation only (power 0), {LW_PCA_DIM}-d", on_db, f"pca0-{LW_PCA_DIM}"),
        Step(f"+ Lw, 1280-d, eps {LW_EPS:g}", on_pairs, "lw"),
        Step(f"+ Lw, 1280-d, eps {LW_EPS_STRONG:g}", on_pairs, "lw-eps", looked=True),
        Step(f"+ Lw, {LW_PCA_DIM}-d (truncated, <= rank)", on_pairs, f"lw-{LW_PCA_DIM}"),
        Step(f"+ PCA {LW_PCA_DIM} -> Lw, {LW_PCA_DIM}-d", on_pairs + " (PCA on the same images)",
             f"pca-lw-{LW_PCA_DIM}"),
    ]
    by_key = {st.whitening: add(st) for st in whitening_steps}
    best = max((st for st in whitening_steps if not st.looked), key=lambda st: by_key[st.whitening]["medium"])
    best_label = best.name.removeprefix("+ ")

    def expansions(w: str | None, label: str, learned_on: str) -> list[Step]:
        return [
            Step(f"{label} + AQE k={QE_K}", learned_on, w, aqe_k=QE_K),
            Step(f"{label} + αQE k={QE_K} α={ALPHA:g}", learned_on, w, qe=(QE_K, ALPHA)),
            Step(f"{label} + αDBA k={DBA_K} α={ALPHA:g} + αQE k={QE_K} α={ALPHA:g}", learned_on, w,
                 dba=(DBA_K, ALPHA), qe=(QE_K, ALPHA)),
        ]

    exp_gem = [add(st) for st in expansions(None, "GeM", "")]
    exp_best = [add(st) for st in expansions(best.whitening, f"GeM + {best_label}", best.learned_on)]

    sweep = []
    for w, label in ((None, "GeM"), (best.whitening, f"GeM + {best_label}")):
        for method in ("AQE", "αQE", "αDBA + αQE"):
            steps = [Step("", "", w, aqe_k=k if method == "AQE" else 0, qe=None if method == "AQE" else (k, ALPHA),
                          dba=(k, ALPHA) if method == "αDBA + αQE" else None) for k in SWEEP_K]
            sweep.append({"base": label, "method": method, "metrics": [evaluate(st) for st in steps]})
    print(f"single scale done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    ms_rows: list[dict[str, float]] = []
    if not args.no_multiscale:
        if best.whitening not in ("lw", f"pca-lw-{LW_PCA_DIM}"):
            raise SystemExit(f"the multi-scale rows refit an Lw, but the best whitening is {best.name!r}")
        qm, dbm, ms_s = cached_descriptors(gt, data, weights, MULTISCALE, args.image_size,
                                         use_cache=not args.no_cache)
        extract_s += ms_s
        # the same recipe refitted on the three-scale descriptors (same folds and pairs)
        fold_w["ms"] = fit_lw_folds(dbm, LW_EPS, pca_dim=None if best.whitening == "lw" else LW_PCA_DIM)
        label = "GeM, scales 1, 0.707, 0.5"
        ms_rows.append(add(Step(label), qm, dbm))
        ms_rows.append(add(Step(f"{label} + {best_label}", best.learned_on, "ms"), qm, dbm))
        ms_rows += [add(st, qm, dbm) for st in expansions("ms", f"{label} + {best_label}", best.learned_on)[1:]]

    # ---- the deployable form: a whitening folded into the network
    model = imret.create_model(MODEL, "gem", weights=str(weights), pool_kwargs={"p": GEM_P})
    w0 = fold_w[best.whitening][0] if best.whitening in fold_w else global_w[best.whitening]
    folded = w0.fold_into(copy.deepcopy(model))
    got = extract_descriptors(folded, gt.db_paths(data / "jpg")[:4], image_size=args.image_size)
    fold_diff = float(np.abs(got - w0.apply(db[:4])).max())
    fold_check = (f"Folding: `Whitening.fold_into(model)` makes the network output whitened descriptors "
                  f"itself; with the {best_label} of the held-out-{fold_info[0]['held']} fold "
                  f"({w0.input_dim} -> {w0.dim}), the folded network's descriptors of 4 database images differ "
                  f"from whitening the cached ones by at most {fold_diff:.1e}.")

    pcaw_rows = [(st, by_key[st.whitening]) for st in whitening_steps if st.name.startswith("+ PCAw")]
    rot = by_key[f"pca0-{LW_PCA_DIM}"]
    bw = by_key[best.whitening]
    trunc, pcalw = by_key[f"lw-{LW_PCA_DIM}"], by_key[f"pca-lw-{LW_PCA_DIM}"]
    energies = [f["energy"] for f in fold_info]
    dominant = [f["dominant"] for f in fold_info]
    ranks = f"{min(f['rank'] for f in fold_info)}-{max(f['rank'] for f in fold_info)}"
    n_landmarks = len({landmark_of(n) for n in gt.imlist})

    def ema(m: dict[str, float]) -> str:
        return f"{pct(m['easy'])} / {pct(m['medium'])} / {pct(m['hard'])}"

    notes = [
        f"Every PCA whitening fitted on the database lowers mAP: Medium {pct(gem['medium'])} becomes "
        f"{pct(min(m['medium'] for _, m in pcaw_rows))}-{pct(max(m['medium'] for _, m in pcaw_rows))}. A "
        f"weaker power and fewer dimensions hurt less, and the plain {LW_PCA_DIM}-d rotation (power 0) moves "
        f"Medium by only {delta(rot, gem)}, so it is the whitening itself that hurts. A likely reason: in a "
        f"database of {gt.n_db} images of {n_landmarks} landmarks the strongest directions are the "
        "between-landmark ones, which whitening flattens, while the weak directions it amplifies are "
        f"estimated from only {gt.n_db} points.",
        f"Lw learned only on other landmarks is the step that helps most: {best_label} gives {ema(bw)} "
        f"(Easy / Medium / Hard) against {ema(gem)}. That gain needs the full-dimensional, ridge-regularised "
        f"form. Truncated to {LW_PCA_DIM} dims ({versus(trunc, gem)} against no whitening) it keeps first the "
        f"{min(dominant)}-{max(dominant)} output directions whose training variance the ridge inflated, the "
        "ones that separate the *training* groups, and the held-out group's images keep only "
        f"{100 * min(energies):.1f}-{100 * max(energies):.1f} % of their whitened energy in the first "
        f"{LW_PCA_DIM} dims. Learning Lw inside a {LW_PCA_DIM}-d PCA subspace, where C_S has full rank, "
        f"gives {versus(pcalw, gem)}. The ridge hardly matters "
        f"(eps = {LW_EPS_STRONG:g}: Medium {pct(by_key['lw-eps']['medium'])}).",
        f"The Lw estimate is small-sample: {min(f['images'] for f in fold_info)}-"
        f"{max(f['images'] for f in fold_info)} images of {len(folds) - 1} landmark groups per fold, "
        f"{min(f['pairs'] for f in fold_info)}-{max(f['pairs'] for f in fold_info)} pairs, but only "
        f"{ranks} independent difference directions. The pairs come from the same city and photo collection "
        "as the test landmarks, an easier transfer than the GeM paper's Lw learned on SfM-120k. With 12 "
        "queries, one query's AP weighs 1/12 of a mean (up to 8.3 points).",
        f"Query expansion with the fixed k = {QE_K}: on plain GeM AQE / αQE / αDBA + αQE change Medium mAP by "
        f"{' / '.join(delta(m, gem) for m in exp_gem)} and Hard by "
        f"{' / '.join(delta(m, gem, 'hard') for m in exp_gem)}; on top of {best_label} by "
        f"{' / '.join(delta(m, bw) for m in exp_best)} (Medium) and "
        f"{' / '.join(delta(m, bw, 'hard') for m in exp_best)} (Hard). The sweep shows that no single k is "
        "best for every base and protocol here; its best cells are not used above.",
        "Whitening never saw a query image, and Lw never saw the ground truth of the group being evaluated. "
        "Choices that did look at these 12 queries: which whitening the expansion rows build on (best Medium "
        "mAP among the whitening rows) and the † row.",
    ]
    if ms_rows:
        notes.append(f"Three scales: plain GeM {ema(ms_rows[0])} (single scale {ema(gem)}); the same Lw recipe "
                     f"refitted on the three-scale descriptors {ema(ms_rows[1])}; with αDBA + αQE "
                     f"{ema(ms_rows[-1])}.")

    runtime = time.perf_counter() - t_start
    ctx = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([".venv/bin/python benchmarks/postprocess.py --write"]
                            + (["--no-multiscale"] if args.no_multiscale else [])
                            + (["--no-cache"] if args.no_cache else [])),
        "runtime": runtime, "extract_s": extract_s, "machine": machine(),
        "nq": gt.n_queries, "ndb": gt.n_db, "pca_rank": pca_rank, "folds": fold_info,
        "rank_range": ranks,
        "best": best_label, "rows": rows, "sweep": sweep, "fold_check": fold_check, "notes": notes,
    }
    text = markdown(ctx)
    print(text)
    if args.write:
        write_section(text, REPO / "BENCHMARKS.md", BEGIN, END)
        print(f"wrote the section into {REPO / 'BENCHMARKS.md'}")
    if args.json:
        Path(args.json).write_text(json.dumps(ctx, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
