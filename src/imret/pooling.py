"""Former home of the poolings; kept so that ``imret.pooling`` imports keep working.

Everything here lives in :mod:`imret.models.pooling`; new code imports from there.
"""

from .models.pooling import (
    MAC,
    RMAC,
    GeM,
    RGeM,
    SPoC,
    create_pool,
    gem,
    list_pools,
    mac,
    pool_descriptions,
    regional_pool,
    rgem,
    rmac,
    rmac_regions,
    spoc,
)
from .models.pooling import __all__  # noqa: F401 - the same public names
