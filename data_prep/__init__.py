"""Prepare the hotdog dataset as WebDataset shards for train.py.

``python -m data_prep --source SRC --out OUT`` writes ``OUT/{train,test}-NNNNNN.tar`` and
``OUT/manifest.json`` (format: docs/manifest.md; usage and rules: docs/data.md).

Python API: `main` (the CLI), `prepare`, `verify`, `data_prep.synthetic.make_synthetic`, and the manifest
contract shared with `finetune`: `data_prep.manifest` (reader, shard-name rule, file hasher) and
`data_prep.errors` (`UsageError`, `cli_main`).
"""

__version__ = "0.1"

from .cli import main  # noqa: E402  (after __version__, which prepare imports)
from .errors import DataPrepError, UsageError  # noqa: E402
from .prepare import prepare  # noqa: E402
from .shards import verify  # noqa: E402

__all__ = ["DataPrepError", "UsageError", "main", "prepare", "verify"]
