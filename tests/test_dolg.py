"""DOLG head (imret.models.dolg) and the CurricularFace loss: closed forms and slow references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from imret.losses import ArcFaceLoss, CurricularFaceLoss, create_loss, curricular_logits, list_losses
from imret.models import DOLGHead, create_head, create_model, head_levels, list_heads, load_model, save_model
from imret.models.dolg import LocalAttention, MultiAtrous, orthogonal_fusion
from imret.pooling import gem

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small(**kw):
    """A DOLG net on timm's tiny test ResNet (192 channels at stride 16, 96 at 32)."""
    torch.manual_seed(0)
    return create_model("test_resnet", head="dolg", head_kwargs={"local_dim": 24, "dim": 16, **kw}).eval()


# --- the fusion -------------------------------------------------------------------------------


def test_orthogonal_component_is_orthogonal_at_every_location():
    torch.manual_seed(0)
    fl = torch.randn(3, 64, 5, 7) + 2.0  # a shared offset: f_l has a large component along many f_g
    fg = torch.randn(3, 64) + 1.0
    out = orthogonal_fusion(fl, fg)
    cos = F.cosine_similarity(out, fg[:, :, None, None].expand_as(out), dim=1)
    assert cos.abs().max() < 1e-5
    # and what is removed is parallel to f_g: f_l - out = c f_g at every location
    removed = fl - out
    par = F.cosine_similarity(removed, fg[:, :, None, None].expand_as(removed), dim=1).abs()
    assert torch.allclose(par, torch.ones_like(par), atol=1e-5)


