"""The web page of `imret serve` in a real headless browser (Debian's chromium + chromedriver).

A store of 80 rParis6k-mini database photos (all positives of one query, the rest spread over
the other landmarks) is served by `python -m imret.cli serve` in a subprocess, once for the
module. Through the page, chromium uploads the query photo, draws the query's official box
with the mouse (resizes it by a handle, moves it), searches, and the first hit must be one of
the query's easy/hard positives; the same with the photo stored sideways under EXIF
orientation 6 (the box is in upright pixels); a click on a hit searches with that indexed
image; a dropped file is searched; the listing pages; an image is added and deleted; a text
query ("the eiffel tower") is searched with the store's caption model (fitted here on captions
made from the landmark names) and its results shown as for a photo.
Screenshots go to ``test-artifacts/`` (git-ignored).

Needs ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (``scripts/install_browser.sh``;
override with ``IMRET_CHROMIUM`` / ``IMRET_CHROMEDRIVER``), selenium, and ``../shared``; skips
with the reason otherwise. Selenium Manager is never used (the driver path is explicit), so
nothing is downloaded.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, free_port, installed

try:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select
except ImportError:  # the tests skip (browser_paths) without selenium
    Keys = Select = None

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("IMRET_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("IMRET_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS = REPO / "test-artifacts"
QUERY = "paris_eiffel_000266"
N_DB = 80
WAIT_S = 180  # start-up of `imret serve` (about 10 s on a quiet 2-core machine; a loaded one is slower)


# --- fixtures: store, server, browser ------------------------------------------------------------


@pytest.fixture(scope="module")
def browser_paths():
    if not installed("selenium"):
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not (p.is_file() and os.access(p, os.X_OK))]
    if missing:
        pytest.skip(f"no browser for the web page test: {', '.join(missing)} missing "
                    "(run scripts/install_browser.sh, or apt-get install chromium chromium-driver)")
    return CHROMIUM, CHROMEDRIVER


def paris_subset(paris_mini: Path) -> dict:
    """The query, its positives and the ``N_DB`` database photos to index (all its positives,
    the rest spread over the other landmarks; no junk)."""
    from imret.evaluation import load_revisitop

    gt = load_revisitop(paris_mini / "gnd_rparis6k-mini.pkl")
    q = gt.qimlist.index(QUERY)
    positives = sorted(set(gt.easy[q].tolist()) | set(gt.hard[q].tolist()))
    junk = set(gt.junk[q].tolist())
    rest = [i for i in range(len(gt.imlist)) if i not in positives and i not in junk]
    need = N_DB - len(positives)
    assert 0 < need <= len(rest)
    step = len(rest) / need
    chosen = sorted(positives + [rest[int(j * step)] for j in range(need)])
    return {
        "db": [paris_mini / "jpg" / f"{gt.imlist[i]}.jpg" for i in chosen],
        "positives": {f"{gt.imlist[i]}.jpg" for i in positives},
        "query_path": paris_mini / "jpg" / f"{QUERY}.jpg",
        "bbox": [float(v) for v in gt.bbx[q]],
        # a photo that is not in the store, for the add / delete round trip
        "extra": paris_mini / "jpg" / f"{gt.qimlist[(q + 1) % len(gt.qimlist)]}.jpg",
    }


def build_store(path: Path, paris: dict, weights: Path) -> None:
    """MobileNetV2-GeM at 512 px over the subset, on one torch thread."""
    import torch

    from imret import create_model
    from imret.index.store import Preprocessing, Store

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = create_model("mobilenetv2_100.coral", "gem", weights=str(weights))
        with Store.create(path, model, model_source="mobilenetv2_100.coral",
                          preprocessing=Preprocessing(image_size=512)) as st:
            report = st.add([str(p) for p in paris["db"]], workers=0)
            assert len(report.added) == N_DB and not report.skipped
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paris(paris_mini):
    return paris_subset(paris_mini)


def add_caption_model(path: Path) -> None:
    """A caption model for the store: tf-idf over one caption per photo made from its landmark's
    name ("a photo of the eiffel in paris"), its projection W fitted by ridge regression so that
    a caption's embedding points at its photos' descriptors (W = Φᵀ T (TᵀT + λI)⁻¹)."""
    import numpy as np
    import torch

    from imret.index.store import Store
    from imret.text import CaptionEncoder

    with Store.open(path, writable=True) as st:
        recs = st.list(0, 10_000)
        phi = np.asarray(st.descriptors(), np.float64)[[r.id for r in recs]]
        captions = [f"a photo of the {Path(r.path).stem.split('_')[1]} in paris" for r in recs]
        enc = CaptionEncoder(dim=st.dim).fit(captions)
        t = enc.transform(captions).toarray()
        w = phi.T @ t @ np.linalg.inv(t.T @ t + 1e-3 * np.eye(t.shape[1]))
        with torch.no_grad():
            enc.proj.weight.copy_(torch.from_numpy(w).float())
        st.set_text_model(enc, source="landmark-name captions (test)")


@pytest.fixture(scope="module")
def store_dir(browser_paths, paris, mobilenet_weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("browser") / "store"
    build_store(path, paris, mobilenet_weights)
    add_caption_model(path)
    return path


def _get_json(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def serve_store(store_dir: Path, log: Path, n_images: int):
    """`python -m imret.cli serve STORE` on a free port, its output in ``log``; yields its base
    URL once /api/health answers with ``n_images`` images, and stops it on exit."""
    if not installed("fastapi", "uvicorn", "multipart"):
        pytest.skip("the server needs the serve extra (pip install -e '.[serve]')")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "imret.cli", "serve", str(store_dir), "--port", str(port), "--threads", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{log.read_text()}")
            try:
                health = _get_json(base + "/api/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer /api/health within {WAIT_S} s:\n{log.read_text()}")
                time.sleep(0.2)
        assert health["status"] == "ok" and health["images"] == n_images
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(store_dir, tmp_path_factory):
    """`python -m imret.cli serve STORE` on a free port; yields its base URL."""
    with serve_store(store_dir, tmp_path_factory.mktemp("serve") / "serve.log", N_DB) as base:
        yield base


@pytest.fixture(scope="module")
def driver(browser_paths, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--force-device-scale-factor=1", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--disable-sync",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager is not consulted and downloads nothing
    drv = webdriver.Chrome(service=Service(executable_path=str(chromedriver)), options=opts)
    drv.set_page_load_timeout(WAIT_S)
    yield drv
    drv.quit()


# --- helpers -----------------------------------------------------------------------------------


def _wait(drv, cond, what: str, timeout: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.1).until(lambda d: cond(d))
    except TimeoutException:
        _screenshot(drv, "browser_failure.png")
        msg = drv.execute_script("const m = document.getElementById('message'); return m.hidden ? '' : m.textContent;")
        raise AssertionError(f"timed out waiting for {what}; page message: {msg!r}") from None


def _screenshot(drv, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    drv.save_screenshot(str(path))
    return path


def _results_seq(drv) -> int:
    return int(drv.find_element("id", "results").get_attribute("data-seq") or 0)


def _wait_results(drv, after: int, what: str) -> list[dict]:
    """Wait until a result list newer than ``after`` is rendered; returns its hits."""
    def done(d):
        r = d.find_element("id", "results")
        if r.get_attribute("data-state") == "error":
            raise AssertionError(f"{what}: the page shows an error: "
                                 f"{d.find_element('id', 'message').text!r}")
        return r.get_attribute("data-state") == "done" and int(r.get_attribute("data-seq")) > after

    _wait(drv, done, what)
    return drv.execute_script(
        "return [...document.querySelectorAll('#results [data-testid=result]')].map(li => ({"
        "id: +li.dataset.id, name: li.dataset.name, rank: +li.dataset.rank, score: +li.dataset.score,"
        "text: li.innerText}));")


def _rect(drv, selector: str) -> dict:
    return drv.execute_script("const r = document.querySelector(arguments[0]).getBoundingClientRect();"
                              "return {x: r.left, y: r.top, w: r.width, h: r.height};", selector)


def _drag(drv, x0: float, y0: float, x1: float, y1: float) -> None:
    """A mouse drag between two viewport points (pointer events, as from a real mouse)."""
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(drv, duration=50)
    ptr = chain.w3c_actions.pointer_action
    ptr.move_to_location(round(x0), round(y0))
    ptr.pointer_down()
    for t in (0.25, 0.5, 0.75, 1.0):
        ptr.move_to_location(round(x0 + t * (x1 - x0)), round(y0 + t * (y1 - y0)))
    ptr.pointer_up()
    chain.perform()


def _bbox(drv) -> list[int] | None:
    v = drv.find_element("id", "crop-box").get_attribute("data-bbox")
    return [int(x) for x in v.split(",")] if v else None


def _thumbs_loaded(drv, selector: str) -> bool:
    return drv.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])].slice(0, 12);"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);", selector)


def _open(drv, url: str) -> None:
    """Load the page afresh and wait until it knows the store (the header shows the count)."""
    drv.get("about:blank")  # a URL differing only by its #fragment would not reload
    drv.get(url)
    _wait(drv, lambda d: d.find_element("id", "store-count").text.isdigit(), "the image count in the header")


def _upload(drv, path: Path) -> tuple[int, int]:
    """Choose ``path`` with the file input; waits for the automatic search and the preview.
    Returns the preview's natural (EXIF-upright) size."""
    before = _results_seq(drv)
    drv.find_element("id", "file-input").send_keys(str(path))
    _wait_results(drv, before, f"the search after choosing {path.name}")
    _wait(drv, lambda d: d.execute_script("return document.getElementById('preview-img').naturalWidth") > 0,
          "the preview")
    return tuple(drv.execute_script("const i = document.getElementById('preview-img');"
                                    "return [i.naturalWidth, i.naturalHeight];"))


