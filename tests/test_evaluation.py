"""Tests of imret.evaluation: revisitop mAP / mP@k, random baseline, labelled-set metrics."""

from __future__ import annotations

import json
import math
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_dir
from imret.evaluation import (
    LabelledResult,
    RevisitopGroundTruth,
    RevisitopResult,
    evaluate_labelled,
    evaluate_ranking,
    evaluate_revisitop,
    evaluate_revisitop_scores,
    format_table,
    load_labelled_csv,
    load_labelled_folder,
    load_revisitop,
    random_baseline_revisitop,
    rank_by_similarity,
    revisitop_protocol,
    save_json,
)

SHARED = shared_dir()
REVISITOP = SHARED / "data" / "revisitop"
MINI = SHARED / "data" / "rparis6k-mini"


def _needs(path: Path):
    return pytest.mark.skipif(
        not path.exists(), reason=f"shared data {path} is absent (set IMRET_SHARED)"
    )


# --------------------------------------------------------------------------------------
# Independent slow references
# --------------------------------------------------------------------------------------


def reference_revisitop(ranks_row, ok, junk, kappas=(1, 5, 10)):
    """AP and precision@k of one query, following the published revisitop algorithm step
    by step with plain loops (positions of positives and junk, shift by the junk in front,
    trapezoidal AP, quirky mP@k)."""
    ok, junk = list(ok), list(junk)
    if len(ok) == 0:
        return math.nan, [math.nan] * len(kappas)
    pos = [p for p, item in enumerate(ranks_row) if item in ok]
    jpos = [p for p, item in enumerate(ranks_row) if item in junk]
    shifted = []
    for p in pos:
        shifted.append(p - sum(1 for q in jpos if q < p))
    ap = 0.0
    for j, r in enumerate(shifted):
        p0 = 1.0 if r == 0 else j / r
        p1 = (j + 1) / (r + 1)
        ap += (p0 + p1) / 2 / len(ok)
    one_based = [r + 1 for r in shifted]
    prec = []
    for k in kappas:
        kq = min(max(one_based), k) if one_based else 0
        prec.append(sum(1 for r in one_based if r <= kq) / kq if kq else 0.0)
    return ap, prec


def reference_labelled(x, labels, ks):
    """Leave-one-out AP and hit@k per item with plain loops; ties: lower index first."""
    n = len(labels)
    aps, hits = [], {k: [] for k in ks}
    for i in range(n):
        others = [j for j in range(n) if j != i]
        sims = {j: float(sum(float(a) * float(b) for a, b in zip(x[i], x[j]))) for j in others}
        order = sorted(others, key=lambda j: (-sims[j], j))
        rel = [labels[j] == labels[i] for j in order]
        npos = sum(rel)
        if npos == 0:
            aps.append(math.nan)
            for k in ks:
                hits[k].append(None)
            continue
        found, total = 0, 0.0
        for rank, r in enumerate(rel, start=1):
            if r:
                found += 1
                total += found / rank
        aps.append(total / npos)
        for k in ks:
            hits[k].append(any(rel[:k]))
    return np.array(aps), hits


def toy_gt(n_db=12, n_q=4, seed=0, name="toy"):
    rng = np.random.default_rng(seed)
    easy, hard, junk, bbx = [], [], [], []
    for i in range(n_q):
        perm = rng.permutation(n_db)
        ne, nh, nj = rng.integers(0, 4, size=3)
        easy.append(perm[:ne].astype(np.int64))
        hard.append(perm[ne : ne + nh].astype(np.int64))
        junk.append(perm[ne + nh : ne + nh + nj].astype(np.int64))
        bbx.append(None if i % 2 else (1.0, 2.0, 30.0, 40.0))
    return RevisitopGroundTruth(
        name, [f"db{i}" for i in range(n_db)], [f"q{i}" for i in range(n_q)], bbx, easy, hard, junk
    )


# --------------------------------------------------------------------------------------
# Revisitop AP by hand
# --------------------------------------------------------------------------------------

