"""Extraction speed against the machine's limit: imret (eager and compiled, fp32 and bf16) and the
peers cirtorch and dirtorch, end to end from JPEG files, in the same run as the machine's matrix
product peaks.

ResNet50-GeM at 1024 px on real photos (default 24 from rParis6k-mini), scales 1 and
(1, 1/sqrt2, 1/2). With ``--cirtorch DIR`` the network is built by cirtorch's own
``init_network`` (random weights: no checkpoint is available offline), saved as a cirtorch
checkpoint and imported by ``imret.load_model``, so every row describes the same network and
the imported model resizes scales as cirtorch does; cirtorch's ``extract_vectors`` and dirtorch's
``extract_features`` run unmodified from their source folders with the shims of
``benchmarks/parity.py`` (``PIL.Image.ANTIALIAS``, ``.cuda()`` on a GPU-less machine, dirtorch's
``DB_ROOT``); their rows say "not run" when the folders are not given. dirtorch's network is its
own (``resnet50_rmac``: GeM p = 3 and an FC layer), so its descriptors are not compared.

Per row, the median of ``--reps`` timed runs: images/s (wall clock, decoding included), the ratio
to cirtorch, the network's GFLOP/s achieved (FLOPs counted by ``torch.utils.flop_counter`` on the
actual input sizes of every image and scale) and its share of the matching matrix-product peak,
the smallest cosine to imret's eager fp32 descriptors, and the share of the machine's CPU time the
process got (the machine is shared). The peak of a shared virtual machine drifts by 10-20 % within
minutes, so every timed run sits between two short peak measurements and its share is taken
against their mean (the share of the run's best peak is given beside it). Then the issue's bars
as pass/FAIL, and how much decoding overlaps compute.

    .venv/bin/python benchmarks/extract.py [--cirtorch DIR] [--dirtorch DIR] [--n 24] [--reps 3] [--write] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, cpu_name, machine_line, publish  # noqa: E402
from parity import no_cuda  # noqa: E402  (the peers' .cuda() on a GPU-less machine)

import imret  # noqa: E402
from imret.compiled import inductor_cache_dir  # noqa: E402
from imret.extract import describe_tensors, extract, scale_input  # noqa: E402
from imret.images import image_size_of, load_image, to_tensor  # noqa: E402

BEGIN, END = "<!-- extract:begin -->", "<!-- extract:end -->"
SCALE_SETS = ((1.0,), (1.0, 2 ** -0.5, 0.5))


def one_per_size(paths: list[str]) -> list[str]:
    """The first photo of each pixel size, in order: the warm-up set. oneDNN builds its convolution
    primitives (packed weights, JIT kernels) once per input shape and keeps them (primitive cache),
    so a collection of thousands of photos of a few sizes pays that once per size; warming up on one
    photo only would charge the other sizes' first pass to the 24 timed photos."""
    seen: dict[tuple[int, int], str] = {}
    for p in paths:
        seen.setdefault(image_size_of(p), p)  # upright, as the network sees it
    return list(seen.values())


