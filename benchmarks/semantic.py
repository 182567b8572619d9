"""Semantic and cross-modal retrieval on Flickr8k test (Gordo & Larlus, CVPR 2017).

Trains two models with ``imret.train.semantic`` on the train split (the best epoch chosen on
dev; test is read only here, once per row): the visual-only semantic model (``L_v``, weights
1, 0, 0) and the joint model (``L_v + L_t1 + L_t2``), both from ``configs/train_semantic.yaml``
(frozen EfficientNet-Lite0 trunk, GeM + FC to 512-D, tf-idf + W). Then scores on the 1000 test
photos and their 5000 captions:

* random: random unit vectors (seeded) for images and captions;
* tf-idf caption-to-caption, the reference of the semantic metrics: it ranks images by their
  *captions*. To be fair it must not see the captions that define the relevance, so it runs
  five times: in fold k an image is represented by its k-th caption alone (tf-idf of the
  training split's vocabulary), relevance is computed from the other four captions of each
  image, and the metrics are averaged over the folds. For text → image, caption k of an image is
  the query and an image is the tf-idf of its other four captions (5000 queries over 1000
  images in all, as for the other rows). Its relevance has four captions, not five, so it is
  slightly noisier than the others' (a conservative reference); image → text has no meaning
  for it;
* ImageNet visual baseline: GeM (p = 3) of the ImageNet trunk, 1280-D, no training;
* visual-only semantic model and joint model: their best-on-dev checkpoints, reloaded with
  ``imret.load_model`` and ``CaptionEncoder.load``.

Semantic metrics: NDCG@k and PCC (per query over the whole database, and over the top k) of
image → image retrieval, relevance = tf-idf similarity of the images' five captions (idf of the
training captions), the query left out of its database (``imret.semantic_eval``).

    python benchmarks/semantic.py [--epochs 30] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, machine_line, publish  # noqa: E402

BEGIN, END = "<!-- semantic:begin -->", "<!-- semantic:end -->"
KS = (10, 50, 100)
BARS = {1: 0.118, 5: 0.321, 10: 0.447}  # Karpathy & Fei-Fei (CVPR 2015), BRNN, Flickr8k text -> image


def train_run(name: str, weights: list[float], args, flickr: Path) -> Path:
    from imret.train import load_config
    from imret.train.semantic import SemanticTrainer, semantic_config_from_dict

    out = Path(args.out) / name
    if args.reuse and (out / "model_best.safetensors").is_file():
        return out
    d = load_config(REPO / "configs" / "train_semantic.yaml").to_dict()
    d["out"] = str(out)
    d["epochs"] = args.epochs
    d["data"]["flickr8k"] = str(flickr)
    d["data"]["cache_dir"] = str(args.cache)
    d["data"]["workers"] = args.workers
    d["loss"]["weights"] = weights
    if args.dim:
        d["model"]["whitening"] = args.dim
    d["validation"]["metric"] = "auto"
    d["device"] = args.device
    cfg = semantic_config_from_dict(d)
    if (out / "checkpoint_last.pt").exists():
        import shutil

        shutil.rmtree(out)

    def report(s):
        dev = s.dev or {}
        print(f"  {name} epoch {s.epoch}: loss {s.loss:.4f} (L_v {s.loss_v:.4f} L_t1 {s.loss_t1:.4f} L_t2 {s.loss_t2:.4f}) "
              f"dev ndcg@50 {dev.get('ndcg@50', float('nan')):.4f} pcc {dev.get('pcc_all', float('nan')):.4f} "
              f"t2i R@1/5/10 {100 * dev.get('t2i_r@1', float('nan')):.1f}/{100 * dev.get('t2i_r@5', float('nan')):.1f}/"
              f"{100 * dev.get('t2i_r@10', float('nan')):.1f}  {s.seconds:.1f} s", flush=True)

    t = time.perf_counter()
    res = SemanticTrainer(cfg, on_epoch=report, progress=False).fit()
    print(f"  {name}: best dev {res.metric} {res.best_value:.4f} at epoch {res.best_epoch}, {time.perf_counter() - t:.0f} s", flush=True)
    return out


def semantic_row(scores: np.ndarray, rel: np.ndarray) -> dict:
    from imret.semantic_eval import evaluate_semantic

    r = evaluate_semantic(scores, rel, exclude_self=True, ks=KS)
    out = {f"ndcg@{k}": v for k, v in r.ndcg.items()}
    out.update({f"pcc@{k}": v for k, v in r.pcc.items()})
    out["pcc"] = r.pcc_all
    return out


def cross_row(img: np.ndarray, txt: np.ndarray, owner: np.ndarray, both: bool = True) -> dict:
    from imret.semantic_eval import evaluate_cross_modal

    x = evaluate_cross_modal(img, txt, owner)
    out = {f"t2i@{k}": x.text_to_image[k] for k in (1, 5, 10)}
    out["t2i_medr"] = x.text_to_image_median_rank
    if both:
        out.update({f"i2t@{k}": x.image_to_text[k] for k in (1, 5, 10)})
        out["i2t_medr"] = x.image_to_text_median_rank
    return out


def tfidf_reference(enc, test) -> dict:
    """Leave-one-caption-out tf-idf reference (see the module docstring), averaged over 5 folds."""
    from imret.semantic_eval import cross_modal_ranks
    from imret.text import tfidf_similarity

    folds, t2i_ranks = [], []
    n = len(test)
    for k in range(5):
        one = enc.transform([c[k] for c in test.captions])  # (N, V) caption k of each image
        rest = enc.transform_images([[c for j, c in enumerate(cs) if j != k] for cs in test.captions])
        rel = tfidf_similarity(rest)
        folds.append(semantic_row(tfidf_similarity(one), rel))
        # caption k of image i queries the images' other-four-caption documents
        t2i, _ = cross_modal_ranks(rest.toarray().astype(np.float32), one.toarray().astype(np.float32), np.arange(n))
        t2i_ranks.append(t2i)
    out = {key: float(np.mean([f[key] for f in folds])) for key in folds[0]}
    ranks = np.concatenate(t2i_ranks)
    out.update({f"t2i@{k}": float(np.mean(ranks <= k)) for k in (1, 5, 10)})
    out["t2i_medr"] = float(np.median(ranks))
    return out


def fmt(row: dict, key: str, pct: bool = True) -> str:
    v = row.get(key)
    if v is None:
        return "–"
    if key.endswith("medr"):
        return f"{v:g}"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def figure(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from imret.train.semantic import read_log

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, run in runs.items():
        rows = read_log(run / "log.csv")
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [r["loss"] for r in rows], marker="o", ms=3, label=f"{name}: total")
        if name == "joint":
            for key, lab in (("loss_v", "L_v"), ("loss_t1", "L_t1"), ("loss_t2", "L_t2")):
                axes[0].plot(ep, [r[key] for r in rows], ls="--", label=f"{name}: {lab}")
        axes[1].plot(ep, [r["ndcg@50"] for r in rows], marker="o", ms=3, label=f"{name}: NDCG@50")
        axes[1].plot(ep, [r["pcc_all"] for r in rows], marker="s", ms=3, label=f"{name}: PCC")
        if rows and rows[0].get("t2i_r@1") is not None:
            for k in (1, 5, 10):
                axes[2].plot(ep, [100 * r[f"t2i_r@{k}"] for r in rows], marker="o", ms=3, label=f"{name}: text→image R@{k}")
    for k, v in BARS.items():
        axes[2].axhline(100 * v, color="grey", lw=0.8, ls=":")
    axes[0].set(xlabel="epoch", ylabel="training loss", title="loss per epoch")
    axes[1].set(xlabel="epoch", ylabel="fraction", title="dev semantic metrics")
    axes[2].set(xlabel="epoch", ylabel="recall (%)", title="dev text → image (dotted: BRNN test bars)")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flickr8k", default=str(SHARED / "data" / "flickr8k"))
    ap.add_argument("--out", default=str(REPO / "runs" / "semantic_bench"))
    ap.add_argument("--cache", default=str(REPO / "runs" / "semantic_cache"), help="frozen-trunk feature cache")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None, help="joint space dimension (default: the config's 512)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reuse", action="store_true", help="reuse trained runs found in --out")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from imret import load_model
    from imret.text import CaptionEncoder, load_flickr8k, tfidf_similarity
    from imret.train.semantic import describe_features, trunk_features

    t0 = time.perf_counter()
    flickr = Path(args.flickr8k)
    test = load_flickr8k(flickr).subset("test")
    runs = {"visual-only": train_run("visual", [1.0, 0.0, 0.0], args, flickr),
            "joint": train_run("joint", [1.0, 1.0, 1.0], args, flickr)}
    t_train = time.perf_counter() - t0

    enc = CaptionEncoder.load(runs["joint"] / "text_best.safetensors")  # tf-idf of the training captions
    rel = tfidf_similarity(enc.transform_images(test.captions))
    texts, owner = test.flat_captions()
    owner = np.asarray(owner)
    rows: dict[str, dict] = {}

    rng = np.random.default_rng(0)
    dim = args.dim or 512
    ri = rng.standard_normal((len(test), dim)).astype(np.float32)
    rt = rng.standard_normal((len(texts), dim)).astype(np.float32)
    ri /= np.linalg.norm(ri, axis=1, keepdims=True)
    rt /= np.linalg.norm(rt, axis=1, keepdims=True)
    rows["random"] = {**semantic_row(ri @ ri.T, rel), **cross_row(ri, rt, owner)}
    rows["tf-idf caption-to-caption (leave-one-caption-out)"] = tfidf_reference(enc, test)

    joint = load_model(runs["joint"] / "model_best.safetensors")
    feats = trunk_features(joint, test.paths, image_size=224, mode="pooled", cache_dir=args.cache,
                           workers=args.workers, progress=False)
    base = np.asarray(feats[0], dtype=np.float64)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    rows["ImageNet GeM (Lite0, 1280-D, no training)"] = semantic_row(base @ base.T, rel)

    check = {}
    for name, label in (("visual-only", "visual-only semantic model (L_v)"), ("joint", "joint model (L_v + L_t1 + L_t2)")):
        model = load_model(runs[name] / "model_best.safetensors")
        with torch.no_grad():
            phi = describe_features(model, feats, "pooled").numpy()
            # the reloaded checkpoint on decoded images gives the cached path's descriptors
            from imret.train.semantic import _SquareImages

            ds = _SquareImages(test.paths[:8], 224, model.mean, model.std)
            full = model(torch.stack([ds[i][0] for i in range(8)])).numpy()
        check[name] = float(np.abs(full - phi[:8]).max())
        row = semantic_row(phi.astype(np.float64) @ phi.T.astype(np.float64), rel)
        if name == "joint":
            theta = CaptionEncoder.load(runs[name] / "text_best.safetensors").encode_text(texts)
            row.update(cross_row(phi, theta, owner))
        rows[label] = row

    figpath = REPO / "benchmarks" / "figures" / "semantic_training.png"
    figure(runs, figpath)
    total = time.perf_counter() - t0
    j = rows["joint model (L_v + L_t1 + L_t2)"]
    base_row = rows["ImageNet GeM (Lite0, 1280-D, no training)"]
    beats = all(j[f"ndcg@{k}"] > base_row[f"ndcg@{k}"] for k in KS) and j["pcc"] > base_row["pcc"]
    recall_ok = all(j[f"t2i@{k}"] >= v for k, v in BARS.items())

    head = ("| method | NDCG@10 | NDCG@50 | NDCG@100 | PCC | PCC@100 | t→i R@1 | R@5 | R@10 | med r | i→t R@1 | R@5 | R@10 | med r |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, r in rows.items():
        lines.append("| " + " | ".join([name] + [fmt(r, k) for k in ("ndcg@10", "ndcg@50", "ndcg@100", "pcc", "pcc@100")]
                                       + [fmt(r, k) for k in ("t2i@1", "t2i@5", "t2i@10", "t2i_medr")]
                                       + [fmt(r, k) for k in ("i2t@1", "i2t@5", "i2t@10", "i2t_medr")]) + " |")
    from imret.train.semantic import read_log

    epochs = {n: read_log(runs[n] / "log.csv") for n in runs}
    bests = {}
    for n, rws in epochs.items():
        key = "rsum" if n == "joint" else "ndcg@100"
        b = max(rws, key=lambda r: r[key])
        bests[n] = (int(b["epoch"]), len(rws), key, b[key])
    from imret.train import load_config

    lc = load_config(REPO / "configs" / "train_semantic.yaml")
    lo, op = lc.loss, lc.optim
    mined = "every relevance triplet" if lo.per_anchor is None else f"the {lo.per_anchor} hardest violating triplets per anchor"
    loss_text = (f"L_v over {mined} with d+ at least {lo.min_gap:g} more relevant than d- (margin {lo.margin:g}), "
                 f"L_t1/L_t2 over {'each photo and its own caption against the rest of the batch' if lo.cross_modal == 'pairs' else 'the same triplets'} "
                 f"(margin {lo.cross_margin if lo.cross_modal == 'pairs' else lo.margin:g}), weights {lo.weights[0]:g}/{lo.weights[1]:g}/{lo.weights[2]:g}, "
                 f"{op.name.capitalize()} {op.lr:g}, {op.schedule} schedule")
    text = f"""{BEGIN}
