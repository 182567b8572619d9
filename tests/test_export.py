"""`imret index export` and imret.export: npy + jsonl, parquet, a FiftyOne folder."""

import json
import os
import sys
import types

import numpy as np
import pytest

from imret.cli import main
from imret.export import common_folder, export_store, fiftyone_snippet, relative_paths
from imret.index.store import Preprocessing, Store

PRE = Preprocessing(image_size=48)
REMOVED = [1, 4]


@pytest.fixture(scope="module")
def photos(make_photos):
    return make_photos(n_classes=3, per_class=3, size=(64, 48), seed=11)


@pytest.fixture(scope="module")
def store_path(photos, make_store, tmp_path_factory):
    """9 images, two removed (so live ids are not 0..N-1), PCA whitening to 6-D configured."""
    import shutil

    from imret.whitening import fit_pca_whitening

    path = tmp_path_factory.mktemp("export") / "store"
    shutil.copytree(make_store(photos, PRE), path)
    with Store.open(path, writable=True) as st:
        st.remove(REMOVED)
        live = np.array([r.id for r in st.list(0, 100)])
        st.configure(whitening=fit_pca_whitening(np.asarray(st.descriptors())[live], 6))
    return path


def _live(store_path):
    with Store.open(store_path) as st:
        recs = st.list(0, 100)
        ids = np.array([r.id for r in recs])
        return recs, np.asarray(st.descriptors())[ids].copy(), np.asarray(st.vectors())[ids].copy()


def test_pure_path_helpers():
    assert relative_paths(["/a/b/c.jpg", "/a/d.jpg"], None) == ["/a/b/c.jpg", "/a/d.jpg"]
    assert relative_paths(["/a/b/c.jpg", "/a/d.jpg"], "/a") == [os.path.join("b", "c.jpg"), "d.jpg"]
    assert relative_paths(["/x/e.jpg"], "/a") == [os.path.join("..", "x", "e.jpg")]
    assert common_folder(["/a/b/c.jpg", "/a/b/d/e.jpg"]) == "/a/b"
    assert common_folder(["/a/b/c.jpg"]) == "/a/b"
    assert common_folder([]) is None


