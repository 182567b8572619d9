"""Former home of the retrieval network; kept so that ``imret.model`` imports keep working.

The network is :mod:`imret.models.net`, the spec :mod:`imret.models.spec` and the builders
:mod:`imret.models.factory`. New code imports from :mod:`imret.models` (or :mod:`imret`).
"""

from .models.factory import create_model, create_model_from_spec
from .models.net import RetrievalNet
from .models.spec import ModelSpec

__all__ = ["ModelSpec", "RetrievalNet", "create_model", "create_model_from_spec"]
