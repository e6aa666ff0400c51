"""``python -m data_prep``: see `data_prep.cli`."""

import sys

from . import main

sys.exit(main())
