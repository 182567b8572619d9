"""Pictures of retrieval results: per-query AP charts and top-k result grids.

* :func:`plot_ap_per_query` draws a bar chart with matplotlib, an optional extra
  (``pip install 'imret[plots]'``), imported only inside the function. It builds a
  :class:`matplotlib.figure.Figure` directly, without pyplot, so no global backend or
  figure state is touched.
* :func:`draw_topk_grid` draws a grid of thumbnails with Pillow only: one row per query,
  the query (with its region box) then its top-k database images framed green (positive),
  red (negative) or grey (junk, ignored by the metric), each captioned with its rank.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ._checks import positive_int
from .evaluation import (
    PROTOCOLS,
    LabelledResult,
    RevisitopGroundTruth,
    RevisitopResult,
    _check_ranks,
    _protocol_name,
    revisitop_protocol,
)

__all__ = [
    "MARK_COLOURS",
    "plot_ap_per_query",
    "ap_per_query_figure",
    "wrap_title",
    "revisitop_row_labels",
    "revisitop_marks",
    "draw_topk_grid",
    "draw_revisitop_topk",
    "topk_grid_size",
    "results_html",
    "thumbnail_data_uri",
    "write_results_html",
]

ImageLike = Union[str, os.PathLike, Image.Image]

#: Frame colour of each mark of :func:`draw_topk_grid`.
MARK_COLOURS: dict[str, tuple[int, int, int]] = {
    "pos": (40, 170, 60),  # green: correct
    "neg": (210, 40, 40),  # red: wrong
    "junk": (150, 150, 150),  # grey: ignored by the protocol
}

_PROTOCOL_COLOURS = {"easy": "#4c9f50", "medium": "#3b75af", "hard": "#c44e52"}

# Grid geometry (pixels): frame width, gap between tiles, caption strip height.
_BORDER = 4
_GAP = 4
_CAPTION = 16
_LABEL = 14  # a row's label strip (query name and AP) above its tiles, when rows are labelled
_LABEL_COLOUR = (30, 30, 30)
_BACKGROUND = (255, 255, 255)
_TILE_BACKGROUND = (235, 235, 235)
_BOX_COLOUR = (255, 200, 0)
_QUERY_FRAME = (40, 90, 200)


def _matplotlib_figure() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plot_ap_per_query needs matplotlib: pip install 'imret[plots]'"
        ) from e
    return Figure


# --------------------------------------------------------------------------------------
# AP per query
# --------------------------------------------------------------------------------------


def plot_ap_per_query(
    result: RevisitopResult | LabelledResult,
    path: str | os.PathLike,
    query_names: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Save a PNG bar chart of the AP of every query, in percent (see :func:`ap_per_query_figure`).

    Args:
        result: from :func:`imret.evaluation.evaluate_revisitop` or
            :func:`imret.evaluation.evaluate_labelled`.
        path: the PNG file to write (parent folders are created).
        query_names: ``Nq`` tick labels; default: ``result.query_names`` for revisitop,
            else query numbers. Ticks are shown for at most 100 queries.
        title: figure title (wrapped to the figure's width); default names the dataset.
        dpi: resolution of the PNG.

    Returns:
        ``Path(path)``.
    """
    fig = ap_per_query_figure(result, query_names, title, dpi=dpi)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def wrap_title(title: str, width_inches: float) -> str:
    """``title`` broken into lines that fit ``width_inches`` at matplotlib's default title size
    (about 11 characters per inch), breaking at spaces, commas and semicolons. Pure."""
    import textwrap

    per_line = max(20, int(width_inches * 11))
    return "\n".join(textwrap.fill(part, per_line, break_long_words=True, break_on_hyphens=False)
                     for part in str(title).split("\n"))


