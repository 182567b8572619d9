"""Searching from Python: paths, PIL images and RGB arrays alike; the result classes (repr,
notebook HTML); Store.add with folders; clear errors for other kinds."""

import base64
import html
import importlib
import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from imret.images import ImageError, list_images
from imret.index.store import Hit, Preprocessing, SearchHits, SearchResults, Store
from imret.retrieval import Encoder, Retriever

pytestmark = pytest.mark.usefixtures("one_torch_thread")
extract_module = importlib.import_module("imret.extract")

PRE = Preprocessing(image_size=96)
FAST = dict(workers=0)


@pytest.fixture(scope="module")
def photos(small_photos):
    return small_photos


@pytest.fixture(scope="module")
def built(small_store):
    return small_store


def ids_and_scores(hits):
    return [h.id for h in hits], np.array([h.score for h in hits])


def test_pil_images_and_arrays_rank_like_their_files(built, photos):
    pil = Image.open(photos[3])  # lazily opened, as a user would
    arr = np.asarray(Image.open(photos[11]).convert("RGB"))
    box = (10, 10, 90, 80)
    with Store.open(built) as st:
        res = st.search([photos[3], pil, arr, photos[11]], bboxes=[None, None, box, box], k=6, **FAST)
        assert isinstance(res, SearchResults) and all(isinstance(r, SearchHits) for r in res)
        for a, b in ((0, 1), (3, 2)):
            ia, sa = ids_and_scores(res[a])
            ib, sb = ids_and_scores(res[b])
            assert ia == ib and len(ia) == 6
            np.testing.assert_allclose(sa, sb, atol=1e-5)
        assert res[0][0].id == 3 and res[1][0].score == pytest.approx(1, abs=1e-4)
        assert res[0].query == photos[3] and res[0].image is None and res[0].bbox is None
        assert res[1].query == f"<PIL image #1 from {photos[3].rsplit('/', 1)[1]}: 160x120 RGB>" and res[1].image is pil
        assert res[2].query == "<array image #2: 120x160x3>" and res[2].bbox == (10.0, 10.0, 90.0, 80.0)
        # one image alone: its own hits, not a list of one; its box may come alone too
        one = st.search(pil, k=3, **FAST)
        assert isinstance(one, SearchHits) and [h.id for h in one] == ids_and_scores(res[1])[0][:3]
        boxed = st.search(arr, bboxes=box, k=6, **FAST)
        assert [h.id for h in boxed] == ids_and_scores(res[2])[0]
        # an image in memory is not rotated by EXIF: its pixels are used as given
        rotated = Image.open(photos[3]).transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        rotated.save(buf, "JPEG", exif=exif.tobytes())
        as_loaded = Image.open(io.BytesIO(buf.getvalue()))
        assert st.search(as_loaded, k=1, **FAST)[0].score == pytest.approx(
            st.search(np.asarray(as_loaded.convert("RGB")), k=1, **FAST)[0].score, abs=1e-6)


def test_other_kinds_are_refused_naming_the_accepted_ones(built, photos, tiny_model):
    with Store.open(built) as st:
        for bad in (b"a.jpg", 3, {"path": "a.jpg"}):
            with pytest.raises(TypeError, match=r"image 0: expected a path \(str or os.PathLike\), a PIL.Image.Image, "
                                                r"or an H x W x 3 uint8 numpy array \(RGB\); got "):
                st.search([bad], **FAST)
        with pytest.raises(TypeError, match="image 1: an image array must be uint8"):
            st.search([photos[0], np.zeros((8, 8, 3), np.float32)], **FAST)
        with pytest.raises(ValueError, match=r"must be H x W x 3 \(RGB\), got shape \(8, 8\)"):
            st.search(np.zeros((8, 8), np.uint8), **FAST)
        with pytest.raises(ValueError, match="got 1 bboxes for 2 queries"):
            st.search(photos[:2], bboxes=[None], **FAST)
        with pytest.raises(ValueError, match="k must be"):
            st.search(photos[0], k=0)
    with pytest.raises(TypeError, match="images must be a sequence of images, got a single str; wrap it in a list"):
        Encoder(tiny_model, image_size=64, workers=0).encode(photos[0])
    with pytest.raises(TypeError, match="got a single Image"):
        extract_module.extract(tiny_model, Image.new("RGB", (8, 8)))


