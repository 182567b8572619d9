"""Tests of imret.plots: AP bar charts (matplotlib) and top-k grids (Pillow)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_dir
from imret.evaluation import (
    RevisitopGroundTruth,
    evaluate_labelled,
    evaluate_revisitop,
    load_revisitop,
)
from imret.plots import (
    MARK_COLOURS,
    draw_revisitop_topk,
    draw_topk_grid,
    plot_ap_per_query,
    revisitop_marks,
    topk_grid_size,
)

SHARED = shared_dir()
MINI = SHARED / "data" / "rparis6k-mini"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _toy_gt():
    # Query 0: easy {0}, hard {1}, junk {2}; query 1: easy {4, 5}, nothing else.
    return RevisitopGroundTruth(
        "toy",
        [f"d{i}" for i in range(6)],
        ["q0", "q1"],
        [(1, 1, 8, 8), None],
        [np.array([0]), np.array([4, 5])],
        [np.array([1]), np.array([], dtype=np.int64)],
        [np.array([2]), np.array([], dtype=np.int64)],
    )


RANKS = np.array([[3, 2, 0, 1, 4, 5], [4, 0, 5, 1, 2, 3]])


def _is_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_plot_ap_per_query_revisitop(tmp_path):
    pytest.importorskip("matplotlib")
    r = evaluate_revisitop(RANKS, _toy_gt())
    out = plot_ap_per_query(r, tmp_path / "figs" / "ap.png", title="toy", dpi=50)
    assert out == tmp_path / "figs" / "ap.png"
    w, h = _is_png(out)
    assert w >= 300 and h >= 200
    with pytest.raises(ValueError, match="query_names"):
        plot_ap_per_query(r, tmp_path / "x.png", query_names=["only one"])


def test_plot_ap_per_query_labelled(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    small = evaluate_labelled(rng.normal(size=(20, 4)), rng.integers(0, 4, 20))
    _is_png(plot_ap_per_query(small, tmp_path / "small.png", dpi=40))
    big = evaluate_labelled(rng.normal(size=(400, 4)), rng.integers(0, 20, 400))
    _is_png(plot_ap_per_query(big, tmp_path / "big.png", dpi=40))
    with pytest.raises(TypeError):
        plot_ap_per_query({"map": 0.5}, tmp_path / "bad.png")


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    r = evaluate_revisitop(RANKS, _toy_gt())
    with pytest.raises(ImportError, match=r"pip install 'imret\[plots\]'"):
        plot_ap_per_query(r, tmp_path / "ap.png")
    assert not (tmp_path / "ap.png").exists()


def test_revisitop_marks():
    gt = _toy_gt()
    # Query 0 top 4 = items 3 2 0 1. Medium: positives {0,1}, junk {2}.
    assert revisitop_marks(RANKS, gt, "medium", k=4)[0] == ["neg", "junk", "pos", "pos"]
    # Easy: positives {0}, junk {2, 1}.
    assert revisitop_marks(RANKS, gt, "easy", k=4)[0] == ["neg", "junk", "pos", "junk"]
    # Hard: positives {1}, junk {0, 2}; query 1 has no hard positives, its easy ones are junk.
    hard = revisitop_marks(RANKS, gt, "hard", k=3)
    assert hard == [["neg", "junk", "junk"], ["junk", "neg", "junk"]]
    with pytest.raises(ValueError, match="easy, medium, hard"):
        revisitop_marks(RANKS, gt, "expert")


def _solid(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


def test_topk_grid_size_and_frames(tmp_path):
    k, thumb = 3, 32
    # tile = 32 + 2*4 = 40 px, caption 16 -> cell 40 x 56; gaps 4; +8 after the query column.
    assert topk_grid_size(2, k, thumb) == (4 + 4 * (40 + 4) + 8, 4 + 2 * (56 + 4))
    queries = [_solid((0, 0, 255)), _solid((0, 255, 255))]
    db = [[_solid((255, 0, 0)), _solid((0, 255, 0)), _solid((10, 10, 10)), _solid((1, 2, 3))],
          [_solid((200, 200, 0))]]  # a short row leaves empty cells
    marks = [["pos", "neg", "junk", "neg"], ["neg"]]
    out = draw_topk_grid(queries, db, marks, tmp_path / "grid.png", k=k, thumb=thumb,
                         query_boxes=[(5, 5, 20, 20), None])
    size = _is_png(out)
    assert size == topk_grid_size(2, k, thumb) == (188, 124)
    im = Image.open(out).convert("RGB")
    cell, gap = 40, 4

    def col_x(t):  # left edge of result t (0-based) in the row
        return gap + (t + 1) * (cell + gap) + 2 * gap

    for t, mark in enumerate(["pos", "neg", "junk"]):
        assert im.getpixel((col_x(t) + 1, gap + 1)) == MARK_COLOURS[mark]
    # The first result's tile is the solid red image (fitted, centred).
    assert im.getpixel((col_x(0) + cell // 2, gap + cell // 2)) == (255, 0, 0)
    # Row 2, result 2 is empty: background.
    assert im.getpixel((col_x(1) + cell // 2, gap + 60 + cell // 2)) == (255, 255, 255)


def test_topk_grid_missing_image_gives_placeholder(tmp_path):
    thumb = 32
    red = tmp_path / "red.png"
    _solid((255, 0, 0)).save(red)
    not_image = tmp_path / "text.jpg"
    not_image.write_text("not a jpeg")
    out = draw_topk_grid(
        [tmp_path / "missing_query.jpg"],
        [[red, tmp_path / "missing.jpg", not_image]],
        [["pos", "neg", "junk"]],
        tmp_path / "grid.png",
        k=3,
        thumb=thumb,
        query_boxes=[(0, 0, 10, 10)],
    )
    im = Image.open(out).convert("RGB")
    assert im.size == topk_grid_size(1, 3, thumb)
    tile_y = 4 + 4  # gap + border

    def tile_x(t):  # left edge of the thumbnail of result t: gap, cells of 40 + 4, 8, border
        return 4 + (t + 1) * 44 + 8 + 4

    assert im.getpixel((tile_x(0) + 16, tile_y + 16)) == (255, 0, 0)
    # Placeholders: light tile background away from the crossing diagonals.
    for x0 in (4 + 4, tile_x(1), tile_x(2)):
        assert im.getpixel((x0 + 16, tile_y + 4)) == (235, 235, 235)


def test_topk_grid_validation(tmp_path):
    q = [_solid((0, 0, 0))]
    with pytest.raises(ValueError, match="unknown mark 'ok'.*pos, neg, junk"):
        draw_topk_grid(q, [[_solid((1, 1, 1))]], [["ok"]], tmp_path / "g.png")
    with pytest.raises(ValueError, match="marks\\[0\\] has 0 marks"):
        draw_topk_grid(q, [[_solid((1, 1, 1))]], [[]], tmp_path / "g.png")
    with pytest.raises(ValueError, match="ranked_db_images"):
        draw_topk_grid(q, [], None, tmp_path / "g.png")
    # marks=None: neutral frames, still a picture.
    _is_png(draw_topk_grid(q, [[_solid((1, 1, 1))]], None, tmp_path / "g.png", k=2, thumb=16))


@pytest.mark.realdata
@pytest.mark.skipif(not MINI.exists(), reason=f"shared data {MINI} is absent (set IMRET_SHARED)")
def test_revisitop_grid_on_mini_set(tmp_path):
    gt = load_revisitop(MINI / "gnd_rparis6k-mini.pkl")
    ranks = np.stack([np.random.default_rng(i).permutation(gt.n_db) for i in range(gt.n_queries)])
    out = draw_revisitop_topk(
        ranks, gt, MINI / "jpg", tmp_path / "grid.png", k=4, queries=[0, 11], thumb=48
    )
    assert _is_png(out) == topk_grid_size(2, 4, 48)
    with pytest.raises(ValueError, match="outside"):
        draw_revisitop_topk(ranks, gt, MINI / "jpg", tmp_path / "g.png", queries=[12])
