"""The ``imret`` command line: thin wrappers over the library.

    imret extract IMAGES... --out feats.npy     descriptors of images (folders, files, --list)
    imret eval DATASET [--out DIR]              revisited Oxford/Paris or a labelled set
    imret models                                backbone presets and poolings

Only this module (and the server) prints, reads the environment or exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


def _scales(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(eval_scale(t)) for t in text.replace(" ", "").split(",") if t)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"bad --scales {text!r}: expected numbers like '1,0.7071,0.5' or '1,1/sqrt2,1/2'")
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"bad --scales {text!r}: scales must be positive")
    return vals


def eval_scale(token: str) -> float:
    """Parse one scale: a number, ``a/b``, or ``1/sqrt2`` (no eval of arbitrary text)."""
    t = token.lower()
    if "/" in t:
        num, den = t.split("/", 1)
        return eval_scale(num) / eval_scale(den)
    if t.startswith("sqrt"):
        return float(t[4:]) ** 0.5
    return float(t)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet50", help="backbone preset or timm CNN name, or an imret/cirtorch/dirtorch checkpoint file (default: resnet50)")
    g.add_argument("--pool", default="gem", help="pooling: mac, spoc, gem, rmac, rgem (default: gem)")
    g.add_argument("--gem-p", type=float, default=None, help="GeM exponent (default 3)")
    g.add_argument("--whitening", type=int, default=None, help="add a whitening layer of this output dimension")
    g.add_argument("--weights", default=None, help="local weights file (safetensors / torch state dict / checkpoint)")
    g.add_argument("--no-pretrained", action="store_true", help="random weights when no --weights (default: download ImageNet weights)")
    g.add_argument("--seed", type=int, default=0, help="seed for randomly initialised layers (default 0)")
    g.add_argument("--trust-pickle", action="store_true", help="allow arbitrary pickled objects in torch checkpoint files")
    e = p.add_argument_group("extraction")
    e.add_argument("--image-size", type=int, default=1024, help="long side in pixels, never upscaled (default 1024)")
    e.add_argument("--scales", type=_scales, default=(1.0,), help="comma-separated scales, e.g. '1,1/sqrt2,1/2' (default 1)")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")
    e.add_argument("--batch-size", type=int, default=None, help="images of equal size per forward pass (default: 1 on CPU, 8 on GPU)")
    e.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")
    e.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="fp32, or bf16/fp16 autocast where the hardware has it")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def _build_model(args):
    from .model import create_model
    from .weights import load_model

    import torch

    torch.manual_seed(args.seed)  # random layers (no weights, new whitening) are reproducible
    if os.path.isfile(args.model):
        if args.weights is not None:
            raise ValueError(f"--model {args.model!r} is a checkpoint that carries its weights; drop --weights or pass a backbone name")
        return load_model(args.model, trust_pickle=args.trust_pickle)
    pool_kwargs = {} if args.gem_p is None else {"p": args.gem_p}
    model = create_model(
        args.model,
        args.pool,
        pretrained=args.weights is None and not args.no_pretrained,
        whitening=args.whitening,
        pool_kwargs=pool_kwargs,
    )
    if args.weights is not None:
        from .weights import load_weights

        load_weights(model, args.weights, trust_pickle=args.trust_pickle)
    return model


def _extract_kwargs(args) -> dict:
    return dict(
        scales=args.scales,
        image_size=args.image_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
    )


def _report_skipped(skipped) -> None:
    if skipped:
        print(f"skipped {len(skipped)} image(s):", file=sys.stderr)
        for s in skipped:
            print(f"  {s.path}: {s.reason}", file=sys.stderr)


def _collect_images(inputs: Sequence[str], list_file: str | None) -> list[str]:
    from .images import list_images

    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = list_images(item)
            if not found:
                raise ValueError(f"no images found in folder {item!r}")
            paths.extend(str(p) for p in found)
        else:
            paths.append(item)  # a missing or bad file is reported by extraction, not here
    if list_file:
        with open(list_file, encoding="utf-8") as f:
            paths.extend(line.rstrip("\n") for line in f if line.strip())
    if not paths:
        raise ValueError("no input images: give folders, files, or --list FILE")
    return paths


def cmd_extract(args) -> int:
    import numpy as np

    from .extract import extract

    paths = _collect_images(args.images, args.list)
    model = _build_model(args)
    t0 = time.perf_counter()
    res = extract(model, paths, **_extract_kwargs(args))
    dt = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("") if out.suffix == ".npy" else out
    np.save(stem.with_suffix(".npy"), res.descriptors)
    stem.with_suffix(".paths.txt").write_text("".join(p + "\n" for p in res.paths), encoding="utf-8")
    meta = {
        "model": model.spec.to_dict(),
        "scales": list(args.scales),
        "image_size": args.image_size,
        "n": int(len(res.paths)),
        "dim": int(res.descriptors.shape[1]),
        "skipped": [{"path": s.path, "reason": s.reason} for s in res.skipped],
    }
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    print(f"wrote {res.descriptors.shape[0]} x {res.descriptors.shape[1]} descriptors to {stem.with_suffix('.npy')} "
          f"(paths in {stem.with_suffix('.paths.txt')}) in {dt:.1f} s, {len(paths) / max(dt, 1e-9):.2f} images/s")
    _report_skipped(res.skipped)
    return 0 if len(res.paths) else 1


def _dataset_kind(path: str) -> tuple[str, Path]:
    p = Path(path)
    if p.is_file() and p.suffix == ".pkl":
        return "revisitop", p
    if p.is_file() and p.suffix.lower() == ".csv":
        return "csv", p
    if p.is_dir():
        gnds = sorted(p.glob("gnd_*.pkl"))
        if len(gnds) == 1:
            return "revisitop", gnds[0]
        if len(gnds) > 1:
            raise ValueError(f"{path!r} holds several ground-truth files {[g.name for g in gnds]}; pass one of them")
        return "folder", p
    raise ValueError(f"dataset {path!r} is neither a gnd_*.pkl file, a folder with one, a CSV of path,label, nor a folder of class folders")


def cmd_eval(args) -> int:
    import numpy as np

    from . import evaluation as ev
    from .extract import extract

    kind, src = _dataset_kind(args.dataset)
    model = _build_model(args)
    kw = _extract_kwargs(args)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if kind == "revisitop":
        gt = ev.load_revisitop(src)
        root = Path(args.images) if args.images else src.parent / "jpg"
        qpaths, dbpaths = gt.query_paths(root), gt.db_paths(root)
        db = extract(model, dbpaths, **kw)
        q = extract(model, qpaths, bboxes=None if args.no_crop else list(gt.bbx), **kw)
        skipped = q.skipped + db.skipped
        scores = np.full((gt.n_queries, gt.n_db), -np.inf, dtype=np.float32)
        sub = q.descriptors @ db.descriptors.T
        scores[np.ix_(q.indices, db.indices)] = sub
        result = ev.evaluate_revisitop_scores(scores, gt)
        baseline = ev.random_baseline_revisitop(gt, n_trials=100, seed=0)
        ranks = ev.rank_by_similarity(scores)
    else:
        paths, labels, classes = ev.load_labelled_csv(src) if kind == "csv" else ev.load_labelled_folder(src)
        res = extract(model, paths, **kw)
        skipped = res.skipped
        result = ev.evaluate_labelled(res.descriptors, labels[res.indices])
        baseline = None
    dt = time.perf_counter() - t0
    _report_skipped(skipped)
    title = f"{Path(args.dataset).name}: {model.spec.backbone} + {model.spec.pool}, {args.image_size} px, scales {','.join(f'{s:g}' for s in args.scales)}"
    print(title)
    print(ev.format_table(result, baseline))
    print(f"({dt:.1f} s)")
    if out:
        payload = {
            "dataset": str(args.dataset),
            "model": model.spec.to_dict(),
            "image_size": args.image_size,
            "scales": list(args.scales),
            "seconds": dt,
            "result": result.to_dict(),
            "baseline_random": baseline.to_dict() if baseline is not None else None,
            "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        }
        (out / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
        if not args.no_plots:
            from . import plots

            try:
                plots.plot_ap_per_query(result, out / "ap_per_query.png", title=title)
            except ImportError as e:
                print(f"note: no AP chart ({e})", file=sys.stderr)
            if kind == "revisitop":
                plots.draw_revisitop_topk(ranks, gt, root, out / "topk.png", k=args.topk)
        print(f"results in {out}")
    return 0


def cmd_models(args) -> int:
    from .backbones import get_preset, list_backbones
    from .pooling import pool_descriptions

    print("backbone presets (any timm CNN name also works):")
    for n in list_backbones():
        p = get_preset(n)
        print(f"  {n:24s} timm {p.timm_name:28s} {p.note}")
    print("poolings:")
    for n, d in pool_descriptions().items():
        print(f"  {n:8s} {d}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imret", description="Instance-level image retrieval")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="descriptors of images -> .npy + .paths.txt + .json")
    p.add_argument("images", nargs="*", help="image files and/or folders (searched recursively)")
    p.add_argument("--list", help="a text file with one image path per line")
    p.add_argument("--out", required=True, help="output .npy (paths go to <stem>.paths.txt, metadata to <stem>.json)")
    _add_model_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("eval", help="evaluate on a revisitop-format dataset or a labelled set")
    p.add_argument("dataset", help="gnd_*.pkl, a folder holding one (images in <folder>/jpg), a CSV path,label, or a folder of class folders")
    p.add_argument("--images", help="image folder for a revisitop dataset (default: <gnd folder>/jpg)")
    p.add_argument("--out", help="folder for results.json, ap_per_query.png and topk.png")
    p.add_argument("--no-crop", action="store_true", help="do not crop queries to their bounding box")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--topk", type=int, default=10, help="results per query in topk.png (default 10)")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("models", help="list backbone presets and poolings")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"imret: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imret: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
