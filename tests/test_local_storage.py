"""Fixed-size local-feature records: round trip against the originals, sizes, damage."""

import numpy as np
import pytest

from imret.local import LocalFeatures
from imret.local.storage import RecordLayout


def _feats(n, dim, signed, seed=0, size=(4000, 3000)):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n, dim)).astype(np.float32)
    if not signed:
        d = np.abs(d)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    kp = rng.uniform(0, 1, (n, 2)).astype(np.float32) * np.array(size, np.float32)
    return LocalFeatures(kp, d, size, None, "x")


@pytest.mark.parametrize("codec,signed", [("u8", False), ("i8", True)])
def test_round_trip_is_close(codec, signed):
    lay = RecordLayout(50, 128, codec, "x")
    f = _feats(37, 128, signed)
    rec = lay.pack(f)
    assert rec.nbytes == lay.nbytes == 16 + 50 * (4 + 128)
    g = lay.unpack(rec)
    assert len(g) == 37 and g.size == f.size and g.kind == "x"
    assert np.abs(g.keypoints - f.keypoints).max() <= 4000 / 65535 / 2 + 1e-3
    cos = (g.descriptors * f.descriptors).sum(1)
    assert cos.min() > 0.999
    np.testing.assert_allclose(np.linalg.norm(g.descriptors, axis=1), 1.0, atol=1e-5)


def test_extra_keypoints_are_dropped_and_empty_records_read_back():
    lay = RecordLayout(10, 8, "i8")
    f = _feats(25, 8, True)
    g = lay.unpack(lay.pack(f))
    assert len(g) == 10
    np.testing.assert_allclose(g.keypoints, f.keypoints[:10], atol=0.05)
    assert lay.unpack(lay.pack(None)) is None
    e = lay.unpack(lay.pack(LocalFeatures.empty(8, (640, 480))))
    assert e is not None and len(e) == 0 and e.size == (640, 480)


def test_rows_are_float32_views_of_whole_records():
    lay = RecordLayout(3, 5, "u8")  # 16 + 3 * 9 = 43 bytes -> 44
    assert lay.nbytes == 44 and lay.width == 11
    rows = lay.pack_many([_feats(2, 5, False, seed=1), None, _feats(3, 5, False, seed=2)])
    assert rows.shape == (3, 11) and rows.dtype == np.float32
    assert lay.unpack(rows[1]) is None
    assert len(lay.unpack(rows[2])) == 3


def test_damage_and_bad_layouts_are_named():
    lay = RecordLayout(4, 8)
    rec = lay.pack(_feats(3, 8, False))
    rec[:4].view(np.uint32)[0] = 99
    with pytest.raises(ValueError, match="damaged"):
        lay.unpack(rec)
    with pytest.raises(ValueError, match="bytes"):
        lay.unpack(rec[:-4])
    with pytest.raises(ValueError, match="codec"):
        RecordLayout(4, 8, "f64")
    with pytest.raises(ValueError, match="max_keypoints"):
        RecordLayout(0, 8)
    with pytest.raises(ValueError, match="dimension"):
        lay.pack(_feats(3, 16, False))
    assert RecordLayout.from_dict(lay.to_dict()) == lay
    with pytest.raises(ValueError, match="keys"):
        RecordLayout.from_dict({"dim": 3})
