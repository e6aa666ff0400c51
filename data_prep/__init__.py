"""Prepare the hotdog dataset as WebDataset shards for train.py.

``python -m data_prep --source SRC --out OUT`` writes ``OUT/{train,test}-NNNNNN.tar`` and
``OUT/manifest.json`` (format: docs/manifest.md; usage and rules: docs/data.md).

Python API: `main` (the CLI), `prepare`, `verify`, `data_prep.synthetic.make_synthetic`, and the manifest
contract shared with `finetune`: `data_prep.manifest` (reader, shard-name rule, file hasher) and
`common.errors` (`UsageError`, `cli_main`).
"""

from common.errors import UsageError

from .cli import main
from .prepare import VERSION as __version__, prepare
from .shards import verify

# The name data_prep's Python API has always exported; the same class, not a second type.
DataPrepError = UsageError

__all__ = ["DataPrepError", "UsageError", "main", "prepare", "verify"]