def test_npy_export_loads_with_numpy_and_lines_match_rows(store_path, tmp_path, capsys):
    recs, desc, _ = _live(store_path)
    assert main(["index", "export", str(store_path), "--out", str(tmp_path / "x" / "feats.npy")]) == 0
    out = capsys.readouterr().out
    x = np.load(tmp_path / "x" / "feats.npy")
    assert x.dtype == np.float32 and x.shape == (7, 512)
    np.testing.assert_array_equal(x, desc)
    lines = [json.loads(line) for line in (tmp_path / "x" / "feats.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [r.id for r in recs] and not set(REMOVED) & {r["id"] for r in lines}
    assert list(lines[0]) == ["id", "path", "width", "height", "size", "sha256", "added"]
    root = common_folder([r.path for r in recs])
    assert f"image paths are relative to {root}" in out
    for line, r in zip(lines, recs):  # relative to the images' common folder, and back
        assert not os.path.isabs(line["path"]) and os.path.join(root, line["path"]) == r.path
        assert (line["width"], line["height"], line["sha256"]) == (r.width, r.height, r.sha256)
    meta = json.loads((tmp_path / "x" / "feats.json").read_text())
    assert meta["rows"] == "descriptors" and meta["n"] == 7 and meta["dim"] == 512 and meta["paths"] == "relative"
    for f in ("feats.npy", "feats.jsonl", "feats.json"):  # nothing of this machine's layout
        assert str(tmp_path).encode() not in (tmp_path / "x" / f).read_bytes()
        assert os.path.dirname(root).encode() not in (tmp_path / "x" / f).read_bytes()

    # an existing export is not overwritten without --force; --absolute-paths keeps them as stored
    assert main(["index", "export", str(store_path), "--out", str(tmp_path / "x" / "feats")]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["index", "export", str(store_path), "--out", str(tmp_path / "x" / "feats"), "--force",
                 "--absolute-paths", "--vectors"]) == 0
    _, _, vec = _live(store_path)
    np.testing.assert_allclose(np.load(tmp_path / "x" / "feats.npy"), vec)
    lines = [json.loads(line) for line in (tmp_path / "x" / "feats.jsonl").read_text().splitlines()]
    assert [r["path"] for r in lines] == [r.path for r in recs]
    assert json.loads((tmp_path / "x" / "feats.json").read_text())["rows"] == "vectors"


def test_chunked_export_equals_one_chunk_and_relative_to(store_path, tmp_path):
    recs, desc, vec = _live(store_path)
    base = os.path.dirname(os.path.dirname(recs[0].path))
    with Store.open(store_path) as st:
        rep = export_store(st, tmp_path / "a", vectors=True, relative_to=base, chunk=3)
    assert rep.rows == 7 and rep.dim == 6 and rep.rows_kind == "vectors" and str(rep.relative_to) == base
    assert [f.name for f in rep.files] == ["a.npy", "a.jsonl", "a.json"]
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), vec)
    paths = [json.loads(line)["path"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [os.path.join(base, p) for p in paths] == [r.path for r in recs]


def test_parquet_export_has_metadata_columns_and_a_fixed_size_vector(store_path, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    recs, desc, _ = _live(store_path)
    with Store.open(store_path) as st:
        rep = export_store(st, tmp_path / "t", format="parquet", chunk=2, common_root=True)
    assert rep.files == (tmp_path / "t.parquet",)
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.column_names == ["id", "path", "width", "height", "size", "sha256", "added", "vector"]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 512)
    assert table.column("id").to_pylist() == [r.id for r in recs]
    np.testing.assert_array_equal(np.array(table.column("vector").to_pylist(), np.float32), desc)
    facts = json.loads(table.schema.metadata[b"imret"])
    assert facts["rows"] == "descriptors" and facts["dim"] == 512 and facts["paths"] == "relative"


def test_parquet_without_pyarrow_names_the_package(store_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert main(["index", "export", str(store_path), "--format", "parquet", "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert "pip install pyarrow" in err and "parquet" in err
    assert not list(tmp_path.iterdir())


def test_fiftyone_folder_loads_with_the_documented_two_lines(store_path, tmp_path, monkeypatch, capsys):
    """The README's two lines, run against a stand-in of the fiftyone module (Sample, Dataset,
    add_samples), give one sample per live image with its absolute path and its vector."""
    recs, desc, _ = _live(store_path)
    out = tmp_path / "fo"
    assert main(["index", "export", str(store_path), "--format", "fiftyone", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "embeddings.npy", "samples.json"]
    samples = json.loads((out / "samples.json").read_text())
    assert [s["imret_id"] for s in samples] == [r.id for r in recs]
    assert all(not os.path.isabs(s["filepath"]) for s in samples)

    added = []
    fo = types.ModuleType("fiftyone")

    class Sample(dict):
        def __init__(self, filepath, **fields):
            super().__init__(filepath=filepath, **fields)

    class Dataset:
        def __init__(self, name=None):
            self.name = name

        def add_samples(self, samples):
            added.extend(samples)

    fo.Sample, fo.Dataset = Sample, Dataset
    monkeypatch.setitem(sys.modules, "fiftyone", fo)
    root = common_folder([r.path for r in recs])
    # the two lines printed by the CLI (root and folder filled in) ...
    code = printed.split("load it into FiftyOne with:\n", 1)[1]
    assert code == fiftyone_snippet(str(out), root) and len(code.splitlines()) == 2
    exec(compile(code, "<snippet>", "exec"), {})
    assert [s["filepath"] for s in added] == [r.path for r in recs]
    np.testing.assert_array_equal(np.stack([s["embedding"] for s in added]), desc)
    assert added[0]["imret_id"] == recs[0].id and added[0]["width"] == recs[0].width
    # ... and those of the README (root '.': run from the images' folder)
    readme = (out / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.splitlines()) == 2
    added.clear()
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("root, export = '.'", f"root, export = {root!r}"), "<readme>", "exec"), {})
    assert [s["filepath"] for s in added] == [r.path for r in recs]
    assert str(tmp_path) not in readme and root not in readme

    # a non-empty folder is refused without --force
    assert main(["index", "export", str(store_path), "--format", "fiftyone", "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_bad_arguments_are_named(store_path, tmp_path, capsys):
    with Store.open(store_path) as st, pytest.raises(ValueError, match="unknown export format 'csv'; available: npy"):
        export_store(st, tmp_path / "x", format="csv")
    assert main(["index", "export", str(store_path), "--out", str(tmp_path / "x"), "--relative-to",
                 str(tmp_path / "nope")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert main(["index", "export", str(store_path), "--out", str(tmp_path / "x"), "--relative-to", str(tmp_path),
                 "--absolute-paths"]) == 1
    assert "contradict" in capsys.readouterr().err


def test_a_store_with_no_live_images_exports_empty_files(store_path, copy_store, tmp_path):
    path = copy_store(store_path)
    with Store.open(path, writable=True) as st:
        st.remove([r.id for r in st.list(0, 100)])
    with Store.open(path) as st:
        rep = export_store(st, tmp_path / "e", common_root=True)
        assert rep.rows == 0 and rep.relative_to is None
        assert np.load(tmp_path / "e.npy").shape == (0, 512)
        assert (tmp_path / "e.jsonl").read_text() == ""
        pq = pytest.importorskip("pyarrow.parquet")
        export_store(st, tmp_path / "e.parquet", format="parquet")
        assert pq.read_table(tmp_path / "e.parquet").num_rows == 0
