"""Tests for imret.mining: every miner against brute-force loops on small seeded data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from imret.mining import (
    EpochSample,
    all_pairs,
    all_triplets,
    batch_hard_triplets,
    epoch_tuples,
    hard_pairs,
    make_tuples,
    margin_triplets,
    mine_hard_negatives,
    mine_hard_positives,
    pairwise_distance,
    positive_pairs_from_labels,
    sample_epoch,
    semi_hard_triplets,
)

# ----------------------------------------------------------------------------- references


def brute_negatives(q, pool, ql, pl, k, exclude=None):
    """Walk each query's ranking (ties by lower index), skipping used labels: cirtorch's loop."""
    out = np.full((len(q), k), -1, dtype=np.int64)
    for i in range(len(q)):
        sims = [float(np.dot(q[i], pool[j])) for j in range(len(pool))]
        order = sorted(range(len(pool)), key=lambda j: (-sims[j], j))
        used = {ql[i]}
        picks = []
        for j in order:
            if len(picks) == k:
                break
            if pl[j] in used or (exclude is not None and j in exclude[i]):
                continue
            picks.append(j)
            used.add(pl[j])
        out[i, : len(picks)] = picks
    return out


def brute_hard_positives(q, cand, ql, cl, exclude=None):
    out = np.full(len(q), -1, dtype=np.int64)
    for i in range(len(q)):
        best = None
        for j in range(len(cand)):
            if cl[j] != ql[i] or (exclude is not None and j in exclude[i]):
                continue
            s = float(np.dot(q[i], cand[j]))
            if best is None or s < best[0]:
                best = (s, j)
        if best is not None:
            out[i] = best[1]
    return out


def dist_matrix(x):
    n = len(x)
    return [[float(torch.linalg.vector_norm(x[i] - x[j])) for j in range(n)] for i in range(n)]


def labelled_desc(seed, n, d, n_labels, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(dtype)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, rng.integers(0, n_labels, n)


# ------------------------------------------------------------------- mine_hard_negatives


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_hard_negatives_match_brute_force(chunk_size):
    q, ql = labelled_desc(0, 20, 8, 7)
    pool, pl = labelled_desc(1, 60, 8, 7)
    got = mine_hard_negatives(q, pool, ql, pl, k=5, chunk_size=chunk_size)
    assert got.dtype == np.int64 and got.shape == (20, 5)
    np.testing.assert_array_equal(got, brute_negatives(q, pool, ql, pl, 5))


def test_hard_negatives_ties_go_to_lower_index():
    rng = np.random.default_rng(3)
    # small integer descriptors: many exactly equal similarities, exact in float32
    q = rng.integers(0, 3, (15, 3)).astype(np.float32)
    pool = rng.integers(0, 3, (40, 3)).astype(np.float32)
    ql, pl = rng.integers(0, 6, 15), rng.integers(0, 6, 40)
    got = mine_hard_negatives(q, pool, ql, pl, k=4)
    np.testing.assert_array_equal(got, brute_negatives(q, pool, ql, pl, 4))
    # also with duplicated pool rows of different labels: the first index wins
    pool2 = np.repeat(pool[:5], 2, axis=0)
    pl2 = np.arange(10)
    np.testing.assert_array_equal(
        mine_hard_negatives(q, pool2, ql, pl2, k=3), brute_negatives(q, pool2, ql, pl2, 3)
    )


def test_hard_negatives_properties_on_larger_data():
    q, ql = labelled_desc(5, 50, 16, 30)
    pool, pl = labelled_desc(6, 400, 16, 30)
    got = mine_hard_negatives(torch.from_numpy(q).float(), torch.from_numpy(pool).float(), ql, pl, k=10)
    sims = q @ pool.T
    for i, row in enumerate(got):
        assert (row >= 0).all()
        labels = pl[row]
        assert len(set(labels)) == len(labels)  # at most one per label
        assert ql[i] not in labels  # never the query's own label
        assert np.all(np.diff(sims[i, row]) <= 1e-6)  # most similar first
        # nothing better was skipped: every usable item more similar than the last pick
        # has a label already taken
        better = np.flatnonzero((sims[i] > sims[i, row[-1]] + 1e-6) & (pl != ql[i]))
        assert set(pl[better]) <= set(labels)


def test_hard_negatives_pad_with_minus_one():
    pool = np.eye(4)
    pl = np.array([0, 1, 1, 2])
    q = np.array([[1.0, 0.5, 0.2, 0.1], [0.0, 0.0, 0.0, 1.0]])
    got = mine_hard_negatives(q, pool, np.array([0, 9]), pl, k=5)
    # query 0 (label 0): labels 1 and 2 remain -> 2 picks; query 1 (label 9 not in pool): 3 labels
    np.testing.assert_array_equal(got, [[1, 3, -1, -1, -1], [3, 0, 1, -1, -1]])
    # a pool holding only the query's label gives nothing
    np.testing.assert_array_equal(mine_hard_negatives(q[:1], pool[:1], [0], [0], k=2), [[-1, -1]])
    # empty pool, no queries, k = 0
    assert mine_hard_negatives(q, np.zeros((0, 4)), [0, 1], np.zeros(0, int), k=2).tolist() == [[-1, -1]] * 2
    assert mine_hard_negatives(np.zeros((0, 4)), pool, np.zeros(0, int), pl, k=3).shape == (0, 3)
    assert mine_hard_negatives(q, pool, [0, 9], pl, k=0).shape == (2, 0)


def test_hard_negatives_exclude_list_and_mask():
    q, ql = labelled_desc(7, 12, 6, 5)
    pool, pl = labelled_desc(8, 30, 6, 5)
    rng = np.random.default_rng(0)
    excl = [set(rng.choice(30, size=int(rng.integers(0, 8)), replace=False).tolist()) for _ in range(12)]
    mask = np.zeros((12, 30), dtype=bool)
    for i, s in enumerate(excl):
        mask[i, list(s)] = True
    want = brute_negatives(q, pool, ql, pl, 3, exclude=excl)
    np.testing.assert_array_equal(mine_hard_negatives(q, pool, ql, pl, 3, exclude=[sorted(s) for s in excl]), want)
    np.testing.assert_array_equal(mine_hard_negatives(q, pool, ql, pl, 3, exclude=mask, chunk_size=5), want)
    np.testing.assert_array_equal(mine_hard_negatives(q, pool, ql, pl, 3, exclude=torch.from_numpy(mask)), want)


def test_hard_negatives_string_labels_and_torch_labels():
    q, ql = labelled_desc(9, 10, 5, 4)
    pool, pl = labelled_desc(10, 25, 5, 4)
    want = brute_negatives(q, pool, ql, pl, 3)
    names = np.array(["a", "b", "c", "d"])
    np.testing.assert_array_equal(mine_hard_negatives(q, pool, names[ql], names[pl], 3), want)
    np.testing.assert_array_equal(
        mine_hard_negatives(q, pool, torch.from_numpy(ql), torch.from_numpy(pl), 3), want
    )
    with pytest.raises(TypeError, match="both integers or both strings"):
        mine_hard_negatives(q, pool, ql, names[pl], 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hard_negatives_on_cuda_match_cpu():
    q, ql = labelled_desc(11, 64, 32, 20, dtype=np.float32)
    pool, pl = labelled_desc(12, 500, 32, 20, dtype=np.float32)
    cpu = mine_hard_negatives(torch.from_numpy(q), torch.from_numpy(pool), ql, pl, 5)
    gpu = mine_hard_negatives(torch.from_numpy(q).cuda(), torch.from_numpy(pool).cuda(), ql, pl, 5)
    np.testing.assert_array_equal(cpu, gpu)


def test_hard_negatives_reject_bad_input():
    q, ql = labelled_desc(0, 4, 3, 2)
    with pytest.raises(ValueError, match="dimension"):
        mine_hard_negatives(q, np.zeros((5, 4)), ql, np.zeros(5, int))
    with pytest.raises(ValueError, match="NaN"):
        bad = q.copy()
        bad[0, 0] = np.nan
        mine_hard_negatives(bad, q, ql, ql)
    with pytest.raises(ValueError, match="entries"):
        mine_hard_negatives(q, q, ql[:2], ql)
    with pytest.raises(ValueError, match="k must"):
        mine_hard_negatives(q, q, ql, ql, k=-1)
    with pytest.raises(ValueError, match="exclude mask"):
        mine_hard_negatives(q, q, ql, ql, exclude=np.zeros((4, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"exclude\[1\]"):
        mine_hard_negatives(q, q, ql, ql, exclude=[[], [7], [], []])


# ------------------------------------------------------------------------------ positives


def test_hard_positives_match_brute_force():
    q, ql = labelled_desc(13, 15, 6, 4)
    cand, cl = labelled_desc(14, 30, 6, 5)  # label 4 has no query; some queries may lack positives
    excl = [[i] for i in range(15)]
    np.testing.assert_array_equal(mine_hard_positives(q, cand, ql, cl), brute_hard_positives(q, cand, ql, cl))
    np.testing.assert_array_equal(
        mine_hard_positives(q, cand, ql, cl, exclude=excl, chunk_size=4),
        brute_hard_positives(q, cand, ql, cl, exclude=excl),
    )
    # queries as their own candidates: excluding self, a singleton class has none
    lab = np.array([0, 0, 0, 1])
    x = np.array([[1.0, 0], [0.9, 0.1], [0, 1.0], [1.0, 1.0]])
    got = mine_hard_positives(x, x, lab, lab, exclude=[[i] for i in range(4)])
    np.testing.assert_array_equal(got, [2, 2, 0, -1])


def test_positive_pairs_from_labels():
    labels = np.array([3, 1, 3, 3, 7, 1])
    want = sorted((i, j) for i, j in itertools.permutations(range(6), 2) if labels[i] == labels[j])
    got = positive_pairs_from_labels(labels)
    assert got.dtype == np.int64 and got.shape == (len(want), 2)
    assert [tuple(r) for r in got.tolist()] == want
    assert positive_pairs_from_labels([1, 2, 3]).shape == (0, 2)
    assert positive_pairs_from_labels(np.array(["a", "b", "a"])).tolist() == [[0, 2], [2, 0]]


# ------------------------------------------------------------------ epoch sampling, tuples


def test_sample_epoch_from_labels():
    labels = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])  # 1, 3, 5 are singletons
    s = sample_epoch(7, num_images=10, qsize=100, poolsize=6, labels=labels)
    eligible = {0, 1, 3, 4, 5, 7, 8}
    assert set(s.query_ids.tolist()) == eligible  # capped at the eligible ones, no repeats
    assert len(s.query_ids) == 7
    assert (labels[s.positive_ids] == labels[s.query_ids]).all()
    assert (s.positive_ids != s.query_ids).all()
    assert len(set(s.pool_ids.tolist())) == 6 and s.pool_ids.max() < 10
    again = sample_epoch(7, num_images=10, qsize=100, poolsize=6, labels=labels)
    for a, b in zip((s.query_ids, s.positive_ids, s.pool_ids), (again.query_ids, again.positive_ids, again.pool_ids)):
        np.testing.assert_array_equal(a, b)
    other = sample_epoch(8, num_images=10, qsize=100, poolsize=6, labels=labels)
    assert not np.array_equal(s.pool_ids, other.pool_ids) or not np.array_equal(s.query_ids, other.query_ids)
    # every other member of a class is a possible positive
    seen = set()
    for seed in range(60):
        e = sample_epoch(seed, num_images=10, qsize=100, poolsize=1, labels=labels)
        seen |= {int(p) for qq, p in zip(e.query_ids, e.positive_ids) if qq == 3}
    assert seen == {4, 5}


def test_sample_epoch_from_pairs_and_errors():
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    s = sample_epoch(np.random.default_rng(0), num_images=8, qsize=3, poolsize=100, pairs=pairs)
    assert len(s.query_ids) == 3
    rows = {tuple(r) for r in pairs.tolist()}
    assert all((int(a), int(b)) in rows for a, b in zip(s.query_ids, s.positive_ids))
    assert len(set(zip(s.query_ids.tolist(), s.positive_ids.tolist()))) == 3
    assert sorted(s.pool_ids.tolist()) == list(range(8))  # poolsize capped at num_images
    with pytest.raises(ValueError, match="exactly one"):
        sample_epoch(0, num_images=8, qsize=3, poolsize=4)
    with pytest.raises(ValueError, match="exactly one"):
        sample_epoch(0, num_images=8, qsize=3, poolsize=4, pairs=pairs, labels=np.zeros(8, int))
    with pytest.raises(ValueError, match="outside"):
        sample_epoch(0, num_images=5, qsize=3, poolsize=4, pairs=pairs)
    with pytest.raises(ValueError, match="num_images"):
        sample_epoch(0, num_images=5, qsize=3, poolsize=4, labels=np.zeros(8, int))


def test_make_tuples_maps_pool_positions_and_handles_incomplete():
    pool_ids = np.array([10, 11, 12, 13])
    neg = np.array([[2, 0], [3, -1]])
    keep = make_tuples([1, 2], [5, 6], neg, pool_ids=pool_ids, incomplete="keep")
    np.testing.assert_array_equal(keep, [[1, 5, 12, 10], [2, 6, 13, -1]])
    np.testing.assert_array_equal(make_tuples([1, 2], [5, 6], neg, pool_ids=pool_ids), [[1, 5, 12, 10]])
    with pytest.raises(ValueError, match="fewer than 2 negatives"):
        make_tuples([1, 2], [5, 6], neg, pool_ids=pool_ids, incomplete="error")
    with pytest.raises(ValueError, match="available"):
        make_tuples([1], [5], [[0]], incomplete="maybe")
    np.testing.assert_array_equal(make_tuples([1], [5], [[7]]), [[1, 5, 7]])  # dataset ids as given
    assert make_tuples([1, 2], [5, 6], np.zeros((2, 0), dtype=np.int64)).shape == (2, 2)


def test_epoch_tuples_end_to_end():
    rng = np.random.default_rng(1)
    n = 80
    labels = rng.integers(0, 12, n)
    labels[1] = (labels[0] + 1) % 12
    desc = rng.normal(size=(n, 16))
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    # a pair whose positive has another cluster label: it must still never be a negative
    pairs = np.concatenate([positive_pairs_from_labels(labels), [[0, 1]]])
    s = sample_epoch(3, num_images=n, qsize=25, poolsize=50, pairs=pairs)
    pool = rng.permutation(np.unique(np.concatenate([s.pool_ids[:48], [0, 1]])))
    s = EpochSample(np.append(s.query_ids, 0), np.append(s.positive_ids, 1), pool)
    tuples = epoch_tuples(s, desc[s.query_ids], desc[s.pool_ids], labels, k=4, incomplete="keep")
    assert tuples.shape == (len(s.query_ids), 6)
    np.testing.assert_array_equal(tuples[:, 0], s.query_ids)
    np.testing.assert_array_equal(tuples[:, 1], s.positive_ids)
    pool_set = set(s.pool_ids.tolist())
    for row in tuples:
        qi, pi, negs = row[0], row[1], row[2:]
        negs = negs[negs >= 0]
        assert set(negs.tolist()) <= pool_set
        assert qi not in negs and pi not in negs
        assert labels[qi] not in labels[negs]
        assert len(set(labels[negs].tolist())) == len(negs)
    # the same as mining by hand with the query and positive excluded
    pos = {int(i): p for p, i in enumerate(s.pool_ids)}
    excl = [{pos[i] for i in (qq, pp) if i in pos} for qq, pp in zip(s.query_ids.tolist(), s.positive_ids.tolist())]
    ref = brute_negatives(desc[s.query_ids], desc[s.pool_ids], labels[s.query_ids], labels[s.pool_ids], 4, excl)
    want = np.where(ref >= 0, s.pool_ids[np.maximum(ref, 0)], -1)
    np.testing.assert_array_equal(tuples[:, 2:], want)
    assert epoch_tuples(s, desc[s.query_ids], desc[s.pool_ids], labels, k=0).shape == (len(s.query_ids), 2)


# ---------------------------------------------------------------------- in-batch mining


def batch(seed=0, b=16, d=6, n_labels=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype)
    labels = torch.randint(0, n_labels, (b,), generator=g)
    return x, labels


def test_pairwise_distance():
    x, _ = batch()
    y = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(pairwise_distance(x, y), torch.cdist(x, y))
    d = pairwise_distance(x)
    assert (d.diagonal() == 0).all()
    torch.testing.assert_close(d, torch.tensor(dist_matrix(x), dtype=torch.float64))
    cos = torch.nn.functional.cosine_similarity(x[:, None], x[None], dim=2)
    want = 1 - cos
    want.fill_diagonal_(0)
    torch.testing.assert_close(pairwise_distance(x, metric="cosine"), want)
    with pytest.raises(ValueError, match="available: euclidean, cosine"):
        pairwise_distance(x, metric="manhattan")


def test_all_pairs_and_all_triplets_match_loops():
    _, labels = batch(1, b=10)
    lab = labels.tolist()
    a1, p, a2, n = all_pairs(labels)
    assert list(zip(a1.tolist(), p.tolist())) == [
        (i, j) for i in range(10) for j in range(10) if i != j and lab[i] == lab[j]
    ]
    assert list(zip(a2.tolist(), n.tolist())) == [(i, j) for i in range(10) for j in range(10) if lab[i] != lab[j]]
    a, p, n = all_triplets(labels)
    want = [
        (i, j, m)
        for i in range(10)
        for j in range(10)
        for m in range(10)
        if i != j and lab[i] == lab[j] and lab[i] != lab[m]
    ]
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == want


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_batch_hard_matches_loops(metric):
    x, labels = batch(2, b=20, n_labels=5)
    lab = labels.tolist()
    d = pairwise_distance(x, metric=metric).tolist()
    want = []
    for i in range(20):
        pos = [j for j in range(20) if j != i and lab[j] == lab[i]]
        neg = [j for j in range(20) if lab[j] != lab[i]]
        if pos and neg:
            want.append((i, max(pos, key=lambda j: (d[i][j], -j)), min(neg, key=lambda j: (d[i][j], j))))
    a, p, n = batch_hard_triplets(x, labels, metric=metric)
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == want
    assert a.dtype == torch.long and a.device == x.device


@pytest.mark.parametrize("kind", ["semihard", "hard", "violating", "easy"])
def test_margin_triplets_match_loops(kind):
    x, labels = batch(3, b=12, n_labels=3)
    x = torch.nn.functional.normalize(x, dim=1)
    lab = labels.tolist()
    d = dist_matrix(x)
    margin = 0.3
    band = {
        "semihard": lambda m: 0 < m <= margin,
        "hard": lambda m: m <= 0,
        "violating": lambda m: m <= margin,
        "easy": lambda m: m > margin,
    }[kind]
    want = [
        (i, j, m)
        for i in range(12)
        for j in range(12)
        for m in range(12)
        if i != j and lab[i] == lab[j] and lab[i] != lab[m] and band(d[i][m] - d[i][j])
    ]
    got = margin_triplets(x, labels, margin, kind=kind)
    assert list(zip(*(t.tolist() for t in got))) == want
    assert len(want) > 0
    if kind == "semihard":
        assert [t.tolist() for t in semi_hard_triplets(x, labels, margin)] == [t.tolist() for t in got]


def test_hard_pairs_match_loops():
    x, labels = batch(4, b=14, n_labels=4)
    x = torch.nn.functional.normalize(x, dim=1)
    lab = labels.tolist()
    d = dist_matrix(x)
    a1, p, a2, n = hard_pairs(x, labels, pos_margin=0.8, neg_margin=1.2)
    assert list(zip(a1.tolist(), p.tolist())) == [
        (i, j) for i in range(14) for j in range(14) if i != j and lab[i] == lab[j] and d[i][j] > 0.8
    ]
    assert list(zip(a2.tolist(), n.tolist())) == [
        (i, j) for i in range(14) for j in range(14) if lab[i] != lab[j] and d[i][j] < 1.2
    ]


def test_in_batch_degenerate_batches_and_no_grad():
    x, _ = batch(5, b=6)
    x.requires_grad_(True)
    same = torch.zeros(6, dtype=torch.long)
    distinct = torch.arange(6)
    for labels in (same, distinct):
        a, p, n = batch_hard_triplets(x, labels)
        assert a.numel() == p.numel() == n.numel() == 0
        assert all(t.numel() == 0 for t in all_triplets(labels))
        assert all(t.numel() == 0 for t in margin_triplets(x, labels, 0.5, kind="violating"))
    a1, p, a2, n = all_pairs(same)
    assert a1.numel() == 30 and a2.numel() == 0
    a1, p, a2, n = all_pairs(distinct)
    assert a1.numel() == 0 and a2.numel() == 30
    a, p, n = batch_hard_triplets(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert not a.requires_grad and a.numel() == 6


def test_in_batch_reject_bad_input():
    x, labels = batch(6, b=8)
    with pytest.raises(ValueError, match="8 rows"):
        batch_hard_triplets(x, labels[:5])
    with pytest.raises(TypeError, match="integers"):
        batch_hard_triplets(x, labels.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        batch_hard_triplets(x.numpy(), labels)
    with pytest.raises(ValueError, match="available: semihard"):
        margin_triplets(x, labels, 0.1, kind="medium")
    with pytest.raises(ValueError, match="finite"):
        margin_triplets(x, labels, float("nan"))


def test_margin_triplets_band_edges():
    # anchor 0: its positive 1 and negative 2 are at the same distance (gap exactly 0)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])

    def triplets(kind, margin=0.5):
        return list(zip(*(t.tolist() for t in margin_triplets(x, labels, margin, kind=kind))))

    assert triplets("semihard") == []
    assert triplets("hard") == [(0, 1, 2), (1, 0, 2)]
    assert triplets("violating") == [(0, 1, 2), (1, 0, 2)]
    assert triplets("easy", margin=-0.5) == [(0, 1, 2)]
    assert triplets("semihard", margin=1.0) == []  # gap 0 is not semi-hard; gap -1 is hard


def test_pairwise_distance_gradient_is_finite_at_zero():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    d = pairwise_distance(x)
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert d[0, 1] == 0 and d[0, 2] > 0
