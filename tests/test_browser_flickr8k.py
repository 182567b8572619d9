"""Search by text in the web page of `imret serve`, on real photos: a store of Flickr8k *test*
photos (../shared/data/flickr8k) with a caption model fitted on the *train* split (issue 14).

The caption model is a stand-in for a trained joint model, fitted honestly on other photos than
those searched: MobileNetV2-GeM (ImageNet weights, 224 px) describes ``N_TRAIN`` train photos,
a :class:`~imret.text.CaptionEncoder` learns tf-idf over their captions (all five per photo),
and its projection W is fitted by ridge regression onto their descriptors. The store holds the
first ``N_STORE`` test photos; chromium types a text in the page's box, and the photos ranked
first must mostly be photos whose own captions name the thing asked for, far above its share
in the store. The page's ranking must be the API's. The screenshot goes to
``test-artifacts/browser_text_search_flickr8k.png`` (git-ignored: Flickr8k photos are for
research use only and must not be committed).

Needs the browser (as test_browser.py), the serve and text extras and ../shared; skips with the
reason otherwise.
"""

import re
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import installed
from test_browser import (  # noqa: F401  (browser_paths and driver are fixtures used here)
    _open,
    _post_json,
    _results_seq,
    _screenshot,
    _thumbs_loaded,
    _wait,
    _wait_results,
    browser_paths,
    driver,
    serve_store,
)

pytestmark = [pytest.mark.realdata, pytest.mark.slow,
              pytest.mark.skipif(not installed("sklearn", "nltk"), reason="the text extra is not installed")]

N_TRAIN = 500  # train photos that fit the caption model (about 20-30 s on one core)
N_STORE = 100  # test photos in the store
QUERY = "a dog running on the grass"
CONTROL = "a man in a red shirt"  # another frequent concept: its first photos are not the dogs
TOP = 5
_DOG = re.compile(r"\bdogs?\b")


@pytest.fixture(scope="module")
def flickr8k(shared) -> Path:
    root = shared / "data" / "flickr8k"
    if not (root / "captions.csv").is_file() or not (root / "splits").is_dir():
        pytest.skip(f"Flickr8k not found at {root} (captions.csv and splits/)")
    return root


def fit_caption_model(model, photos: list[str], captions: list[list[str]], *, lam: float = 1.0):
    """A caption model for ``model``'s descriptors: tf-idf over every caption of ``photos``, and
    W fitted by ridge regression so that each caption's embedding points at its photo's
    descriptor: W = Φᵀ T (TᵀT + λI)⁻¹, one row of T and Φ per caption."""
    import torch

    from imret.extract import extract_descriptors
    from imret.text import CaptionEncoder

    phi = extract_descriptors(model, photos, image_size=224, workers=0)
    flat = [c for cs in captions for c in cs]
    enc = CaptionEncoder(dim=int(model.dim)).fit(flat)
    t = enc.transform(flat).toarray()
    phi = np.repeat(np.asarray(phi, np.float64), [len(cs) for cs in captions], axis=0)
    w = phi.T @ t @ np.linalg.inv(t.T @ t + lam * np.eye(t.shape[1]))
    with torch.no_grad():
        enc.proj.weight.copy_(torch.from_numpy(w).float())
    return enc