# Database of 10 items; ranking, with what each item is for the query:
#   position: 0    1    2     3    4     5    6    7    8    9
#   item:     5    2    7     0    9     3    1    4    6    8
#   role:     neg  POS  junk  POS  junk  neg  neg  POS  neg  neg
# Raw positive positions 1, 3, 7; junk in front of them: 0, 1, 2 -> junk-free ranks 1, 2, 5.
# AP = 1/3 * [ (0/1 + 1/2)/2 + (1/2 + 2/3)/2 + (2/5 + 3/6)/2 ]
#    = 1/3 * [ 1/4 + 7/12 + 9/20 ] = 1/3 * 77/60 = 77/180 = 0.42778
# Without junk removal (ranks 1, 3, 7):
# AP = 1/3 * [ 1/4 + (1/3 + 2/4)/2 + (2/7 + 3/8)/2 ] = 1/3 * 335/336 = 335/1008 = 0.33234
# mP@k, 1-based junk-free positive ranks pos = [2, 3, 6]:
#   k=1: kq = min(6, 1) = 1 -> #{pos <= 1} / 1 = 0
#   k=5: kq = 5 -> 2 / 5 = 0.4
#   k=10: kq = min(6, 10) = 6 -> 3 / 6 = 0.5   (not 3/10: the official quirk)
HAND_RANKING = np.array([[5, 2, 7, 0, 9, 3, 1, 4, 6, 8]])
HAND_POS = [[2, 0, 4]]
HAND_JUNK = [[7, 9]]


def test_ap_hand_computed_with_junk():
    r = evaluate_ranking(HAND_RANKING, HAND_POS, HAND_JUNK, kappas=(1, 5, 10))
    assert r.ap[0] == pytest.approx(77 / 180, abs=1e-12)
    assert r.map == pytest.approx(77 / 180, abs=1e-12)
    assert r.mp_at_k == pytest.approx({1: 0.0, 5: 0.4, 10: 0.5})
    assert r.n_empty == 0


def test_junk_removal_shifts_positions():
    no_junk = evaluate_ranking(HAND_RANKING, HAND_POS, None)
    assert no_junk.ap[0] == pytest.approx(335 / 1008, abs=1e-12)
    with_junk = evaluate_ranking(HAND_RANKING, HAND_POS, HAND_JUNK)
    assert with_junk.ap[0] > no_junk.ap[0]
    # Junk behind every positive changes nothing.
    late_junk = evaluate_ranking(HAND_RANKING, HAND_POS, [[6, 8]])
    assert late_junk.ap[0] == pytest.approx(no_junk.ap[0], abs=1e-12)


def test_mp_at_k_quirk_positives_all_on_top():
    # Positives at 1-based ranks 1 and 2: kq = min(2, 10) = 2, so mP@10 = 2/2 = 1, not 0.2.
    ranks = np.array([[3, 1, 0, 2, 4, 5, 6, 7, 8, 9, 10, 11]])
    r = evaluate_ranking(ranks, [[3, 1]], kappas=(1, 5, 10))
    assert r.mp_at_k == {1: 1.0, 5: 1.0, 10: 1.0}
    assert r.map == 1.0


def test_perfect_ranking_and_first_rank_precision():
    ranks = np.array([[4, 2, 0, 1, 3, 5]])
    r = evaluate_ranking(ranks, [[4, 2, 0]])
    assert r.ap[0] == 1.0
    # One positive at junk-free rank 0 after two junk items: precision_0 = 1 -> AP 1.
    r = evaluate_ranking(ranks, [[0]], [[4, 2]])
    assert r.ap[0] == 1.0


def test_empty_queries_are_nan_and_excluded():
    ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 2, 3]])
    r = evaluate_ranking(ranks, [[0], [], [2]], kappas=(1, 2))
    assert math.isnan(r.ap[1])
    assert r.n_empty == 1
    # query 0: AP 1; query 2: positive at rank 2 (0-based) -> (1/2*0 + 1/3)/2... precisely
    # (0/2 + 1/3) / 2 = 1/6.
    assert r.ap[0] == 1.0 and r.ap[2] == pytest.approx(1 / 6)
    assert r.map == pytest.approx((1 + 1 / 6) / 2)
    assert np.isnan(r.precision_at_k[1]).all()
    # mP@1: 1 and 0; mP@2: kq = min(3, 2) = 2 -> 0/2 for query 2.
    assert r.mp_at_k == pytest.approx({1: 0.5, 2: 0.5})
    all_empty = evaluate_ranking(ranks, [[], [], []])
    assert math.isnan(all_empty.map) and all_empty.n_empty == 3


def test_against_reference_on_random_rankings():
    rng = np.random.default_rng(1)
    for trial in range(30):
        n_db = int(rng.integers(1, 40))
        n_q = int(rng.integers(1, 6))
        k = int(rng.integers(1, n_db + 1))  # also truncated rankings
        ranks = np.stack([rng.permutation(n_db)[:k] for _ in range(n_q)])
        ok, junk = [], []
        for _ in range(n_q):
            perm = rng.permutation(n_db)
            a, b = sorted(rng.integers(0, n_db + 1, size=2))
            ok.append(perm[:a])
            junk.append(perm[a:b])
        kappas = (1, 3, 10)
        got = evaluate_ranking(ranks, ok, junk, kappas=kappas, n_db=n_db)
        for i in range(n_q):
            ap, prec = reference_revisitop(
                ranks[i].tolist(), ok[i].tolist(), junk[i].tolist(), kappas
            )
            if math.isnan(ap):
                assert math.isnan(got.ap[i])
            else:
                assert got.ap[i] == pytest.approx(ap, abs=1e-12), (trial, i)
                assert got.precision_at_k[i] == pytest.approx(prec, abs=1e-12), (trial, i)


