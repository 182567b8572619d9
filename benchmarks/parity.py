"""Multi-scale parity with the peers: imret's descriptors of an imported cirtorch / dirtorch
checkpoint against those projects' own extraction code, run from their source folders.

For each peer a network of its architecture is built by the peer's own code (random weights
unless a checkpoint is given: none is available offline here), saved as that peer's
checkpoint, imported by ``imret.load_model`` and described by ``imret.extract`` at the same
scales. The peer side runs unmodified:

- cirtorch (cnnimageretrieval-pytorch): ``init_network``, then ``extract_vectors(net, images,
  image_size, transform, ms=scales, msp=...)`` with ``msp`` set as its ``examples/test.py``
  does (the GeM p without whitening or regional pooling, else 1). Shims, because the code
  predates today's libraries and needs a GPU: ``PIL.Image.ANTIALIAS`` (removed in Pillow 10) is
  LANCZOS, its alias before; ``.cuda()`` returns the object itself (this machine has no GPU).
- dirtorch (deep-image-retrieval): ``nets.create_model``, a checkpoint read back by
  ``extract_features.load_model``, then ``extract_features.extract_features(ImageList,
  net, trfs, pooling="gem", gemp=3)`` with one transform chain per scale (``""`` at 1,
  ``"Scale(s)"`` otherwise), its own command-line defaults. Shim: ``DB_ROOT`` set to an empty
  folder (its dataset modules read it at import).

The photos are 1024 px on their long side, so ``image_size=1024`` leaves them as decoded on
every side. Figures per network: the cosine of each image's imret descriptor with the peer's
(min and median), the same after centring both sets by the peer's mean descriptor (random
weights put most of a descriptor in a direction shared by all images; centring measures the
part that tells images apart), once with the import's default mode (the peer's) and once with
``multiscale="imret"`` (what imret did before).

    .venv/bin/python benchmarks/parity.py --cirtorch DIR --dirtorch DIR [--images DIR] [--n 24] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, cpu_name, machine_line, publish  # noqa: E402

import imret  # noqa: E402
from imret.extract import extract  # noqa: E402

BEGIN, END = "<!-- parity:begin -->", "<!-- parity:end -->"
SCALES = (1.0, 2 ** -0.5, 0.5)


def cosines(a: np.ndarray, b: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """Row-wise cosine of ``a`` and ``b``, after subtracting ``centre`` from both when given."""
    if centre is not None:
        a, b = a - centre, b - centre
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def compare(peer: np.ndarray, ours: np.ndarray) -> dict:
    raw, cen = cosines(peer, ours), cosines(peer, ours, peer.mean(0))
    return {"cos_min": float(raw.min()), "cos_median": float(np.median(raw)),
            "centred_min": float(cen.min()), "centred_median": float(np.median(cen)),
            "max_abs": float(np.abs(peer - ours).max())}


@contextlib.contextmanager
def no_cuda():
    """``Tensor.cuda`` / ``Module.cuda`` return the object itself (the peers hard-code ``.cuda()``)."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def imret_side(ckpt: Path, paths: list[str], image_size: int, scales) -> dict[str, np.ndarray]:
    model = imret.load_model(ckpt)
    out = {"mode": model.spec.multiscale}
    for mode in (model.spec.multiscale, "imret"):
        t0 = time.perf_counter()
        out[mode] = extract(model, paths, scales=scales, image_size=image_size, on_error="raise", workers=1,
                            multiscale=mode).descriptors
        out[mode + "_s"] = time.perf_counter() - t0
    return out


def run_cirtorch(src: Path, paths, image_size, scales, whitening: bool, work: Path, arch: str) -> dict:
    sys.path.insert(0, str(src))
    from PIL import Image

    if not hasattr(Image, "ANTIALIAS"):
        Image.ANTIALIAS = Image.LANCZOS  # removed in Pillow 10; LANCZOS is what it named
    from torchvision import transforms

    from cirtorch.networks.imageretrievalnet import extract_vectors, init_network

    torch.manual_seed(0)
    net = init_network({"architecture": arch, "pooling": "gem", "whitening": whitening, "pretrained": False})
    net.eval()
    # examples/test.py: msp is the GeM p for GeM without regional pooling or whitening, else 1
    meta = net.meta
    msp = net.pool.p.item() if (len(scales) > 1 and meta["pooling"] == "gem" and not meta["regional"]
                                and not meta["whitening"]) else 1
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=meta["mean"], std=meta["std"])])
    t0 = time.perf_counter()
    with no_cuda():
        peer = extract_vectors(net, paths, image_size, transform, ms=list(scales), msp=msp).numpy().T
    peer_s = time.perf_counter() - t0
    ckpt = work / f"cirtorch_{'whiten' if whitening else 'plain'}.pth"
    torch.save({"meta": dict(meta), "state_dict": net.state_dict()}, ckpt)
    ours = imret_side(ckpt, paths, image_size, scales)
    return {"net": f"{arch}-GeM{' + whitening' if whitening else ''}", "msp": float(msp), "peer_s": peer_s,
            "peer": peer, **ours}


