"""Decoding cost per photo on the CPU, one thread: ``imret.images.load_image`` (JPEG decode, EXIF
orientation, resize to 1024 px) and ``imret.images.to_tensor`` (uint8 RGB to the normalised float32
``(3, H, W)`` input), against the whole-array conversion ``to_tensor`` used before (convert the
whole image to float, scale, subtract, transpose-copy) measured in the same run, alternating, on
real photos (default 24 from rParis6k-mini). The outputs are compared bit for bit.

    .venv/bin/python benchmarks/decode.py [--n 24] [--rounds 7] [--write] [--json F]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, cpu_name, machine_line, publish  # noqa: E402

from imret.images import load_image, to_tensor  # noqa: E402
from imret.models.backbones import IMAGENET_MEAN as MEAN  # noqa: E402
from imret.models.backbones import IMAGENET_STD as STD  # noqa: E402

BEGIN, END = "<!-- decode:begin -->", "<!-- decode:end -->"


def whole_array(img, mean, std) -> torch.Tensor:
    """The conversion before: the whole (H, W, 3) image to float32, scaled, shifted, transposed."""
    std_arr, mean_arr = np.asarray(std, dtype=np.float64), np.asarray(mean, dtype=np.float64)
    pixels = np.asarray(img, dtype=np.float32)
    pixels *= (1.0 / (255.0 * std_arr)).astype(np.float32)
    pixels -= (mean_arr / std_arr).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=SHARED / "data" / "rparis6k-mini" / "jpg")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    paths = sorted(str(p) for p in args.images.glob("*.jpg"))[: args.n]
    if len(paths) < args.n:
        raise SystemExit(f"need {args.n} .jpg images in {args.images}, found {len(paths)}")
    imgs = [load_image(p, image_size=args.image_size) for p in paths]
    identical = all(torch.equal(to_tensor(i, MEAN, STD), whole_array(i, MEAN, STD)) for i in imgs)
    steps = {
        "load_image": lambda: [load_image(p, image_size=args.image_size) for p in paths],
        "to_tensor": lambda: [to_tensor(i, MEAN, STD) for i in imgs],
        "whole-array conversion (before)": lambda: [whole_array(i, MEAN, STD) for i in imgs],
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    ratios = []
    for r in range(args.rounds):
        for k in (steps if r % 2 == 0 else list(steps)[::-1]):
            t0 = time.perf_counter()
            steps[k]()
            times[k].append((time.perf_counter() - t0) / len(paths))
        ratios.append(times["whole-array conversion (before)"][-1] / times["to_tensor"][-1])
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    rows = [f"| {k} | {ms[k]:.2f} | {1000 * min(v):.2f}-{1000 * max(v):.2f} |" for k, v in times.items()]
    text = "\n".join([
        BEGIN,
        f"## Decoding cost per photo: `benchmarks/decode.py` ({datetime.date.today()})",
        "",
        f"Command: `python benchmarks/decode.py --n {len(paths)} --rounds {args.rounds} --write`. Machine: {cpu_name()} "
        f"(lscpu); {machine_line()}; one thread. {len(paths)} rParis6k-mini photos at {args.image_size} px; the "
        "steps alternate within each round (order reversed every other round); milliseconds per photo, median and "
        "range over the rounds.",
        "",
        "| step | ms per photo (median) | range |",
        "|---|---|---|",
        *rows,
        "",
        f"`to_tensor` over the whole-array conversion it replaced: **{statistics.median(ratios):.2f}x faster** "
        f"(median of the rounds' ratios); outputs bit-identical: **{identical}**. Decoding a photo ready for the "
        f"network (`load_image` + `to_tensor`) now takes {ms['load_image'] + ms['to_tensor']:.1f} ms against "
        f"{ms['load_image'] + ms['whole-array conversion (before)']:.1f} ms before.",
        END,
    ])
    publish(text, BEGIN, END, write=args.write, json_path=args.json,
            data={"ms": ms, "times": times, "ratios": ratios, "identical": identical})
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
