"""Small images: a warning when they reach the network tiny, and an option to enlarge them."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from imret import create_model
from imret.cli import main
from imret.extract import SMALL_SIDE, describe_tensors, extract, upscale_to
from imret.images import load_image, to_tensor
from imret.index.store import Preprocessing, Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("resnet18", "gem", pretrained=False).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(60, 40), (200, 150), (40, 90)]):
        p = d / f"t{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_tiny_inputs_warn_and_are_listed(model, tiny):
    with pytest.warns(UserWarning, match=f"2 image\\(s\\) reach the network with a side under {SMALL_SIDE} px"):
        ex = extract(model, tiny, image_size=512, workers=0)
    assert ex.small == [0, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex = extract(model, tiny, image_size=512, workers=0, min_size=128)
    assert ex.small == []


def test_min_size_enlarges_exactly_as_a_bicubic_resize(model, tiny):
    got = extract(model, tiny, image_size=512, workers=0, min_size=128).descriptors
    ref = []
    for p in tiny:
        img = load_image(p, image_size=512)
        w, h = img.size
        if min(w, h) < 128:
            f = 128 / min(w, h)
            img = img.resize((128, round(h * f)) if w <= h else (round(w * f), 128), Image.Resampling.BICUBIC)
        ref.append(to_tensor(img, model.mean, model.std))
    np.testing.assert_allclose(got, describe_tensors(model, ref), atol=1e-5)
    assert upscale_to(Image.new("RGB", (60, 40)), 128).size == (192, 128)
    assert upscale_to(Image.new("RGB", (300, 200)), 128).size == (300, 200)
    with pytest.raises(ValueError, match="min_size must be a positive integer"):
        extract(model, tiny, min_size=0)


def test_the_store_keeps_min_size_and_uses_it_for_queries(model, tiny, tmp_path):
    with Store.create(tmp_path / "s", model, preprocessing=Preprocessing(image_size=512, min_size=128)) as st:
        st.add(tiny, workers=0)
        hits = st.search([tiny[0]], k=1, workers=0)
        assert hits[0][0].id == 0 and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert json.loads((tmp_path / "s" / "store.json").read_text())["preprocessing"]["min_size"] == 128
    with pytest.raises(ValueError, match="min_size"):
        Preprocessing(min_size=0)


def test_cli_min_size_reaches_the_store(tiny, tmp_path):
    assert main(["index", "build", *tiny, "--out", str(tmp_path / "s"), "--model", "resnet18", "--no-pretrained",
                 "--image-size", "512", "--min-size", "128", "--no-progress", "--workers", "0"]) == 0
    with Store.open(tmp_path / "s") as st:
        assert st.preprocessing.min_size == 128
