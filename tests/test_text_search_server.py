"""`/api/search` by text, in-process (ASGI test client): a JSON body or a form field, results
equal to Store.search(text=...), the errors (no caption model, whitening, unknown words, too
long, image and text together, re-rankers that need pixels), limits, /api/info, OpenAPI."""

import numpy as np
import pytest

from conftest import installed

pytestmark = [pytest.mark.skipif(not installed("fastapi", "httpx", "multipart", "sklearn", "nltk"),
                                 reason="the serve and text extras (fastapi, python-multipart, scikit-learn, "
                                        "nltk) and httpx are not installed"),
              pytest.mark.usefixtures("one_torch_thread")]

from imret.index.store import Store  # noqa: E402
from test_server import TOKEN, error_of, make_client  # noqa: E402
from test_text_search import NAMES, joint_text_model, object_of  # noqa: E402


@pytest.fixture(scope="module")
def text_model(small_store):
    with Store.open(small_store) as st:
        recs = st.list(0, 1000)
        phi = np.asarray(st.descriptors(), np.float32)[[r.id for r in recs]]
    return joint_text_model([r.path for r in recs], phi)


@pytest.fixture
def text_store(small_store, copy_store, text_model):
    path = copy_store(small_store)
    with Store.open(path, writable=True) as st:
        st.set_text_model(text_model, source="/secret/dir/text.safetensors")
    return path


@pytest.fixture
def client(text_store):
    with make_client(text_store, token=TOKEN) as c:
        yield c


def expected(store, text, k):
    with Store.open(store) as st:
        return [(h.id, round(h.score, 6)) for h in st.search(text=text, k=k)]


def test_text_search_json_and_form_equal_store_search(client, text_store):
    r = client.post("/api/search", json={"text": "a red dog", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"text": "a red dog"} and body["rerank"] == [] and body["took_ms"] > 0
    want = expected(text_store, "a red dog", 5)
    assert [(h["id"], h["score"]) for h in body["results"]] == want
    assert set(body["results"][0]) == {"id", "score", "name", "width", "height", "thumbnail"}
    with Store.open(text_store) as st:
        paths = {rec.id: rec.path for rec in st.list(0, 1000)}
    assert object_of(paths[body["results"][0]["id"]]) == NAMES.index("red dog")
    form = client.post("/api/search", data={"text": "a red dog", "k": "5"}, files={"unused": ("u", b"")})
    assert form.status_code == 200, form.text
    assert [(h["id"], h["score"]) for h in form.json()["results"]] == want
    # query expansion on: the same as the store's alpha-QE default of the server (k=10, alpha=3)
    qe = client.post("/api/search", json={"text": "a red dog", "k": 5, "qe": True}).json()
    from imret.expansion import QueryExpansion

    with Store.open(text_store) as st:
        ref = st.search(text="a red dog", k=5, query_expansion=QueryExpansion("alpha", k=10, alpha=3.0))
    assert [h["id"] for h in qe["results"]] == [h.id for h in ref]


def test_text_search_concurrent_requests_are_batched_and_each_correct(client, text_store):
    import concurrent.futures

    texts = ["red dog", "blue cat", "green bird", "yellow car"] * 3
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda t: client.post("/api/search", json={"text": t, "k": 3}).json(), texts))
    for t, body in zip(texts, got):
        assert [(h["id"], h["score"]) for h in body["results"]] == expected(text_store, t, 3)