@pytest.fixture(scope="module")
def flickr_store(browser_paths, flickr8k, mobilenet_weights, one_torch_thread, tmp_path_factory) -> dict:
    """The store of the first ``N_STORE`` test photos, with a caption model fitted on the first
    ``N_TRAIN`` train photos; the file names of the stored photos whose captions say "dog"; and
    each id's file name."""
    from imret import create_model
    from imret.index.store import Preprocessing, Store
    from imret.text import load_flickr8k

    start = time.perf_counter()
    data = load_flickr8k(flickr8k)
    train, test = data.subset("train"), data.subset("test")
    assert not {Path(p).name for p in train.paths} & {Path(p).name for p in test.paths}
    model = create_model("mobilenetv2_100.coral", "gem", weights=str(mobilenet_weights))
    enc = fit_caption_model(model, train.paths[:N_TRAIN], train.captions[:N_TRAIN])
    path = tmp_path_factory.mktemp("browser-flickr8k") / "store"
    with Store.create(path, model, model_source="mobilenetv2_100.coral",
                      preprocessing=Preprocessing(image_size=224)) as st:
        report = st.add(test.paths[:N_STORE], workers=0)
        assert len(report.added) == N_STORE and not report.skipped
        st.set_text_model(enc, source=f"Flickr8k train, first {N_TRAIN} photos (test)")
        names = {r.id: Path(r.path).name for r in st.list(0, 10_000)}
    dog = {Path(p).name for p, cs in zip(test.paths[:N_STORE], test.captions[:N_STORE])
           if any(_DOG.search(c.lower()) for c in cs)}
    print(f"\nFlickr8k store: {N_TRAIN} train photos described, {N_STORE} test photos stored "
          f"in {time.perf_counter() - start:.1f} s; {len(dog)} of them have 'dog' in a caption")
    return {"path": path, "dog": dog, "names": names}


@pytest.fixture(scope="module")
def flickr_server(flickr_store, tmp_path_factory):
    with serve_store(flickr_store["path"], tmp_path_factory.mktemp("serve") / "serve.log", N_STORE) as base:
        yield base


def test_text_search_on_flickr8k_test_photos(flickr_server, flickr_store, driver):
    """Typed in the page, "a dog running on the grass" shows mostly photos captioned with a dog
    (far above their share of the store), in the API's order; another text does not.
    Screenshot: test-artifacts/browser_text_search_flickr8k.png."""
    drv, server, dog = driver, flickr_server, flickr_store["dog"]
    base_rate = len(dog) / N_STORE
    assert 0 < base_rate < 0.5  # the concept is frequent, and picking its photos is not trivial
    drv.get_log("browser")  # only this test's entries below
    _open(drv, server + "/")
    _wait(drv, lambda d: d.find_element("id", "text-form").is_displayed(), "the text search box")
    box = drv.find_element("id", "text-input")
    box.clear()
    box.send_keys(QUERY)
    before = _results_seq(drv)
    drv.find_element("id", "text-btn").click()
    hits = _wait_results(drv, before, "the text search")
    assert drv.find_element("id", "results").get_attribute("data-query") == "text"
    assert QUERY in drv.find_element("id", "query-caption").text

    api = _post_json(server + "/api/search", {"text": QUERY, "k": len(hits)})["results"]
    assert hits and [h["id"] for h in hits] == [a["id"] for a in api]
    assert all(abs(h["score"] - a["score"]) < 1e-6 for h, a in zip(hits, api))
    names = [h["name"] for h in hits]
    assert names == [flickr_store["names"][h["id"]] for h in hits]  # the stored photos' file names
    share = sum(n in dog for n in names[:TOP]) / TOP
    print(f"'{QUERY}': {share:.0%} of the top {TOP} are dog photos; base rate {base_rate:.0%} "
          f"({len(dog)} of {N_STORE})")
    assert share >= 0.6 and share >= 2 * base_rate, (names[:TOP], share, base_rate)

    # the ranking follows the text: another frequent concept does not bring up the dogs
    control = _post_json(server + "/api/search", {"text": CONTROL, "k": TOP})["results"]
    control_share = sum(a["name"] in dog for a in control) / TOP
    print(f"'{CONTROL}': {control_share:.0%} of the top {TOP} are dog photos")
    assert control_share < share and control_share <= 0.4, control

    _wait(drv, lambda d: _thumbs_loaded(d, "#results img"), "the result thumbnails")
    drv.execute_script("window.scrollTo(0, 0)")
    _screenshot(drv, "browser_text_search_flickr8k.png")
    severe = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