def _to_screen(drv, nat_w: int):
    """Image pixels -> viewport pixels of the preview, and the scale (screen px per image px)."""
    drv.execute_script("window.scrollTo(0, 0)")
    img = _rect(drv, "#preview-img")
    s = img["w"] / nat_w
    return (lambda x, y: (img["x"] + x * s, img["y"] + y * s)), s


def _close(a, b, tol) -> bool:
    return a is not None and all(abs(u - v) <= tol for u, v in zip(a, b))


def _search_button(drv, what: str) -> list[dict]:
    before = _results_seq(drv)
    drv.find_element("id", "search-btn").click()
    return _wait_results(drv, before, what)


# --- the tests (one browser and one server for the module) --------------------------------------


def test_header_and_controls_show_the_server_settings(server, driver):
    _open(driver, server + "/")
    assert driver.find_element("id", "store-count").text == str(N_DB)
    assert "mobilenetv2_100.coral" in driver.find_element("id", "store-model").text
    assert not driver.find_element("id", "token-field").is_displayed()  # no auth on this server
    assert driver.find_element("id", "k-select").get_attribute("value") == "20"  # the server's default k
    assert not driver.find_element("id", "qe-toggle").is_selected()  # the store's QE is off
    assert driver.find_element("id", "search-btn").get_attribute("disabled")  # nothing to search yet


