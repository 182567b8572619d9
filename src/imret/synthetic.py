"""Seeded synthetic image sets for demos and tests, in the layouts imret reads.

Each "object" is a random arrangement of coloured shapes on a textured background;
its images are random views of it (scale, rotation, crop, colour jitter, blur), so that
instance retrieval is meaningful and fast CNNs separate the objects even untrained.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["make_object", "random_view", "make_labelled_folder", "make_revisitop"]


def make_object(rng: np.random.Generator, size: int = 512) -> Image.Image:
    """A random planar 'object': textured background with 12-24 coloured shapes, RGB ``size x size``."""
    base = rng.integers(0, 256, 3)
    noise = rng.normal(0, 25, (size // 8, size // 8, 3))
    bg = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(12, 25))):
        x0, y0 = rng.integers(0, size - 40, 2)
        w, h = rng.integers(20, size // 3, 2)
        box = [int(x0), int(y0), int(min(size, x0 + w)), int(min(size, y0 + h))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.integers(3, 12)))
    return img


def random_view(obj: Image.Image, rng: np.random.Generator, out_size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A random view of ``obj``: rotation, zoom, crop, brightness and blur, resized to ``out_size`` (w, h)."""
    img = obj.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(128, 128, 128))
    s = obj.size[0]
    zoom = float(rng.uniform(0.55, 0.95))
    cw, ch = int(s * zoom), int(s * zoom * out_size[1] / out_size[0])
    x0 = int(rng.integers(0, s - cw + 1))
    y0 = int(rng.integers(0, max(1, s - ch + 1)))
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize(out_size, Image.Resampling.BILINEAR)
    arr = np.asarray(img).astype(np.float32) * float(rng.uniform(0.75, 1.25)) + float(rng.uniform(-20, 20))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    return img


def make_labelled_folder(
    root: str | os.PathLike, n_classes: int = 6, per_class: int = 5, size: tuple[int, int] = (320, 240), seed: int = 0
) -> Path:
    """Write ``root/<class>/<i>.jpg``: ``per_class`` views of each of ``n_classes`` objects."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in range(n_classes):
        obj = make_object(rng)
        d = root / f"object_{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            random_view(obj, rng, size).save(d / f"{i:03d}.jpg", quality=90)
    return root


def make_revisitop(
    root: str | os.PathLike,
    n_objects: int = 5,
    db_per_object: int = 6,
    n_distractors: int = 6,
    size: tuple[int, int] = (320, 240),
    seed: int = 0,
    name: str = "synthetic",
) -> Path:
    """Write a small dataset in the revisited Oxford/Paris layout: ``root/jpg/*.jpg`` and ``root/gnd_<name>.pkl``.

    One query per object (with a bounding box around the middle of the view); its database
    views are split into easy (the first half), hard (the rest) and one junk image per object.
    Distractors are views of objects that have no query. Returns the pickle's path.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    imlist: list[str] = []
    qimlist: list[str] = []
    gnd = []
    for o in range(n_objects):
        obj = make_object(rng)
        qname = f"query_{o:03d}"
        random_view(obj, rng, size).save(root / "jpg" / f"{qname}.jpg", quality=90)
        qimlist.append(qname)
        ids = []
        for i in range(db_per_object + 1):
            nm = f"obj{o:03d}_{i:03d}"
            random_view(obj, rng, size).save(root / "jpg" / f"{nm}.jpg", quality=90)
            ids.append(len(imlist))
            imlist.append(nm)
        half = db_per_object // 2
        w, h = size
        gnd.append(
            {
                "bbx": [w * 0.15, h * 0.15, w * 0.85, h * 0.85],
                "easy": ids[:half],
                "hard": ids[half:db_per_object],
                "junk": ids[db_per_object:],
            }
        )
    for d in range(n_distractors):
        nm = f"distractor_{d:03d}"
        random_view(make_object(rng), rng, size).save(root / "jpg" / f"{nm}.jpg", quality=90)
        imlist.append(nm)
    path = root / f"gnd_{name}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return path
