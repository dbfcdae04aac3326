"""``python -m flatminima``: the same as the ``flatminima`` command (and what torchrun runs)."""

import sys

from flatminima.cli import main

sys.exit(main())
