"""Captioned image sets: a ``path,caption`` CSV and the Flickr8k layout → plain structures.

A captions CSV has one row per caption and any number of rows per image::

    path,caption
    images/1000268201_693b08cb0e.jpg,A child in a pink dress is climbing up a set of stairs .
    images/1000268201_693b08cb0e.jpg,A girl going into a wooden building .

(``path,caption_id,caption``, the layout of Flickr8k's ``captions_with_ids.csv``, is read too;
the ids are checked to be unique and otherwise ignored.) Paths are relative to the image root
(default: the CSV's folder) or absolute. The file is untrusted input: every malformed row is an
error naming the file and line.

The Flickr8k layout (Hodosh et al., JAIR 2013) is a captions CSV plus the official split lists
``splits/Flickr_8k.{train,dev,test}Images.txt`` (one image file name per line; 6000 / 1000 / 1000;
91 photos are in no split). :func:`load_flickr8k` joins them: per image its captions and split.

Nothing here opens an image or imports anything heavy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..csvfiles import layout_rows

__all__ = [
    "CaptionedImages",
    "read_captions_csv",
    "read_split_list",
    "assign_splits",
    "load_flickr8k",
    "FLICKR8K_SPLITS",
]

#: split name → file name of its image list in Flickr8k's ``splits`` folder
FLICKR8K_SPLITS = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}

_LAYOUTS = {("path", "caption"): "plain", ("path", "caption_id", "caption"): "with_ids"}
MAX_CAPTION_CHARS = 10_000  # a caption is a sentence; a longer cell is a broken file


@dataclass
class CaptionedImages:
    """Images and their captions, in order of first appearance in the file.

    Attributes:
        paths: ``N`` image paths (joined with the image root unless absolute).
        captions: ``N`` lists of captions, ``captions[i]`` in file order (never empty).
        splits: ``N`` split names (``"train"``, ``"dev"``, ``"test"``) or ``None`` for an image
            in no split; ``None`` as a whole when no split was read.
    """

    paths: list[str]
    captions: list[list[str]]
    splits: list[str | None] | None = None

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.captions):
            raise ValueError(f"{len(self.paths)} paths but {len(self.captions)} caption lists")
        if self.splits is not None and len(self.splits) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.splits)} split names")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions)

    def flat_captions(self) -> tuple[list[str], list[int]]:
        """``(captions, image_index)``: every caption once, and the index of its image.

        The text → image protocol: caption ``j`` is a query whose correct image is
        ``image_index[j]``.
        """
        texts: list[str] = []
        owner: list[int] = []
        for i, caps in enumerate(self.captions):
            texts.extend(caps)
            owner.extend([i] * len(caps))
        return texts, owner

    def subset(self, split: str) -> CaptionedImages:
        """The images of one split, in their order here."""
        if self.splits is None:
            raise ValueError("these images carry no split; read them with load_flickr8k or pass splits")
        present = sorted({s for s in self.splits if s is not None})
        if split not in present:
            raise ValueError(f"unknown split {split!r}; available: {', '.join(present) or '(none)'}")
        keep = [i for i, s in enumerate(self.splits) if s == split]
        return CaptionedImages(
            [self.paths[i] for i in keep], [list(self.captions[i]) for i in keep], [split] * len(keep)
        )


def _clean_cell(value: str, what: str, where: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{where}: NUL character in {what}")
    value = value.strip()
    if not value:
        raise ValueError(f"{where}: empty {what}")
    return value


def read_captions_csv(
    csv_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    check_exists: bool = False,
    max_caption_chars: int = MAX_CAPTION_CHARS,
) -> CaptionedImages:
    """Read a ``path,caption`` (or ``path,caption_id,caption``) CSV file.

    Rows of one image are grouped (paths compared after ``os.path.normpath``); images keep the
    order of their first row, captions the file order. Blank lines are skipped.

    Args:
        csv_path: the CSV file (UTF-8; a BOM is accepted).
        image_root: folder that relative paths are joined to; default the CSV's folder.
        check_exists: check that every image file exists.
        max_caption_chars: longest caption accepted.

    Raises:
        ValueError: empty file, unknown header (the known ones listed), a row with the wrong
            number of columns, an empty or over-long cell, a NUL character, a repeated
            ``caption_id``, text that is not UTF-8, or no caption row (file and line named).
        FileNotFoundError: ``check_exists`` and an image is missing.
    """
    csv_path = Path(csv_path)
    root = csv_path.parent if image_root is None else Path(image_root)
    order: dict[str, int] = {}
    paths: list[str] = []
    captions: list[list[str]] = []
    seen_ids: dict[str, int] = {}
    for layout, cells, where in layout_rows(csv_path, _LAYOUTS, example="path,caption"):
        p = _clean_cell(cells["path"], "path", where)
        cap = _clean_cell(cells["caption"], "caption", where)
        if len(cap) > max_caption_chars:
            raise ValueError(f"{where}: caption of {len(cap)} characters; the limit is {max_caption_chars}")
        if layout == "with_ids":
            cid = _clean_cell(cells["caption_id"], "caption_id", where)
            if cid in seen_ids:
                raise ValueError(f"{where}: caption_id {cid!r} repeats line {seen_ids[cid]}")
            seen_ids[cid] = int(where.rsplit(":", 1)[1])
        full = os.path.normpath(p if os.path.isabs(p) else os.path.join(root, p))
        i = order.get(full)
        if i is None:
            i = order[full] = len(paths)
            paths.append(full)
            captions.append([])
        captions[i].append(cap)
    if not paths:
        raise ValueError(f"{csv_path}: no caption rows after the header")
    if check_exists:
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{csv_path}: image file {p!r} does not exist")
    return CaptionedImages(paths, captions)


def read_split_list(path: str | os.PathLike) -> list[str]:
    """Image file names of a split list, one per line (blank lines skipped).

    Raises:
        ValueError: a name repeated (both lines named), a name with a path separator or a NUL,
            text that is not UTF-8, or no name at all.
    """
    path = Path(path)
    names: list[str] = []
    first: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    for n, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        if "/" in name or "\\" in name or "\x00" in name:
            raise ValueError(f"{path}:{n}: expected an image file name, got {name!r:.200}")
        if name in first:
            raise ValueError(f"{path}:{n}: {name!r} repeats line {first[name]}")
        first[name] = n
        names.append(name)
    if not names:
        raise ValueError(f"{path}: no image names")
    return names


def assign_splits(
    paths: Sequence[str], split_lists: dict[str, Iterable[str]], *, strict: bool = True
) -> list[str | None]:
    """Per path, the split whose list holds its file name (``None`` if none does).

    Raises:
        ValueError: a name in two splits, or (``strict``) a listed name with no path.
    """
    by_name: dict[str, int] = {}
    for i, p in enumerate(paths):
        name = os.path.basename(p)
        if name in by_name:
            raise ValueError(f"two images share the file name {name!r}: {paths[by_name[name]]!r} and {p!r}")
        by_name[name] = i
    out: list[str | None] = [None] * len(paths)
    for split, names in split_lists.items():
        for name in names:
            i = by_name.get(name)
            if i is None:
                if strict:
                    raise ValueError(f"split {split!r} lists {name!r}, which has no caption")
                continue
            if out[i] is not None:
                raise ValueError(f"{name!r} is in two splits: {out[i]!r} and {split!r}")
            out[i] = split
    return out


def load_flickr8k(
    root: str | os.PathLike,
    *,
    captions: str = "captions.csv",
    splits_dir: str = "splits",
    check_exists: bool = False,
) -> CaptionedImages:
    """Flickr8k: per image its five captions and its official split.

    Args:
        root: the dataset folder (``captions.csv``, ``images/``, ``splits/``).
        captions: the captions CSV inside ``root`` (``captions.csv`` or ``captions_with_ids.csv``).
        splits_dir: the folder of ``Flickr_8k.{train,dev,test}Images.txt`` inside ``root``.
        check_exists: check that every image file exists.

    Returns:
        every captioned image, ``splits[i]`` in ``"train"``, ``"dev"``, ``"test"`` or ``None``
        (Flickr8k has 8,091 photos, 6000 / 1000 / 1000 of them in the split).

    Raises:
        FileNotFoundError: a missing captions file or split list (the path named).
        ValueError: as :func:`read_captions_csv` and :func:`read_split_list`, and a split name
            without captions or in two splits.
    """
    root = Path(root)
    csv_path = root / captions
    if not csv_path.is_file():
        raise FileNotFoundError(f"Flickr8k captions file not found: {csv_path}")
    images = read_captions_csv(csv_path, root, check_exists=check_exists)
    lists: dict[str, list[str]] = {}
    for split, fname in FLICKR8K_SPLITS.items():
        p = root / splits_dir / fname
        if not p.is_file():
            raise FileNotFoundError(f"Flickr8k split list not found: {p} (expected {', '.join(FLICKR8K_SPLITS.values())})")
        lists[split] = read_split_list(p)
    images.splits = assign_splits(images.paths, lists)
    return images
