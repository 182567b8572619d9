"""DOLG training step and extraction speed against the global GeM head (GPU check of issue 12).

A DOLG ResNet50 (local branch on layer3, 512-d) and the global-only GeM head on the same trunk,
each measured in the same process on the same device: one training step (forward of the whole
batch, CurricularFace loss s 30 m 0.15, backward, SGD update) on random square images at
``--image-size`` (512 px) with a batch of ``--batch`` (64) under ``--precision`` (bf16
autocast), BatchNorm training as in the official recipe; then descriptor extraction (eval,
inference mode) of the same images. Random weights: speed and memory do not depend on them.

Reported: images/s of the step (median over ``--steps`` timed steps after ``--warmup``), the
peak memory of a step (``torch.cuda.max_memory_allocated``, reset before; on the CPU the
process's peak resident set is not reset, so only the GPU figure is meaningful), and extraction
images/s (median over the timed batches). Ratios DOLG / GeM are of the same run.

    .venv/bin/python benchmarks/dolg_step.py --device cuda [--batch 64] [--image-size 512] [--precision bf16] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, publish  # noqa: E402

BEGIN, END = "<!-- dolg-step:begin -->", "<!-- dolg-step:end -->"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(head: str, args, device) -> dict:
    import torch

    from imret.losses import create_loss
    from imret.models import create_model
    from imret.precision import autocast, autocast_dtype

    amp = autocast_dtype(args.precision, device)
    torch.manual_seed(0)
    kw = {"head": "dolg"} if head == "dolg" else {}
    model = create_model(args.backbone, "gem", **kw).to(device)
    loss_fn = create_loss("curricularface", dim=model.dim, num_classes=args.classes).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    labels = torch.arange(args.batch, device=device) % args.classes

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            d = model(x)
        loss = loss_fn(d.float(), labels)
        loss.backward()
        opt.step()

    model.train()
    loss_fn.train()
    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    model.eval()
    ext = []
    n = min(args.batch, args.extract_batch)
    with torch.inference_mode():
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            with autocast(device, amp):
                model(x[:n])
            _sync(device)
            if i >= args.warmup:
                ext.append(time.perf_counter() - t0)
    return {"head": head, "dim": model.dim, "step_images_per_s": args.batch / statistics.median(times),
            "step_s": statistics.median(times), "peak_gib": peak,
            "extract_images_per_s": n / statistics.median(ext),
            "head_params": sum(p.numel() for p in model.head.parameters())}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--extract-batch", type=int, default=32, help="images per extraction forward")
    ap.add_argument("--classes", type=int, default=16, help="CurricularFace classes (labels cycle through them)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    args = ap.parse_args(argv)

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("dolg_step: no CUDA device here (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the benchmark's own process: fixed shapes
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    rows = [measure(h, args, device) for h in ("gem", "dolg")]
    base = rows[0]
    lines = [BEGIN, "## DOLG training step and extraction against the global head (`benchmarks/dolg_step.py`)", "",
             f"- Command: `.venv/bin/python benchmarks/dolg_step.py {' '.join(argv)}`".rstrip(),
             f"- Machine: {machine_line()}",
             f"- Date: {started}",
             f"- {args.backbone}, {args.image_size} x {args.image_size} px random images, batch {args.batch}, "
             f"{args.precision}, channels-last, BatchNorm training; step = forward + CurricularFace + backward + SGD; "
             f"median of {args.steps} steps after {args.warmup} warm-up; extraction batches of "
             f"{min(args.batch, args.extract_batch)} in inference mode.", "",
             "| head | dim | head params | step images/s | vs GeM | step peak memory (GiB) | extraction images/s | vs GeM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = "n/a (CPU)" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {'GeM (global)' if r['head'] == 'gem' else 'DOLG'} | {r['dim']} | {r['head_params'] / 1e6:.2f} M | "
                     f"{r['step_images_per_s']:.1f} | {r['step_images_per_s'] / base['step_images_per_s']:.2f}× | "
                     f"{mem} | {r['extract_images_per_s']:.1f} | "
                     f"{r['extract_images_per_s'] / base['extract_images_per_s']:.2f}× |")
    lines.append(END)
    publish("\n".join(lines) + "\n", BEGIN, END, write=args.write, json_path=args.json, data=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
