"""Gordo & Larlus's visual and cross-modal ranking losses against brute-force loops over triplets."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from imret.text.losses import (
    JointRankingLoss,
    joint_ranking_loss,
    pair_ranking_loss,
    mine_hard_triplets,
    ranking_loss,
    semantic_triplets,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(n=6, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    phi = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    theta = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    # a symmetric relevance in [0, 1] with exact ties (rounded to 0.1) and a unit diagonal
    r = torch.rand(n, n, generator=g, dtype=torch.float64)
    rel = ((r + r.T) / 2 * 10).round() / 10
    rel.fill_diagonal_(1.0)
    return phi, theta, rel


def _brute_triplets(rel, min_gap, self_positive):
    n = len(rel)
    out = []
    for a, p, ng in itertools.product(range(n), repeat=3):
        if ng == a or p == ng or (p == a and not self_positive):
            continue
        if rel[a][p] > rel[a][ng] + min_gap:
            out.append((a, p, ng))
    return out


def _hinge(q, r, a, p, ng, m):
    return 0.5 * max(0.0, m - float(q[a] @ r[p]) + float(q[a] @ r[ng]))


@pytest.mark.parametrize("min_gap", [0.0, 0.25])
@pytest.mark.parametrize("self_positive", [False, True])
def test_semantic_triplets_are_all_ordered_triplets(min_gap, self_positive):
    _, _, rel = _batch(n=7, seed=1)
    a, p, ng = semantic_triplets(rel, min_gap=min_gap, self_positive=self_positive)
    got = list(zip(a.tolist(), p.tolist(), ng.tolist()))
    assert got == _brute_triplets(rel.tolist(), min_gap, self_positive)
    assert len(got) > 0


def test_semantic_triplets_with_no_order_are_empty():
    a, p, ng = semantic_triplets(torch.full((4, 4), 0.3))
    assert a.numel() == p.numel() == ng.numel() == 0
    with pytest.raises(ValueError, match="square"):
        semantic_triplets(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="min_gap"):
        semantic_triplets(torch.zeros(3, 3), min_gap=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["visual", "image_text", "text_image"])
def test_ranking_loss_matches_brute_force(which, dtype):
    phi, theta, rel = _batch(dtype=dtype)
    q, r = {"visual": (phi, phi), "image_text": (phi, theta), "text_image": (theta, phi)}[which]
    trip = semantic_triplets(rel)
    ref = [_hinge(q, r, a, p, ng, 0.3) for a, p, ng in zip(*(t.tolist() for t in trip))]
    out = ranking_loss(q, r, trip, margin=0.3, reduction="none")
    assert out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out.double(), torch.tensor(ref, dtype=torch.float64), rtol=0, atol=tol)
    assert ranking_loss(q, r, trip, margin=0.3).item() == pytest.approx(sum(ref) / len(ref), abs=tol)
    assert ranking_loss(q, r, trip, margin=0.3, reduction="sum").item() == pytest.approx(sum(ref), abs=10 * tol)
    assert 0 < sum(x > 0 for x in ref) < len(ref)  # both active and inactive hinges are exercised


def test_ranking_loss_gradcheck():
    phi, theta, rel = _batch(n=5, d=4, seed=2)
    trip = semantic_triplets(rel)
    phi.requires_grad_(True)
    theta.requires_grad_(True)
    # margins chosen so no hinge sits at its kink (gradcheck needs a differentiable point)
    assert torch.autograd.gradcheck(lambda x, y: ranking_loss(x, y, trip, margin=0.3), (phi, theta))
    assert torch.autograd.gradcheck(lambda x: ranking_loss(x, x, trip, margin=0.3), (phi,))


def _brute_joint(phi, theta, rel, m, w, self_positive, per_anchor, min_gap=0.0):
    rows = []
    for a, p, ng in _brute_triplets(rel.tolist(), min_gap, self_positive):
        lv = 0.0 if p == a else _hinge(phi, phi, a, p, ng, m)
        l1 = _hinge(phi, theta, a, p, ng, m)
        l2 = _hinge(theta, phi, a, p, ng, m)
        rows.append((a, w[0] * lv + w[1] * l1 + w[2] * l2, lv, l1, l2))
    if per_anchor is not None:
        kept = []
        for anchor in sorted({r[0] for r in rows}):
            mine = [(i, r) for i, r in enumerate(rows) if r[0] == anchor and r[1] > 0]
            mine.sort(key=lambda ir: (-ir[1][1], ir[0]))  # largest total loss, then first triplet
            kept += [i for i, _ in mine[:per_anchor]]
        rows = [rows[i] for i in sorted(kept)]
    n = len(rows)
    mean = [sum(r[j] for r in rows) / n for j in range(1, 5)] if n else [0.0] * 4
    return mean, n


@pytest.mark.parametrize("per_anchor", [None, 1, 3])
@pytest.mark.parametrize("self_positive", [True, False])
@pytest.mark.parametrize("margin", [0.2, 1.0])  # 1.0: the visual term of a p = a triplet would be > 0
def test_joint_loss_matches_brute_force(per_anchor, self_positive, margin):
    phi, theta, rel = _batch(n=6, seed=3)
    w = (1.0, 0.5, 2.0)
    out = joint_ranking_loss(phi, theta, rel, margin=margin, weights=w, per_anchor=per_anchor,
                             cross_modal_self=self_positive, cross_modal="relevance")
    ref, n = _brute_joint(phi, theta, rel, margin, w, self_positive, per_anchor)
    assert out.num_triplets == n > 0
    for got, want in zip(out[:4], ref):
        assert got.item() == pytest.approx(want, abs=1e-12)
    assert out.total.item() == pytest.approx(w[0] * out.visual.item() + w[1] * out.image_text.item()
                                             + w[2] * out.text_image.item(), abs=1e-12)


def test_joint_loss_min_gap_and_sum():
    phi, theta, rel = _batch(n=6, seed=4)
    out = joint_ranking_loss(phi, theta, rel, margin=0.2, min_gap=0.3, reduction="sum", cross_modal="relevance")
    ref, n = _brute_joint(phi, theta, rel, 0.2, (1, 1, 1), True, None, min_gap=0.3)
    assert out.num_triplets == n
    assert out.total.item() == pytest.approx(ref[0] * n, abs=1e-10)


def test_joint_loss_gradcheck():
    phi, theta, rel = _batch(n=5, d=4, seed=5)
    phi.requires_grad_(True)
    theta.requires_grad_(True)

    def f(x, y):
        return joint_ranking_loss(x, y, rel, margin=0.3, weights=(1.0, 0.7, 0.4), per_anchor=2,
                                  cross_modal=mode).total

    for mode in ("relevance", "pairs"):
        assert torch.autograd.gradcheck(f, (phi, theta))


def test_visual_only_model():
    phi, theta, rel = _batch(n=6, seed=6)
    out = joint_ranking_loss(phi, None, rel, weights=(1, 0, 0), margin=0.2)
    trip = semantic_triplets(rel)  # no self positives for the visual-only model
    assert out.num_triplets == trip[0].numel()
    assert out.total.item() == pytest.approx(ranking_loss(phi, phi, trip, margin=0.2).item(), abs=1e-12)
    assert out.image_text.item() == 0 and out.text_image.item() == 0
    with pytest.raises(ValueError, match="set them to 0"):
        joint_ranking_loss(phi, None, rel)


def test_no_triplet_gives_an_attached_zero():
    phi, theta, _ = _batch(n=4)
    phi.requires_grad_(True)
    out = joint_ranking_loss(phi, theta, torch.full((4, 4), 0.5), cross_modal_self=False, cross_modal="relevance")
    assert out.num_triplets == 0 and out.total.item() == 0
    out.total.backward()
    assert torch.all(phi.grad == 0)
    x = ranking_loss(phi, phi, (torch.zeros(0, dtype=torch.long),) * 3)
    assert x.item() == 0 and x.requires_grad


def _brute_pairs(q, r, m):
    """Per query a, the sum over n != a of ½ max(0, m − q_a·r_a + q_a·r_n), by plain loops."""
    ql, rl = q.tolist(), r.tolist()
    dot = lambda x, y: sum(u * v for u, v in zip(x, y))  # noqa: E731
    out = []
    for a in range(len(ql)):
        out.append(sum(0.5 * max(0.0, m - dot(ql[a], rl[a]) + dot(ql[a], rl[n])) for n in range(len(ql)) if n != a))
    return out


@pytest.mark.parametrize("margin", [0.2, 1.5])
def test_pair_ranking_loss_matches_brute_force(margin):
    phi, theta, _ = _batch(n=7, seed=11)
    per = pair_ranking_loss(phi, theta, margin=margin, reduction="none")
    ref = _brute_pairs(phi, theta, margin)
    assert per.tolist() == pytest.approx(ref, abs=1e-12)
    assert pair_ranking_loss(phi, theta, margin=margin).item() == pytest.approx(sum(ref) / 7, abs=1e-12)
    assert pair_ranking_loss(phi, theta, margin=margin, reduction="sum").item() == pytest.approx(sum(ref), abs=1e-12)
    # a query whose own item beats every other by the margin costs nothing
    e = torch.eye(4, dtype=torch.float64)
    assert pair_ranking_loss(e, e, margin=0.9).item() == 0.0
    assert pair_ranking_loss(e, e, margin=1.5).item() == pytest.approx(0.5 * 0.5 * 3, abs=1e-12)


@pytest.mark.parametrize("per_anchor", [None, 2])
def test_joint_loss_pairs_mode_is_visual_plus_pair_terms(per_anchor):
    phi, theta, rel = _batch(n=6, seed=12)
    w = (2.0, 0.5, 1.5)
    out = joint_ranking_loss(phi, theta, rel, margin=0.3, cross_margin=0.4, weights=w, per_anchor=per_anchor,
                             min_gap=0.05)
    vis = joint_ranking_loss(phi, None, rel, margin=0.3, weights=(1, 0, 0), per_anchor=per_anchor, min_gap=0.05)
    l1 = sum(_brute_pairs(phi, theta, 0.4)) / 6
    l2 = sum(_brute_pairs(theta, phi, 0.4)) / 6
    assert out.visual.item() == pytest.approx(vis.total.item(), abs=1e-12)
    assert out.image_text.item() == pytest.approx(l1, abs=1e-12)
    assert out.text_image.item() == pytest.approx(l2, abs=1e-12)
    assert out.total.item() == pytest.approx(w[0] * vis.total.item() + w[1] * l1 + w[2] * l2, abs=1e-12)
    assert out.num_triplets == vis.num_triplets + 2 * 6 * 5
    with pytest.raises(ValueError, match="available: 'pairs', 'relevance'"):
        joint_ranking_loss(phi, theta, rel, cross_modal="own")


def test_training_the_text_side_lowers_the_loss():
    """A sanity check of the whole: learning θ = normalize(W t) against fixed image embeddings
    lowers L_t1 + L_t2 on the batch it is trained on."""
    phi, _, rel = _batch(n=8, d=6, seed=7, dtype=torch.float32)
    t = torch.rand(8, 20, generator=torch.Generator().manual_seed(0))
    w = torch.nn.Parameter(torch.randn(6, 20, generator=torch.Generator().manual_seed(1)) * 0.1)
    opt = torch.optim.SGD([w], lr=5.0)
    loss_fn = JointRankingLoss(margin=0.1, weights=(0.0, 1.0, 1.0))
    losses = []
    for _ in range(30):
        theta = F.normalize(t @ w.T, dim=1)
        loss = loss_fn(phi, theta, rel).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_mine_hard_triplets_by_hand():
    losses = torch.tensor([0.3, 0.0, 0.5, 0.5, 0.1, 0.2, 0.9])
    anchors = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    # anchor 0: 0.5 (idx 2), 0.5 (idx 3), 0.3 (idx 0), 0 (idx 1, never); anchor 1: 0.2, 0.1; anchor 2: 0.9
    assert mine_hard_triplets(losses, anchors, 1).tolist() == [2, 5, 6]
    assert mine_hard_triplets(losses, anchors, 2).tolist() == [2, 3, 4, 5, 6]
    assert mine_hard_triplets(losses, anchors, 9).tolist() == [0, 2, 3, 4, 5, 6]
    # anchors need not be grouped
    perm = torch.tensor([6, 4, 0, 2, 5, 1, 3])
    got = mine_hard_triplets(losses[perm], anchors[perm], 1)
    assert sorted(perm[got].tolist()) == [2, 5, 6]
    with pytest.raises(ValueError, match="per_anchor must be a positive integer"):
        mine_hard_triplets(losses, anchors, 0)


def test_argument_errors_name_the_choices():
    phi, theta, rel = _batch(n=4)
    with pytest.raises(ValueError, match="available: 'mean', 'sum'"):
        joint_ranking_loss(phi, theta, rel, reduction="max")
    with pytest.raises(ValueError, match="available: 'mean', 'sum', 'none'"):
        ranking_loss(phi, theta, semantic_triplets(rel), reduction="max")
    with pytest.raises(ValueError, match=r"weights must be three numbers"):
        joint_ranking_loss(phi, theta, rel, weights=(1, 1))
    with pytest.raises(ValueError, match=r"theta has 3 rows, expected 4"):
        joint_ranking_loss(phi, theta[:3], rel)
    with pytest.raises(ValueError, match=r"relevance is \(3, 3\) for a batch of 4"):
        joint_ranking_loss(phi, theta, rel[:3, :3])
    with pytest.raises(ValueError, match=r"negative indices must lie in \[0, 4\)"):
        ranking_loss(phi, theta, (torch.tensor([0]), torch.tensor([1]), torch.tensor([7])))
    with pytest.raises(ValueError, match="margin"):
        JointRankingLoss(margin=-0.1)
