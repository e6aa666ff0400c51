"""Prepare the hotdog dataset as WebDataset shards for train.py.

``python -m data_prep --source SRC --out OUT`` writes ``OUT/{train,test}-NNNNNN.tar`` and
``OUT/manifest.json`` (format: docs/manifest.md; usage and rules: docs/data.md).

Python API: `main` (the CLI), `prepare`, `verify`, and `data_prep.synthetic.make_synthetic`.
"""

__version__ = "0.1"

from .cli import main  # noqa: E402  (after __version__, which prepare imports)
from .errors import DataPrepError  # noqa: E402
from .prepare import prepare  # noqa: E402
from .shards import verify  # noqa: E402

__all__ = ["DataPrepError", "main", "prepare", "verify"]