def test_item_both_positive_and_junk_matches_reference():
    # Degenerate sets as the official code treats them: item 0 is positive and junk.
    ranks = np.array([[0, 1, 2, 3]])
    got = evaluate_ranking(ranks, [[0, 1]], [[0]])
    ap, _ = reference_revisitop([0, 1, 2, 3], [0, 1], [0])
    assert got.ap[0] == pytest.approx(ap)


# --------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------


def _protocol_toy():
    # Query 0: easy {0}, hard {1}, junk {2}; query 1: easy {4, 5}, no hard, no junk.
    return RevisitopGroundTruth(
        "toy",
        [f"d{i}" for i in range(6)],
        ["q0", "q1"],
        [None, (0, 0, 5, 5)],
        [np.array([0]), np.array([4, 5])],
        [np.array([1]), np.array([], dtype=np.int64)],
        [np.array([2]), np.array([], dtype=np.int64)],
    )


def test_protocol_composition():
    gt = _protocol_toy()
    ok, junk = revisitop_protocol(gt, "Easy")
    assert sorted(ok[0]) == [0] and sorted(junk[0]) == [1, 2]
    ok, junk = revisitop_protocol(gt, "medium")
    assert sorted(ok[0]) == [0, 1] and sorted(junk[0]) == [2]
    ok, junk = revisitop_protocol(gt, "hard")
    assert sorted(ok[0]) == [1] and sorted(junk[0]) == [0, 2]
    with pytest.raises(ValueError, match="easy, medium, hard"):
        revisitop_protocol(gt, "extreme")


def test_protocols_hand_computed():
    gt = _protocol_toy()
    # Query 0 ranking 3 2 0 1 4 5:
    #   Easy   ok {0}, junk {1,2}: item 0 at raw 2, one junk (2) in front -> r=1: AP 1/4.
    #   Medium ok {0,1}, junk {2}: raw 2, 3 -> r 1, 2: ((0+1/2)/2 + (1/2+2/3)/2)/2 = 5/12.
    #   Hard   ok {1}, junk {0,2}: raw 3, two junk in front -> r=1: AP 1/4.
    # Query 1 ranking 4 0 5 1 2 3: ok {4,5} under Easy and Medium, r 0, 2:
    #   (1 + (1/2 + 2/3)/2) / 2 = 19/24; Hard: no positives -> NaN.
    ranks = np.array([[3, 2, 0, 1, 4, 5], [4, 0, 5, 1, 2, 3]])
    r = evaluate_revisitop(ranks, gt)
    assert isinstance(r, RevisitopResult)
    assert r.easy.ap == pytest.approx([1 / 4, 19 / 24])
    assert r.medium.ap == pytest.approx([5 / 12, 19 / 24])
    assert r.hard.ap[0] == pytest.approx(1 / 4) and math.isnan(r.hard.ap[1])
    assert r.easy.map == pytest.approx((1 / 4 + 19 / 24) / 2)
    assert r.medium.map == pytest.approx((5 / 12 + 19 / 24) / 2)
    assert r.hard.map == pytest.approx(1 / 4) and r.hard.n_empty == 1
    assert r.protocol("MEDIUM") is r.medium
    assert r.query_names == ("q0", "q1") and r.n_db == 6


def test_protocols_against_reference_on_toy_gt():
    gt = toy_gt(n_db=15, n_q=6, seed=3)
    rng = np.random.default_rng(4)
    ranks = np.stack([rng.permutation(15) for _ in range(6)])
    r = evaluate_revisitop(ranks, gt, kappas=(1, 5))
    for p in ("easy", "medium", "hard"):
        ok, junk = revisitop_protocol(gt, p)
        ref = [
            reference_revisitop(ranks[i].tolist(), ok[i].tolist(), junk[i].tolist(), (1, 5))
            for i in range(6)
        ]
        ref_ap = np.array([a for a, _ in ref])
        np.testing.assert_allclose(r.protocol(p).ap, ref_ap, atol=1e-12, equal_nan=True)
        assert r.protocol(p).n_empty == int(np.isnan(ref_ap).sum())


