"""Multistage backpropagation gives the same parameter gradients as plain backpropagation."""

import pytest
import torch
import torch.nn.functional as F

from imret import create_model
from imret.train.multistage import (
    chunks_of,
    iter_chunks,
    deterministic_forward_problems,
    freeze_batchnorm,
    multistage_backward,
    plain_backward,
)


def listwise_loss(w):
    """A loss that couples every pair of the batch (like the AP loss): Σ_ij w_ij softplus(d_i · d_j)."""

    def f(d):
        return (w * F.softplus(4 * d @ d.T)).sum() / d.shape[0]

    return f


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 3])
def test_gradients_equal_plain_backprop(dtype, chunk):
    torch.manual_seed(0)
    model = create_model("resnet18", "gem", pretrained=False, whitening=16).to(dtype)
    model.train()
    freeze_batchnorm(model)
    x = torch.randn(5, 3, 32, 40, dtype=dtype)
    w = torch.randn(5, 5, dtype=dtype)
    loss_fn = listwise_loss(w)
    model.zero_grad()
    ref = plain_backward(model, x, loss_fn)
    g_ref = _grads(model)
    model.zero_grad()
    res = multistage_backward(model, x, loss_fn, chunk_size=chunk)
    g = _grads(model)
    assert set(g) == set(g_ref) and "head.pool.p" in g and "head.whiten.weight" in g
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(res.loss, ref.loss, rtol=tol, atol=tol)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=tol, atol=tol * max(1.0, float(g_ref[n].abs().max())), msg=n)


def test_images_of_different_sizes_and_grad_scale():
    torch.manual_seed(1)
    model = create_model("resnet18", "gem", pretrained=False).double()
    model.eval()
    imgs = [torch.randn(3, 32, 48, dtype=torch.float64), torch.randn(3, 32, 48, dtype=torch.float64),
            torch.randn(3, 40, 24, dtype=torch.float64), torch.randn(3, 32, 48, dtype=torch.float64)]
    assert [(s, e) for s, e, _ in chunks_of(imgs, 8)] == [(0, 2), (2, 3), (3, 4)]
    loss_fn = listwise_loss(torch.randn(4, 4, dtype=torch.float64))
    model.zero_grad()
    plain_backward(model, imgs, loss_fn)
    g_ref = _grads(model)
    model.zero_grad()
    multistage_backward(model, imgs, loss_fn, chunk_size=2, grad_scale=2.0)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, 2 * g_ref[n], rtol=1e-9, atol=1e-12)


def test_gathered_batch_splits_the_gradient_between_processes():
    """Two 'processes' each back-propagate their own rows of a global loss: the sum is the full gradient."""
    torch.manual_seed(2)
    model = create_model("resnet18", "gem", pretrained=False).double().eval()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    loss_fn = listwise_loss(torch.randn(6, 6, dtype=torch.float64))
    model.zero_grad()
    plain_backward(model, x, loss_fn)
    g_ref = _grads(model)
    with torch.no_grad():
        all_desc = model(x)
    model.zero_grad()
    for rank in range(2):
        part = x[3 * rank:3 * rank + 3]
        multistage_backward(model, part, loss_fn, gather=lambda d, r=rank: (all_desc, 3 * r))
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, g_ref[n], rtol=1e-9, atol=1e-12)


def test_refuses_a_non_deterministic_forward():
    model = create_model("resnet18", "gem", pretrained=False)
    model.train()
    assert any("BatchNorm" in p for p in deterministic_forward_problems(model))
    with pytest.raises(ValueError, match="deterministic forward"):
        multistage_backward(model, torch.randn(2, 3, 32, 32), lambda d: d.sum())
    freeze_batchnorm(model, affine=False)
    assert deterministic_forward_problems(model) == []
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".bn" in n or "bn1" in n)
    with pytest.raises(ValueError, match="chunk_size"):
        chunks_of(torch.randn(2, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="scalar"):
        multistage_backward(model, torch.randn(2, 3, 32, 32), lambda d: d)


class _LazyImages:
    """A dataset-like sequence that builds each image on access and counts what is alive."""

    def __init__(self, n, sizes, seed=0, jitter=False):
        self.n, self.sizes, self.seed, self.jitter = n, sizes, seed, jitter
        self.reads = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads += 1
        h, w = self.sizes[i % len(self.sizes)]
        if self.jitter and self.reads > self.n:  # second pass sees another size: not deterministic
            h += 2
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        return torch.randn(3, h, w, generator=g)


def test_lazy_sequence_is_read_twice_in_chunks_and_matches_plain():
    torch.manual_seed(0)
    model = create_model("resnet18", "gem", pretrained=False)
    model.train()
    freeze_batchnorm(model)
    src = _LazyImages(7, [(32, 40), (32, 40), (40, 32)])
    w = torch.randn(7, 7)
    chunk_lens = [e - s for s, e, _ in iter_chunks(src, 2)]
    assert max(chunk_lens) <= 2 and sum(chunk_lens) == 7
    src.reads = 0
    model.zero_grad()
    multistage_backward(model, src, listwise_loss(w), chunk_size=2)
    assert src.reads == 14  # each image read once per pass, never kept as a list
    g_multi = _grads(model)
    model.zero_grad()
    plain_backward(model, [src[i] for i in range(7)], listwise_loss(w))
    g_plain = _grads(model)
    for n in g_plain:
        torch.testing.assert_close(g_multi[n], g_plain[n], rtol=1e-4, atol=1e-5)


def test_lazy_sequence_that_changes_between_passes_is_refused():
    model = create_model("resnet18", "gem", pretrained=False)
    model.eval()
    src = _LazyImages(4, [(32, 32)], jitter=True)
    with pytest.raises(ValueError, match="changed shape between the two passes"):
        multistage_backward(model, src, lambda d: d.sum(), chunk_size=2)