def ap_per_query_figure(
    result: RevisitopResult | LabelledResult,
    query_names: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Any:
    """The :class:`matplotlib.figure.Figure` of :func:`plot_ap_per_query`, AP in percent.

    Revisitop results: grouped Easy / Medium / Hard bars per query with a dashed line at
    each protocol's mAP; queries without positives in a protocol get no bar there.
    Labelled results: one bar per query (a filled profile beyond 300 queries) with the
    mAP line; excluded queries are left out. The title is wrapped to the figure's width and
    the legend sits below the axes, so neither is cut nor covers a bar (constrained layout).
    """
    if not isinstance(result, (RevisitopResult, LabelledResult)):
        raise TypeError(
            f"plot_ap_per_query expects a RevisitopResult or LabelledResult, "
            f"got {type(result).__name__}"
        )
    Figure = _matplotlib_figure()
    n = result.n_queries
    if query_names is None and isinstance(result, RevisitopResult) and result.query_names:
        query_names = result.query_names
    if query_names is not None and len(query_names) != n:
        raise ValueError(f"query_names has {len(query_names)} names but there are {n} queries")
    width = min(40.0, max(6.0, 0.12 * n * (3 if isinstance(result, RevisitopResult) else 1)))
    fig = Figure(figsize=(width, 5.0), dpi=dpi, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    if isinstance(result, RevisitopResult):
        bar_w = 0.8 / len(PROTOCOLS)
        for t, p in enumerate(PROTOCOLS):
            r = result.protocol(p)
            ap = 100.0 * np.nan_to_num(r.ap, nan=0.0)
            colour = _PROTOCOL_COLOURS[p]
            ax.bar(x + (t - 1) * bar_w, ap, width=bar_w, color=colour,
                   label=f"{p.capitalize()}: mAP {_pct(r.map)} %")
            if not math.isnan(r.map):
                ax.axhline(100.0 * r.map, color=colour, linestyle="--", linewidth=1)
        default_title = f"{result.name or 'revisitop'}: AP per query"
    else:
        ap = 100.0 * result.ap
        valid = ~np.isnan(ap)
        if n > 300:
            ys = np.sort(ap[valid])[::-1]
            ax.fill_between(np.arange(ys.shape[0]), ys, step="mid", color="#3b75af")
            ax.set_xlabel("queries, sorted by AP")
            query_names = None
        else:
            ax.bar(x[valid], ap[valid], width=0.8, color="#3b75af")
        if not math.isnan(result.map):
            ax.axhline(100.0 * result.map, color="black", linestyle="--", linewidth=1,
                       label=f"mAP {_pct(result.map)} %")
        default_title = f"{result.name or 'labelled set'}: AP per query"
    ax.set_ylim(0.0, 102.0)
    ax.set_ylabel("AP (%)")
    ax.set_xlim(-0.6, max(n, 1) - 0.4)
    if query_names is not None and n <= 100:
        ax.set_xticks(x)
        ax.set_xticklabels([str(q) for q in query_names], rotation=90, fontsize=6)
    elif n <= 100:
        ax.set_xticks(x)
        ax.set_xticklabels([str(i) for i in x], fontsize=6)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower center", ncols=3, fontsize="small", frameon=False)
    fig.suptitle(wrap_title(title if title is not None else default_title, width), fontsize="medium")
    return fig


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100.0 * x:.2f}"


# --------------------------------------------------------------------------------------
# Top-k grids
# --------------------------------------------------------------------------------------


def revisitop_marks(
    ranks: Any, gt: RevisitopGroundTruth, protocol: str = "medium", k: int = 10
) -> list[list[str]]:
    """Per-query marks of the top ``k`` database images under a revisitop protocol.

    Args:
        ranks: ``(Nq, K)`` integer database indices per query, best first.
        gt: the ground truth.
        protocol: ``"easy"``, ``"medium"`` or ``"hard"`` (see
            :func:`imret.evaluation.revisitop_protocol`).
        k: number of ranks to mark.

    Returns:
        ``Nq`` lists of ``min(k, K)`` strings: ``"pos"`` (a positive), ``"junk"``
        (ignored by the protocol) or ``"neg"``. Ranks are the raw positions, junk included.
    """
    protocol = _protocol_name(protocol)
    k = positive_int(k, "k")
    r = _check_ranks(ranks, gt.n_queries, gt.n_db)[:, :k]
    ok, junk = revisitop_protocol(gt, protocol)
    marks = []
    for i in range(gt.n_queries):
        is_ok = np.isin(r[i], ok[i])
        is_junk = np.isin(r[i], junk[i])
        marks.append(["pos" if o else "junk" if j else "neg" for o, j in zip(is_ok, is_junk)])
    return marks


def topk_grid_size(n_queries: int, k: int, thumb: int = 128, labels: bool = False) -> tuple[int, int]:
    """``(width, height)`` in pixels of the image :func:`draw_topk_grid` makes.

    Each tile is ``thumb + 2 * 4`` pixels square plus a 16-pixel caption, tiles are 4
    pixels apart, and the query column is followed by an extra 8-pixel gap; with ``labels``
    (``row_labels`` given) each row has a 14-pixel label strip above it.
    """
    cell_w = thumb + 2 * _BORDER
    cell_h = cell_w + _CAPTION + (_LABEL if labels else 0)
    width = _GAP + (k + 1) * (cell_w + _GAP) + 2 * _GAP
    height = _GAP + n_queries * (cell_h + _GAP)
    return width, height


def _fit_text(draw: Any, text: str, width: int, font: Any) -> str:
    """``text`` cut with "..." to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def revisitop_row_labels(
    query_names: Sequence[str], ap: Sequence[float] | None, protocol: str = "medium"
) -> list[str]:
    """The row labels of a top-k grid: ``"<query name>  Medium AP 52.08 %"`` (``AP n/a`` for a
    query without positives; the name alone when ``ap`` is None). Pure."""
    protocol = _protocol_name(protocol)
    if ap is not None and len(ap) != len(query_names):
        raise ValueError(f"ap has {len(ap)} values but there are {len(query_names)} queries")
    if ap is None:
        return [str(q) for q in query_names]
    return [f"{q}  {protocol.capitalize()} AP {_pct(float(a))}" + (" %" if not math.isnan(float(a)) else "")
            for q, a in zip(query_names, ap)]


def _open_image(img: ImageLike, thumb: int) -> tuple[Image.Image | None, tuple[int, int] | None]:
    """``(image, original size)``, decoded near ``thumb``; ``(None, None)`` if unreadable."""
    try:
        if isinstance(img, Image.Image):
            im = img
            size = im.size
        else:
            im = Image.open(img)
            size = im.size
            im.draft("RGB", (thumb, thumb))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
        im = im.convert("RGB")
        im.load()
        return im, size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, None


def _thumbnail(
    img: ImageLike, thumb: int, box: Sequence[float] | None
) -> tuple[Image.Image, bool]:
    """A ``thumb x thumb`` tile with the image fitted and centred; ``(tile, opened)``."""
    tile = Image.new("RGB", (thumb, thumb), _TILE_BACKGROUND)
    draw = ImageDraw.Draw(tile)
    im, size = _open_image(img, thumb)
    if im is None or size is None or size[0] < 1 or size[1] < 1:
        draw.line([(0, 0), (thumb - 1, thumb - 1)], fill=(180, 180, 180), width=2)
        draw.line([(0, thumb - 1), (thumb - 1, 0)], fill=(180, 180, 180), width=2)
        draw.text((4, thumb // 2 - 6), "unreadable", fill=(90, 90, 90), font=_font())
        return tile, False
    scale = min(thumb / size[0], thumb / size[1])
    w, h = max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
    ox, oy = (thumb - w) // 2, (thumb - h) // 2
    tile.paste(im.resize((w, h), Image.Resampling.BILINEAR), (ox, oy))
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle(
            [ox + x1 * scale, oy + y1 * scale, ox + x2 * scale, oy + y2 * scale],
            outline=_BOX_COLOUR,
            width=2,
        )
    return tile, True


@functools.lru_cache(maxsize=1)
def _font() -> Any:
    """Pillow's built-in font, loaded on first use."""
    return ImageFont.load_default()


def draw_topk_grid(
    query_images: Sequence[ImageLike],
    ranked_db_images: Sequence[Sequence[ImageLike]],
    marks: Sequence[Sequence[str]] | None,
    path: str | os.PathLike,
    k: int = 10,
    query_boxes: Sequence[Sequence[float] | None] | None = None,
    thumb: int = 128,
    captions: Sequence[Sequence[str]] | None = None,
    result_boxes: Sequence[Sequence[Sequence[float] | None]] | None = None,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Save a PNG grid of retrieval results, one row per query.

    Each row shows the query (blue frame, its region box in yellow) then its first ``k``
    database images, framed by their mark: green ``"pos"``, red ``"neg"``, grey ``"junk"``
    (see :data:`MARK_COLOURS`), captioned with the 1-based rank. Images that cannot be
    opened are drawn as a crossed placeholder tile. No EXIF rotation is applied, so boxes
    stay in the pixel coordinates of the stored image (as in revisitop).

    Args:
        query_images: ``Nq`` image paths or PIL images.
        ranked_db_images: ``Nq`` sequences of database images, best first (only the first
            ``k`` are drawn; shorter rows leave empty cells).
        marks: ``Nq`` sequences of ``"pos"`` / ``"neg"`` / ``"junk"``, at least as long as
            the drawn part of each row; ``None`` for neutral frames.
        path: the PNG file to write (parent folders are created).
        k: number of results per row.
        query_boxes: ``Nq`` boxes ``(x1, y1, x2, y2)`` in pixels of the original query
            image, or ``None`` entries; ``None`` for no boxes.
        thumb: thumbnail side in pixels.
        captions: ``Nq`` sequences of extra caption text per result (e.g. the score),
            drawn after the rank; ``None`` for none.
        result_boxes: ``Nq`` sequences of boxes ``(x1, y1, x2, y2)`` (or None) per result,
            in pixels of the result's image: where the query object was found in it
            (localisation), drawn in yellow; ``None`` for none.
        row_labels: ``Nq`` texts written above their rows (e.g. the query's name and AP,
            :func:`revisitop_row_labels`), cut with "..." to the grid's width; ``None``: no
            label strips.

    Returns:
        ``Path(path)``; the image size is :func:`topk_grid_size` ``(Nq, k, thumb,
        labels=row_labels is not None)``.
    """
    n_q = len(query_images)
    k = positive_int(k, "k")
    if isinstance(thumb, bool) or not isinstance(thumb, (int, np.integer)) or thumb < 16:
        raise ValueError(f"thumb must be an integer >= 16 pixels, got {thumb!r}")
    if len(ranked_db_images) != n_q:
        raise ValueError(
            f"ranked_db_images has {len(ranked_db_images)} rows but there are {n_q} queries"
        )
    if marks is not None and len(marks) != n_q:
        raise ValueError(f"marks has {len(marks)} rows but there are {n_q} queries")
    if captions is not None and len(captions) != n_q:
        raise ValueError(f"captions has {len(captions)} rows but there are {n_q} queries")
    if query_boxes is not None and len(query_boxes) != n_q:
        raise ValueError(f"query_boxes has {len(query_boxes)} entries but there are {n_q} queries")
    if result_boxes is not None and len(result_boxes) != n_q:
        raise ValueError(f"result_boxes has {len(result_boxes)} rows but there are {n_q} queries")
    if row_labels is not None and len(row_labels) != n_q:
        raise ValueError(f"row_labels has {len(row_labels)} entries but there are {n_q} queries")
    if marks is not None:
        for i, row in enumerate(marks):
            need = min(k, len(ranked_db_images[i]))
            if len(row) < need:
                raise ValueError(f"marks[{i}] has {len(row)} marks but {need} results are drawn")
            for m in list(row)[:need]:
                if m not in MARK_COLOURS:
                    raise ValueError(
                        f"unknown mark {m!r} in marks[{i}]; available: {', '.join(MARK_COLOURS)}"
                    )

    labelled = row_labels is not None
    width, height = topk_grid_size(n_q, k, thumb, labels=labelled)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    cell_w = thumb + 2 * _BORDER
    cell_h = cell_w + _CAPTION

    def put(
        tile: Image.Image, col_x: int, row_y: int, frame: tuple[int, int, int], caption: str
    ) -> None:
        draw.rectangle([col_x, row_y, col_x + cell_w - 1, row_y + cell_w - 1], fill=frame)
        canvas.paste(tile, (col_x + _BORDER, row_y + _BORDER))
        draw.text((col_x + 2, row_y + cell_w + 2), caption, fill=frame, font=font)

    row_h = cell_h + (_LABEL if labelled else 0)
    for i in range(n_q):
        y = _GAP + i * (row_h + _GAP)
        if labelled:
            draw.text((_GAP + 2, y + 1), _fit_text(draw, str(row_labels[i]), width - 2 * _GAP - 4, font),
                      fill=_LABEL_COLOUR, font=font)
            y += _LABEL
        box = None if query_boxes is None else query_boxes[i]
        tile, _ = _thumbnail(query_images[i], thumb, box)
        put(tile, _GAP, y, _QUERY_FRAME, "query")
        row = list(ranked_db_images[i])[:k]
        for t, img in enumerate(row):
            x = _GAP + (t + 1) * (cell_w + _GAP) + 2 * _GAP
            mark = None if marks is None else marks[i][t]
            frame = MARK_COLOURS[mark] if mark is not None else (60, 60, 60)
            rbox = None
            if result_boxes is not None and t < len(result_boxes[i]):
                rbox = result_boxes[i][t]
            tile, _ = _thumbnail(img, thumb, rbox)
            caption = f"{t + 1}" if mark is None else f"{t + 1} {mark}"
            if captions is not None and t < len(captions[i]):
                caption += f" {captions[i][t]}"
            put(tile, x, y, frame, caption)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def draw_revisitop_topk(
    ranks: Any,
    gt: RevisitopGroundTruth,
    image_root: str | os.PathLike,
    path: str | os.PathLike,
    protocol: str = "medium",
    k: int = 10,
    queries: Sequence[int] | None = None,
    thumb: int = 128,
    ext: str = ".jpg",
    label_rows: bool = False,
    ap: Sequence[float] | None = None,
) -> Path:
    """:func:`draw_topk_grid` for a revisitop dataset whose images are ``image_root/<name><ext>``;
    with ``label_rows`` each row is labelled with its query's name and AP under ``protocol``
    (:func:`revisitop_row_labels`; ``imret eval`` draws them so).

    Args:
        ranks: ``(Nq, K)`` integer database indices per query, best first.
        gt: the ground truth (query boxes are taken from ``gt.bbx``).
        image_root: folder of the query and database images.
        path: the PNG file to write.
        protocol: which protocol's positives / junk the frames show.
        k: results per query.
        queries: query indices to draw, in order; default all.
        thumb: thumbnail side in pixels.
        ext: image file extension.
        label_rows: write the query's name and AP above each row.
        ap: with ``label_rows``, the ``Nq`` APs (fractions, NaN for none) under ``protocol``;
            default: computed from ``ranks`` when they rank the whole database, else the
            labels show the names only.
    """
    marks = revisitop_marks(ranks, gt, protocol, k)
    r = np.asarray(ranks)
    sel = list(range(gt.n_queries)) if queries is None else [int(q) for q in queries]
    for q in sel:
        if not 0 <= q < gt.n_queries:
            raise ValueError(f"query index {q} is outside [0, {gt.n_queries})")
    labels = None
    if label_rows:
        if ap is None and r.ndim == 2 and r.shape[1] == gt.n_db:
            from .evaluation import evaluate_revisitop

            ap = evaluate_revisitop(r, gt).protocol(protocol).ap
        labels = revisitop_row_labels(gt.qimlist, ap, protocol)
    qpaths = gt.query_paths(image_root, ext)
    dbpaths = gt.db_paths(image_root, ext)
    return draw_topk_grid(
        [qpaths[q] for q in sel],
        [[dbpaths[j] for j in r[q, :k]] for q in sel],
        [marks[q] for q in sel],
        path,
        k=k,
        query_boxes=[gt.bbx[q] for q in sel],
        thumb=thumb,
        row_labels=None if labels is None else [labels[q] for q in sel],
    )


def thumbnail_data_uri(img: ImageLike, thumb: int = 160, box: Sequence[float] | None = None) -> str:
    """A ``data:image/jpeg;base64,...`` URI of a ``thumb x thumb`` tile of ``img`` (fitted, cropped
    to ``box`` when given), for self-contained HTML reports."""
    import base64
    import io

    tile, _ = _thumbnail(img, thumb, box)
    buf = io.BytesIO()
    tile.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_FIGURE = ("margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;"
           "width:{w}px;flex:none;font:12px system-ui,sans-serif;color:#222")


def _link(path: str, base: str | os.PathLike | None) -> str:
    """The ``href`` of an image file: relative to the folder ``base`` (URL-quoted, ``/``
    separators) when given and possible (same drive), else its absolute ``file://`` address
    (a relative ``path`` stays relative)."""
    from urllib.parse import quote

    if base is not None:
        try:
            rel = os.path.relpath(os.path.abspath(path), os.path.abspath(os.fspath(base)))
        except ValueError:  # another drive (Windows): no relative path exists
            rel = None
        if rel is not None:
            return quote(Path(rel).as_posix())
    return Path(path).resolve().as_uri() if os.path.isabs(path) else quote(Path(path).as_posix())


def results_html(
    query: ImageLike | np.ndarray,
    hits: Sequence[Any],
    *,
    name: str | None = None,
    query_box: Sequence[float] | None = None,
    thumb: int = 128,
    error: str | None = None,
    more: int = 0,
    link_base: str | os.PathLike | None = None,
) -> str:
    """One query's results as an HTML fragment: the query's thumbnail (its box drawn), then a
    row of the hits' thumbnails with rank, score, id and file name under each.

    ``query`` is a path, a PIL image or an ``H x W x 3`` uint8 array; ``hits`` objects with
    ``score``, ``id`` and ``path`` (:class:`imret.index.store.Hit`); a hit's ``extras`` may
    add its verified ``inliers`` (captioned) and the ``box`` of the query object in it (drawn). Thumbnails are inline
    JPEG data URIs of at most ``thumb`` (32..512) pixels a side, so the fragment stands
    alone (a notebook cell, a mailed page); styles are inline, every name is HTML-escaped.
    ``error`` says why the query has no results; ``more`` counts hits left out. Each result
    links to its file: relative to ``link_base`` (the folder of the page that will hold the
    fragment) when given, so that the page and the photos can move together; else an absolute
    ``file://`` address.
    """
    import html

    thumb = min(512, max(32, positive_int(thumb, "thumb")))
    if isinstance(query, np.ndarray):
        query = Image.fromarray(np.ascontiguousarray(query))
    if name is None:
        name = os.fspath(query) if isinstance(query, (str, os.PathLike)) else "query"
    fig = _FIGURE.format(w=thumb)
    img = f"display:block;width:{thumb}px;height:{thumb}px"
    parts = [f"<div style='margin:0 0 16px'><div style='font:600 13px system-ui,sans-serif;margin:0 0 6px;"
             f"word-break:break-all'>query: {html.escape(name)}</div>"
             "<div style='display:flex;flex-wrap:wrap;gap:8px'>",
             f"<figure style='{fig};border:2px solid #3b6fd4'><img alt='query' style='{img}' "
             f"src='{thumbnail_data_uri(query, thumb, query_box)}'><figcaption>query"
             f"{' (box)' if query_box is not None else ''}</figcaption></figure>"]
    if error is not None:
        parts.append(f"<div style='align-self:center;color:#a00'>not searched: {html.escape(error)}</div>")
    for rank, h in enumerate(hits, 1):
        path = os.fspath(h.path)
        target = _link(path, link_base)
        extras = getattr(h, "extras", None) or {}
        found = f" · {int(extras['inliers'])} inliers" if "inliers" in extras else ""
        parts.append(
            f"<figure style='{fig}'><a href='{html.escape(target)}' style='color:inherit;text-decoration:none'>"
            f"<img alt='result {rank}' style='{img}' src='{thumbnail_data_uri(path, thumb, extras.get('box'))}'></a>"
            f"<figcaption style='margin-top:4px;word-break:break-all'><b>#{rank} · {h.score:.4f}</b> · id {h.id}"
            f"{found}<br>{html.escape(os.path.basename(path))}</figcaption></figure>")
    if more > 0:
        parts.append(f"<div style='align-self:center'>... and {more} more</div>")
    parts.append("</div></div>")
    return "".join(parts)


def write_results_html(
    query_images: Sequence[ImageLike | np.ndarray],
    results: Sequence[Sequence[Any]],
    path: str | os.PathLike,
    *,
    query_boxes: Sequence[Sequence[float] | None] | None = None,
    thumb: int = 160,
    title: str = "imret search results",
    query_names: Sequence[str] | None = None,
) -> Path:
    """Write a self-contained HTML contact sheet: per query, its thumbnail and ranked results
    (:func:`results_html`).

    ``results`` holds, per query, objects with ``score``, ``id`` and ``path`` attributes
    (:class:`imret.index.store.Hit`). Thumbnails are embedded as data URIs, so the file can
    be moved or mailed; each result links to its original file, by a path relative to the
    page's folder (the page and the photos can move together). ``query_names`` label the
    queries (default: their paths).
    """
    import html

    if len(results) != len(query_images):
        raise ValueError(f"results has {len(results)} rows but there are {len(query_images)} queries")
    if query_boxes is not None and len(query_boxes) != len(query_images):
        raise ValueError(f"query_boxes has {len(query_boxes)} entries but there are {len(query_images)} queries")
    if query_names is not None and len(query_names) != len(query_images):
        raise ValueError(f"query_names has {len(query_names)} entries but there are {len(query_images)} queries")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title></head>",
        "<body style='font:14px system-ui,sans-serif;margin:24px;background:#fafafa;color:#222'>",
        f"<h1 style='font-size:18px'>{html.escape(title)}</h1>",
    ]
    for i, (q, hits) in enumerate(zip(query_images, results)):
        parts.append(results_html(q, hits, name=None if query_names is None else query_names[i],
                                  query_box=None if query_boxes is None else query_boxes[i], thumb=thumb,
                                  link_base=Path(path).parent))
    parts.append("</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path
