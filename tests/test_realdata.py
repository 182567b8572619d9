"""Real photos: rParis6k-mini with the shared ImageNet MobileNetV2, through `imret eval`.

Skipped with a reason when ../shared (IMRET_SHARED) is absent. Figures are recorded in
BENCHMARKS.md; here we check each pooling beats the random ranking by a wide margin.
"""

import json

import pytest

from imret.cli import main

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


@pytest.mark.parametrize("pool", ["gem", "mac", "spoc"])
def test_paris_mini_eval_beats_random(pool, paris_mini, mobilenet_weights, tmp_path):
    out = tmp_path / pool
    rc = main(["eval", str(paris_mini), "--model", "mobilenetv2_100.coral", "--weights", str(mobilenet_weights),
               "--pool", pool, "--image-size", "1024", "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["skipped"] == []
    r, base = res["result"], res["baseline_random"]
    for protocol in ("easy", "medium", "hard"):
        assert r[protocol]["map"] > base[protocol]["map"] + 0.15, (protocol, r[protocol]["map"], base[protocol]["map"])
    assert r["medium"]["map"] > 0.5
