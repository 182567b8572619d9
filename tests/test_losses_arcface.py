"""ArcFace (imret.losses.arcface) against a per-sample loop with acos, plus the loss registry."""

import math

import pytest
import torch
import torch.nn.functional as F

import imret.losses as losses
from imret.losses import ArcFaceLoss, arcface_logits, arcface_loss, create_loss, list_losses

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _data(n=9, d=5, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)  # not normalised: ArcFace normalises
    w = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    return x, labels, w


def _ref_arcface(x, labels, w, s, m, easy_margin=False):
    """Mean cross-entropy, one sample at a time: angle by acos, margin added to the angle."""
    x, w, labels = x.double().tolist(), w.double().tolist(), labels.tolist()
    total = 0.0
    for xi, y in zip(x, labels):
        nx = math.sqrt(sum(v * v for v in xi))
        logits = []
        for c, wc in enumerate(w):
            nw = math.sqrt(sum(v * v for v in wc))
            cos = max(-1.0, min(1.0, sum(a * b for a, b in zip(xi, wc)) / (nx * nw)))
            if c == y:
                theta = math.acos(cos)
                if easy_margin:
                    cos = math.cos(theta + m) if cos > 0 else cos
                elif theta + m <= math.pi:
                    cos = math.cos(theta + m)
                else:
                    cos = cos - m * math.sin(m)
            logits.append(s * cos)
        top = max(logits)
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        total += log_z - logits[y]
    return total / len(labels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale,margin", [(30.0, 0.15), (64.0, 0.5), (10.0, 0.0)])
@pytest.mark.parametrize("easy_margin", [False, True])
def test_arcface_matches_loop(dtype, scale, margin, easy_margin):
    x, labels, w = _data(dtype=dtype)
    got = arcface_loss(x, labels, w, scale=scale, margin=margin, easy_margin=easy_margin)
    assert got.dtype == dtype and got.dim() == 0
    ref = _ref_arcface(x, labels, w, scale, margin, easy_margin)
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), **TOL[dtype])


def test_margin_zero_is_scaled_normalised_softmax():
    x, labels, w = _data(n=12, c=6, seed=1)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    ref = F.cross_entropy(30.0 * cos, labels)
    torch.testing.assert_close(arcface_loss(x, labels, w, scale=30.0, margin=0.0), ref)
    # and a positive margin only lowers the target logits
    lg0 = arcface_logits(x, labels, w, margin=0.0)
    lg = arcface_logits(x, labels, w, margin=0.3)
    onehot = F.one_hot(labels, 6).bool()
    torch.testing.assert_close(lg[~onehot], lg0[~onehot])
    assert (lg[onehot] < lg0[onehot]).all()