def test_upload_draw_box_and_search_finds_the_landmark(server, driver, paris):
    drv = driver
    _open(drv, server + "/")
    nat_w, nat_h = _upload(drv, paris["query_path"])
    assert (nat_w, nat_h) == (1024, 768)

    # draw the official query box with the mouse: first too small, then resized by its
    # bottom-right handle, then moved away and back
    to_screen, s = _to_screen(drv, nat_w)
    x1, y1, x2, y2 = paris["bbox"]
    tol = 2 / s + 2  # two screen pixels, in image pixels
    _drag(drv, *to_screen(x1, y1), *to_screen((x1 + x2) / 2, (y1 + y2) / 2))
    assert _close(_bbox(drv), [x1, y1, (x1 + x2) / 2, (y1 + y2) / 2], tol), _bbox(drv)
    se = _rect(drv, "#crop-box .handle.se")
    _drag(drv, se["x"] + se["w"] / 2, se["y"] + se["h"] / 2, *to_screen(x2, y2))
    got = _bbox(drv)
    assert _close(got, paris["bbox"], tol), (got, paris["bbox"], tol)
    box = _rect(drv, "#crop-box")
    cx, cy = box["x"] + box["w"] / 2, box["y"] + box["h"] / 2
    _drag(drv, cx, cy, cx + 10, cy + 20)
    moved = _bbox(drv)
    assert _close([moved[0] - got[0], moved[1] - got[1]], [10 / s, 20 / s], tol), (got, moved)
    _drag(drv, cx + 10, cy + 20, cx, cy)
    assert _close(_bbox(drv), paris["bbox"], tol), (_bbox(drv), paris["bbox"])

    # search with the box: the first hit is one of the query's positives
    hits = _search_button(drv, "the search with the crop box")
    assert len(hits) == 20 and [h["rank"] for h in hits] == list(range(1, 21))
    assert hits[0]["name"] in paris["positives"], [h["name"] for h in hits[:5]]
    assert f"{hits[0]['score']:.3f}" in hits[0]["text"] and hits[0]["name"] in hits[0]["text"]
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    assert "ms" in drv.find_element("id", "took").text
    assert "region" in drv.find_element("id", "query-caption").text
    _wait(drv, lambda d: _thumbs_loaded(d, "#results img"), "the result thumbnails")
    assert drv.execute_script("return document.querySelector('#results img').loading") == "lazy"
    _screenshot(drv, "browser_search.png")

    # the box can be cleared, and made and adjusted with the keyboard; k is honoured
    drv.find_element("id", "crop-clear").click()
    assert _bbox(drv) is None and not drv.find_element("id", "crop-box").is_displayed()
    drv.find_element("id", "crop-add").click()
    assert _bbox(drv) == [204, 153, 820, 615]  # the centred 60 % box of 1024 x 768
    crop = drv.switch_to.active_element
    assert crop.get_attribute("id") == "crop-box"
    crop.send_keys(Keys.ARROW_RIGHT)
    crop.send_keys(Keys.SHIFT, Keys.ARROW_DOWN)
    assert _bbox(drv) == [214, 153, 830, 625]  # moved right, then taller, by 1 % of the long side
    crop.send_keys(Keys.ESCAPE)
    assert _bbox(drv) is None
    Select(drv.find_element("id", "k-select")).select_by_value("10")
    assert len(_search_button(drv, "the search with k=10")) == 10