def test_orthogonal_fusion_against_a_per_location_loop():
    torch.manual_seed(1)
    fl, fg = torch.randn(2, 8, 3, 4, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    out = orthogonal_fusion(fl, fg)
    ref = torch.empty_like(fl)
    for b in range(2):
        g = fg[b].tolist()
        gg = sum(v * v for v in g)
        for i in range(3):
            for j in range(4):
                loc = fl[b, :, i, j].tolist()
                dot = sum(a * c for a, c in zip(loc, g))
                ref[b, :, i, j] = torch.tensor([a - dot / gg * c for a, c in zip(loc, g)], dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert out.dtype == torch.float64
    # half-precision inputs are fused in float32
    assert orthogonal_fusion(fl.bfloat16(), fg.bfloat16()).dtype == torch.float32
    # a zero global vector leaves the local map as it is
    torch.testing.assert_close(orthogonal_fusion(fl, torch.zeros_like(fg)), fl)
    with pytest.raises(ValueError, match=r"local must be \(B, C, h, w\) and glob \(B, C\)"):
        orthogonal_fusion(fl, fg[:, :4])


def test_head_output_against_a_slow_reference():
    """The whole head, recomputed step by step with a Python loop for the fusion."""
    net = _small()
    head = net.head
    x = torch.randn(2, 3, 83, 61)
    with torch.no_grad():
        f3, f4 = net.feature_maps(x)
        y = net(x)
        fg = head.fc_global(gem(f4, head.pool.p, head.pool.eps))
        a = head.atrous
        branches = [a.image_pool(f3).expand(-1, -1, *f3.shape[-2:])] + [conv(f3) for conv in a.branches]
        z = a.project(torch.cat(branches, 1))
        att_in = head.attention.bn(head.attention.conv(z))
        att = F.softplus(head.attention.score(F.relu(att_in)))
        fl = F.normalize(att_in, dim=1) * att
        pooled = torch.zeros(2, fl.shape[1])
        for b in range(2):
            for i in range(fl.shape[2]):
                for j in range(fl.shape[3]):
                    v = fl[b, :, i, j]
                    pooled[b] += v - (v @ fg[b]) / (fg[b] @ fg[b]) * fg[b]
        pooled /= fl.shape[2] * fl.shape[3]
        ref = F.normalize(head.fc(torch.cat([fg, pooled], 1)), dim=1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", ["concat", "hadamard"])
def test_ablation_fusions_are_what_they_say(fusion):
    net = _small(fusion=fusion)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        f3, f4 = net.feature_maps(x)
        fg = net.head.global_vector(f4)
        fl, _ = net.head.local_map(f3)
        part = fl if fusion == "concat" else fl * fg[:, :, None, None]
        ref = F.normalize(net.head.fc(torch.cat([fg, part.mean(dim=(2, 3))], 1)), dim=1)
        torch.testing.assert_close(net(x), ref)


def test_without_the_local_branch_it_is_gem_and_fc():
    net = _small(local=False)
    head = net.head
    assert head_levels("dolg", local=False) == (-1,) and not net.feature_levels.multi_level
    assert head.attention is None and head.atrous is None and head.fc_global is None
    assert {n.split(".")[0] for n, _ in head.named_parameters()} == {"pool", "fc"}
    x = torch.randn(2, 3, 70, 50)
    with torch.no_grad():
        ref = F.normalize(head.fc(gem(net.trunk.forward_features(x), head.pool.p)), dim=1)
        torch.testing.assert_close(net(x), ref)
    with pytest.raises(TypeError, match="local=False"):
        head.local_map(torch.zeros(1, 3, 2, 2))


def test_without_multi_atrous_the_attention_reads_the_stage():
    net = _small(multi_atrous=False)
    assert net.head.atrous is None and net.head.attention.conv.in_channels == 192
    with_ma = _small()
    assert isinstance(with_ma.head.atrous, MultiAtrous) and with_ma.head.attention.conv.in_channels == 24
    assert with_ma.head.atrous.rates == (3, 6, 9)


def test_multi_atrous_module():
    torch.manual_seed(0)
    m = MultiAtrous(8, 12, rates=(1, 2, 5)).eval()
    assert [c.dilation for c in m.branches] == [(1, 1), (2, 2), (5, 5)] and m.branches[0].kernel_size == (1, 1)
    for h, w in [(1, 1), (3, 7), (17, 9)]:
        x = torch.randn(2, 8, h, w)
        assert m(x).shape == (2, 12, h, w)
    # the image-pooling branch: ReLU(conv1x1(spatial mean)), six channels (half of 12)
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        pooled = m.image_pool(x)
        conv = m.image_pool[1]
        ref = F.relu(conv.weight[:, :, 0, 0] @ x.mean(dim=(2, 3))[0] + conv.bias)
    assert pooled.shape == (1, 6, 1, 1)
    torch.testing.assert_close(pooled[0, :, 0, 0], ref)
    with pytest.raises(ValueError, match="rates must be integers >= 1"):
        MultiAtrous(8, 12, rates=(0, 3))


def test_attention_is_non_negative_and_weights_unit_features():
    torch.manual_seed(0)
    att = LocalAttention(6, 10).eval()
    with torch.no_grad():
        att.score.bias.fill_(-30.0)  # softplus of a very negative score: tiny but never negative
        out, a = att(torch.randn(2, 6, 5, 4) * 10)
    assert (a >= 0).all() and a.shape == (2, 1, 5, 4)
    torch.testing.assert_close(out.norm(dim=1, keepdim=True), a, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_convnext", "test_byobnet"])
@pytest.mark.parametrize("size", [(64, 64), (97, 131), (33, 47), (35, 33)])
def test_shapes_for_several_backbones_and_sizes(backbone, size):
    torch.manual_seed(0)
    net = create_model(backbone, head="dolg", head_kwargs={"dim": 32}).eval()
    assert net.feature_levels.reductions == (16, 32)
    assert net.head.local_dim == max(net.feature_levels.channels[0], 512)
    with torch.no_grad():
        y = net(torch.randn(2, 3, *size))
    assert y.shape == (2, 32) and y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2))


@pytest.mark.slow
@pytest.mark.parametrize("backbone, c3, c4", [("resnet50", 1024, 2048), ("tf_efficientnet_lite0", 112, 1280),
                                              ("mobilenetv2_100", 96, 1280), ("mobilenetv1_100", 512, 1024)])
def test_real_backbones(backbone, c3, c4):
    torch.manual_seed(0)
    net = create_model(backbone, head="dolg").eval()
    assert net.feature_levels.channels == (c3, c4) and net.dim == 512
    if backbone == "resnet50":  # the paper's sizes: layer3 1024 -> local 1024, f_g 1024, [f_g, f_orth] 2048 -> 512
        h = net.head
        assert (h.local_dim, h.fc_global.in_features, h.fc.in_features) == (1024, 2048, 2048)
        assert [c.out_channels for c in h.atrous.branches] == [512, 512, 512]
    with torch.no_grad():
        assert net(torch.randn(1, 3, 99, 77)).shape == (1, 512)


def test_gradients_reach_both_branches_and_p():
    net = _small()
    net.train()
    y = net(torch.randn(2, 3, 64, 80))
    (y * torch.randn_like(y)).sum().backward()
    h = net.head
    for name, p in [("p", h.pool.p), ("atrous", h.atrous.branches[1].weight), ("image pool", h.atrous.image_pool[1].weight),
                    ("attention conv", h.attention.conv.weight), ("attention score", h.attention.score.weight),
                    ("fc_global", h.fc_global.weight), ("fc", h.fc.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for stage in ("layer3", "layer4"):  # (timm zero-initialises each block's last BN scale: test the stage)
        grads = [p.grad for p in getattr(net.trunk, stage).parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, stage


def test_bf16_autocast_runs_the_fusion_in_float32():
    net = _small()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
    assert y.dtype == torch.float32 and F.cosine_similarity(y, ref).item() > 0.99


def test_checkpoint_round_trip(tmp_path):
    net = _small(fusion="hadamard", atrous_rates=[2, 4, 8])
    with torch.no_grad():
        net.head.pool.p.fill_(3.7)
    x = torch.randn(2, 3, 64, 72)
    with torch.no_grad():
        y = net(x)
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"dolg{suffix}"
        save_model(net, path)
        back = load_model(path)
        assert back.spec == net.spec and back.spec.head == "dolg"
        assert back.spec.head_kwargs["fusion"] == "hadamard" and back.head.atrous.rates == (2, 4, 8)
        with torch.no_grad():
            torch.testing.assert_close(back(x), y, rtol=0, atol=0)


def test_whitening_after_the_output_layer():
    net = _small()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = net(x)
        P = torch.linalg.qr(torch.randn(16, 16))[0][:8]
        m = torch.randn(16) * 0.01
        net.set_whitening(P, m)
        after = net(x)
    assert net.dim == 8 and net.spec.whitening == 8
    torch.testing.assert_close(after, F.normalize((before - m) @ P.T, dim=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"must be \(D_out, 16\)"):
        net.set_whitening(torch.eye(4, 5))


def test_registry_and_bad_arguments():
    assert "dolg" in list_heads() and head_levels("dolg") == (-2, -1) and head_levels("dolg", local_level=-3) == (-3, -1)
    assert isinstance(create_head("dolg", (192, 96)), DOLGHead)
    with pytest.raises(ValueError, match="unknown fusion 'sum'; available: orthogonal, concat, hadamard"):
        create_model("test_resnet", head="dolg", head_kwargs={"fusion": "sum"})
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        create_model("test_resnet", head="dolg", head_kwargs={"dim": 0})
    with pytest.raises(ValueError, match="bad arguments .*'dims'"):
        create_model("test_resnet", head="dolg", head_kwargs={"dims": 8})
    with pytest.raises(ValueError, match="reads 2 maps"):
        DOLGHead((96,))
    # another stage for the local branch: stride 8
    net = create_model("test_resnet", head="dolg", head_kwargs={"local_level": -3, "dim": 8})
    assert net.feature_levels.reductions == (8, 32) and net.feature_levels.channels[0] == 48


# --- CurricularFace -----------------------------------------------------------------------------


def _reference_curricular(x, labels, w, t, s, m):
    """Per-element Python reference of CurricularFace's logits."""
    xn, wn = F.normalize(x.double(), dim=1), F.normalize(w.double(), dim=1)
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        y = int(labels[i])
        cy = float(xn[i] @ wn[y])
        theta = math.acos(max(-1.0, min(1.0, cy)))
        cym = math.cos(theta + m)
        target = cym if theta + m <= math.pi else cy - math.sin(math.pi - m) * m
        for c in range(w.shape[0]):
            cc = float(xn[i] @ wn[c])
            if c == y:
                out[i, c] = s * target
            elif cc > cym:
                out[i, c] = s * cc * (t + cc)
            else:
                out[i, c] = s * cc
    return out


def test_curricular_logits_against_a_reference():
    torch.manual_seed(0)
    x, w = torch.randn(12, 6), torch.randn(5, 6)
    labels = torch.randint(0, 5, (12,))
    for t in (0.0, 0.3, 0.9):
        got = curricular_logits(x, labels, w, t, scale=30.0, margin=0.15).double()
        torch.testing.assert_close(got, _reference_curricular(x, labels, w, t, 30.0, 0.15), rtol=1e-5, atol=1e-4)
    # some negatives were hard, some easy (the test exercises both branches)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    cy = cos.gather(1, labels[:, None])
    hard = (cos > torch.cos(torch.acos(cy) + 0.15))
    hard.scatter_(1, labels[:, None], False)
    assert 0 < int(hard.sum()) < hard.numel() - 12


def test_curricularface_equals_arcface_without_hard_negatives():
    torch.manual_seed(1)
    w = torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 3])
    x = F.normalize(w, dim=1) * 5 + 0.01 * torch.randn(4, 8)  # each sample on its class: no hard negative
    cf = CurricularFaceLoss(8, 4)
    arc = ArcFaceLoss(8, 4)
    with torch.no_grad():
        cf.weight.copy_(w), arc.weight.copy_(w)
    cf.eval()
    torch.testing.assert_close(cf(x, labels), arc(x, labels))


def test_t_is_a_running_mean_of_the_target_cosine():
    torch.manual_seed(2)
    loss = create_loss("curricularface", dim=6, num_classes=3, momentum=0.9)
    assert "curricularface" in list_losses() and float(loss.t) == 0.0 and "t" in loss.state_dict()
    expected = 0.0
    for _ in range(3):
        x, labels = torch.randn(5, 6), torch.randint(0, 3, (5,))
        cy = (F.normalize(x, dim=1) @ F.normalize(loss.weight.detach(), dim=1).T).gather(1, labels[:, None]).mean()
        expected = 0.9 * expected + 0.1 * float(cy)
        value = loss(x, labels)
        assert abs(float(loss.t) - expected) < 1e-6
        # the loss of this batch used the updated t
        ref = F.cross_entropy(curricular_logits(x, labels, loss.weight, expected), labels)
        torch.testing.assert_close(value, ref)
    loss.eval()
    before = float(loss.t)
    loss(torch.randn(5, 6), torch.randint(0, 3, (5,)))
    assert float(loss.t) == before  # eval mode: t stays


def test_curricularface_gradients_and_checks():
    torch.manual_seed(3)
    loss = CurricularFaceLoss(6, 3)
    x = torch.randn(4, 6, requires_grad=True)
    loss(x, torch.tensor([0, 1, 2, 0])).backward()
    assert x.grad.abs().sum() > 0 and loss.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        CurricularFaceLoss(6, 3, momentum=1.0)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
        loss(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="margin must be an angle"):
        CurricularFaceLoss(6, 3, margin=2.0)
