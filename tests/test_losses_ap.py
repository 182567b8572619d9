"""The quantised-AP loss (imret.losses.ap) against brute-force loops over queries and bins."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from imret.losses import APLoss, ap_loss, ap_per_query, bin_centers, quantized_ap
from imret.losses.ap import _bin_counts

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _batch(n=14, d=6, n_classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    return x, labels


# ---------------------------------------------------------------- brute-force references (python floats)


def _digamma(t: float) -> float:
    """psi(t) for t > 0: recurrence up to t >= 8, then the asymptotic series (independent of torch)."""
    acc = 0.0
    while t < 8.0:
        acc -= 1.0 / t
        t += 1.0
    inv2 = 1.0 / (t * t)
    return acc + math.log(t) - 0.5 / t - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 / 240)))


def _ref_counts(s_row, y_row, bins):
    """Soft counts per bin by the textbook triangular kernel, one bin and one item at a time."""
    delta = 2.0 / (bins - 1)
    c, cp = [0.0] * bins, [0.0] * bins
    for m in range(bins):
        centre = 1.0 - m * delta
        for s, y in zip(s_row, y_row):
            s = min(1.0, max(-1.0, s))
            w = max(0.0, 1.0 - abs(s - centre) / delta)
            c[m] += w
            cp[m] += w * y
    return c, cp


def _ref_ap_from_counts(c, cp, n_pos, tie_aware):
    total, big_c, big_cp = 0.0, 0.0, 0.0
    for cm, cpm in zip(c, cp):
        prev_c, prev_cp = big_c, big_cp
        big_c, big_cp = big_c + cm, big_cp + cpm
        if not tie_aware:
            if big_c > 0:
                total += big_cp / big_c * cpm
            continue
        if cm <= 0:
            continue
        if cm > 1:
            r = min(1.0, max(0.0, cpm - 1.0) / (cm - 1.0))
        else:
            r = min(1.0, cpm / cm)
        if abs(cm - round(cm)) < 1e-12:  # integer count: the defining sum over the tied positions
            inner = sum((prev_cp + 1 + (j - 1) * r) / (prev_c + j) for j in range(1, int(round(cm)) + 1))
        else:
            harmonic = _digamma(big_c + 1.0) - _digamma(prev_c + 1.0)
            inner = cm * r + (prev_cp + 1.0 - r * (prev_c + 1.0)) * harmonic
        total += cpm / cm * inner
    return total / n_pos


def _ref_ap_batch(x, labels, bins, tie_aware=False):
    """AP of every query (each row against all the others), loops over queries and bins."""
    x = x.double().tolist()
    labels = labels.tolist()
    out = []
    for q in range(len(x)):
        s_row, y_row = [], []
        for j in range(len(x)):
            if j == q:
                continue
            s_row.append(sum(a * b for a, b in zip(x[q], x[j])))
            y_row.append(1.0 if labels[j] == labels[q] else 0.0)
        n_pos = sum(y_row)
        if n_pos == 0:
            out.append(float("nan"))
            continue
        c, cp = _ref_counts(s_row, y_row, bins)
        out.append(_ref_ap_from_counts(c, cp, n_pos, tie_aware))
    return torch.tensor(out, dtype=torch.float64)


def _exact_ap(order_rel):
    """AP of a ranked 0/1 relevance list (all relevant items are in the list)."""
    hits, total = 0, 0.0
    for k, r in enumerate(order_rel, start=1):
        if r:
            hits += 1
            total += hits / k
    return total / hits


# ---------------------------------------------------------------- quantisation


def test_bin_centers_and_triangular_assignment():
    expected = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0], dtype=torch.float64)
    torch.testing.assert_close(bin_centers(5, dtype=torch.float64), expected)
    g = torch.Generator().manual_seed(1)
    s = torch.rand(3, 40, generator=g, dtype=torch.float64) * 2 - 1
    s[0, :3] = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)  # the edges and a centre
    rel = torch.rand(3, 40, generator=g) < 0.4
    for bins in (2, 3, 7, 20):
        c, cp = _bin_counts(s, rel, torch.ones_like(rel), bins)
        for q in range(3):
            rc, rcp = _ref_counts(s[q].tolist(), rel[q].double().tolist(), bins)
            torch.testing.assert_close(c[q], torch.tensor(rc, dtype=torch.float64))
            torch.testing.assert_close(cp[q], torch.tensor(rcp, dtype=torch.float64))
        torch.testing.assert_close(c.sum(1), torch.full((3,), 40.0, dtype=torch.float64))  # unit mass per item


# ---------------------------------------------------------------- AP_Q and the loss vs loops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tie_aware", [False, True])
@pytest.mark.parametrize("bins", [2, 5, 20])
def test_ap_per_query_matches_loops(dtype, tie_aware, bins):
    x, labels = _batch(dtype=dtype)
    labels[0] = 99  # a query without positives
    ref = _ref_ap_batch(x, labels, bins, tie_aware)
    got = ap_per_query(x, labels, bins=bins, tie_aware=tie_aware)
    assert got.dtype == dtype
    assert torch.isnan(got[0]) and torch.isnan(ref[0])
    torch.testing.assert_close(got[1:].double(), ref[1:], equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tie_aware", [False, True])
def test_ap_loss_is_one_minus_mean_ap_over_queries_with_positives(dtype, tie_aware):
    x, labels = _batch(n=16, dtype=dtype, seed=3)
    labels[:2] = torch.tensor([50, 51])  # two singleton queries: left out
    ref = _ref_ap_batch(x, labels, 20, tie_aware)
    valid = ~torch.isnan(ref)
    expected = 1.0 - ref[valid].mean()
    got = ap_loss(x, labels, tie_aware=tie_aware)
    assert got.dim() == 0 and got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, **TOL[dtype])
    module = APLoss(tie_aware=tie_aware)
    torch.testing.assert_close(module(x, labels), got)


def test_class_balanced_and_query_weights_vs_loops():
    x, labels = _batch(n=15, n_classes=3, seed=5)
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 2 + [7])  # imbalanced, one singleton
    ref = _ref_ap_batch(x, labels, 20)
    # class-balanced: the mean over classes of the class's mean AP
    per_class = [ref[labels == c].mean() for c in (0, 1, 2)]
    expected = 1.0 - sum(per_class) / 3
    torch.testing.assert_close(ap_loss(x, labels, class_balanced=True), expected)
    assert not torch.allclose(ap_loss(x, labels), expected)  # the plain mean differs
    # explicit weights: a weighted mean over the queries that have positives
    w = torch.linspace(0.1, 2.0, 15, dtype=torch.float64)
    valid = ~torch.isnan(ref)
    expected_w = 1.0 - (w[valid] * ref[valid]).sum() / w[valid].sum()
    torch.testing.assert_close(ap_loss(x, labels, query_weights=w), expected_w)
    # both: multiplied
    cnt = torch.tensor([8.0] * 8 + [4.0] * 4 + [2.0] * 2 + [1.0], dtype=torch.float64)
    wb = w / cnt
    expected_b = 1.0 - (wb[valid] * ref[valid]).sum() / wb[valid].sum()
    torch.testing.assert_close(APLoss(class_balanced=True)(x, labels, query_weights=w), expected_b)


def test_exact_ap_when_scores_sit_on_distinct_bin_centres():
    # ranked relevance 1 0 1 0 0 1 -> AP = (1/1 + 2/3 + 3/6) / 3
    rel_ranked = [1, 0, 1, 0, 0, 1]
    assert _exact_ap(rel_ranked) == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    g = torch.Generator().manual_seed(0)
    for bins in (7, 21, 101, 1001):
        centres = bin_centers(bins, dtype=torch.float64)
        # 6 distinct bins, in a shuffled column order
        pick = torch.randperm(bins, generator=g)[:6].sort().values  # bin index = rank (top first)
        perm = torch.randperm(6, generator=g)
        scores = centres[pick][perm][None]
        relevant = torch.tensor(rel_ranked, dtype=torch.bool)[perm][None]
        for tie_aware in (False, True):
            got = quantized_ap(scores, relevant, bins=bins, tie_aware=tie_aware)
            assert got.item() == pytest.approx(_exact_ap(rel_ranked), abs=1e-12)


def test_quantized_ap_of_snapped_random_scores_tends_to_the_true_ap():
    # scores rounded to the nearest bin centre: once M is large enough that no two share a bin,
    # the quantised AP is the AP of the true ranking
    g = torch.Generator().manual_seed(2)
    s = torch.rand(40, generator=g, dtype=torch.float64) * 2 - 1
    rel = torch.rand(40, generator=g) < 0.3
    true_ap = _exact_ap(rel[torch.argsort(s, descending=True)].tolist())
    errors = []
    for bins in (5, 50, 5000):
        delta = 2.0 / (bins - 1)
        snapped = 1.0 - torch.round((1.0 - s) / delta) * delta
        errors.append(abs(quantized_ap(snapped[None], rel[None], bins=bins, tie_aware=True).item() - true_ap))
    assert errors[-1] < 1e-12
    assert errors[0] > errors[-1]


def test_tie_aware_ap_is_the_mean_ap_over_all_orders_of_the_ties():
    bins = 9
    centres = bin_centers(bins, dtype=torch.float64)
    # items per bin (hard assignment): bin -> relevance of its items
    content = {1: [1, 0], 3: [0, 1, 1], 4: [0], 6: [1, 0, 0]}
    scores, rel, groups = [], [], []
    for b, items in content.items():
        groups.append(list(range(len(rel), len(rel) + len(items))))
        scores += [centres[b].item()] * len(items)
        rel += items
    aps = [
        _exact_ap([rel[i] for grp in orders for i in grp])
        for orders in itertools.product(*(itertools.permutations(grp) for grp in groups))
    ]
    expected = sum(aps) / len(aps)  # 2! 3! 1! 3! = 72 orders
    s_t, rel_t = torch.tensor([scores], dtype=torch.float64), torch.tensor([rel], dtype=torch.bool)
    got = quantized_ap(s_t, rel_t, bins=bins, tie_aware=True)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # the plain AP_Q gives each positive of a bin the precision at the bin's end: not the mean over
    # the orders, but never below the worst order (negatives first within every bin)
    plain = quantized_ap(s_t, rel_t, bins=bins)
    assert min(aps) - 1e-12 <= plain.item() and abs(plain.item() - expected) > 1e-3


# ---------------------------------------------------------------- chunking, memory path, gradients


@pytest.mark.parametrize("tie_aware", [False, True])
def test_chunked_equals_unchunked_values_and_gradients(tie_aware):
    x0, labels = _batch(n=23, d=5, n_classes=5, seed=7)
    results = []
    for chunk in (None, 1, 4, 23, 100):
        x = x0.clone().requires_grad_()
        loss = ap_loss(x, labels, tie_aware=tie_aware, chunk_size=chunk, class_balanced=True)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(ap_per_query(x0, labels, chunk_size=3), ap_per_query(x0, labels), equal_nan=True)


def _kink_distance(x, labels, bins):
    """How close the batch is to a kink of the piecewise-linear assignment (a score on a bin centre)."""
    s = x @ x.T
    u = (1 - s) / (2 / (bins - 1))
    frac = u - u.floor()
    off = ~torch.eye(len(x), dtype=torch.bool)
    d_bins = torch.minimum(frac, 1 - frac)[off].min().item()
    keep = off
    rel = (labels[:, None] == labels[None, :]) & keep
    c, cp = _bin_counts(s, rel, keep, bins)
    d_counts = min((c - 1).abs().min().item(), ((cp - 1).abs() + (cp == 0) * 9).min().item())
    return min(d_bins, d_counts)


@pytest.mark.parametrize("tie_aware", [False, True])
def test_gradcheck_float64(tie_aware):
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    bins = 6
    for seed in range(100):  # a batch away from the kinks of the triangular assignment
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(7, 3, generator=g, dtype=torch.float64)
        if _kink_distance(F.normalize(x, dim=1), labels, bins) > 1e-3:
            break
    else:
        pytest.fail("no batch away from the kinks")
    x.requires_grad_()

    def f(x):
        return ap_loss(F.normalize(x, dim=1), labels, bins=bins, tie_aware=tie_aware, class_balanced=True)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-7, atol=1e-6)
    f(x).backward()
    assert x.grad.abs().sum() > 0  # the check is not vacuous


def test_gradients_push_positives_up_and_negatives_down():
    x0, labels = _batch(n=10, d=4, n_classes=2, seed=11)
    x = x0.clone().requires_grad_()
    ap_loss(x, labels).backward()
    with torch.no_grad():
        before = ap_loss(x0, labels)
        after = ap_loss(F.normalize(x0 - 0.05 * x.grad, dim=1), labels)
    assert after < before


# ---------------------------------------------------------------- degenerate batches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tie_aware", [False, True])
def test_no_positives_gives_zero_and_zero_finite_gradient(dtype, tie_aware):
    x, _ = _batch(n=6, dtype=dtype)
    for labels in (torch.arange(6), torch.tensor([0]), None):
        xx = x[:1].clone() if labels is not None and len(labels) == 1 else x.clone()
        labels = torch.arange(len(xx)) if labels is None else labels
        xx.requires_grad_()
        loss = ap_loss(xx, labels, tie_aware=tie_aware, class_balanced=True, chunk_size=2)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.isfinite(xx.grad).all() and (xx.grad == 0).all()
        assert torch.isnan(ap_per_query(xx.detach(), labels)).all()
    # all weights zero: also 0
    xx = x.clone().requires_grad_()
    loss = ap_loss(xx, torch.zeros(6, dtype=torch.long), query_weights=torch.zeros(6))
    loss.backward()
    assert loss.item() == 0.0 and (xx.grad == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tie_aware", [False, True])
def test_one_class_gives_ap_one(dtype, tie_aware):
    x, _ = _batch(n=9, dtype=dtype)
    x.requires_grad_()
    labels = torch.full((9,), 3)
    torch.testing.assert_close(ap_per_query(x, labels, tie_aware=tie_aware).detach(), torch.ones(9, dtype=dtype))
    loss = ap_loss(x, labels, tie_aware=tie_aware)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("tie_aware", [False, True])
def test_two_items(tie_aware):
    x, _ = _batch(n=2)
    assert ap_loss(x, torch.tensor([4, 4]), tie_aware=tie_aware).item() == pytest.approx(0.0, abs=1e-12)
    assert ap_loss(x, torch.tensor([4, 5]), tie_aware=tie_aware).item() == 0.0
    # identical descriptors (score 1, the clamped edge) and opposite ones (score -1)
    v = F.normalize(torch.ones(1, 3, dtype=torch.float64), dim=1)
    for pair in (torch.cat([v, v]), torch.cat([v, -v])):
        pair.requires_grad_()
        loss = ap_loss(pair, torch.tensor([0, 0]), tie_aware=tie_aware)
        loss.backward()
        assert loss.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(pair.grad).all()


def test_half_precision_and_autocast_compute_in_float32():
    x, labels = _batch(n=12, dtype=torch.float32)
    ref = ap_loss(x, labels)
    got = ap_loss(x.to(torch.bfloat16), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ap_loss(x.to(torch.bfloat16).float(), labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = ap_loss(x, labels)
    assert in_autocast.dtype == torch.float32
    torch.testing.assert_close(in_autocast, ref)


def test_large_batch_runs_chunked():
    # the N = 4096 case of the issue at a small D (the memory does not depend on D beyond x itself)
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(4096, 16, generator=g), dim=1).requires_grad_()
    labels = torch.randint(0, 300, (4096,), generator=g)
    loss = ap_loss(x, labels, chunk_size=1024)
    loss.backward()
    assert 0.0 < loss.item() < 1.0 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- validation


def test_validation_errors():
    x, labels = _batch(n=5)
    with pytest.raises(ValueError, match="labels has 4 entries"):
        ap_loss(x, labels[:4])
    with pytest.raises(ValueError, match="bins must be an integer >= 2"):
        ap_loss(x, labels, bins=1)
    with pytest.raises(ValueError, match="bins"):
        APLoss(bins=2.5)
    with pytest.raises(ValueError, match="chunk_size"):
        ap_loss(x, labels, chunk_size=0)
    with pytest.raises(ValueError, match="shape \\(N, D\\)"):
        ap_loss(x[0], labels)
    with pytest.raises(TypeError, match="integer class ids"):
        ap_loss(x, labels.double())
    with pytest.raises(TypeError, match="floating-point"):
        ap_loss(torch.ones(5, 3, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="query_weights must have shape"):
        ap_loss(x, labels, query_weights=torch.ones(4))
    with pytest.raises(ValueError, match=">= 0"):
        ap_loss(x, labels, query_weights=-torch.ones(5))
    with pytest.raises(ValueError, match="one shape"):
        quantized_ap(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool))
    assert "bins=20, tie_aware=True" in repr(APLoss(tie_aware=True))


def test_nan_descriptor_gives_nan_loss_not_an_index_error():
    x, labels = _batch(n=6)
    x[2, 0] = float("nan")
    assert torch.isnan(ap_loss(x, labels))
    assert torch.isnan(ap_loss(x, labels, tie_aware=True))