## Semantic retrieval: joint image–caption embedding on Flickr8k (Gordo & Larlus, CVPR 2017)

`python benchmarks/semantic.py --epochs {args.epochs}{' --write' if args.write else ''}` · {datetime.date.today().isoformat()} · {machine_line()} ·
total {total / 60:.1f} min (trunk features of the 8,091 photos cached once at 224 px, then training of both models {t_train / 60:.1f} min incl. extraction).

Flickr8k test split ({len(test)} photos, {len(texts)} captions), models trained on train (6000) with
`configs/train_semantic.yaml`: frozen ImageNet EfficientNet-Lite0 trunk, GeM (p = 3) → FC (PCA-initialised) → {args.dim or 512}-D,
captions tf-idf (train vocabulary of {enc.num_terms} stems) → W → {args.dim or 512}-D; batches of 128 photos with one random caption each,
{loss_text}. Best epoch on **dev**
(visual-only: NDCG@100, epoch {bests['visual-only'][0]} of {bests['visual-only'][1]}; joint: sum of the six dev recalls,
epoch {bests['joint'][0]} of {bests['joint'][1]}). Semantic relevance: cosine of the images' five-caption tf-idf vectors;
NDCG with gain 2^rel − 1, query left out; PCC per query over the {len(test) - 1} others (and over the model's top 100), averaged.
The tf-idf row is a text oracle, fair by construction: in each of five folds an image is its k-th caption only and
relevance comes from its other four captions (its t→i: caption k against the other-four-caption documents).
Reloaded checkpoints reproduce the cached path's descriptors on decoded test photos (max |Δ| visual {check['visual-only']:.1e}, joint {check['joint']:.1e}).

{head}{chr(10).join(lines)}

Bars of issue 14: the joint model beats the ImageNet visual baseline on every NDCG@k and on PCC — **{'yes' if beats else 'no'}**;
its text → image R@1/5/10 ≥ 11.8 / 32.1 / 44.7 (BRNN, Karpathy & Fei-Fei CVPR 2015, Flickr8k) — **{'yes' if recall_ok else 'no'}**
({100 * j['t2i@1']:.1f} / {100 * j['t2i@5']:.1f} / {100 * j['t2i@10']:.1f}).
The paper fine-tunes a ResNet-101 end to end (`freeze_trunk: false`); these numbers train only the head and W.

![training curves](benchmarks/figures/semantic_training.png)
{END}
"""
    data = {"rows": rows, "bars": {"beats_baseline": beats, "recall": recall_ok}, "check": check, "bests": bests,
            "seconds": total}
    publish(text, BEGIN, END, write=args.write, json_path=args.json, data=data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
