"""Re-ranking through the HTTP API (ASGI test client): the store's stages, a request's own,
``none``, ``localize``; every refusal with its code; results equal to ``Store.search`` with the
same stages.

The store holds 8 generated 320x240 photos with RootSIFT local features; the query is a third
view of the object of stored photos 6 and 7 (not in the store), which the untrained model ranks
low and geometric verification puts on top (as in tests/test_store_local.py).
"""

import os
import shutil
import time

import numpy as np
import pytest

from conftest import installed

pytestmark = [pytest.mark.skipif(not installed("fastapi", "httpx", "multipart", "cv2"),
                                 reason="needs the serve extra (fastapi, python-multipart), httpx and opencv"),
              pytest.mark.usefixtures("one_torch_thread")]

from imret.index.store import Store  # noqa: E402

LOCAL = "sift?max_keypoints=64&max_side=320"
SIFT = "sift:8?min_inliers=6"


@pytest.fixture(scope="module")
def photos(view_photos):
    return view_photos


@pytest.fixture(scope="module")
def plain(view_store):
    """The 8 stored photos, no local features, no re-rankers (shared: read only)."""
    return view_store


@pytest.fixture(scope="module")
def local(plain, tmp_path_factory):
    """The same store with RootSIFT local features and ``SIFT`` as its own re-ranker."""
    path = tmp_path_factory.mktemp("rerank") / "store"
    shutil.copytree(plain, path)
    with Store.open(path, writable=True) as st:
        st.configure(local=LOCAL, rerank=[SIFT])
    return path


def make_client(path, **cfg):
    from fastapi.testclient import TestClient

    from imret.server import ServerConfig, create_app

    return TestClient(create_app(path, ServerConfig(**{"read_only": True, **cfg})))


@pytest.fixture(scope="module")
def client(local):
    with make_client(local) as c:
        yield c


@pytest.fixture(scope="module")
def query(photos):
    return photos[8]


def upload(client, path, **fields):
    with open(path, "rb") as f:
        data = f.read()
    return client.post("/api/search", files={"image": ("q.jpg", data, "image/jpeg")}, data=fields)


def ok(r):
    assert r.status_code == 200, r.text
    return r.json()


def error_of(r, status, code):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and err["status"] == status and err["code"] == code, err
    return err["message"]


def same_as_store(got, want):
    """Server hits vs Store.search hits: ids, scores, and the re-rankers' per-hit values."""
    assert [h["id"] for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in want], atol=1e-5)
    for g, w in zip(got, want):
        assert g.get("inliers") == w.extras.get("inliers")
        assert ("box" in g) == ("box" in w.extras)
        if "box" in g:
            np.testing.assert_allclose(g["box"], w.extras["box"], atol=0.01)
        assert ("transform" in g) == ("transform" in w.extras)


def test_the_stores_own_stage_applies_and_equals_store_search(client, local, query):
    body = ok(upload(client, query, k="4"))
    assert body["rerank"] == [SIFT]
    got = body["results"]
    assert {h["id"] for h in got[:2]} == {6, 7} and min(h["inliers"] for h in got[:2]) >= 6
    assert all(isinstance(h["inliers"], int) for h in got if "inliers" in h)
    assert all(np.asarray(h["transform"]).shape == (3, 3) for h in got[:2])
    assert all(a["score"] >= b["score"] for a, b in zip(got, got[1:]))
    with Store.open(local) as st:
        same_as_store(got, st.search(query, k=4, workers=0))
        plain = st.search(query, k=8, rerank=[], workers=0)
    assert plain[-1].id == 6  # the first stage alone ranks it last: the stage did the work


def test_a_request_overrides_the_stores_stages(client, local, query):
    with Store.open(local) as st:
        two = ["sift:8?min_inliers=7&ratio=0.9", "sg:6?k=2&beta=0.2"]
        for fields, rerank in (({"rerank": "none"}, []), ({"rerank": ["sg:8?k=3"]}, ["sg:8?k=3"]),
                               ({"rerank": two}, two)):
            body = ok(upload(client, query, k="5", **fields))
            assert body["rerank"] == rerank, fields
            same_as_store(body["results"], st.search(query, k=5, rerank=rerank, workers=0))
        none = ok(upload(client, query, k="5", rerank="none"))["results"]
        assert all("inliers" not in h and "box" not in h for h in none)
        assert [h["id"] for h in none] == [h.id for h in st.search(query, k=5, rerank=[], workers=0)]


