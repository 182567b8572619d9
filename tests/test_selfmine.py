"""Label-free mining and label cleaning (imret.selfmine, imret.cli_mine).

Checked against brute force: the kNN graph (every pair scored in loops, ties by index), the
components (a hand graph), hard negatives (a loop over the ranking) and hard positives; on
generated photos with real RootSIFT verification: mined components are the objects, cleaning
drops injected wrong labels; resuming from a checkpoint verifies no pair twice; the writers
round-trip through the readers imret train uses; the CLI end to end.
"""

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from imret import selfmine as sm
from imret.data import load_csv_dataset
from imret.synthetic import make_labelled_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------- brute force


def brute_knn(x, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    edges = set()
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-float(x[i] @ x[j]), j))
        for j in others[:k]:
            edges.add((min(i, j), max(i, j)))
    return sorted(edges)


def brute_negatives(x, labels, q, k):
    """Most similar first, skipping the query's label and labels already taken."""
    order = sorted(range(len(x)), key=lambda j: (-float(x[q] @ x[j]), j))
    taken, out = set(), []
    for j in order:
        if labels[j] == labels[q] or labels[j] in taken:
            continue
        taken.add(labels[j])
        out.append(j)
        if len(out) == k:
            break
    return out + [-1] * (k - len(out))


@pytest.mark.parametrize("k", [1, 3, 7, 30])
@pytest.mark.parametrize("chunk", [None, 4])
def test_knn_graph_matches_brute_force_with_ties(k, chunk):
    rng = np.random.default_rng(k)
    # unit vectors whose inner products are exact (multiples of 1/4), drawn with repeats: many
    # exactly tied similarities, which must go to the lower index
    dirs = np.concatenate([np.eye(4), -np.eye(4), 0.5 * (2 * ((np.arange(16)[:, None] >> np.arange(4)) & 1) - 1)])
    x = dirs[rng.integers(0, len(dirs), 23)]
    edges, cos = sm.knn_graph(x, k, chunk_size=chunk)
    assert [tuple(e) for e in edges.tolist()] == brute_knn(x, k)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, [xn[i] @ xn[j] for i, j in edges], atol=1e-6)
    assert edges.dtype == np.int64 and (edges[:, 0] < edges[:, 1]).all()


def test_knn_graph_random_descriptors():
    x = np.random.default_rng(5).normal(size=(60, 16)).astype(np.float32)
    edges, _ = sm.knn_graph(x, 5, chunk_size=7)
    assert [tuple(e) for e in edges.tolist()] == brute_knn(x.astype(np.float64), 5)


def test_knn_graph_edge_cases_and_errors():
    e, c = sm.knn_graph(np.ones((1, 4)), 5)
    assert e.shape == (0, 2) and c.shape == (0,)
    with pytest.raises(ValueError, match="all-zero rows"):
        sm.knn_graph(np.array([[1.0, 0], [0, 0]]), 1)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        sm.knn_graph(np.eye(3), 0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        sm.knn_graph(np.ones(3), 1)


def test_components_of_hand_graph():
    # 0-1-2 chain, 3 alone, 4-6, 5 alone, 7-8-9 triangle
    edges = [(1, 2), (0, 1), (6, 4), (7, 8), (8, 9), (9, 7)]
    assert sm.components_of(10, edges).tolist() == [0, 0, 0, 1, 2, 3, 2, 4, 4, 4]
    assert sm.components_of(3, np.zeros((0, 2), np.int64)).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="itself"):
        sm.components_of(3, [(1, 1)])
    with pytest.raises(ValueError, match="3 nodes"):
        sm.components_of(3, [(0, 3)])


# ------------------------------------------------------- mining with a hand-made verifier


def _hand_verifier(monkeypatch, true_label, calls=None):
    """Verification stub: 50 inliers within ``true_label``, 3 across; counts calls per pair."""

    def fake(f1, f2, settings):
        i, j = f1, f2  # the stub features are the image indices
        if calls is not None:
            calls.append((min(i, j), max(i, j)))
        return 50 if true_label[i] == true_label[j] else 3

    monkeypatch.setattr(sm, "_verify_one", fake)


