"""``imret mine`` and ``imret clean``: training data from unlabelled photos, and cleaning of
labelled ones, by geometric verification (thin over :mod:`imret.selfmine`).

    imret mine PHOTOS... --out DIR [--k 10] [--min-inliers 15] [model options]
        DIR/classes.csv (path,label: imret train's data.kind: csv), DIR/pairs.csv
        (query,positive,negative_1..K), DIR/mined.json; caches in DIR so a rerun resumes:
        global.* (descriptors), sift/ (RootSIFT per image), verified.jsonl (verified pairs)
    imret clean LABELLED.csv|FOLDER --out DIR [--mode largest|flag]
        DIR/cleaned.csv, DIR/dropped.html (thumbnails and reasons), DIR/clean.json

Wired into ``imret`` by :func:`register`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["register", "cmd_mine", "cmd_clean"]


def _add_local_args(p: argparse.ArgumentParser) -> None:
    from .selfmine import DEFAULT_MIN_INLIERS

    g = p.add_argument_group("verification")
    g.add_argument("--min-inliers", type=int, default=DEFAULT_MIN_INLIERS,
                   help=f"inliers that make a pair verified (default {DEFAULT_MIN_INLIERS})")
    g.add_argument("--max-keypoints", type=int, default=1000, help="RootSIFT keypoints per image (default 1000)")
    g.add_argument("--local-side", type=int, default=1024,
                   help="long side for SIFT detection, never upscaled (default 1024)")
    g.add_argument("--verify-workers", type=int, default=None,
                   help="threads for SIFT and verification (default: min(8, CPU count))")


def register(subparsers: Any) -> None:
    """Add ``mine`` and ``clean`` to ``imret``'s sub-command parsers."""
    from .cli import _add_model_args
    from .selfmine import (
        CLEAN_MODES,
        DEFAULT_ALL_PAIRS_UP_TO,
        DEFAULT_ATTACH_INLIERS,
        DEFAULT_ATTACH_MEMBERS,
        DEFAULT_ATTACH_MIN,
        DEFAULT_EXPAND,
        DEFAULT_K,
        DEFAULT_MIN_SIZE,
        DEFAULT_NEGATIVES,
        DEFAULT_VOTE_K,
        DEFAULT_VOTE_SHARE,
    )

    p = subparsers.add_parser("mine", help="pseudo-classes, positive pairs and hard negatives from unlabelled photos "
                                           "(kNN graph + geometric verification)")
    p.add_argument("images", nargs="*", help="image files and/or folders (searched recursively)")
    p.add_argument("--list", help="a file listing more images, one path per line (or .jsonl of JSON strings)")
    p.add_argument("--out", required=True, help="output folder (also holds the caches a rerun resumes from)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"nearest neighbours verified per image (default {DEFAULT_K})")
    p.add_argument("--negatives", type=int, default=DEFAULT_NEGATIVES,
                   help=f"hard negatives per query, at most one per component (default {DEFAULT_NEGATIVES})")
    g = p.add_argument_group("components (fewer, larger pseudo-classes)")
    g.add_argument("--min-component", type=int, default=DEFAULT_MIN_SIZE,
                   help="smallest component made a pseudo-class; smaller ones are left out "
                        f"(default {DEFAULT_MIN_SIZE})")
    g.add_argument("--expand", type=int, default=DEFAULT_EXPAND,
                   help="expansion rounds: each component's mean descriptor proposes --k outside images, each verified "
                        f"against its --attach-members most similar members (default {DEFAULT_EXPAND})")
    g.add_argument("--attach-members", type=int, default=DEFAULT_ATTACH_MEMBERS,
                   help=f"members an expansion candidate is verified against (default {DEFAULT_ATTACH_MEMBERS})")
    g.add_argument("--attach-inliers", type=int, default=DEFAULT_ATTACH_INLIERS,
                   help="a weaker bar: an image joins a component when --attach-min of its members verify with it at "
                        f"this many inliers (default {DEFAULT_ATTACH_INLIERS or 'none: --min-inliers only'})")
    g.add_argument("--attach-min", type=int, default=DEFAULT_ATTACH_MIN,
                   help=f"members that must verify at --attach-inliers (default {DEFAULT_ATTACH_MIN})")
    g.add_argument("--attach-votes", type=float, default=None, metavar="SHARE",
                   help="after the components, an image in none joins the class holding at least this share (0.5-1] "
                        "of the similarity of its 10 nearest labelled images: more images, less purity (default: off)")
    _add_local_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_mine)

    p = subparsers.add_parser("clean", help="drop wrongly labelled images: geometric verification within each label")
    p.add_argument("labelled", help="a CSV (path,label or GLDv2 layouts) or a folder of class folders")
    p.add_argument("--out", required=True, help="output folder: cleaned.csv, dropped.html, clean.json")
    p.add_argument("--mode", choices=CLEAN_MODES, default="vote",
                   help="largest: keep each label's largest verified group; flag: drop images that verify with "
                        "no other image of their label; vote: as flag, but keep such an image when its label holds "
                        "--vote-share of its --vote-k nearest neighbours by the global descriptor (default vote: the mode "
                        "that met both bars on rParis6k-mini with 20 %% wrong labels, BENCHMARKS.md)")
    p.add_argument("--vote-k", type=int, default=DEFAULT_VOTE_K,
                   help=f"--mode vote: neighbours (all labels) that vote on an image's label (default {DEFAULT_VOTE_K})")
    p.add_argument("--vote-share", type=float, default=DEFAULT_VOTE_SHARE,
                   help=f"--mode vote: share of the neighbours' similarity its label needs (default {DEFAULT_VOTE_SHARE:g})")
    p.add_argument("--all-pairs-up-to", type=int, default=DEFAULT_ALL_PAIRS_UP_TO,
                   help=f"verify all pairs of labels up to this size, else each image's --k nearest neighbours by "
                        f"the global descriptor (default {DEFAULT_ALL_PAIRS_UP_TO})")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"neighbours per image in large labels (default {DEFAULT_K})")
    _add_local_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_clean)