def test_localize_gives_boxes_inside_the_hit_images(client, local, query, photos):
    body = ok(upload(client, query, k="4", localize="true"))
    assert body["rerank"] == [SIFT, "aml:4"]
    got = body["results"]
    assert len(got) == 4 and all("box" in h for h in got)
    for h in got:
        x1, y1, x2, y2 = h["box"]
        assert 0 <= x1 < x2 <= h["width"] and 0 <= y1 < y2 <= h["height"], h
        assert (x2 - x1) * (y2 - y1) >= 0.01 * h["width"] * h["height"]
    with Store.open(local) as st:
        same_as_store(got, st.search(query, k=4, rerank=[SIFT, "aml:4"], workers=0))
    # a request's own aml stage is not doubled; localize=false adds nothing
    assert ok(upload(client, query, k="4", localize="true", rerank="aml:3"))["rerank"] == ["aml:3"]
    assert ok(upload(client, query, k="4", localize="false"))["rerank"] == [SIFT]
    # with a box on the query, the stages see the cropped query (as Store.search does)
    box = (20, 10, 300, 230)
    body = ok(upload(client, query, k="3", localize="1", bbox=",".join(map(str, box))))
    with Store.open(local) as st:
        same_as_store(body["results"], st.search(query, bboxes=[box], k=3, rerank=[SIFT, "aml:3"], workers=0))


def test_localize_is_bounded_by_max_rerank_k(local, query):
    with make_client(local, max_rerank_k=3) as c:
        body = ok(upload(c, query, k="6", localize="true", rerank="none"))
        assert body["rerank"] == ["aml:3"]
        assert [("box" in h) for h in body["results"]] == [True] * 3 + [False] * 3
        info = ok(c.get("/api/info"))["server"]["rerank"]
        assert info["max_top_k"] == 3 and info["max_stages"] == 4 and "min_inliers" in info["request_params"]["sift"]
        error_of(upload(c, query, rerank="sift:4"), 400, "bad_request")


def test_search_by_indexed_image_reranks_with_its_stored_file(client, local):
    body = ok(client.get("/api/images/6/similar", params={"k": 4}))
    assert body["rerank"] == [SIFT] and body["query"] == {"id": 6}
    got = body["results"]
    assert [h["id"] for h in got[:2]] in ([6, 7], [7, 6]) and all(h["inliers"] >= 6 for h in got[:2])
    with Store.open(local) as st:
        path = st.records([6])[0].path
        want = st.search(path, k=4, workers=0)
    assert [h["id"] for h in got] == [h.id for h in want]
    assert [h["inliers"] for h in got[:2]] == [h.extras["inliers"] for h in want[:2]]
    loc = ok(client.get("/api/images/6/similar", params=[("k", "3"), ("localize", "true"), ("rerank", "none")]))
    assert loc["rerank"] == ["aml:3"] and all("box" in h for h in loc["results"])
    two = ok(client.get("/api/images/6/similar", params=[("k", "3"), ("rerank", "sg:8?k=3"), ("rerank", SIFT)]))
    assert two["rerank"] == ["sg:8?k=3", SIFT]


BAD = [
    (["surf:5"], "unknown re-ranker 'surf'"),
    (["sift:5?min_inlier=3"], "unknown parameter 'min_inlier'"),
    (["sift:5?workers=64"], "workers is set by the server"),
    (["sift:5?max_iters=100000000"], "max_iters is set by the server"),
    (["aml:5?image_size=8192"], "image_size is set by the server"),
    (["sift:401"], "at most 400"),
    (["sg:0"], "positive integer"),
    (["sift:5"] * 5, "5 re-rankers in one request; the limit is 4"),
    (["none", "sift:5"], "give it alone"),
    (["sg:8?k=9"], "k must be smaller than m"),
    (["sift:5?top_k=3"], "give the number of candidates as sift:N"),
    (["sift:5?min_inliers=" + "9" * 400], "characters long"),
]