def test_mine_components_negatives_and_hard_positives_vs_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(6), 4)  # 6 objects x 4 images
    centres = rng.normal(size=(6, 16))
    x = centres[true] + 0.9 * rng.normal(size=(24, 16))  # noisy: some neighbours cross objects
    x[20:] = rng.normal(size=(4, 16))  # object 5: no shared direction, likely split or alone
    _hand_verifier(monkeypatch, true)
    mined = sm.mine(x, list(range(24)), [f"im{i}.jpg" for i in range(24)], k=3, min_inliers=10, negatives=4,
                    workers=2, expand=0, attach_inliers=None, min_size=2)  # the kNN graph alone
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    # components: those of the verified kNN edges, by brute force on the hand graph
    cand = brute_knn(x, 3)
    ver = [(i, j) for i, j in cand if true[i] == true[j]]
    assert [tuple(e) for e in mined.positives.tolist()] == ver
    comp = sm.components_of(24, ver)
    size = np.bincount(comp)
    for i in range(24):
        for j in range(24):
            same = comp[i] == comp[j] and size[comp[i]] > 1
            assert (mined.labels[i] == mined.labels[j] and mined.labels[i] >= 0) == same
    assert ((mined.labels >= 0) == (size[comp] > 1)).all()
    # purity: a component never mixes objects
    for c in mined.components:
        assert len(set(true[c])) == 1
    # hard negatives: the brute-force ranking, at most one per component, never verified, never same component
    own = np.where(mined.labels >= 0, mined.labels, 100 + np.arange(24))
    verified = set(ver)
    for q in range(24):
        got = mined.negatives[q].tolist()
        if mined.labels[q] < 0:
            assert got == [-1] * 4
            continue
        assert got == brute_negatives(xn, own, q, 4)
        js = [j for j in got if j >= 0]
        assert len({own[j] for j in js}) == len(js)
        assert all((min(q, j), max(q, j)) not in verified and own[j] != own[q] for j in js)
    # hard positives: per query, its verified neighbour of lowest cosine
    hp = {q: p for q, p in mined.hard_positives.tolist()}
    for q in range(24):
        nb = [j for i, j in ver if i == q] + [i for i, j in ver if j == q]
        if not nb:
            assert q not in hp
        else:
            assert hp[q] == min(nb, key=lambda j: (float(xn[q] @ xn[j]), j))
    s = mined.summary()
    assert s["verified_pairs"] == len(ver) and s["components"] == mined.num_classes
    assert sum(k * v for k, v in s["component_sizes"].items()) == s["images_in_components"]


# ---------------------------------------------- expansion, attaching, minimum size (brute force)


