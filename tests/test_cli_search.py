"""`imret search` with many queries, in-process: folders, --list, --csv with boxes, CSV and
JSON-lines rows checked against Store.search, one batched extraction, skipped queries."""

import csv
import importlib
import json
import os
import shutil

import pytest

from imret.cli import main
from imret.images import list_images
from imret.index.store import Preprocessing, Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
extract_module = importlib.import_module("imret.extract")  # (imret.extract is also a function's name)

PRE = Preprocessing(image_size=96)
RUN = ["--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def photos(small_photos):
    return small_photos


@pytest.fixture(scope="module")
def store(small_store):
    return small_store


@pytest.fixture(scope="module")
def queries(make_photos):
    """Six query photos of two other objects (not in the store)."""
    return make_photos(n_classes=2, per_class=3, size=(150, 110), seed=7)


def expected(store, paths, k, bboxes=None):
    """(query, rank, id, path, score, box) rows as Store.search gives them for ``paths``."""
    with Store.open(store) as st:
        res = st.search(paths, bboxes=bboxes, k=k, workers=0)
    return [(q, rank, h.id, h.path, h.score, None if bboxes is None else bboxes[i])
            for i, (q, hits) in enumerate(zip(paths, res)) for rank, h in enumerate(hits, 1)]


def jsonl_rows(text):
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def query_folder(tmp_path, queries):
    """queries/ with three photos (one in a sub-folder), a text file and a hidden file."""
    d = tmp_path / "queries"
    (d / "sub").mkdir(parents=True)
    shutil.copy(queries[0], d / "b.jpg")
    shutil.copy(queries[3], d / "a.jpg")
    shutil.copy(queries[1], d / "sub" / "c.jpg")
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden.jpg").write_bytes(b"garbage")
    return d


def test_a_folder_of_queries_gives_jsonl_rows_of_store_search(store, query_folder, capsys):
    capsys.readouterr()
    assert main(["search", str(store), str(query_folder), "-k", "3", "--format", "jsonl", *RUN]) == 0
    got = jsonl_rows(capsys.readouterr().out)
    paths = list_images(query_folder)  # the one listing rule: sorted, recursive, no hidden / non-image files
    assert [p.split("queries/")[1] for p in paths] == ["a.jpg", "b.jpg", "sub/c.jpg"]
    want = [{"query": q, "rank": r, "id": i, "path": p, "score": s} for q, r, i, p, s, _ in expected(store, paths, 3)]
    assert got == want and len(got) == 9


def test_csv_of_queries_with_boxes_header_and_relative_paths(store, queries, tmp_path, capsys):
    sub = tmp_path / "lists"
    sub.mkdir()
    shutil.copy(queries[0], sub / "q1.jpg")
    shutil.copy(queries[4], sub / "q2.jpg")
    (sub / "queries.csv").write_text(
        "path,x1,y1,x2,y2\n"
        "q1.jpg\n"
        "\n"
        "# a comment\n"
        "q2.jpg,10,5,120,100\n"
        f"\"{queries[2]}\",,,,\n")
    out = tmp_path / "hits.csv"
    assert main(["search", str(store), "--csv", str(sub / "queries.csv"), "-k", "4", "--format", "csv",
                 "--out", str(out), *RUN]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["query", "rank", "id", "path", "score", "x1", "y1", "x2", "y2"]
    paths = [str(sub / "q1.jpg"), str(sub / "q2.jpg"), queries[2]]
    boxes = [None, (10.0, 5.0, 120.0, 100.0), None]
    want = [[q, str(r), str(i), p, repr(s)] + (["10", "5", "120", "100"] if b else ["", "", "", ""])
            for q, r, i, p, s, b in expected(store, paths, 4, boxes)]
    assert rows[1:] == want and len(want) == 12
    # the box changes the ranking's scores: it was applied
    plain = expected(store, paths[1:2], 4)
    assert [row[4] for row in want[4:8]] != [repr(s) for *_, s, _ in plain]


def test_files_folders_list_and_csv_in_order(store, queries, query_folder, tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{queries[5]}\n\n{queries[2]}\n")
    qcsv = tmp_path / "q.csv"
    qcsv.write_text(f"{queries[1]},0,0,80,60\n")
    capsys.readouterr()
    assert main(["search", str(store), queries[4], str(query_folder), "--list", str(lst), "--csv", str(qcsv),
                 "-k", "2", "--format", "jsonl", *RUN]) == 0
    got = jsonl_rows(capsys.readouterr().out)
    order = [queries[4], *list_images(query_folder), queries[5], queries[2], queries[1]]
    assert [r["query"] for r in got] == [q for q in order for _ in range(2)]
    assert [r["bbox"] for r in got if "bbox" in r] == [[0, 0, 80, 60]] * 2  # only the CSV row has a box
    boxes = [None] * 6 + [(0.0, 0.0, 80.0, 60.0)]
    want = expected(store, order, 2, boxes)
    assert [(r["query"], r["rank"], r["id"], r["path"], r["score"]) for r in got] == [w[:5] for w in want]


def test_all_queries_are_extracted_in_one_call_and_searched_in_one(store, query_folder, monkeypatch, capsys):
    calls, searches = [], []
    real_extract, real_search = extract_module.extract, Store.search_vectors

    def spy_extract(model, images, **kw):
        calls.append(len(images))
        return real_extract(model, images, **kw)

    def spy_search(self, q, k=10, **kw):
        searches.append(len(q))
        return real_search(self, q, k, **kw)

    monkeypatch.setattr(extract_module, "extract", spy_extract)
    monkeypatch.setattr(Store, "search_vectors", spy_search)
    assert main(["search", str(store), str(query_folder), "-k", "2", "--format", "csv", *RUN]) == 0
    assert calls == [3] and searches == [3]


def test_unreadable_queries_are_skipped_with_the_reason(store, query_folder, tmp_path, capsys):
    (query_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tmp_path / 'missing.jpg'}\n")
    capsys.readouterr()
    assert main(["search", str(store), str(query_folder), "--list", str(lst), "-k", "1", "--format", "jsonl",
                 *RUN]) == 0
    cap = capsys.readouterr()
    assert "skipped 2 of 5 queries" in cap.err
    assert f"{query_folder / 'broken.jpg'}: " in cap.err and f"{tmp_path / 'missing.jpg'}: " in cap.err
    assert [r["query"] for r in jsonl_rows(cap.out)] == [str(query_folder / n) for n in ("a.jpg", "b.jpg", "sub/c.jpg")]
    # none readable: an error, exit status 1
    assert main(["search", str(store), str(query_folder / "broken.jpg"), "--list", str(lst), *RUN]) == 1
    assert "none of the 2 queries could be read" in capsys.readouterr().err


def test_html_sheet_of_a_folder(store, query_folder, tmp_path):
    out = tmp_path / "sheet.html"
    assert main(["search", str(store), str(query_folder), "-k", "2", "--format", "html", "--out", str(out), *RUN]) == 0
    text = out.read_text()
    assert text.count("data:image/jpeg;base64,") == 3 * (1 + 2) and "sub/c.jpg" in text
    # each result links to its photo relative to the page, so that both can move together
    import re
    from urllib.parse import unquote

    links = re.findall(r"<a href='([^']*)'", text)
    assert len(links) == 3 * 2 and "file:" not in text
    assert all(not os.path.isabs(unquote(h)) and (out.parent / unquote(h)).resolve().is_file() for h in links)


def test_bad_arguments_fail_before_any_extraction(store, query_folder, tmp_path, monkeypatch, capsys):
    def no_extraction(*a, **kw):
        raise AssertionError("extraction ran")

    monkeypatch.setattr(extract_module, "extract", no_extraction)
    one = str(query_folder / "a.jpg")
    assert main(["search", str(store), str(query_folder), "--bbox", "0,0,10,10", *RUN]) == 1
    assert "--csv" in capsys.readouterr().err
    assert main(["search", str(store), one, one, "--bbox", "0,0,10,10", *RUN]) == 1
    assert "one --bbox per query file (2); got 1" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a.jpg,1,2\n")
    assert main(["search", str(store), "--csv", str(bad), *RUN]) == 1
    assert f"{bad}:1: expected 'path' or 'path,x1,y1,x2,y2', got 3 fields" in capsys.readouterr().err
    bad.write_text("path\na.jpg,1,2,0,9\n")
    assert main(["search", str(store), "--csv", str(bad), *RUN]) == 1
    assert f"{bad}:2: bad box '1,2,0,9'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["search", str(store), str(empty), *RUN]) == 1
    assert "no images found in folder" in capsys.readouterr().err
    assert main(["search", str(store), *RUN]) == 1
    assert "no queries: give image files, folders, --list FILE or --csv FILE" in capsys.readouterr().err
    assert main(["search", str(store), one, "--format", "png", *RUN]) == 1
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", str(store), one, "-k", "0"])
    assert "expected a positive integer, got '0'" in capsys.readouterr().err
