"""End-to-end extraction on a GPU: files on disk -> descriptors, decoding included (issue 16, item 6).

ResNet50-GeM (random weights: the speed does not depend on them) at 1024 px, bf16 autocast,
channels-last, equal-size batches, over the rParis6k-mini photos listed ``--repeat`` times
(the same 250 files again and again: the page cache holds them, so the figure is decoding and
compute, not the disk). Rows, all through ``imret.extract.extract`` as ``imret index build``
runs it:

- ``decode=device``: JPEGs decoded on the GPU (nvJPEG via torchvision) in the worker threads;
- ``decode=cpu``: Pillow on the CPU threads (with draft-mode downscaling), batches pinned and
  copied;

at each ``--batch-sizes``. Also the cosine between the two decoders' descriptors of the same
photos (the resize filters differ: bicubic-antialias on the GPU, Lanczos in Pillow). The bar of
issue 16: 1500 images/s end to end on an H100-class GPU.

    .venv/bin/python benchmarks/gpu_extract.py [--repeat 12] [--batch-sizes 32,64] [--write]
    .venv/bin/python benchmarks/gpu_extract.py --device cpu --repeat 1 --n 8 --image-size 256   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, machine_line, publish  # noqa: E402

BEGIN, END = "<!-- gpu-extract:begin -->", "<!-- gpu-extract:end -->"
BAR = 1500.0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=Path, default=SHARED / "data" / "rparis6k-mini" / "jpg")
    ap.add_argument("--n", type=int, default=None, help="photos from --images (default all)")
    ap.add_argument("--repeat", type=int, default=12, help="times the photo list is repeated")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch-sizes", default="32,64")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="decoding threads")
    ap.add_argument("--decoders", default="device,cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    import imret
    from imret.extract import extract
    from imret.images import list_images

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_extract: no CUDA device here (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    photos = list_images(args.images)[: args.n]
    if not photos:
        print(f"gpu_extract: no photos in {args.images}", file=sys.stderr)
        return 2
    paths = photos * args.repeat
    torch.manual_seed(0)
    model = imret.create_model(args.model, "gem", pretrained=False).eval().to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # this process only: a few fixed shapes
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    common = dict(image_size=args.image_size, device=device, precision=args.precision, workers=args.workers,
                  compile="off")
    # warm-up: cuDNN autotuning of each shape, the decoder's first call
    for dec in args.decoders.split(","):
        extract(model, photos[:8], batch_size=8, decode=dec, **common)
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        for dec in args.decoders.split(","):
            _sync(device)
            t0 = time.perf_counter()
            c0 = time.process_time()
            res = extract(model, paths, batch_size=bs, decode=dec, **common)
            _sync(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows.append({"decode": dec, "batch": bs, "images": len(res.indices), "skipped": len(res.skipped),
                         "seconds": wall, "cpu_seconds": cpu, "images_per_s": len(res.indices) / wall,
                         "peak_gib": peak})
            print(f"decode={dec} batch={bs}: {rows[-1]['images_per_s']:.1f} images/s ({wall:.1f} s, CPU {cpu:.1f} s)",
                  file=sys.stderr)
    # the two decoders' descriptors of the same photos
    a = extract(model, photos, batch_size=8, decode="device", **common).descriptors
    b = extract(model, photos, batch_size=8, decode="cpu", **common).descriptors
    cos = (a * b).sum(1) if a.shape == b.shape else np.array([np.nan])

    best = max(rows, key=lambda r: r["images_per_s"])
    lines = [BEGIN, "## GPU extraction end to end, decoding included (`benchmarks/gpu_extract.py`)", "",
             f"- Command: `.venv/bin/python benchmarks/gpu_extract.py {' '.join(argv)}`".rstrip(),
             f"- Machine: {machine_line()}",
             f"- Date: {started}",
             f"- {args.model}-GeM (random weights), {args.image_size} px, {args.precision}, channels-last, "
             f"{len(photos)} rParis6k-mini photos x {args.repeat} = {len(paths)} files (page-cached), "
             f"{args.workers} decoding threads, `compile=off`; wall time from the first file read to the last "
             "descriptor on the host.", "",
             "| decode | batch | images | images/s | CPU s | peak GPU memory (GiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['decode']} | {r['batch']} | {r['images']} | {r['images_per_s']:.1f} | "
                     f"{r['cpu_seconds']:.1f} | {mem} |")
    lines += ["", f"Descriptor cosine, GPU-decoded against Pillow-decoded, same photos: min {np.nanmin(cos):.5f}, "
                  f"mean {np.nanmean(cos):.5f}.", "",
              f"Bar (issue 16, H100-class GPU): >= {BAR:.0f} images/s end to end: best {best['images_per_s']:.1f} "
              f"(decode={best['decode']}, batch {best['batch']}) -> "
              f"{'**pass**' if best['images_per_s'] >= BAR else '**FAIL**'}"
              + ("" if device.type == "cuda" else " (not a GPU run: smoke test only)"), END]
    publish("\n".join(lines) + "\n", BEGIN, END, write=args.write and device.type == "cuda", json_path=args.json,
            data={"rows": rows, "cosine_min": float(np.nanmin(cos))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
