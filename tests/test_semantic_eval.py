"""Cross-modal Recall@k / median rank, NDCG@k and PCC against hand-computed values and loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imret.semantic_eval import (
    cross_modal_ranks,
    dcg,
    evaluate_cross_modal,
    evaluate_semantic,
    ndcg_per_query,
    pcc_per_query,
)

# --- cross-modal ------------------------------------------------------------------------

# three images and five captions in 2-D; caption j describes image OWNER[j]
IMAGES = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
TEXTS = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
OWNER = [0, 0, 1, 2, 1]


def test_cross_modal_ranks_by_hand():
    t2i, i2t = cross_modal_ranks(IMAGES, TEXTS, OWNER)
    # text -> image scores (rows: captions; columns: images 0, 1, 2):
    #   t0 (1, 0):     1,   0,   0.6   -> its image 0 first                          rank 1
    #   t1 (0, 1):     0,   1,   0.8   -> image 0 (score 0) behind 1 and 2           rank 3
    #   t2 (.8, .6):   0.8, 0.6, 0.96  -> image 1 (0.6) behind 0 and 2               rank 3
    #   t3 (.6, .8):   0.6, 0.8, 1.0   -> image 2 first                              rank 1
    #   t4 (0, 1):     0,   1,   0.8   -> image 1 first                              rank 1
    assert t2i.tolist() == [1, 3, 3, 1, 1]
    # image -> text scores (columns: captions 0..4):
    #   i0: 1, 0, 0.8, 0.6, 0   own {t0, t1}, best 1; no other caption >= 1           rank 1
    #   i1: 0, 1, 0.6, 0.8, 1   own {t2, t4}, best 1; t1 ties at 1 (ties count against) rank 2
    #   i2: .6, .8, .96, 1, .8  own {t3}, 1.0 first                                   rank 1
    assert i2t.tolist() == [1, 2, 1]
    r = evaluate_cross_modal(IMAGES, TEXTS, OWNER, ks=(1, 2, 5))
    assert r.text_to_image == {1: 3 / 5, 2: 3 / 5, 5: 1.0}
    assert r.text_to_image_median_rank == 1.0 and r.text_to_image_mean_rank == pytest.approx(9 / 5)
    assert r.image_to_text == {1: 2 / 3, 2: 1.0, 5: 1.0}
    assert r.image_to_text_median_rank == 1.0 and r.image_to_text_mean_rank == pytest.approx(4 / 3)
    assert r.num_images == 3 and r.num_texts == 5
    assert r.to_dict()["text_to_image"] == {1: 0.6, 2: 0.6, 5: 1.0}


def test_constant_model_gets_the_worst_rank():
    t2i, i2t = cross_modal_ranks(np.zeros((3, 2)), np.zeros((5, 2)), OWNER)
    assert t2i.tolist() == [3] * 5  # ties count against: last among 3 images
    # an image's own captions never count against it: 5 captions minus its own, plus 1
    assert i2t.tolist() == [4, 4, 5]


def test_cross_modal_matches_a_loop():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(7, 4)), rng.normal(size=(20, 4))
    owner = np.concatenate([np.arange(7), rng.integers(0, 7, 13)])
    t2i, i2t = cross_modal_ranks(img, txt, owner, block=3)
    for j in range(20):
        order = sorted(range(7), key=lambda i: -float(txt[j] @ img[i]))
        assert t2i[j] == order.index(owner[j]) + 1
    for i in range(7):
        order = sorted(range(20), key=lambda j: -float(img[i] @ txt[j]))
        assert i2t[i] == min(order.index(j) for j in range(20) if owner[j] == i) + 1


def test_cross_modal_errors():
    with pytest.raises(ValueError, match="image 2 has no caption"):
        cross_modal_ranks(IMAGES, TEXTS[:2], [0, 1])
    with pytest.raises(ValueError, match=r"text_image indices must lie in \[0, 3\)"):
        cross_modal_ranks(IMAGES, TEXTS[:1], [3])
    with pytest.raises(ValueError, match="differ in size"):
        cross_modal_ranks(IMAGES, np.zeros((1, 3)), [0])
    with pytest.raises(ValueError, match="must be a positive integer"):
        evaluate_cross_modal(IMAGES, TEXTS, OWNER, ks=(0,))


# --- NDCG and PCC -----------------------------------------------------------------------

# one query, four database images: relevance (caption tf-idf similarity) and model scores
REL = np.array([[0.5, 0.0, 1.0, 0.25]])
SCORES = np.array([[0.9, 0.2, 0.8, 0.1]])
# model order: items 0 (score 0.9), 2 (0.8), 1 (0.2), 3 (0.1), so the ranked relevances are
# 0.5, 1.0, 0.0, 0.25; the ideal order is 1.0, 0.5, 0.25, 0.0.


def test_dcg_by_hand():
    # linear gain: 0.5/log2(2) + 1.0/log2(3) + 0/log2(4) + 0.25/log2(5)
    assert dcg([0.5, 1.0, 0.0, 0.25], 4, gain="linear") == pytest.approx(0.5 + 1 / math.log2(3) + 0.25 / math.log2(5))
    # exponential gain 2^rel - 1: (√2 − 1) + 1/log2(3) + 0 + (2^0.25 − 1)/log2(5)
    assert dcg([0.5, 1.0, 0.0, 0.25], 4) == pytest.approx(0.41421356 + 0.63092975 + 0.18920712 / 2.32192809)
    assert dcg([0.5, 1.0], 9, gain="linear") == pytest.approx(0.5 + 0.63092975)


def test_ndcg_by_hand():
    # ranked relevances 0.5, 1.0, 0.0, 0.25; ideal 1.0, 0.5, 0.25, 0.0
    # linear, k=2: (0.5 + 1.0/1.5849625) / (1.0 + 0.5/1.5849625) = 1.1309298 / 1.3154649 = 0.8597187
    assert ndcg_per_query(SCORES, REL, 2, exclude_self=False, gain="linear")[0] == pytest.approx(0.8597187, abs=1e-7)
    # linear, k=4: (1.1309298 + 0 + 0.25/2.3219281) / (1.3154649 + 0.25/2 + 0) = 1.2385989 / 1.4404649
    assert ndcg_per_query(SCORES, REL, 4, exclude_self=False, gain="linear")[0] == pytest.approx(0.8598605, abs=1e-7)
    # exp, k=4: (0.4142136 + 0.6309298 + 0 + 0.1892071/2.3219281) / (1 + 0.4142136/1.5849625 + 0.1892071/2)
    #         = 1.1266304 / 1.3559432
    assert ndcg_per_query(SCORES, REL, 4, exclude_self=False)[0] == pytest.approx(0.8308832, abs=1e-7)
    # k beyond the database: the whole database
    assert ndcg_per_query(SCORES, REL, 50, exclude_self=False)[0] == pytest.approx(0.8308832, abs=1e-7)
    # the ideal ranking scores 1, its reverse less
    assert ndcg_per_query(REL, REL, 3, exclude_self=False)[0] == pytest.approx(1.0)
    assert ndcg_per_query(-REL, REL, 3, exclude_self=False)[0] < 0.5


def test_pcc_by_hand():
    # model order: scores 0.9, 0.8, 0.2, 0.1 with relevances 0.5, 1.0, 0.0, 0.25
    # top 2: scores (0.9, 0.8), relevances (0.5, 1.0): two points, opposite order -> -1
    assert pcc_per_query(SCORES, REL, 2, exclude_self=False)[0] == pytest.approx(-1.0)
    # all: centred scores (.4, .3, −.3, −.4), centred relevances (.0625, .5625, −.4375, −.1875)
    #   Σ products = .025 + .16875 + .13125 + .075 = 0.4; Σ s² = 0.5; Σ r² = 0.546875
    #   r = 0.4 / sqrt(0.5 · 0.546875) = 0.7649463
    assert pcc_per_query(SCORES, REL, None, exclude_self=False)[0] == pytest.approx(0.7649463, abs=1e-7)
    np.testing.assert_allclose(pcc_per_query(SCORES, REL, 3, exclude_self=False),
                               np.corrcoef([0.9, 0.8, 0.2], [0.5, 1.0, 0.0])[0, 1])
    # constant relevance in the window: no value
    assert np.isnan(pcc_per_query(SCORES, np.full((1, 4), 0.3), None, exclude_self=False)[0])
    assert np.isnan(pcc_per_query(SCORES, REL, 1, exclude_self=False)[0])


def _loop_ndcg_pcc(scores, rel, k, gain):
    out_n, out_p = [], []
    for s, r in zip(scores, rel):
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        g = (lambda v: 2**v - 1) if gain == "exp" else (lambda v: v)
        d = sum(g(r[i]) / math.log2(pos + 2) for pos, i in enumerate(order[:k]))
        ideal = sorted(r, reverse=True)
        idcg = sum(g(v) / math.log2(pos + 2) for pos, v in enumerate(ideal[:k]))
        out_n.append(d / idcg if idcg > 0 else math.nan)
        top = order[:k]
        out_p.append(np.corrcoef([s[i] for i in top], [r[i] for i in top])[0, 1])
    return np.array(out_n), np.array(out_p)


@pytest.mark.parametrize("gain", ["exp", "linear"])
def test_semantic_metrics_match_a_loop_and_exclude_self(gain):
    rng = np.random.default_rng(1)
    n = 9
    x = rng.normal(size=(n, 3))
    scores = np.round(x @ x.T, 1)  # rounded: ties between database items are exercised
    rel = rng.random((n, n))
    rel = (rel + rel.T) / 2
    np.fill_diagonal(rel, 1.0)
    np.fill_diagonal(scores, 10.0)  # the query finds itself first: exclude_self must drop it
    res = evaluate_semantic(scores, rel, exclude_self=True, ks=(3, 5), gain=gain)
    keep = ~np.eye(n, dtype=bool)
    s2, r2 = scores[keep].reshape(n, n - 1), rel[keep].reshape(n, n - 1)
    for k in (3, 5):
        ref_n, ref_p = _loop_ndcg_pcc(s2.tolist(), r2.tolist(), k, gain)
        assert res.ndcg[k] == pytest.approx(np.nanmean(ref_n), abs=1e-12)
        assert res.pcc[k] == pytest.approx(np.nanmean(ref_p), abs=1e-12)
    ref_all = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(s2, r2)])
    assert res.pcc_all == pytest.approx(ref_all, abs=1e-12)
    assert res.num_queries == n and res.gain == gain
    # without exclusion the query itself (relevance 1, ranked first) inflates NDCG
    assert evaluate_semantic(scores, rel, exclude_self=False, ks=(3,), gain=gain).ndcg[3] > res.ndcg[3]


def test_queries_without_relevance_are_skipped_and_counted():
    rel = np.array([[0.0, 0.0, 0.0], [0.2, 0.9, 0.1]])
    scores = np.array([[0.3, 0.2, 0.1], [0.1, 0.3, 0.2]])
    res = evaluate_semantic(scores, rel, exclude_self=False, ks=(2,), gain="linear")
    # query 1: ranked relevances 0.9, 0.1 (k=2); ideal 0.9, 0.2 -> (0.9 + 0.1/1.585) / (0.9 + 0.2/1.585)
    assert res.ndcg[2] == pytest.approx((0.9 + 0.1 / math.log2(3)) / (0.9 + 0.2 / math.log2(3)))
    assert res.skipped_ndcg == {2: 1}
    assert res.to_dict()["skipped_pcc"][0] == 1


def test_semantic_errors():
    with pytest.raises(ValueError, match="exclude_self needs square"):
        evaluate_semantic(np.zeros((2, 3)), np.zeros((2, 3)), exclude_self=True)
    with pytest.raises(ValueError, match="one shape"):
        evaluate_semantic(np.zeros((2, 3)), np.zeros((3, 2)), exclude_self=False)
    with pytest.raises(ValueError, match="available: 'exp', 'linear'"):
        evaluate_semantic(np.zeros((2, 2)), np.zeros((2, 2)), exclude_self=False, gain="log")
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_semantic(np.full((2, 2), np.nan), np.zeros((2, 2)), exclude_self=False)
