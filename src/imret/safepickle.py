"""Reading the pickle files research datasets ship (revisitop ground truth, SfM-120k) safely.

Only builtin containers, numbers, strings and NumPy arrays are rebuilt; any other class in the
file is refused, so a crafted file cannot run code.
"""

from __future__ import annotations

import os
import pickle
from typing import IO, Any

__all__ = ["DataUnpickler", "load_data_pickle"]


class DataUnpickler(pickle.Unpickler):
    """Unpickler for data description files: builtin containers and numpy arrays only."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def __init__(self, file: IO[bytes], *, what: str = "a dataset file", **kwargs: Any):
        super().__init__(file, **kwargs)
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: {self._what} holds only lists, dicts, numbers, strings and numpy arrays"
        )


def load_data_pickle(path: str | os.PathLike, *, what: str = "a dataset file", encoding: str = "ASCII") -> Any:
    """Unpickle the file at ``path`` allowing only plain data (see :class:`DataUnpickler`).

    A file that is not such a pickle raises ``ValueError`` naming the path and ``what`` it
    should have been.
    """
    with open(path, "rb") as f:
        try:
            return DataUnpickler(f, what=what, encoding=encoding).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{os.fspath(path)}: not {what} ({e})") from e