def test_past_pi_minus_m_uses_the_th_mm_rule():
    m = 0.5
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    angle = math.pi - 0.2  # theta + m > pi
    x = torch.tensor([[math.cos(angle), math.sin(angle)]], dtype=torch.float64)
    lg = arcface_logits(x, torch.tensor([0]), w, scale=1.0, margin=m)
    assert lg[0, 0].item() == pytest.approx(math.cos(angle) - m * math.sin(m), abs=1e-12)
    lg_easy = arcface_logits(x, torch.tensor([0]), w, scale=1.0, margin=m, easy_margin=True)
    assert lg_easy[0, 0].item() == pytest.approx(math.cos(angle), abs=1e-12)  # cos < 0: no margin
    # the target logit keeps decreasing with the angle across pi - m
    angles = torch.linspace(0.05, math.pi - 0.01, 400, dtype=torch.float64)
    xs = torch.stack([angles.cos(), angles.sin()], 1)
    target = arcface_logits(xs, torch.zeros(400, dtype=torch.long), w, scale=1.0, margin=m)[:, 0]
    assert (target[1:] < target[:-1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_flow_to_x_and_weights(dtype):
    x0, labels, _ = _data(dtype=dtype)
    module = ArcFaceLoss(5, 4).to(dtype)
    x = x0.clone().requires_grad_()
    loss = module(x, labels)
    loss.backward()
    for g in (x.grad, module.weight.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # a sample exactly on its class direction (cos = 1, sin = 0): still finite
    x1 = module.weight.detach()[2:3].clone().requires_grad_()
    module.zero_grad()
    module(x1, torch.tensor([2])).backward()
    assert torch.isfinite(x1.grad).all() and torch.isfinite(module.weight.grad).all()


def test_gradcheck_float64():
    x, labels, w = _data(n=5, d=3, c=3, seed=2)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: arcface_loss(a, labels, b, scale=8.0, margin=0.3), (x, w))


def test_one_class_and_empty_batch():
    x, _, w = _data(c=1)
    xx = x.clone().requires_grad_()
    loss = arcface_loss(xx, torch.zeros(9, dtype=torch.long), w)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert torch.isfinite(xx.grad).all()
    module = ArcFaceLoss(5, 3)
    empty = torch.zeros(0, 5, requires_grad=True)
    loss = module(empty, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert (module.weight.grad == 0).all()


def test_module_owns_weights_and_matches_functional():
    module = ArcFaceLoss(dim=5, num_classes=4, scale=16.0, margin=0.2)
    assert module.weight.shape == (4, 5) and module.weight.requires_grad
    assert "weight" in module.state_dict()
    assert torch.isfinite(module.weight).all() and module.weight.abs().sum() > 0
    x, labels, _ = _data(dtype=torch.float32)
    torch.testing.assert_close(module(x, labels), arcface_loss(x, labels, module.weight, scale=16.0, margin=0.2))
    plain = module.logits(x)
    torch.testing.assert_close(plain, 16.0 * F.normalize(x, dim=1) @ F.normalize(module.weight, dim=1).T)
    expected = arcface_logits(x, labels, module.weight, scale=16.0, margin=0.2)
    torch.testing.assert_close(module.logits(x, labels), expected)
    assert repr(module) == (
        "ArcFaceLoss(dim=5, num_classes=4, scale=16.0, margin=0.2, easy_margin=False, reduction='mean')"
    )
    per_sample = ArcFaceLoss(5, 4, reduction="none")
    assert per_sample(x, labels).shape == (9,)


def test_half_precision_and_autocast():
    x, labels, w = _data(dtype=torch.float32)
    ref = arcface_loss(x, labels, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = arcface_loss(x, labels, w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)
    assert arcface_loss(x.to(torch.bfloat16), labels, w).dtype == torch.float32


def test_validation_errors():
    x, labels, w = _data()
    with pytest.raises(ValueError, match="weight has dimension 4 but x has D=5"):
        arcface_loss(x, labels, w[:, :4])
    with pytest.raises(ValueError, match="class indices in \\[0, 4\\)"):
        arcface_loss(x, labels + 4, w)
    with pytest.raises(ValueError, match="labels has 8 entries"):
        arcface_loss(x, labels[:8], w)
    with pytest.raises(ValueError, match="margin must be an angle"):
        arcface_loss(x, labels, w, margin=-0.1)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        ArcFaceLoss(5, 4, scale=0.0)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        ArcFaceLoss(5, 0)
    with pytest.raises(ValueError, match="unknown reduction"):
        arcface_loss(x, labels, w, reduction="mean_nonzero")
    with pytest.raises(ValueError, match="built for dim=5"):
        ArcFaceLoss(5, 4).logits(torch.zeros(2, 3))


# ---------------------------------------------------------------- registry


def test_list_and_create_losses():
    assert list_losses() == ["ap", "arcface", "contrastive", "curricularface", "triplet"]
    assert list_losses("*t*") == ["contrastive", "triplet"] and list_losses("c*") == ["contrastive", "curricularface"]
    assert isinstance(create_loss("Contrastive", margin=0.85), losses.ContrastiveLoss)
    assert create_loss("contrastive", margin=0.85).margin == 0.85
    assert isinstance(create_loss("triplet"), losses.TripletLoss)
    assert create_loss("ap", bins=25, tie_aware=True).bins == 25
    arc = create_loss("arcface", dim=8, num_classes=3)
    assert isinstance(arc, ArcFaceLoss) and arc.weight.shape == (3, 8)
    assert set(losses.loss_descriptions()) == set(list_losses())


def test_create_loss_errors_list_the_choices():
    with pytest.raises(ValueError, match="unknown loss 'lifted'; available: ap, arcface, contrastive, curricularface, triplet"):
        create_loss("lifted")
    with pytest.raises(ValueError, match="bad arguments .* for loss 'arcface'"):
        create_loss("arcface", dim=8)
    with pytest.raises(ValueError, match="bad arguments .* for loss 'triplet'"):
        create_loss("triplet", margn=0.2)


@pytest.mark.parametrize("name", list_losses())
def test_every_registered_loss_trains_on_a_small_batch(name):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(12, 8, generator=g), dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    loss_fn = create_loss(name, dim=8, num_classes=4) if name in ("arcface", "curricularface") else create_loss(name)
    loss = loss_fn(x, labels)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert type(loss_fn).__name__ in repr(loss_fn) and "(" in repr(loss_fn)


def test_import_does_no_io():
    import subprocess
    import sys

    code = (
        "import builtins, io, os\n"
        "opened = []\n"
        "real = builtins.open\n"
        "def spy(f, *a, **k):\n"
        "    opened.append(str(f)); return real(f, *a, **k)\n"
        "import torch\n"  # torch's own imports are not ours
        "builtins.open = spy; io.open = spy\n"
        "import imret.losses\n"
        "print([f for f in opened if not f.endswith(('.py', '.pyc'))])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
