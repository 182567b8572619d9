"""Training step cost: plain vs multistage backpropagation, by batch size.

One training step of a ResNet50-GeM retrieval network (random weights: speed and memory do
not depend on them) on square images (512 px by default) with the listwise AP loss over the
whole batch (classes of 4 images), BatchNorm frozen, followed by an Adam update:

- **plain**: one forward of the whole batch with autograd, ``loss.backward()``
  (activations of every image alive at once: memory grows with the batch);
- **multistage** (Revaud et al., ICCV 2019): descriptors of the whole batch without autograd,
  the loss gradient with respect to the descriptors, then each chunk recomputed with
  autograd and back-propagated (``imret.train.multistage_backward``). The images come from a
  lazy, deterministic sequence (as a dataset that decodes on access would), so only one chunk
  of images and activations is alive at a time.

Each (mode, batch) runs in a fresh process: build the model, one small warm-up step, then
one timed step. Memory is the process's peak resident set during the step (``VmHWM``
reset through ``/proc/self/clear_refs`` before it) on CPU, ``torch.cuda.max_memory_allocated``
on a GPU. "Step memory" is the peak minus the resting size before the step (model, optimiser
state, and for plain the input batch). Before each plain run the peak is predicted from the
earlier plain runs; a batch predicted not to fit in the available memory, or a step predicted
to exceed ``--max-step-seconds``, is reported as skipped with the prediction.

    .venv/bin/python benchmarks/train.py [--device cpu|cuda] [--image-size 512] \
        [--plain 8,16,32,128,512] [--multistage 32,128,512,1024] [--chunk 4] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_line, write_section  # noqa: E402

BEGIN, END = "<!-- train:begin -->", "<!-- train:end -->"
GiB = 2**30


# -- the measured step (child process) --------------------------------------------------------

class SyntheticImages:
    """``n`` deterministic random ``(3, s, s)`` images made on access (a lazy dataset stand-in)."""

    def __init__(self, n: int, size: int, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(3, self.size, self.size, generator=g)


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_step(mode: str, batch: int, size: int, chunk: int, backbone: str, device: str, precision: str,
             threads: int | None) -> dict:
    import torch

    from imret import create_model
    from imret.losses import APLoss
    from imret.train.multistage import freeze_batchnorm, multistage_backward, plain_backward

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    torch.manual_seed(0)
    model = create_model(backbone, "gem", pretrained=False).to(dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    freeze_batchnorm(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    crit = APLoss(bins=20)

    def step(n: int) -> float:
        labels = torch.arange(n, device=dev) // 4
        loss_fn = lambda d: crit(d, labels)  # noqa: E731
        opt.zero_grad(set_to_none=True)
        if mode == "plain":  # the whole batch in memory, as plain backprop needs
            images = torch.stack([SyntheticImages(n, size)[i] for i in range(n)]).to(dev)
            run = functools.partial(plain_backward, model, images, loss_fn, autocast_dtype=amp)
        else:  # lazy: only the chunk being computed is in memory
            images = SyntheticImages(n, size)
            run = functools.partial(multistage_backward, model, images, loss_fn, chunk_size=chunk,
                                    autocast_dtype=amp)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else _proc_status("VmRSS")
        _reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = torch.cuda.max_memory_allocated() if cuda else _proc_status("VmHWM")
        del images, run
        return dt, cpu, base, peak

    _ = step(min(batch, 2 if mode == "plain" else max(2, chunk)))  # warm-up: kernels, optimiser state
    gc.collect()
    dt, cpu, base, peak = step(batch)
    return {"mode": mode, "batch": batch, "seconds": dt, "images_per_s": batch / dt, "cpu_seconds": cpu,
            "images_per_cpu_s": batch / max(cpu, 1e-9),
            "rest_bytes": base, "peak_bytes": peak, "step_bytes": max(0, peak - base),
            "memory_kind": "cuda max_memory_allocated" if cuda else "peak RSS (VmHWM)"}


# -- the driver ---------------------------------------------------------------------------------

def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * GiB


def _child(mode: str, batch: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps({
        "mode": mode, "batch": batch, "size": args.image_size, "chunk": args.chunk, "backbone": args.backbone,
        "device": args.device, "precision": args.precision, "threads": args.threads})]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        why = "killed (out of memory?)" if p.returncode in (-9, 137) else f"exit {p.returncode}"
        return {"mode": mode, "batch": batch, "error": why, "stderr": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _predict(points: list[dict], batch: int, key: str) -> float | None:
    """Linear fit (through the two largest runs, or proportional to one) of ``key`` at ``batch``."""
    ok = sorted((r for r in points if "error" not in r and "skipped" not in r), key=lambda r: r["batch"])
    if not ok:
        return None
    if len(ok) == 1:
        return ok[0][key] * batch / ok[0]["batch"]
    a, b = ok[-2], ok[-1]
    slope = (b[key] - a[key]) / (b["batch"] - a["batch"])
    return b[key] + slope * (batch - b["batch"])


def measure(args) -> list[dict]:
    rows: list[dict] = []
    avail = _available_bytes(args.device)
    for mode, sizes in (("plain", args.plain), ("multistage", args.multistage)):
        done: list[dict] = []
        for b in sizes:
            pred_t = _predict(done, b, "seconds")
            if pred_t is not None and pred_t > args.max_step_seconds:
                r = {"mode": mode, "batch": b, "skipped": f"predicted step {pred_t:,.0f} s > --max-step-seconds "
                                                          f"{args.max_step_seconds:,.0f}"}
            elif mode == "plain" and (pm := _predict(done, b, "peak_bytes")) is not None and pm > 0.85 * avail:
                r = {"mode": mode, "batch": b, "skipped": f"predicted peak {pm / GiB:,.1f} GiB > 85 % of the "
                                                          f"{avail / GiB:.1f} GiB available"}
            else:
                print(f"{mode} batch {b} ...", file=sys.stderr, flush=True)
                r = _child(mode, b, args)
                if "error" not in r:
                    done.append(r)
                    print(f"  {r['seconds']:.1f} s, {r['images_per_s']:.2f} img/s, peak {r['peak_bytes'] / GiB:.2f} GiB",
                          file=sys.stderr, flush=True)
                else:
                    print(f"  {r['error']}", file=sys.stderr, flush=True)
            rows.append(r)
    return rows


def render(rows: list[dict], args, started: str, wall: float) -> str:
    mem = next((r["memory_kind"] for r in rows if "memory_kind" in r), "peak memory")
    lines = [BEGIN, "## Training step: plain vs multistage backpropagation (`benchmarks/train.py`)", "",
             f"- Command: `.venv/bin/python benchmarks/train.py {' '.join(args.argv)}`".rstrip() + "",
             f"- Machine: {machine_line()}",
             f"- Date: {started}; wall time {wall / 60:.1f} min",
             f"- Model: {args.backbone}-GeM (random weights), {args.image_size}×{args.image_size} px, "
             f"{args.precision}, BatchNorm frozen, AP loss (20 bins, classes of 4) over the whole batch, Adam step; "
             f"multistage chunk = {args.chunk} images, images from a lazy deterministic sequence.",
             f"- Memory: {mem}; step memory = peak − resting size before the step (model, Adam state, "
             "and for plain the input batch).", "",
             "| mode | batch | step (s) | images/s | images per CPU-s | peak (GiB) | step memory (GiB) | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['mode']} | {r['batch']} | – | – | – | – | – | {r.get('skipped') or r.get('error')} |")
        else:
            lines.append(f"| {r['mode']} | {r['batch']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | "
                         f"{r['images_per_cpu_s']:.3f} | "
                         f"{r['peak_bytes'] / GiB:.2f} | {r['step_bytes'] / GiB:.2f} | |")
    ok = {(r["mode"], r["batch"]): r for r in rows if "seconds" in r}
    ms = sorted(b for m, b in ok if m == "multistage")
    pl = sorted(b for m, b in ok if m == "plain")
    lines += ["", "Ratios (same run):", ""]
    if len(ms) >= 2:
        lo, hi = ok[("multistage", ms[0])], ok[("multistage", ms[-1])]
        lines.append(f"- Multistage step memory at batch {ms[-1]} / at batch {ms[0]}: "
                     f"{hi['step_bytes'] / max(lo['step_bytes'], 1):.2f}× for {ms[-1] / ms[0]:.0f}× the images "
                     f"(peak {hi['peak_bytes'] / GiB:.2f} vs {lo['peak_bytes'] / GiB:.2f} GiB): "
                     + ("flat." if hi["step_bytes"] <= 1.25 * lo["step_bytes"] + 0.05 * GiB else "NOT flat."))
    if len(pl) >= 2:
        lo, hi = ok[("plain", pl[0])], ok[("plain", pl[-1])]
        lines.append(f"- Plain step memory at batch {pl[-1]} / at batch {pl[0]}: "
                     f"{hi['step_bytes'] / max(lo['step_bytes'], 1):.2f}× for {pl[-1] / pl[0]:.0f}× the images "
                     f"({hi['step_bytes'] / hi['batch'] / GiB:.2f} GiB per image).")
    common = sorted(set(ms) & set(pl))
    for b in common:
        p, m = ok[("plain", b)], ok[("multistage", b)]
        lines.append(f"- Batch {b}: multistage runs at {m['images_per_s'] / p['images_per_s']:.2f}× the plain "
                     f"throughput ({m['images_per_cpu_s'] / p['images_per_cpu_s']:.2f}× per CPU-second"
                     + ("; it does one extra forward without autograd per image" if m["images_per_s"] < p["images_per_s"]
                        else ", despite one extra forward without autograd per image: small chunks stay cache-friendly "
                             "while plain backprop streams its activations through memory")
                     + f") in {m['step_bytes'] / max(p['step_bytes'], 1):.2f}× its step memory.")
    if pl and ms and not common:
        p, m = ok[("plain", pl[-1])], ok[("multistage", ms[0])]
        lines.append(f"- Multistage at batch {ms[0]} vs plain at batch {pl[-1]} (largest plain run): "
                     f"{m['images_per_s'] / p['images_per_s']:.2f}× the throughput.")
    lines.append(END)
    return "\n".join(lines) + "\n"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--plain", type=_ints, default=_ints("8,16,32,128,512"), help="batch sizes, ascending")
    ap.add_argument("--multistage", type=_ints, default=_ints("32,128,512,1024"), help="batch sizes, ascending")
    ap.add_argument("--chunk", type=int, default=None, help="multistage chunk (default: 4 on CPU, 32 on GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--max-step-seconds", type=float, default=1200.0, help="skip steps predicted to take longer")
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.child:
        c = json.loads(args.child)
        print(json.dumps(run_step(c["mode"], c["batch"], c["size"], c["chunk"], c["backbone"], c["device"],
                                  c["precision"], c["threads"])))
        return 0
    if args.chunk is None:
        args.chunk = 32 if args.device.startswith("cuda") else 4
    args.argv = argv
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    rows = measure(args)
    text = render(rows, args, started, time.perf_counter() - t0)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.write:
        write_section(text, REPO / "BENCHMARKS.md", BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