def test_rank_by_similarity_descending_and_stable():
    scores = np.array([[0.1, 0.5, 0.5, 0.9, 0.5], [3, 2, 1, 0, -1]])
    ranks = rank_by_similarity(scores)
    assert ranks.tolist() == [[3, 1, 2, 4, 0], [0, 1, 2, 3, 4]]
    assert ranks.dtype == np.int64
    # Many ties in long rows (numpy's default sort is only stable for short rows).
    many = np.random.default_rng(0).integers(0, 3, size=(3, 300)).astype(np.float32)
    expected = [sorted(range(300), key=lambda j: (-row[j], j)) for row in many]
    assert rank_by_similarity(many).tolist() == expected
    torch = pytest.importorskip("torch")
    assert rank_by_similarity(torch.tensor(scores)).tolist() == ranks.tolist()
    with pytest.raises(ValueError, match="NaN"):
        rank_by_similarity(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="shape"):
        rank_by_similarity(np.zeros(3))


def test_evaluate_scores_equals_ranks():
    gt = toy_gt(n_db=10, n_q=4, seed=5)
    scores = np.random.default_rng(6).normal(size=(4, 10)).astype(np.float32)
    a = evaluate_revisitop_scores(scores, gt)
    b = evaluate_revisitop(rank_by_similarity(scores), gt)
    for p in ("easy", "medium", "hard"):
        np.testing.assert_array_equal(a.protocol(p).ap, b.protocol(p).ap)
    with pytest.raises(ValueError, match=r"\(4, 10\)"):
        evaluate_revisitop_scores(scores[:, :5], gt)


def test_rank_validation():
    gt = toy_gt(n_db=10, n_q=4)
    good = np.tile(np.arange(10), (4, 1))
    with pytest.raises(ValueError, match="ranks.T"):
        evaluate_revisitop(good.T, gt)  # the revisitop (Ndb, Nq) layout
    with pytest.raises(TypeError, match="evaluate_revisitop_scores"):
        evaluate_revisitop(good.astype(float), gt)
    bad = good.copy()
    bad[2, 3] = bad[2, 4]
    with pytest.raises(ValueError, match="row 2"):
        evaluate_revisitop(bad, gt)
    bad = good.copy()
    bad[0, 0] = 10
    with pytest.raises(ValueError, match="outside"):
        evaluate_revisitop(bad, gt)
    with pytest.raises(ValueError, match="kappas"):
        evaluate_revisitop(good, gt, kappas=(0, 5))


def test_truncated_ranking_counts_missing_positives_as_zero():
    # positives {0, 9}; only the top 3 are returned and contain 0 at rank 0.
    r = evaluate_ranking(np.array([[0, 1, 2]]), [[0, 9]], n_db=10)
    assert r.ap[0] == pytest.approx(0.5)
    # no positive retrieved at all: AP 0, precision 0 (no crash)
    r = evaluate_ranking(np.array([[1, 2, 3]]), [[0, 9]], n_db=10)
    assert r.ap[0] == 0.0 and r.mp_at_k[1] == 0.0


# --------------------------------------------------------------------------------------
# Random baseline
# --------------------------------------------------------------------------------------


def _expected_random(n: int, m: int, kappas):
    """Closed form of E[AP] and E[precision@k] for a uniformly random ranking of n
    non-junk items containing m positives. P(r_j = r) = C(r, j) C(n-1-r, m-1-j) / C(n, m)
    (0-based order statistics); P(max pos <= t) = C(t, m) / C(n, m) (1-based);
    E[prec@k] = (min(k, n) m / n - m P(maxpos <= k-1)) / k + sum_{t<k} m/t P(maxpos = t)."""
    total = math.comb(n, m)
    ap = Fraction(0)
    for j in range(m):
        for r in range(j, n - m + j + 1):
            pr = Fraction(math.comb(r, j) * math.comb(n - 1 - r, m - 1 - j), total)
            p0 = Fraction(1) if r == 0 else Fraction(j, r)
            ap += pr * (p0 + Fraction(j + 1, r + 1)) / 2
    ap /= m
    precs = []
    for k in kappas:
        cdf = lambda t: Fraction(math.comb(t, m), total) if t >= m else Fraction(0)  # noqa: E731
        e = (Fraction(min(k, n) * m, n) - m * cdf(min(k - 1, n))) / k
        for t in range(m, min(k - 1, n) + 1):
            e += Fraction(m, t) * (cdf(t) - cdf(t - 1))
        precs.append(float(e))
    return float(ap), precs


