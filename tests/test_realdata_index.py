"""Real photos end to end: `imret index build` over rParis6k-mini, then `imret search` with query crops.

The store holds the 238 database photos (the 12 query photos are kept out, as in the
benchmark protocol); each query is searched with its official bounding box.
"""

import json
import os

import numpy as np
import pytest

from imret.cli import main
from imret.evaluation import evaluate_revisitop, load_revisitop
from imret.index.store import Store

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_index_build_then_search_with_crop_finds_the_landmark(paris_mini, mobilenet_weights, tmp_path, capsys):
    gt = load_revisitop(paris_mini / "gnd_rparis6k-mini.pkl")
    jpg = paris_mini / "jpg"
    db = [str(p) for p in gt.db_paths(jpg)]
    listing = tmp_path / "db.txt"
    listing.write_text("\n".join(db) + "\n")
    store = tmp_path / "paris"
    rc = main(["index", "build", "--list", str(listing), "--out", str(store), "--model", "mobilenetv2_100.coral",
               "--weights", str(mobilenet_weights), "--no-progress"])
    assert rc == 0
    capsys.readouterr()

    # the CLI, one query with its crop: the right landmark comes first
    q = gt.qimlist.index("paris_eiffel_000266")
    box = ",".join(f"{v:g}" for v in gt.bbx[q])
    assert main(["search", str(store), str(jpg / "paris_eiffel_000266.jpg"), "--bbox", box, "-k", "5",
                 "--format", "json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)[0]["results"]
    top = os.path.basename(res[0]["path"])[:-4]
    assert top.startswith("paris_eiffel_")
    positives = set(gt.easy[q]) | set(gt.hard[q])
    assert gt.imlist.index(top) in positives

    # every query through the Python API: the full ranking scores like `imret eval`
    with Store.open(store) as st:
        assert len(st) == len(db) and st.verify() == []
        hits = st.search([str(p) for p in gt.query_paths(jpg)], bboxes=list(gt.bbx), k=len(db))
    where = {os.path.abspath(p): i for i, p in enumerate(db)}
    ranks = np.array([[where[h.path] for h in row] for row in hits])
    result = evaluate_revisitop(ranks, gt)
    assert result.protocol("medium").map > 0.6
    first_right = [ranks[i, 0] in set(gt.easy[i]) | set(gt.hard[i]) | set(gt.junk[i]) for i in range(gt.n_queries)]
    assert sum(first_right) >= 10, first_right
