"""Contrastive and triplet losses (imret.losses) against brute-force loops over pairs and triplets."""

import math

import pytest
import torch
import torch.nn.functional as F

from imret.losses import (
    ContrastiveLoss,
    TripletLoss,
    contrastive_loss,
    triplet_loss,
    tuples_to_pairs,
    tuples_to_triplets,
)
from imret.mining import all_pairs, all_triplets

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _batch(n=10, d=5, n_classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    return x, labels


def _dist(x, i, j):
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j])))


def _reduce(values, reduction):
    if reduction == "sum":
        return sum(values)
    if reduction == "mean":
        return sum(values) / len(values) if values else 0.0
    nz = [v for v in values if v > 0]
    return sum(nz) / len(nz) if nz else 0.0


# ---------------------------------------------------------------- contrastive


def _ref_contrastive(x, labels, margin, reduction):
    x, labels = x.double().tolist(), labels.tolist()
    values = []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            d = _dist(x, i, j)
            values.append(0.5 * d * d if labels[i] == labels[j] else 0.5 * max(0.0, margin - d) ** 2)
    return _reduce(values, reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
@pytest.mark.parametrize("margin", [0.7, 1.3])
def test_contrastive_matches_loops(dtype, reduction, margin):
    x, labels = _batch(dtype=dtype)
    got = contrastive_loss(x, labels, margin=margin, reduction=reduction)
    assert got.dtype == dtype and got.dim() == 0
    ref = torch.tensor(_ref_contrastive(x, labels, margin, reduction), dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])
    torch.testing.assert_close(ContrastiveLoss(margin, reduction)(x, labels), got)


def test_contrastive_gradient_matches_autograd_of_the_loops():
    x0, labels = _batch(n=7, d=4)
    x = x0.clone().requires_grad_()
    contrastive_loss(x, labels, margin=1.2, reduction="sum").backward()
    xr = x0.clone().requires_grad_()
    ref = 0.0
    for i in range(7):
        for j in range(i + 1, 7):
            d = (xr[i] - xr[j]).norm()
            ref = ref + (0.5 * d**2 if labels[i] == labels[j] else 0.5 * (1.2 - d).clamp_min(0) ** 2)
    ref.backward()
    torch.testing.assert_close(x.grad, xr.grad)
    assert x.grad.abs().sum() > 0


def test_contrastive_explicit_pairs_and_miner_tuples():
    x, _ = _batch()
    i = torch.tensor([0, 0, 3, 5, 5])
    j = torch.tensor([1, 2, 4, 5, 9])  # (5, 5): a positive pair with itself, loss 0
    y = torch.tensor([1, 0, 0, 1, 0])
    per_pair = contrastive_loss(x, pairs=(i, j, y), margin=0.9, reduction="none")
    xs = x.tolist()
    for k in range(5):
        d = _dist(xs, i[k].item(), j[k].item())
        ref = 0.5 * d * d if y[k] else 0.5 * max(0.0, 0.9 - d) ** 2
        assert per_pair[k].item() == pytest.approx(ref, abs=1e-12)
    # a miner's (anchor_p, positive, anchor_n, negative): the same pairs, positives first
    mined = contrastive_loss(x, pairs=(i[y == 1], j[y == 1], i[y == 0], j[y == 0]), margin=0.9, reduction="sum")
    torch.testing.assert_close(mined, per_pair.sum())
    torch.testing.assert_close(contrastive_loss(x, pairs=(i, j, y.bool()), margin=0.9, reduction="sum"), per_pair.sum())


def test_tuples_to_pairs_reproduces_cirtorch_tuple_loss():
    # cirtorch: each tuple is [q, p, n1..nk]; loss = sum over the tuple's pairs (q, p) and (q, n_i)
    x, _ = _batch(n=3 * 5, d=6, seed=4)
    anchor, other, pos = tuples_to_pairs(3, 5)
    assert anchor.tolist() == [0] * 4 + [5] * 4 + [10] * 4
    assert other.tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14]
    assert pos.tolist() == [True, False, False, False] * 3
    xs = x.tolist()
    ref = 0.0
    for t in range(3):
        q = 5 * t
        ref += 0.5 * _dist(xs, q, q + 1) ** 2
        ref += sum(0.5 * max(0.0, 0.7 - _dist(xs, q, q + k)) ** 2 for k in range(2, 5))
    got = contrastive_loss(x, pairs=(anchor, other, pos), reduction="sum")
    assert got.item() == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="tuple_size >= 2"):
        tuples_to_pairs(2, 1)


