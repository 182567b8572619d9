"""The Milvus backend against a real Milvus Lite engine (no mocks), checked against exact search."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install 'imret[milvus]')")

from imret.index import create_backend, load_backend  # noqa: E402
from imret.index.base import tie_aware_recall  # noqa: E402
from imret.index.exact import exact_search  # noqa: E402
from imret.index.milvus_backend import (  # noqa: E402
    LITE_INDEX_TYPES,
    MAX_TOPK,
    PARAMS,
    MilvusBackend,
    milvus_config,
)

N, D, Q = 2000, 32, 60


def clustered(n: int, d: int, seed: int, centres: int = 20) -> np.ndarray:
    """L2-normalised rows from a mixture of Gaussians, float32."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(N + Q, D, seed=0)
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(2**40, size=N, replace=False)).astype(np.int64)  # sparse, beyond int32
    return x[:N], ids, x[N:]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("milvus")


@pytest.fixture(scope="module")
def flat(root, data):
    x, ids, _ = data
    b = MilvusBackend(D, "./shared.db", {"index": "FLAT", "collection": "flat"}, root=root)
    b.add(x, ids)
    yield b
    b.close()


@pytest.fixture(scope="module")
def hnsw(root, data):
    x, ids, _ = data
    b = create_backend("milvus:./shared.db?collection=hnsw&index=HNSW&M=16&efConstruction=100&ef=32", D, root=root)
    b.add(x, ids)
    b.flush()  # Milvus Lite searches new rows by brute force until the collection is reloaded
    yield b
    b.close()


def small(root, name: str, index: str = "FLAT") -> MilvusBackend:
    """A fresh collection in the shared database, for tests that change it."""
    return MilvusBackend(D, "./shared.db", {"index": index, "collection": name}, root=root)


# -- search quality ---------------------------------------------------------------------------


def test_flat_equals_exact(flat, data):
    x, ids, q = data
    k = 10
    s, i = flat.search(q, k)
    es, ei = exact_search(q, x, k, ids=ids)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == i.shape == (Q, k)
    assert tie_aware_recall(q, x, ids, es, i, k) == 1.0
    np.testing.assert_allclose(s, es, atol=1e-5)
    assert (np.diff(s, axis=1) <= 0).all()


def test_hnsw_recall(hnsw, data):
    x, ids, q = data
    k = 20
    s, i = hnsw.search(q, k)
    es, _ = exact_search(q, x, k, ids=ids)
    assert tie_aware_recall(q, x, ids, es, i, k) >= 0.9
    assert np.isin(i, ids).all()
    info = hnsw.describe()
    assert info["index"] == "HNSW" and info["search_params"] == {"ef": 32} and info["ntotal"] == N
    # the returned scores are the true inner products of the returned rows
    rows = np.searchsorted(ids, i)
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, x[rows]), atol=1e-5)


def test_ids_preserved(flat, data):
    x, ids, _ = data
    s, i = flat.search(x[::100], 1)
    np.testing.assert_array_equal(i[:, 0], ids[::100])
    np.testing.assert_allclose(s[:, 0], 1.0, atol=1e-5)
    assert flat.ntotal == N
    np.testing.assert_array_equal(flat.vectors(ids[[5, 3, 5]]), x[[5, 3, 5]])


def test_vectors_unknown_id(flat, data):
    _, ids, _ = data
    missing = int(ids.max()) + 1
    with pytest.raises(KeyError, match=str(missing)):
        flat.vectors([ids[0], missing])


def test_k_above_ntotal_pads(root, data):
    x, ids, q = data
    with small(root, "pad") as b:
        b.add(x[:7], ids[:7])
        s, i = b.search(q[:3], 10)
        assert s.shape == i.shape == (3, 10)
        assert (i[:, 7:] == -1).all() and np.isneginf(s[:, 7:]).all()
        assert np.isfinite(s[:, :7]).all() and np.isin(i[:, :7], ids[:7]).all()
        es, ei = exact_search(q[:3], x[:7], 10, ids=ids[:7])
        np.testing.assert_array_equal(i, ei)


def test_search_arguments(flat, data):
    _, _, q = data
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            flat.search(q, k)
    with pytest.raises(ValueError, match=str(MAX_TOPK)):
        flat.search(q, MAX_TOPK + 1)
    with pytest.raises(ValueError, match="dimension"):
        flat.search(q[:, :5], 3)
    s, i = flat.search(np.zeros((0, D), np.float32), 4)
    assert s.shape == i.shape == (0, 4)


