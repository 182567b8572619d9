import json
import math
import os
import struct
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imret.extract import (
    combine_scales,
    extract,
    extract_descriptors,
    is_plain_path,
    load_extraction,
    read_paths_file,
    save_extraction,
)
from imret.images import ImageError, load_image, to_tensor
from imret.model import create_model
from imret.synthetic import make_object, random_view


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("resnet18", "gem")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six JPEGs of three different sizes, in an order that interleaves the sizes."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    sizes = [(160, 120), (120, 160), (200, 100), (160, 120), (200, 100), (120, 160)]
    paths = []
    for i, s in enumerate(sizes):
        p = d / f"img{i}.jpg"
        random_view(make_object(rng, 256), rng, s).save(p, quality=92)
        paths.append(str(p))
    return paths


def _reference(model, path, image_size, scales=(1.0,), bbox=None):
    """Slow reference: one image at a time, plain fp32, explicit power mean."""
    img = load_image(path, image_size=image_size, bbox=bbox)
    x = to_tensor(img, model.mean, model.std)[None]
    p = model.multiscale_power()
    descs = []
    with torch.no_grad():
        for s in scales:
            xs = x if s == 1 else F.interpolate(
                x, size=(round(x.shape[2] * s), round(x.shape[3] * s)), mode="bilinear", align_corners=False, antialias=s < 1
            )
            descs.append(model.to(memory_format=torch.contiguous_format)(xs.contiguous()))
    v = torch.stack(descs).pow(p).mean(0).pow(1 / p)
    return F.normalize(v, dim=1)[0].numpy()


@pytest.mark.parametrize("batch_size,workers", [(1, 0), (2, 2), (4, 1)])
def test_rows_in_input_order_match_reference(model, photos, batch_size, workers):
    d = extract_descriptors(model, photos, image_size=128, batch_size=batch_size, workers=workers)
    assert d.shape == (6, 512) and d.dtype == np.float32
    for i, p in enumerate(photos):
        ref = _reference(model, p, 128)
        assert float(d[i] @ ref) > 0.99999, i
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)


def test_multiscale_power_mean(model, photos):
    scales = (1.0, 1 / math.sqrt(2), 0.5)
    d = extract_descriptors(model, photos[:3], scales=scales, image_size=128, batch_size=2)
    for i in range(3):
        ref = _reference(model, photos[i], 128, scales)
        assert float(d[i] @ ref) > 0.99999
    single = extract_descriptors(model, photos[:3], image_size=128)
    assert not np.allclose(d, single, atol=1e-4)  # the scales did change the descriptor


def test_combine_scales_closed_form():
    a = F.normalize(torch.rand(3, 8) + 0.1, dim=1)
    b = F.normalize(torch.rand(3, 8) + 0.1, dim=1)
    torch.testing.assert_close(combine_scales([a, b], 1.0), F.normalize((a + b) / 2, dim=1))
    torch.testing.assert_close(combine_scales([a, b], 3.0), F.normalize(((a**3 + b**3) / 2) ** (1 / 3), dim=1))
    torch.testing.assert_close(combine_scales([a], 3.0), a)
    with pytest.raises(ValueError, match="non-negative"):
        combine_scales([a, -b], 3.0)


def test_whitened_model_uses_arithmetic_mean():
    m = create_model("resnet18", "gem", whitening=16)
    assert m.multiscale_power() == 1.0
    assert create_model("resnet18", "gem", pool_kwargs={"p": 4.0}).multiscale_power() == pytest.approx(4.0)
    assert create_model("resnet18", "mac").multiscale_power() == 1.0


def test_bbox_crop_before_resize(model, photos, tmp_path):
    box = (20.0, 10.0, 130.0, 100.0)
    cropped = tmp_path / "crop.png"
    Image.open(photos[0]).convert("RGB").crop((20, 10, 130, 100)).save(cropped)
    d = extract_descriptors(model, [photos[0], photos[1]], image_size=96, bboxes=[box, None], crop_resize="crop")
    ref = extract_descriptors(model, [str(cropped)], image_size=96, draft=False)
    assert float(d[0] @ ref[0]) > 0.999
    # default: the crop is scaled like the whole image (160 px -> 96 px, factor 0.6): a
    # 110x90 crop becomes 66x54, the same as cropping the file and resizing it to 66 px
    d_img = extract_descriptors(model, [photos[0]], image_size=96, bboxes=[box])
    ref_img = extract_descriptors(model, [str(cropped)], image_size=66, draft=False)
    assert float(d_img[0] @ ref_img[0]) > 0.999
    assert float(d_img[0] @ d[0]) < 0.9999
    full = extract_descriptors(model, [photos[0]], image_size=96)
    assert float(d[0] @ full[0]) < 0.9999


