"""``python -m imret ...`` (and ``torchrun ... -m imret index build ...``): the ``imret`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