def test_clicking_a_hit_searches_with_that_indexed_image(server, driver, paris):
    drv = driver
    _open(drv, server + "/")
    _upload(drv, paris["query_path"])
    hits = drv.find_elements("css selector", "#results [data-testid=result]")
    target = int(hits[1].get_attribute("data-id"))
    before = _results_seq(drv)
    hits[1].find_element("css selector", ".tile-btn").click()
    hits2 = _wait_results(drv, before, "the search with an indexed image")
    assert drv.find_element("id", "results").get_attribute("data-query") == f"id:{target}"
    assert hits2 and hits2[0]["id"] == target and hits2[0]["score"] > 0.99  # itself first
    assert f"#{target}" in drv.find_element("id", "query-caption").text


def test_exif_rotated_upload_takes_the_box_in_upright_pixels(server, driver, paris, tmp_path):
    """A photo stored sideways with EXIF orientation 6 shows upright; the box drawn on it is in
    upright pixels, as the API expects, so the official box still finds the landmark."""
    from PIL import Image

    upright = Image.open(paris["query_path"])
    rotated = tmp_path / "query_exif6.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif.tobytes(), quality=92)
    drv = driver
    _open(drv, server + "/")
    nat_w, nat_h = _upload(drv, rotated)
    assert (nat_w, nat_h) == upright.size  # the browser shows it upright
    to_screen, s = _to_screen(drv, nat_w)
    x1, y1, x2, y2 = paris["bbox"]
    _drag(drv, *to_screen(x1, y1), *to_screen(x2, y2))
    assert _close(_bbox(drv), paris["bbox"], 2 / s + 2)
    hits = _search_button(drv, "the search with the rotated photo")
    assert hits[0]["name"] in paris["positives"], [h["name"] for h in hits[:5]]


