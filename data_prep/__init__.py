"""Prepare the hotdog dataset as WebDataset shards for train.py.

``python -m data_prep --source SRC --out OUT`` writes ``OUT/{train,test}-NNNNNN.tar`` and
``OUT/manifest.json`` (format: docs/manifest.md; usage and rules: docs/data.md).

Python API: `main` (the CLI), `prepare`, `verify`, `data_prep.synthetic.make_synthetic`, and the manifest
contract shared with `finetune`: `data_prep.manifest` (reader, shard-name rule, file hasher) and
`common.errors` (`UsageError`, `cli_main`).
"""

__version__ = "0.1"

from common.errors import UsageError  # noqa: E402
from .cli import main  # noqa: E402  (after __version__, which prepare imports)
from .prepare import prepare  # noqa: E402
from .shards import verify  # noqa: E402

# The name data_prep's Python API has always exported; the same class, not a second type.
DataPrepError = UsageError

__all__ = ["DataPrepError", "UsageError", "main", "prepare", "verify"]