# -- writes -----------------------------------------------------------------------------------


def test_remove(root, data):
    x, ids, _ = data
    with small(root, "remove") as b:
        b.add(x[:300], ids[:300])
        gone = ids[:300:3]
        unknown = np.array([int(ids.max()) + 7])
        assert b.remove(np.concatenate([gone, gone[:5], unknown])) == gone.size
        assert b.ntotal == 300 - gone.size
        assert b.remove(gone) == 0
        s, i = b.search(x[:300:10], 300)
        assert not np.isin(i, gone).any()
        assert ((i >= 0).sum(axis=1) == 300 - gone.size).all()
        # a removed row of x[0] is not found even when queried with itself
        assert i[0, 0] != ids[0]


def test_add_existing_raises_and_replace_overwrites(root, data, monkeypatch):
    x, ids, _ = data
    with small(root, "replace") as b:
        b.add(x[:100], ids[:100])
        with pytest.raises(ValueError, match="already present.*replace=True"):
            b.add(x[90:110], ids[90:110])
        assert b.ntotal == 100
        # replaying rows after a crash: same vectors, no duplicates. Milvus Lite keeps the
        # last row of an id even on insert; a server keeps both, so replace must upsert.
        upserts = []
        upsert = b._client.upsert
        monkeypatch.setattr(b._client, "upsert", lambda *a, **kw: upserts.append(1) or upsert(*a, **kw))
        b.add(x[50:150], ids[50:150], replace=True)
        assert upserts
        assert b.ntotal == 150
        s, i = b.search(x[60:61], 5)
        assert i[0, 0] == ids[60] and i[0, 1] != ids[60]
        # overwriting a row with another vector
        b.add(x[500:501], ids[:1], replace=True)
        np.testing.assert_array_equal(b.vectors(ids[:1]), x[500:501])
        assert b.ntotal == 150
        assert b.search(x[500:501], 1)[1][0, 0] == ids[0]


