"""``imret dedup``: near-duplicate groups of a folder of photos or of a store, thin over
:mod:`imret.dedup`.

    imret dedup PHOTOS... [--out report.json|.csv|.html]     describe, verify, group
    imret dedup --store STORE [--out ...]                    a store's images (ids as keys)

Registered by :func:`imret.cli.build_parser` through :func:`register`.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["register", "cmd_dedup"]

# The model a folder is described with when --model is not given: EfficientNet-Lite0 (ImageNet
# weights from pip, offline) at 512 px, 5x faster than ResNet-50 at 1024 px and as good at
# telling copies apart (see BENCHMARKS.md, near-duplicates).
DEFAULT_MODEL = "tf_efficientnet_lite0"
DEFAULT_IMAGE_SIZE = 512


def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --threshold {text!r}: expected a cosine in [-1, 1]") from None
    if not -1.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"bad --threshold {text!r}: expected a cosine in [-1, 1]")
    return v


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``dedup`` subcommand to ``subparsers`` (of ``imret``'s parser); returns its parser."""
    from .cli import _LIST_HELP, _add_model_args, _positive_int
    from .dedup import DEFAULT_K, DEFAULT_THRESHOLD_DESCRIPTOR, DEFAULT_THRESHOLD_VERIFY, VARIANTS

    p = subparsers.add_parser(
        "dedup", help="find near-duplicate photos (copies, crops, resizes, flips, rotations, re-encodes)",
        description="Group near-duplicate photos: global descriptors (and their flipped / rotated variants) "
                    "propose pairs, RootSIFT with a similarity transform confirms them, groups are the connected "
                    "components. Give photos (files, folders, --list) or --store.")
    p.add_argument("images", nargs="*", help="image files and/or folders (searched recursively)")
    p.add_argument("--list", help=_LIST_HELP)
    p.add_argument("--store", help="find duplicates among a store's images instead (its descriptors, model and "
                                   "stored RootSIFT when it keeps them)")
    d = p.add_argument_group("near-duplicates")
    d.add_argument("--threshold", type=_threshold, default=None,
                   help=f"cosine bar of candidate pairs (default {DEFAULT_THRESHOLD_VERIFY} with verification, "
                        f"{DEFAULT_THRESHOLD_DESCRIPTOR} with --no-verify)")
    d.add_argument("-k", type=_positive_int, default=DEFAULT_K,
                   help=f"nearest neighbours per image considered (default {DEFAULT_K})")
    d.add_argument("--tta", default="default", metavar="VARIANTS",
                   help="test-time variants each image is also described in, so that flipped and rotated copies "
                        f"are found: a comma list of {', '.join(VARIANTS)}, or default (flip,rot90,rot180: 4x the "
                        "extraction time), all, none")
    d.add_argument("--no-verify", action="store_true",
                   help="descriptors only: no RootSIFT check (faster, less precise; no edit names)")
    d.add_argument("--out", help="report file: .json (everything), .csv (group,path,score,edit), .html (thumbnails); "
                                 "default: groups printed")
    _add_model_args(p)
    # folder mode: a fast model at a moderate size by default (help texts follow the new defaults)
    p.set_defaults(model=DEFAULT_MODEL, image_size=DEFAULT_IMAGE_SIZE)
    for a in p._actions:
        if a.dest == "model":
            a.help = f"backbone preset or timm CNN name, or a checkpoint file (default: {DEFAULT_MODEL})"
        elif a.dest == "image_size":
            a.help = f"long side in pixels, never upscaled (default {DEFAULT_IMAGE_SIZE})"
    p.set_defaults(func=cmd_dedup)
    return p


def _print_groups(res) -> None:
    from .cli import _shown

    for gi, mem in enumerate(res.members, 1):
        print(f"group {gi} ({len(mem)} images)")
        for i, s, e in mem:
            key = "" if res.keys[i] == res.paths[i] else f"[{res.keys[i]}] "
            print(f"  {key}{_shown(res.paths[i])}  {e}" + ("" if e == "original" else f"  {s:.3f}"))


def cmd_dedup(args) -> int:
    """Run ``imret dedup``; returns the exit status (0, or 1 when no image could be read)."""
    from .cli import _build_model, _collect_images, _extract_kwargs, _shown
    from .dedup import REPORT_FORMATS, find_duplicates, find_duplicates_in_store, write_report

    if args.out is not None and not args.out.lower().endswith(REPORT_FORMATS):
        raise ValueError(f"bad --out {args.out!r}: the report's extension must be one of {', '.join(REPORT_FORMATS)}")
    verify = not args.no_verify
    t0 = time.perf_counter()
    if args.store:
        if args.images or args.list:
            raise ValueError("give photos or --store, not both (to check new photos against a store, add them first)")
        from .index.store import Store

        with Store.open(args.store, device=args.device) as store:
            res = find_duplicates_in_store(store, threshold=args.threshold, k=args.k, tta=args.tta, verify=verify,
                                           progress=not args.no_progress, batch_size=args.batch_size,
                                           workers=args.workers, precision=args.precision)
    else:
        paths = _collect_images(args.images, args.list)
        model = _build_model(args)
        kw = _extract_kwargs(args)
        kw.pop("progress")
        image_size = kw.pop("image_size")
        res = find_duplicates(paths, model, threshold=args.threshold, k=args.k, tta=args.tta, verify=verify,
                              image_size=image_size, progress=not args.no_progress, **kw)
    dt = time.perf_counter() - t0
    n_dup = sum(len(g) - 1 for g in res.groups)
    for key, reason in res.skipped:
        print(f"  skipped {_shown(str(key))}: {reason}", file=sys.stderr)
    if args.out:
        write_report(res, args.out)
    else:
        _print_groups(res)
    print(f"{len(res.keys)} images: {len(res.groups)} group(s) of near-duplicates, {n_dup} duplicate(s) "
          f"({res.candidates} candidate pair(s){', verified' if verify else ''}) in {dt:.1f} s"
          + (f"; report in {_shown(args.out)}" if args.out else ""))
    return 0 if res.keys else 1
