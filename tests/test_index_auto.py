"""The ``auto`` backend: an index tuned on the collection for a recall@k target.

Recall is checked on queries that are not in the collection (fresh draws from the same
Gaussian mixture) against a brute-force reference; the tuning's own recall measurement
against brute-force loops; the record through the store (reopen, growth, hostile edits).
"""

import dataclasses
import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from imret.index import check_spec, create_backend, exact_search, parse_spec, tie_aware_recall  # noqa: E402
from imret.index import tuning  # noqa: E402
from imret.index.tuning import AutoTarget, TuningRecord, auto_target, candidates, measure_recall, tune  # noqa: E402

DIM = 32
N = 20_000
# the rules scaled down to test-sized data: IVF from 4096 cells on, probing up to half the lists
SMALL = dataclasses.replace(tuning.DEFAULT_POLICY, exact_max_cells=4096,
                            probe_fraction=(("PQ", 0.5), ("SQ8", 0.5), ("Flat", 0.5)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # OpenMP spin-waits badly on a shared 2-core machine; one thread is faster here
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(old)


def mixture(n: int, stream: int, *, components: int = 100, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Seeded L2-normalised rows of a Gaussian mixture with a power-law spectrum; ``stream``
    picks independent draws from the same distribution (collection, fresh queries)."""
    rs = np.random.default_rng([seed, 99])
    sd = np.sqrt(1.0 / np.arange(1, dim + 1))
    sd /= np.linalg.norm(sd)
    means = rs.standard_normal((components, dim)) * sd
    r = np.random.default_rng([seed, stream])
    x = means[r.integers(components, size=n)] + r.standard_normal((n, dim)) * sd
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_recall(q, x, found, k, alive=None):
    """Mean recall@k from all similarities: a found row is a hit when it is searchable and its
    similarity is at least the true k-th best among the searchable rows (ties count), each row
    once."""
    alive = np.ones(len(x), bool) if alive is None else alive
    rows = np.flatnonzero(alive)
    all_sims = q.astype(np.float64) @ x[rows].astype(np.float64).T
    out = []
    for qi in range(len(q)):
        sims = all_sims[qi]
        want = min(k, len(rows))
        if want == 0:
            out.append(1.0)
            continue
        kth = np.sort(sims)[::-1][want - 1]
        good = set(rows[sims >= kth - 1e-5].tolist())
        hits = {int(j) for j in found[qi, :k] if j >= 0} & good
        out.append(len(hits) / want)
    return np.array(out)


@pytest.fixture(scope="module")
def collection():
    return mixture(N, stream=0)


@pytest.fixture(scope="module")
def fresh():
    return mixture(400, stream=1)  # not in the collection, same distribution


@pytest.fixture(scope="module")
def tuned(collection):
    """The collection tuned for two targets (built once: each takes a few seconds)."""
    return {r: tune(collection, None, AutoTarget(recall=r, k=10), policy=SMALL) for r in (0.9, 0.99)}


# -- specs -------------------------------------------------------------------------------------

def test_spec_parses_with_defaults_and_typed_values():
    s = parse_spec("auto?recall=0.9&k=20")
    assert s.kind == "auto" and s.params == {"recall": "0.9", "k": "20"}
    assert auto_target(s.params) == AutoTarget(recall=0.9, k=20, sample=1000, seed=0)
    assert auto_target(parse_spec("auto").params) == AutoTarget()
    assert check_spec("auto?recall=1&seed=7&sample=500").kind == "auto"


@pytest.mark.parametrize("spec, message", [
    ("auto?recall=1.5", r"recall='1.5' must be a number in \(0, 1\]"),
    ("auto?recall=0", r"recall='0' must be a number in \(0, 1\]"),
    ("auto?recall=nan", r"recall='nan' must be a number in \(0, 1\]"),
    ("auto?k=0", r"k='0' must be an integer in \[1, 10000\]"),
    ("auto?k=2.5", r"k='2.5' must be an integer in \[1, 10000\]"),
    ("auto?sample=5", r"sample='5' must be an integer in \[10, 100000\]"),
    ("auto?seed=-1", r"seed='-1' must be an integer in \[0, 4294967295\]"),
    ("auto?recal=0.9", r"unknown 'auto' parameter\(s\) 'recal'; valid: recall \(.*\); k .*; sample .*; seed"),
    ("auto:IVF", r"backend 'auto' takes no target"),
])
def test_bad_specs_name_the_value_and_the_valid_range(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)
    with pytest.raises(ValueError, match=message):
        check_spec(spec)


def test_auto_cannot_be_created_without_the_vectors():
    with pytest.raises(ValueError, match="chosen from the collection's vectors"):
        create_backend("auto", DIM)


# -- pure parts --------------------------------------------------------------------------------

def test_measure_recall_matches_brute_force_with_ties_and_padding():
    rng = np.random.default_rng(3)
    x = mixture(300, stream=5, components=5, dim=8)
    x[50:60] = x[40]  # exact duplicates: ties at every rank
    alive = rng.random(300) > 0.2
    q = np.concatenate([x[40:41], mixture(30, stream=6, components=5, dim=8)])
    for k in (1, 7, 400):  # 400 > live rows: exact pads with -inf / -1
        es, ei = exact_search(q, x, k, alive=alive)
        # an "approximate" result: the exact one with holes, swaps for other rows and -1s
        found = ei.copy()
        cut = rng.random(found.shape) < 0.3
        found[cut] = rng.integers(0, 300, size=int(cut.sum()))
        if k > 1:
            found[:, -1:] = -1
        got = measure_recall(q, x, es, found, k, alive=alive)
        np.testing.assert_allclose(got, brute_recall(q, x, found, k, alive), atol=1e-12)
        assert 0 < got.mean() < 1
        # ids = row numbers: the same as tie_aware_recall over the live rows
        live = np.flatnonzero(alive)
        assert got.mean() == pytest.approx(tie_aware_recall(q, x[live], live, es, found, k))
    np.testing.assert_array_equal(measure_recall(q, x, es, ei, 400, alive=alive), 1.0)


def test_recall_lower_bound_closed_form():
    r = np.array([1.0, 0.5, 1.0, 0.0])
    assert tuning.recall_lower_bound(r, 2.0) == pytest.approx(0.625 - 2.0 * np.std(r, ddof=1) / 2)
    assert tuning.recall_lower_bound(np.ones(10), 1.645) == 1.0
    assert tuning.recall_lower_bound(np.array([0.7]), 1.645) == 0.7


def test_candidates_follow_size_and_dim():
    assert candidates(30_000, 512) == [tuning.Candidate("exact")]  # 15.4M cells <= 2^24
    c = candidates(100_000, 512)
    assert [x.factory for x in c] == ["IVF1024,SQ8", "IVF1024,Flat", "exact"]
    assert c[0].values == (1, 2, 4, 8, 16, 32, 64, 128) and c[1].values[-1] == 64  # 1/8, 1/16 of nlist
    assert [x.factory for x in candidates(1_000_000, 512)][:2] == ["IVF4096,SQ8", "IVF4096,Flat"]
    big = candidates(20_000_000, 512)  # SQ8 codes would take 10 GB: PQ first
    assert [x.factory for x in big] == ["IVF16384,PQ128x8", "IVF16384,SQ8", "IVF16384,Flat", "exact"]
    assert candidates(50_000_000, 100)[0].factory == "IVF32768,PQ25x8"  # sub-quantisers divide D
    assert candidates(20_000_000, 100)[0].factory == "IVF16384,SQ8"  # 2e9 cells: SQ8 codes fit 4 GiB
    assert candidates(200_000, 16)[0].factory == "exact"  # 3.2M cells
    for n in (40_000, 100_000, 3_000_000):
        nlist = tuning.ivf_nlist(n)
        assert nlist & (nlist - 1) == 0 and 39 * nlist <= n


def test_holdout_split_is_disjoint_seeded_and_capped():
    live = np.flatnonzero(np.arange(5000) % 7 != 3)
    q, rest = tuning.split_holdout(live, 1000, seed=4)
    assert q.size == live.size // 10 and np.intersect1d(q, rest).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([q, rest])), live)
    np.testing.assert_array_equal(q, tuning.split_holdout(live, 1000, seed=4)[0])
    assert not np.array_equal(q, tuning.split_holdout(live, 1000, seed=5)[0])


# -- tuning ------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.9, 0.99])
def test_auto_meets_its_target_on_queries_outside_the_collection(tuned, collection, fresh, target):
    t = tuned[target]
    rec = t.record
    assert rec.spec.startswith("faiss:IVF") and t.backend.spec == rec.spec  # an index, not exact
    assert rec.recall_lower >= target and rec.n == N and rec.sample == 1000 and rec.k == 10
    assert t.backend.ntotal == N  # the held-out rows went back in
    _, found = t.backend.search(fresh, 10)
    r = brute_recall(fresh, collection, found, 10).mean()
    assert r >= target, (rec.spec, r)
    # the fastest setting that meets it: each cheaper setting of the chosen index fell short
    same = [m for m in rec.tried if m.spec.split("?")[0] == rec.spec.split("?")[0]]
    assert same[-1].spec == rec.spec and all(m.recall_lower < target for m in same[:-1])
    assert [int(m.spec.split("nprobe=")[1]) for m in same] == [2 ** i for i in range(len(same))]


def test_a_higher_target_costs_more_probes(tuned):
    lo, hi = (int(tuned[r].record.params["nprobe"]) for r in (0.9, 0.99))
    assert hi > lo


def test_self_matches_do_not_inflate_the_measured_recall():
    # no structure: a row's nearest neighbour is rarely in its own list, unless it is the row itself
    x = np.random.default_rng(1).standard_normal((N, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = tune(x, None, AutoTarget(recall=0.5, k=1, sample=500), policy=SMALL)
    first = t.record.tried[0]
    assert first.spec.endswith("nprobe=1") and first.recall < 0.6  # self-matches would give 1.0
    # the same setting on fresh queries agrees with what was measured on the held-out rows
    q = np.random.default_rng(2).standard_normal((500, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t.backend.set_params({"nprobe": 1})
    _, found = t.backend.search(q, 1)
    assert abs(brute_recall(q, x, found, 1).mean() - first.recall) < 0.08
    # the held-out rows are in the final index: each finds itself
    qi = tuning.split_holdout(np.arange(N), 500, 0)[0]
    t.backend.set_params({"nprobe": 64})
    np.testing.assert_array_equal(t.backend.search(x[qi], 1)[1][:, 0], qi)


def test_tuning_is_deterministic_given_the_seed(tuned, collection):
    again = tune(collection, None, AutoTarget(recall=0.9, k=10), policy=SMALL)

    def stable(rec):
        d = rec.to_dict()
        for key in ("qps", "exact_qps", "tuning_s", "build_s"):
            d.pop(key)
        d["tried"] = [(m["spec"], m["recall"], m["recall_lower"]) for m in d["tried"]]
        return d

    assert stable(again.record) == stable(tuned[0.9].record)
    q = collection[:50]
    np.testing.assert_array_equal(again.backend.search(q, 10)[1], tuned[0.9].backend.search(q, 10)[1])


def test_small_collections_get_exact_search():
    x = mixture(500, stream=3)
    t = tune(x, None, AutoTarget(recall=0.99, k=10))
    assert t.backend is None and t.record.spec == "exact" and t.record.recall == 1.0
    assert "fast enough" in t.record.reason and t.record.n == 500 and t.record.qps > 0
    # removed rows are not counted
    alive = np.arange(500) % 2 == 0
    assert tune(x, alive, AutoTarget(k=10)).record.n == 250


def test_unreachable_target_falls_back_to_exact(collection):
    strict = dataclasses.replace(SMALL, probe_fraction=(("PQ", 1 / 64), ("SQ8", 1 / 64), ("Flat", 1 / 64)))
    t = tune(collection, None, AutoTarget(recall=0.999, k=10), policy=strict)
    assert t.backend is None and t.record.spec == "exact"
    # SQ8 fell far short at Flat's largest nprobe: Flat, which only removes SQ8's error, is not built
    assert {m.spec.split("?")[0] for m in t.record.tried} == {"faiss:IVF256,SQ8"}
    assert "no IVF setting" in t.record.reason and "IVF256,Flat not built" in t.record.reason
    always = dataclasses.replace(strict, flat_gain=1.0)
    t = tune(collection, None, AutoTarget(recall=0.999, k=10), policy=always)
    assert t.backend is None and {m.spec.split("?")[0] for m in t.record.tried} == {"faiss:IVF256,SQ8",
                                                                                   "faiss:IVF256,Flat"}


def test_flat_is_tried_only_where_it_can_close_the_gap():
    flat = tuning.Candidate("IVF64,Flat", "nprobe", (1, 2, 4))
    sq8 = [tuning.Measurement(f"faiss:IVF64,SQ8?nprobe={p}", r, r - 0.01, 1.0) for p, r in ((1, 0.5), (4, 0.95))]
    assert tuning.flat_can_help(sq8, flat, 0.97) and tuning.flat_can_help(sq8, flat, 0.98)
    assert not tuning.flat_can_help(sq8, flat, 0.985)  # 0.95 < 0.985 - 0.03
    assert tuning.flat_can_help([], flat, 0.999)  # SQ8 not tried (or not at that nprobe)


# -- the record --------------------------------------------------------------------------------

def test_record_round_trips_and_rejects_bad_values(tuned):
    d = json.loads(json.dumps(tuned[0.9].record.to_dict()))
    assert TuningRecord.from_dict(d).to_dict() == d
    assert d["type"] == "IVF256,SQ8" and set(d["params"]) == {"nprobe"}
    bad = [
        ({"target_recall": 1.5}, r"backend.tuning.target_recall must be a number in \(0, 1\], got 1.5"),
        ({"k": 0}, r"backend.tuning.k must be an integer in \[1, 10000\], got 0"),
        ({"n": -1}, r"backend.tuning.n must be an integer in \[0, "),
        ({"qps": float("inf")}, r"backend.tuning.qps must be a number"),
        ({"build_s": -1}, r"backend.tuning.build_s must be a number in \[0, "),
        ({"recall": "0.9"}, r"backend.tuning.recall must be a number in \[0, 1\], got '0.9'"),
        ({"sample": 10**6}, r"backend.tuning.sample must be an integer in \[0, 100000\]"),
        ({"sample": 30_000}, r"sample \(30000\) exceeds backend.tuning.n"),
        ({"spec": "milvus:./x.db"}, r"must be an exact or faiss: spec"),
        ({"params": {"nprobe": "1"}}, r"do not match backend.tuning.spec"),
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"tried": [{"spec": "exact"}]}, r"tried\[0\] must be an object with spec, recall"),
        ({"reason": "a\x1b[2J"}, r"reason must be printable"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            TuningRecord.from_dict({**d, **change})
    with pytest.raises(ValueError, match="missing keys"):
        TuningRecord.from_dict({k: v for k, v in d.items() if k != "seed"})
    assert tuning.retune_due(d, 2 * N - 1) is False and tuning.retune_due(d, 2 * N) is True
    assert tuning.retune_due(None, 5) is True


# -- through the store -------------------------------------------------------------------------

@pytest.fixture
def tiny_policy(monkeypatch):
    """Rules scaled down to a store of a few dozen photos: IVF from 1000 cells, 4 rows per list."""
    pol = dataclasses.replace(SMALL, exact_max_cells=1000, nlist_range=(2, 65536), points_per_list=4,
                              probe_fraction=(("PQ", 1.0), ("SQ8", 1.0), ("Flat", 1.0)))
    monkeypatch.setattr(tuning, "DEFAULT_POLICY", pol)
    return pol


def test_store_records_the_choice_keeps_it_on_reopen_and_retunes_on_growth(tmp_path, tiny_model, make_photos,
                                                                          tiny_policy, capsys):
    from imret.cli import main
    from imret.index.store import Preprocessing, Store

    files = make_photos(n_classes=9, per_class=9, size=(64, 48), seed=3)
    path = tmp_path / "s"
    with Store.create(path, tiny_model, preprocessing=Preprocessing(image_size=48),
                      backend="auto?recall=0.9&k=5") as st:
        st.add(files[:20], workers=0)
        info = st.info()["backend"]
        t = info["tuning"]
        assert info["requested"] == "auto?recall=0.9&k=5" and t["n"] == 20 and t["k"] == 5
        assert t["spec"] == info["spec"] == info["searching_with"] and t["type"].startswith("IVF")
        assert t["recall_lower"] >= 0.9 and t["sample"] == 2
        x = np.asarray(st.vectors()).copy()
        first = t
    saved = json.loads((path / "store.json").read_text())["backend"]["tuning"]
    assert saved == first
    with Store.open(path, writable=True) as st:  # reopened: same choice, no tuning on open
        assert st.info()["backend"]["tuning"] == first
        s, i = st.search_vectors(x[:3], 5)
        assert (i[:, 0] == np.arange(3)).all()
        st.add(files[20:39], workers=0)  # 39 rows < 2 x 20: kept
        assert st.info()["backend"]["tuning"] == first
        st.add(files[39:40], workers=0)  # 40 rows >= 2 x 20: tuned again
        t2 = st.info()["backend"]["tuning"]
        assert t2["n"] == 40 and t2["sample"] == 4 and st.info()["backend"]["spec"] == t2["spec"]
    assert main(["index", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"tuned      for recall@5 >= 0.9 (auto?recall=0.9&k=5): {t2['type']}" in out
    assert "held-out rows" in out and "tuned at 40 rows" in out


def test_store_json_tuning_values_are_checked(tmp_path, tiny_model, make_photos, tiny_policy):
    from imret.index.store import Preprocessing, Store, StoreCorruptError

    files = make_photos(n_classes=9, per_class=9, size=(64, 48), seed=3)
    path = tmp_path / "s"
    with Store.create(path, tiny_model, preprocessing=Preprocessing(image_size=48), backend="auto?k=5") as st:
        st.add(files[:20], workers=0)
    good = json.loads((path / "store.json").read_text())
    edits = [
        (lambda c: c["backend"]["tuning"].update(recall=7), r"backend.tuning.recall must be a number in \[0, 1\]"),
        (lambda c: c["backend"]["tuning"].update(spec="exact", type="exact", params={}),
         r"backend.tuning.spec 'exact' is not the backend's spec"),
        (lambda c: c["backend"].update(requested="exact", spec="exact"), r"only kept for an 'auto' backend"),
        (lambda c: c["backend"].update(requested="auto?recall=2"), r"recall='2' must be a number in \(0, 1\]"),
    ]
    for edit, message in edits:
        c = json.loads(json.dumps(good))
        edit(c)
        (path / "store.json").write_text(json.dumps(c))
        with pytest.raises(StoreCorruptError, match=message):
            Store.open(path)
    (path / "store.json").write_text(json.dumps(good))
    with Store.open(path) as st:
        assert st.info()["backend"]["tuning"] == good["backend"]["tuning"]


def test_bad_auto_spec_fails_before_a_store_is_written(tmp_path, tiny_model):
    from imret.index.store import Store

    with pytest.raises(ValueError, match=r"k='0' must be an integer in \[1, 10000\]"):
        Store.create(tmp_path / "s", tiny_model, backend="auto?k=0")
    assert not (tmp_path / "s").exists()


# -- in a Retriever (in memory) ----------------------------------------------------------------

def test_retriever_tunes_on_its_rows_like_the_store_and_meets_the_target(tuned, collection, fresh, monkeypatch):
    """Retriever(backend="auto?...") tunes on its own (post-processed) rows through the same
    tune(): the same choice as tuning the matrix directly, its ids on the rows, and the recall
    target met on queries outside the collection."""
    from imret.retrieval import Retriever

    monkeypatch.setattr(tuning, "DEFAULT_POLICY", SMALL)
    ids = np.arange(N, dtype=np.int64) * 3 + 7  # not the row numbers
    r = Retriever(backend="auto?recall=0.9&k=10", rescore=False).index(collection, ids)
    rec, direct = r.tuning, tuned[0.9].record
    assert rec.spec == direct.spec and rec.spec.startswith("faiss:IVF")
    assert (rec.recall, rec.recall_lower) == (direct.recall, direct.recall_lower)
    assert [(m.spec, m.recall) for m in rec.tried] == [(m.spec, m.recall) for m in direct.tried]  # times vary
    assert rec.recall_lower >= 0.9 and rec.n == N
    res = r.search(vectors=fresh, k=10)
    assert np.isin(res.ids, ids).all()
    rows = (res.ids - 7) // 3
    assert brute_recall(fresh, collection, rows, 10).mean() >= 0.9
    # re-indexed with another backend: no tuning record left behind
    assert Retriever(backend="exact").index(collection[:100]).tuning is None


def test_retriever_auto_on_a_small_database(monkeypatch):
    from imret.retrieval import Retriever

    x = mixture(300, stream=4)
    # too few rows to hold queries out and still leave k: the size and the minimum are named
    need = tuning.min_rows(AutoTarget(k=50))
    held, rest = tuning.split_holdout(np.arange(need), 1000, 0)
    assert held.size >= 2 and rest.size >= 50
    assert tuning.split_holdout(np.arange(need - 1), 1000, 0)[1].size < 50
    with pytest.raises(ValueError, match=f"recall@50 needs at least {need} rows, the database has 40"):
        Retriever(backend="auto?k=50").index(x[:40])
    with pytest.raises(ValueError, match="needs at least 20 rows, the database has 5"):
        Retriever(backend="auto?k=5").index_images([f"missing{i}.jpg" for i in range(5)])  # before extracting
    # big enough to tune, small enough that exact search is chosen, as the store does
    r = Retriever(backend="auto?recall=0.99&k=10").index(x)
    assert r.tuning.spec == "exact" and "fast enough" in r.tuning.reason
    np.testing.assert_array_equal(r.search(vectors=x[:5], k=3).ids[:, 0], np.arange(5))
