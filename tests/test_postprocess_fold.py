"""Folding a fitted whitening into a model gives the descriptors of whitening them afterwards."""

import copy

import numpy as np
import pytest
import torch

from imret.model import create_model
from imret.whitening import Whitening, fit_pca_whitening


def smooth_images(n, size=64, seed=0):
    """``(n, 3, size, size)`` seeded low-frequency images: more varied features than white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def net_and_images():
    torch.manual_seed(0)
    net = create_model("resnet18", "gem", pretrained=False)
    return net, smooth_images(40)


def descriptors(net, x):
    with torch.inference_mode():
        return net(x).numpy()


def test_folded_pca_whitening_equals_applied(net_and_images):
    net, x = net_and_images
    plain = descriptors(net, x)
    assert plain.shape == (40, 512)
    w = fit_pca_whitening(plain[:30], dim=16, power=0.5)  # fitted on 30, checked on all 40
    expected = w.apply(plain)

    folded = w.fold_into(copy.deepcopy(net))
    got = descriptors(folded, x)

    assert folded.dim == 16 and folded.spec.whitening == 16
    assert got.shape == expected.shape == (40, 16)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the whitening changes the ranking: a wrong fold could not pass by returning the input
    assert np.abs(got @ got.T - (plain @ plain.T)).max() > 0.1


def test_fold_returns_the_model_and_round_trips_the_layer(net_and_images):
    net, x = net_and_images
    w = fit_pca_whitening(descriptors(net, x), dim=8, power=0.25)
    model = create_model("resnet18", "gem", pretrained=False)
    assert w.fold_into(model) is model
    np.testing.assert_allclose(model.whiten.weight.detach().numpy(), w.projection)
    np.testing.assert_allclose(model.whiten.bias.detach().numpy(), -w.projection @ w.mean, atol=1e-5)


def test_input_dim_mismatch_raises():
    model = create_model("resnet18", "gem", pretrained=False)
    w = Whitening(mean=np.zeros(256), projection=np.eye(16, 256), kind="pca")
    with pytest.raises(ValueError, match="256-d .* 512-d"):
        w.fold_into(model)
    assert model.whiten is None  # untouched


def test_existing_whitening_needs_replace():
    model = create_model("resnet18", "gem", pretrained=False, whitening=32)
    w = Whitening(mean=np.zeros(512), projection=np.eye(16, 512), kind="pca")
    with pytest.raises(ValueError, match="already has a whitening"):
        w.fold_into(model)
    assert model.dim == 32
    w.fold_into(model, replace=True)
    assert model.dim == 16


def test_model_without_l2_before_whitening_raises():
    model = create_model("resnet18", "gem", pretrained=False, l2_before_whiten=False)
    w = Whitening(mean=np.zeros(512), projection=np.eye(16, 512), kind="pca")
    with pytest.raises(ValueError, match="l2_before_whiten"):
        w.fold_into(model)