def test_add_checks_input(flat, data):
    x, ids, _ = data
    with pytest.raises(ValueError, match="dimension"):
        flat.add(x[:2, :4], ids[:2])
    with pytest.raises(ValueError, match="distinct"):
        flat.add(x[:2], [1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        flat.add(x[:1], [-3])
    bad = x[:1].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        flat.add(bad, [1])
    assert flat.ntotal == N


# -- persistence ------------------------------------------------------------------------------


def test_lite_reloads_after_inserts_so_search_uses_the_index(tmp_path, data, monkeypatch):
    """Milvus Lite indexes rows only when a collection is loaded: flush/save reload it after
    inserts (and only then), so searches use the HNSW graph, as a reopened backend does."""
    x, ids, q = data
    store = tmp_path / "store"
    store.mkdir()
    spec = "milvus:./vectors.db?index=HNSW&ef=10"  # a small ef: the graph's answers differ from exact ones
    k = 10
    b = create_backend(spec, D, root=store)
    reloads = []
    release = b._client.release_collection
    monkeypatch.setattr(b._client, "release_collection", lambda *a, **kw: reloads.append(1) or release(*a, **kw))
    half = N // 2
    b.add(x[:half], ids[:half])
    b.save(tmp_path)
    assert len(reloads) == 1
    es, _ = exact_search(q, x[:half], k, ids=ids[:half])
    assert tie_aware_recall(q, x[:half], ids[:half], es, b.search(q, k)[1], k) >= 0.85
    b.add(x[half:], ids[half:])
    b.save(tmp_path)
    assert len(reloads) == 2
    b.save(tmp_path)  # nothing inserted since: no reload
    gone = ids[::7]
    b.remove(gone)
    b.flush()  # deleted rows need no reload either
    assert len(reloads) == 2
    keep = ~np.isin(ids, gone)
    s, i = b.search(q, k)
    es, _ = exact_search(q, x[keep], k, ids=ids[keep])
    assert tie_aware_recall(q, x[keep], ids[keep], es, i, k) >= 0.85
    assert not np.isin(i, gone).any()
    b.save(tmp_path)
    b.close()
    # a fresh engine loads the saved segments and their indexes: the very same answers
    with load_backend(spec, D, tmp_path, root=store) as again:
        s2, i2 = again.search(q, k)
    np.testing.assert_array_equal(i2, i)
    np.testing.assert_allclose(s2, s, atol=1e-6)


@pytest.mark.parametrize("index", ["FLAT", "HNSW"])
def test_save_close_load_same_results(tmp_path, data, index):
    x, ids, q = data
    store = tmp_path / "store"
    store.mkdir()
    spec = f"milvus:./vectors.db?index={index}&collection=kept"
    b = create_backend(spec, D, root=store)
    b.add(x, ids)
    gone = ids[::10]
    assert b.remove(gone) == gone.size
    before = b.search(q, 10)
    directory = tmp_path / "index"
    directory.mkdir()
    b.save(directory)
    meta = json.loads((directory / "milvus.json").read_text())
    assert meta["uri"] == str(store / "vectors.db") and meta["collection"] == "kept"
    assert meta["dim"] == D and meta["index"] == index and meta["ntotal"] == N - gone.size
    b.close()
    b.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        b.search(q, 1)
    # the engine was stopped with the last backend: this reads everything back from disk
    with load_backend(spec, D, directory, root=store) as again:
        assert again.ntotal == N - gone.size
        after = again.search(q, 10)
        assert not np.isin(after[1], gone).any()
        if index == "FLAT":
            np.testing.assert_array_equal(after[1], before[1])
            np.testing.assert_allclose(after[0], before[0], atol=1e-6)
        else:
            keep = np.setdiff1d(ids, gone)
            es, _ = exact_search(q, x[np.isin(ids, keep)], 10, ids=keep)
            assert tie_aware_recall(q, x[np.isin(ids, keep)], keep, es, after[1], 10) >= 0.9


def test_load_checks(root, flat, tmp_path):
    directory = tmp_path / "index"
    directory.mkdir()
    flat.save(directory)
    params = {"index": "FLAT", "collection": "flat"}
    with pytest.raises(ValueError, match="16-D"):
        MilvusBackend.load(directory, 16, "./shared.db", params, root=root)
    # the collection itself holds other vectors than the record says
    meta = json.loads((directory / "milvus.json").read_text())
    (directory / "milvus.json").write_text(json.dumps({**meta, "dim": 16}))
    with pytest.raises(ValueError, match=r"'flat' at .*shared\.db holds 32-D vectors, expected 16-D"):
        MilvusBackend.load(directory, 16, "./shared.db", params, root=root)
    (directory / "milvus.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has index FLAT, the spec asks for HNSW"):
        MilvusBackend.load(directory, D, "./shared.db", {**params, "index": "HNSW"}, root=root)
    with pytest.raises(ValueError, match="records collection 'flat', the spec names 'other'"):
        MilvusBackend.load(directory, D, "./shared.db", {**params, "collection": "other"}, root=root)
    (directory / "milvus.json").write_text(json.dumps({**meta, "collection": "nothing"}))
    with pytest.raises(ValueError, match="'nothing' at .* does not exist"):
        MilvusBackend.load(directory, D, "./shared.db", {**params, "collection": "nothing"}, root=root)
    with pytest.raises(FileNotFoundError):
        MilvusBackend.load(tmp_path / "empty", D, "./shared.db", params, root=root)
    (directory / "milvus.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="missing.db"):
        MilvusBackend.load(directory, D, "./missing.db", params, root=root)
    assert not (root / "missing.db").exists()


def test_close_releases_the_file(tmp_path, data):
    x, ids, _ = data
    db = tmp_path / "lock.db"
    opener = ("import sys\nfrom pymilvus import MilvusClient\n"
              "try:\n    c = MilvusClient(sys.argv[1])\nexcept Exception:\n    print('locked')\n"
              "else:\n    print(sorted(c.list_collections()))\n")

    def other_process() -> str:
        done = subprocess.run([sys.executable, "-c", opener, str(db)], capture_output=True, text=True, timeout=120)
        return done.stdout.strip()

    a = MilvusBackend(D, str(db), {"index": "FLAT"})
    b = MilvusBackend(D, str(db), {"index": "FLAT", "collection": "second"})  # same file, same process
    a.add(x[:10], ids[:10])
    a.close()
    assert b.ntotal == 0  # still served while another backend of this process uses the file
    assert other_process() == "locked"
    b.close()
    assert other_process() == "['imret', 'second']"
    # and this process can open it again
    with MilvusBackend(D, str(db), {"index": "FLAT", "collection": "third"}) as c:
        assert c.ntotal == 0


# -- spec strings and construction ------------------------------------------------------------


def test_relative_path_resolves_against_root(tmp_path, monkeypatch, data):
    x, ids, _ = data
    store = tmp_path / "store"
    store.mkdir()
    with create_backend("milvus:./sub.db?index=FLAT", D, root=store) as b:
        b.add(x[:3], ids[:3])
        assert b.describe()["uri"] == str(store / "sub.db")
        assert b.spec == "milvus:./sub.db?index=FLAT"
    assert (store / "sub.db").is_dir()
    monkeypatch.chdir(tmp_path)
    assert milvus_config("./cwd.db").uri == str(tmp_path / "cwd.db")
    assert milvus_config("/abs/x.db", root=store).uri == "/abs/x.db"


def test_create_replaces_an_imret_collection_only(root, data):
    x, ids, _ = data
    with small(root, "recreate") as b:
        b.add(x[:20], ids[:20])
    with small(root, "recreate", index="HNSW") as b:  # a rebuild starts empty, with the new index
        assert b.ntotal == 0 and b.describe()["index"] == "HNSW"
    from pymilvus import MilvusClient

    client = MilvusClient(str(root / "shared.db"))
    try:
        client.create_collection("foreign", dimension=D)
    finally:
        client.close()
    with pytest.raises(ValueError, match="'foreign' .* not made by imret"):
        small(root, "foreign")


@pytest.mark.parametrize("target, params, match", [
    ("./x.db", {"bogus": "1"}, "unknown milvus parameter.*valid: collection, index"),
    ("./x.db", {"index": "DISKANN"}, "not supported by Milvus Lite; available: FLAT, HNSW"),
    ("http://h:19530", {"index": "NOPE"}, "not supported by the milvus backend; available:"),
    ("./x.db", {"M": "0"}, "M must be a positive integer"),
    ("./x.db", {"ef": "many"}, "ef must be a positive integer"),
    ("./x.db", {"nlist": "64"}, "nlist does not apply to index HNSW; it takes M, efConstruction, ef"),
    ("./x.db", {"index": "FLAT", "ef": "8"}, "ef does not apply to index FLAT"),
    ("./x.db", {"collection": "9lives"}, "collection name"),
    ("./x.db", {"collection": "a-b"}, "collection name"),
    ("./vectors", {}, "must be a path ending in '.db'"),
    ("ftp://h/x.db", {}, "scheme 'ftp'"),
    ("", {}, "needs a target"),
    ("http://h:19530", {"consistency": "Eventually"}, "consistency must be one of Session, Strong"),
])
def test_bad_specs(target, params, match):
    with pytest.raises(ValueError, match=match):
        milvus_config(target, params)
    with pytest.raises(ValueError, match=match):
        MilvusBackend(D, target, params)


def test_config_defaults_and_secrets():
    cfg = milvus_config("./x.db")
    assert cfg.lite and cfg.collection == "imret" and cfg.index_type == "HNSW"
    assert cfg.index_params == {"M": 16, "efConstruction": 200} and cfg.search_params == {"ef": 128}
    ivf = milvus_config("./x.db", {"index": "ivf_flat", "nprobe": "4"})
    assert ivf.index_type == "IVF_FLAT"
    assert ivf.index_params == {"nlist": 128} and ivf.search_params == {"nprobe": 4}
    assert set(LITE_INDEX_TYPES) == {"FLAT", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "AUTOINDEX"}
    assert set(PARAMS) == {"collection", "index", "M", "efConstruction", "ef", "nlist", "nprobe", "token",
                           "db_name", "consistency"}
    assert cfg.consistency == "Strong" and milvus_config("./x.db", {"consistency": "Session"}).consistency == "Session"
    assert milvus_config("http://h:19530").consistency == "Session"
    server = milvus_config("https://milvus.example:19530", {"token": "s3cret", "db_name": "prod"})
    assert not server.lite and server.token == "s3cret" and server.db_name == "prod"
    assert "s3cret" not in server.spec and "s3cret" not in repr(server)
    # user:password in the URI becomes the token (percent-escapes undone), out of the URI and spec
    in_uri = milvus_config("https://alice:p%40w@milvus.example:19530")
    assert in_uri.token == "alice:p@w" and in_uri.uri == in_uri.safe_uri == "https://milvus.example:19530"
    assert "alice" not in in_uri.spec + repr(in_uri)
    with pytest.raises(ValueError, match="both in the URI and in the token"):
        milvus_config("https://alice:pw@milvus.example:19530", {"token": "s3cret"})


def test_missing_pymilvus_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(ImportError, match=r"pip install 'imret\[milvus\]'"):
        MilvusBackend(D, "./x.db", root=tmp_path)


def test_import_is_lazy():
    code = "import sys, imret.index.milvus_backend\nprint('pymilvus' in sys.modules, 'milvus_lite' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False False", done.stderr
