"""Small filesystem helpers shared by `prepare` and `synthetic`, and the project's one way to replace a
file atomically (`atomic_open`, `atomic_write_text`, `new_temp_file`, `atomic_link`: used by data_prep, finetune,
predict/export and experiments alike, hence in `common`, the bottom of the import graph).

Every temporary name is created exclusively (mkstemp: O_CREAT|O_EXCL|O_NOFOLLOW) under an unpredictable
name in the target's own folder: a link planted at a guessable name (`.config.yaml.tmp-<pid>`) can neither
redirect the write to another file nor end up as the target.

Both write a whole directory that should appear complete or not at all: the contents are built in a
hidden sibling directory (same filesystem, so the final `rename` is atomic) and moved into place at
the end. A crash or an error leaves, at worst, a hidden `.NAME.tmp-PID` folder, never a half-written
`NAME`; the next run removes such a folder once its PID is dead on this host (`_remove_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UsageError

# Inside a temporary folder while it is being written: the host that writes it (removed before the
# final rename). A stale folder is only removed by a run on that same host, where its PID means something.
_OWNER = ".data_prep-owner"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files, mkdtemp 0700 folders; what they become (config.yaml, model.pt, a shard folder)
# gets the permissions a plain open()/mkdir would have given. Read once at import, before any thread starts.
_UMASK = _read_umask()


def _mkstemp(target: Path) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, Path(name)


def new_temp_file(target: str | os.PathLike) -> Path:
    """A new empty regular file next to `target`, created exclusively under an unpredictable name, for a
    writer that wants a path (torch.onnx.export, savefig); the caller renames it onto `target` with
    os.replace, or unlinks it."""
    fd, path = _mkstemp(Path(target))
    os.close(fd)
    return path


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Write `target` so that readers (and crashes) see the old or the complete new content, never half:
    a fresh temporary file (see the module's doc), fsync'ed, renamed onto `target`. On any exception (disk
    full, Ctrl-C) the temporary file is removed and `target` is left as it was."""
    target = Path(target)
    fd, tmp = _mkstemp(target)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_open(target, "w") as fh:
        fh.write(text)


def atomic_link(source: Path, target: Path) -> None:
    """Make `target` a hard link of `source`, atomically: link under an unpredictable name (a link never
    follows or overwrites an existing name), then rename."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(8)}")
        try:
            os.link(source, tmp)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name next to {target}")
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output_target(out: Path, flag: str = "--out") -> Path:
    """The real folder that an output folder `out` stands for; refuse the ones that cannot be replaced.

    `out` is replaced as a whole by a rename, so it must not be the current folder or one above it
    (`--out .`: the rename fails with EBUSY after a full copy was written), nor a mount point (a
    rename cannot move one). A symbolic link is followed: the folder it points to is replaced and
    the link is kept (also one whose target does not exist yet), as rsync and tar write through a
    symlinked destination folder instead of replacing the link.
    """
    out = Path(out)
    real = Path(os.path.realpath(out))
    if Path.cwd().resolve().is_relative_to(real):
        raise UsageError(f"{flag} {out}: is the current folder or one above it, and {flag} is replaced as "
                            f"a whole; pass a new subfolder, e.g. {flag} shards")
    if real.exists() and os.path.ismount(real):
        raise UsageError(f"{flag} {out}: is a mount point, which cannot be replaced; pass a folder inside it, "
                            f"e.g. {flag} {out}/shards")
    return real


@contextlib.contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `out` when the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and `out`
    is left exactly as it was; a full disk or quota is then a UsageError (one line) saying so.
    """
    given, out = out, output_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    # Unpredictable and exclusive (mkdtemp), still ending in -PID for _remove_stale.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", suffix=f"-{os.getpid()}", dir=out.parent))
    tmp.chmod(0o777 & ~_UMASK)
    (tmp / _OWNER).write_text(socket.gethostname() + "\n")
    try:
        yield tmp
        (tmp / _OWNER).unlink()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UsageError(f"{given}: the disk is full ({e.strerror}, writing {e.filename or 'the output'}); the "
                             f"temporary folder was removed and {given} is unchanged: free space or write "
                             f"elsewhere") from None
        raise
    if out.exists():
        # Two renames instead of rmtree-then-rename: `out` is never missing for longer than
        # the gap between them, and never half-deleted. `old` is a fresh empty folder (mkdtemp), which
        # rename replaces: never a name someone else prepared.
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old)
    else:
        old = None
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(out: Path) -> None:
    """Remove `.OUT.tmp-PID` folders left by killed runs: those written on this host by a PID that is gone.

    One stderr line per folder removed, or left alone because it may belong to a live run (its PID
    is alive, or it was written on another host, or by a data_prep too old to say).
    """
    for tmp in sorted(out.parent.glob(f".{glob.escape(out.name)}.tmp-*")):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not tmp.is_dir():
            continue
        try:
            host = (tmp / _OWNER).read_text().strip()
        except OSError:
            host = None
        if host == socket.gethostname() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"data_prep: removed {tmp}, left by a killed run (pid {pid} is gone)", file=sys.stderr)
        else:
            why = f"pid {pid} is alive" if host == socket.gethostname() else f"written on {host or 'an unknown host'}"
            print(f"data_prep: warning: left {tmp} alone ({why}); delete it if no data_prep run is using it",
                  file=sys.stderr)


def pid_alive(pid: int) -> bool:
    """Is process `pid` alive on this host (someone else's counts)? For leftovers named after their writer."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
