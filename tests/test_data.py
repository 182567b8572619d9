"""Tests for imret.data: layouts on generated images, deterministic augmentation,
bad files, and the class-balanced sampler."""

from __future__ import annotations

import collections
import os
import pickle
import random
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imret.data import (
    ClassBalancedBatchSampler,
    ImageListDataset,
    LabelledImages,
    LazyImages,
    RetrievalAugment,
    TorchvisionTransform,
    TupleDataset,
    cid2filename,
    collate_images,
    collate_tuples,
    find_bad_images,
    gldv2_path,
    load_csv_dataset,
    load_folder_dataset,
    load_sfm120k,
    sample_rng,
)
from imret.images import ImageError, load_image, to_tensor
from imret.mining import make_tuples
from imret.synthetic import make_labelled_folder

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_labelled_folder(tmp_path_factory.mktemp("folder"), n_classes=4, per_class=3, size=(80, 60), seed=1)


def all_images(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


# ------------------------------------------------------------------------------- layouts


def test_load_folder_dataset(folder, tmp_path):
    images = load_folder_dataset(folder)
    assert images.classes == [f"object_{c:03d}" for c in range(4)]
    assert len(images) == 12 and images.num_classes == 4
    np.testing.assert_array_equal(images.labels, np.repeat(np.arange(4), 3))
    assert all(Path(p).parent.name == images.classes[c] for p, c in zip(images.paths, images.labels))
    assert images.pairs is None and images.qidxs is None
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(images.paths[0], tmp_path / "a" / "x.jpg")
    with pytest.raises(ValueError, match=r"without images: \['b'\]"):
        load_folder_dataset(tmp_path)
    with pytest.raises(NotADirectoryError):
        load_folder_dataset(tmp_path / "a" / "x.jpg")


def test_load_plain_csv(folder, tmp_path):
    rel = [p.relative_to(folder).as_posix() for p in all_images(folder)]
    labels = ["10", "2", "10", "33"] * 3
    csv = tmp_path / "train.csv"
    csv.write_text("Path,Label\n" + "".join(f"{p},{lab}\n" for p, lab in zip(rel, labels)) + "\n")
    images = load_csv_dataset(csv, folder, check_exists=True)
    assert images.classes == ["2", "10", "33"]  # numeric order
    assert [images.classes[i] for i in images.labels] == labels
    assert images.paths == [os.path.join(folder, p) for p in rel]
    # default image root: the CSV's folder
    assert load_csv_dataset(csv).paths[0] == os.path.join(tmp_path, rel[0])
    with pytest.raises(FileNotFoundError):
        load_csv_dataset(csv, check_exists=True)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.jpg,1\nb.jpg\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: expected 2 columns"):
        load_csv_dataset(bad)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("file,class\na.jpg,1\n")
    with pytest.raises(ValueError, match="known layouts: id,url,landmark_id"):
        load_csv_dataset(unknown)


def test_gldv2_layouts(folder, tmp_path):
    assert gldv2_path("/data/train", "6e158a47eb2ca3f6") == os.path.join("/data/train", "6", "e", "1", "6e158a47eb2ca3f6.jpg")
    with pytest.raises(ValueError, match="GLDv2 image id"):
        gldv2_path("/data", "ab")
    root = tmp_path / "train"
    src = all_images(folder)
    ids = [f"{i:x}{'f0e1d2c3b4a59687'}"[:16] for i in range(12)]
    landmarks = [7, 7, 7, 12, 12, 12, 3, 3, 3, 40, 40, 40]
    for i, image_id in enumerate(ids):
        dest = Path(gldv2_path(root, image_id))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src[i], dest)
    train = tmp_path / "train.csv"
    train.write_text("id,url,landmark_id\n" + "".join(f"{i},http://x/{i},{m}\n" for i, m in zip(ids, landmarks)))
    images = load_csv_dataset(train, root, check_exists=True)
    assert images.classes == ["3", "7", "12", "40"]
    assert [int(images.classes[c]) for c in images.labels] == landmarks
    assert images.paths[0] == str(root / ids[0][0] / ids[0][1] / ids[0][2] / f"{ids[0]}.jpg")
    # train_clean.csv: one landmark per row, its images space-separated
    clean = tmp_path / "train_clean.csv"
    groups = collections.defaultdict(list)
    for i, m in zip(ids, landmarks):
        groups[m].append(i)
    clean.write_text("landmark_id,images\n" + "".join(f"{m},{' '.join(v)}\n" for m, v in groups.items()))
    images2 = load_csv_dataset(clean, root, check_exists=True)
    assert sorted(zip(images2.paths, images2.labels.tolist())) == sorted(zip(images.paths, images.labels.tolist()))
    ds = ImageListDataset.from_images(images, image_size=40, mean=MEAN, std=STD)
    x, label, index = ds[5]
    assert x.shape[0] == 3 and max(x.shape[1:]) == 40 and label == images.labels[5] and index == 5