def test_bad_files_are_skipped_and_reported(model, photos, tmp_path):
    zero = tmp_path / "zero.jpg"
    zero.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    data = open(photos[0], "rb").read()
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    missing = tmp_path / "missing.jpg"
    inputs = [photos[0], str(zero), photos[1], str(text), str(trunc), str(missing), photos[2]]
    res = extract(model, inputs, image_size=96, workers=2)
    assert [s.path for s in res.skipped] == [str(zero), str(text), str(trunc), str(missing)]
    assert [s.index for s in res.skipped] == [1, 3, 4, 5]
    assert all(s.reason for s in res.skipped)
    assert list(res.indices) == [0, 2, 6] and res.paths == [photos[0], photos[1], photos[2]]
    good = extract_descriptors(model, [photos[0], photos[1], photos[2]], image_size=96)
    np.testing.assert_allclose(res.descriptors, good, atol=1e-6)

    with pytest.raises(ImageError, match="zero.jpg"):
        extract(model, inputs, image_size=96, on_error="raise")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = extract_descriptors(model, inputs, image_size=96, on_error="skip")
    assert np.isnan(d[[1, 3, 4, 5]]).all() and not np.isnan(d[[0, 2, 6]]).any()
    assert any("skipped 4 image(s)" in str(x.message) for x in w)


def test_many_sizes_bounded_buckets(model, tmp_path):
    rng = np.random.default_rng(1)
    obj = make_object(rng, 128)
    paths = []
    for i in range(20):  # 20 distinct sizes, batch 8: buckets never fill, the pending limit flushes
        p = tmp_path / f"s{i}.png"
        random_view(obj, rng, (60 + 2 * i, 50)).save(p)
        paths.append(str(p))
    d = extract_descriptors(model, paths, image_size=256, batch_size=8, workers=2)
    for i in (0, 7, 19):
        assert float(d[i] @ _reference(model, paths[i], 256)) > 0.99999


def test_argument_errors(model, photos):
    with pytest.raises(ValueError, match="unknown precision 'fp8'; available: fp32, bf16, fp16"):
        extract(model, photos, precision="fp8")
    with pytest.raises(ValueError, match="scales must be positive"):
        extract(model, photos, scales=(1, 0))
    with pytest.raises(ValueError, match="unknown on_error"):
        extract(model, photos, on_error="ignore")
    with pytest.raises(ValueError, match="got 1 bboxes for 6 images"):
        extract(model, photos, bboxes=[None])
    with pytest.raises(ValueError, match="fp16"):
        extract(model, photos, precision="fp16", device="cpu")


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="CPU without native bf16")
def test_bf16_close_to_fp32(model, photos):
    a = extract_descriptors(model, photos, image_size=128)
    b = extract_descriptors(model, photos, image_size=128, precision="bf16")
    cos = (a * b).sum(1)
    assert cos.min() > 0.99


def _patch_jpeg_size(src: str, dst, width: int, height: int) -> str:
    """A copy of the JPEG ``src`` whose baseline start-of-frame header claims ``width x height``."""
    data = bytearray(open(src, "rb").read())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    dst.write_bytes(bytes(data))
    return str(dst)


def test_jpeg_header_bigger_than_its_data_is_skipped_not_indexed(model, photos, tmp_path):
    # the header says 9000x9000, the data holds 160x120: libjpeg pads the rest with grey,
    # and the file used to come back as a descriptor of a grey 9000x9000 image
    huge = _patch_jpeg_size(photos[0], tmp_path / "huge.jpg", 9000, 9000)
    res = extract(model, [photos[1], huge, photos[2]], image_size=96, workers=2, max_pixels=10**9)
    assert list(res.indices) == [0, 2] and res.paths == [photos[1], photos[2]]
    assert [(s.index, s.path) for s in res.skipped] == [(1, huge)]
    assert "ends before the 9000x9000 pixels its header declares" in res.skipped[0].reason
    with pytest.raises(ImageError, match="huge.jpg"):
        extract(model, [huge], image_size=96, on_error="raise", max_pixels=10**9)