def test_random_baseline_matches_closed_form():
    gt = RevisitopGroundTruth(
        "toy",
        [f"d{i}" for i in range(14)],
        ["a", "b", "c"],
        [None] * 3,
        [np.array([0, 1, 2]), np.array([5]), np.array([], dtype=np.int64)],
        [np.array([3]), np.array([6, 7, 8, 9]), np.array([1, 2])],
        [np.array([4, 5]), np.array([], dtype=np.int64), np.array([0])],
    )
    base = random_baseline_revisitop(gt, n_trials=1500, seed=0, kappas=(1, 5, 10))
    assert base.n_trials == 1500
    for p in ("easy", "medium", "hard"):
        ok, junk = revisitop_protocol(gt, p)
        res = base.protocol(p)
        for i in range(3):
            if len(ok[i]) == 0:
                assert math.isnan(res.ap[i])
                continue
            n = 14 - len(set(junk[i].tolist()) - set(ok[i].tolist()))
            ap, precs = _expected_random(n, len(ok[i]), (1, 5, 10))
            assert res.ap[i] == pytest.approx(ap, abs=0.015), (p, i)
            assert res.precision_at_k[i] == pytest.approx(precs, abs=0.03), (p, i)


def test_random_baseline_seeded():
    gt = toy_gt(n_db=20, n_q=5, seed=2)
    a = random_baseline_revisitop(gt, n_trials=5, seed=7)
    b = random_baseline_revisitop(gt, n_trials=5, seed=7)
    c = random_baseline_revisitop(gt, n_trials=5, seed=8)
    np.testing.assert_array_equal(a.medium.ap, b.medium.ap)
    assert not np.array_equal(np.nan_to_num(a.medium.ap), np.nan_to_num(c.medium.ap))
    with pytest.raises(ValueError, match="n_trials"):
        random_baseline_revisitop(gt, n_trials=0)


# --------------------------------------------------------------------------------------
# Loading ground truth
# --------------------------------------------------------------------------------------


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def _gnd_dict():
    return {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q"],
        "gnd": [{"bbx": [1, 2, 3, 4], "easy": [0], "hard": [1], "junk": [2]}],
    }


def test_load_revisitop_toy(tmp_path):
    gt = load_revisitop(_write_pickle(tmp_path / "gnd_toy.pkl", _gnd_dict()))
    assert gt.name == "toy" and gt.n_queries == 1 and gt.n_db == 3
    assert gt.bbx == [(1.0, 2.0, 3.0, 4.0)]
    assert gt.easy[0].dtype == np.int64 and gt.hard[0].tolist() == [1]
    assert gt.query_paths("/root") == [Path("/root/q.jpg")]
    assert gt.db_paths("r", ext=".png")[2] == Path("r/c.png")
    d = _gnd_dict()
    d["gnd"][0]["bbx"] = None
    d["gnd"][0]["junk"] = np.array([2])
    assert load_revisitop(_write_pickle(tmp_path / "gnd_none.pkl", d)).bbx == [None]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["gnd"][0].update(easy=[3]), "index 3 is outside"),
        (lambda d: d["gnd"][0].update(hard=[-1]), "index -1 is outside"),
        (lambda d: d["gnd"][0].pop("junk"), "'junk'"),
        (lambda d: d.pop("imlist"), "missing keys"),
        (lambda d: d["gnd"][0].update(bbx=[1, 2, 3]), "bbx"),
        (lambda d: d["gnd"][0].update(easy=[0.5]), "integer index"),
        (lambda d: d["gnd"].append(d["gnd"][0]), "gnd has 2 entries"),
    ],
)
def test_load_revisitop_rejects_bad_files(tmp_path, mutate, match):
    d = _gnd_dict()
    mutate(d)
    path = _write_pickle(tmp_path / "gnd_bad.pkl", d)
    with pytest.raises(ValueError, match=match) as e:
        load_revisitop(path)
    assert "gnd_bad.pkl" in str(e.value)


def test_load_revisitop_refuses_arbitrary_classes(tmp_path):
    d = _gnd_dict()
    d["extra"] = Fraction(1, 3)
    with pytest.raises(ValueError, match="refusing to load fractions.Fraction"):
        load_revisitop(_write_pickle(tmp_path / "gnd_evil.pkl", d))


# --------------------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------------------


def _perfect_ranks(gt):
    rows = []
    for i in range(gt.n_queries):
        head = np.concatenate([gt.easy[i], gt.hard[i], gt.junk[i]])
        rest = np.setdiff1d(np.arange(gt.n_db), head)
        rows.append(np.concatenate([head, rest]))
    return np.stack(rows)