def run_dirtorch(src: Path, paths, image_size, scales, work: Path, arch: str) -> dict:
    os.environ.setdefault("DB_ROOT", str(work / "db_root"))  # read at import by its dataset modules
    sys.path.insert(0, str(src))
    import dirtorch.nets as nets
    from dirtorch import extract_features as ef
    from dirtorch.datasets.generic import ImageList

    torch.manual_seed(0)
    options = {"arch": f"{arch}_rmac", "out_dim": 512 if arch in ("resnet18", "resnet34") else 2048, "pooling": "gem",
               "gemp": 3}
    net = nets.create_model(pretrained="", **options)
    ckpt = work / "dirtorch.pt"
    torch.save({"model_options": options, "state_dict": net.state_dict(), "preprocess": dict(net.preprocess)}, ckpt)
    net = ef.load_model(str(ckpt), False)
    net.pca = None
    db = ImageList(None, root="", imgs=list(paths))
    trfs = ["" if s == 1 else f"Scale({s!r})" for s in scales]
    out = work / "dirtorch_feats.npy"
    t0 = time.perf_counter()
    ef.extract_features(db, net, trfs, pooling="gem", gemp=3, whiten=None, threads=2, batch_size=1,
                        output=str(out))
    peer_s = time.perf_counter() - t0
    ours = imret_side(ckpt, paths, image_size, scales)
    return {"net": f"{arch}-GeM + FC ({arch}_rmac)", "msp": 3.0, "peer_s": peer_s, "peer": np.load(out), **ours}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cirtorch", type=Path, help="cnnimageretrieval-pytorch source folder (holds cirtorch/)")
    ap.add_argument("--dirtorch", type=Path, help="deep-image-retrieval source folder (holds dirtorch/)")
    ap.add_argument("--images", type=Path, default=SHARED / "data" / "rparis6k-mini" / "jpg")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--arch", default="resnet50", help="ResNet of both peers' networks (default resnet50)")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = sorted(str(p) for p in args.images.glob("*.jpg"))[: args.n]
    if not paths:
        raise SystemExit(f"no .jpg images in {args.images}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.cirtorch:
            for whitening in (False, True):
                runs.append(("cirtorch", run_cirtorch(args.cirtorch, paths, args.image_size, SCALES, whitening, work, args.arch)))
        if args.dirtorch:
            runs.append(("dirtorch", run_dirtorch(args.dirtorch, paths, args.image_size, SCALES, work, args.arch)))
    rows, data = [], []
    for peer_name, r in runs:
        for mode in (r["mode"], "imret"):
            c = compare(r["peer"], r[mode])
            data.append({"peer": peer_name, "net": r["net"], "multiscale": mode, **c, "imret_s": r[mode + "_s"],
                         "peer_s": r["peer_s"]})
            label = f"`{mode}`" + (" (import default)" if mode == r["mode"] else " (before)")
            rows.append(f"| {peer_name} | {r['net']} | {label} | {c['centred_min']:.7f} | {c['centred_median']:.7f} "
                        f"| {c['cos_min']:.7f} | {c['max_abs']:.1e} |")
    amx = "amx" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    scales = ", ".join(f"{s:.4g}" for s in SCALES)
    text = "\n".join([
        BEGIN,
        f"## Multi-scale parity with cirtorch and dirtorch (`benchmarks/parity.py`, {datetime.date(2026, 12, 7)})",
        "",
        f"Command: `python benchmarks/parity.py --cirtorch PEERS/cnnimageretrieval-pytorch --dirtorch "
        f"PEERS/deep-image-retrieval --arch {args.arch} --n {len(paths)} --write` (the peers' sources at their GitHub heads: cirtorch "
        f"1e66a41, dirtorch 610247f). Machine: {cpu_name()}, {'AMX' if amx else 'no AMX'}; {machine_line()}.",
        "",
        f"{len(paths)} rParis6k-mini photos at 1024 px, scales {scales}. The networks are built by the peers' own "
        "code with **random weights** (no real cirtorch or dirtorch checkpoint is available offline), saved in "
        "the peer's checkpoint format and imported by `imret.load_model`; each peer's extraction ran unmodified "
        "from its source folder (shims only for `PIL.Image.ANTIALIAS`, `.cuda()` on this GPU-less machine and "
        "dirtorch's `DB_ROOT`). Cosine of each image's imret descriptor with the peer's; *centred*: after "
        "subtracting the peer's mean descriptor from both (random weights leave most of a descriptor in a "
        "direction all images share). Bar: centred cosine >= 0.9999.",
        "",
        "| peer | network | imret multiscale | centred cos min | centred cos median | cos min | max abs diff |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "`cirtorch` resizes with `F.interpolate(scale_factor=s)` (bilinear, no antialiasing, floor sizes) as "
        "its `extract_ms`; `dirtorch` resizes the 8-bit image with Pillow's bilinear filter to "
        "`int(0.5 + s * side)` (its `Scale(s)`) and pools scales by its sign-preserving power mean (p = 3, "
        "clamp 1e-6), then L2. `imret` (before) antialiases, rounds sizes and takes the arithmetic mean "
        "whenever a whitening layer is present.",
        END,
    ])
    publish(text, BEGIN, END, write=args.write, json_path=args.json, data=data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