def test_dropping_a_photo_searches_at_once(server, driver):
    """A file dropped on the drop zone (a DragEvent carrying a File, as the browser makes one)."""
    drv = driver
    _open(drv, server + "/")
    before = _results_seq(drv)
    drv.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/api/images/7/thumbnail?size=512').then(r => r.blob()).then(b => {
          const dt = new DataTransfer();
          dt.items.add(new File([b], 'dropped.jpg', {type: 'image/jpeg'}));
          const zone = document.getElementById('dropzone');
          for (const t of ['dragenter', 'dragover', 'drop'])
            zone.dispatchEvent(new DragEvent(t, {dataTransfer: dt, bubbles: true, cancelable: true}));
          done();
        });""")
    hits = _wait_results(drv, before, "the search after a drop")
    assert hits[0]["id"] == 7, hits[:3]  # a thumbnail of an indexed photo finds that photo
    assert "dropped.jpg" in drv.find_element("id", "query-caption").text


def test_browse_pages_through_the_index(server, driver):
    drv = driver
    _open(drv, server + "/browse")
    grid = lambda d: d.find_element("id", "browse-grid")  # noqa: E731

    def on_page(n):
        return lambda d: grid(d).get_attribute("data-state") == "done" and grid(d).get_attribute("data-page") == str(n)

    def ids():
        return [int(i.get_attribute("data-id"))
                for i in drv.find_elements("css selector", "#browse-grid [data-testid=browse-item]")]

    _wait(drv, on_page(1), "the first page of the listing")
    assert drv.find_element("id", "view-browse").is_displayed()
    assert not drv.find_element("id", "view-search").is_displayed()
    assert drv.find_element("id", "page-info").text == "Page 1 of 2"
    assert ids() == list(range(60))
    assert not drv.find_element("id", "page-prev").is_enabled()
    _wait(drv, lambda d: _thumbs_loaded(d, "#browse-grid img"), "the listing thumbnails")
    assert drv.execute_script("return document.querySelector('#browse-grid img').loading") == "lazy"
    _screenshot(drv, "browser_browse.png")

    drv.find_element("id", "page-next").click()
    _wait(drv, on_page(2), "page 2")
    assert ids() == list(range(60, N_DB)) and drv.find_element("id", "page-info").text == "Page 2 of 2"
    assert not drv.find_element("id", "page-next").is_enabled()
    assert drv.current_url.endswith("#browse/2")
    page_input = drv.find_element("id", "page-input")
    page_input.clear()
    page_input.send_keys("1")
    drv.find_element("id", "page-go").click()
    _wait(drv, on_page(1), "the jump to page 1")
    drv.back()  # the pages are in the history
    _wait(drv, on_page(2), "page 2 again after Back")

    # "find similar" from the listing switches to the search view
    before = _results_seq(drv)
    drv.find_element("css selector", "#browse-grid [data-id='61'] .tile-btn").click()
    hits = _wait_results(drv, before, "find similar from the listing")
    assert drv.find_element("id", "view-search").is_displayed() and hits[0]["id"] == 61


def test_add_and_delete_through_the_page(server, driver, paris):
    drv = driver
    _open(drv, server + "/#browse")
    _wait(drv, lambda d: d.find_element("id", "browse-grid").get_attribute("data-state") == "done", "the listing")
    assert drv.find_element("id", "add-wrap").is_displayed()
    drv.find_element("id", "add-input").send_keys(str(paris["extra"]))
    _wait(drv, lambda d: "Added 1 image" in d.find_element("id", "message").text, "the add report")
    _wait(drv, lambda d: d.find_element("id", "store-count").text == str(N_DB + 1), "the new image count")
    new_id = _get_json(server + f"/api/images?offset={N_DB}&limit=1")["items"][0]["id"]
    drv.find_element("id", "page-next").click()
    new = f"#browse-grid [data-id='{new_id}']"
    _wait(drv, lambda d: d.find_elements("css selector", new), "the added image on page 2")
    drv.find_element("css selector", new + " [data-testid=delete-btn]").click()
    _wait(drv, _alert, "the delete confirmation").accept()
    _wait(drv, lambda d: "Removed" in d.find_element("id", "message").text, "the delete report")
    _wait(drv, lambda d: d.find_element("id", "store-count").text == str(N_DB), "the image count after delete")
    assert not drv.find_elements("css selector", new)
    assert _get_json(server + "/api/health")["images"] == N_DB


def test_localize_draws_the_object_box_on_the_hit_thumbnails(server, driver, paris):
    """With "Localize object" on, the search asks for boxes (localize=true: an aml stage) and
    each hit's box is drawn over its square, cover-cropped thumbnail where the box lies in the
    image; the caption names the stage. Nothing is refused by the page's CSP."""
    drv = driver
    driver.get_log("browser")  # only this test's entries below
    _open(drv, server + "/")
    toggle = drv.find_element("id", "localize-toggle")
    assert not toggle.is_selected()  # off by default
    toggle.click()
    _upload(drv, paris["query_path"])  # the automatic search, with localize=true
    assert "re-ranked by aml:20" in drv.find_element("id", "took").text
    _wait(drv, lambda d: _thumbs_loaded(d, "#results img"), "the result thumbnails")
    drv.execute_script("window.scrollTo(0, 0)")
    tiles = drv.execute_script("""
        return [...document.querySelectorAll('#results [data-testid=result]')].map(li => {
          const t = li.querySelector('.tile-btn').getBoundingClientRect();
          const b = li.querySelector('[data-testid=hit-box]');
          const r = b ? b.getBoundingClientRect() : null;
          return {id: +li.dataset.id, box: li.dataset.box || null,
                  n: li.querySelectorAll('[data-testid=hit-box]').length,
                  tile: [t.left, t.top, t.width, t.height], rect: r ? [r.left, r.top, r.width, r.height] : null};
        });""")
    assert len(tiles) == 20 and all(t["box"] for t in tiles), tiles[:3]
    drawn = [t for t in tiles if t["rect"]]
    assert drawn and all(t["n"] == 1 for t in drawn)
    for t in drawn[:5]:
        tx, ty, tw, th = t["tile"]
        x, y, w, h = t["rect"]
        assert tw > 50 and abs(tw - th) < 1  # the square tile
        # a plausible box: a visible part of the tile, inside it (up to the hover zoom)
        assert 0.05 * tw <= w <= 1.05 * tw and 0.05 * th <= h <= 1.05 * th, t
        assert tx - 0.05 * tw <= x and x + w <= tx + 1.05 * tw and ty - 0.05 * th <= y and y + h <= ty + 1.05 * th, t
        # where the box lies in the image, as object-fit: cover shows the image (short side fills the tile)
        img = _get_json(server + f"/api/images/{t['id']}")
        x1, y1, x2, y2 = (float(v) for v in t["box"].split(","))
        m = min(img["width"], img["height"])
        ox, oy = (1 - img["width"] / m) / 2, (1 - img["height"] / m) / 2
        want_l = min(max(ox + x1 / m, 0), 1) * tw
        want_r = min(max(ox + x2 / m, 0), 1) * tw
        want_t = min(max(oy + y1 / m, 0), 1) * th
        want_b = min(max(oy + y2 / m, 0), 1) * th
        zoom = 0.05 * tw + 2  # the hover zoom, and rounding
        assert abs((x - tx) - want_l) <= zoom and abs((x + w - tx) - want_r) <= zoom, (t, img)
        assert abs((y - ty) - want_t) <= zoom and abs((y + h - ty) - want_b) <= zoom, (t, img)
    _screenshot(drv, "browser_localize.png")
    toggle.click()  # off again for the tests after this one
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_no_errors_in_the_browser_console(server, driver):
    """No script errors and nothing refused (CSP) during the tests above."""
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def _alert(drv):
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return drv.switch_to.alert
    except NoAlertPresentException:
        return None


