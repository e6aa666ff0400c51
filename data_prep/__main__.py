"""``python -m data_prep``: see `data_prep.cli`."""

import sys

from . import main

# The guard matters: a "spawn" worker process re-imports this module and must not run the CLI.
if __name__ == "__main__":
    sys.exit(main())