# ------------------------------------------------------------------- SIFT, cached per image


def _sift_key(path: str, settings: dict) -> str:
    st = os.stat(path)
    ident = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, settings], sort_keys=True)
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _cached_sift(paths: Sequence[str], cache: Path, extractor, workers: int, progress: bool):
    """RootSIFT of every image, computed once and kept in ``cache`` (one .npz per image, keyed by
    path, size, mtime and settings). Returns ``(loader(i) -> LocalFeatures | None, failures)``."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from tqdm.auto import tqdm

    from .fileio import atomic_write_bytes
    from .local.sift import sift_from_uint8
    from .local.types import LocalFeatures

    settings = {"max_keypoints": extractor.max_keypoints, "max_side": extractor.max_side, "root": extractor.root}
    cache.mkdir(parents=True, exist_ok=True)
    files: list[Path | None] = [None] * len(paths)
    failures: list[tuple[str, str]] = []

    def one(i: int) -> tuple[int, Path | None, str | None]:
        try:
            f = cache / f"{_sift_key(paths[i], settings)}.npz"
            if f.is_file():
                return i, f, None
            feats, raw = extractor.encode(paths[i])
            buf = io.BytesIO()
            np.savez(buf, keypoints=feats.keypoints, raw=raw, scores=feats.scores, size=np.asarray(feats.size))
            atomic_write_bytes(f, buf.getvalue())
            return i, f, None
        except (OSError, ValueError) as e:  # unreadable or not an image: no features, never verified
            return i, None, str(e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, f, err in tqdm(pool.map(one, range(len(paths))), total=len(paths), desc="sift", unit="img",
                              disable=not progress):
            files[i] = f
            if err is not None:
                failures.append((paths[i], err))

    def load(i: int):
        f = files[i]
        if f is None:
            return None
        with np.load(f, allow_pickle=False) as z:
            size = tuple(int(v) for v in z["size"])
            return LocalFeatures(z["keypoints"], sift_from_uint8(z["raw"], root=settings["root"]), size,
                                 z["scores"], "sift")

    return load, failures


def _extractor(args):
    from .local.sift import SiftExtractor

    return SiftExtractor(max_keypoints=args.max_keypoints, max_side=args.local_side)


def _workers(args) -> int:
    return min(8, os.cpu_count() or 1) if args.verify_workers is None else args.verify_workers


def _descriptors(args, paths: list[str], out: Path):
    """Global descriptors of ``paths``, reused from ``out/global.*`` when the same images and
    model made them. Returns ``(descriptors, paths that worked, skipped)``."""
    from .cli import _build_model, _extract_kwargs
    from .extract import extract, load_extraction, save_extraction

    model = _build_model(args)
    key = {"model": model.spec.to_dict(), "weights_sha256": model.weights_sha256, "scales": list(args.scales),
           "image_size": args.image_size, "refine": str(args.refine),
           "inputs": hashlib.sha256("\0".join(paths).encode("utf-8", "surrogateescape")).hexdigest()}
    stem = out / "global"
    try:
        desc, done, meta = load_extraction(stem)
        if meta.get("mine_key") == key:
            return desc, done, meta.get("skipped", [])
    except (OSError, ValueError):
        pass
    res = extract(model, paths, **_extract_kwargs(args))
    save_extraction(stem, res, {"mine_key": key})
    return res.descriptors, res.paths, [{"path": s.path, "reason": s.reason} for s in res.skipped]


def _report_failures(what: str, items: list) -> None:
    import sys

    from .cli import _shown

    if items:
        print(f"{what} {len(items)} image(s):", file=sys.stderr)
        for path, reason in items[:20]:
            print(f"  {_shown(path)}: {reason}", file=sys.stderr)
        if len(items) > 20:
            print(f"  ... and {len(items) - 20} more", file=sys.stderr)


def _check_args(args) -> None:
    for name in ("k", "min_inliers", "max_keypoints", "local_side"):
        v = getattr(args, name, None)
        if v is not None and v < (2 if name == "min_inliers" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be at least {2 if name == 'min_inliers' else 1}, got {v}")
    for name, low in (("min_component", 2), ("expand", 0), ("attach_members", 1), ("attach_min", 1),
                      ("attach_inliers", 2)):
        v = getattr(args, name, None)
        if v is not None and v < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")
    if getattr(args, "attach_votes", None) is not None:
        from .selfmine import check_vote_share

        check_vote_share(args.attach_votes, "--attach-votes")
    if getattr(args, "negatives", 0) < 0:
        raise ValueError(f"--negatives must be >= 0, got {args.negatives}")
    if args.verify_workers is not None and args.verify_workers < 0:
        raise ValueError(f"--verify-workers must be >= 0, got {args.verify_workers}")


# --------------------------------------------------------------------------------- commands


def cmd_mine(args) -> int:
    from .cli import _collect_images
    from .selfmine import mine, paths_tag, write_class_csv, write_pairs_csv

    _check_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = [os.path.abspath(p) for p in _collect_images(args.images, args.list)]
    desc, paths, skipped = _descriptors(args, paths, out)
    _report_failures("skipped", [(s["path"], s["reason"]) for s in skipped])
    if len(paths) < 2:
        raise ValueError(f"mining needs at least 2 readable images, got {len(paths)}")
    extractor = _extractor(args)
    load, failures = _cached_sift(paths, out / "sift", extractor, _workers(args), not args.no_progress)
    _report_failures("no local features for", failures)
    tag = paths_tag(paths, extractor.max_keypoints, extractor.max_side)
    mined = mine(desc, load, paths, k=args.k, min_inliers=args.min_inliers, negatives=args.negatives,
                 min_size=args.min_component, expand=args.expand, attach_members=args.attach_members,
                 attach_min=args.attach_min, attach_inliers=args.attach_inliers, attach_votes=args.attach_votes,
                 workers=_workers(args), checkpoint=out / "verified.jsonl", tag=tag, progress=not args.no_progress)
    n_rows = write_class_csv(out / "classes.csv", mined)
    n_pairs = write_pairs_csv(out / "pairs.csv", mined)
    s = mined.summary()
    report = {**s, "k": args.k, "negatives": args.negatives, "min_size": args.min_component,
              "expand": args.expand, "attach_members": args.attach_members, "attach_min": args.attach_min,
              "attach_inliers": args.attach_inliers, "attach_votes": args.attach_votes,
              "seconds": round(time.perf_counter() - t0, 1),
              "classes_csv": "classes.csv", "pairs_csv": "pairs.csv",
              "components_list": [[paths[i] for i in c] for c in mined.components]}
    from .fileio import atomic_write_bytes

    atomic_write_bytes(out / "mined.json", (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    sizes = ", ".join(f"{c} x {sz}" for sz, c in sorted(s["component_sizes"].items(), reverse=True)) or "none"
    print(f"mined {s['images']} images in {report['seconds']} s: {s['verified_pairs']} of {s['candidate_pairs']} "
          f"candidate pairs verified (>= {s['min_inliers']} inliers, k={args.k})")
    print(f"  {s['components']} components (sizes: {sizes}); {s['images_in_components']} images in them, "
          f"{s['singletons']} left alone")
    print(f"  {n_pairs} positive pairs ({s['hard_positives']} hard), negatives for {s['queries_with_negatives']} queries")
    print(f"  wrote {out / 'classes.csv'} ({n_rows} rows: imret train with data.kind: csv), {out / 'pairs.csv'}, "
          f"{out / 'mined.json'}")
    return 0


def _read_labelled(path: str) -> tuple[list[str], list[str]]:
    from .data import load_csv_dataset, load_folder_dataset

    ds = load_folder_dataset(path) if os.path.isdir(path) else load_csv_dataset(path)
    return [os.path.abspath(p) for p in ds.paths], [ds.classes[int(c)] for c in ds.labels]


def cmd_clean(args) -> int:
    import numpy as np

    from .selfmine import clean, paths_tag, write_clean_csv, write_clean_html

    _check_args(args)
    if args.all_pairs_up_to < 2:
        raise ValueError(f"--all-pairs-up-to must be at least 2, got {args.all_pairs_up_to}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths, labels = _read_labelled(args.labelled)
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    desc = None
    missing: list[int] = []
    if args.mode == "vote" or max(counts.values()) > args.all_pairs_up_to:  # votes and large labels need them
        got, done, skipped = _descriptors(args, paths, out)
        _report_failures("no global descriptor for", [(s["path"], s["reason"]) for s in skipped])
        desc = np.zeros((len(paths), got.shape[1]), np.float32)
        desc[:, 0] = 1.0  # unreadable images: a placeholder unit row, masked out by valid= below
        row = {p: r for r, p in enumerate(done)}
        for i, p in enumerate(paths):
            if p in row:
                desc[i] = got[row[p]]
            else:
                missing.append(i)
    extractor = _extractor(args)
    load, failures = _cached_sift(paths, out / "sift", extractor, _workers(args), not args.no_progress)
    _report_failures("no local features for", failures)
    tag = paths_tag(paths, extractor.max_keypoints, extractor.max_side)
    valid = np.ones(len(paths), bool)
    valid[missing] = False  # no global descriptor: neither verified nor a voter
    res = clean(paths, labels, load, mode=args.mode, descriptors=desc, min_inliers=args.min_inliers,
                all_pairs_up_to=args.all_pairs_up_to, k=args.k, workers=_workers(args),
                checkpoint=out / "verified.jsonl", tag=tag, progress=not args.no_progress,
                vote_k=args.vote_k, vote_share=args.vote_share, valid=valid)
    n_rows = write_clean_csv(out / "cleaned.csv", res)
    write_clean_html(out / "dropped.html", res)
    s = res.summary()
    report = {**s, "seconds": round(time.perf_counter() - t0, 1), "per_label": res.per_label,
              "dropped_images": [{"path": paths[i], "label": labels[i], "reason": res.reasons[i]} for i in res.dropped]}
    from .fileio import atomic_write_bytes

    atomic_write_bytes(out / "clean.json", (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    print(f"cleaned {s['images']} images of {s['labels']} labels in {report['seconds']} s ({s['mode']}, "
          f">= {s['min_inliers']} inliers; {s['verified_pairs']} of {s['checked_pairs']} pairs verified): "
          f"kept {s['kept']}, dropped {s['dropped']}")
    worst = sorted(res.per_label.items(), key=lambda kv: kv[1]["kept"] / kv[1]["images"])[:10]
    for lab, c in worst:
        if c["kept"] < c["images"]:
            print(f"  {lab}: kept {c['kept']} of {c['images']}")
    print(f"  wrote {out / 'cleaned.csv'} ({n_rows} rows), {out / 'dropped.html'}, {out / 'clean.json'}")
    return 0
