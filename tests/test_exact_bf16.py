"""Exact search with a bf16 first pass: the error bound holds and both precisions return the
same ids and scores as a brute-force reference, bit for bit, on adversarial near-ties."""

import numpy as np
import pytest
import torch

from imret.index import check_spec, create_backend
from imret.index import exact as exact_mod
from imret.index.exact import ExactBackend, error_bound, exact_scores, exact_search, prepare_rows, resolve_precision

needs_bf16 = pytest.mark.skipif(exact_mod.bf16_speedup() == 0.0,
                                reason="this machine's bf16 matrix product does not accumulate in float32")


MID = 0.798828125  # (204 + 205) / 2 / 256


def unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def reference(q, x, k, alive=None):
    """Brute force: every pair scored by exact_scores, sorted by (score desc, row asc)."""
    qt, xt = torch.from_numpy(q), torch.from_numpy(x)
    s = torch.stack([exact_scores(xt, qt[i].expand_as(xt)) for i in range(q.shape[0])]).numpy()
    if alive is not None:
        s[:, ~alive] = -np.inf
    out_s = np.full((q.shape[0], k), -np.inf, np.float32)
    out_i = np.full((q.shape[0], k), -1, np.int64)
    for i in range(q.shape[0]):
        order = np.lexsort((np.arange(x.shape[0]), -s[i]))
        order = order[np.isfinite(s[i][order])][:k]
        out_s[i, :order.size], out_i[i, :order.size] = s[i][order], order
    return out_s, out_i


