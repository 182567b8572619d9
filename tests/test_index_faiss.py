"""FAISS backend: every index checked against exact search with the tie-aware recall."""

import importlib.util
import sys

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from imret.index import create_backend, exact_search, load_backend, parse_spec, tie_aware_recall  # noqa: E402
from imret.index import faiss_backend  # noqa: E402
from imret.index.faiss_backend import FaissBackend, default_ann_spec  # noqa: E402

DIM = 32
N = 3000
K = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # OpenMP spin-waits badly on a shared 2-core machine; one thread is faster here
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(old)


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _mixture(rng, n, centres, spread=0.6):
    return _unit(centres[rng.integers(0, len(centres), n)] + spread * rng.normal(size=(n, centres.shape[1])))


@pytest.fixture(scope="module")
def data():
    """Seeded clustered unit rows, non-contiguous ids, queries from the same mixture, exact top-k."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(30, DIM))
    x = _mixture(rng, N, centres)
    q = _mixture(rng, 60, centres)
    ids = np.sort(rng.choice(10**9, N, replace=False)).astype(np.int64)
    rng.shuffle(ids)
    es, ei = exact_search(q, x, K, ids=ids)
    return x, ids, q, es, ei


def _build(spec, x, ids):
    s = parse_spec(spec)
    b = FaissBackend(DIM, s.target, s.params)
    b.train(x)
    b.add(x, ids)
    return b


def _recall(data, result_ids):
    x, ids, q, es, _ = data
    return tie_aware_recall(q, x, ids, es, result_ids, K)


@pytest.mark.parametrize(
    "spec, at_least",
    [
        ("faiss:Flat", 1.0),
        ("faiss:HNSW32", 0.9),
        ("faiss:IVF64,Flat?nprobe=64", 1.0),
        ("faiss:IVF64,Flat?nprobe=8", 0.8),
        ("faiss:IVF64,PQ8x8,RFlat?nprobe=64&k_factor=16", 0.9),
        ("faiss:IVF64,SQ8?nprobe=16", 0.9),
    ],
)
def test_recall_against_exact(data, spec, at_least):
    x, ids, q, es, _ = data
    b = _build(spec, x, ids)
    assert b.ntotal == N and b.is_trained
    scores, got = b.search(q, K)
    assert scores.dtype == np.float32 and got.dtype == np.int64 and got.shape == (len(q), K)
    assert np.isin(got, ids).all()  # the caller's ids, not row numbers
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # decreasing
    assert _recall(data, got) >= at_least


def test_flat_equals_exact(data):
    x, ids, q, es, ei = data
    scores, got = _build("faiss:Flat", x, ids).search(q, K)
    np.testing.assert_allclose(scores, es, atol=1e-5)
    # the same ids wherever the exact score is not tied with a neighbour
    gaps = np.diff(es, axis=1)
    alone = np.ones_like(es, dtype=bool)
    alone[:, 1:] &= gaps < -1e-5
    alone[:, :-1] &= gaps < -1e-5
    assert np.array_equal(got[alone], ei[alone])
    assert _recall(data, got) == 1.0


def test_refine_beats_pq_alone(data):
    x, ids, q, _, _ = data
    plain = _recall(data, _build("faiss:IVF64,PQ8x8?nprobe=64", x, ids).search(q, K)[1])
    refined = _recall(data, _build("faiss:IVF64,PQ8x8,RFlat?nprobe=64&k_factor=16", x, ids).search(q, K)[1])
    assert refined > plain
    assert refined >= 0.9


def test_ties_accept_either_equal_row():
    rng = np.random.default_rng(3)
    x = _unit(rng.normal(size=(50, DIM)))
    x[20] = x[10]  # two equal rows under different ids
    ids = np.arange(50, dtype=np.int64) * 3 + 5
    q = x[10:11] + 0.0
    es, ei = exact_search(q, x, 1, ids=ids)
    assert ei[0, 0] in (ids[10], ids[20])
    for either in (ids[10], ids[20]):
        assert tie_aware_recall(q, x, ids, es, np.array([[either]]), 1) == 1.0
    assert tie_aware_recall(q, x, ids, es, np.array([[ids[11]]]), 1) == 0.0
    for spec in ("faiss:Flat", "faiss:HNSW32"):
        b = FaissBackend(DIM, *_target_params(spec))
        b.add(x, ids)
        s, got = b.search(q, 2)
        assert set(got[0]) == {ids[10], ids[20]}
        assert tie_aware_recall(q, x, ids, es, got[:, :1], 1) == 1.0


def _target_params(spec):
    s = parse_spec(spec)
    return s.target, s.params


@pytest.mark.parametrize("spec", ["faiss:Flat", "faiss:HNSW32", "faiss:IVF64,Flat?nprobe=64",
                                  "faiss:IVF64,PQ8x8,RFlat?nprobe=64&k_factor=16"])
def test_remove(data, spec):
    x, ids, q, es, ei = data
    b = _build(spec, x, ids)
    gone = np.unique(ei[:, :3])  # the best hits of every query
    assert b.remove(np.concatenate([gone, [123, 456]])) == gone.size  # unknown ids are ignored
    assert b.ntotal == N - gone.size
    assert b.remove(gone) == 0
    scores, got = b.search(q, K)
    assert not np.isin(got, gone).any()
    assert (got >= 0).all() and np.isfinite(scores).all()
    alive = ~np.isin(ids, gone)
    es2, _ = exact_search(q, x, K, ids=ids, alive=alive)
    assert tie_aware_recall(q, x[alive], ids[alive], es2, got, K) >= (0.9 if "HNSW" in spec else 0.99)
    if not b.supports_remove:  # a tombstone index
        assert b.tombstones == gone.size
    b.add(x[np.isin(ids, gone)], ids[np.isin(ids, gone)])  # removed ids may come back
    assert b.ntotal == N
    assert _recall(data, b.search(q, K)[1]) >= 0.9


def test_hnsw_uses_tombstones(data):
    x, ids, q, _, ei = data
    b = _build("faiss:HNSW32", x, ids)
    assert b.supports_remove is False
    assert b.remove(ei[:, 0]) == np.unique(ei[:, 0]).size
    assert b.describe()["tombstones"] == np.unique(ei[:, 0]).size
    # asking for every row: only live ones come back, the rest is padding
    scores, got = b.search(q[:3], N + 5)
    for row, srow in zip(got, scores):
        live = row[row >= 0]
        assert not np.isin(live, ei[:, 0]).any()
        assert np.unique(live).size == live.size
        assert np.isneginf(srow[row < 0]).all()


@pytest.mark.parametrize("spec", ["faiss:HNSW32?efSearch=64", "faiss:IVF64,SQ8?nprobe=16",
                                  "faiss:IVF64,PQ8x8,RFlat?nprobe=64&k_factor=16"])
def test_save_load_round_trip(data, tmp_path, spec):
    x, ids, q, _, ei = data
    b = _build(spec, x, ids)
    b.remove(ei[:5, 0])
    b.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"index.faiss", "faiss.json"}
    s = parse_spec(spec)
    loaded = load_backend(spec, DIM, tmp_path)
    assert isinstance(loaded, FaissBackend) and loaded.spec == b.spec
    assert loaded.ntotal == b.ntotal and loaded.tombstones == b.tombstones
    for a, c in zip(b.search(q, K), loaded.search(q, K)):
        assert np.array_equal(a, c)
    with pytest.raises(ValueError, match="already present"):
        loaded.add(x[-1:], ids[-1:])
    # search parameters may change at load time
    other = {"efSearch": "200"} if "HNSW" in spec else dict(s.params, nprobe="64")
    assert FaissBackend.load(tmp_path, DIM, s.target, other).search(q, K)[1].shape == (len(q), K)


def test_load_checks_dim_factory_and_files(data, tmp_path):
    x, ids, _, _, _ = data
    _build("faiss:IVF64,Flat?nprobe=8", x, ids).save(tmp_path)
    with pytest.raises(ValueError, match="32-D"):
        FaissBackend.load(tmp_path, 64, "IVF64,Flat", {})
    with pytest.raises(ValueError, match="IVF64,Flat"):
        FaissBackend.load(tmp_path, DIM, "HNSW32", {})
    path = tmp_path / "index.faiss"
    blob = path.read_bytes()
    for cut in (0, 40, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="index.faiss"):
            FaissBackend.load(tmp_path, DIM, "IVF64,Flat", {"nprobe": "8"})
    (tmp_path / "faiss.json").write_text("{not json")
    with pytest.raises(ValueError, match="faiss.json"):
        FaissBackend.load(tmp_path, DIM, "IVF64,Flat", {})
    path.unlink()
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        FaissBackend.load(tmp_path, DIM, "IVF64,Flat", {})


def test_training_rules(data):
    x, ids, _, _, _ = data
    b = FaissBackend(DIM, "IVF64,PQ8x8")
    assert not b.is_trained
    assert b.min_train_size == 39 * 256  # the PQ codebooks (256 centroids) need the most rows
    with pytest.raises(RuntimeError, match=r"train\(\) first with 9984 rows"):
        b.add(x[:10], ids[:10])
    with pytest.raises(ValueError, match="at least 256 training rows"):
        b.train(x[:100])
    assert FaissBackend(DIM, "IVF64,Flat").min_train_size == 39 * 64
    assert FaissBackend(DIM, "HNSW32").min_train_size == 0
    assert FaissBackend(DIM, "Flat").is_trained


def test_bad_specs():
    with pytest.raises(ValueError, match="nprobe, efSearch, efConstruction, k_factor"):
        FaissBackend(DIM, "IVF64,Flat", {"nprobes": "8"})
    with pytest.raises(ValueError, match="parameters for it: efSearch, efConstruction"):
        FaissBackend(DIM, "HNSW32", {"nprobe": "8"})
    with pytest.raises(ValueError, match="positive integer"):
        FaissBackend(DIM, "IVF64,Flat", {"nprobe": "many"})
    with pytest.raises(ValueError, match=">= 1"):
        FaissBackend(DIM, "IVF64,PQ8,RFlat", {"k_factor": "0.5"})
    with pytest.raises(ValueError, match="NotAnIndex"):
        FaissBackend(DIM, "NotAnIndex")
    with pytest.raises(ValueError, match="dim"):
        FaissBackend(0, "Flat")


def test_spec_is_canonical():
    b = FaissBackend(DIM, "IVF64,PQ8x8,RFlat", {"k_factor": "16.0", "nprobe": 32})
    assert b.spec == "faiss:IVF64,PQ8x8,RFlat?nprobe=32&k_factor=16"
    s = parse_spec(b.spec)
    assert FaissBackend(DIM, s.target, s.params).spec == b.spec
    assert create_backend(b.spec, DIM).spec == b.spec
    info = b.describe()
    assert info["nlist"] == 64 and info["nprobe"] == 32 and info["k_factor"] == 16.0
    assert info["is_trained"] is False and info["index_bytes"] > 0
    info = FaissBackend(DIM, "HNSW16", {"efConstruction": "80", "efSearch": "50"}).describe()
    assert (info["efConstruction"], info["efSearch"], info["min_train_size"]) == (80, 50, 0)
    FaissBackend(DIM, "IVF64_HNSW32,Flat", {"efSearch": "40"})  # efSearch of the HNSW quantiser


def test_duplicates_padding_and_empty(data):
    x, ids, q, _, _ = data
    b = FaissBackend(DIM, "Flat")
    s, i = b.search(q[:2], 3)  # empty index
    assert (i == -1).all() and np.isneginf(s).all()
    b.add(x[:5], ids[:5])
    with pytest.raises(ValueError, match="already present"):
        b.add(x[5:7], np.array([ids[5], ids[0]]))
    assert b.ntotal == 5
    with pytest.raises(ValueError, match="dimension"):
        b.add(x[:2, :16], ids[10:12])
    s, i = b.search(q[:2], 8)
    assert s.shape == (2, 8) and i.shape == (2, 8)
    assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all()
    assert np.isin(i[:, :5], ids[:5]).all() and np.isfinite(s[:, :5]).all()
    assert b.search(q[:0], 4)[1].shape == (0, 4)
    with pytest.raises(ValueError, match="k must be"):
        b.search(q, 0)


def test_default_ann_spec():
    assert default_ann_spec(100) == "faiss:HNSW32?efSearch=128"
    assert default_ann_spec(10_000) == "faiss:IVF256,SQ8?nprobe=64"
    assert default_ann_spec(1_000_000) == "faiss:IVF4096,SQ8?nprobe=64"  # the measured setting
    assert default_ann_spec(1_000_000, nprobe="64").endswith("?nprobe=64")
    assert default_ann_spec(100, nprobe="64", efSearch="256") == "faiss:HNSW32?efSearch=256"
    for n in (0, 100, 10_000, 1_000_000, 10**10):
        s = parse_spec(default_ann_spec(n))
        assert s.kind == "faiss"
        nlist = int(s.target[3:].split(",")[0]) if s.target.startswith("IVF") else 0
        assert nlist == 0 or (16 <= nlist <= 65536 and 39 * nlist <= max(n, 39 * 16))
        FaissBackend(DIM, s.target, s.params)  # builds
    with pytest.raises(ValueError, match="nprobe, efSearch"):
        default_ann_spec(100, nlist="8")


@pytest.mark.parametrize("n", [500, 10_000])
def test_ann_end_to_end(n):
    rng = np.random.default_rng(n)
    centres = rng.normal(size=(40, DIM))
    x = _mixture(rng, n, centres)
    q = _mixture(rng, 30, centres)
    ids = np.arange(n, dtype=np.int64) + 10
    b = create_backend("ann", DIM, n_hint=n)
    assert b.spec == default_ann_spec(n)
    if not b.is_trained:
        assert b.min_train_size <= n
        b.train(x)
    b.add(x, ids)
    es, _ = exact_search(q, x, K, ids=ids)
    assert tie_aware_recall(q, x, ids, es, b.search(q, K)[1], K) >= 0.9


def test_faiss_is_imported_lazily(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    # a fresh copy of the module executes without FAISS ...
    spec = importlib.util.spec_from_file_location("imret.index._faiss_copy", faiss_backend.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.default_ann_spec(100).startswith("faiss:")
    # ... and building an index names the extra to install
    with pytest.raises(ImportError, match=r"imret\[faiss\]"):
        module.FaissBackend(DIM, "Flat")
    with pytest.raises(ImportError, match=r"imret\[faiss\]"):
        FaissBackend(DIM, "Flat")