def write_sfm(tmp_path: Path, folder: Path) -> tuple[Path, Path, dict]:
    src = all_images(folder)
    root = tmp_path / "ims"
    cids = [f"{i:02d}a1b2c3d4e5f6{i:04d}" for i in range(12)]
    for i, cid in enumerate(cids):
        dest = Path(cid2filename(cid, root))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src[i], dest)
    db = {
        "train": {
            "cids": cids[:8],
            "cluster": [5, 5, 9, 9, 9, 2, 2, 5],
            "qidxs": [0, 2, 3, 5],
            "pidxs": [1, 4, 2, 6],
        },
        "val": {"cids": cids[8:], "cluster": np.array([1, 1, 4, 4]), "qidxs": np.array([0, 2]), "pidxs": np.array([1, 3])},
    }
    pkl = tmp_path / "retrieval-SfM-120k.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(db, f)
    return pkl, root, db


def test_load_sfm120k(folder, tmp_path):
    assert cid2filename("abcdef123456", "/r") == os.path.join("/r", "56", "34", "12", "abcdef123456")
    pkl, root, db = write_sfm(tmp_path, folder)
    train = load_sfm120k(pkl, root, "train")
    assert len(train) == 8 and train.classes == ["2", "5", "9"]
    assert [train.classes[c] for c in train.labels] == [str(c) for c in db["train"]["cluster"]]
    np.testing.assert_array_equal(train.qidxs, db["train"]["qidxs"])
    np.testing.assert_array_equal(train.pidxs, db["train"]["pidxs"])
    assert all(os.path.isfile(p) for p in train.paths)
    assert train.paths[3] == cid2filename(db["train"]["cids"][3], root)
    val = load_sfm120k(pkl, root, "val")
    assert len(val) == 4 and val.pairs.tolist() == [[0, 1], [2, 3]]
    ds = ImageListDataset.from_images(train, image_size=32, mean=MEAN, std=STD)
    assert max(ds[0][0].shape[1:]) == 32
    # a flat file (the whitening pickle's layout) and the error cases
    flat = tmp_path / "flat.pkl"
    flat.write_bytes(pickle.dumps(db["train"]))
    assert load_sfm120k(flat, root, None).pairs.tolist() == train.pairs.tolist()
    with pytest.raises(ValueError, match="available: train, val"):
        load_sfm120k(pkl, root, "test")
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"train": {"cids": [Fraction(1, 2)]}}))
    with pytest.raises(ValueError, match="refusing to load fractions.Fraction"):
        load_sfm120k(evil, root)
    broken = dict(db["train"], pidxs=[1, 4, 2, 99])
    (tmp_path / "broken.pkl").write_bytes(pickle.dumps({"train": broken}))
    with pytest.raises(ValueError, match=r"\['pidxs'\] holds an index outside 0..7"):
        load_sfm120k(tmp_path / "broken.pkl", root)
    nokey = {k: v for k, v in db["train"].items() if k != "qidxs"}
    (tmp_path / "nokey.pkl").write_bytes(pickle.dumps({"train": nokey}))
    with pytest.raises(ValueError, match=r"missing keys \['qidxs'\]"):
        load_sfm120k(tmp_path / "nokey.pkl", root)


