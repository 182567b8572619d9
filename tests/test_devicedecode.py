"""The device-decoding path of extraction, run on the CPU (torchvision's libjpeg-turbo): the
same input sizes and crops as Pillow's path, pixels within the resize filters' difference,
EXIF orientation applied, and a fallback (None) for what the device decoder cannot take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imret.devicedecode import DECODERS, decode_jpeg_on, device_decoding, read_jpeg
from imret.images import ImageError, load_image, to_tensor

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo(tmp_path, w=301, h=217, orientation=None, name="p.jpg"):
    """A smooth colour image with a sharp marker in one corner (so a wrong rotation shows)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h) + 60], -1).astype(np.uint8)
    rgb[5:40, 5:60] = (255, 255, 255)
    img = Image.fromarray(rgb)
    path = tmp_path / name
    kw = {"quality": 95}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    img.save(path, **kw)
    return str(path)


def _cpu(path, **kw):
    return to_tensor(load_image(path, **kw), MEAN, STD)


@pytest.mark.parametrize(
    "image_size, bbox, crop_resize, orientation",
    [(None, None, "image", None), (128, None, "image", None), (96, (30.5, 20, 200.2, 180), "image", None),
     (96, (30.5, 20, 200.2, 180), "crop", None), (128, None, "image", 6), (100, (10, 40, 150, 290), "image", 8)],
)
def test_same_sizes_and_close_pixels_as_pillow(tmp_path, image_size, bbox, crop_resize, orientation):
    path = _photo(tmp_path, orientation=orientation)
    data = read_jpeg(path)
    assert data is not None and data.dtype == torch.uint8 and data.dim() == 1
    got = decode_jpeg_on(data, "cpu", image_size=image_size, mean=MEAN, std=STD, bbox=bbox,
                         crop_resize=crop_resize, path=path)
    ref = _cpu(path, image_size=image_size, bbox=bbox, crop_resize=crop_resize)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # in grey levels: the same decode (libjpeg-turbo both), different resize filters
    diff = ((got - ref) * torch.tensor(STD).view(3, 1, 1) * 255).abs()
    limit = 1.0 if image_size is None else 3.0
    assert diff.mean() < limit, diff.mean()
    # the marker is where Pillow has it: orientation and crop are the same
    assert ((got.mean(0) > 1.5) == (ref.mean(0) > 1.5)).float().mean() > 0.97


def test_other_formats_and_bad_data_fall_back(tmp_path):
    png = tmp_path / "p.png"
    Image.new("RGB", (40, 30), (9, 9, 9)).save(png)
    assert read_jpeg(png) is None  # Pillow's path
    path = _photo(tmp_path)
    good = read_jpeg(path)
    broken = good.clone()
    broken[200:] = 7  # scan data destroyed: the decoder refuses it, Pillow names the fault
    assert decode_jpeg_on(broken, "cpu", image_size=64, mean=MEAN, std=STD) is None
    with pytest.raises(ImageError, match="no such file"):
        read_jpeg(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="does not overlap"):
        decode_jpeg_on(good, "cpu", image_size=64, mean=MEAN, std=STD, bbox=(400, 400, 500, 500))


def test_decode_choices():
    assert DECODERS == ("auto", "cpu", "device")
    assert device_decoding("auto", torch.device("cpu")) is False  # Pillow on CPU machines
    assert device_decoding("device", torch.device("cpu")) is True
    assert device_decoding("cpu", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="unknown decode 'gpu'; available: auto, cpu, device"):
        device_decoding("gpu", torch.device("cpu"))


def test_extract_with_device_decoding_matches_pillow(tmp_path):
    """extract(decode="device") on the CPU: the same rows and skips as Pillow's path, descriptors
    within the resize filters' difference; a PNG and a broken JPEG go through Pillow."""
    import imret
    from imret.extract import extract

    torch.manual_seed(0)
    model = imret.create_model("resnet18", "gem", pretrained=False)
    paths = [_photo(tmp_path, 301 + 7 * i, 217 + 5 * i, orientation=(6 if i == 2 else None), name=f"p{i}.jpg")
             for i in range(4)]
    Image.open(paths[0]).save(tmp_path / "q.png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(open(paths[1], "rb").read()[:300])
    images = paths + [str(tmp_path / "q.png"), str(broken)]
    boxes = [None, (20, 10, 250, 200), None, None, None, None]
    ref = extract(model, images, bboxes=boxes, image_size=160, workers=2, decode="cpu")
    got = extract(model, images, bboxes=boxes, image_size=160, workers=2, decode="device")
    assert got.indices.tolist() == ref.indices.tolist() == [0, 1, 2, 3, 4]
    assert [s.reason for s in got.skipped] == [s.reason for s in ref.skipped] and len(ref.skipped) == 1
    cos = (got.descriptors * ref.descriptors).sum(1)
    assert cos.min() > 0.999, cos
    assert cos[4] > 0.99999  # the PNG: Pillow on both paths
    # auto is Pillow on a CPU: bit-identical to decode="cpu"
    auto = extract(model, images, bboxes=boxes, image_size=160, workers=2)
    np.testing.assert_array_equal(auto.descriptors, ref.descriptors)
    with pytest.raises(ValueError, match="unknown decode"):
        extract(model, images, decode="nvjpeg")