def test_unsupported_types_and_special_files_are_skipped_with_reasons(model, photos, tmp_path):
    renamed = tmp_path / "photo.xyz"  # a valid JPEG, but not of a supported type by name
    renamed.write_bytes(open(photos[0], "rb").read())
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    res = extract(model, [str(renamed), photos[0], str(folder), str(empty)], image_size=96, workers=0)
    assert list(res.indices) == [1]
    reasons = {s.path: s.reason for s in res.skipped}
    assert reasons[str(renamed)].startswith("unsupported image type '.xyz'; supported: ")
    assert ".jpg" in reasons[str(renamed)]
    assert reasons[str(folder)] == "is a directory"
    assert "empty file" in reasons[str(empty)]


def test_is_plain_path():
    for plain in ("a.jpg", "dir/caf\u00e9 photo.jpg", "\u65e5\u672c.png"):
        assert is_plain_path(plain), plain
    for odd in ("a\nb.jpg", "a\rb.jpg", "a\tb.jpg", "a\x1b[31mb.jpg", "a\x85b.jpg", "a\u2028b.jpg",
                "a\udcffb.jpg", "a\x7fb.jpg"):
        assert not is_plain_path(odd), repr(odd)


def test_save_and_load_extraction_keep_rows_and_paths_aligned(tmp_path):
    from imret.extract import Extraction, SkippedImage

    paths = ["/p/a\nb.jpg", "/p/plain.jpg", "/p/c\r\n.jpg", "/p/\u2028x.jpg", "/p/\udcff.jpg", "/p/caf\u00e9.jpg"]
    rows = np.arange(len(paths) * 4, dtype=np.float32).reshape(len(paths), 4)
    res = Extraction(rows, np.arange(len(paths)), paths, [SkippedImage(9, "/p/bad\n.jpg", "empty file")])
    stale = tmp_path / "f.paths.txt"
    stale.write_text("an older run's paths\n")
    saved = save_extraction(tmp_path / "f.npy", res, {"model": "m"})
    assert saved.paths_txt is None and not stale.exists()  # no old list left to misread
    lines = saved.paths.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == len(rows)  # one line per row, whatever the names
    assert saved.paths.read_bytes().isascii()
    meta = json.loads(saved.metadata.read_text())
    assert meta["n"] == 6 and meta["dim"] == 4 and meta["model"] == "m"
    assert meta["paths"] == "f.paths.jsonl" and meta["paths_txt"] is None
    assert "f.paths.txt not written" in meta["paths_txt_omitted"] and "f.paths.txt not written" in saved.note
    assert meta["skipped"] == [{"path": "/p/bad\n.jpg", "reason": "empty file"}]
    d, back, meta2 = load_extraction(tmp_path / "f")
    assert back == paths and meta2 == meta
    np.testing.assert_array_equal(d, rows)
    assert [os.fsencode(p) for p in back] == [os.fsencode(p) for p in paths]  # undecodable bytes survive

    plain = Extraction(rows[:2], np.arange(2), ["/p/a.jpg", "/p/caf\u00e9.jpg"])
    saved = save_extraction(tmp_path / "g", plain)
    assert saved.paths_txt is not None and saved.note is None
    assert saved.paths_txt.read_text(encoding="utf-8").splitlines() == plain.paths
    assert read_paths_file(saved.paths) == read_paths_file(saved.paths_txt) == plain.paths
    saved.paths.unlink()  # an extraction written before .paths.jsonl existed
    assert load_extraction(tmp_path / "g.npy")[1] == plain.paths


def test_load_extraction_refuses_misaligned_files(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((3, 2), np.float32))
    (tmp_path / "f.paths.txt").write_text("a.jpg\nb\nc.jpg\nd.jpg\n")  # a name split in two
    with pytest.raises(ValueError, match="lists 4 paths for the 3 rows"):
        load_extraction(tmp_path / "f.npy")
    (tmp_path / "f.paths.jsonl").write_text('"a.jpg"\n"b\\nc.jpg"\n"d.jpg"\n')
    assert load_extraction(tmp_path / "f.npy")[1] == ["a.jpg", "b\nc.jpg", "d.jpg"]
    (tmp_path / "f.paths.jsonl").write_text('"a.jpg"\n3\n"d.jpg"\n')
    with pytest.raises(ValueError, match="f.paths.jsonl:2: expected a JSON string"):
        load_extraction(tmp_path / "f.npy")