def test_labelled_images_select_renumbers_pairs():
    images = LabelledImages([f"{i}.jpg" for i in range(6)], [0, 0, 1, 1, 2, 2], ["a", "b", "c"], [[0, 1], [2, 3], [4, 5], [1, 0]])
    sub = images.select([5, 4, 1, 0])
    assert sub.paths == ["5.jpg", "4.jpg", "1.jpg", "0.jpg"]
    assert sub.labels.tolist() == [2, 2, 0, 0] and sub.classes == ["a", "b", "c"]
    assert sub.pairs.tolist() == [[3, 2], [1, 0], [2, 3]]
    assert images.select(np.array([True, False, True, True, False, False])).pairs.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="repeated"):
        images.select([1, 1])
    with pytest.raises(ValueError, match=r"must index classes \(0..0\), got 3..3"):
        LabelledImages(["a"], [3], ["x"])


# --------------------------------------------------------------------- dataset, transforms


def test_dataset_without_transform_is_the_eval_preprocessing(folder):
    images = load_folder_dataset(folder)
    ds = ImageListDataset(images.paths, images.labels, image_size=50, mean=MEAN, std=STD)
    x, label, index = ds[4]
    torch.testing.assert_close(x, to_tensor(load_image(images.paths[4], image_size=50), MEAN, STD), rtol=0, atol=0)
    assert (label, index) == (1, 4) and x.dtype == torch.float32
    unlabelled = ImageListDataset(images.paths, mean=MEAN, std=STD, bboxes=[(10, 10, 40, 30)] * 12)
    x, label, _ = unlabelled[-1]
    assert label == -1 and tuple(x.shape) == (3, 20, 30)
    with pytest.raises(IndexError):
        ds[12]


