"""`python -m instantid_lab.notebooks --out outputs [--ci] [--only 01 03]`: see `runner`."""

import sys

from .runner import main

sys.exit(main())