@pytest.mark.parametrize("specs,why", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_specs_are_refused_with_bad_request(client, query, specs, why):
    msg = error_of(upload(client, query, rerank=specs), 400, "bad_request")
    assert why in msg, msg
    msg = error_of(client.get("/api/images/0/similar", params=[("rerank", s) for s in specs]), 400, "bad_request")
    assert why in msg, msg


def test_bad_localize_is_refused(client, query):
    assert "localize must be true or false" in error_of(upload(client, query, localize="maybe"), 400, "bad_request")
    error_of(client.get("/api/images/0/similar?localize=2"), 400, "bad_request")


def test_stages_without_their_local_features_are_refused(plain, client, query):
    with make_client(plain) as c:
        info = ok(c.get("/api/info"))["store"]
        assert info["local"] is None and info["rerank"] == []
        for r in (upload(c, query, rerank="sift:5"), c.get("/api/images/0/similar?rerank=sift:5")):
            msg = error_of(r, 409, "rerank_unavailable")
            assert "imret index configure STORE --local sift" in msg and "keeps no local features" in msg, msg
            assert str(plain) not in msg
        # stages that need no local features run
        assert ok(upload(c, query, k="3", rerank="sg:8?k=3"))["rerank"] == ["sg:8?k=3"]
        assert all("box" in h for h in ok(upload(c, query, k="3", localize="true"))["results"])
    msg = error_of(upload(client, query, rerank="cnn:5"), 409, "rerank_unavailable")
    assert "keeps sift local features" in msg and "--local cnn" in msg


def test_info_shows_the_stores_local_features_and_stages(client):
    info = ok(client.get("/api/info"))
    assert info["store"]["local"]["kind"] == "sift" and info["store"]["local"]["max_keypoints"] == 64
    assert info["store"]["rerank"] == [SIFT]
    r = info["server"]["rerank"]
    assert r["max_stages"] == 4 and r["max_top_k"] == 400 and set(r["request_params"]) == {"sift", "cnn", "aml", "sg"}
    assert ok(client.get("/api/metrics"))["rerank_queue"] == 0


def test_upload_copies_are_deleted_after_reranking(client, query):
    tmp = client.app.state.service._tmp.name
    ok(upload(client, query, k="3", localize="true"))
    error_of(upload(client, query, rerank="sift:5?min_inliers=1"), 400, "bad_request")
    assert os.listdir(tmp) == []


def test_an_indexed_image_whose_file_is_gone_is_not_found(local, tmp_path, photos):
    path = tmp_path / "store"
    shutil.copytree(local, path)
    # re-point image 3 at a copy of its file, then delete the copy
    moved = tmp_path / "gone.jpg"
    shutil.copy(photos[3], moved)
    import sqlite3

    db = sqlite3.connect(path / "meta.sqlite")
    with db:
        db.execute("UPDATE images SET path = ? WHERE id = 3", (str(moved),))
    db.close()
    moved.unlink()
    with make_client(path) as c:
        msg = error_of(c.get("/api/images/3/similar?k=3"), 404, "not_found")
        assert "cannot be read any more" in msg and str(tmp_path) not in msg, msg
        assert ok(c.get("/api/images/3/similar?k=3&rerank=none"))["rerank"] == []


def test_a_cancelled_or_refused_reranking_frees_its_slot_and_file(local):
    """The re-rank queue is bounded (503 beyond max_queue), and a query's private upload copy is
    deleted whether its re-ranking ran, was cancelled before it started, or was refused."""
    import threading

    from imret.server import ApiError

    with make_client(local, rerank_workers=1, max_queue=2) as c:
        service = c.app.state.service
        plan = service.plan_rerank(None, False, 3)
        path = service.store.records([0])[0].path
        copies = []
        for n in range(3):
            f = os.path.join(service._tmp.name, f"copy{n}.jpg")
            shutil.copy(path, f)
            copies.append(f)
        scores, ids = np.linspace(1, 0.5, 8).astype(np.float32), np.arange(8, dtype=np.int64)
        gate = threading.Event()
        blocker = service.reranker.submit(gate.wait, 30)  # the one worker is busy
        try:
            first = service.submit_rerank(plan, None, scores, ids, 3, image=copies[0], image_id=0, owned_file=copies[0])
            second = service.submit_rerank(plan, None, scores, ids, 3, image=copies[1], image_id=0,
                                           owned_file=copies[1])
            with pytest.raises(ApiError) as e:
                service.submit_rerank(plan, None, scores, ids, 3, image=copies[2], image_id=0, owned_file=copies[2])
            assert e.value.status == 503 and e.value.code == "busy"
            assert not os.path.exists(copies[2]) and service.rerank_pending == 2
            assert first.cancel() and not os.path.exists(copies[0]) and service.rerank_pending == 1
        finally:
            gate.set()
        blocker.result()
        s, i, extras = second.result(timeout=60)
        assert i.shape == (3,) and "inliers" in extras
        # the future's callbacks (freeing the slot, deleting the copy) run just after its result
        deadline = time.monotonic() + 10
        while (service.rerank_pending or os.path.exists(copies[1])) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.rerank_pending == 0 and not os.path.exists(copies[1])


def test_request_parameters_are_real_stage_parameters():
    """Every parameter a request may set is one the stage takes (a rename in a stage class
    fails here, not as a 400 for every client); the work-setting ones are not among them."""
    import inspect

    from imret.rerank import RERANK_KINDS, check_rerank
    from imret.server import REQUEST_RERANK_PARAMS

    assert set(REQUEST_RERANK_PARAMS) == set(RERANK_KINDS)
    for kind, names in REQUEST_RERANK_PARAMS.items():
        for name in names:
            check_rerank(f"{kind}:5?{name}=1")
        assert not {"workers", "max_iters", "time_budget", "image_size", "step", "chunk_size", "device"} & set(names)
        taken = set(inspect.signature(check_rerank(kind).stage).parameters)
        assert set(names) <= taken
