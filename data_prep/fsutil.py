"""Small filesystem helpers shared by `prepare` and `synthetic`.

Both write a whole directory that should appear complete or not at all: the contents are built in a
hidden sibling directory (same filesystem, so the final `rename` is atomic) and moved into place at
the end. A crash or an error leaves, at worst, a hidden `.NAME.tmp-PID` folder, never a half-written
`NAME`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `out` when the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and `out`
    is left exactly as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed run with a recycled pid
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        # Two renames instead of rmtree-then-rename: `out` is never missing for longer than
        # the gap between them, and never half-deleted.
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