# --- page feedback: searching, stale results, a failed upload (issue 15) -------------------------

_HOLD_SEARCHES = """
    // hold every search request until window.__release() (the page looks up fetch at each call)
    if (!window.__realFetch) window.__realFetch = window.fetch;
    const real = window.__realFetch;
    window.__held = [];
    window.fetch = (url, opts) => {
      const u = String(url);
      if (!u.includes('/api/search') && !u.includes('/similar')) return real(url, opts);
      return new Promise((res, rej) => window.__held.push(() => real(url, opts).then(res, rej)));
    };
    window.__release = () => { const h = window.__held; window.__held = []; h.forEach((f) => f()); };
    window.__unhold = () => { window.fetch = real; window.__release(); };
"""


def _shown(drv, id_: str) -> bool:
    return drv.find_element("id", id_).is_displayed()


def test_searching_stale_and_failed_upload_states(server, driver, paris, tmp_path):
    """While a search runs the button is disabled and reads "Searching…" and a status shows;
    a box drawn after a search greys the results with a note until Search; a file the server
    cannot read clears the old results and shows why. Screenshots of the three states go to
    test-artifacts/ (browser_searching.png, browser_stale.png, browser_error.png)."""
    drv = driver
    drv.get_log("browser")  # only this test's entries below
    _open(drv, server + "/")
    assert not _shown(drv, "search-status") and not _shown(drv, "stale-note")

    # searching: the request is held until the screenshot is taken
    drv.execute_script(_HOLD_SEARCHES)
    before = _results_seq(drv)
    drv.find_element("id", "file-input").send_keys(str(paris["query_path"]))
    _wait(drv, lambda d: d.execute_script("return window.__held.length") > 0, "the held search request")
    btn = drv.find_element("id", "search-btn")
    assert btn.get_attribute("disabled") and btn.text == "Searching…"
    assert _shown(drv, "search-status") and "Searching" in drv.find_element("id", "search-status").text
    assert drv.find_element("id", "results").get_attribute("data-state") == "loading"
    _wait(drv, lambda d: d.execute_script("return document.getElementById('preview-img').naturalWidth") > 0,
          "the preview")
    _screenshot(drv, "browser_searching.png")
    drv.execute_script("window.__unhold()")
    hits = _wait_results(drv, before, "the search after choosing the photo")
    assert hits and not _shown(drv, "search-status")
    assert not btn.get_attribute("disabled") and btn.text == "Search"

    # full names on hover: every hit's name, the query's caption, the model
    names = drv.execute_script(
        "return [...document.querySelectorAll('#results [data-testid=result]')].map("
        "li => [li.dataset.name, li.querySelector('.tile-name').title, li.querySelector('.tile-btn').title]);")
    assert names and all(n == t and n in b for n, t, b in names)
    assert drv.find_element("id", "query-caption").get_attribute("title") == paris["query_path"].name
    assert drv.find_element("id", "store-model").get_attribute("title")

    # stale: a box drawn after the search greys the results (no new search runs by itself)
    _wait(drv, lambda d: _thumbs_loaded(d, "#results img"), "the result thumbnails")
    results = drv.find_element("id", "results")
    assert results.get_attribute("data-stale") == "false" and not _shown(drv, "stale-note")
    nat_w = drv.execute_script("return document.getElementById('preview-img').naturalWidth")
    to_screen, _ = _to_screen(drv, nat_w)
    x1, y1, x2, y2 = paris["bbox"]
    seq = _results_seq(drv)
    _drag(drv, *to_screen(x1, y1), *to_screen(x2, y2))
    assert _bbox(drv) is not None
    assert results.get_attribute("data-stale") == "true" and _shown(drv, "stale-note")
    assert "stale" in results.get_attribute("class").split()
    assert "previous box" in drv.find_element("id", "stale-note").text
    assert float(drv.execute_script("return getComputedStyle(document.getElementById('results')).opacity")) < 0.5
    time.sleep(0.5)
    assert _results_seq(drv) == seq  # marked stale, not searched again
    _screenshot(drv, "browser_stale.png")
    drv.find_element("id", "crop-clear").click()  # back to the searched (whole) image: current again
    assert results.get_attribute("data-stale") == "false" and not _shown(drv, "stale-note")
    _drag(drv, *to_screen(x1, y1), *to_screen(x2, y2))
    assert results.get_attribute("data-stale") == "true"
    hits = _search_button(drv, "the search of the new box")
    assert hits[0]["name"] in paris["positives"]
    assert results.get_attribute("data-stale") == "false" and not _shown(drv, "stale-note")

    # a failed upload: a file the server cannot decode clears the old results and says why
    bad = tmp_path / "not-a-photo.jpg"
    bad.write_bytes(b"this is not a JPEG file at all" * 20)
    drv.find_element("id", "file-input").send_keys(str(bad))
    _wait(drv, lambda d: d.find_element("id", "results").get_attribute("data-state") == "error", "the failed search")
    assert not drv.find_elements("css selector", "#results [data-testid=result]")
    empty = drv.find_element("id", "results-empty")
    assert empty.is_displayed() and empty.text.startswith("Search failed:") and "error" in empty.get_attribute("class")
    assert _shown(drv, "message") and "error" in drv.find_element("id", "message").get_attribute("class")
    assert drv.find_element("id", "took").text == "" and not _shown(drv, "stale-note")
    assert not btn.get_attribute("disabled")  # another photo can be searched
    assert drv.find_element("id", "query-caption").get_attribute("title") == bad.name
    _screenshot(drv, "browser_error.png")

    # the only console error is the refused upload's HTTP status (no script error, no CSP refusal)
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert all("/api/search" in e["message"] and "status of 4" in e["message"] for e in severe), severe


