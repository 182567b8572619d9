import math

import pytest
import torch
import torch.nn.functional as F

from imret.pooling import (
    GeM,
    RGeM,
    RMAC,
    create_pool,
    gem,
    list_pools,
    mac,
    regional_pool,
    rgem,
    rmac,
    rmac_regions,
    spoc,
)


def _map(b=2, c=5, h=7, w=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g, dtype=dtype) + 0.01


def test_mac_spoc_closed_forms():
    x = _map()
    assert torch.equal(mac(x), x.flatten(2).max(-1).values)
    torch.testing.assert_close(spoc(x), x.flatten(2).sum(-1) / (7 * 11))


def test_gem_p1_is_spoc():
    x = _map()
    torch.testing.assert_close(gem(x, 1.0), spoc(x))


def test_gem_large_p_approaches_mac():
    x = _map()
    err = [(gem(x, p) - mac(x)).abs().max().item() for p in (10.0, 100.0, 1000.0)]
    assert err[0] > err[1] > err[2]
    assert err[2] < 1e-2
    assert (gem(x, 1000.0) <= mac(x) + 1e-12).all()  # power mean never exceeds the max


def test_gem_matches_formula_and_clamps():
    x = _map()
    x[0, 0, 0, 0] = -5.0  # negative activations are clamped to eps
    p = 3.0
    ref = x.clamp(min=1e-6).pow(p).mean((-2, -1)).pow(1 / p)
    torch.testing.assert_close(gem(x, p), ref)


def test_gem_gradient_wrt_p_closed_form():
    # d/dp (mean x^p)^(1/p) = y * ( mean(x^p ln x) / (p mean(x^p)) - ln(mean x^p) / p^2 )
    x = _map(b=1, c=3)
    p = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
    y = gem(x, p)
    y.sum().backward()
    with torch.no_grad():
        pv = 2.5
        m = x.pow(pv).mean((-2, -1))
        mlog = (x.pow(pv) * x.log()).mean((-2, -1))
        yy = m.pow(1 / pv)
        grad = (yy * (mlog / (pv * m) - m.log() / pv**2)).sum()
    torch.testing.assert_close(p.grad[0], grad)
    assert torch.autograd.gradcheck(lambda q: gem(x, q), (p.detach().clone().requires_grad_(),))


def test_gem_per_channel_p():
    x = _map(c=4)
    p = torch.tensor([1.0, 2.0, 3.0, 50.0], dtype=torch.float64)
    y = gem(x, p)
    for c in range(4):
        torch.testing.assert_close(y[:, c], gem(x[:, c : c + 1], p[c].item())[:, 0])
    with pytest.raises(ValueError, match="1 or C=4"):
        gem(x, torch.ones(3))


def test_gem_module_learnable_and_fixed():
    m = GeM(p=3.0)
    assert isinstance(m.p, torch.nn.Parameter) and m.p.requires_grad
    fixed = GeM(p=4.0, learn_p=False)
    assert "p" in dict(fixed.named_buffers()) and not list(fixed.parameters())
    per = GeM(per_channel=True, channels=6)
    assert per.p.shape == (6,)
    with pytest.raises(ValueError, match="channels"):
        GeM(per_channel=True)
    with pytest.raises(ValueError, match="> 0"):
        GeM(p=0)
    x = _map(c=6, dtype=torch.float32)
    per(x).sum().backward()
    assert per.p.grad.shape == (6,) and torch.isfinite(per.p.grad).all()


# ---- R-MAC: the region grid against a slow, literal transcription of Tolias et al.'s rule


def _regions_reference(H, W, L=3, ovr=0.4):
    """Literal loop transcription of the R-MAC grid rule (region side, count, placement)."""
    w = min(W, H)
    regions = [(0, 0, H, W)]
    Wd = Hd = 0
    if H != W:
        errs = []
        for steps in range(2, 8):
            b = (max(H, W) - w) / (steps - 1)
            errs.append(abs((w**2 - w * b) / w**2 - ovr))
        idx = min(range(len(errs)), key=lambda i: (errs[i], i))
        if H < W:
            Wd = idx + 1
        else:
            Hd = idx + 1
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        bW = 0 if l + Wd == 1 else (W - wl) / (l + Wd - 1)
        bH = 0 if l + Hd == 1 else (H - wl) / (l + Hd - 1)
        cW = [math.floor(wl2 + i * bW) - wl2 for i in range(l + Wd)]
        cH = [math.floor(wl2 + i * bH) - wl2 for i in range(l + Hd)]
        for i in cH:
            for j in cW:
                regions.append((i, j, wl, wl))
    return regions


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (7, 7), (7, 11), (11, 7), (24, 32), (32, 24), (30, 40), (5, 40), (2, 9)])
def test_rmac_regions_match_reference(hw):
    H, W = hw
    got = rmac_regions(H, W)
    assert got == _regions_reference(H, W)
    for t, l, h, w in got:
        assert 0 <= t and 0 <= l and t + h <= H and l + w <= W and h > 0 and w > 0


def test_rmac_regions_known_grid():
    # 24x32 map: w=24; overlap rule picks 1 extra region along the long side; levels give
    # 1+2x... squares of side 24, 16, 12 -> counts 1x2, 2x3, 3x4 plus the global region.
    regs = rmac_regions(24, 32)
    sides = [r[2] for r in regs[1:]]
    assert sides.count(24) == 2 and sides.count(16) == 6 and sides.count(12) == 12
    assert len(regs) == 21


def _slow_regional(x, reduce, p=3.0):
    out = torch.zeros(x.shape[:2], dtype=x.dtype)
    for t, l, h, w in _regions_reference(*x.shape[-2:]):
        r = x[:, :, t : t + h, l : l + w]
        if reduce == "max":
            v = r.flatten(2).max(-1).values
        else:
            v = r.clamp(min=1e-6).pow(p).flatten(2).mean(-1).pow(1 / p)
        out += F.normalize(v, dim=1)
    return out


@pytest.mark.parametrize("hw", [(7, 11), (11, 7), (8, 8), (2, 2), (24, 32)])
def test_rmac_and_rgem_match_slow_reference(hw):
    x = _map(h=hw[0], w=hw[1])
    torch.testing.assert_close(rmac(x), _slow_regional(x, "max"))
    torch.testing.assert_close(rgem(x, 3.0), _slow_regional(x, "gem"))
    torch.testing.assert_close(RMAC()(x), _slow_regional(x, "max"))
    torch.testing.assert_close(RGeM().double()(x), _slow_regional(x, "gem"))


def test_rmac_without_global_and_gradients():
    x = _map(h=9, w=13)
    with_g = rmac(x)
    without = regional_pool(x, "max", include_global=False)
    torch.testing.assert_close(with_g - without, F.normalize(mac(x), dim=1))
    x.requires_grad_(True)
    rmac(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_registry():
    assert list_pools() == ["gem", "mac", "rgem", "rmac", "spoc"]
    assert list_pools("r*") == ["rgem", "rmac"]
    with pytest.raises(ValueError, match="available: gem, mac, rgem, rmac, spoc"):
        create_pool("avgmax")
    with pytest.raises(ValueError, match="bad arguments"):
        create_pool("gem", nonsense=1)
    assert isinstance(create_pool("GeM", p=2.0), GeM)
    assert create_pool("gem", channels=8, per_channel=True).p.shape == (8,)


def test_pool_shapes_float32():
    x = _map(dtype=torch.float32)
    for name in list_pools():
        y = create_pool(name, channels=5)(x)
        assert y.shape == (2, 5) and y.dtype == torch.float32
