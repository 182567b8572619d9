"""The header-told CSV reader behind labelled-image and caption files."""

from __future__ import annotations

import pytest

from imret.csvfiles import layout_rows
from imret.data import load_csv_dataset

LAYOUTS = {("path", "label"): "plain", ("id", "landmark_id"): "gldv2"}


def test_rows_by_hand(tmp_path):
    f = tmp_path / "a.csv"
    f.write_bytes("\ufeffPath, Label\n\n a.jpg,x\n\"b,c.jpg\",y\n".encode("utf-8"))  # BOM, blank line, quoting
    got = list(layout_rows(f, LAYOUTS))
    assert got == [("plain", {"path": " a.jpg", "label": "x"}, f"{f}:3"),
                   ("plain", {"path": "b,c.jpg", "label": "y"}, f"{f}:4")]


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"", "empty file; expected a header 'path,label'"),
        (b"file,class\na,b\n", "unknown header 'file,class'; known layouts: path,label; id,landmark_id"),
        (b"path,label\na,b,c\n", r":2: expected 2 columns \(path,label\), got 3"),
        (b"path,label\n\xff\xfe,b\n", "not UTF-8 text"),
    ],
)
def test_errors_name_file_line_and_layouts(tmp_path, data, needle):
    f = tmp_path / "bad.csv"
    f.write_bytes(data)
    with pytest.raises(ValueError, match=needle):
        list(layout_rows(f, LAYOUTS, example="path,label"))


def test_labelled_csv_accepts_a_bom_and_refuses_other_encodings(tmp_path):
    """Spreadsheet exports start with a BOM; a Latin-1 file gets a clear error, not a traceback."""
    f = tmp_path / "labels.csv"
    f.write_bytes("\ufeffpath,label\nx.jpg,caf\u00e9\n".encode("utf-8"))
    ds = load_csv_dataset(f)
    assert ds.classes == ["caf\u00e9"] and ds.paths == [str(tmp_path / "x.jpg")]
    f.write_bytes("path,label\nx.jpg,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_csv_dataset(f)