def has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def matmul_peak(dtype: torch.dtype, threads: int, n: int = 2048, reps: int = 8) -> dict[str, float]:
    """The best GFLOP/s of an ``n x n`` by ``n x n`` product in ``dtype`` over ``reps`` tries, as
    ``torch.mm`` and as a 1 x 1 convolution (oneDNN, channels-last), whichever is faster: ``wall``
    by the clock, ``cpu`` per CPU second times ``threads`` (what the product reaches when it has
    the cores to itself: the machine is shared)."""
    import torch.nn.functional as F

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    x = torch.randn(1, n, 32, n // 32).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1).to(dtype).contiguous(memory_format=torch.channels_last)
    best = {"wall": 0.0, "cpu": 0.0}
    for fn in (lambda: torch.mm(a, b), lambda: F.conv2d(x, w)):
        fn()
        for _ in range(reps):
            _, t, c = timed(fn)
            best["wall"] = max(best["wall"], 2 * n ** 3 / t / 1e9)
            best["cpu"] = max(best["cpu"], 2 * n ** 3 / (c / threads) / 1e9)
    return best


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def repeat(fn, prec: str, reps: int, threads: int):
    """``fn()``'s last output and ``reps`` timed runs, each between two short measurements of the
    matrix-product peak of precision ``prec`` (best of 4; their mean is the run's ``peak``)."""
    runs, out = [], None
    for _ in range(reps):
        before = matmul_peak(DTYPES[prec], threads, reps=4)
        out, t, c = timed(fn)
        after = matmul_peak(DTYPES[prec], threads, reps=4)
        runs.append({"seconds": t, "cpu": c, "peak": (before["wall"] + after["wall"]) / 2,
                     "cpu_peak": (before["cpu"] + after["cpu"]) / 2})
    return out, runs


def summarise(runs: list[dict], flops: float, threads: int) -> dict[str, float]:
    """The median wall and CPU seconds of ``runs`` (:func:`repeat`) and the median over the runs of
    their share of the peak measured beside them, by the clock and per CPU second."""
    def median(values) -> float:
        return float(np.median(list(values)))

    return {"seconds": median(u["seconds"] for u in runs), "cpu": median(u["cpu"] for u in runs),
            "peak_share": median(flops / u["seconds"] / 1e9 / u["peak"] for u in runs),
            "cpu_peak_share": median(flops / (u["cpu"] / threads) / 1e9 / u["cpu_peak"] for u in runs)}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the peers' loader workers)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(fn):
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, time.perf_counter() - t0, cpu_seconds() - c0


def network_flops(model, paths, image_size: int, scales, mode: str) -> float:
    """FLOPs of describing ``paths`` at ``scales``: the network counted on meta tensors of each
    image's decoded size, resized as ``mode`` resizes (no arithmetic is done)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta").eval()
    cache: dict[tuple[int, int], int] = {}
    total = 0
    for p in paths:
        w, h = load_image(p, image_size=image_size).size
        for s in scales:
            xs = scale_input(torch.empty(1, 3, h, w, device="meta"), s, "imret" if mode == "dirtorch" else mode)
            key = tuple(xs.shape[-2:])
            if key not in cache:
                with FlopCounterMode(display=False) as fc, torch.no_grad():
                    meta(xs)
                cache[key] = fc.get_total_flops()
            total += cache[key]
    return float(total)


def cirtorch_net(src: Path):
    sys.path.insert(0, str(src))
    from PIL import Image

    if not hasattr(Image, "ANTIALIAS"):
        Image.ANTIALIAS = Image.LANCZOS  # removed in Pillow 10; LANCZOS is what it named
    from cirtorch.networks.imageretrievalnet import init_network

    torch.manual_seed(0)
    net = init_network({"architecture": "resnet50", "pooling": "gem", "whitening": False, "pretrained": False})
    return net.eval()


def run_cirtorch(net, paths, image_size: int, scales):
    from torchvision import transforms

    from cirtorch.networks.imageretrievalnet import extract_vectors

    meta = net.meta
    msp = net.pool.p.item() if len(scales) > 1 else 1  # examples/test.py: GeM p without whitening
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=meta["mean"], std=meta["std"])])
    with no_cuda(), contextlib.redirect_stdout(open(os.devnull, "w")):
        return extract_vectors(net, paths, image_size, transform, ms=list(scales), msp=msp).numpy().T


def dirtorch_runner(src: Path, work: Path):
    os.environ.setdefault("DB_ROOT", str(work / "db_root"))  # read at import by its dataset modules
    sys.path.insert(0, str(src))
    import dirtorch.nets as nets
    from dirtorch import extract_features as ef
    from dirtorch.datasets.generic import ImageList

    torch.manual_seed(0)
    options = {"arch": "resnet50_rmac", "out_dim": 2048, "pooling": "gem", "gemp": 3}
    net = nets.create_model(pretrained="", **options)
    ckpt = work / "dirtorch.pt"
    torch.save({"model_options": options, "state_dict": net.state_dict(), "preprocess": dict(net.preprocess)}, ckpt)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        net = ef.load_model(str(ckpt), False)
    net.pca = None

    def run(paths, scales):
        db = ImageList(None, root="", imgs=list(paths))
        trfs = ["" if s == 1 else f"Scale({s!r})" for s in scales]
        out = work / "dirtorch_feats.npy"
        with contextlib.redirect_stdout(open(os.devnull, "w")), contextlib.redirect_stderr(open(os.devnull, "w")):
            ef.extract_features(db, net, trfs, pooling="gem", gemp=3, whiten=None, threads=2, batch_size=1,
                                output=str(out))
        return np.load(out)

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cirtorch", type=Path, help="cnnimageretrieval-pytorch source folder (holds cirtorch/)")
    ap.add_argument("--dirtorch", type=Path, help="deep-image-retrieval source folder (holds dirtorch/)")
    ap.add_argument("--images", type=Path, default=SHARED / "data" / "rparis6k-mini" / "jpg")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3, help="timed runs per row, each between two peak measurements "
                                                        "(default 3; rows report the median)")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--workers", type=int, default=2, help="imret's decoding threads (default 2)")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="glibc allocator: tuned by imret.malloc.tune_malloc as the imret command does at start "
                         "(default; it applies to every row, the peers' included), or glibc's defaults")
    ap.add_argument("--fixed-after", type=int, default=3,
                    help="imret.compiled.FIXED_AFTER for this run (library default 32): a shape met this many "
                         "times gets its fixed-shape graph; the compiled rows warm up with this many passes over "
                         "the photos, so that those graphs compile before the timed runs")
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    imret.compiled.FIXED_AFTER = args.fixed_after
    from imret.malloc import tune_malloc

    allocator = tune_malloc().describe() if args.malloc == "tuned" else "glibc malloc defaults"
    torch.set_num_threads(args.threads)
    paths = sorted(str(p) for p in args.images.glob("*.jpg"))[: args.n]
    if len(paths) < args.n:
        raise SystemExit(f"need {args.n} .jpg images in {args.images}, found {len(paths)}")
    n = len(paths)
    warm = one_per_size(paths)
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    amx = has_amx()
    bf16_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    peaks = {"fp32": matmul_peak(torch.float32, args.threads)}
    if bf16_ok:
        peaks["bf16"] = matmul_peak(torch.bfloat16, args.threads)
    peak = {k: v["wall"] for k, v in peaks.items()}
    cpu_peak = {k: v["cpu"] for k, v in peaks.items()}
    beside: dict[str, list[float]] = {k: [] for k in peaks}  # the peaks measured beside the timed runs
    print(f"matmul peaks (2048^3, {args.threads} threads): {peaks}", flush=True)

    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    cirnet = None
    if args.cirtorch:
        cirnet = cirtorch_net(args.cirtorch)
        ckpt = work / "cirtorch.pth"
        torch.save({"meta": dict(cirnet.meta), "state_dict": cirnet.state_dict()}, ckpt)
        model = imret.load_model(ckpt)
        net_name = "ResNet50-GeM built by cirtorch (random weights), imported"
    else:
        torch.manual_seed(0)
        model = imret.create_model("resnet50", "gem", pretrained=False)
        net_name = "ResNet50-GeM (random weights)"
    dirrun = dirtorch_runner(args.dirtorch, work) if args.dirtorch else None
    mode = model.spec.multiscale

    rows: list[dict] = []
    decode_overlap: list[dict] = []
    compile_s: dict[str, float] = {}
    for scales in SCALE_SETS:
        label = ", ".join(f"{s:.3g}" for s in scales)
        flops = network_flops(model, paths, args.image_size, scales, mode)
        group: list[dict] = []

        def add(path, prec, runs, cos=None, compiled=None):
            m = summarise(runs, flops, args.threads)
            secs = m["seconds"]
            r = {"scales": label, "path": path, "precision": prec, "seconds": secs, "img_s": n / secs,
                 "img_s_range": [n / max(u["seconds"] for u in runs), n / min(u["seconds"] for u in runs)],
                 "gflop_s": flops / secs / 1e9, "peak_share": m["peak_share"],
                 "cpu_gflop_s": flops / (m["cpu"] / args.threads) / 1e9, "cpu_peak_share": m["cpu_peak_share"],
                 "cos_min": cos, "cpu_share": sum(u["cpu"] for u in runs) / (sum(u["seconds"] for u in runs)
                                                                              * (os.cpu_count() or 1)),
                 "compiled": compiled, "runs": runs}
            group.append(r)
            beside[prec].extend(u["peak"] for u in runs)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)

        peer_ref = {}
        if cirnet is not None:
            run_cirtorch(cirnet, warm, args.image_size, scales)  # warm-up
            peer_ref["cirtorch"], runs = repeat(lambda: run_cirtorch(cirnet, paths, args.image_size, scales), "fp32",
                                                args.reps, args.threads)
            add("cirtorch `extract_vectors`", "fp32", runs)
        else:
            group.append({"scales": label, "path": "cirtorch `extract_vectors`", "not_run": True})
        if dirrun is not None:
            dirrun(warm, scales)  # warm-up
            _, runs = repeat(lambda: dirrun(paths, scales), "fp32", args.reps, args.threads)
            add("dirtorch `extract_features`", "fp32", runs)
        else:
            group.append({"scales": label, "path": "dirtorch `extract_features`", "not_run": True})

        ref = None
        for prec, comp in (("fp32", "off"), ("bf16", "off"), ("fp32", "on"), ("bf16", "on")):
            if prec == "bf16" and not bf16_ok:
                continue
            kw = dict(scales=scales, image_size=args.image_size, workers=args.workers, precision=prec, compile=comp,
                      on_error="raise")
            if comp == "on" and prec not in compile_s:  # one dynamic-shape graph serves every size and scale
                _, compile_s[prec], _ = timed(lambda: extract(model, paths[:1], **kw))
            extract(model, warm, **kw)  # warm-up
            if comp == "on":  # and passes over the photos until every size was met --fixed-after times: the
                for _ in range(args.fixed_after):  # fixed-shape graphs (MAX_FIXED at most) compile here, not in a timed run
                    extract(model, paths, **kw)
            res, runs = repeat(lambda: extract(model, paths, **kw), prec, args.reps, args.threads)
            if ref is None:
                ref = res.descriptors
                if "cirtorch" in peer_ref:
                    group[0]["cos_min"] = float((peer_ref["cirtorch"] * ref).sum(1).min())
            name = f"imret {prec}, " + ("compiled" if comp == "on" else "eager")
            add(name, prec, runs, float((res.descriptors * ref).sum(1).min()), res.compiled)
            if comp == "on" and not res.compiled:
                print(f"  not compiled: {res.compile_note}", flush=True)

        # decoding overlapped with compute: decoding alone; the fastest path's network alone on decoded tensors
        # and end to end, back to back in each round (compared within a round: this VM drifts between minutes)
        prec = "bf16" if bf16_ok else "fp32"
        tensors, t_dec, _ = timed(lambda: [to_tensor(load_image(p, image_size=args.image_size), model.mean, model.std)
                                           for p in paths])
        kw = dict(scales=scales, image_size=args.image_size, workers=args.workers, precision=prec, compile="on",
                  on_error="raise")
        net_runs, e2e_runs = [], []
        for _ in range(args.reps):
            net_runs += repeat(lambda: describe_tensors(model, tensors, scales=scales, precision=prec, compile="on"),
                               prec, 1, args.threads)[1]
            e2e_runs += repeat(lambda: extract(model, paths, **kw), prec, 1, args.threads)[1]
        net, e2e = summarise(net_runs, flops, args.threads), summarise(e2e_runs, flops, args.threads)
        decode_overlap.append({"scales": label, "precision": prec, "decode_s": t_dec, "network_s": net["seconds"],
                               "network_cpu_share": net["cpu"] / (net["seconds"] * (os.cpu_count() or 1)),
                               "network_peak_share": net["peak_share"], "end_to_end_s": e2e["seconds"],
                               "end_to_end_cpu_share": e2e["cpu"] / (e2e["seconds"] * (os.cpu_count() or 1)),
                               "ratio": float(np.median([e["seconds"] / u["seconds"]
                                                         for e, u in zip(e2e_runs, net_runs)]))})
        print(decode_overlap[-1], flush=True)
        rows.extend(group)
    tmp.cleanup()
    load1 = os.getloadavg()
    total_s = time.perf_counter() - t_start

    best_peak = {k: max([peak[k], *beside[k]]) for k in peak}  # by the clock: at the start or beside a row
    for r in rows:
        if not r.get("not_run"):  # against the best peak of the whole run, known only now
            r["run_peak_share"] = r["gflop_s"] / best_peak[r["precision"]]

    def row_of(scales_label, path):
        return next((r for r in rows if r["scales"] == scales_label and r["path"] == path and not r.get("not_run")), None)

    bars = []
    for scales, (k32, k16) in zip(SCALE_SETS, ((2.0, 10.0), (1.8, 8.0))):
        label = ", ".join(f"{s:.3g}" for s in scales)
        cir = row_of(label, "cirtorch `extract_vectors`")
        for prec, k, cos_bar in (("fp32", k32, 0.9999), ("bf16", k16, 0.999)):
            r = row_of(label, f"imret {prec}, compiled")
            what = f"scales {label}: imret {prec} compiled >= {k:g}x cirtorch at cos >= {cos_bar} (AMX bar)"
            if r is None or cir is None:
                bars.append((what, "not run", ""))
                continue
            ratio = r["img_s"] / cir["img_s"]
            ok = ratio >= k and r["cos_min"] >= cos_bar
            bars.append((what, "pass" if ok else "FAIL", f"{ratio:.2f}x, cos {r['cos_min']:.6f}"
                         + ("" if amx else "; this CPU has no AMX, so this bar does not apply to it")))
        r = row_of(label, "imret bf16, compiled")
        if r is not None:
            ok = r["peak_share"] >= 0.8
            bars.append((f"scales {label}: imret bf16 compiled >= 80 % of the bf16 matmul peak (bar without AMX)",
                         "pass" if ok else "FAIL",
                         f"{100 * r['peak_share']:.0f} % by the clock of the peak measured beside it (median of "
                         f"{len(r['runs'])} runs, {r['gflop_s']:.0f} GFLOP/s); per CPU second "
                         f"{100 * r['cpu_peak_share']:.0f} %; {100 * r['run_peak_share']:.0f} % of the run's best "
                         f"peak ({best_peak['bf16']:.0f})"
                         + ("; this CPU has AMX: the bars above apply" if amx else "")))

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    table = ["| scales | path | images/s (min-max) | × cirtorch | GFLOP/s | % of the peak beside it | % of the run's best "
             "peak | GFLOP per CPU s × threads | % of that peak | cos min to eager fp32 | CPU share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("not_run"):
            table.append(f"| {r['scales']} | {r['path']} | not run | | | | | | | | |")
            continue
        cir = row_of(r["scales"], "cirtorch `extract_vectors`")
        ratio = f"{r['img_s'] / cir['img_s']:.2f}" if cir else "n/a"
        lo, hi = r["img_s_range"]
        table.append(f"| {r['scales']} | {r['path']} | {r['img_s']:.3f} ({lo:.3f}-{hi:.3f}) | {ratio} | "
                     f"{r['gflop_s']:.0f} | {100 * r['peak_share']:.0f} | {100 * r['run_peak_share']:.0f} | "
                     f"{r['cpu_gflop_s']:.0f} | {100 * r['cpu_peak_share']:.0f} | {fmt(r['cos_min'], '.7f')} | "
                     f"{100 * r['cpu_share']:.0f} % |")
    overlap = [f"| {d['scales']} | {d['precision']} | {d['decode_s']:.2f} | {d['network_s']:.2f} "
               f"({100 * d['network_cpu_share']:.0f} %) | {100 * d['network_peak_share']:.0f} | {d['end_to_end_s']:.2f} ({100 * d['end_to_end_cpu_share']:.0f} %) | "
               f"{d['ratio']:.3f} | {(d['decode_s'] + d['network_s']) / d['network_s']:.3f} |"
               for d in decode_overlap]
    peak_text = ", ".join(f"{k} {peak[k]:.0f} GFLOP/s by the clock, {cpu_peak[k]:.0f} per CPU second × threads"
                          for k in peak)
    beside_text = ", ".join(f"{k} {min(v):.0f}-{max(v):.0f} (median {np.median(v):.0f}) GFLOP/s over {len(v)} runs"
                            for k, v in beside.items() if v)
    text = "\n".join([
        BEGIN,
        f"## Extraction speed: `benchmarks/extract.py` ({datetime.date.today()})",
        "",
        f"Command: `python benchmarks/extract.py --cirtorch PEERS/cnnimageretrieval-pytorch --dirtorch "
        f"PEERS/deep-image-retrieval --n {n}{'' if args.reps == 3 else f' --reps {args.reps}'}"
        f"{'' if args.malloc == 'tuned' else ' --malloc default'} --write`. "
        f"Machine: {cpu_name()} (lscpu), "
        f"{'AMX' if amx else 'no AMX (amx_bf16 absent from the CPU flags)'}; {machine_line()}; "
        f"{args.threads} torch threads, {args.workers} decoding threads; allocator for every row: {allocator} "
        "(`imret.malloc`, what the `imret` command sets at start). **The machine is shared** with other "
        f"jobs: load average {load0[0]:.1f} at the start and {load1[0]:.1f} at the end of this {total_s / 60:.0f}-minute "
        "run; the *CPU share* column is the CPU time this process (and its children) got over the wall time of "
        "all cores, so rows that got less than the others are slowed by the neighbours, not by their code.",
        "",
        f"Matrix-product peaks measured in the same run (2048³, `torch.mm` or a 1 × 1 oneDNN convolution, whichever "
        f"is faster, best of 8) at the start: **{peak_text}**. The second figure divides by the CPU time the process "
        "got, so it reads what the code reaches on cores of its own; the rows give both. The peak of this shared "
        f"virtual machine drifts, so every one of the {args.reps} timed runs of a row sits between two short peak "
        "measurements (best of 4 each) and is read against their mean; the mean of the two ranged over "
        f"{beside_text}. A row gives the median of its runs: images/s (the slowest and fastest run in brackets), "
        "its share of the peak measured beside it, and, stricter, of the best peak measured in the whole run.",
        "",
        f"{n} rParis6k-mini photos (1024 × 768 or 768 × 1024, a few other shapes), 1024 px, {net_name}. "
        f"End to end from the JPEG files, decoding included, warm-up excluded (every row warms up on one photo "
        f"of each of the {len(warm)} pixel sizes: oneDNN builds its primitives once per input shape, which a large "
        f"collection of a few sizes pays once; the compiled rows then run the photos {args.fixed_after} more times "
        f"(`--fixed-after`; the library waits for 32 calls of a size), in which the first sizes met that often, "
        "at most `MAX_FIXED`, get graphs compiled for their fixed shape, as a long run's recurring sizes do; "
        "a run repeating 24 photos makes every size recur). GFLOP/s: the network's FLOPs "
        "(`torch.utils.flop_counter` on every image's input size at every scale) over the wall time; "
        "% of the peak: against the matrix-product peak of the row's precision. *cos min*: the smallest cosine "
        "over the images to imret's eager fp32 descriptors of the same network (cirtorch's own: the same "
        "weights, imported; dirtorch runs its own `resnet50_rmac`, so no cosine). *Compiled*: `compile='on'` "
        "(`imret extract --compile on`; `auto` compiles long runs: see `imret.compiled`): `torch.compile` with freezing, "
        f"dynamic shapes: one graph for all sizes and scales, compiled in {', '.join(f'{k} {v:.0f} s' for k, v in compile_s.items())} "
        f"(wall, shared machine; inductor's disk cache: `{inductor_cache_dir()}`).",
        "",
        *table,
        "",
        "Bars of issue 16 (end to end, decoding included):",
        "",
        *[f"- {what}: **{verdict}**" + (f" ({detail})" if detail else "") for what, verdict, detail in bars],
        "",
        "Decoding overlapped with compute: the decoding alone (one thread, `load_image` + `to_tensor`), the "
        "compiled row's network alone on tensors decoded beforehand (`describe_tensors`, with its share of the peak "
        "measured beside it) and the compiled row end to end (decoding in 2 threads while the network runs), timed "
        "back to back in each of as many rounds as a row has runs: medians, CPU share in brackets, and the median "
        "of the rounds' ratios (comparing runs minutes apart on a shared VM misleads). With decoding fully hidden "
        "the end-to-end time equals the network's (ratio 1); done one after the other it would be the last column.",
        "",
        "| scales | precision | decode alone (s) | network alone (s) | network alone, % of the peak beside it | "
        "end to end (s) | end to end ÷ network | serial ÷ network |",
        "|---|---|---|---|---|---|---|---|",
        *overlap,
        END,
    ])
    publish(text, BEGIN, END, write=args.write, json_path=args.json,
            data={"peaks": peaks, "rows": rows, "bars": bars, "decode": decode_overlap, "compile_s": compile_s,
                  "load": [load0, load1], "amx": amx, "allocator": allocator})
    return 0


if __name__ == "__main__":
    sys.exit(main())