@pytest.mark.realdata
@_needs(REVISITOP)
@pytest.mark.parametrize(
    "name, n_q, n_db, empty",
    [("roxford5k", 70, 4993, (2, 0, 0)), ("rparis6k", 70, 6322, (0, 0, 0))],
)
def test_real_ground_truth(name, n_q, n_db, empty):
    gt = load_revisitop(REVISITOP / f"gnd_{name}.pkl")
    assert gt.name == name and gt.n_queries == n_q and gt.n_db == n_db
    assert all(b is not None for b in gt.bbx)
    r = evaluate_revisitop(_perfect_ranks(gt), gt)
    for p, n_empty in zip(("easy", "medium", "hard"), empty):
        assert r.protocol(p).map == 1.0
        assert r.protocol(p).mp_at_k[1] == 1.0
        assert r.protocol(p).n_empty == n_empty
    # A random ranking, checked query by query against the loop reference (Medium).
    ranks = np.random.default_rng(0).permuted(np.tile(np.arange(n_db), (n_q, 1)), axis=1)
    got = evaluate_revisitop(ranks, gt)
    ok, junk = revisitop_protocol(gt, "medium")
    for i in range(0, n_q, 7):
        okset, junkset = set(ok[i].tolist()), set(junk[i].tolist())
        ap, prec = reference_revisitop(ranks[i].tolist(), okset, junkset)
        assert got.medium.ap[i] == pytest.approx(ap, abs=1e-12)
        assert got.medium.precision_at_k[i] == pytest.approx(prec, abs=1e-12)


@pytest.mark.realdata
@_needs(MINI)
def test_mini_set_paths_perfect_and_random_baseline():
    gt = load_revisitop(MINI / "gnd_rparis6k-mini.pkl")
    assert gt.name == "rparis6k-mini" and gt.n_queries == 12 and gt.n_db == 238
    assert all(p.is_file() for p in gt.query_paths(MINI / "jpg") + gt.db_paths(MINI / "jpg"))
    perfect = evaluate_revisitop(_perfect_ranks(gt), gt)
    assert [perfect.protocol(p).map for p in ("easy", "medium", "hard")] == [1.0, 1.0, 1.0]
    assert perfect.hard.n_empty == 1  # one query has no hard positives
    base = random_baseline_revisitop(gt, n_trials=100, seed=0)
    # With seed 0 and 100 trials: Easy 0.1386, Medium 0.1865, Hard 0.0778.
    assert 0.17 < base.medium.map < 0.21
    assert 0.12 < base.easy.map < 0.16
    assert 0.06 < base.hard.map < 0.10
    table = format_table(perfect, base)
    assert "mAP (random)" in table and "18.65" in table and "100.00" in table


# --------------------------------------------------------------------------------------
# Labelled sets
# --------------------------------------------------------------------------------------


def test_labelled_hand_example():
    # 1-D descriptors; item 3 is a singleton class.
    x = np.array([[1.0], [0.9], [0.1], [0.5]])
    labels = ["a", "a", "b", "c"]
    r = evaluate_labelled(x, labels, ks=(1, 2))
    # Query 0 (dot products: 0.9, 0.1, 0.5): order 1, 3, 2 -> positive 1 at rank 1 -> AP 1.
    # Query 1 (0.9, 0.09, 0.45): order 0, 3, 2 -> AP 1.
    # Query 2 (0.1, 0.09, 0.05): class b has no other member -> excluded.
    # Query 3 (0.5, 0.45, 0.05): class c singleton -> excluded.
    assert r.ap[:2].tolist() == [1.0, 1.0]
    assert np.isnan(r.ap[2:]).all()
    assert r.n_excluded == 2 and r.map == 1.0
    assert r.recall_at_k == {1: 1.0, 2: 1.0}
    # Classes {0, 1} and {2, 3}; x = 1.0, 0.2, 0.1, 0.5:
    #   q0: dots to 1, 2, 3 = 0.2, 0.1, 0.5  -> order 3 1 2, positive 1 at rank 2: AP 1/2
    #   q1: dots to 0, 2, 3 = 0.2, 0.02, 0.1 -> order 0 3 2, positive 0 at rank 1: AP 1
    #   q2: dots to 0, 1, 3 = 0.1, 0.02, 0.05 -> order 0 3 1, positive 3 at rank 2: AP 1/2
    #   q3: dots to 0, 1, 2 = 0.5, 0.1, 0.05 -> order 0 1 2, positive 2 at rank 3: AP 1/3
    # R@1 = 1/4 (q1 only), R@2 = 3/4 (all but q3).
    x2 = np.array([[1.0], [0.2], [0.1], [0.5]])
    r2 = evaluate_labelled(x2, [0, 0, 1, 1], ks=(1, 2))
    assert r2.ap == pytest.approx([0.5, 1.0, 0.5, 1 / 3])
    assert r2.recall_at_k == pytest.approx({1: 0.25, 2: 0.75})


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_labelled_against_brute_force(chunk_size):
    rng = np.random.default_rng(11)
    n = 45
    # Small integer descriptors create exact score ties; the tie rule must match.
    x = rng.integers(-2, 3, size=(n, 4)).astype(np.float64)
    labels = rng.integers(0, 6, size=n)
    labels[-1] = 99  # a singleton class
    ks = (1, 4, 10)
    got = evaluate_labelled(x, labels, ks=ks, chunk_size=chunk_size)
    ref_ap, ref_hits = reference_labelled(x, labels.tolist(), ks)
    np.testing.assert_allclose(got.ap, ref_ap, atol=1e-12, equal_nan=True)
    valid = ~np.isnan(ref_ap)
    assert got.n_excluded == int((~valid).sum()) >= 1
    assert got.map == pytest.approx(ref_ap[valid].mean())
    for k in ks:
        expected = np.mean([h for h in ref_hits[k] if h is not None])
        assert got.recall_at_k[k] == pytest.approx(expected)


