"""The HTTP API in-process (ASGI test client): every endpoint, every bad input, nothing written on errors."""

import asyncio
import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch

from conftest import installed

pytestmark = [pytest.mark.skipif(not installed("fastapi", "httpx", "multipart"),
                                 reason="the serve extra (fastapi, python-multipart) and httpx are not installed"),
              pytest.mark.usefixtures("one_torch_thread")]

from PIL import Image  # noqa: E402

from imret import create_model  # noqa: E402
from imret.index.store import Preprocessing, Store  # noqa: E402
from imret.synthetic import make_labelled_folder  # noqa: E402

PRE = Preprocessing(image_size=96)
TOKEN = "s3cret-token-123"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = make_labelled_folder(tmp_path_factory.mktemp("photos"), n_classes=4, per_class=5, size=(160, 120))
    return sorted(str(p) for p in root.rglob("*.jpg"))


@pytest.fixture(scope="module")
def extra_photos(tmp_path_factory):
    root = make_labelled_folder(tmp_path_factory.mktemp("extra"), n_classes=2, per_class=3, size=(150, 110), seed=7)
    return sorted(str(p) for p in root.rglob("*.jpg"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, photos):
    torch.manual_seed(0)
    model = create_model("resnet18", "gem", pretrained=False)
    path = tmp_path_factory.mktemp("built") / "store"
    with Store.create(path, model, preprocessing=PRE) as st:
        st.add(photos, workers=0)
    return path


@pytest.fixture
def store_path(built, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(built, dst)
    return dst


def make_client(store_path, **cfg):
    from fastapi.testclient import TestClient

    from imret.server import ServerConfig, create_app

    return TestClient(create_app(store_path, ServerConfig(**cfg)))


@pytest.fixture
def client(store_path):
    with make_client(store_path, token=TOKEN) as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def jpeg_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def snapshot(path):
    """Everything a write could change: file names and sizes, and the live rows."""
    files = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*")
             if p.is_file() and p.name not in ("lock",) and not p.name.startswith("meta.sqlite")}
    with Store.open(path) as st:
        rows = [(r.id, r.path) for r in st.list(0, 10_000)]
    return files, rows


def error_of(r, status, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["status"] == status and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


def png_with_size(width, height):
    """A valid 1x1 PNG whose header claims ``width x height`` (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:12 + 4 + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


# -- reads ----------------------------------------------------------------------------------------

def test_health_info_metrics(client, photos):
    r = client.get("/api/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["images"] == len(photos)
    info = client.get("/api/info").json()
    assert info["store"]["images"] == len(photos)
    s = info["server"]
    assert s["writes"] is True and s["auth"] == {"writes": True, "reads": False} and s["max_k"] >= s["default_k"]
    client.get("/api/images?limit=3")
    m = client.get("/api/metrics").json()
    assert m["requests"]["GET /api/images"]["count"] == 1
    assert m["requests"]["GET /api/health"]["p50_ms"] > 0


def test_search_by_upload_matches_the_store(client, store_path, photos):
    q = photos[6]
    r = client.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(q), "image/jpeg")}, data={"k": "5"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 5 and body["query"] == {"width": 160, "height": 120, "bbox": None}
    with Store.open(store_path) as st:
        want = st.search([q], k=5, workers=0)[0]
    got = body["results"]
    assert [h["id"] for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in want], atol=1e-5)
    assert got[0]["id"] == photos.index(q) and got[0]["score"] > 0.999
    assert got[0]["name"] == os.path.basename(q) and got[0]["thumbnail"] == f"/api/images/{got[0]['id']}/thumbnail"
    assert (got[0]["width"], got[0]["height"]) == (160, 120)
    assert all(a["score"] >= b["score"] for a, b in zip(got, got[1:]))


def test_search_with_box_and_query_expansion(client, store_path, photos):
    q = photos[3]
    files = {"image": ("q.jpg", jpeg_bytes(q), "image/jpeg")}
    r = client.post("/api/search", files=files, data={"bbox": "10,5,120,100", "k": "4"})
    assert r.status_code == 200, r.text
    assert r.json()["query"]["bbox"] == [10, 5, 120, 100]
    with Store.open(store_path) as st:
        want = st.search([q], bboxes=[(10, 5, 120, 100)], k=4, workers=0)[0]
    assert [h["id"] for h in r.json()["results"]] == [h.id for h in want]
    on = client.post("/api/search", files=files, data={"qe": "true", "k": "4"}).json()["results"]
    off = client.post("/api/search", files=files, data={"qe": "false", "k": "4"}).json()["results"]
    assert len(on) == len(off) == 4
    assert [h["score"] for h in on] != [h["score"] for h in off]  # alpha-QE changes the scores
    # a box partly outside the image is clamped to it
    r = client.post("/api/search", files=files, data={"bbox": "-20,-20,80,60"})
    assert r.status_code == 200 and r.json()["query"]["bbox"] == [0, 0, 80, 60]


def test_similar_by_id(client, photos):
    r = client.get("/api/images/7/similar?k=3")
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 3 and res[0]["id"] == 7 and res[0]["score"] > 0.999
    assert r.json()["query"] == {"id": 7}
    error_of(client.get("/api/images/999/similar"), 404, "not_found")
    error_of(client.get("/api/images/abc/similar"), 422, "bad_request")
    error_of(client.get("/api/images/7/similar?k=0"), 422, "bad_request")  # out-of-range integers: 422
    error_of(client.get("/api/images/7/similar?qe=maybe"), 400, "bad_request")


def test_listing_pages_and_records(client, photos):
    r = client.get("/api/images?offset=5&limit=4").json()
    assert r["total"] == len(photos) and r["offset"] == 5 and r["limit"] == 4
    assert [it["id"] for it in r["items"]] == [5, 6, 7, 8]
    it = r["items"][0]
    assert it["name"] == os.path.basename(photos[5]) and it["size"] == os.path.getsize(photos[5])
    assert client.get("/api/images?offset=100").json()["items"] == []
    error_of(client.get("/api/images?limit=501"), 422, "bad_request")
    error_of(client.get("/api/images?offset=-1"), 422, "bad_request")
    rec = client.get("/api/images/5").json()
    assert rec == it
    error_of(client.get("/api/images/12345"), 404, "not_found")


def test_thumbnails(client, photos):
    r = client.get("/api/images/2/thumbnail?size=64")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert max(im.size) == 64 and im.size == (64, 48)
    etag = r.headers["etag"]
    assert client.get("/api/images/2/thumbnail?size=64", headers={"If-None-Match": etag}).status_code == 304
    error_of(client.get("/api/images/2/thumbnail?size=5000"), 422)
    error_of(client.get("/api/images/99/thumbnail"), 404, "not_found")
    # an id is an integer path segment: traversal attempts never name a file
    for bad in ("..%2F..%2Fstore.json", "..", "%2e%2e%2fstore.json", "1;rm"):
        assert client.get(f"/api/images/{bad}/thumbnail").status_code in (404, 422)
    assert client.get("/static/../store.json").status_code == 404
    assert client.get("/static/%2e%2e/store.json").status_code == 404


def test_openapi_lists_every_endpoint_with_its_errors(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    want = {("/api/health", "get"), ("/api/info", "get"), ("/api/metrics", "get"), ("/api/search", "post"),
            ("/api/images/{image_id}/similar", "get"), ("/api/images", "get"), ("/api/images", "post"),
            ("/api/images/{image_id}", "get"), ("/api/images/{image_id}", "delete"),
            ("/api/images/{image_id}/thumbnail", "get")}
    assert want <= {(p, m) for p, ops in paths.items() for m in ops}
    search = paths["/api/search"]["post"]
    assert "multipart/form-data" in search["requestBody"]["content"]
    assert {"400", "413", "415", "422"} <= set(search["responses"])
    assert {"401", "403", "413", "415", "422"} <= set(paths["/api/images"]["post"]["responses"])
    assert "201" in paths["/api/images"]["post"]["responses"]
    assert "404" in paths["/api/images/{image_id}"]["delete"]["responses"]


def test_web_page_and_security_headers(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["x-content-type-options"] == "nosniff" and "default-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/browse").status_code == 200


# -- writes ---------------------------------------------------------------------------------------

def test_add_then_search_then_remove(client, store_path, photos, extra_photos):
    files = [("images", (os.path.basename(p), jpeg_bytes(p), "image/jpeg")) for p in extra_photos[:3]]
    r = client.post("/api/images", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    added = r.json()["added"]
    n0 = len(photos)
    assert [a["id"] for a in added] == [n0, n0 + 1, n0 + 2] and not r.json()["duplicates"]
    for a, p in zip(added, extra_photos):
        assert a["name"] == os.path.basename(p)  # shown as uploaded; stored under a content-hash prefix
        assert client.get(f"/api/images/{a['id']}").json()["name"] == a["name"]
    stored = sorted((store_path / "uploads").rglob("*.jpg"))
    assert len(stored) == 3 and all(s.name[16] == "-" and s.name[17:] in [a["name"] for a in added] for s in stored) and all(s.resolve().is_relative_to((store_path / "uploads").resolve()) for s in stored)
    # the new image is found by itself
    res = client.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(extra_photos[1]), "image/jpeg")}).json()
    assert res["results"][0]["id"] == n0 + 1 and res["results"][0]["score"] > 0.999
    # the same content again is a duplicate, not a new image
    r = client.post("/api/images", files=[("images", ("again.jpg", jpeg_bytes(extra_photos[0]), "image/jpeg"))],
                    headers=AUTH)
    assert r.status_code == 201 and r.json()["added"] == [] and r.json()["duplicates"] == [{"name": "again.jpg", "id": n0}]
    # remove
    r = client.delete(f"/api/images/{n0 + 1}", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"removed": n0 + 1}
    res = client.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(extra_photos[1]), "image/jpeg")},
                      data={"k": str(n0 + 3)}).json()
    assert n0 + 1 not in [h["id"] for h in res["results"]] and len(res["results"]) == n0 + 2
    error_of(client.delete(f"/api/images/{n0 + 1}", headers=AUTH), 404, "not_found")
    error_of(client.get(f"/api/images/{n0 + 1}/thumbnail"), 404, "not_found")
    error_of(client.get(f"/api/images/{n0 + 1}/similar"), 404, "not_found")
    assert client.get("/api/health").json()["images"] == n0 + 2
    with Store.open(store_path) as st:
        assert st.verify() == []


@pytest.mark.parametrize("headers,status", [({}, 401), ({"Authorization": "Bearer wrong-token-0"}, 403),
                                            ({"X-API-Token": "nope"}, 403)])
def test_writes_need_the_token(client, store_path, photos, extra_photos, headers, status):
    before = snapshot(store_path)
    r = client.post("/api/images", files=[("images", ("a.jpg", jpeg_bytes(extra_photos[0]), "image/jpeg"))],
                    headers=headers)
    error_of(r, status)
    error_of(client.delete("/api/images/1", headers=headers), status)
    assert snapshot(store_path) == before
    assert client.get("/api/images/1").status_code == 200  # reads stay open
    r = client.post("/api/images", files=[("images", ("a.jpg", jpeg_bytes(extra_photos[0]), "image/jpeg"))],
                    headers={"X-API-Token": TOKEN})
    assert r.status_code == 201


def test_reads_can_need_the_token_too(store_path, photos):
    with make_client(store_path, token=TOKEN, token_reads=True) as c:
        error_of(c.get("/api/images"), 401, "unauthorized")
        error_of(c.get("/api/images/1/thumbnail", headers={"Authorization": "Bearer x" * 3}), 403, "forbidden")
        error_of(c.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(photos[0]), "image/jpeg")}), 401)
        assert c.get("/api/images", headers=AUTH).status_code == 200
        assert c.get("/api/health").status_code == 200  # liveness stays open for load balancers


def test_read_only_server_refuses_writes(store_path, extra_photos):
    before = snapshot(store_path)
    with make_client(store_path, read_only=True) as c:
        r = c.post("/api/images", files=[("images", ("a.jpg", jpeg_bytes(extra_photos[0]), "image/jpeg"))])
        error_of(r, 403, "read_only")
        error_of(c.delete("/api/images/0"), 403, "read_only")
        assert c.get("/api/info").json()["server"]["writes"] is False
        assert c.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(extra_photos[0]), "image/jpeg")}).status_code == 200
    assert snapshot(store_path) == before


# -- bad input: a clear 4xx and nothing written ---------------------------------------------------

def _bad_uploads(photos, tmp_path):
    good = jpeg_bytes(photos[0])
    big = io.BytesIO()
    Image.effect_noise((700, 700), 60).convert("RGB").save(big, format="PNG")  # ~1 MB of noise
    return {
        "not_an_image": (("notes.jpg", b"hello, this is plain text\n" * 20, "image/jpeg"), 415, "unsupported_media_type"),
        "truncated_jpeg": (("cut.jpg", good[: len(good) // 2], "image/jpeg"), 422, "bad_image"),
        "zero_bytes": (("empty.jpg", b"", "image/jpeg"), 400, "empty"),
        "decompression_bomb": (("bomb.png", png_with_size(60_000, 60_000), "image/png"), 413, "too_many_pixels"),
        "oversized_upload": (("big.png", big.getvalue(), "image/png"), 413, "too_large"),
        "path_traversal_name": (("../../../../tmp/evil.jpg", good, "image/jpeg"), 400, "bad_name"),
        "absolute_name": (("/etc/passwd", good, "image/jpeg"), 400, "bad_name"),
        "backslash_name": (("..\\..\\evil.jpg", good, "image/jpeg"), 400, "bad_name"),
        "pdf": (("doc.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "application/pdf"), 415, None),
    }


@pytest.mark.parametrize("case", ["not_an_image", "truncated_jpeg", "zero_bytes", "decompression_bomb",
                                  "oversized_upload", "path_traversal_name", "absolute_name", "backslash_name", "pdf"])
def test_bad_uploads_are_refused_and_nothing_is_written(store_path, photos, tmp_path, case):
    upload, status, code = _bad_uploads(photos, tmp_path)[case]
    before = snapshot(store_path)
    with make_client(store_path, token=TOKEN, max_upload_bytes=600_000) as c:
        # alone, and next to a good file: the whole request is refused
        for files in ([("images", upload)],
                      [("images", ("fine.jpg", jpeg_bytes(photos[1]), "image/jpeg")), ("images", upload)]):
            msg = error_of(c.post("/api/images", files=files, headers=AUTH), status, code)
            assert len(msg) > 10
        msg = error_of(c.post("/api/search", files={"image": upload}), status, code)
        if case != "oversized_upload" and "name" not in case:
            assert os.path.basename(upload[0]) in msg or upload[0] in msg  # the message names the file
    assert snapshot(store_path) == before
    assert not os.path.exists("/tmp/evil.jpg") or os.path.getmtime("/tmp/evil.jpg") < os.path.getmtime(store_path)


def test_wrong_request_content_types(client, store_path, photos):
    before = snapshot(store_path)
    # (a JSON body is a text query: one without "text" is a bad request, see test_text_search_server.py)
    error_of(client.post("/api/search", content=json.dumps({"image": "x"}),
                         headers={"Content-Type": "application/json"}), 400, "bad_request")
    error_of(client.post("/api/images", content=jpeg_bytes(photos[0]), headers={"Content-Type": "image/jpeg", **AUTH}),
             415, "unsupported_media_type")
    error_of(client.post("/api/search"), 415)
    # multipart without the file field
    error_of(client.post("/api/search", data={"k": "3"}, files={"other": ("x.jpg", b"123", "image/jpeg")}), 422)
    assert snapshot(store_path) == before


def test_body_limit_by_header_and_by_stream(store_path, photos):
    with make_client(store_path, token=TOKEN, max_upload_bytes=50_000, max_files=2) as c:
        big = b"\xff\xd8" + os.urandom(300_000)
        error_of(c.post("/api/search", files={"image": ("big.jpg", big, "image/jpeg")}), 413, "too_large")

        def chunks():
            yield b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
            for _ in range(20):
                yield os.urandom(10_000)
            yield b"\r\n--xyz--\r\n"

        r = c.post("/api/search", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        error_of(r, 413, "too_large")
        three = [("images", (f"{i}.jpg", jpeg_bytes(p), "image/jpeg")) for i, p in enumerate(photos[:3])]
        error_of(c.post("/api/images", files=three, headers=AUTH), 413, "too_many_files")
    before = snapshot(store_path)
    with make_client(store_path, token=TOKEN, max_request_bytes=8_000) as c:  # each file fits, both do not
        two = [("images", (f"{i}.jpg", jpeg_bytes(p), "image/jpeg")) for i, p in enumerate(photos[:2])]
        assert all(len(jpeg_bytes(p)) < 8_000 for p in photos[:2]) and sum(len(jpeg_bytes(p)) for p in photos[:2]) > 8_000
        error_of(c.post("/api/images", files=two, headers=AUTH), 413, "too_large")
    assert snapshot(store_path) == before


@pytest.mark.parametrize("bbox", ["1,2,3", "a,b,c,d", "10,10,5,50", "10,10,50,10", "nan,0,10,10", "500,500,600,600",
                                  "1,2,3,4,5", "inf,0,1,1"])
def test_bad_boxes(client, photos, bbox):
    r = client.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(photos[0]), "image/jpeg")}, data={"bbox": bbox})
    assert "bbox" in error_of(r, 400, "bad_request")


@pytest.mark.parametrize("k", ["0", "-3", "1001", "ten"])
def test_bad_k(client, photos, k):
    r = client.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(photos[0]), "image/jpeg")}, data={"k": k})
    assert r.status_code in (400, 422) and r.json()["error"]["code"] == "bad_request"


def test_max_pixels_of_a_real_image(store_path, photos):
    with make_client(store_path, max_pixels=10_000) as c:  # 160 x 120 = 19200 pixels
        msg = error_of(c.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(photos[0]), "image/jpeg")}),
                       413, "too_many_pixels")
        assert "19200" in msg


# -- concurrency ----------------------------------------------------------------------------------

def test_concurrent_searches_are_batched_and_match_sequential(store_path, photos):
    import httpx

    from imret.server import ServerConfig, create_app

    app = create_app(store_path, ServerConfig(max_batch=8, max_wait_ms=300))

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                async def one(p):
                    r = await c.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(p), "image/jpeg")},
                                     data={"k": "5"})
                    assert r.status_code == 200, r.text
                    return [(h["id"], h["score"]) for h in r.json()["results"]]

                together = await asyncio.gather(*(one(p) for p in photos[:12]))
                alone = [await one(p) for p in photos[:12]]
                stats = (await c.get("/api/metrics")).json()["batches"]
                return together, alone, stats

    together, alone, stats = asyncio.run(run())
    for a, b in zip(together, alone):
        assert [i for i, _ in a] == [i for i, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-5)
    assert stats["max_size"] > 1 and stats["items"] == 24


def test_unexpected_errors_are_json_500_and_counted(store_path, photos):
    from fastapi.testclient import TestClient

    from imret.server import ServerConfig, create_app

    app = create_app(store_path, ServerConfig())

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    app.state.service.hits = broken
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/api/images/1/similar")
        assert "RuntimeError" in error_of(r, 500, "internal")
        assert "disk on fire" not in r.text  # details stay in the server log
        m = c.get("/api/metrics").json()["requests"]["GET /api/images/{image_id}/similar"]
        assert m["errors_5xx"] == 1


def test_cli_serve_refuses_a_missing_or_locked_store(tmp_path, store_path, capsys):
    from imret.cli import main

    assert main(["serve", str(tmp_path / "nothing")]) == 1
    assert "nothing" in capsys.readouterr().err
    with Store.open(store_path, writable=True):  # another writer holds the store
        assert main(["serve", str(store_path), "--port", "0"]) == 1
        err = capsys.readouterr().err
        assert "imret: error:" in err and "another process" in err and "--read-only" in err
    assert main(["serve", str(store_path), "--token-reads"]) == 1  # reads need a token to exist
    assert "token_reads needs a token" in capsys.readouterr().err


@pytest.mark.skipif(not installed("faiss"), reason="faiss is not installed")
def test_index_is_saved_on_a_schedule_and_at_shutdown_not_per_request(tmp_path, photos, extra_photos):
    from fastapi.testclient import TestClient

    from imret.server import ServerConfig, create_app

    torch.manual_seed(0)
    path = tmp_path / "faiss-store"
    with Store.create(path, create_model("resnet18", "gem", pretrained=False), preprocessing=PRE,
                      backend="faiss:HNSW16") as st:
        st.add(photos, workers=0)
        saved_rows = st.info()["backend"]["ntotal"]
    app = create_app(path, ServerConfig(token=TOKEN, save_interval_s=3600))
    store = app.state.service.store
    calls = []
    real = store.save_index
    store.save_index = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    with TestClient(app) as c:
        for p in extra_photos[:3]:
            r = c.post("/api/images", files=[("images", (os.path.basename(p), jpeg_bytes(p), "image/jpeg"))],
                       headers=AUTH)
            assert r.status_code == 201, r.text
        assert c.delete("/api/images/0", headers=AUTH).status_code == 200
        assert calls == []  # not saved per request ...
        new_id = r.json()["added"][0]["id"]
        res = c.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(extra_photos[2]), "image/jpeg")}).json()
        assert res["results"][0]["id"] == new_id  # ... yet searched at once
    assert calls == [1]  # saved once, at shutdown
    with Store.open(path) as st:
        assert st.verify() == [] and len(st) == len(photos) + 2
        assert st._config["index"]["rows"] == len(photos) + 3 and saved_rows == len(photos)


# -- uploads that are not indexed leave no file ---------------------------------------------------

def uploaded_files(store_path):
    return sorted(p for p in (store_path / "uploads").rglob("*") if p.is_file()) if (store_path / "uploads").exists() else []


def test_duplicate_uploads_leave_no_orphan_files(client, store_path, photos, extra_photos):
    new = jpeg_bytes(extra_photos[0])
    ids = set()
    for i in range(20):  # one new photo under 20 names: one image, one file
        r = client.post("/api/images", files=[("images", (f"copy{i}.jpg", new, "image/jpeg"))], headers=AUTH)
        assert r.status_code == 201, r.text
        ids |= {a["id"] for a in r.json()["added"]} | {d["id"] for d in r.json()["duplicates"]}
    files = uploaded_files(store_path)
    assert len(ids) == 1 and len(files) == 1
    with Store.open(store_path) as st:
        assert st.records(list(ids))[0].path == str(files[0])
    # the same 20 names in one request, and an already indexed photo (not an upload) 20 times
    r = client.post("/api/images", files=[("images", (f"again{i}.jpg", new, "image/jpeg")) for i in range(20)],
                    headers=AUTH)
    assert r.status_code == 201 and len(r.json()["duplicates"]) == 20
    for i in range(20):
        r = client.post("/api/images", files=[("images", (f"old{i}.jpg", jpeg_bytes(photos[0]), "image/jpeg"))],
                        headers=AUTH)
        assert r.status_code == 201 and r.json()["duplicates"] == [{"name": f"old{i}.jpg", "id": 0}]
    assert uploaded_files(store_path) == files
    # the same name and content again: the duplicate's path is the indexed file's path, which stays
    r = client.post("/api/images", files=[("images", ("copy0.jpg", new, "image/jpeg"))], headers=AUTH)
    assert r.json()["duplicates"] == [{"name": "copy0.jpg", "id": ids.pop()}]
    assert uploaded_files(store_path) == files and files[0].read_bytes() == new
    # two new files with equal content in one request: one added, one duplicate, one file
    other = jpeg_bytes(extra_photos[1])
    r = client.post("/api/images", files=[("images", ("x.jpg", other, "image/jpeg")),
                                          ("images", ("x.jpg", other, "image/jpeg"))], headers=AUTH)
    assert len(r.json()["added"]) == 1 and len(r.json()["duplicates"]) == 1
    assert len(uploaded_files(store_path)) == 2
    with Store.open(store_path) as st:
        assert st.verify() == []


def test_a_failed_add_leaves_only_what_it_committed(store_path, photos, extra_photos):
    from fastapi.testclient import TestClient

    from imret.server import ServerConfig, create_app

    app = create_app(store_path, ServerConfig(token=TOKEN))
    store = app.state.service.store
    real_add = store.add

    def add_first_then_fail(paths, **kw):  # commits the first file, then the disk fills up
        real_add(paths[:1], **kw)
        real_pwrite = os.pwrite
        os.pwrite = lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        try:
            return real_add(paths[1:], **kw)
        finally:
            os.pwrite = real_pwrite

    files = [("images", (os.path.basename(p), jpeg_bytes(p), "image/jpeg")) for p in extra_photos[:3]]
    with TestClient(app, raise_server_exceptions=False) as c:
        store.add = add_first_then_fail
        r = c.post("/api/images", files=files, headers=AUTH)
        error_of(r, 507, "insufficient_storage")
        assert str(store_path) not in r.text
        store.add = real_add
        left = uploaded_files(store_path)
        assert len(left) == 1 and left[0].name.endswith(os.path.basename(extra_photos[0]))
        assert c.get(f"/api/images/{len(photos)}").json()["name"] == os.path.basename(extra_photos[0])
        # a later add of the same files works and leaves exactly the indexed ones
        r = c.post("/api/images", files=files, headers=AUTH)
        assert r.status_code == 201 and len(r.json()["added"]) == 2 and len(r.json()["duplicates"]) == 1
        assert len(uploaded_files(store_path)) == 3


def test_removing_an_uploaded_image_deletes_its_file_only(client, store_path, photos, extra_photos):
    r = client.post("/api/images", files=[("images", ("a.jpg", jpeg_bytes(extra_photos[0]), "image/jpeg"))],
                    headers=AUTH)
    new_id = r.json()["added"][0]["id"]
    assert len(uploaded_files(store_path)) == 1
    assert client.delete(f"/api/images/{new_id}", headers=AUTH).status_code == 200
    assert uploaded_files(store_path) == []
    assert client.delete("/api/images/0", headers=AUTH).status_code == 200  # indexed from elsewhere: kept
    assert os.path.isfile(photos[0])
    r = client.post("/api/images", files=[("images", ("a.jpg", jpeg_bytes(extra_photos[0]), "image/jpeg"))],
                    headers=AUTH)  # added again after its removal: a new image, its file back
    assert r.json()["added"][0]["id"] == new_id + 1 and len(uploaded_files(store_path)) == 1
    with Store.open(store_path) as st:
        assert st.verify() == []


# -- no server-side path in any response ----------------------------------------------------------

def test_no_server_path_in_any_response(tmp_path, photos, extra_photos):
    import tempfile

    from fastapi.testclient import TestClient

    from imret.index.store import AddReport
    from imret.server import ServerConfig, create_app

    torch.manual_seed(0)
    path = tmp_path / "store"
    weights = tmp_path / "weights" / "retrieval-net.safetensors"
    with Store.create(path, create_model("resnet18", "gem", pretrained=False), preprocessing=PRE,
                      model_source=str(weights)) as st:
        st.add(photos[:6], workers=0)
    app = create_app(path, ServerConfig())
    store = app.state.service.store
    real_add = store.add

    def add_and_skip(paths, **kw):  # a skip reason that names the file, as an OS error does
        report = real_add(paths[:-1], **kw)
        return AddReport(report.added, report.duplicates,
                         report.skipped + [(paths[-1], f"cannot read: [Errno 13] Permission denied: '{paths[-1]}'")])

    secret = [str(path), str(path.resolve()), str(tmp_path), tempfile.gettempdir(), str(weights.parent)]
    home = os.path.expanduser("~")
    if len(home) > 1:
        secret.append(home)
    seen = []
    with TestClient(app, raise_server_exceptions=False) as c:
        def check(r):
            seen.append(r)
            if r.headers.get("content-type", "").startswith("application/json"):
                for s in secret:
                    assert s not in r.text, (r.request.url, s, r.text)
            return r

        info = check(c.get("/api/info")).json()
        assert "path" not in info["store"] and info["store"]["model"]["source"] == weights.name
        for url in ("/api/health", "/api/metrics", "/api/images", "/api/images/1", "/api/images/1/similar?k=3",
                    "/api/images/99", "/api/images/-1", "/api/images/x/thumbnail", "/api/nothing", "/openapi.json"):
            check(c.get(url))
        check(c.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(photos[1]), "image/jpeg")}))
        check(c.post("/api/search", files={"image": ("q.jpg", b"not an image", "image/jpeg")}))
        check(c.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(photos[1])[:300], "image/jpeg")}))
        store.add = add_and_skip
        r = check(c.post("/api/images", files=[("images", ("new.jpg", jpeg_bytes(extra_photos[0]), "image/jpeg")),
                                               ("images", ("dup.jpg", jpeg_bytes(photos[0]), "image/jpeg")),
                                               ("images", ("skip.jpg", jpeg_bytes(extra_photos[1]), "image/jpeg"))]))
        store.add = real_add
        body = r.json()
        assert [a["name"] for a in body["added"]] == ["new.jpg"]
        assert body["duplicates"] == [{"name": "dup.jpg", "id": 0}]
        assert body["skipped"][0]["name"] == "skip.jpg" and "Permission denied" in body["skipped"][0]["reason"]
        new_id = body["added"][0]["id"]
        for url in ("/api/images?limit=100", f"/api/images/{new_id}", f"/api/images/{new_id}/similar"):
            check(c.get(url))
        os.remove(store.records([new_id])[0].path)  # a file that vanished: the 404 shows no path
        assert "cannot be read" in error_of(check(c.get(f"/api/images/{new_id}/thumbnail")), 404, "not_found")
        check(c.delete(f"/api/images/{new_id}"))
    assert len(seen) > 15


def test_public_store_info_hides_milvus_paths_and_credentials():
    from imret.server import _public_spec, _public_store_info

    assert _public_spec("milvus:/srv/data/vectors.db?collection=x") == "milvus:vectors.db?collection=x"
    assert _public_spec("milvus:http://bob:pw@db.lan:19530?token=abc&index=HNSW") == \
        "milvus:http://db.lan:19530?index=HNSW"
    assert _public_spec("faiss:IVF64,SQ8?nprobe=8") == "faiss:IVF64,SQ8?nprobe=8"
    info = _public_store_info({"path": "/srv/store", "model": {"source": "/home/u/w/net.pt", "spec": {}},
                               "backend": {"requested": "milvus:./v.db", "spec": "milvus:/srv/store/v.db"},
                               "note": "see /srv/store/x/y.txt"})
    assert info == {"model": {"source": "net.pt", "spec": {}},
                    "backend": {"requested": "milvus:v.db", "spec": "milvus:v.db"}, "note": "see y.txt"}
    assert _public_store_info({"model": {"source": "hf-hub:timm/resnet50.a1_in1k"}})["model"]["source"] == \
        "hf-hub:timm/resnet50.a1_in1k"


# -- error codes: every one documented, none undocumented -----------------------------------------

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "http-api.md")


def test_every_error_code_the_server_can_emit_is_documented():
    import re

    import imret.server as server
    from imret.server import ERROR_CODES, ApiError

    doc = open(DOC, encoding="utf-8").read()
    missing = [c for c in ERROR_CODES if f"`{c}`" not in doc]
    assert missing == [], f"codes not in docs/http-api.md: {missing}"
    src = open(server.__file__, encoding="utf-8").read()
    used = set(re.findall(r"ApiError\(\s*\d{3},\s*\"([a-z_]+)\"", src))
    used |= set(re.findall(r"_send_error\(\s*send,\s*\d{3},\s*\"([a-z_]+)\"", src))
    used |= set(re.findall(r"return \"([a-z_]+)\", ", src))  # the guard's refusals
    used |= set(re.findall(r"\"code\": \"([a-z_]+)\"", src))
    used |= set(re.findall(r"\d{3}: \"([a-z_]+)\"", src))  # the framework-status mapping
    assert len(used) >= 15 and used <= set(ERROR_CODES), used - set(ERROR_CODES)
    with pytest.raises(ValueError, match="unknown error code 'error'"):
        ApiError(400, "error", "x")


@pytest.mark.parametrize("body,ctype", [
    (b"whatever", "multipart/form-data"),  # no boundary
    (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\nabc",
     "multipart/form-data; boundary=b"),  # cut off
    (b"garbage without any boundary", "multipart/form-data; boundary=b"),
    (b"--b\r\nno headers here\r\n\r\nabc\r\n--b--\r\n", "multipart/form-data; boundary=b"),
    (b"--b--\r\n", "multipart/form-data; boundary=b"),  # no fields at all
    (b"--b\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nnot a file\r\n--b--\r\n",
     "multipart/form-data; boundary=b"),  # the field is text, not a file
])
def test_multipart_refusals_have_documented_codes(client, store_path, body, ctype):
    from imret.server import ERROR_CODES

    before = snapshot(store_path)
    for url, headers in (("/api/search", {}), ("/api/images", AUTH)):
        r = client.post(url, content=body, headers={"Content-Type": ctype, **headers})
        assert 400 <= r.status_code < 500, r.text
        code = r.json()["error"]["code"]
        assert code in ERROR_CODES and code == "bad_request", r.text
    assert snapshot(store_path) == before


def test_framework_refusals_have_documented_codes(client):
    error_of(client.put("/api/images"), 405, "method_not_allowed")
    error_of(client.get("/api/nothing"), 404, "not_found")
    error_of(client.get("/static/nothing.js"), 404, "not_found")


# -- upload formats: the rule of imret.images ----------------------------------------------------

def image_bytes(fmt, size=(96, 72), seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_upload_formats_are_those_of_imret_images():
    from PIL import Image as PILImage

    import imret.images
    from imret.server import upload_formats

    registered = PILImage.registered_extensions()
    want = {registered[e] for e in imret.images.IMAGE_EXTENSIONS if e in registered}
    got = upload_formats()
    assert set(got) - {"MPO"} == want
    assert all(ext in imret.images.IMAGE_EXTENSIONS and registered[ext] == fmt
               for fmt, exts in got.items() if fmt != "MPO" for ext in exts)
    assert got["JPEG"][0] == ".jpg"


@pytest.mark.parametrize("listed", [True, False])
def test_avif_upload_follows_the_imret_images_rule(client, store_path, monkeypatch, listed):
    from PIL import features

    import imret.images

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    from PIL import Image as PILImage

    avif_exts = {e for e, f in PILImage.registered_extensions().items() if f == "AVIF"}  # .avif, .avifs
    exts = tuple(e for e in imret.images.IMAGE_EXTENSIONS if e not in avif_exts)
    monkeypatch.setattr(imret.images, "IMAGE_EXTENSIONS", exts + ((".avif",) if listed else ()))
    avif = image_bytes("AVIF")
    r = client.post("/api/search", files={"image": ("q.avif", avif, "image/avif")}, data={"k": "3"})
    if listed:
        assert r.status_code == 200, r.text
        r = client.post("/api/images", files=[("images", ("new.avif", avif, "image/avif"))], headers=AUTH)
        assert r.status_code == 201 and len(r.json()["added"]) == 1, r.text
        assert [p.suffix for p in uploaded_files(store_path)] == [".avif"]
        assert "AVIF" in client.get("/api/info").json()["server"]["upload_formats"]
    else:
        msg = error_of(r, 415, "unsupported_media_type")
        assert "AVIF" in msg and "JPEG" in msg and "q.avif" in msg
        assert "AVIF" not in client.get("/api/info").json()["server"]["upload_formats"]


def test_every_listed_format_is_accepted(client):
    from imret.server import upload_formats

    for i, fmt in enumerate(sorted(set(upload_formats()) - {"MPO"})):
        r = client.post("/api/search", files={"image": (f"q.{fmt.lower()}", image_bytes(fmt, seed=i), "image/x")},
                        data={"k": "2"})
        assert r.status_code == 200, (fmt, r.text)


# -- where requests come from (in-process; the real-server checks are in test_server_hostile.py) --

def test_foreign_origin_and_host_are_refused_in_process(client, store_path, extra_photos):
    before = snapshot(store_path)
    files = [("images", ("a.jpg", jpeg_bytes(extra_photos[0]), "image/jpeg"))]
    error_of(client.post("/api/images", files=files, headers={**AUTH, "Origin": "https://evil.example"}),
             403, "forbidden_origin")  # even with the token: the page may have it from the user's browser
    error_of(client.get("/api/images", headers={"Origin": "https://evil.example"}), 403, "forbidden_origin")
    error_of(client.get("/api/images", headers={"Host": "evil.example"}), 403, "forbidden_host")
    error_of(client.delete("/api/images/1", headers={**AUTH, "Sec-Fetch-Site": "cross-site"}), 403, "forbidden_origin")
    assert snapshot(store_path) == before
    assert client.get("/api/images", headers={"Origin": "http://testserver"}).status_code == 200
    assert client.get("/api/images", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    r = client.post("/api/images", files=files, headers={**AUTH, "Origin": "http://testserver"})
    assert r.status_code == 201


def test_allowed_origins_and_hosts(store_path, photos):
    with make_client(store_path, token=TOKEN, allowed_origins=["https://App.example.org:443"],
                     allowed_hosts=["imret.example.org", "imret.lan:8000"]) as c:
        ok = {"Origin": "https://app.example.org"}
        r = c.get("/api/images/1", headers=ok)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.org"
        assert "origin" in r.headers["vary"].lower()
        assert "access-control-allow-origin" not in c.get("/api/images/1").headers
        pre = c.options("/api/images", headers={**ok, "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
        assert "Authorization" in pre.headers["access-control-allow-headers"]
        error_of(c.options("/api/images", headers={"Origin": "https://other.example",
                                                   "Access-Control-Request-Method": "POST"}), 403, "forbidden_origin")
        error_of(c.post("/api/images", files=[("images", ("a.jpg", jpeg_bytes(photos[0]), "image/jpeg"))],
                        headers=ok), 401, "unauthorized")  # an allowed origin still needs the token
        error_of(c.get("/api/images/1", headers={"Origin": "http://app.example.org"}), 403, "forbidden_origin")
        # reads without Origin from a cross-site page (an <img>) pass once origins are configured; writes never
        assert c.get("/api/images/1/thumbnail", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200
        error_of(c.delete("/api/images/1", headers={**AUTH, "Sec-Fetch-Site": "cross-site"}), 403, "forbidden_origin")
        for host, status in (("imret.example.org", 200), ("IMRET.example.org.:9999", 200), ("imret.lan:8000", 200),
                             ("imret.lan:8001", 403), ("imret.lan", 403), ("evil.example", 403), ("testserver", 200),
                             ("testserver:81", 403), ("", 403), ("a b", 403)):
            assert c.get("/api/health", headers={"Host": host}).status_code == status, host


@pytest.mark.parametrize("field,value,match", [
    ("allowed_origins", ["https://app.example.org/path"], "not a web origin"),
    ("allowed_origins", ["app.example.org"], "not a web origin"),
    ("allowed_origins", ["null"], "not a web origin"),
    ("allowed_origins", ["*"], "not a web origin"),
    ("allowed_origins", "https://app.example.org", "list of strings"),
    ("allowed_hosts", ["bad host"], "not a host name"),
    ("allowed_hosts", ["::1"], "not a host name"),
    ("allowed_hosts", ["host:99999"], "not a host name"),
    ("allowed_hosts", ["*"], "not a host name"),
])
def test_server_config_rejects_bad_hosts_and_origins(field, value, match):
    from imret.server import ServerConfig

    with pytest.raises((ValueError, TypeError), match=match):
        ServerConfig(**{field: value})
    assert ServerConfig(allowed_hosts=["[::1]:8000", "Example.ORG."]).allowed_hosts == ("[::1]:8000", "example.org")


@pytest.mark.parametrize("server,host,ok", [
    (("127.0.0.1", 8000), "127.0.0.1:8000", True),
    (("127.0.0.1", 8000), "localhost:8000", True),
    (("127.0.0.1", 8000), "[::1]:8000", True),
    (("127.0.0.1", 8000), "localhost", False),  # port 80 implied
    (("127.0.0.1", 8000), "evil.example:8000", False),
    (("127.0.0.1", 8000), "localhost.evil.example:8000", False),
    (("::ffff:127.0.0.1", 8000), "localhost:8000", True),
    (("192.168.1.5", 8000), "192.168.1.5:8000", True),  # bound to 0.0.0.0, reached over the LAN
    (("192.168.1.5", 8000), "localhost:8000", False),
    (("192.168.1.5", 8000), "imret.lan:8000", True),  # --allowed-host imret.lan
    (("192.168.1.5", 8000), "imret.lan.:1234", True),
    (("192.168.1.5", 8000), "box.lan:8000", False),
    (("192.168.1.5", 80), "192.168.1.5", True),
    (("/run/imret.sock", None), "localhost", True),  # a Unix socket
    (("/run/imret.sock", None), "evil.example", False),
])
def test_host_check_follows_the_interface_a_connection_arrived_at(server, host, ok):
    from imret.server import RequestGuard

    guard = RequestGuard(None, limits={}, multipart=set(), allowed_hosts=("imret.lan",))
    scope = {"type": "http", "method": "GET", "scheme": "http", "server": server}
    assert guard._host_ok(scope, host) == ok


def test_damaged_descriptors_are_an_error_not_a_wrong_answer(store_path, photos):
    """Rows 2 and 3 swapped on disk: the old server answered a search for photo 2 with image 3 at 1.0."""
    import numpy as np

    f = store_path / "descriptors.f32"
    x = np.fromfile(f, dtype=np.float32).reshape(len(photos), -1)
    x[[2, 3]] = x[[3, 2]]
    x.tofile(f)
    from fastapi.testclient import TestClient

    from imret.server import ServerConfig, create_app

    with TestClient(create_app(store_path, ServerConfig(token=TOKEN)), raise_server_exceptions=False) as c:
        r = c.post("/api/search", files={"image": ("q.jpg", jpeg_bytes(photos[2]), "image/jpeg")})
        error_of(r, 500, "store_damaged")
        assert str(store_path) not in r.text
        error_of(c.get("/api/images/3/similar"), 500, "store_damaged")
        assert c.get("/api/health").status_code == 200
