"""The Milvus backend in server mode (``milvus:http://...``) against a real Milvus server process.

The server is the standalone Milvus of the ``milvus`` package (``pip install 'imret[milvus-server]'``),
started once per session on free loopback ports with a temporary data directory and
authentication on (user ``root``, whose password the fixture changes to :data:`SECRET`), so
the token path is exercised too. Without that package, or where its server cannot start,
the tests are skipped and say why.
"""

import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'imret[milvus]')")

from imret.index import create_backend  # noqa: E402
from imret.index.base import tie_aware_recall  # noqa: E402
from imret.index.exact import exact_search  # noqa: E402
from imret.index.milvus_backend import MilvusBackend, milvus_config  # noqa: E402
from imret.index.store import Store  # noqa: E402

SECRET = "imret-S3cret"  # the root password the fixture sets: greppable, unlike the default 'Milvus'
TOKEN = f"root:{SECRET}"
N, D, Q = 4000, 48, 40


@pytest.fixture(scope="session")
def server() -> str:
    """The URI (``http://127.0.0.1:PORT``) of a Milvus standalone server started for this session.

    Its data directory (~250 MB of unpacked binaries, ~270 MB of etcd and message-queue
    files) is a temporary one, deleted when the session ends.
    """
    milvus = pytest.importorskip("milvus", reason="the Milvus server package is not installed "
                                                  "(pip install 'imret[milvus-server]')")
    if not hasattr(milvus, "MilvusServer"):
        pytest.skip(f"the installed 'milvus' module ({getattr(milvus, '__file__', '?')}) is not the Milvus "
                    f"server package (no MilvusServer)")
    data_dir = Path(tempfile.mkdtemp(prefix="imret-milvus-server-"))
    srv = milvus.MilvusServer(milvus.MilvusServerConfig(data_dir=str(data_dir)))
    srv.config.set("authorization_enabled", True)
    try:
        srv.start()  # free ports from 19530 / 9091 upwards, on 127.0.0.1; waits for /healthz
    except Exception as e:  # noqa: BLE001 - any failure to start is a skip, with its reason
        srv.stop()
        log = data_dir / "logs" / "milvus-stderr.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
        shutil.rmtree(data_dir, ignore_errors=True)
        pytest.skip(f"the Milvus {getattr(milvus, '__version__', '?')} server of the 'milvus' package cannot "
                    f"start on {platform.system()} {platform.machine()}: {type(e).__name__}: {e} "
                    f"{' | '.join(tail)}".strip())
    uri = f"http://127.0.0.1:{srv.listen_port}"
    try:
        from pymilvus import MilvusClient

        client = MilvusClient(uri=uri, token="root:Milvus")  # the account of a fresh server
        client.update_password("root", "Milvus", SECRET)
        client.close()
        yield uri
    finally:
        srv.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def clustered(n: int, d: int, seed: int, centres: int = 25) -> np.ndarray:
    """L2-normalised rows from a mixture of Gaussians, float32."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + 0.4 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(N + Q, D, seed=5)
    ids = np.sort(np.random.default_rng(6).choice(2**40, size=N, replace=False)).astype(np.int64)
    return x[:N], ids, x[N:]


def backend(server: str, collection: str, index: str = "FLAT", **params: str) -> MilvusBackend:
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return create_backend(f"milvus:{server}?collection={collection}&index={index}&token={TOKEN}{extra}", D)


# -- the backend ------------------------------------------------------------------------------


def test_flat_top100_equals_exact_and_survives_reopening(server, data, tmp_path):
    x, ids, q = data
    k = 100
    es, _ = exact_search(q, x, k, ids=ids)
    with backend(server, "flat_exact") as b:
        b.add(x, ids)
        assert b.ntotal == N  # Strong consistency: counted (and searchable) at once
        s, i = b.search(q, k)
        assert tie_aware_recall(q, x, ids, es, i, k) == 1.0
        np.testing.assert_allclose(s, es, atol=1e-5)
        b.save(tmp_path)
    meta = json.loads((tmp_path / "milvus.json").read_text())
    assert meta["uri"] == server and meta["lite"] is False and meta["ntotal"] == N
    assert SECRET not in json.dumps(meta)  # no password
    # a new connection finds the collection and its rows; flushed segments give the same answers
    with MilvusBackend.load(tmp_path, D, server, {"collection": "flat_exact", "index": "FLAT",
                                                  "token": TOKEN}) as again:
        assert again.ntotal == N
        s2, i2 = again.search(q, k)
        assert tie_aware_recall(q, x, ids, es, i2, k) == 1.0
        np.testing.assert_allclose(s2, es, atol=1e-5)


def test_hnsw_and_ivf_recall(server, data):
    x, ids, q = data
    k = 20
    es, _ = exact_search(q, x, k, ids=ids)
    for index, params in (("HNSW", {"ef": "64"}), ("IVF_FLAT", {"nlist": "32", "nprobe": "8"})):
        with backend(server, f"ann_{index.lower()}", index, **params) as b:
            b.add(x, ids)
            b.flush()  # seals the segment: the server builds its index
            s, i = b.search(q, k)
            assert tie_aware_recall(q, x, ids, es, i, k) >= 0.9, index
            rows = np.searchsorted(ids, i)
            np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, x[rows]), atol=1e-5)
            assert b.describe()["engine"] == "milvus" and b.describe()["index"] == index


def test_remove_and_replace(server, data):
    x, ids, _ = data
    with backend(server, "writes") as b:
        b.add(x[:500], ids[:500])
        gone = ids[:500:4]
        assert b.remove(np.concatenate([gone, [int(ids.max()) + 1]])) == gone.size
        assert b.ntotal == 500 - gone.size
        s, i = b.search(x[:500:4], 10)  # each removed row queried with itself
        assert not np.isin(i, gone).any()
        # a server keeps both rows of an id on a plain insert: replace must upsert
        b.add(x[1000:1001], ids[1:2], replace=True)
        assert b.ntotal == 500 - gone.size
        np.testing.assert_array_equal(b.vectors(ids[1:2]), x[1000:1001])
        assert b.search(x[1000:1001], 1)[1][0, 0] == ids[1]
        with pytest.raises(ValueError, match="already present"):
            b.add(x[2:3], ids[2:3])


@pytest.mark.parametrize("consistency", [None, "Strong"])
def test_own_writes_are_read_at_once(server, data, consistency):
    """Session (the server default) and Strong: rows are found, and removed rows gone, as
    soon as add / remove return, with no flush."""
    x, ids, _ = data
    extra = {"consistency": consistency} if consistency else {}
    with backend(server, f"visible_{consistency or 'default'}", **extra) as b:
        assert b.describe()["consistency"] == (consistency or "Session")
        for start in range(0, 300, 100):
            b.add(x[start:start + 100], ids[start:start + 100])
            assert b.ntotal == start + 100 - start // 100  # one removed per round
            np.testing.assert_array_equal(b.search(x[start:start + 100], 1)[1][:, 0], ids[start:start + 100])
            assert b.remove(ids[start:start + 1]) == 1
            assert b.search(x[start:start + 1], 1)[1][0, 0] != ids[start]


def test_credentials(server):
    port = server.rpartition(":")[2]
    # user:password in the URI is used as the token and kept out of spec, describe() and errors
    in_uri = f"http://{TOKEN}@127.0.0.1:{port}"
    cfg = milvus_config(in_uri, {"collection": "creds"})
    assert cfg.token == TOKEN and cfg.uri == server and SECRET not in cfg.spec + repr(cfg)
    with MilvusBackend(D, in_uri, {"collection": "creds", "index": "FLAT"}) as b:
        assert b.ntotal == 0
        assert SECRET not in json.dumps(b.describe()) + repr(b) + b.spec
    with pytest.raises(ValueError, match="both in the URI and in the token") as e:
        milvus_config(in_uri, {"token": TOKEN})
    assert SECRET not in str(e.value)
    # a wrong or missing token: refused, and the message does not repeat it
    start = time.monotonic()
    for params in ({"token": "root:s3cret-wrong"}, {}):
        with pytest.raises(ConnectionError, match=f"cannot connect to Milvus at {server}") as e:
            MilvusBackend(D, server, {"collection": "creds", **params})
        assert "s3cret" not in str(e.value)
        assert ("no token was given" in str(e.value)) == (not params)
    assert time.monotonic() - start < 60


def test_default_collection_is_one_per_store_directory(server, data, tmp_path):
    x, ids, q = data
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    with create_backend(f"milvus:{server}?index=FLAT&token={TOKEN}", D, root=a_dir) as a, \
            create_backend(f"milvus:{server}?index=FLAT&token={TOKEN}", D, root=b_dir) as b:
        assert a.config.collection != b.config.collection
        assert a.config.collection.startswith("imret_") and f"collection={a.config.collection}" in a.spec
        assert "token" not in a.spec
        a.add(x[:100], ids[:100])
        b.add(x[100:300], ids[100:300])
        assert (a.ntotal, b.ntotal) == (100, 200)
        assert np.isin(a.search(q, 100)[1], ids[:100]).all()
        assert np.isin(b.search(q, 200)[1], ids[100:300]).all()
        # the same directory names the same collection: a rebuild replaces it, not another's
        with create_backend(f"milvus:{server}?index=FLAT&token={TOKEN}", D, root=a_dir) as again:
            assert again.config.collection == a.config.collection and again.ntotal == 0
        assert b.ntotal == 200


# -- stores on the server ---------------------------------------------------------------------


def test_stores_share_the_server(server, small_store, copy_store):
    """Two stores on one server (default collection names): each searches its own images,
    exactly as exact search does; a removed image disappears; a reopened store finds its
    collection again; the token is never written into the store."""
    with Store.open(small_store) as ref:
        x = np.asarray(ref.descriptors()).copy()
    paths = [copy_store(small_store), copy_store(small_store)]
    spec = f"milvus:{server}?index=FLAT"
    opts = {"token": TOKEN}
    for p in paths:
        with Store.open(p, writable=True, backend_options=opts) as st:
            st.configure(backend=spec)
            info = st.info()["backend"]
            assert info["searching_with"] == info["spec"] and info["spec"].startswith(spec + "&collection=imret_")
    alive = np.ones(len(x), bool)
    with Store.open(paths[0], writable=True, backend_options=opts) as st:
        assert st.remove([3]) == 1
    alive[3] = False
    for p, live in ((paths[0], alive), (paths[1], np.ones(len(x), bool))):
        with Store.open(p, backend_options=opts) as st:
            s, i = st.search_vectors(x, 5)
            s_ref, i_ref = exact_search(x, x, 5, alive=live)
            np.testing.assert_array_equal(i, i_ref)
            np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-6)
            assert st.info()["backend"]["ntotal"] == int(live.sum())
            assert st.verify() == []
    for p in paths:
        for f in p.rglob("*.json"):
            assert SECRET not in f.read_text(), f
    # without the token the store cannot reach its collection, and says so
    with Store.open(paths[0], backend_options={"token": "root:wrong"}) as st:
        with pytest.raises(Exception, match="cannot reach the search backend"):
            st.search_vectors(x[:1], 5)


@pytest.mark.parametrize("spec", ["milvus:http://127.0.0.1:19530?index=FLAT&token={token}",
                                  "milvus:http://{token}@127.0.0.1:19530?index=FLAT"])
def test_store_refuses_credentials_in_the_spec(small_store, copy_store, tiny_model, tmp_path, spec):
    """Refused before any connection: runs without a server."""
    spec = spec.format(token=TOKEN)
    path = copy_store(small_store)
    before = (path / "store.json").read_text()
    with Store.open(path, writable=True) as st:
        with pytest.raises(ValueError, match="IMRET_MILVUS_TOKEN") as e:
            st.configure(backend=spec)
        assert SECRET not in str(e.value)
    assert (path / "store.json").read_text() == before
    with pytest.raises(ValueError, match="credentials"):
        Store.create(tmp_path / "new", tiny_model, backend=spec)
    assert not (tmp_path / "new").exists()