def test_labelled_float32_and_validation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.repeat(np.arange(6), 5)
    r = evaluate_labelled(x, y)
    assert isinstance(r, LabelledResult) and 0 < r.map < 1 and r.n_excluded == 0
    # Perfectly separable classes (each class one orthogonal direction) -> mAP 1.
    e = np.eye(6, dtype=np.float32)[y]
    assert evaluate_labelled(e, y).map == 1.0
    with pytest.raises(ValueError, match="labels"):
        evaluate_labelled(x, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_labelled(np.full((3, 2), np.nan), [0, 0, 1])
    with pytest.raises(ValueError, match="ks"):
        evaluate_labelled(x, y, ks=(0,))


def test_load_labelled_folder(tmp_path):
    layout = {
        "b_cls": ["2.JPG", "1.png", "notes.txt", ".hidden.jpg"],
        "a_cls": ["x.webp", "sub/y.TIFF"],
    }
    for cls, files in layout.items():
        for f in files:
            (tmp_path / cls / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / cls / f).write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    paths, labels, classes = load_labelled_folder(tmp_path)
    assert classes == ["a_cls", "b_cls"]
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "a_cls/sub/y.TIFF", "a_cls/x.webp", "b_cls/1.png", "b_cls/2.JPG"
    ]
    assert labels.tolist() == [0, 0, 1, 1]
    (tmp_path / "empty_cls").mkdir()
    with pytest.raises(ValueError, match="empty_cls"):
        load_labelled_folder(tmp_path)
    with pytest.raises(NotADirectoryError):
        load_labelled_folder(tmp_path / "nope")


def test_load_labelled_csv(tmp_path):
    (tmp_path / "img").mkdir()
    for n in ("1.jpg", "2.jpg", "3.jpg"):
        (tmp_path / "img" / n).write_bytes(b"")
    abs_path = tmp_path / "img" / "3.jpg"
    csv_path = tmp_path / "set.csv"
    csv_path.write_text(f"path,label\nimg/1.jpg,dog\n\nimg/2.jpg,cat\n{abs_path},dog\n")
    paths, labels, classes = load_labelled_csv(csv_path)
    assert paths == [tmp_path / "img/1.jpg", tmp_path / "img/2.jpg", abs_path]
    assert classes == ["cat", "dog"] and labels.tolist() == [1, 0, 1]
    # No header is fine too.
    csv_path.write_text("img/1.jpg,dog\nimg/2.jpg,cat\n")
    assert load_labelled_csv(csv_path)[2] == ["cat", "dog"]
    csv_path.write_text("path,label\nimg/1.jpg,dog\nimg/2.jpg\n")
    with pytest.raises(ValueError, match=r"set\.csv:3: expected 2 columns"):
        load_labelled_csv(csv_path)
    csv_path.write_text("img/1.jpg,dog\nimg/missing.jpg,cat\n")
    with pytest.raises(FileNotFoundError, match=r"set\.csv:2: .*missing\.jpg"):
        load_labelled_csv(csv_path)
    assert len(load_labelled_csv(csv_path, check_exists=False)[0]) == 2
    csv_path.write_text("path,label\n")
    with pytest.raises(ValueError, match="no 'path,label' rows"):
        load_labelled_csv(csv_path)