# --- search by text (a store with a caption model; issue 14) -------------------------------------


def _post_json(url: str, body: dict, timeout: float = 30.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_text_search_shows_results_as_for_a_photo(server, driver):
    """The text box (shown because /api/info says the store can be searched by text) searches
    by text: the page shows the API's ranking for the text, as tiles like a photo's results,
    and the first hit is a photo of the landmark named. Screenshot: browser_text_search.png."""
    drv = driver
    drv.get_log("browser")  # only this test's entries below
    _open(drv, server + "/")
    _wait(drv, lambda d: d.find_element("id", "text-form").is_displayed(), "the text search box")
    box = drv.find_element("id", "text-input")
    assert box.get_attribute("maxlength") == str(_get_json(server + "/api/info")["server"]["text"]["max_chars"])
    box.clear()
    box.send_keys("the eiffel tower")
    before = _results_seq(drv)
    drv.find_element("id", "text-btn").click()
    hits = _wait_results(drv, before, "the text search")
    results = drv.find_element("id", "results")
    assert results.get_attribute("data-query") == "text"
    assert len(hits) == 20 and [h["rank"] for h in hits] == list(range(1, 21))
    api = _post_json(server + "/api/search", {"text": "the eiffel tower", "k": 20})
    assert [h["id"] for h in hits] == [h["id"] for h in api["results"]]
    assert all(abs(h["score"] - a["score"]) < 1e-6 for h, a in zip(hits, api["results"]))
    assert hits[0]["name"].startswith("paris_eiffel_"), [h["name"] for h in hits[:5]]
    assert "the eiffel tower" in drv.find_element("id", "query-caption").text
    assert "by text" in drv.find_element("id", "query-caption").text
    _wait(drv, lambda d: _thumbs_loaded(d, "#results img"), "the result thumbnails")
    _screenshot(drv, "browser_text_search.png")

    # Enter in the box searches too; a text of unknown words says why, and clears the results
    box.clear()
    box.send_keys("zzzz qqqq", Keys.ENTER)
    _wait(drv, lambda d: d.find_element("id", "results").get_attribute("data-state") == "error", "the refused text")
    assert "vocabulary" in drv.find_element("id", "results-empty").text
    assert not drv.find_elements("css selector", "#results [data-testid=result]")
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert all("/api/search" in e["message"] and "status of 422" in e["message"] for e in severe), severe
