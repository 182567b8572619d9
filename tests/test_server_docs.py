"""The API docs page (``/docs``): Swagger UI served by the server itself, so that it works
offline and under the pages' Content-Security-Policy (no inline script, no other host).

In-process (ASGI test client): the page, every asset it references, the fallback page when
fastapi-offline (which carries Swagger UI) is missing. In headless chromium against a live
server whose browser cannot resolve any other host: Swagger UI renders every operation and runs
one, with no request leaving the server and no CSP violation in the console.
"""

import os
import shutil
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from conftest import free_port, installed

pytestmark = [pytest.mark.skipif(not installed("fastapi", "httpx", "multipart"),
                                 reason="the serve extra (fastapi, python-multipart) and httpx are not installed"),
              pytest.mark.usefixtures("one_torch_thread")]

from imret import create_model  # noqa: E402
from imret.index.store import Preprocessing, Store  # noqa: E402
from imret.synthetic import make_labelled_folder  # noqa: E402

needs_swagger_ui = pytest.mark.skipif(not installed("fastapi_offline"),
                                      reason="fastapi-offline (Swagger UI's files; the serve extra) is not installed")

CHROMIUM = Path(os.environ.get("IMRET_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("IMRET_CHROMEDRIVER", "/usr/bin/chromedriver"))
WAIT_S = 60
# the content type each kind of asset must be answered with
CONTENT_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",),
                 ".png": ("image/png",), ".json": ("application/json",)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = make_labelled_folder(tmp_path_factory.mktemp("photos"), n_classes=2, per_class=2, size=(96, 80))
    torch.manual_seed(0)
    model = create_model("resnet18", "gem", pretrained=False)
    path = tmp_path_factory.mktemp("built") / "store"
    with Store.create(path, model, preprocessing=Preprocessing(image_size=96)) as st:
        st.add(sorted(str(p) for p in root.rglob("*.jpg")), workers=0)
    return path


@pytest.fixture
def store_path(built, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(built, dst)
    return dst


@pytest.fixture
def client(store_path):
    from fastapi.testclient import TestClient

    from imret.server import create_app

    with TestClient(create_app(store_path)) as c:
        yield c


class _Page(HTMLParser):
    """The URLs a page references (``src``, ``href``), its scripts' bodies and inline event
    handlers."""

    def __init__(self, html: str):
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[dict] = []
        self.handlers: list[str] = []
        self._in_script = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [a[k] for k in ("src", "href") if a.get(k)]
        self.handlers += [k for k in a if k.startswith("on")]
        if tag == "script":
            self.scripts.append({"src": a.get("src"), "body": ""})
            self._in_script = True

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1]["body"] += data


def _same_origin_path(url: str) -> bool:
    """``url`` is a path on this server: no scheme, no host (``//cdn...`` has one)."""
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc and url.startswith("/")


def _strict_csp(csp: str) -> None:
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives["default-src"] == ["'self'"], csp
    assert directives["script-src"] == ["'self'"], csp
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp and "http" not in csp, csp


# -- in-process -----------------------------------------------------------------------------------

@needs_swagger_ui
def test_docs_page_is_offline_and_csp_clean(client):
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    _strict_csp(r.headers["content-security-policy"])
    html = r.text
    assert "http://" not in html and "https://" not in html, html
    page = _Page(html)
    assert page.urls and all(_same_origin_path(u) for u in page.urls), page.urls
    assert page.scripts and all(s["src"] and not s["body"].strip() for s in page.scripts), page.scripts
    assert page.handlers == []
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css",
            "/docs/assets/docs-init.js"} <= set(page.urls)
    for url in page.urls + ["/openapi.json"]:
        a = client.get(url)
        assert a.status_code == 200, (url, a.text[:200])
        assert a.headers["content-type"].split(";")[0] in CONTENT_TYPES[Path(url).suffix], (url, a.headers)
        assert a.headers["x-content-type-options"] == "nosniff"
        assert len(a.content) > 0
    init = client.get("/docs/assets/docs-init.js").text
    assert '"/openapi.json"' in init and '"#swagger-ui"' in init and "http" not in init
    assert "validatorUrl: null" in init  # else Swagger UI asks validator.swagger.io for a badge


@needs_swagger_ui
def test_swagger_ui_reads_openapi_31(client):
    """The bundled Swagger UI is 5.x: Swagger UI 4 (swagger-ui-bundle) shows "Unable to render
    this definition" for the OpenAPI 3.1 schema FastAPI writes."""
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    # Swagger UI 5's OpenAPI 3.1 plugin; Swagger UI 4.15 has no such selector
    assert "isOAS31" in client.get("/docs/assets/swagger-ui-bundle.js").text, "a Swagger UI without OpenAPI 3.1"


def test_docs_kept_out_of_the_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/docs") or p.startswith("/redoc")], list(paths)
    # FastAPI's own pages (CDN assets, inline script) are switched off
    r = client.get("/redoc")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/docs/oauth2-redirect").status_code == 404


@pytest.mark.parametrize("name", ["redoc.standalone.js", "core.py", "..%2Fcore.py", "%2E%2E", "index.html",
                                  "app.js", "favicon.png%00.py"])
def test_docs_assets_are_a_fixed_list(client, name):
    r = client.get(f"/docs/assets/{name}")
    assert r.status_code == 404, (name, r.text[:200])
    assert r.json()["error"]["code"] == "not_found"


def test_docs_fallback_without_swagger_ui(store_path, monkeypatch):
    from fastapi.testclient import TestClient

    from imret.server import create_app

    monkeypatch.setitem(sys.modules, "fastapi_offline", None)  # `import fastapi_offline` raises ImportError
    with TestClient(create_app(store_path)) as c:
        r = c.get("/docs")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        _strict_csp(r.headers["content-security-policy"])
        page = _Page(r.text)
        assert "pip install" in r.text and "fastapi-offline" in r.text
        assert page.urls == ["/openapi.json"] and page.scripts == [] and page.handlers == []
        assert "http://" not in r.text and "https://" not in r.text
        for name in ("swagger-ui-bundle.js", "swagger-ui.css", "docs-init.js"):
            assert c.get(f"/docs/assets/{name}").status_code == 404
        assert c.get("/openapi.json").status_code == 200


# -- in a browser ---------------------------------------------------------------------------------

@pytest.fixture
def browser_paths():
    if not installed("selenium"):
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not (p.is_file() and os.access(p, os.X_OK))]
    if missing:
        pytest.skip(f"no browser for the docs page test: {', '.join(missing)} missing "
                    "(run scripts/install_browser.sh, or apt-get install chromium chromium-driver)")
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture
def live_server(store_path):
    """The app on uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    from imret.server import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store_path), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(WAIT_S)


@pytest.fixture
def driver(browser_paths, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--disable-component-update",
                # no host but the server resolves: a request to a CDN or validator would fail
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager is not consulted and downloads nothing
    drv = webdriver.Chrome(service=Service(executable_path=str(chromedriver)), options=opts)
    drv.set_page_load_timeout(WAIT_S)
    yield drv
    drv.quit()


def _wait(drv, cond, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(drv, WAIT_S, poll_frequency=0.1).until(lambda d: cond(d))
    except TimeoutException:
        text = drv.execute_script("return document.body.innerText.slice(0, 500)")
        raise AssertionError(f"timed out waiting for {what}; the page shows {text!r}; "
                             f"console: {drv.get_log('browser')}") from None


@pytest.mark.slow
def test_docs_render_in_a_browser_offline(live_server, driver):
    import json
    import urllib.request

    with urllib.request.urlopen(live_server + "/openapi.json", timeout=10) as r:
        schema = json.loads(r.read())
    n_ops = sum(len(ops) for ops in schema["paths"].values())
    driver.get(live_server + "/docs")
    _wait(driver, lambda d: d.execute_script("return document.querySelectorAll('.opblock').length") == n_ops,
          f"Swagger UI to render the {n_ops} operations")
    assert "Unable to render" not in driver.find_element("tag name", "body").text

    # run one operation from the page: the page's fetch passes the CSP and the request guard
    block = driver.find_element("id", "operations-status-health_api_health_get")
    block.find_element("css selector", ".opblock-summary-control").click()
    _wait(driver, lambda d: block.find_elements("css selector", ".try-out__btn"), "the Try it out button")
    block.find_element("css selector", ".try-out__btn").click()
    _wait(driver, lambda d: block.find_elements("css selector", ".execute"), "the Execute button")
    block.find_element("css selector", ".execute").click()
    _wait(driver, lambda d: '"status": "ok"' in "".join(
        e.text for e in block.find_elements("css selector", ".responses-wrapper .microlight")),
        "the answer of GET /api/health")

    origin = urlsplit(live_server)
    fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(urlsplit(u).netloc == origin.netloc for u in fetched), fetched
    assert any(u.endswith("/docs/assets/swagger-ui-bundle.js") for u in fetched), fetched
    # a CSP refusal or a failed load is logged as SEVERE
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


@pytest.mark.parametrize("token, token_reads", [(None, False), ("s3cret-token", False), ("s3cret-token", True)])
def test_schema_declares_the_token_where_it_is_asked_for(store_path, token, token_reads):
    """Swagger UI shows its "Authorize" button and padlocks from the schema's security schemes:
    they must sit on exactly the endpoints that check the token."""
    from fastapi.testclient import TestClient

    from imret.server import ServerConfig, create_app

    with TestClient(create_app(store_path, ServerConfig(token=token, token_reads=token_reads))) as c:
        schema = c.get("/openapi.json", headers={"Authorization": f"Bearer {token}"} if token else {}).json()
        schemes = schema.get("components", {}).get("securitySchemes", {})
        ops = {(m.upper(), p): op for p, item in schema["paths"].items() for m, op in item.items()}

        def secured(method, path):
            return {k for d in ops[(method, path)].get("security", []) for k in d}

        if token is None:
            assert schemes == {} and all(not op.get("security") for op in ops.values())
            return
        assert {v["type"] for v in schemes.values()} == {"http", "apiKey"}
        assert [v for v in schemes.values() if v["type"] == "http"][0]["scheme"] == "bearer"
        assert secured("POST", "/api/images") == set(schemes) == secured("DELETE", "/api/images/{image_id}")
        assert secured("POST", "/api/search") == (set(schemes) if token_reads else set())
        assert secured("GET", "/api/health") == set()
        # what the schema says is what the server does
        r = c.delete("/api/images/0")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = c.post("/api/search", json={"text": "x"}, headers={"X-Api-Token": "wrong"})
        assert r.status_code == (403 if token_reads else 409)


@needs_swagger_ui
def test_docs_assets_are_cached_by_browsers(client):
    r = client.get("/docs/assets/swagger-ui-bundle.js")
    assert r.status_code == 200 and r.headers["cache-control"] == "public, max-age=86400" and r.headers.get("etag")
