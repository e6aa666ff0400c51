"""The one usage-error type of the whole project, and the one exit-2 path of every entry point.

It lives here, in `common`, the package at the bottom of the import graph, because both `data_prep` (which
must never import `finetune`) and `finetune` raise it; both re-export it (`data_prep.UsageError`,
`finetune.UsageError`). Entry points (`train.py`, `predict.py`, `python -m data_prep`,
`python -m experiments`) wrap their work in `cli_main`, which turns a `UsageError` into one line,
``PROG: error: ...`` on stderr, and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UsageError(Exception):
    """A mistake the user can fix (bad flag, missing file or folder, unreadable input...).

    The message must name the file or flag involved and say what to do about it.
    """



def cli_main(prog: str, fn: Callable[[], int]) -> int:
    """Run `fn` (an entry point's body); a UsageError becomes `PROG: error: MESSAGE` and exit status 2."""
    try:
        return fn()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
