"""Extraction speed: imret's pipeline against a plain eager fp32 loop, in the same run.

For each network (ResNet50-GeM with random weights, the shared ImageNet MobileNetV2-GeM)
and each scale set (1) and (1, 1/sqrt2, 1/2) at 1024 px, it times
  - baseline: one image at a time, PIL decode + ``thumbnail`` + normalise, NCHW fp32,
    ``torch.no_grad``, scales by bilinear interpolation, GeM power mean (the research-code loop);
  - imret fp32: ``imret.extract`` (threaded decoding, equal-size batches, channels-last,
    ``inference_mode``);
  - imret bf16: the same with bf16 autocast, where the CPU/GPU supports it;
and reports images/s, the speed-up over the baseline and the cosine between each path's
descriptors and the baseline's (min over images).

    .venv/bin/python benchmarks/extract.py [--images DIR] [--n 16] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import imret
from imret.extract import extract

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMRET_SHARED", REPO.parent / "shared"))


def baseline_loop(model, paths, image_size, scales, device):
    """The plain loop: no batching, no threads, NCHW fp32."""
    mean = torch.tensor(model.mean).view(3, 1, 1)
    std = torch.tensor(model.std).view(3, 1, 1)
    model = model.to(device).to(memory_format=torch.contiguous_format).eval()
    p = model.multiscale_power()
    out = []
    with torch.no_grad():
        for path in paths:
            img = Image.open(path).convert("RGB")
            img.thumbnail((image_size, image_size), Image.Resampling.BILINEAR)
            x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
            x = ((x - mean) / std)[None].to(device)
            v = torch.zeros(1, model.dim, device=device)
            for s in scales:
                # the same resize definition as imret (output size rounded, in/out ratio mapping):
                # the comparison is about execution, not about the choice of resampling
                size = (max(1, round(x.shape[2] * s)), max(1, round(x.shape[3] * s)))
                xs = x if s == 1 else F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1)
                v += model(xs).pow(p)
            v = (v / len(scales)).pow(1 / p)
            out.append(F.normalize(v, dim=1).cpu())
    return torch.cat(out).numpy()


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def machine() -> str:
    cpu = cpu_name()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}{gpu}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(SHARED / "data" / "rparis6k-mini" / "jpg"))
    ap.add_argument("--n", type=int, default=16, help="images per measurement")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default: imret's (1 on CPU, 8 on GPU)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--nets", default="resnet50,mobilenetv2", help="comma-separated: resnet50, mobilenetv2")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    paths = sorted(str(p) for p in Path(args.images).glob("*.jpg"))[: args.n]
    if len(paths) < args.n:
        print(f"need {args.n} JPEGs in {args.images}, found {len(paths)}", file=sys.stderr)
        return 1
    weights = SHARED / "weights" / "mobilenetv2_100.coral_in1k.safetensors"
    nets = {}
    for name in args.nets.split(","):
        torch.manual_seed(0)
        if name == "resnet50":
            nets["ResNet50-GeM (random init)"] = lambda: imret.create_model("resnet50", "gem")
        elif name == "mobilenetv2":
            if weights.is_file():
                nets["MobileNetV2-GeM (shared ImageNet)"] = lambda: imret.create_model("mobilenetv2_100.coral", "gem", weights=str(weights))
        else:
            raise SystemExit(f"unknown net {name!r}; available: resnet50, mobilenetv2")
    precisions = ["fp32"]
    dev = torch.device(args.device)
    if (dev.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()) or (dev.type == "cuda" and torch.cuda.is_bf16_supported()):
        precisions.append("bf16")

    print(f"machine: {machine()}; {args.n} images from {args.images}, {args.image_size} px, batch {args.batch_size}, {args.workers} decode threads")
    rows = []
    for net_name, make in nets.items():
        for scales in ((1.0,), (1.0, 1 / math.sqrt(2), 0.5)):
            torch.manual_seed(0)
            model = make()
            # warm-up (allocator, oneDNN primitive caches) on two images, untimed
            baseline_loop(model, paths[:1], args.image_size, scales, dev)
            ref, t_base = timed(lambda: baseline_loop(model, paths, args.image_size, scales, dev))
            row = {"net": net_name, "scales": [round(s, 4) for s in scales], "baseline_img_s": args.n / t_base}
            for prec in precisions:
                kw = dict(scales=scales, image_size=args.image_size, batch_size=args.batch_size, workers=args.workers,
                          device=dev, precision=prec, draft=True)
                extract(model, paths[:1], **kw)  # warm-up
                res, t = timed(lambda: extract(model, paths, **kw))
                cos = (res.descriptors * ref).sum(1)
                row[f"imret_{prec}_img_s"] = args.n / t
                row[f"imret_{prec}_speedup"] = t_base / t
                row[f"imret_{prec}_cos_min"] = float(cos.min())
            if len(scales) == 1 and dev.type == "cpu":  # evidence for the CPU default of batch 1
                kw = dict(scales=scales, image_size=args.image_size, batch_size=4, workers=args.workers, device=dev)
                _, t = timed(lambda: extract(model, paths, **kw))
                row["imret_fp32_batch4_img_s"] = args.n / t
            rows.append(row)
            print(json.dumps(row))

    print()
    print("| network | scales | baseline eager fp32 (img/s) | imret fp32 (img/s) | × | cos min | imret bf16 (img/s) | × | cos min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bf = (f"{r['imret_bf16_img_s']:.2f} | {r['imret_bf16_speedup']:.2f} | {r['imret_bf16_cos_min']:.5f}"
              if "imret_bf16_img_s" in r else "n/a | | ")
        print(f"| {r['net']} | {','.join(f'{s:g}' for s in r['scales'])} | {r['baseline_img_s']:.2f} | "
              f"{r['imret_fp32_img_s']:.2f} | {r['imret_fp32_speedup']:.2f} | {r['imret_fp32_cos_min']:.6f} | {bf} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