def test_augmentation_is_deterministic_per_epoch_and_index(folder):
    images = load_folder_dataset(folder)
    aug = RetrievalAugment(48, output="square", hflip=0.5, rotation=5, hue=0.05)
    ds = ImageListDataset.from_images(images, image_size=80, transform=aug, mean=MEAN, std=STD, seed=3)
    ds.set_epoch(2)
    a = ds[7][0]
    b = ds[7][0]
    assert a.shape == (3, 48, 48)
    assert torch.equal(a, b)
    # a copy in another "worker" (pickled), and get() with an explicit epoch agree
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[7][0], a)
    ds.set_epoch(0)
    assert torch.equal(ds.get(7, epoch=2), a)
    assert not torch.equal(ds[7][0], a)  # another epoch, another augmentation
    other_seed = ImageListDataset.from_images(images, image_size=80, transform=aug, mean=MEAN, std=STD, seed=4)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed[7][0], a)
    # the same file at two indices gets two augmentations
    twice = ImageListDataset([images.paths[0]] * 2, image_size=80, transform=aug, mean=MEAN, std=STD)
    assert not torch.equal(twice[0][0], twice[1][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_lazy_batch_reads_the_same_augmented_tensors_on_every_pass(folder, workers):
    images = load_folder_dataset(folder)
    aug = RetrievalAugment(48, output="square", hflip=0.5, rotation=5)
    ds = ImageListDataset.from_images(images, image_size=80, transform=aug, mean=MEAN, std=STD, seed=1)
    ds.set_epoch(0)  # the lazy batch names its epoch itself
    idx = [5, 0, 11, 3, 7]
    lazy = LazyImages(ds, idx, epoch=3, workers=workers, prefetch=2)
    try:
        first = [lazy[i] for i in range(5)]
        second = [lazy[i] for i in range(5)]  # a second pass, as multistage's stage 3
        for i, j in enumerate(idx):
            want = ds.get(j, epoch=3)
            assert torch.equal(first[i], want) and torch.equal(second[i], want)
        assert len(lazy) == 5 and lazy.labels().tolist() == [int(images.labels[j]) for j in idx]
        assert torch.equal(lazy[-1], first[-1])
        with pytest.raises(IndexError):
            lazy[5]
    finally:
        lazy.close()


def test_dataloader_workers_see_the_same_tensors(folder):
    images = load_folder_dataset(folder)
    aug = RetrievalAugment(32, output="square")
    ds = ImageListDataset.from_images(images, image_size=64, transform=aug, mean=MEAN, std=STD)
    ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_images)
    batches = list(loader)
    x, labels, indices = batches[1]
    assert x.shape == (4, 3, 32, 32) and indices.tolist() == [4, 5, 6, 7]
    assert labels.tolist() == images.labels[4:8].tolist()
    assert torch.equal(x[2], ds[6][0])
    # variable sizes come back as a list
    ragged = collate_images([(torch.zeros(3, 4, 5), 0, 0), (torch.zeros(3, 5, 4), 1, 1)])
    assert isinstance(ragged[0], list) and ragged[1].tolist() == [0, 1]


def test_retrieval_augment_geometry_and_defaults():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    aug = RetrievalAugment(45, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
    for seed in range(200):
        x1, y1, x2, y2 = aug.crop_box(90, 60, random.Random(seed))
        w, h = x2 - x1, y2 - y1
        assert 0 <= x1 < x2 <= 90 and 0 <= y1 < y2 <= 60
        assert 0.5 * 5400 * 0.97 <= w * h <= 5400
        out = aug(img, random.Random(seed))
        assert max(out.size) == 45 and out.mode == "RGB"
    # the whole image, no jitter: a plain resize; flipping is off unless asked for
    plain = RetrievalAugment(45, scale=(1, 1), ratio=(0.5, 2), brightness=0, contrast=0, saturation=0)
    resized = img.resize((45, 30), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(plain(img, random.Random(1))), np.asarray(resized))
    flip = RetrievalAugment(45, scale=(1, 1), ratio=(0.5, 2), brightness=0, contrast=0, saturation=0, hflip=1.0)
    assert np.array_equal(np.asarray(flip(img, random.Random(1))), np.asarray(resized)[:, ::-1])
    # outside the ratio range: the largest centred crop within it
    tall = RetrievalAugment(40, scale=(1, 1), ratio=(1, 1))
    assert tall.crop_box(90, 60, random.Random(0)) == (15, 0, 75, 60)
    for kwargs, match in [
        ({"output": "fit"}, "available: long_side, square"),
        ({"scale": (0.5, 1.5)}, "scale"),
        ({"hflip": 2}, "hflip"),
        ({"brightness": 1.0}, "brightness"),
    ]:
        with pytest.raises(ValueError, match=match):
            RetrievalAugment(32, **kwargs)


def test_torchvision_adapter_is_deterministic_and_restores_torch_state():
    from torchvision.transforms import v2

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    t = TorchvisionTransform(v2.RandomResizedCrop(24))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = np.asarray(t(img, sample_rng(0, 1, 2)))
    assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(np.asarray(t(img, sample_rng(0, 1, 2))), a)
    assert any(not np.array_equal(np.asarray(t(img, sample_rng(0, 1, i))), a) for i in range(3, 8))
    with pytest.raises(TypeError, match="leave ToTensor"):
        TorchvisionTransform(v2.Compose([v2.ToImage()]))(img, random.Random(0))


def test_sample_rng():
    draws = {sample_rng(s, e, i).random() for s in range(2) for e in range(3) for i in range(4)}
    assert len(draws) == 24
    assert sample_rng(1, 2, 3).random() == sample_rng(1, 2, 3).random()
    with pytest.raises(ValueError, match="epoch"):
        sample_rng(0, -1, 0)


# ------------------------------------------------------------------------------ bad files


def test_bad_images_raise_naming_the_file_and_are_found(folder, tmp_path):
    good = all_images(folder)[0]
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    truncated = tmp_path / "truncated.jpg"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    missing = tmp_path / "missing.jpg"
    paths = [good, garbage, truncated, missing]
    ds = ImageListDataset(paths, image_size=40, mean=MEAN, std=STD)
    ds[0]
    for i, p in enumerate(paths[1:], 1):
        with pytest.raises(ImageError) as e:
            ds[i]
        assert e.value.path == str(p) and str(p) in str(e.value)
    header_only = find_bad_images(paths, num_workers=2)
    assert [b.index for b in header_only] == [1, 3]
    decoded = find_bad_images(paths, decode=True)
    assert [b.index for b in decoded] == [1, 2, 3] and decoded[1].path == str(truncated)
    kept = LabelledImages([str(p) for p in paths], [0, 0, 1, 1], ["a", "b"]).select(
        np.setdiff1d(np.arange(4), [b.index for b in decoded])
    )
    assert kept.paths == [str(good)]


# ---------------------------------------------------------------------------------- tuples


def test_tuple_dataset(folder):
    images = load_folder_dataset(folder)
    ds = ImageListDataset.from_images(images, image_size=40, transform=RetrievalAugment(32), mean=MEAN, std=STD)
    tuples = make_tuples([0, 3], [1, 4], [[5, 9], [0, 11]])
    td = TupleDataset(ds, tuples)
    td.set_epoch(4)
    imgs, ids = td[1]
    assert ids.tolist() == [3, 4, 0, 11] and len(imgs) == 4
    assert torch.equal(imgs[2], ds.get(0, epoch=4))
    batch_imgs, batch_ids = collate_tuples([td[0], td[1]])
    assert len(batch_imgs) == 2 and batch_ids.shape == (2, 4)
    with pytest.raises(ValueError, match="incomplete"):
        TupleDataset(ds, [[0, 1, -1]])


# -------------------------------------------------------------------------------- sampler


def test_sampler_batches_are_p_classes_by_k_images():
    # 7 classes in batches of 3: rounds of classes straddle batches, yet no batch repeats a class
    labels = np.repeat(np.arange(7), [8, 8, 8, 8, 5, 2, 6])
    s = ClassBalancedBatchSampler(labels, classes_per_batch=3, per_class=4, seed=1, num_batches=21)
    batches = [b for epoch in range(4) for b in s.epoch_batches(epoch)]
    assert len(list(s)) == len(s) == 21
    for b in batches:
        assert len(b) == 12
        counts = collections.Counter(labels[b].tolist())
        assert len(counts) == 3 and set(counts.values()) == {4}
        for c in counts:  # a class's images repeat only when it has fewer than K
            members = [i for i in b if labels[i] == c]
            assert len(set(members)) == min(4, int((labels == c).sum()))
    # classes are balanced: every class is drawn (nearly) equally often
    drawn = collections.Counter(c for b in batches for c in set(labels[b].tolist()))
    assert max(drawn.values()) - min(drawn.values()) <= 1


def test_sampler_uses_every_image_before_repeating():
    labels = np.repeat(np.arange(4), 8)
    s = ClassBalancedBatchSampler(labels, 2, 4, seed=5)
    assert s.num_batches == 4
    seen = [i for b in s for i in b]
    assert sorted(seen) == list(range(32))


def test_sampler_is_seeded_per_epoch():
    labels = np.repeat(np.arange(10), 6)
    s = ClassBalancedBatchSampler(labels, 4, 3, seed=0)
    s.set_epoch(3)
    first = list(s)
    assert list(s) == first
    s2 = ClassBalancedBatchSampler(labels, 4, 3, seed=0)
    s2.set_epoch(3)
    assert list(s2) == first
    s.set_epoch(4)
    assert list(s) != first
    assert ClassBalancedBatchSampler(labels, 4, 3, seed=1).epoch_batches(3) != first


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_ranks_get_disjoint_batches(drop_last):
    labels = np.repeat(np.arange(7), 5)
    world = 3
    kwargs = dict(seed=2, num_batches=10, world_size=world, drop_last=drop_last)
    ranks = [ClassBalancedBatchSampler(labels, 2, 3, rank=r, **kwargs) for r in range(world)]
    for r in ranks:
        r.set_epoch(1)
    per_rank = [list(r) for r in ranks]
    lengths = {len(p) for p in per_rank}
    assert lengths == {3 if drop_last else 4} and {len(r) for r in ranks} == lengths
    glob = ranks[0].epoch_batches(1)
    if drop_last:
        # rank r takes global batches r, r + world, ...: disjoint positions, union = the first 9
        interleaved = [per_rank[r][i] for i in range(3) for r in range(world)]
        assert interleaved == glob[:9]
    else:
        padded = glob + glob[:2]
        assert [per_rank[r][i] for i in range(4) for r in range(world)] == padded


def test_sampler_small_classes_and_errors():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 3])  # class 2 is a singleton
    s = ClassBalancedBatchSampler(labels, 3, 3, seed=0, num_batches=6)
    for b in s:
        assert 2 not in labels[b]  # below min_class_size
        assert len(b) == 9
    assert list(s.classes) == [0, 1, 3]
    with pytest.raises(ValueError, match="only 3 classes"):
        ClassBalancedBatchSampler(labels, 4, 2)
    assert len(ClassBalancedBatchSampler(labels, 4, 2, min_class_size=1, num_batches=2)) == 2
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        ClassBalancedBatchSampler(labels, 2, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="integer"):
        ClassBalancedBatchSampler(np.array([0.5, 1.5]), 1, 1)