# --------------------------------------------------------------------------------------
# Results as data
# --------------------------------------------------------------------------------------


def test_to_dict_save_json_and_table(tmp_path):
    gt = _protocol_toy()
    ranks = np.array([[3, 2, 0, 1, 4, 5], [4, 0, 5, 1, 2, 3]])
    r = evaluate_revisitop(ranks, gt)
    d = r.to_dict()
    assert d["hard"]["ap"][1] is None and d["hard"]["n_empty"] == 1
    assert d["medium"]["map"] == pytest.approx((5 / 12 + 19 / 24) / 2)
    out = save_json(r, tmp_path / "sub" / "res.json")
    loaded = json.loads(out.read_text())
    assert loaded["query_names"] == ["q0", "q1"] and loaded["easy"]["mp_at_k"]["1"] is not None
    table = format_table(r)
    lines = table.splitlines()
    assert lines[1].split() == ["Easy", "Medium", "Hard"]
    # mAP row: Easy (1/4 + 19/24)/2 = 52.08 %, Medium 60.42 %, Hard 25.00 %.
    assert lines[2].split() == ["mAP", "52.08", "60.42", "25.00"]
    assert [ln.split()[0] for ln in lines[3:6]] == ["mP@1", "mP@5", "mP@10"]
    assert "Hard 1" in table
    with pytest.raises(TypeError):
        format_table({"map": 1})
    with pytest.raises(TypeError, match="baseline"):
        format_table(r, baseline=evaluate_labelled(np.eye(3), [0, 0, 1]))


def test_labelled_to_dict_and_table(tmp_path):
    r = evaluate_labelled(np.eye(4)[[0, 0, 1, 2]], [0, 0, 1, 2], ks=(1, 5))
    d = json.loads(save_json(r, tmp_path / "l.json").read_text())
    assert d["kind"] == "labelled" and d["ap"][2] is None and d["n_excluded"] == 2
    table = format_table(r)
    assert "R@5" in table and "100.00" in table


# --------------------------------------------------------------------------------------
# Recall@k (place-recognition style): a positive among the first k, junk removed
# --------------------------------------------------------------------------------------


def _recall_loop(ranks, gt, protocol, kappas):
    ok_sets, junk_sets = revisitop_protocol(gt, protocol)
    out = []
    for q in range(gt.n_queries):
        ok, junk = set(ok_sets[q].tolist()), set(junk_sets[q].tolist())
        if not ok:
            out.append([math.nan] * len(kappas))
            continue
        kept = [i for i in ranks[q].tolist() if i not in junk or i in ok]
        first = next(r for r, i in enumerate(kept, 1) if i in ok)
        out.append([float(first <= k) for k in kappas])
    return np.array(out)


def test_recall_at_k_matches_a_loop():
    for seed in range(5):
        gt = toy_gt(n_db=30, n_q=7, seed=seed)
        ranks = np.stack([np.random.default_rng(seed * 10 + q).permutation(30) for q in range(7)])
        res = evaluate_revisitop(ranks, gt, kappas=(1, 3, 10))
        for p in ("easy", "medium", "hard"):
            ref = _recall_loop(ranks, gt, p, (1, 3, 10))
            got = res.protocol(p)
            np.testing.assert_array_equal(np.isnan(got.hit_at_k), np.isnan(ref))
            np.testing.assert_allclose(np.nan_to_num(got.hit_at_k, nan=-1), np.nan_to_num(ref, nan=-1))
            valid = ~np.isnan(ref[:, 0])
            for t, k in enumerate((1, 3, 10)):
                if valid.any():
                    assert got.recall_at_k[k] == pytest.approx(ref[valid, t].mean())


def test_recall_at_k_by_hand_and_in_the_table():
    # the ranking of the AP example above: the first positive is at junk-free rank 1 ... here 2
    gt = RevisitopGroundTruth("hand", [f"d{i}" for i in range(10)], ["q"], [None],
                              [np.array([2, 0, 4])], [np.array([], np.int64)], [np.array([7, 9])])
    ranks = np.array([[5, 2, 7, 0, 9, 3, 1, 4, 6, 8]])
    r = evaluate_revisitop(ranks, gt, kappas=(1, 2, 5)).easy
    assert r.recall_at_k == {1: 0.0, 2: 1.0, 5: 1.0}
    base = random_baseline_revisitop(gt, n_trials=4000, seed=0, kappas=(1,)).easy
    assert base.recall_at_k[1] == pytest.approx(3 / 8, abs=0.03)  # 3 positives among 8 non-junk items
    assert "R@1" in format_table(evaluate_revisitop(ranks, gt, kappas=(1, 2, 5)))
