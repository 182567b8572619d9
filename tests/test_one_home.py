"""One home per concept: the modules that need a concept use its one definition."""

import importlib
from pathlib import Path

import torch

import imret.losses.contrastive
import imret.losses.triplet
import imret.mining
import imret.precision
import imret.train.config

extract_module = importlib.import_module("imret.extract")  # (imret.extract is also a function's name)
SRC = Path(imret.precision.__file__).resolve().parent


def test_losses_take_their_pairs_and_triplets_from_mining():
    assert imret.losses.triplet.all_triplets is imret.mining.all_triplets
    assert not hasattr(imret.losses.contrastive, "all_pairs") or \
        imret.losses.contrastive.all_pairs is imret.mining.all_pairs
    x = torch.nn.functional.normalize(torch.randn(9, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 3])
    for reduction in ("mean", "sum"):
        by_labels = imret.losses.contrastive.contrastive_loss(x, labels, reduction=reduction)
        a1, p, a2, n = imret.mining.all_pairs(labels, both_orders=False)
        by_pairs = imret.losses.contrastive.contrastive_loss(x, pairs=(a1, p, a2, n), reduction=reduction)
        torch.testing.assert_close(by_labels, by_pairs)  # (the loss formula itself: test_losses_pairs.py)


def test_one_list_of_precisions_and_one_choice_of_autocast():
    assert extract_module.PRECISIONS is imret.precision.PRECISIONS is imret.train.config.PRECISIONS
    assert imret.precision.autocast_dtype("fp32", "cpu") is None
    for bad in ("fp8", "FP32", ""):
        try:
            imret.precision.autocast_dtype(bad, "cpu")
        except ValueError as e:
            assert "available: fp32, bf16, fp16" in str(e)
        else:
            raise AssertionError(f"{bad!r} accepted")


def test_exif_orientation_is_read_in_one_place():
    readers = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                     if "0x0112" in p.read_text() or "getexif" in p.read_text())
    assert readers == ["images.py"], readers


def test_positive_integer_checks_have_one_wording():
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if p.name != "_checks.py" and "not isinstance(k, (int, np.integer)) or k < 1" in p.read_text()]
    assert offenders == [], offenders
