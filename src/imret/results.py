"""What a search returns to people: :class:`Hit` (one result), :class:`SearchHits` (one
query's ranked hits, shown as a table by ``repr`` and as thumbnails in a notebook) and
:class:`SearchResults` (several queries). The store and the CLI build them; nothing here
reads a store."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

__all__ = ["Hit", "SearchHits", "SearchResults", "HTML_MAX_HITS", "HTML_MAX_QUERIES"]


@dataclass(frozen=True)
class Hit:
    """One search result. ``extras`` holds what re-rankers found for it: ``inliers`` (int) and
    ``transform`` (3x3 nested list, query pixels -> this image's pixels) of geometric
    verification, ``box`` ``(x1, y1, x2, y2)`` of localisation, in this image's pixels."""

    score: float
    id: int
    path: str
    extras: dict = field(default_factory=dict, compare=False, hash=False)


class SearchHits(list):
    """The ranked hits of one query, best first: a ``list`` of :class:`Hit` that also knows
    its query (shown as a table by ``repr``, and as thumbnails in a notebook).

    Attributes:
        query: the query's path, or the label of an image given in memory (such as
            ``<PIL image #0: 640x480 RGB>``, see :func:`imret.images.image_label`).
        bbox: the query's crop box ``(x1, y1, x2, y2)``, or None.
        error: why the query could not be searched (``on_error="skip"``), else None; the
            list is then empty.
        image: the query image when it was given in memory, else None.
    """

    def __init__(self, hits: Iterable[Hit] = (), *, query: str = "", bbox: Sequence[float] | None = None,
                 error: str | None = None, image: Any = None):
        super().__init__(hits)
        self.query = query
        self.bbox = None if bbox is None else tuple(float(v) for v in bbox)
        self.error = error
        self.image = image

    def _title(self) -> str:
        box = "" if self.bbox is None else f" [{','.join(f'{v:g}' for v in self.bbox)}]"
        return f"{_shown(self.query)}{box}"

    def __repr__(self) -> str:
        if self.error is not None:
            return f"{self._title()}: not searched ({self.error})"
        lines = [f"{len(self)} hit{'' if len(self) == 1 else 's'} for {self._title()}"]
        lines += [f"  {r:>4}  {h.score:7.4f}  id {h.id:<6}  {_shown(h.path)}" for r, h in enumerate(self, 1)]
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        """The query's thumbnail and a row of the hits' thumbnails with their scores (inline
        JPEG data, at most :data:`HTML_MAX_HITS` of them), for Jupyter and the like."""
        from .plots import results_html

        shown = list(self[:HTML_MAX_HITS])
        return results_html(self.image if self.image is not None else self.query, shown, name=self.query,
                            query_box=self.bbox, error=self.error, more=len(self) - len(shown))


class SearchResults(list):
    """The results of several queries: a ``list`` of :class:`SearchHits`, in query order."""

    def __repr__(self) -> str:
        return "\n".join(repr(h) for h in self) if self else "SearchResults([])"

    __str__ = __repr__

    def _repr_html_(self) -> str:
        parts = [h._repr_html_() for h in self[:HTML_MAX_QUERIES]]
        if len(self) > HTML_MAX_QUERIES:
            parts.append(f"<p>... and {len(self) - HTML_MAX_QUERIES} more queries</p>")
        return "".join(parts)


HTML_MAX_HITS = 50
"""Most hits a :class:`SearchHits` shows as thumbnails in a notebook."""
HTML_MAX_QUERIES = 20
"""Most queries a :class:`SearchResults` shows as thumbnails in a notebook."""


def _shown(path: str) -> str:
    """``path`` as it is when it can be one plain line, else quoted with escapes."""
    from .extract import is_plain_path

    return path if is_plain_path(path) else json.dumps(path)
