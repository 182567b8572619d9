"""CSV files whose layout is told by their header (labelled images, captions, pairs).

:func:`layout_rows` is the one reader behind them: UTF-8 text (a byte-order mark is accepted),
blank lines skipped, the first non-blank row is the header and must name one of the known
layouts (case-insensitive), every later row has as many columns as the header. Errors name the
file and line, and list the known layouts.
"""

from __future__ import annotations

import csv
import os
from typing import Iterator, Mapping

__all__ = ["layout_rows"]


def layout_rows(
    csv_path: str | os.PathLike, layouts: Mapping[tuple[str, ...], str], *, example: str = ""
) -> Iterator[tuple[str, dict[str, str], str]]:
    """Yield ``(layout, {column: cell}, where)`` for each data row of ``csv_path``.

    Args:
        csv_path: the file.
        layouts: header (lower-case column names, in order) -> layout name.
        example: a header to suggest when the file is empty (e.g. ``"path,caption"``).

    ``where`` is ``"file:line"`` for the caller's own errors. Cells are given as read (not
    stripped). Raises ``ValueError`` for an empty file, an unknown header, a row with the wrong
    number of columns, text that is not UTF-8, or malformed CSV.
    """
    path = os.fspath(csv_path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next((row for row in reader if any(c.strip() for c in row)), None)
            if header is None:
                raise ValueError(f"{path}: empty file" + (f"; expected a header {example!r}" if example else ""))
            key = tuple(c.strip().lower() for c in header)
            layout = layouts.get(key)
            if layout is None:
                known = "; ".join(",".join(k) for k in layouts)
                raise ValueError(f"{path}:{reader.line_num}: unknown header {','.join(header)!r}; known layouts: {known}")
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                where = f"{path}:{reader.line_num}"
                if len(row) != len(key):
                    raise ValueError(f"{where}: expected {len(key)} columns ({','.join(key)}), got {len(row)}: {row!r:.200}")
                yield layout, dict(zip(key, row)), where
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: malformed CSV: {e}") from None
