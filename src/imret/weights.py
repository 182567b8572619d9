"""Former home of weights loading and checkpoints; kept so that ``imret.weights`` imports keep working.

Everything here lives in :mod:`imret.models.checkpoints`, except :func:`load_model`, which
builds a model and so lives in :mod:`imret.models.factory`. New code imports from
:mod:`imret.models` (or :mod:`imret`).
"""

from .models.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_weights_fit,
    convert_cirtorch,
    convert_dirtorch,
    convert_lukemelas_efficientnet,
    file_sha256,
    load_weights,
    read_weights_file,
    save_model,
)
from .models.factory import load_model

__all__ = [
    "read_weights_file",
    "file_sha256",
    "load_weights",
    "load_model",
    "save_model",
    "check_weights_fit",
    "convert_cirtorch",
    "convert_dirtorch",
    "convert_lukemelas_efficientnet",
]
