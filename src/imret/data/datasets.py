"""Training image sets: the folder, CSV (Google Landmarks v2) and retrieval-SfM-120k
layouts, and torch datasets that decode, augment and normalise images.

Datasets never run a model: hard negatives are mined by the trainer with
:mod:`imret.mining` on descriptors it computes.

Deterministic augmentation
--------------------------
:class:`ImageListDataset` augments image ``i`` in epoch ``e`` with a generator seeded from
``(seed, e, i)`` (:func:`imret.data.transforms.sample_rng`), so loading the same index in
the same epoch twice gives bit-identical tensors, in any process or DataLoader worker.
A trainer using multistage backpropagation can therefore materialise a batch, compute
descriptors without gradients, and recompute them with gradients on identical inputs
(or reload them with :meth:`ImageListDataset.get`). The epoch is set by
:meth:`ImageListDataset.set_epoch`; DataLoader workers hold a copy of the dataset, so
with ``persistent_workers=True`` they keep the epoch they were started with: use
``persistent_workers=False`` (workers are re-created each epoch) or
:meth:`~ImageListDataset.get` with an explicit epoch.

Bad files
---------
Loading an unusable file raises :class:`imret.images.ImageError` naming the file (a
training run should not silently train on fewer images). Screen a list up front with
:func:`find_bad_images` and drop the bad ones with :meth:`LabelledImages.select`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..csvfiles import layout_rows
from ..images import ImageError, list_images, load_image, open_image, to_tensor
from ..safepickle import load_data_pickle
from .transforms import Transform, sample_rng

__all__ = [
    "LabelledImages",
    "BadImage",
    "ImageListDataset",
    "LazyImages",
    "TupleDataset",
    "collate_images",
    "collate_tuples",
    "find_bad_images",
    "load_folder_dataset",
    "load_csv_dataset",
    "load_sfm120k",
    "gldv2_path",
    "cid2filename",
    "SFM_SPLITS",
]

SFM_SPLITS = ("train", "val")

BBox = tuple[float, float, float, float]


# ---------------------------------------------------------------------------- image sets


@dataclass
class LabelledImages:
    """A training image set: paths, a label per image and optional matching pairs.

    Attributes:
        paths: ``N`` image paths.
        labels: ``(N,)`` int64 class (or SfM-120k cluster) index per image, ``0..C-1``.
        classes: the ``C`` original class names (folder names, CSV labels, cluster ids).
        pairs: ``(M, 2)`` int64 ``(query, positive)`` matching pairs (SfM-120k ``qidxs``,
            ``pidxs``), or ``None`` when positives come from the labels.
    """

    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    pairs: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(
                f"labels must index classes (0..{len(self.classes) - 1}), got {self.labels.min()}..{self.labels.max()}"
            )
        if self.pairs is not None:
            self.pairs = np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2)
            if self.pairs.size and (self.pairs.min() < 0 or self.pairs.max() >= len(self.paths)):
                raise ValueError(f"pairs must index the {len(self.paths)} images")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def qidxs(self) -> np.ndarray | None:
        """Query side of :attr:`pairs` (cirtorch's name)."""
        return None if self.pairs is None else self.pairs[:, 0]

    @property
    def pidxs(self) -> np.ndarray | None:
        """Positive side of :attr:`pairs` (cirtorch's name)."""
        return None if self.pairs is None else self.pairs[:, 1]

    def select(self, keep: Sequence[int] | np.ndarray) -> "LabelledImages":
        """The subset of images ``keep`` (indices, or a ``(N,)`` bool mask), in that order.

        Labels and classes are kept as they are (so a model's class head still matches);
        pairs are renumbered, and pairs that lose an image are dropped.
        """
        idx = np.asarray(keep)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise ValueError(f"a keep mask must have shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"keep holds an index outside 0..{len(self) - 1}")
        if len(np.unique(idx)) != len(idx):
            raise ValueError("keep holds repeated indices")
        pairs = None
        if self.pairs is not None:
            new = np.full(len(self), -1, dtype=np.int64)
            new[idx] = np.arange(len(idx))
            mapped = new[self.pairs]
            pairs = mapped[(mapped >= 0).all(axis=1)]
        return LabelledImages([self.paths[i] for i in idx], self.labels[idx], list(self.classes), pairs)


def _class_index(names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Labels ``0..C-1`` for the names and the sorted class list (numeric order if all are ints)."""
    uniq = set(names)
    try:
        classes = sorted(uniq, key=int)
    except ValueError:
        classes = sorted(uniq)
    index = {c: i for i, c in enumerate(classes)}
    return np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names)), classes


def load_folder_dataset(root: str | os.PathLike) -> LabelledImages:
    """One sub-folder per class: ``root/<class>/**/<image>``.

    Classes are the non-hidden sub-folders sorted by name; images are found as
    :func:`imret.images.list_images` finds them (recursive, by extension, hidden skipped),
    sorted. The same conventions as :func:`imret.evaluation.load_labelled_folder`.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
        ValueError: no class folders, or class folders without images (named).
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {str(root)!r} is not a folder")
    class_dirs = sorted(d for d in os.listdir(root) if not d.startswith(".") and (root / d).is_dir())
    if not class_dirs:
        raise ValueError(f"{root}: no class folders; expected one sub-folder of images per class")
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for ci, name in enumerate(class_dirs):
        files = list_images(root / name, recursive=True)
        if not files:
            empty.append(name)
        paths.extend(files)
        labels.extend([ci] * len(files))
    if empty:
        raise ValueError(f"{root}: class folders without images: {empty}")
    return LabelledImages(paths, np.asarray(labels, dtype=np.int64), class_dirs)


def gldv2_path(image_root: str | os.PathLike, image_id: str, extension: str = ".jpg") -> str:
    """Where Google Landmarks v2 keeps an image: ``image_root/a/b/c/abc....jpg``.

    The three folders are the first three characters of the image id (Weyand et al.,
    CVPR 2020; github.com/cvdfoundation/google-landmark).
    """
    if not isinstance(image_id, str) or len(image_id) < 3 or "/" in image_id or "\\" in image_id:
        raise ValueError(f"a GLDv2 image id is a string of at least 3 characters without '/', got {image_id!r}")
    return os.path.join(os.fspath(image_root), image_id[0], image_id[1], image_id[2], image_id + extension)


# CSV layouts, by header: column names -> how a row becomes (image ids or path, label)
_CSV_LAYOUTS = {
    ("id", "url", "landmark_id"): "gldv2",
    ("id", "landmark_id"): "gldv2",
    ("landmark_id", "images"): "gldv2_clean",
    ("path", "label"): "plain",
}


def load_csv_dataset(
    csv_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    extension: str = ".jpg",
    check_exists: bool = False,
) -> LabelledImages:
    """A labelled image set from a CSV file; the layout is told by its header.

    * ``id,url,landmark_id`` (GLDv2 ``train.csv``) or ``id,landmark_id``: one image per
      row at :func:`gldv2_path` ``(image_root, id)``.
    * ``landmark_id,images`` (GLDv2 ``train_clean.csv``): a class per row, its image ids
      separated by spaces.
    * ``path,label``: image paths relative to ``image_root`` (or absolute).

    Header names are matched case-insensitively. Classes are the distinct labels,
    sorted numerically when they are all integers (GLDv2 landmark ids), else as strings;
    ``labels`` index them.

    Args:
        csv_path: the CSV file.
        image_root: the image folder; default the CSV file's folder.
        extension: image file extension for the GLDv2 layouts.
        check_exists: check that every image file exists (one ``stat`` per image: slow
            for the 4.1M GLDv2 images on network storage; missing files otherwise raise
            :class:`~imret.images.ImageError` when loaded).

    Raises:
        ValueError: unknown header (the known ones are listed), or a malformed row
            (file and line named).
        FileNotFoundError: ``check_exists`` and a listed image is missing.
    """
    csv_path = Path(csv_path)
    root = csv_path.parent if image_root is None else Path(image_root)
    paths: list[str] = []
    names: list[str] = []
    for layout, cells, where in layout_rows(csv_path, _CSV_LAYOUTS, example="path,label"):
        if layout == "gldv2":
            image_id, label = cells["id"].strip(), cells["landmark_id"].strip()
            if not image_id or not label:
                raise ValueError(f"{where}: empty id or landmark_id in {list(cells.values())!r}")
            paths.append(_gld(root, image_id, extension, where))
            names.append(label)
        elif layout == "gldv2_clean":
            label, ids = cells["landmark_id"].strip(), cells["images"].split()
            if not label or not ids:
                raise ValueError(f"{where}: empty landmark_id or images in {list(cells.values())!r}")
            paths.extend(_gld(root, i, extension, where) for i in ids)
            names.extend([label] * len(ids))
        else:
            p, label = cells["path"].strip(), cells["label"].strip()
            if not p or not label:
                raise ValueError(f"{where}: empty path or label in {list(cells.values())!r}")
            paths.append(p if os.path.isabs(p) else os.path.join(root, p))
            names.append(label)
    if not paths:
        raise ValueError(f"{csv_path}: no image rows after the header")
    if check_exists:
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{csv_path}: image file {p!r} does not exist")
    labels, classes = _class_index(names)
    return LabelledImages(paths, labels, classes)


def _gld(root: Path, image_id: str, extension: str, where: str) -> str:
    try:
        return gldv2_path(root, image_id, extension)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def cid2filename(cid: str, image_root: str | os.PathLike) -> str:
    """Where retrieval-SfM-120k keeps image ``cid``: ``image_root/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid``.

    The files have no extension (Radenović et al.'s layout, as cirtorch reads it).
    """
    if not isinstance(cid, str) or len(cid) < 6 or "/" in cid or "\\" in cid:
        raise ValueError(f"an SfM-120k cid is a string of at least 6 characters without '/', got {cid!r}")
    return os.path.join(os.fspath(image_root), cid[-2:], cid[-4:-2], cid[-6:-4], cid)


def load_sfm120k(
    pkl_path: str | os.PathLike, image_root: str | os.PathLike, split: str | None = "train"
) -> LabelledImages:
    """The retrieval-SfM-120k training set (Radenović et al., ECCV 2016 / TPAMI 2018).

    The pickle (``retrieval-SfM-120k.pkl``) is a dict with one entry per split, each a
    dict of ``cids`` (image names), ``cluster`` (the 3D-model cluster of each image),
    ``qidxs`` and ``pidxs`` (matching query / positive image indices, same length).
    ``split=None`` reads a file whose top level is such a dict (as
    ``retrieval-SfM-120k-whiten.pkl``). Image paths are :func:`cid2filename`.

    Labels are the clusters (numbered ``0..C-1`` in cluster-id order; ``classes`` holds
    the original ids) and ``pairs`` the ``(qidxs, pidxs)`` pairs. A file without
    ``cluster`` gives every image its own label.

    Security: pickle can execute code; this unpickler refuses every class but numpy
    arrays. Load only the published files or files you made.

    Raises:
        ValueError: unknown split (the available ones listed), missing keys, lengths
            that disagree, or indices out of range.
    """
    pkl_path = Path(pkl_path)
    if split is not None and split not in SFM_SPLITS:
        raise ValueError(f"unknown split {split!r}; available: {', '.join(SFM_SPLITS)}, or None for a flat file")
    raw = load_data_pickle(pkl_path, what="a retrieval-SfM-120k pickle", encoding="latin1")
    if not isinstance(raw, dict):
        raise ValueError(f"{pkl_path}: expected a dict, got {type(raw).__name__}")
    if split is not None:
        if split not in raw:
            raise ValueError(f"{pkl_path}: no split {split!r}; the file has: {sorted(map(str, raw))}")
        db = raw[split]
        where = f"{pkl_path}[{split!r}]"
    else:
        db = raw
        where = str(pkl_path)
    if not isinstance(db, dict):
        raise ValueError(f"{where}: expected a dict, got {type(db).__name__}")
    missing = [k for k in ("cids", "qidxs", "pidxs") if k not in db]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}; expected cids, cluster, qidxs, pidxs")
    cids = [str(c) for c in db["cids"]]
    n = len(cids)
    qidxs = _indices(db["qidxs"], f"{where}['qidxs']", n)
    pidxs = _indices(db["pidxs"], f"{where}['pidxs']", n)
    if len(qidxs) != len(pidxs):
        raise ValueError(f"{where}: qidxs has {len(qidxs)} entries but pidxs has {len(pidxs)}")
    if "cluster" in db:
        cluster = np.asarray(db["cluster"]).reshape(-1)
        if len(cluster) != n:
            raise ValueError(f"{where}: cluster has {len(cluster)} entries for {n} cids")
        if cluster.size and cluster.dtype.kind not in "iu":
            raise ValueError(f"{where}: cluster ids must be integers, got dtype {cluster.dtype}")
        ids, labels = np.unique(cluster, return_inverse=True)
        classes = [str(int(c)) for c in ids]
    else:
        labels, classes = np.arange(n), cids
    paths = []
    for i, cid in enumerate(cids):
        try:
            paths.append(cid2filename(cid, image_root))
        except ValueError as e:
            raise ValueError(f"{where}['cids'][{i}]: {e}") from None
    return LabelledImages(paths, labels.reshape(-1), classes, np.stack([qidxs, pidxs], axis=1))


def _indices(value: Any, where: str, n: int) -> np.ndarray:
    arr = np.asarray(value).reshape(-1)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{where} must hold integer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{where} holds an index outside 0..{n - 1}")
    return arr


# ------------------------------------------------------------------------------ bad files


@dataclass(frozen=True)
class BadImage:
    """An image that cannot be used, with the reason."""

    index: int
    path: str
    reason: str


def find_bad_images(
    paths: Sequence[str | os.PathLike],
    *,
    decode: bool = False,
    num_workers: int = 4,
    max_pixels: int | None = None,
) -> list[BadImage]:
    """The images in ``paths`` that would raise :class:`~imret.images.ImageError`.

    Args:
        paths: image files.
        decode: decode every image fully (finds truncated files; as slow as an epoch)
            instead of reading headers only (missing, empty, not an image, bad mode).
        num_workers: threads.
        max_pixels: see :func:`imret.images.open_image`.

    Returns:
        The bad ones, in input order; keep the rest with
        ``images.select(np.setdiff1d(np.arange(len(images)), [b.index for b in bad]))``.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")

    def check(item: tuple[int, str | os.PathLike]) -> BadImage | None:
        i, p = item
        try:
            if decode:
                load_image(p, max_pixels=max_pixels)
            else:
                open_image(p, max_pixels=max_pixels).close()
        except ImageError as e:
            return BadImage(i, e.path, e.reason)
        return None

    with ThreadPoolExecutor(num_workers) as pool:
        results = list(pool.map(check, enumerate(paths)))
    return [r for r in results if r is not None]


# -------------------------------------------------------------------------------- datasets


class ImageListDataset(Dataset):
    """Images from a list of paths: decoded, resized, augmented and normalised.

    ``dataset[i]`` is ``(image, label, i)``: a float32 ``(3, H, W)`` tensor
    ``(x / 255 - mean) / std``, the int label (``-1`` without labels) and the index.
    Steps: :func:`imret.images.load_image` (EXIF orientation, RGB, ``bboxes[i]`` crop,
    long side at most ``image_size``), then ``transform(img, rng)`` with
    ``rng = sample_rng(seed, epoch, i)``, then :func:`imret.images.to_tensor`. Without a
    transform this is the evaluation preprocessing (resize and normalise only) and the
    same images :func:`imret.extract.extract` sees at one scale. See the module notes on
    determinism and bad files.

    Args:
        paths: image files.
        labels: ``(N,)`` integer labels, or ``None``.
        image_size: largest long side when decoding (never upscaled); ``None``: full size.
        transform: a ``(img, rng) -> img`` transform (:mod:`imret.data.transforms`).
        bboxes: per-image ``(x1, y1, x2, y2)`` crop or ``None`` entries, or ``None``.
        mean, std: normalisation, from the model (``model.mean``, ``model.std``).
        seed: base seed of the augmentation.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        image_size: int | None = None,
        transform: Transform | None = None,
        bboxes: Sequence[BBox | None] | None = None,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
    ) -> None:
        self.paths = [os.fspath(p) for p in paths]
        if labels is None:
            self.labels = None
        else:
            lab = np.asarray(labels)
            if lab.shape != (len(self.paths),) or (lab.size and lab.dtype.kind not in "iu"):
                raise ValueError(f"labels must be {len(self.paths)} integers, got shape {lab.shape} dtype {lab.dtype}")
            self.labels = lab.astype(np.int64)
        if bboxes is not None and len(bboxes) != len(self.paths):
            raise ValueError(f"bboxes has {len(bboxes)} entries for {len(self.paths)} paths")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (img, rng) -> img, got {type(transform).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.bboxes = None if bboxes is None else list(bboxes)
        self.image_size = image_size
        self.transform = transform
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must be 3 numbers each (std > 0), got {mean!r}, {std!r}")
        self.seed = seed
        self.epoch = 0

    @classmethod
    def from_images(cls, images: LabelledImages, **kwargs: Any) -> "ImageListDataset":
        """A dataset over a :class:`LabelledImages` set (keyword arguments as ``__init__``)."""
        return cls(images.paths, images.labels, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds the augmentation of :meth:`__getitem__`."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, index: int) -> int:
        return -1 if self.labels is None else int(self.labels[index])

    def get(self, index: int, epoch: int | None = None) -> torch.Tensor:
        """The image tensor of ``index`` as augmented in ``epoch`` (default: the current one)."""
        n = len(self.paths)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -n <= index < n:
            raise IndexError(f"index {index!r} out of range for {n} images")
        index = int(index) % n
        epoch = self.epoch if epoch is None else epoch
        bbox = None if self.bboxes is None else self.bboxes[index]
        img = load_image(self.paths[index], image_size=self.image_size, bbox=bbox)
        if self.transform is not None:
            img = self.transform(img, sample_rng(self.seed, epoch, index))
        return to_tensor(img, self.mean, self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        n = len(self.paths)
        image = self.get(index)
        index = int(index) % n
        return image, self.label(index), index

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, labels={'yes' if self.labels is not None else 'no'}, "
            f"image_size={self.image_size}, transform={self.transform!r}, seed={self.seed}, epoch={self.epoch})"
        )


class TupleDataset(Dataset):
    """Training tuples ``(query, positive, n_1..n_k)`` over an :class:`ImageListDataset`.

    ``dataset[t]`` is ``(images, ids)``: a list of ``2 + k`` image tensors (sizes may
    differ) and the ``(2 + k,)`` int64 dataset indices of row ``t`` of ``tuples``
    (:func:`imret.mining.epoch_tuples`). The images follow the base dataset's epoch, so
    an image appearing in several tuples of one epoch is augmented the same way. Rows
    are replaced each epoch with :meth:`set_tuples`; use a
    :class:`torch.utils.data.DistributedSampler` (with ``set_epoch``) to split them
    over processes.
    """

    def __init__(self, images: ImageListDataset, tuples: np.ndarray | Sequence[Sequence[int]]) -> None:
        if not isinstance(images, ImageListDataset):
            raise TypeError(f"images must be an ImageListDataset, got {type(images).__name__}")
        self.images = images
        self.set_tuples(tuples)

    def set_tuples(self, tuples: np.ndarray | Sequence[Sequence[int]]) -> None:
        arr = np.asarray(tuples)
        if arr.ndim != 2 or arr.shape[1] < 2 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"tuples must be a (T, 2 + k) integer array, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.images)):
            raise ValueError(
                f"tuples hold index outside 0..{len(self.images) - 1} (drop incomplete rows: make_tuples(incomplete='drop'))"
            )
        self.tuples = arr.astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.images.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.tuples)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        row = self.tuples[index]
        return [self.images.get(int(i)) for i in row], torch.from_numpy(row.copy())


class LazyImages(Sequence):
    """A batch of a :class:`ImageListDataset` whose images are decoded when indexed, not held.

    ``LazyImages(dataset, indices, epoch)[i]`` is ``dataset.get(indices[i], epoch)``: the same
    tensor every time (augmentation is seeded by (seed, epoch, index)), so multistage
    backpropagation can read the batch twice, chunk by chunk, and keep only one chunk of
    images in memory however large the batch (Revaud et al. train with 4096 images of up to
    1024 px a batch: about 38 GB of float32 pixels if held). Sequential reads are prefetched
    ``prefetch`` images ahead on ``workers`` threads (PIL decodes without the GIL).
    """

    def __init__(self, dataset: "ImageListDataset", indices: Sequence[int], epoch: int, *, workers: int = 2,
                 prefetch: int = 8):
        from concurrent.futures import ThreadPoolExecutor

        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.epoch = int(epoch)
        self.prefetch = max(0, int(prefetch))
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 and self.prefetch > 0 else None
        self._pending: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        n = len(self.indices)
        if isinstance(i, slice) or not -n <= int(i) < n:
            raise IndexError(f"index {i!r} out of range for a batch of {n}")
        i = int(i) % n
        if self._pool is None:
            return self.dataset.get(self.indices[i], self.epoch)
        for j in range(i, min(n, i + 1 + self.prefetch)):
            if j not in self._pending:
                self._pending[j] = self._pool.submit(self.dataset.get, self.indices[j], self.epoch)
        for j in [j for j in self._pending if j < i or j > i + self.prefetch]:  # a jump (the second pass)
            self._pending.pop(j).cancel()
        return self._pending.pop(i).result()

    def labels(self) -> torch.Tensor:
        return torch.tensor([self.dataset.label(i) for i in self.indices], dtype=torch.long)

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def collate_images(batch: Sequence[tuple[torch.Tensor, int, int]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Collate ``ImageListDataset`` items: images stacked when they share a size, else a list.

    Returns ``(images, labels, indices)``: a ``(B, 3, H, W)`` tensor or a list of ``B``
    ``(3, H_i, W_i)`` tensors, and ``(B,)`` int64 labels and indices.
    """
    images = [b[0] for b in batch]
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    indices = torch.tensor([b[2] for b in batch], dtype=torch.long)
    if images and all(x.shape == images[0].shape for x in images):
        return torch.stack(images), labels, indices
    return images, labels, indices


def collate_tuples(
    batch: Sequence[tuple[list[torch.Tensor], torch.Tensor]],
) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Collate ``TupleDataset`` items: a list of per-tuple image lists and ``(B, 2 + k)`` ids."""
    return [b[0] for b in batch], torch.stack([b[1] for b in batch])