def test_unreadable_query_raises_or_is_skipped(built, photos, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with Store.open(built) as st:
        with pytest.raises(ImageError, match="bad.jpg"):
            st.search([photos[0], str(bad)], k=2, **FAST)
        res = st.search([photos[0], str(bad), np.full((40, 50, 3), 7, np.uint8)], k=2, on_error="skip", **FAST)
        assert [len(r) for r in res] == [2, 0, 2] and res[0].error is None and res[2].error is None
        assert res[1].query == str(bad) and "Truncated File Read" in res[1].error
        assert "bad.jpg: not searched (" in repr(res[1])
        with pytest.raises(ValueError, match="unknown on_error 'ignore'"):
            st.search(photos[0], on_error="ignore")


def test_retriever_takes_images_in_memory(photos, tiny_model):
    enc = Encoder(tiny_model, image_size=96, workers=0)
    r = Retriever(encoder=enc)
    r.index_images(photos)
    by_path = r.search(images=[photos[7]], k=5)
    by_pil = r.search(images=Image.open(photos[7]), k=5)  # one image alone: one row
    by_array = r.search(images=[np.asarray(Image.open(photos[7]).convert("RGB"))], k=5)
    assert by_pil.ids.tolist() == by_path.ids.tolist() == by_array.ids.tolist() and by_path.ids[0, 0] == 7
    np.testing.assert_allclose(by_pil.scores, by_path.scores, atol=1e-5)


def test_add_takes_folders_and_refuses_images_in_memory(tmp_path, photos, tiny_model):
    folder = tmp_path / "in"
    (folder / "x").mkdir(parents=True)
    for i, p in enumerate(photos[:3]):
        shutil.copy(p, folder / "x" / f"{i}.jpg")
    shutil.copy(photos[3], folder / "3.jpg")
    with Store.create(tmp_path / "s", tiny_model, preprocessing=PRE) as st:
        r = st.add(str(folder), **FAST)  # one folder, alone
        assert r.added == [0, 1, 2, 3] and [rec.path for rec in st.records(r.added)] == list_images(folder)
        r = st.add([folder / "x", photos[4]], **FAST)  # folders among files
        assert r.added == [4] and len(r.duplicates) == 3
        with pytest.raises(TypeError, match=r"item 1 is a Image; a store indexes files: save the image first"):
            st.add([photos[5], Image.new("RGB", (32, 32))], **FAST)
        with pytest.raises(TypeError, match="item 0 is a ndarray; a store indexes files"):
            st.add(np.zeros((32, 32, 3), np.uint8), **FAST)
        assert len(st) == 5  # nothing of a refused call was added


def data_uris(text):
    return re.findall(r"src='data:image/jpeg;base64,([A-Za-z0-9+/=]+)'", text)


def test_results_show_as_a_table_and_as_thumbnails(photos, tmp_path):
    odd = tmp_path / "a<script>&'x.jpg"
    shutil.copy(photos[0], odd)
    hits = SearchHits([Hit(0.91234, 7, str(odd)), Hit(0.5, 3, photos[3]), Hit(0.25, 9, str(tmp_path / "gone.jpg"))],
                      query=photos[1], bbox=(10, 20, 90, 100))
    assert repr(hits).splitlines() == [
        f"3 hits for {photos[1]} [10,20,90,100]",
        f"     1   0.9123  id 7       {odd}",
        f"     2   0.5000  id 3       {photos[3]}",
        f"     3   0.2500  id 9       {tmp_path / 'gone.jpg'}",
    ]
    page = hits._repr_html_()
    assert len(data_uris(page)) == 1 + 3  # the query, then each hit (a missing file gets a placeholder)
    assert "<script>" not in page and html.escape(odd.name) in page and "#1 · 0.9123" in page
    with Image.open(io.BytesIO(base64.b64decode(data_uris(page)[1]))) as im:
        assert im.size == (128, 128)  # bounded thumbnails
    many = SearchHits([Hit(1.0 - i / 100, i, photos[i % len(photos)]) for i in range(60)], query=photos[0])
    page = many._repr_html_()
    assert len(data_uris(page)) == 1 + 50 and "... and 10 more" in page
    in_memory = SearchHits([], query="<array image #0: 20x30x3>", image=np.zeros((20, 30, 3), np.uint8),
                           error="cannot use image")
    page = in_memory._repr_html_()
    assert len(data_uris(page)) == 1 and "not searched: cannot use image" in page
    both = SearchResults([hits, in_memory])
    assert both._repr_html_() == hits._repr_html_() + in_memory._repr_html_()
    assert repr(both) == repr(hits) + "\n" + repr(in_memory)
    assert hits == [Hit(0.91234, 7, str(odd)), Hit(0.5, 3, photos[3]), Hit(0.25, 9, str(tmp_path / "gone.jpg"))]
