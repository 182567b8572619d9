"""The spec grammar shared by backends, re-rankers and local features."""

from __future__ import annotations

import pytest

from imret.index.base import parse_spec
from imret.rerank import parse_rerank
from imret.specs import spec_value, split_spec


@pytest.mark.parametrize(
    "text, parts",
    [
        ("exact", ("exact", "", "", {})),
        (" FAISS:IVF64,Flat?nprobe=8 ", ("faiss", ":", "IVF64,Flat", {"nprobe": "8"})),
        ("milvus:http://h:19530?x=a%26b&y=", ("milvus", ":", "http://h:19530", {"x": "a&b", "y": ""})),
        ("sift:", ("sift", ":", "", {})),
    ],
)
def test_split_spec_by_hand(text, parts):
    assert split_spec(text, "spec") == parts


@pytest.mark.parametrize("text, needle", [("", "non-empty"), ("a?", "bad parameters"), ("a?=3", "bad or repeated"),
                                          ("a?k=1&k=2", "bad or repeated parameter 'k'"), ("a?&", "bad parameters")])
def test_split_spec_refuses(text, needle):
    with pytest.raises(ValueError, match=needle):
        split_spec(text, "spec")


def test_spec_value_types():
    assert [spec_value(t) for t in ("True", "false", "null", "None", "12", "-3", "0.5", "1e-3", "ivf", " 7 ")] == \
        [True, False, None, None, 12, -3, 0.5, 1e-3, "ivf", 7]


def test_every_spec_refuses_repeated_keys():
    """One grammar: a repeated key is an error for backends and local features as for re-rankers."""
    from imret.index.store import _parse_local

    with pytest.raises(ValueError, match="repeated parameter 'nprobe'"):
        parse_spec("faiss:IVF64,Flat?nprobe=8&nprobe=16")
    with pytest.raises(ValueError, match="repeated parameter 'min_inliers'"):
        parse_rerank("sift:50?min_inliers=10&min_inliers=12")
    with pytest.raises(ValueError, match="repeated parameter 'level'"):
        _parse_local("cnn?level=-2&level=-1")
    assert _parse_local("cnn?level=-2")["params"] == {"level": -2}
    with pytest.raises(ValueError, match="take no ':' part"):
        _parse_local("cnn:3")
