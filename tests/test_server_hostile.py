"""A real `imret serve` process under hostile requests: other web pages (foreign ``Origin``,
``Sec-Fetch-Site: cross-site``), DNS rebinding (foreign ``Host``), integers beyond 64 bits,
NaN / inf floats and path-like upload names. Every refusal is a documented 4xx, nothing is
written by a refused request, no response is a 500, and a keep-alive connection survives.

One server is shared by the module (raw ``http.client`` requests, so ``Host`` and ``Origin`` are
exactly what a browser or an attacker would send).
"""

import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from conftest import free_port, installed

pytestmark = pytest.mark.skipif(not installed("fastapi", "multipart", "uvicorn"),
                                reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")

from PIL import Image  # noqa: E402

HUGE = ["99999999999999999999", str(2**63), str(-(2**63) - 1), "1" * 5000]


def photo_bytes(seed: int, size=(80, 60), fmt="JPEG") -> bytes:
    """A small photo whose content (and so hash) depends on ``seed``."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue()


def multipart(files=(), fields=None) -> tuple[bytes, str]:
    """``files``: (field, filename, bytes); ``fields``: name -> text. Returns (body, content type)."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    for field, filename, data in files:
        fn = filename.replace("\\", "\\\\").replace('"', '\\"')
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{fn}\"\r\n"
                  "Content-Type: application/octet-stream\r\n\r\n".encode("utf-8"))
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class Server:
    def __init__(self, proc, port, store):
        self.proc, self.port, self.store = proc, port, store
        self.codes: set[str] = set()  # every error code seen

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def request(self, method, path, *, body=None, headers=None, conn=None):
        """One request; returns (status, headers, body bytes). Checks every error body's format."""
        own = conn is None
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            h = {"Host": self.host, **(headers or {})}
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            status, hdrs = r.status, {k.lower(): v for k, v in r.getheaders()}
        finally:
            if own:
                c.close()
        assert status < 500 or status == 503, (method, path, status, data[:500])
        if status >= 400:
            err = json.loads(data)["error"]
            assert set(err) == {"status", "code", "message"} and err["status"] == status and err["message"]
            self.codes.add(err["code"])
        return status, hdrs, data

    def json(self, method, path, **kw):
        status, _, data = self.request(method, path, **kw)
        return status, json.loads(data)

    def snapshot(self):
        """Every file of the store (name, size) except the SQLite files and the lock."""
        return {str(p.relative_to(self.store)): p.stat().st_size for p in self.store.rglob("*")
                if p.is_file() and not p.name.startswith("meta.sqlite") and p.name != "lock"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    from imret import create_model
    from imret.index.store import Preprocessing, Store
    from imret.synthetic import make_labelled_folder

    root = tmp_path_factory.mktemp("hostile")
    folder = make_labelled_folder(root / "photos", n_classes=3, per_class=2, size=(96, 72), seed=5)
    torch.manual_seed(0)
    store = root / "store"
    with Store.create(store, create_model("resnet18", "gem", pretrained=False),
                      preprocessing=Preprocessing(image_size=64),
                      model_source=str(root / "weights" / "net.safetensors")) as st:
        st.add(sorted(str(p) for p in folder.rglob("*.jpg")), workers=0)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "imret.cli", "serve", str(store), "--port", str(port),
                             "--threads", "1", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/api/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise AssertionError("server did not start")
            time.sleep(0.2)
    stderr: list[bytes] = []
    drain = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    drain.start()
    srv = Server(proc, port, store)
    yield srv
    proc.terminate()
    proc.wait(30)
    drain.join(10)
    log = b"".join(stderr).decode(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def _endpoints(new_photo: bytes):
    """(method, path, body, content type, is_write) for every endpoint."""
    search, ctype_s = multipart([("image", "q.jpg", new_photo)], {"k": "2"})
    add, ctype_a = multipart([("images", "new.jpg", new_photo)])
    return [
        ("GET", "/", None, None, False),
        ("GET", "/browse", None, None, False),
        ("GET", "/static/app.js", None, None, False),
        ("GET", "/docs", None, None, False),
        ("GET", "/openapi.json", None, None, False),
        ("GET", "/api/health", None, None, False),
        ("GET", "/api/info", None, None, False),
        ("GET", "/api/metrics", None, None, False),
        ("GET", "/api/images?limit=3", None, None, False),
        ("GET", "/api/images/0", None, None, False),
        ("GET", "/api/images/0/thumbnail?size=64", None, None, False),
        ("GET", "/api/images/0/similar?k=2", None, None, False),
        ("POST", "/api/search", search, ctype_s, False),
        ("POST", "/api/images", add, ctype_a, True),
        ("DELETE", "/api/images/0", None, None, True),
        ("PUT", "/api/images/0", b"{}", "application/json", True),
        ("PATCH", "/api/images/0", b"{}", "application/json", True),
    ]


ENDPOINT_IDS = ["page", "browse", "static", "docs", "openapi", "health", "info", "metrics", "list", "record",
                "thumbnail", "similar", "search", "add", "delete", "put", "patch"]


def _send(server, ep, headers):
    method, path, body, ctype, _ = ep
    h = dict(headers)
    if ctype:
        h["Content-Type"] = ctype
    return server.request(method, path, body=body, headers=h)


# -- other web pages and DNS rebinding ------------------------------------------------------------

FOREIGN = [
    ({"Origin": "http://attacker.example"}, "forbidden_origin"),
    ({"Origin": "null"}, "forbidden_origin"),
    ({"Origin": "http://127.0.0.1:1"}, "forbidden_origin"),  # another local service's page
    ({"Origin": "http://localhost"}, "forbidden_origin"),
    ({"Sec-Fetch-Site": "cross-site"}, "forbidden_origin"),
    ({"Sec-Fetch-Site": "same-site"}, "forbidden_origin"),
    ({"Host": "attacker.example"}, "forbidden_host"),
    ({"Host": "attacker.example:{port}", "Origin": "http://attacker.example:{port}"}, "forbidden_host"),  # rebinding
    ({"Host": "127.0.0.1:1"}, "forbidden_host"),
    ({"Host": "localhost.attacker.example:{port}"}, "forbidden_host"),
    ({"Host": "127.0.0.1:{port}@attacker.example"}, "forbidden_host"),
]


@pytest.mark.parametrize("ep_index", range(len(ENDPOINT_IDS)), ids=ENDPOINT_IDS)
@pytest.mark.parametrize("foreign", range(len(FOREIGN)), ids=[str(i) for i in range(len(FOREIGN))])
def test_other_pages_and_foreign_hosts_are_refused_everywhere(server, ep_index, foreign):
    headers, code = FOREIGN[foreign]
    headers = {k: v.format(port=server.port) for k, v in headers.items()}
    ep = _endpoints(photo_bytes(1000 + ep_index))[ep_index]
    before = server.snapshot()
    status, _, data = _send(server, ep, headers)
    assert status == 403 and json.loads(data)["error"]["code"] == code, (headers, data)
    assert server.snapshot() == before  # nothing written, not even a stored upload
    if ep[4]:
        assert server.request("GET", "/api/images/0")[0] == 200  # the delete did not happen


def test_this_servers_own_page_may_read_and_write(server):
    own = [{"Origin": f"http://127.0.0.1:{server.port}"},
           {"Host": f"localhost:{server.port}", "Origin": f"http://localhost:{server.port}"},
           {"Host": f"[::1]:{server.port}", "Origin": f"http://[::1]:{server.port}"},
           {"Origin": f"http://localhost:{server.port}"},  # the page opened by another loopback name
           {"Sec-Fetch-Site": "same-origin", "Origin": f"http://127.0.0.1:{server.port}"},
           {"Sec-Fetch-Site": "none"}, {}]
    for i, headers in enumerate(own):
        for ep in _endpoints(photo_bytes(2000 + i)):
            if ep[0] in ("DELETE", "PUT", "PATCH"):
                continue
            status, _, data = _send(server, ep, headers)
            assert status in (200, 201), (headers, ep[:2], data[:300])
    # an add from the page writes exactly its file; a remove from the page works
    body, ctype = multipart([("images", "mine.jpg", photo_bytes(2100))])
    status, added = server.json("POST", "/api/images", body=body,
                                headers={"Content-Type": ctype, "Origin": f"http://127.0.0.1:{server.port}"})
    assert status == 201 and [a["name"] for a in added["added"]] == ["mine.jpg"]
    new_id = added["added"][0]["id"]
    assert any(name.endswith("-mine.jpg") for name in server.snapshot())
    status, _ = server.json("DELETE", f"/api/images/{new_id}", headers={"Origin": f"http://127.0.0.1:{server.port}"})
    assert status == 200
    assert not any(name.endswith("-mine.jpg") for name in server.snapshot())


# -- integers beyond 64 bits, NaN / inf floats ----------------------------------------------------

INT_PARAMS = [
    ("GET", "/api/images/{v}"),
    ("GET", "/api/images/{v}/thumbnail"),
    ("GET", "/api/images/{v}/similar"),
    ("DELETE", "/api/images/{v}"),
    ("GET", "/api/images?offset={v}"),
    ("GET", "/api/images?limit={v}"),
    ("GET", "/api/images/0/similar?k={v}"),
    ("GET", "/api/images/0/thumbnail?size={v}"),
    ("POST", "/api/search k={v}"),
]


@pytest.mark.parametrize("value", HUGE + ["-1", "nan", "inf", "1e3", "0x10"],
                         ids=["1e20", "2^63", "-2^63-1", "5000-digits", "neg", "nan", "inf", "1e3", "hex"])
@pytest.mark.parametrize("target", INT_PARAMS, ids=[f"{m} {p}" for m, p in INT_PARAMS])
def test_bad_integers_are_422_and_the_connection_stays_usable(server, target, value):
    method, path = target
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        before = server.snapshot()
        if path.startswith("/api/search"):
            body, ctype = multipart([("image", "q.jpg", photo_bytes(3))], {"k": value})
            status, _, data = server.request("POST", "/api/search", body=body, headers={"Content-Type": ctype},
                                             conn=conn)
        else:
            status, _, data = server.request(method, path.format(v=value), conn=conn)
        assert status == 422 and json.loads(data)["error"]["code"] == "bad_request", data
        assert server.snapshot() == before
        # the same keep-alive connection answers the next request
        status, _, data = server.request("GET", "/api/health", conn=conn)
        assert status == 200 and json.loads(data)["status"] == "ok"
    finally:
        conn.close()


@pytest.mark.parametrize("bbox,status", [
    ("nan,0,10,10", 400), ("0,nan,10,10", 400), ("0,0,inf,10", 400), ("-inf,0,10,10", 400), ("0,0,1e999,10", 400),
    ("0,0,10,-1e999", 400), ("NaN,NaN,NaN,NaN", 400), ("0x10,0,10,10", 400), ("1e308,1e308,-1e308,-1e308", 400),
    ("-1e308,-1e308,1e308,1e308", 200), ("0,0,1e308,1e308", 200), ("1e-320,0,5e-324,1", 400),
    ("0," * 10000 + "1", 400), ("", 200),
])
def test_bad_floats_are_4xx(server, bbox, status):
    body, ctype = multipart([("image", "q.jpg", photo_bytes(4))], {"bbox": bbox, "k": "2"})
    got, _, data = server.request("POST", "/api/search", body=body, headers={"Content-Type": ctype})
    assert got == status, data
    if status == 400:
        assert json.loads(data)["error"]["code"] == "bad_request" and "bbox" in json.loads(data)["error"]["message"]


@pytest.mark.parametrize("field,value", [("qe", "nan"), ("qe", "inf"), ("k", "nan"), ("k", "1.5"), ("k", "-inf")])
def test_other_bad_form_values_are_4xx(server, field, value):
    body, ctype = multipart([("image", "q.jpg", photo_bytes(5))], {field: value})
    status, _, data = server.request("POST", "/api/search", body=body, headers={"Content-Type": ctype})
    assert status in (400, 422) and json.loads(data)["error"]["code"] == "bad_request", data


# -- path-like upload names -----------------------------------------------------------------------

REFUSED_NAMES = ["../../../../tmp/evil.jpg", "/etc/passwd", "..\\..\\evil.jpg", "a/b.jpg", "..", ".", "x\x01.jpg",
                 "x\x7f.jpg", "uploads/../../store.json"]
# (the multipart parser itself reduces a Windows path "C:\\x\\evil.jpg" to "evil.jpg")
ACCEPTED_NAMES = ["C:\\x\\evil.jpg", "C:evil.jpg", ".htaccess", "%2e%2e%2fevil.jpg", "фото.jpg",
                  "x" * 3000 + ".jpg", "a b;rm -rf.jpg", "store.json", "....jpg", "~root.jpg", "$(id).jpg",
                  "x.php.jpg", "noextension"]


@pytest.mark.parametrize("name", REFUSED_NAMES)
def test_path_like_upload_names_are_refused(server, name):
    before = server.snapshot()
    body, ctype = multipart([("images", name, photo_bytes(abs(hash(name)) % 10_000 + 5000))])
    status, _, data = server.request("POST", "/api/images", body=body, headers={"Content-Type": ctype})
    assert status == 400 and json.loads(data)["error"]["code"] == "bad_name", data
    assert server.snapshot() == before


def test_odd_upload_names_stay_inside_uploads(server):
    from imret.server import sanitise_name

    uploads = (server.store / "uploads").resolve()
    outside_before = set(os.listdir(server.store.parent))
    for i, name in enumerate(ACCEPTED_NAMES):
        body, ctype = multipart([("images", name, photo_bytes(7000 + i))])
        status, r = server.json("POST", "/api/images", body=body, headers={"Content-Type": ctype})
        assert status == 201 and len(r["added"]) == 1, (name, r)
        shown = r["added"][0]["name"]
        assert "/" not in shown and "\\" not in shown and not shown.startswith(".") and len(shown) <= 90, shown
        assert shown.startswith(sanitise_name(os.path.splitext(name)[0], 60)[:10]) or shown.startswith("image")
    names = [p for p in uploads.rglob("*") if p.is_file()]
    assert all(re.fullmatch(r"[0-9a-f]{16}-[A-Za-z0-9._-]+\.[a-z]+", p.name) for p in names), names
    assert all(p.resolve().is_relative_to(uploads) for p in names)
    assert set(os.listdir(server.store.parent)) == outside_before
    assert (server.store / "store.json").is_file()


# -- duplicates leave no files; no paths in responses; every code documented -----------------------

def test_twenty_uploads_of_one_photo_leave_one_file(server):
    photo = photo_bytes(9999)
    ids = set()
    for i in range(20):
        body, ctype = multipart([("images", f"same-{i}.jpg", photo)])
        status, r = server.json("POST", "/api/images", body=body, headers={"Content-Type": ctype})
        assert status == 201
        ids |= {a["id"] for a in r["added"]} | {d["id"] for d in r["duplicates"]}
    files = [n for n in server.snapshot() if n.startswith("uploads/") and "-same-" in n]
    assert len(ids) == 1 and len(files) == 1, files


def test_no_response_shows_a_server_path(server):
    import tempfile

    secret = [str(server.store), str(server.store.resolve()), str(server.store.parent), tempfile.gettempdir()]
    home = os.path.expanduser("~")
    if len(home) > 1:
        secret.append(home)
    body, ctype = multipart([("images", "p.jpg", photo_bytes(8000)), ("images", "dup.jpg", photo_bytes(8000))])
    server.request("POST", "/api/images", body=body, headers={"Content-Type": ctype})
    status, info = server.json("GET", "/api/info")
    assert "path" not in info["store"] and info["store"]["model"]["source"] == "net.safetensors"
    status, listing = server.json("GET", "/api/images?limit=500")
    urls = ["/api/health", "/api/info", "/api/metrics", "/api/images?limit=500", "/api/images/999999",
            "/api/images/-5", "/api/nothing", "/openapi.json"]
    for it in listing["items"]:
        urls += [f"/api/images/{it['id']}", f"/api/images/{it['id']}/similar?k=3"]
    for url in urls:
        _, _, data = server.request("GET", url)
        text = data.decode()
        assert not any(s in text for s in secret), (url, [s for s in secret if s in text])
    for it in listing["items"]:
        assert "/" not in it["name"] and "\\" not in it["name"]


def test_unexpected_errors_keep_the_connection(tmp_path, server):
    """A 500 is answered without dropping the keep-alive connection (in-process uvicorn)."""
    import uvicorn

    from imret.server import ServerConfig, create_app

    import torch

    from imret import create_model
    from imret.index.store import Preprocessing, Store

    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(photo_bytes(i))
    torch.manual_seed(0)
    store = tmp_path / "store"
    with Store.create(store, create_model("resnet18", "gem", pretrained=False),
                      preprocessing=Preprocessing(image_size=64)) as st:
        st.add([str(tmp_path / f"{i}.jpg") for i in range(3)], workers=0)
    app = create_app(store, ServerConfig(read_only=True))

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    app.state.service.hits = broken
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="on"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        deadline = time.time() + 60
        while not srv.started:
            assert time.time() < deadline and t.is_alive(), "in-process server did not start"
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(2):
            conn.request("GET", "/api/images/0/similar")
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 500 and body["error"]["code"] == "internal" and "disk on fire" not in json.dumps(body)
            conn.request("GET", "/api/health")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        conn.close()
    finally:
        srv.should_exit = True
        t.join(30)


def test_every_code_seen_is_documented_and_no_5xx_was_counted(server):
    from imret.server import ERROR_CODES

    doc = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "http-api.md"),
               encoding="utf-8").read()
    server.request("GET", "/api/nothing")
    server.request("PUT", "/api/health")
    assert {"not_found", "method_not_allowed"} <= server.codes
    assert server.codes <= set(ERROR_CODES) and all(f"`{c}`" in doc for c in server.codes), server.codes
    _, metrics = server.json("GET", "/api/metrics")
    assert all(r["errors_5xx"] == 0 for r in metrics["requests"].values()), metrics["requests"]