def test_text_search_errors(client, text_store):
    cases = [
        ({"text": "zebra xylophone"}, 422, "unknown_words", "vocabulary"),
        ({"text": "dog " * 300}, 400, "bad_request", "limit is 1000"),
        ({"text": "   "}, 400, "bad_request", "blank"),
        ({"text": 3}, 400, "bad_request", "string"),
        ({"text": "dog", "k": 0}, 400, "bad_request", "k must be"),
        ({"text": "dog", "k": "5"}, 400, "bad_request", "integer"),
        ({"text": "dog", "qe": "maybe"}, 400, "bad_request", "qe"),
        ({"text": "dog", "rerank": "sift:10"}, 400, "bad_request", "pixels"),
        ({"text": "dog", "rerank": ["aml:5"]}, 400, "bad_request", "pixels"),
        ({"text": "dog", "bbox": "1,2,3,4"}, 400, "bad_request", "unknown field"),
        ({"image": "x"}, 400, "bad_request", "'text' field"),
    ]
    for body, status, code, words in cases:
        msg = error_of(client.post("/api/search", json=body), status, code)
        assert words in msg, (body, msg)
    msg = error_of(client.post("/api/search", content=b"{not json", headers={"Content-Type": "application/json"}),
                   400, "bad_request")
    assert "JSON" in msg
    big = b'{"text": "' + b"a" * 70000 + b'"}'
    error_of(client.post("/api/search", content=big, headers={"Content-Type": "application/json"}), 413, "too_large")
    with open(Store.open(text_store).list(0, 1)[0].path, "rb") as f:
        photo = f.read()
    msg = error_of(client.post("/api/search", data={"text": "dog"}, files={"image": ("q.jpg", photo, "image/jpeg")}),
                   400, "bad_request")
    assert "not both" in msg
    msg = error_of(client.post("/api/search", data={"text": "dog", "localize": "true"},
                               files={"unused": ("u", b"")}), 400, "bad_request")
    assert "not both" in msg
    msg = error_of(client.post("/api/search", data={"k": "3"}, files={"unused": ("u", b"")}), 422, "bad_request")
    assert "'image'" in msg and "'text'" in msg
    error_of(client.post("/api/search", content=b"text=dog", headers={"Content-Type": "text/plain"}),
             415, "unsupported_media_type")


def test_store_without_caption_model_or_with_whitening_is_409(small_store, copy_store, text_model):
    from imret.whitening import fit_pca_whitening

    with make_client(copy_store(small_store)) as c:
        msg = error_of(c.post("/api/search", json={"text": "red dog"}), 409, "text_unavailable")
        assert "no caption model" in msg and "--text-model" in msg
        assert c.get("/api/info").json()["server"]["text"] == {"available": False, "max_chars": 1000}
    path = copy_store(small_store)
    with Store.open(path, writable=True) as st:
        st.set_text_model(text_model)
        st.configure(whitening=fit_pca_whitening(np.asarray(st.descriptors(), np.float32), 8))
    with make_client(path) as c:
        msg = error_of(c.post("/api/search", json={"text": "red dog"}), 409, "text_unavailable")
        assert "whitening" in msg and str(path) not in msg
        assert c.get("/api/info").json()["server"]["text"]["available"] is False


def test_store_rerankers_that_need_pixels_are_left_out_sg_runs(text_store, text_model):
    with Store.open(text_store, writable=True) as st:
        st.configure(rerank=["aml:5", "sg:12"])
    with make_client(text_store) as c:
        body = c.post("/api/search", json={"text": "blue cat", "k": 4}).json()
        assert body["rerank"] == ["sg:12"]
        none = c.post("/api/search", json={"text": "blue cat", "k": 4, "rerank": "none"}).json()
        assert none["rerank"] == []
    with Store.open(text_store) as st:
        want = [h.id for h in st.search(text="blue cat", k=4, rerank=["sg:12"])]
    assert [h["id"] for h in body["results"]] == want


def test_info_and_openapi_document_text_search(client, text_store):
    info = client.get("/api/info").json()
    assert info["server"]["text"] == {"available": True, "max_chars": 1000}
    t = info["store"]["text"]
    assert t["dim"] == 512 and t["source"] == "text.safetensors" and "/secret" not in str(info)
    op = client.get("/openapi.json").json()["paths"]["/api/search"]["post"]
    content = op["requestBody"]["content"]
    assert content["application/json"]["schema"]["properties"]["text"]["maxLength"] == 1000
    assert "multipart/form-data" in content
    assert "text_unavailable" in op["description"] and "unknown_words" in op["description"]
    from imret.server import ERROR_CODES

    assert {"text_unavailable", "unknown_words"} <= set(ERROR_CODES)


def test_text_length_limit_is_configurable(text_store):
    with make_client(text_store, max_text_chars=10) as c:
        error_of(c.post("/api/search", json={"text": "a red dog runs"}), 400, "bad_request")
        assert c.post("/api/search", json={"text": "red dog"}).status_code == 200
    with make_client(text_store, max_text_chars=3000) as c:  # longer than the library's default limit
        long = "red dog " * 300
        r = c.post("/api/search", json={"text": long, "k": 3})
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["results"]] == [i for i, _ in expected(text_store, "red dog", 3)]
