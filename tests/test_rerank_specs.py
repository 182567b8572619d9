"""Re-ranker spec strings: parsing, checking against the stages' signatures, building."""

import numpy as np
import pytest

from imret.rerank import PathSources, RerankSources, build_rerankers, check_rerank, parse_rerank
from imret.retrieval import Retriever


def test_specs_parse_with_defaults_and_round_trip():
    s = parse_rerank("sift")
    assert (s.kind, s.top_k, s.params) == ("sift", 100, {})
    assert parse_rerank("sg").top_k == 400
    s = parse_rerank(" SIFT:50?min_inliers=12&model=homography&mutual=false&ratio=none ")
    assert (s.kind, s.top_k) == ("sift", 50)
    assert s.params == {"min_inliers": 12, "model": "homography", "mutual": False, "ratio": None}
    assert parse_rerank(str(s)) == s
    assert str(parse_rerank("aml:20?qe=5")) == "aml:20?qe=5"


@pytest.mark.parametrize("spec,match", [
    ("", "non-empty"),
    ("surf:10", "available: sift, cnn, aml, sg"),
    ("sift:0", "positive integer"),
    ("sift:ten", "positive integer"),
    ("sift:10?=3", "bad or repeated"),
    ("sift:10?qe=1&qe=2", "bad or repeated"),
])
def test_bad_specs_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_rerank(spec)


def test_parameters_are_checked_against_the_stage():
    assert check_rerank("sift:10?min_inliers=8").params == {"min_inliers": 8}
    with pytest.raises(ValueError, match="unknown parameter 'min_inlier'.*available: .*min_inliers"):
        check_rerank("sift:10?min_inlier=8")
    with pytest.raises(ValueError, match="as sg:N, not m="):
        check_rerank("sg?m=5")
    with pytest.raises(ValueError, match="as sift:N, not top_k="):
        check_rerank("sift?top_k=5")
    with pytest.raises(ValueError, match="unknown parameter 'rows'"):
        check_rerank("sg:10?rows=1")  # what a builder supplies is never a spec parameter


def test_building_names_the_missing_source():
    with pytest.raises(ValueError, match="local features of the database"):
        build_rerankers("sift:5", RerankSources())
    with pytest.raises(ValueError, match="feature maps"):
        build_rerankers(["aml:5"], RerankSources())
    with pytest.raises(ValueError, match="database rows"):
        build_rerankers(["sg:5"], RerankSources())
    assert build_rerankers(None, RerankSources()) == []


def test_a_built_refiner_equals_the_class_used_directly():
    from imret.refinement import TopMRefiner

    rng = np.random.default_rng(0)
    db = rng.standard_normal((40, 16)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:5] + 0.3 * rng.standard_normal((5, 16)).astype(np.float32)
    base = Retriever().index(db)
    (stage,) = build_rerankers("sg:20?k=4&beta=0.2", RerankSources(rows=base.rows))
    assert (stage.m, stage.k, stage.beta) == (20, 4, 0.2)
    got = Retriever(rerankers=[stage]).index(db).search(vectors=q, k=30)
    want = Retriever(rerankers=[TopMRefiner(base.rows, m=20, k=4, beta=0.2)]).index(db).search(vectors=q, k=30)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)


def test_path_sources_compute_each_id_once_and_keep_it(tmp_path, monkeypatch):
    calls = []

    class Fake:
        max_keypoints = 4

        def __call__(self, image, box=None):
            calls.append(image)
            if image.endswith("bad.jpg"):
                raise OSError("unreadable")
            from imret.local import LocalFeatures

            return LocalFeatures(np.zeros((1, 2)), np.ones((1, 3)) / np.sqrt(3), (10, 10))

    src = PathSources(["a.jpg", "bad.jpg", "c.jpg"], lru=2)
    src._extractors["sift"] = Fake()
    db = src.database("sift")
    got = db(np.array([0, 1, 0, -1]))
    assert got[1] is None and got[3] is None and got[0] is got[2]
    assert calls == ["a.jpg", "bad.jpg"]
    db([2])  # the cache holds 2 ids: id 1 (least recently used; 0 was used since) goes
    db([0])
    assert calls == ["a.jpg", "bad.jpg", "c.jpg"]
    db([1])  # ... and now id 2 goes (0 was used after it)
    db([0])
    db([2])
    assert calls == ["a.jpg", "bad.jpg", "c.jpg", "bad.jpg", "c.jpg"]


def test_a_stage_parameter_named_like_a_source_of_another_stage_is_accepted():
    # "model" is the verifier's transform model (affine / homography), and what aml is built on
    assert check_rerank("sift:10?model=homography").params == {"model": "homography"}
    with pytest.raises(ValueError, match="unknown parameter 'model'"):
        check_rerank("aml:10?model=x")


def test_aml_at_its_own_size_reads_database_maps_of_that_size(tiny_model):
    asked = []

    def maps_at(size):
        asked.append(size)
        return lambda ids: [None] * len(ids)

    first = lambda ids: [None] * len(ids)  # noqa: E731
    rs = RerankSources(model=tiny_model, image_size=512, maps=first, maps_at=maps_at)
    (stage,) = build_rerankers("aml:5?image_size=1024", rs)
    assert asked == [1024] and stage.image_size == 1024
    (stage,) = build_rerankers("aml:5", rs)
    assert asked == [1024] and stage.maps is first and stage.image_size == 512
    with pytest.raises(ValueError, match="maps at that size"):
        build_rerankers("aml:5?image_size=1024", RerankSources(model=tiny_model, image_size=512, maps=first))
