"""Text search on real photos and human captions (Flickr8k in ../shared): a linear caption model
(tf-idf + a projection fitted by ridge regression onto frozen ImageNet MobileNetV2-GeM descriptors
of the dev split) evaluated on the test split by `imret eval --flickr8k`, and a store of test
photos searched by text. A stand-in for a trained joint model: the figures must be far above
chance, not state of the art."""

import json

import numpy as np
import pytest

from conftest import installed

pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not installed("sklearn", "nltk"), reason="the text extra is not installed")]


@pytest.fixture(scope="module")
def flickr8k(shared):
    root = shared / "data" / "flickr8k"
    if not (root / "captions.csv").is_file():
        pytest.skip(f"Flickr8k not found at {root}")
    return root


@pytest.fixture(scope="module")
def joint(flickr8k, mobilenet_weights, tmp_path_factory):
    """(model file, caption model file): MobileNetV2-GeM and a caption model fitted on dev."""
    import torch

    from imret import create_model
    from imret.extract import extract
    from imret.models.checkpoints import save_model
    from imret.text import CaptionEncoder, load_flickr8k

    d = tmp_path_factory.mktemp("joint")
    model = create_model("mobilenetv2_100.coral", "gem", weights=str(mobilenet_weights))
    save_model(model, d / "model.safetensors")
    dev = load_flickr8k(flickr8k).subset("dev")
    ex = extract(model, dev.paths, image_size=224, workers=2)
    assert not ex.skipped
    caps = [dev.captions[i] for i in ex.indices]
    flat = [c for cs in caps for c in cs]
    enc = CaptionEncoder(dim=int(model.dim)).fit(flat)
    t = enc.transform(flat).toarray()
    phi = np.repeat(np.asarray(ex.descriptors, np.float64), [len(c) for c in caps], axis=0)
    w = phi.T @ t @ np.linalg.inv(t.T @ t + 1.0 * np.eye(t.shape[1]))
    with torch.no_grad():
        enc.proj.weight.copy_(torch.from_numpy(w).float())
    enc.save(d / "text.safetensors")
    return d / "model.safetensors", d / "text.safetensors"


def test_flickr8k_test_split_eval(flickr8k, joint, tmp_path, capsys):
    from imret.cli import main

    model, text = joint
    out = tmp_path / "eval"
    assert main(["eval", "--flickr8k", str(flickr8k), "--split", "test", "--model", str(model), "--text-model",
                 str(text), "--image-size", "224", "--out", str(out), "--no-progress"]) == 0
    print(capsys.readouterr().out)
    res = json.loads((out / "results.json").read_text())
    cm = res["cross_modal"]
    assert cm["num_images"] == 1000 and cm["num_texts"] == 5000
    # chance: R@10 = 1 % (text -> image), about 5 % (image -> text, 5 captions per image)
    assert cm["text_to_image"]["10"] > 0.05 and cm["image_to_text"]["10"] > 0.15, cm
    assert cm["text_to_image_median_rank"] < 250
    # semantic NDCG@10 against random scores on the same caption relevance (about 0.12)
    from imret import semantic_eval as se
    from imret.text import CaptionEncoder, load_flickr8k, tfidf_similarity

    test = load_flickr8k(flickr8k).subset("test")
    rel = tfidf_similarity(CaptionEncoder(dim=1).fit([c for cs in test.captions for c in cs])
                           .transform_images(test.captions))
    chance = se.evaluate_semantic(np.random.default_rng(0).standard_normal(rel.shape), rel, exclude_self=True,
                                  ks=(10,)).ndcg[10]
    assert res["semantic"]["ndcg"]["10"] > 2 * chance, (res["semantic"], chance)


def test_flickr8k_store_searched_by_text(flickr8k, joint, tmp_path):
    from imret.index.store import Preprocessing, Store
    from imret.models.factory import load_model
    from imret.text import load_flickr8k

    model, text = joint
    test = load_flickr8k(flickr8k).subset("test")
    n = 300
    with Store.create(tmp_path / "store", load_model(model), preprocessing=Preprocessing(image_size=224)) as st:
        st.add(test.paths[:n], workers=2)
        st.set_text_model(text)
        hits = st.search(text="a dog runs through the grass", k=10)
    dog = {p for p, cs in zip(test.paths[:n], test.captions[:n]) if any("dog" in c.lower() for c in cs)}
    base = len(dog) / n
    found = sum(h.path in dog for h in hits) / len(hits)
    assert found > 2 * base, (found, base)