def test_all_pairs_once_each():
    labels = torch.tensor([0, 1, 0, 2])
    a1, p, a2, n = all_pairs(labels, both_orders=False)
    assert list(zip(a1.tolist(), p.tolist())) == [(0, 2)]
    assert list(zip(a2.tolist(), n.tolist())) == [(0, 1), (0, 3), (1, 2), (1, 3), (2, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_contrastive_degenerate_batches(dtype):
    x, _ = _batch(n=6, dtype=dtype)
    # a single item: no pair -> 0, attached to the graph
    x1 = x[:1].clone().requires_grad_()
    loss = contrastive_loss(x1, torch.tensor([3]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (x1.grad == 0).all()
    # one class: positives only; all distinct: negatives only
    one = contrastive_loss(x, torch.zeros(6, dtype=torch.long))
    ref_one = torch.tensor(_ref_contrastive(x, torch.zeros(6), 0.7, "mean"), dtype=torch.float64)
    torch.testing.assert_close(one.double(), ref_one, **TOL[dtype])
    distinct = contrastive_loss(x, torch.arange(6))
    ref_distinct = torch.tensor(_ref_contrastive(x, torch.arange(6), 0.7, "mean"), dtype=torch.float64)
    torch.testing.assert_close(distinct.double(), ref_distinct, **TOL[dtype])
    # identical descriptors as a negative pair: loss margin^2 / 2, finite (zero) gradient
    xx = torch.cat([x[:1], x[:1]]).clone().requires_grad_()
    loss = contrastive_loss(xx, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(0.5 * 0.7**2, abs=1e-5)  # d is floored at 1e-6 for the gradient
    loss.backward()
    assert torch.isfinite(xx.grad).all()
    # no nonzero loss: mean_nonzero gives 0
    far = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=dtype)
    assert contrastive_loss(far, torch.tensor([0, 1]), reduction="mean_nonzero").item() == 0.0
    # empty explicit pairs
    empty = torch.zeros(0, dtype=torch.long)
    assert contrastive_loss(x, pairs=(empty, empty, empty.bool())).item() == 0.0


def test_contrastive_validation_errors():
    x, labels = _batch(n=5)
    with pytest.raises(ValueError, match="labels has 4 entries but x has N=5"):
        contrastive_loss(x, labels[:4])
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        contrastive_loss(x, labels, margin=-0.1)
    with pytest.raises(ValueError, match="margin"):
        ContrastiveLoss(margin=float("nan"))
    with pytest.raises(ValueError, match="exactly one of labels"):
        contrastive_loss(x)
    with pytest.raises(ValueError, match="exactly one of labels"):
        contrastive_loss(x, labels, pairs=tuples_to_pairs(1, 3))
    with pytest.raises(ValueError, match="outside \\[0, 5\\)"):
        contrastive_loss(x, pairs=(torch.tensor([0]), torch.tensor([5]), torch.tensor([True])))
    with pytest.raises(ValueError, match="one length"):
        contrastive_loss(x, pairs=(torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([True])))
    with pytest.raises(ValueError, match="boolean or 0/1"):
        contrastive_loss(x, pairs=(torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    with pytest.raises(ValueError, match="unknown reduction 'avg'; available: mean, sum, mean_nonzero, none"):
        contrastive_loss(x, labels, reduction="avg")
    with pytest.raises(ValueError, match="shape \\(N, D\\)"):
        contrastive_loss(x[None], labels)
    with pytest.raises(TypeError, match="integer class ids"):
        contrastive_loss(x, labels.float())
    with pytest.raises(TypeError, match="integer indices"):
        contrastive_loss(x, pairs=(torch.tensor([0.0]), torch.tensor([1]), torch.tensor([True])))
    assert repr(ContrastiveLoss()) == "ContrastiveLoss(margin=0.7, reduction='mean')"


# ---------------------------------------------------------------- triplet


def _ref_triplets(labels):
    labels = labels.tolist()
    n = len(labels)
    return [
        (a, p, q)
        for a in range(n)
        for p in range(n)
        for q in range(n)
        if p != a and labels[p] == labels[a] and labels[q] != labels[a]
    ]


def _ref_triplet(x, triplets, margin, squared, reduction):
    x = x.double().tolist()
    values = []
    for a, p, n in triplets:
        dp, dn = _dist(x, a, p), _dist(x, a, n)
        if squared:
            dp, dn = dp * dp, dn * dn
        values.append(max(0.0, margin + dp - dn))
    return _reduce(values, reduction)


def test_all_triplets_matches_loops():
    for labels in (torch.tensor([0, 1, 0, 2, 1, 0, 3]), torch.tensor([5, 5, 5]), torch.arange(4), torch.tensor([1])):
        a, p, n = all_triplets(labels)
        assert list(zip(a.tolist(), p.tolist(), n.tolist())) == _ref_triplets(labels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
@pytest.mark.parametrize("squared", [True, False])
def test_triplet_matches_loops(dtype, reduction, squared):
    x, labels = _batch(n=11, dtype=dtype, seed=2)
    margin = 0.1 if squared else 0.3
    got = triplet_loss(x, labels, margin=margin, squared=squared, reduction=reduction)
    assert got.dtype == dtype and got.dim() == 0
    ref = _ref_triplet(x, _ref_triplets(labels), margin, squared, reduction)
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), **TOL[dtype])
    torch.testing.assert_close(TripletLoss(margin, squared, reduction)(x, labels), got)


def test_triplet_gradient_matches_autograd_of_the_loops():
    x0, labels = _batch(n=8, d=4, seed=6)
    x = x0.clone().requires_grad_()
    triplet_loss(x, labels, margin=0.5, reduction="sum").backward()
    xr = x0.clone().requires_grad_()
    ref = 0.0
    for a, p, n in _ref_triplets(labels):
        ref = ref + (0.5 + (xr[a] - xr[p]).pow(2).sum() - (xr[a] - xr[n]).pow(2).sum()).clamp_min(0)
    ref.backward()
    torch.testing.assert_close(x.grad, xr.grad)
    assert x.grad.abs().sum() > 0


def test_tuples_to_triplets_reproduces_cirtorch_tuple_loss():
    x, _ = _batch(n=2 * 6, d=4, seed=8)
    a, p, n = tuples_to_triplets(2, 6)
    assert a.tolist() == [0] * 4 + [6] * 4 and p.tolist() == [1] * 4 + [7] * 4
    assert n.tolist() == [2, 3, 4, 5, 8, 9, 10, 11]
    ref = _ref_triplet(x, list(zip(a.tolist(), p.tolist(), n.tolist())), 0.1, True, "sum")
    assert triplet_loss(x, triplets=(a, p, n), reduction="sum").item() == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="tuple_size >= 3"):
        tuples_to_triplets(2, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triplet_degenerate_batches(dtype):
    x, _ = _batch(n=5, dtype=dtype)
    for labels in (torch.zeros(5, dtype=torch.long), torch.arange(5)):  # no negative / no positive
        xx = x.clone().requires_grad_()
        loss = triplet_loss(xx, labels)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert (xx.grad == 0).all()
    x1 = x[:1].clone().requires_grad_()
    triplet_loss(x1, torch.tensor([0])).backward()
    assert (x1.grad == 0).all()
    # identical anchor and positive with plain distances: finite gradient
    xx = torch.cat([x[:1], x[:1], x[1:2]]).clone().requires_grad_()
    triplet_loss(xx, torch.tensor([0, 0, 1]), squared=False, margin=5.0).backward()
    assert torch.isfinite(xx.grad).all()
    # every triplet satisfied: mean_nonzero is 0
    far = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=dtype)
    assert triplet_loss(far, torch.tensor([0, 0, 1]), reduction="mean_nonzero").item() == 0.0


def test_triplet_validation_errors():
    x, labels = _batch(n=5)
    with pytest.raises(ValueError, match="labels has 6 entries"):
        triplet_loss(x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        triplet_loss(x, labels, margin=-1.0)
    with pytest.raises(ValueError, match="exactly one of labels"):
        triplet_loss(x)
    with pytest.raises(ValueError, match="lengths differ"):
        triplet_loss(x, triplets=(torch.tensor([0]), torch.tensor([1, 2]), torch.tensor([3])))
    with pytest.raises(ValueError, match="outside"):
        triplet_loss(x, triplets=(torch.tensor([0]), torch.tensor([1]), torch.tensor([-1])))
    with pytest.raises(ValueError, match="unknown reduction"):
        TripletLoss(reduction="max")
    assert repr(TripletLoss()) == "TripletLoss(margin=0.1, squared=True, reduction='mean')"


@pytest.mark.parametrize("fn", [contrastive_loss, triplet_loss])
def test_half_precision_and_autocast_compute_in_float32(fn):
    x, labels = _batch(n=9, dtype=torch.float32, seed=3)
    ref = fn(x, labels)
    xb = x.to(torch.bfloat16)
    got = fn(xb, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fn(xb.float(), labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = fn(x, labels)
    assert in_autocast.dtype == torch.float32
    torch.testing.assert_close(in_autocast, ref)


@pytest.mark.parametrize("fn", [contrastive_loss, triplet_loss])
def test_gram_path_for_large_problems_agrees_with_exact_differences(fn, monkeypatch):
    import imret.losses.contrastive as contrastive_module

    x0, labels = _batch(n=12, d=6, seed=9)
    results = []
    for budget in (1 << 25, 0):  # exact differences, then the Gram matrix
        monkeypatch.setattr(contrastive_module, "_EXACT_BUDGET", budget)
        x = x0.clone().requires_grad_()
        loss = fn(x, labels, margin=1.5, reduction="sum")
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