def brute_expansion(x, labels, k, m, exclude=()):
    """Loops: each component's normalised mean ranks the outside images; each of the top k is
    paired with its m most similar members (ties by index)."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = set()
    for c in sorted(set(int(v) for v in labels if v >= 0)):
        inside = [i for i in range(len(x)) if labels[i] == c]
        q = xn[inside].sum(0)
        q = q / np.linalg.norm(q)
        outside = sorted((j for j in range(len(x)) if labels[j] != c), key=lambda j: (-float(xn[j] @ q), j))
        for j in outside[:k]:
            for i in sorted(inside, key=lambda i: (-float(xn[j] @ xn[i]), i))[:m]:
                out.add((min(i, j), max(i, j)))
    ex = {(min(a, b), max(a, b)) for a, b in exclude}
    return sorted(out - ex)


def brute_linked(n, edges, inliers, min_inliers, attach_inliers, attach_min):
    """Strong components by repeated relabelling, then one attaching pass over them."""
    def comps(pairs):
        lab = list(range(n))
        changed = True
        while changed:
            changed = False
            for i, j in pairs:
                lo = min(lab[i], lab[j])
                if lab[i] != lo or lab[j] != lo:
                    lab[i] = lab[j] = lo
                    changed = True
        return lab

    strong = [tuple(e) for e, m in zip(edges, inliers) if m >= min_inliers]
    comp = comps(strong)
    links = list(strong)
    if attach_inliers is not None and attach_inliers < min_inliers:
        for j in range(n):
            for c in set(comp):
                if c == comp[j]:
                    continue
                partners = [b if a == j else a for (a, b), m in zip(edges, inliers)
                            if attach_inliers <= m < min_inliers and j in (a, b) and comp[b if a == j else a] == c]
                if len(partners) >= attach_min:
                    links += [(j, p) for p in partners]
    return comps(links)


def same_partition(a, b):
    n = len(a)
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(n) for j in range(n))


@pytest.mark.parametrize("k,m", [(1, 1), (3, 2), (5, 10)])
def test_expansion_pairs_match_brute_force(k, m):
    rng = np.random.default_rng(k * 10 + m)
    x = rng.normal(size=(30, 6))
    x[25:] = x[:5]  # exact duplicates: tied similarities go to the lower index
    labels = rng.integers(-1, 4, 30)
    got = sm.expansion_pairs(x, labels, k, m)
    assert [tuple(p) for p in got.tolist()] == brute_expansion(x, labels, k, m)
    exclude = got[::2][:, ::-1]  # any order
    got2 = sm.expansion_pairs(x, labels, k, m, exclude=exclude)
    assert [tuple(p) for p in got2.tolist()] == brute_expansion(x, labels, k, m, exclude.tolist())
    assert sm.expansion_pairs(x, np.full(30, -1), k, m).shape == (0, 2)
    with pytest.raises(ValueError, match="labels must be"):
        sm.expansion_pairs(x, labels[:5], k, m)
    with pytest.raises(ValueError, match="members must be an integer >= 1"):
        sm.expansion_pairs(x, labels, k, 0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("attach_inliers,attach_min", [(None, 2), (8, 1), (8, 2), (8, 3), (20, 2)])
def test_linked_components_match_brute_force(seed, attach_inliers, attach_min):
    rng = np.random.default_rng(seed)
    n = 18
    pairs = sorted({(int(a), int(b)) for a, b in rng.integers(0, n, (40, 2)) if a < b})
    inl = rng.choice([3, 9, 12, 30], size=len(pairs))  # 15: strong; 9, 12: weak at 8
    got = sm.linked_components(n, pairs, inl, 15, attach_inliers, attach_min)
    want = brute_linked(n, pairs, inl.tolist(), 15, attach_inliers, attach_min)
    assert same_partition(got.tolist(), want)
    if attach_inliers is None or attach_inliers >= 15:
        assert same_partition(got.tolist(), sm.components_of(n, np.asarray(pairs)[inl >= 15]).tolist())
    with pytest.raises(ValueError, match="inlier counts"):
        sm.linked_components(n, pairs, inl[:-1])


def test_attach_needs_several_members():
    # component {0,1,2} (strong), image 3 matches 0 and 1 weakly, image 4 matches only 2 weakly
    edges = [(0, 1), (1, 2), (0, 3), (1, 3), (2, 4)]
    inl = [40, 40, 10, 11, 14]
    lab = sm.linked_components(5, edges, inl, 15, 10, 2)
    assert lab[3] == lab[0] and lab[4] != lab[0]
    lab1 = sm.linked_components(5, edges, inl, 15, 10, 1)
    assert lab1[4] == lab1[0]
    assert len(set(sm.linked_components(5, edges, inl, 15, None, 2).tolist())) == 3


def test_mine_expansion_min_size_and_negatives_vs_brute_force(monkeypatch):
    """The whole pipeline against a loop re-implementation on a hand verifier: each object's
    views form two tight groups that are not each other's k nearest neighbours, so the kNN graph
    splits them; one expansion round proposes the other group through the component's mean."""
    rng = np.random.default_rng(3)
    n_obj, per = 4, 6
    true = np.repeat(np.arange(n_obj), per)
    centre = rng.normal(size=(n_obj, 24))
    side = rng.normal(size=(n_obj, 2, 24))
    g = np.tile(np.repeat([0, 1], per // 2), n_obj)
    x = centre[true] + 1.2 * side[true, g] + 0.15 * rng.normal(size=(n_obj * per, 24))
    n = len(x)
    calls = []

    def fake(f1, f2, settings):
        i, j = f1, f2
        calls.append((min(i, j), max(i, j)))
        if true[i] != true[j]:
            return 3
        return 50 if g[i] == g[j] else 11  # across the two groups of an object: weak matches only

    monkeypatch.setattr(sm, "_verify_one", fake)
    kw = dict(k=2, min_inliers=15, negatives=3, workers=1)
    base = sm.mine(x, list(range(n)), expand=0, attach_inliers=None, **kw)
    calls.clear()
    grown = sm.mine(x, list(range(n)), expand=2, attach_inliers=10, attach_min=2, attach_members=3, **kw)
    assert len(calls) == len(set(calls))  # a pair proposed twice is verified once per run
    # brute-force reference of the same steps
    edges = brute_knn(x, 2)
    inl = [fake(i, j, None) for i, j in edges]
    for _ in range(2):
        comp = brute_linked(n, edges, inl, 15, 10, 2)
        sizes = {c: comp.count(c) for c in comp}
        lab = np.array([c if sizes[c] >= 2 else -1 for c in comp])
        new = brute_expansion(x, lab, 2, 3, edges)
        if not new:
            break
        edges = sorted(edges + new)
        inl = [fake(i, j, None) for i, j in edges]
    assert [tuple(e) for e in grown.edges.tolist()] == edges
    np.testing.assert_array_equal(grown.inliers, inl)
    comp = brute_linked(n, edges, inl, 15, 10, 2)
    assert same_partition([c if comp.count(c) >= 2 else -1 - i for i, c in enumerate(comp)],
                          [c if c >= 0 else -1 - i for i, c in enumerate(grown.labels.tolist())])
    # pure, and less fragmented than the kNN graph alone
    for c in grown.components:
        assert len(set(true[c])) == 1
    assert grown.num_classes < base.num_classes
    # negatives: never a weakly verified partner, never the own component
    partners = {(i, j) for (i, j), m in zip(edges, inl) if m >= 10}
    for q in np.flatnonzero(grown.labels >= 0).tolist():
        for j in grown.negatives[q].tolist():
            if j >= 0:
                assert grown.labels[j] != grown.labels[q] and (min(q, j), max(q, j)) not in partners
    # minimum size: smaller components are unlabelled, the rest keep their members
    big = sm.mine(x, list(range(n)), expand=2, attach_inliers=10, attach_min=2, attach_members=3, min_size=per + 1,
                  **kw)
    sizes = np.bincount(grown.labels[grown.labels >= 0])
    keep = sizes[grown.labels] >= per + 1
    keep[grown.labels < 0] = False
    np.testing.assert_array_equal(big.labels >= 0, keep)
    with pytest.raises(ValueError, match="min_size must be an integer >= 2"):
        sm.mine(x, list(range(n)), min_size=1, **kw)


def test_verify_edges_resumes_without_verifying_twice(monkeypatch, tmp_path):
    true = np.repeat(np.arange(5), 4)
    calls = []
    _hand_verifier(monkeypatch, true, calls)
    edges, _ = sm.knn_graph(np.random.default_rng(1).normal(size=(20, 8)), 6)
    expected = np.where(true[edges[:, 0]] == true[edges[:, 1]], 50, 3)
    ck = tmp_path / "verified.jsonl"
    n_feat = {"calls": 0}

    def flaky(i):
        n_feat["calls"] += 1
        if n_feat["calls"] > 40:
            raise RuntimeError("interrupted")
        return i

    with pytest.raises(RuntimeError, match="interrupted"):
        sm.verify_edges(edges, flaky, checkpoint=ck, tag="t", workers=2, cache_size=0)
    first = list(calls)
    assert 0 < len(first) < len(edges)
    # a crash in the middle of a line: the half line is dropped, that pair verified again
    with open(ck, "a") as f:
        f.write("[0,1")
    lines = ck.read_text().splitlines()
    assert len(lines) - 2 == len(first)  # header + recorded pairs + the half line
    got = sm.verify_edges(edges, list(range(20)), checkpoint=ck, tag="t", workers=2)
    np.testing.assert_array_equal(got, expected)
    assert len(calls) == len(edges) and len(set(calls)) == len(edges)  # each pair verified exactly once
    assert set(calls) == {tuple(e) for e in edges.tolist()}
    # a third run verifies nothing
    again = sm.verify_edges(edges, list(range(20)), checkpoint=ck, tag="t")
    np.testing.assert_array_equal(again, expected)
    assert len(calls) == len(edges)
    # other settings or another image set: the stored counts do not apply
    with pytest.raises(ValueError, match="settings"):
        sm.verify_edges(edges, list(range(20)), checkpoint=ck, tag="t", threshold=4.0)
    with pytest.raises(ValueError, match="tag"):
        sm.verify_edges(edges, list(range(20)), checkpoint=ck, tag="other")


def test_verify_options_are_checked():
    with pytest.raises(ValueError, match="unknown verification option.*available: ratio"):
        sm.verify_edges([(0, 1)], [None, None], ratoi=0.8)
    with pytest.raises(ValueError, match="threshold"):
        sm.verify_edges([(0, 1)], [None, None], threshold=-1)
    with pytest.raises(TypeError, match="features_of"):
        sm.verify_edges([(0, 1)], 3)
    assert sm.verify_edges([(0, 1)], [None, None]).tolist() == [0]
    with pytest.raises(ValueError, match="unknown mode 'big'; available: largest, flag"):
        sm.clean(["a", "b"], [0, 0], [None, None], mode="big")


# ------------------------------------------------------ generated photos, real RootSIFT


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    pytest.importorskip("cv2")
    from imret.local.sift import SiftExtractor

    root = make_labelled_folder(tmp_path_factory.mktemp("objects"), n_classes=4, per_class=5, seed=3)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    labels = [Path(p).parent.name for p in paths]
    ex = SiftExtractor()
    feats = [ex(p) for p in paths]
    return paths, labels, feats


def _colour_histograms(paths):
    from PIL import Image

    rows = []
    for p in paths:
        a = np.asarray(Image.open(p).convert("RGB").resize((32, 24))) // 64
        rows.append(np.bincount((a[..., 0] * 16 + a[..., 1] * 4 + a[..., 2]).ravel(), minlength=64) + 1.0)
    return np.asarray(rows)


def test_mine_generated_photos_recovers_objects(photos):
    paths, labels, feats = photos
    n = len(paths)
    mined = sm.mine(_colour_histograms(paths), feats, paths, k=n - 1, workers=2)
    true = np.unique(labels, return_inverse=True)[1]
    cross = [(i, j) for i, j in mined.positives.tolist() if labels[i] != labels[j]]
    assert cross == []  # no verified edge between two objects
    # one component per object, holding all its views
    assert mined.num_classes == 4 and (mined.labels >= 0).all()
    assert len(set(zip(mined.labels.tolist(), true.tolist()))) == 4
    assert (mined.negatives[:, 0] >= 0).all()
    assert all(mined.labels[j] != mined.labels[q] for q in range(n) for j in mined.negatives[q] if j >= 0)


def test_clean_drops_injected_labels(photos):
    paths, labels, feats = photos
    noisy = list(labels)
    wrong = [2, 13]  # object_000 view -> object_003, object_002 view -> object_000
    noisy[2], noisy[13] = "object_003", "object_000"
    for mode in ("largest", "flag"):
        res = sm.clean(paths, noisy, feats, mode=mode, workers=2)
        assert res.dropped.tolist() == wrong, mode
        assert all(res.reasons[i] for i in wrong) and not any(res.reasons[i] for i in res.kept)
        assert "object_003" in res.reasons[2]
    # a label larger than all_pairs_up_to is verified by kNN, which needs descriptors
    with pytest.raises(ValueError, match="pass descriptors"):
        sm.clean(paths, noisy, feats, all_pairs_up_to=4)
    res = sm.clean(paths, noisy, feats, all_pairs_up_to=4, k=3, descriptors=_colour_histograms(paths), workers=2)
    assert set(res.dropped.tolist()) >= set(wrong)
    # edges are within labels, and k=3 checks fewer pairs than all pairs would
    assert all(noisy[i] == noisy[j] for i, j in res.edges.tolist())
    assert len(res.edges) < sum(c * (c - 1) // 2 for c in np.unique(noisy, return_counts=True)[1])


def _brute_vote_share(x, labels, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for i in range(len(x)):
        others = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-float(x[i] @ x[j]), j))[:k]
        w = [max(0.0, float(x[i] @ x[j])) for j in others]
        same = sum(wj for wj, j in zip(w, others) if labels[j] == labels[i])
        out.append(same / sum(w) if sum(w) > 0 else 0.0)
    return np.array(out)


@pytest.mark.parametrize("k", [1, 4, 30])
def test_label_vote_share_matches_brute_force(k):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(17, 6))
    x[5] = x[3]  # an exact tie between two neighbours of everyone: broken by index
    labels = [["a", "b", 3][i % 3] for i in range(17)]
    np.testing.assert_allclose(sm.label_vote_share(x, labels, k), _brute_vote_share(x, labels, k), atol=1e-12)
    assert sm.label_vote_share(x[:1], labels[:1], k).tolist() == [0.0]
    with pytest.raises(ValueError, match="3 labels for 17 descriptor rows"):
        sm.label_vote_share(x, labels[:3], k)


def test_clean_vote_keeps_unverified_views_and_drops_wrong_labels(monkeypatch):
    """Four objects of six images; only the first three images of each verify with each other
    (the others share no visible structure with them), and two labels are wrong. Flag mode
    drops every unverified view; vote mode keeps the correctly labelled ones (their descriptor
    neighbours agree) and drops the wrong labels (their neighbours carry the true one)."""
    rng = np.random.default_rng(3)
    true = np.repeat(np.arange(4), 6)
    centres = rng.normal(size=(4, 12)) * 3
    x = centres[true] + 0.5 * rng.normal(size=(24, 12))
    verifiable = np.array([i % 6 < 3 for i in range(24)])
    monkeypatch.setattr(sm, "_verify_one", lambda i, j, s: 50 if true[i] == true[j] and verifiable[i] and verifiable[j] else 2)
    noisy = [f"obj{t}" for t in true]
    wrong = [4, 15]  # unverifiable views given another object's label
    noisy[4], noisy[15] = "obj3", "obj0"
    paths = [f"im{i}.jpg" for i in range(24)]
    flag = sm.clean(paths, noisy, list(range(24)), mode="flag", workers=0)
    assert set(flag.dropped.tolist()) == set(np.flatnonzero(~verifiable).tolist())
    vote = sm.clean(paths, noisy, list(range(24)), mode="vote", descriptors=x, vote_k=5, workers=0)
    assert vote.dropped.tolist() == wrong
    assert "holds 0% of its 5 nearest neighbours" in vote.reasons[4]
    # a wrong label that verifies (here: made to) is kept: geometry outranks the vote
    monkeypatch.setattr(sm, "_verify_one", lambda i, j, s: 50 if {i, j} == {4, 18} else 2)
    res = sm.clean(paths, noisy, list(range(24)), mode="vote", descriptors=x, vote_k=5, workers=0)
    assert res.keep[4] and res.keep[18]
    with pytest.raises(ValueError, match="mode 'vote' needs descriptors"):
        sm.clean(paths, noisy, list(range(24)), mode="vote", workers=0)
    with pytest.raises(ValueError, match=r"vote_share must be a number in \(0, 1\], got 0"):
        sm.clean(paths, noisy, list(range(24)), mode="vote", descriptors=x, vote_share=0, workers=0)

    # unreadable images (valid=False): dropped, never verified, never a voter. Image 0's descriptor
    # is made the twin of image 4's: as a voter it would change the shares of 4 and its neighbours
    calls = []
    monkeypatch.setattr(sm, "_verify_one", lambda i, j, s: calls.append((i, j)) or (50 if true[i] == true[j] and verifiable[i] and verifiable[j] else 2))
    x2 = x.copy()
    x2[0] = x2[4]
    valid = np.ones(24, bool)
    valid[0] = False
    res = sm.clean(paths, noisy, list(range(24)), mode="vote", descriptors=x2, vote_k=5, workers=0, valid=valid)
    assert sorted(res.dropped.tolist()) == [0] + wrong
    assert res.reasons[0].startswith("unreadable") and res.per_label["obj0"]["kept"] == 4
    assert calls and all(0 not in c for c in calls)
    np.testing.assert_allclose(sm.label_vote_share(x2, noisy, 5, valid=valid)[1:],
                               _brute_vote_share(x2[1:], noisy[1:], 5), atol=1e-12)
    assert sm.label_vote_share(x2, noisy, 5, valid=valid)[0] == 0.0
    with pytest.raises(ValueError, match=r"valid must be a \(24,\) bool mask"):
        sm.clean(paths, noisy, list(range(24)), mode="vote", descriptors=x2, workers=0, valid=np.ones(23, bool))


# ----------------------------------------------------------------------------- writers


def test_writers_round_trip(tmp_path, monkeypatch):
    x = np.random.default_rng(2).normal(size=(13, 8))
    true = np.r_[np.repeat(np.arange(4), 3), 9]  # image 12 verifies with nobody
    _hand_verifier(monkeypatch, true)
    paths = [str(tmp_path / f"img {i},x.jpg") for i in range(13)]  # commas and spaces: CSV quoting
    mined = sm.mine(x, list(range(13)), paths, k=12, negatives=3, workers=0)
    assert sm.write_class_csv(tmp_path / "classes.csv", mined) == 12
    ds = load_csv_dataset(tmp_path / "classes.csv")
    assert ds.paths == paths[:12]
    assert [ds.classes[c] for c in ds.labels] == [str(v) for v in mined.labels[:12]]
    n = sm.write_pairs_csv(tmp_path / "pairs.csv", mined)
    got_paths, pairs, negs = sm.read_pairs_csv(tmp_path / "pairs.csv")
    assert n == len(mined.positives)
    back = {p: i for i, p in enumerate(paths)}
    remap = np.array([back[p] for p in got_paths])
    np.testing.assert_array_equal(remap[pairs], mined.positives)
    np.testing.assert_array_equal(np.where(negs >= 0, remap[negs], -1), mined.negatives[mined.positives[:, 0]])
    sm.write_pairs_csv(tmp_path / "hard.csv", mined, hard_only=True)
    _, hp, _ = sm.read_pairs_csv(tmp_path / "hard.csv")
    assert len(hp) == len(mined.hard_positives) == 12
    with pytest.raises(ValueError, match="header"):
        sm.read_pairs_csv(tmp_path / "classes.csv")
    # cleaning's CSV and page
    res = sm.clean(paths, [str(v) for v in true], list(range(13)), workers=0)
    assert res.dropped.tolist() == [12] and "only image" in res.reasons[12]
    assert sm.write_clean_csv(tmp_path / "clean.csv", res) == 12
    ds = load_csv_dataset(tmp_path / "clean.csv")
    assert ds.paths == paths[:12] and [ds.classes[c] for c in ds.labels] == [str(v) for v in true[:12]]
    page = sm.write_clean_html(tmp_path / "dropped.html", res).read_text()
    assert "img 12,x.jpg" in page and "only image of label" in page and "img 3,x.jpg" not in page


# --------------------------------------------------------------------------------- CLI


def _parser():
    from imret.cli_mine import register

    p = argparse.ArgumentParser(prog="imret")
    register(p.add_subparsers(dest="command", required=True))
    return p


def _run(argv):
    """Through the real entry point, as a user runs it (``imret mine ...``)."""
    from imret.cli import main

    return main(list(argv))


MODEL = ["--model", "resnet18", "--no-pretrained", "--image-size", "64", "--no-progress", "--workers", "1",
         "--verify-workers", "2"]


def test_cli_mine_and_clean_end_to_end(tmp_path, capsys, monkeypatch):
    pytest.importorskip("cv2")
    root = make_labelled_folder(tmp_path / "photos", n_classes=3, per_class=4, seed=5)
    out = tmp_path / "mined"
    assert _run(["mine", str(root), "--out", str(out), "--k", "11", *MODEL]) == 0
    text = capsys.readouterr().out
    assert "3 components" in text and "classes.csv" in text
    ds = load_csv_dataset(out / "classes.csv")
    folders = [Path(p).parent.name for p in ds.paths]
    assert len(ds.paths) == 12 and len(set(zip(folders, ds.labels.tolist()))) == 3
    rep = json.loads((out / "mined.json").read_text())
    assert rep["components"] == 3 and rep["component_sizes"] == {"4": 3}
    with open(out / "pairs.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ["query", "positive"] and len(rows) - 1 == rep["verified_pairs"]
    # a rerun reuses descriptors, SIFT and verified pairs: nothing is verified again
    calls = []
    real = sm.verify_pair
    monkeypatch.setattr(sm, "verify_pair", lambda *a, **k: calls.append(1) or real(*a, **k))
    lines = (out / "verified.jsonl").read_text()
    assert _run(["mine", str(root), "--out", str(out), "--k", "11", *MODEL]) == 0
    assert calls == [] and (out / "verified.jsonl").read_text() == lines
    capsys.readouterr()
    # component options: an expansion round finds no pair across objects; components under 5 images are left out
    assert _run(["mine", str(root), "--out", str(out), "--k", "11", "--expand", "1", "--attach-inliers", "10",
                 "--min-component", "5", *MODEL]) == 0
    assert "0 components" in capsys.readouterr().out
    rep = json.loads((out / "mined.json").read_text())
    assert rep["min_size"] == 5 and rep["expand"] == 1 and rep["images_in_components"] == 0
    assert (out / "classes.csv").read_text() == "path,label\n"
    # clean: a CSV with one wrong label
    files = sorted(str(p) for p in root.rglob("*.jpg"))
    labels = [Path(p).parent.name for p in files]
    labels[1] = "object_002"
    with open(tmp_path / "noisy.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(zip(files, labels))
    assert _run(["clean", str(tmp_path / "noisy.csv"), "--out", str(tmp_path / "clean"), "--mode", "largest",
                 *MODEL]) == 0
    text = capsys.readouterr().out
    assert "kept 11, dropped 1" in text
    kept = load_csv_dataset(tmp_path / "clean" / "cleaned.csv")
    assert files[1] not in kept.paths and len(kept.paths) == 11
    assert Path(files[1]).name in (tmp_path / "clean" / "dropped.html").read_text()
    rep = json.loads((tmp_path / "clean" / "clean.json").read_text())
    assert [d["path"] for d in rep["dropped_images"]] == [files[1]]
    # the default mode, vote: verified images stay; the others are kept or dropped by their neighbours' labels
    assert _run(["clean", str(tmp_path / "noisy.csv"), "--out", str(tmp_path / "vote"), "--vote-k", "3", *MODEL]) == 0
    rep = json.loads((tmp_path / "vote" / "clean.json").read_text())
    assert rep["mode"] == "vote" and rep["kept"] + rep["dropped"] == 12 and rep["kept"] >= 11
    assert all("of its 3 nearest neighbours" in d["reason"] for d in rep["dropped_images"])


def test_cli_errors(tmp_path, capsys):
    # main() prints the one-line error and returns non-zero
    assert _run(["mine", str(tmp_path), "--out", str(tmp_path / "o"), "--min-inliers", "1", *MODEL]) != 0
    assert "--min-inliers must be at least 2" in capsys.readouterr().err
    assert _run(["mine", str(tmp_path), "--out", str(tmp_path / "o"), "--min-component", "1", *MODEL]) != 0
    assert "--min-component must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["clean", "x.csv", "--out", "o", "--mode", "biggest"])


@pytest.mark.slow
def test_cli_mine_then_train_on_the_mined_classes(tmp_path, capsys):
    """No labels anywhere: ``imret mine`` on a folder of photos, then ``imret train`` (AP loss,
    class-balanced batches) on the mined ``classes.csv``."""
    pytest.importorskip("cv2")
    yaml = pytest.importorskip("yaml")
    import torch

    from imret.train.metrics_log import read_metrics

    root = make_labelled_folder(tmp_path / "photos", n_classes=3, per_class=4, seed=5)
    mined = tmp_path / "mined"
    assert _run(["mine", str(root), "--out", str(mined), "--k", "11", *MODEL]) == 0
    capsys.readouterr()
    with open(mined / "classes.csv") as f:
        rows = list(csv.DictReader(f))
    folders = {r["path"]: Path(r["path"]).parent.name for r in rows}
    assert len(rows) == 12 and not {r["label"] for r in rows} & set(folders.values())  # component ids, not folders
    assert len({(folders[r["path"]], r["label"]) for r in rows}) == 3  # one pseudo-class per object
    out = tmp_path / "run"
    cfg = {"out": str(out), "epochs": 2, "device": "cpu", "seed": 0, "log_every": 1,
           "model": {"backbone": "mobilenetv2_100", "pretrained": False},
           "data": {"kind": "csv", "csv": str(mined / "classes.csv"), "root": str(mined), "image_size": 64,
                    "workers": 0},
           "loss": {"name": "ap"}, "mining": {"strategy": "all", "classes_per_batch": 3, "per_class": 4},
           "optim": {"lr": 1e-3}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert _run(["train", str(tmp_path / "train.yaml"), "--no-progress"]) == 0, capsys.readouterr().err
    assert "epoch 2/2" in capsys.readouterr().out
    metrics = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in metrics] == [1, 2] and all(np.isfinite(r["loss"]) for r in metrics)
    ck = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 2 and ck["global_step"] == 2  # 12 images = one batch of 3 pseudo-classes x 4 per epoch


def _vote_reference(x, labels, share, k):
    """Brute force: every unlabelled image, its k most similar labelled ones by a full sort."""
    out = labels.copy()
    voters = [j for j in range(len(labels)) if labels[j] >= 0]
    for i in range(len(labels)):
        if labels[i] >= 0:
            continue
        ranked = sorted(voters, key=lambda j: (-float(x[i] @ x[j]), j))[:k]
        w = {}
        for j in ranked:
            w[labels[j]] = w.get(labels[j], 0.0) + max(float(x[i] @ x[j]), 0.0)
        total = sum(w.values())
        if total > 0:
            c = max(sorted(w), key=lambda c: w[c])
            if w[c] >= share * total:
                out[i] = c
    return out


@pytest.mark.parametrize("share, k", [(0.6, 3), (0.7, 10), (1.0, 5)])
def test_vote_attach_matches_a_brute_force_vote(share, k):
    from imret.selfmine import vote_attach

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 16))
    lab_true = rng.integers(0, 3, 60)
    x = centres[lab_true] + 0.9 * rng.normal(size=(60, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labels = np.where(rng.random(60) < 0.5, lab_true, -1).astype(np.int64)
    got = vote_attach(x, labels, share, k)
    assert np.array_equal(got, _vote_reference(x, labels, share, k))
    assert np.array_equal(got[labels >= 0], labels[labels >= 0])
    attached = (labels < 0) & (got >= 0)
    assert attached.any() and (got < 0).any() if share < 1.0 else True
    assert (got[attached] == lab_true[attached]).mean() > 0.8  # the votes follow the true groups


def test_vote_attach_refuses_a_share_that_is_not_a_majority():
    from imret.selfmine import vote_attach

    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"share must be a number in \(0.5, 1\]"):
        vote_attach(x, np.array([0, -1, 1]), 0.5)
    with pytest.raises(ValueError, match="labels must be"):
        vote_attach(x, np.array([0, -1]), 0.7)