def near_ties(n_queries=4, cluster=300, n_random=3000, dim=256, seed=0):
    """Per query a cluster of rows whose scores sit at c ± 1e-7..1e-4 (both signs), plus random
    rows far below; returns queries, rows and the rank k that falls inside the clusters.

    c = 0.798828125 is halfway between two neighbouring bfloat16 numbers (204/256 and 205/256),
    so the bf16 first pass rounds the cluster's scores to either, at random: the first pass
    alone cannot order it."""
    rs = np.random.default_rng(seed)
    q = unit(rs.standard_normal((n_queries, dim)))
    rows = [unit(rs.standard_normal((n_random, dim)))]
    for i in range(n_queries):
        delta = np.logspace(-7, -4, cluster // 2)
        target = MID + np.concatenate([delta, -delta])
        z = rs.standard_normal((cluster, dim))
        z -= (z @ q[i].astype(np.float64))[:, None] * q[i][None, :]
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        rows.append((target[:, None] * q[i][None, :] + np.sqrt(1 - target ** 2)[:, None] * z).astype(np.float32))
    x = np.concatenate(rows)
    x = x[rs.permutation(x.shape[0])]
    return q, np.ascontiguousarray(x), cluster // 2


@pytest.fixture(params=["rows", "queries"])
def orientation(request, monkeypatch):
    """Both layouts of the fp32 first pass: (rows x queries) with group maxima, which search
    takes from _BY_ROWS_MIN_QUERIES queries on, and (queries x rows) with top-k below it."""
    monkeypatch.setattr(exact_mod, "_BY_ROWS_MIN_QUERIES", 1 if request.param == "rows" else 10**9)
    return request.param


def assert_same(a, b):
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


@needs_bf16
@pytest.mark.parametrize("block_rows", [None, 997])
def test_near_ties_both_precisions_equal_reference(block_rows, orientation):
    q, x, k = near_ties()
    ref = reference(q, x, k)
    # the k-th score really is inside a cluster of near-ties
    assert np.all(np.abs(ref[0][:, -1] - MID) < 2e-4)
    for precision in ("fp32", "bf16"):
        assert_same(exact_search(q, x, k, precision=precision, block_rows=block_rows), ref)


@needs_bf16
def test_too_small_bound_breaks_the_result(monkeypatch):
    """The equality above depends on the bound: a bound 10^6 times too small gives other rows."""
    q, x, k = near_ties()
    ref = reference(q, x, k)
    true_bound = exact_mod.error_bound

    def tiny(qt, stats, precision):
        eps, r = true_bound(qt, stats, precision)
        return eps * 1e-6, r * 1e-6

    monkeypatch.setattr(exact_mod, "error_bound", tiny)
    monkeypatch.setattr(exact_mod, "_CHECK_BOUND", False)  # else the search notices (next test)
    s, i = exact_search(q, x, k, precision="bf16")
    assert not np.array_equal(i, ref[1])


@needs_bf16
def test_a_broken_bound_is_caught_and_fp32_takes_over(monkeypatch):
    """Each search checks the bound on its re-scored candidates; a bf16 product that broke it
    (here: a bound 10^6 times too small) sends this and later searches to fp32."""
    q, x, k = near_ties(n_queries=2)
    ref = reference(q, x, k)
    true_bound = exact_mod.error_bound

    def tiny_bf16(qt, stats, precision):
        eps, r = true_bound(qt, stats, precision)
        return (eps * 1e-6, r * 1e-6) if precision == "bf16" else (eps, r)

    monkeypatch.setattr(exact_mod, "error_bound", tiny_bf16)
    monkeypatch.setitem(exact_mod._SPEEDUP, "bf16", 2.0)
    assert_same(exact_search(q, x, k, precision="bf16"), ref)
    assert exact_mod._SPEEDUP["bf16"] == 0.0
    assert resolve_precision("auto") == "fp32"


@needs_bf16
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bound_holds_for_every_pair(precision):
    """|first-pass score − exact score| ≤ eps + r·|first-pass score| on near-ties, random and
    non-normalised rows (the bound is also checked not to be vacuous)."""
    q, x, _ = near_ties(n_random=2000)
    rs = np.random.default_rng(1)
    x = np.concatenate([x, unit(rs.standard_normal((500, 256))) * rs.uniform(0.01, 50, (500, 1)).astype(np.float32)])
    q = np.concatenate([q, unit(rs.standard_normal((4, 256))) * np.float32(7.5)])
    qt, xt = torch.from_numpy(q), torch.from_numpy(x)
    xr, stats = prepare_rows(x, precision)
    a = (qt.bfloat16() @ xr.T).double() if precision == "bf16" else (qt @ xt.T).double()
    e = torch.stack([exact_scores(xt, qt[i].expand_as(xt)) for i in range(q.shape[0])]).double()
    eps, r = error_bound(qt, stats, precision)
    err = (a - e).abs()
    assert bool((err <= eps[:, None] + r * a.abs()).all())
    # not vacuous: about the size the derivation predicts for unit rows
    unit_eps = float(eps[0]) / (float(np.linalg.norm(q[0])) * stats.x)
    assert unit_eps < (0.02 if precision == "bf16" else 1e-4)
    assert float(err.max()) > 0


@needs_bf16
@pytest.mark.parametrize("k", [1, 7, 50, 401, 5000])
def test_duplicates_and_k_beyond_n(k, orientation):
    """Exact duplicates (ties broken by row), more duplicates than the first pass keeps per
    block (forces the rescan), k > N; alive mask and ids."""
    rs = np.random.default_rng(2)
    base = unit(rs.standard_normal((3, 64)))
    x = np.concatenate([unit(rs.standard_normal((1500, 64))), np.repeat(base, 400, axis=0)])
    x = x[rs.permutation(x.shape[0])]
    q = np.concatenate([base, unit(rs.standard_normal((5, 64)))])
    alive = rs.random(x.shape[0]) > 0.1
    ids = rs.permutation(10 * x.shape[0])[: x.shape[0]].astype(np.int64)
    ref_s, ref_rows = reference(q, x, k, alive)
    ref_ids = np.where(ref_rows >= 0, ids[np.maximum(ref_rows, 0)], -1)
    for precision in ("fp32", "bf16"):
        for block_rows in (None, 333):
            got = exact_search(q, x, k, ids=ids, alive=alive, precision=precision, block_rows=block_rows)
            assert_same(got, (ref_s, ref_ids))


@needs_bf16
def test_random_and_unnormalised_rows_match_float64():
    """Scaled rows (norms 0.001..1000): identical across precisions, and the top-k agrees with a
    float64 product up to the float32 rounding of the scores."""
    rs = np.random.default_rng(3)
    x = rs.standard_normal((4000, 128)).astype(np.float32) * rs.uniform(1e-3, 1e3, (4000, 1)).astype(np.float32)
    q = rs.standard_normal((16, 128)).astype(np.float32) * np.float32(3)
    k = 20
    a = exact_search(q, x, k, precision="fp32")
    b = exact_search(q, x, k, precision="bf16")
    assert_same(a, b)
    assert_same(a, reference(q, x, k))
    s64 = q.astype(np.float64) @ x.astype(np.float64).T
    top = -np.sort(-s64, axis=1)[:, :k]
    np.testing.assert_allclose(a[0], top, rtol=1e-5, atol=1e-3)


def test_exact_scores_do_not_depend_on_the_batch():
    rs = np.random.default_rng(4)
    x = torch.from_numpy(rs.standard_normal((300, 512)).astype(np.float32))
    q = torch.from_numpy(rs.standard_normal((512,)).astype(np.float32))
    whole = exact_scores(x, q.expand_as(x))
    one_by_one = torch.cat([exact_scores(x[j:j + 1], q[None]) for j in range(300)])
    batched = exact_scores(x.view(3, 100, 512), q[None, None, :].expand(3, 100, 512), dim=2).flatten()
    assert torch.equal(whole, one_by_one) and torch.equal(whole, batched)
    # as the re-scoring runs it: 32 pairs at a time, products in place, scores into a buffer
    into = torch.empty(300)
    for a in range(0, 300, 32):
        xs = x[a:a + 32].clone()
        exact_scores(xs, q.expand_as(xs), out=xs, out_scores=into[a:a + 32])
    assert torch.equal(whole, into)


def test_precision_choices_and_spec(monkeypatch):
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        resolve_precision("fp16")
    with pytest.raises(ValueError, match="precision"):
        check_spec("exact?precision=int8")
    with pytest.raises(ValueError, match="only 'precision'"):
        check_spec("exact?nprobe=3")
    check_spec("exact?precision=bf16")
    monkeypatch.setitem(exact_mod._SPEEDUP, "bf16", 1.2)
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setitem(exact_mod._SPEEDUP, "bf16", 2.0)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setitem(exact_mod._SPEEDUP, "bf16", 0.0)
    assert resolve_precision("auto") == "fp32"
    with pytest.raises(ValueError, match="unavailable"):
        resolve_precision("bf16")


@needs_bf16
def test_backends_of_both_precisions_agree_through_add_and_remove(tmp_path):
    q, x, k = near_ties(n_queries=2, n_random=1000)
    ids = np.arange(x.shape[0], dtype=np.int64) * 3
    b32, b16 = create_backend("exact?precision=fp32", x.shape[1]), create_backend("exact?precision=bf16", x.shape[1])
    for b in (b32, b16):
        b.add(x[:800], ids[:800])
        b.search(q, k)  # prepares the rows; the next add must invalidate them
        b.add(x[800:], ids[800:])
        b.remove(ids[::7])
    assert_same(b32.search(q, k), b16.search(q, k))
    # the bfloat16 copy was extended by the second add, not rebuilt: the same as a fresh one
    xr, stats = b16._prepared_rows("bf16", x)
    xr_fresh, stats_fresh = prepare_rows(x, "bf16")
    assert torch.equal(xr, xr_fresh) and stats == stats_fresh
    alive = np.ones(x.shape[0], bool)
    alive[::7] = False
    ref_s, ref_rows = reference(q, x, k, alive)
    assert_same(b16.search(q, k), (ref_s, ids[ref_rows]))
    assert b16.describe()["precision"] == "bf16"
    b16.save(tmp_path)
    again = ExactBackend.load(tmp_path, spec="exact?precision=bf16")
    assert again.precision == "bf16"
    assert_same(again.search(q, k), b32.search(q, k))


@pytest.mark.parametrize("prepared", [False, True])
def test_group_selection_on_clustered_rows_matches_reference(prepared, orientation):
    """The fp32 first pass picks rows by group maxima (blocks of at least 2·keep groups of 64) and,
    with the rows prepared, drops rows the blocks before rule out. Rows near each query are stored
    contiguously (so a few groups hold most of its top k), with exact duplicates, dead rows, a
    block that ends in part of a group, and queries alike: ids and scores equal the reference."""
    rs = np.random.default_rng(5)
    d, k = 64, 5
    q = unit(rs.standard_normal((6, d)))
    q[5] = q[4]  # two queries alike
    far = unit(rs.standard_normal((5737 - 6 * 70, d)))

    def at(i, scores):  # rows whose score with query i is each of scores
        z = rs.standard_normal((scores.size, d))
        z -= (z @ q[i].astype(np.float64))[:, None] * q[i][None, :]
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        return (scores[:, None] * q[i][None, :] + np.sqrt(1 - scores ** 2)[:, None] * z).astype(np.float32)

    # per query 60 rows spread over the first block, scores 0.55..0.60 (its 13th ≈ 0.59: what the
    # blocks after it are cut by), and 10 stored together in the third, scores 0.591..0.61: the
    # top k comes from both
    first = np.concatenate([far[:2048 - 360], *(at(i, np.linspace(0.55, 0.6, 60)) for i in range(6))])
    third = [at(i, np.linspace(0.591, 0.61, 10)) for i in range(6)]
    x = np.concatenate([first[rs.permutation(2048)], far[1688:3736], *third, far[3736:]])
    x[2100:2110] = x[10]  # duplicates of a row of the first block, in the second
    alive = rs.random(x.shape[0]) > 0.05
    ref = reference(q, x, k, alive)
    prep = prepare_rows(x, "fp32") if prepared else None
    got = exact_search(q, x, k, alive=alive, block_rows=2048, precision="fp32", prepared=prep)
    assert_same(got, ref)
    # the group path was taken: 2048 / 64 = 32 groups ≥ 2 · keep (keep = k + 8 = 13)
    assert exact_mod._GROUP * 2 * (k + 8) <= 2048
    # and the whole block's top keep is inside the rows it keeps, with let_go below them
    sc = torch.from_numpy(x[:2048]) @ torch.from_numpy(q).T
    qq, rr, aa, let_go, floor = exact_mod._select(sc, k + 8, None)
    for i in range(q.shape[0]):
        top = torch.topk(sc[:, i], k + 8).indices.numpy()
        assert set(top) <= set(rr[qq == i])
        rest = np.setdiff1d(np.arange(2048), rr[qq == i])
        assert sc[rest, i].max().item() <= let_go[i] <= np.sort(aa[qq == i])[-(k + 8)]
