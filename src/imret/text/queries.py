"""Text queries: checking untrusted query text, loading a caption model for a search, and a
picture of a text for the places that show a query as an image.

A text query is searched with the caption encoder of a joint image–caption model
(:class:`~imret.text.encoder.CaptionEncoder`, ``θ(t) = Wᵀt / ‖Wᵀt‖``) against the image
descriptors ``φ`` of the same model: the ranking is by ``θ(t)·φ``.

Everything here is pure or reads only the file it is given; importing it does no I/O.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .encoder import CaptionEncoder

__all__ = [
    "MAX_TEXT_CHARS",
    "MAX_TEXT_QUERIES",
    "MAX_TEXT_MODEL_BYTES",
    "check_text_queries",
    "load_text_model",
    "text_card",
    "NoKnownWordError",
]

MAX_TEXT_CHARS = 1000
"""Longest text query accepted (characters): a query is a sentence or a few words."""
MAX_TEXT_QUERIES = 10_000
"""Most text queries in one call."""
MAX_TEXT_MODEL_BYTES = 4 << 30
"""Largest caption model file read (a 200,000-term vocabulary at 4096-D is 3.3 GB)."""


class NoKnownWordError(ValueError):
    """A text query none of whose words is in the caption model's vocabulary: its embedding
    is all zeros and would rank the images arbitrarily."""


def check_text_queries(text: Any, *, max_chars: int = MAX_TEXT_CHARS,
                       max_queries: int = MAX_TEXT_QUERIES) -> list[str]:
    """One text query (a ``str``) or several (a sequence of ``str``) as a list, checked as
    untrusted input: strings only, not blank, at most ``max_chars`` characters each, no NUL,
    at most ``max_queries`` of them. Raises ``TypeError`` / ``ValueError`` naming the bad one."""
    items = [text] if isinstance(text, str) else text
    if isinstance(items, (bytes, bytearray)) or not isinstance(items, Sequence):
        raise TypeError(f"text must be a str or a sequence of str, got {type(text).__name__}")
    items = list(items)
    if not items:
        raise ValueError("no text query given")
    if len(items) > max_queries:
        raise ValueError(f"{len(items)} text queries in one call; the limit is {max_queries}")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise TypeError(f"text query {i} is a {type(t).__name__}, not a str: {t!r:.80}")
        if "\x00" in t:
            raise ValueError(f"text query {i} holds a NUL character")
        if not t.strip():
            raise ValueError(f"text query {i} is blank; give some words")
        if len(t) > max_chars:
            raise ValueError(f"text query {i} has {len(t)} characters; the limit is {max_chars}")
    return items


def load_text_model(path: str | os.PathLike, *, dim: int | None = None,
                    max_bytes: int = MAX_TEXT_MODEL_BYTES) -> "CaptionEncoder":
    """A caption model file (:meth:`CaptionEncoder.save`), read as untrusted input: a regular
    file of at most ``max_bytes``, a valid caption encoder (not an image model, not another
    file), of dimension ``dim`` when given (the image descriptors it is searched against).

    Raises ``FileNotFoundError`` (no such file) or ``ValueError`` naming the file and what is
    wrong with it."""
    from .encoder import CaptionEncoder

    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"caption model file not found: {p}") from None
    import stat

    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"caption model {p} is not a regular file")
    if st.st_size > max_bytes:
        raise ValueError(f"caption model {p} is {st.st_size} bytes; the limit is {max_bytes}")
    enc = CaptionEncoder.load(p)  # ValueError naming the file for anything but a caption encoder
    if dim is not None and enc.dim != dim:
        raise ValueError(f"caption model {p} embeds text in {enc.dim}-D, but the image descriptors are {dim}-D; "
                         "a joint model's caption encoder and image model share one dimension")
    return enc.eval()


def text_card(text: str, size: int = 256):
    """A ``size x size`` RGB picture of ``text`` (wrapped, cut with an ellipsis when long): what
    result sheets and notebooks show in place of a query image for a text query."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    size = max(32, int(size))
    img = Image.new("RGB", (size, size), (232, 239, 253))
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=max(10, size // 12))
    except TypeError:  # Pillow < 10.1: the bitmap font of one size
        font = ImageFont.load_default()
    line_h = (draw.textbbox((0, 0), "Ag", font=font)[3] or 12) + 4
    width = max(8, int(size / (0.55 * max(6, line_h - 4))))
    lines = textwrap.wrap(" ".join(text.split()), width=width) or [""]
    fit = max(1, (size - 16) // line_h)
    if len(lines) > fit:
        lines = lines[:fit]
        lines[-1] = lines[-1][: max(0, width - 1)] + "…"
    y = max(8, (size - line_h * len(lines)) // 2)
    for line in lines:
        draw.text((8, y), line, fill=(29, 35, 48), font=font)
        y += line_h
    return img
