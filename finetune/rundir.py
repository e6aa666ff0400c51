"""The run directory's ownership: one job per directory (an exclusive flock on RUN_DIR/.lock, `lock_run_dir`),
a refused start that leaves the directory as it found it (`leave_nothing_if_refused`), and the per-rank
record RUN_DIR/ranks/rank-N.json (`write_rank_file`)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from accelerate import Accelerator

from . import UsageError, atomic_write_text
from .distributed import agree


_RUN_LOCK = {}      # run directory -> the open file whose flock this process holds until it exits


def lock_run_dir(accelerator: Accelerator, run_dir: Path) -> None:
    """One job per run directory: global rank 0 takes an exclusive flock on RUN_DIR/.lock for the job's
    lifetime and writes who holds it; a second job stops on every rank with one line naming the holder.
    The kernel drops a flock when its process dies (even by SIGKILL), so a dead job never blocks a new one."""
    problem = None
    if accelerator.is_main_process:
        problem = _take_lock(Path(run_dir))
    agree(accelerator, problem)


def _take_lock(run_dir: Path) -> str | None:
    import fcntl
    key = str(run_dir.resolve()) if run_dir.exists() else str(run_dir.absolute())
    if key in _RUN_LOCK:
        return None
    created = [p for p in (run_dir.absolute(), *run_dir.absolute().parents) if not p.exists()]   # deepest first
    if not (run_dir / ".lock").exists():
        created.insert(0, run_dir.absolute() / ".lock")
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        return (f"{run_dir} is in use by another job ({holder}); wait for it to end or choose another "
                f"--output-dir / --name")
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "-"
    fh.seek(0)
    earlier = fh.read()             # an earlier job's line: put back if this start is refused
    fh.seek(0)
    fh.truncate()
    fh.write(f"host {socket.gethostname()} pid {os.getpid()} job {job}\n")
    fh.flush()
    _RUN_LOCK[str(run_dir.resolve())] = fh
    _CREATED[str(run_dir.resolve())] = (created, earlier)
    return None


_CREATED = {}       # run directory -> (what taking its lock created: .lock, directories deepest first;
                    #                 the .lock's earlier content)


@contextlib.contextmanager
def leave_nothing_if_refused(run_dir: Path):
    """Around a run's start: on a UsageError (a refusal), give up the lock and remove what taking it created
    -- the .lock file, and the run directory (and parents) if this job made them and they are still empty --
    so a refused start leaves the directory as it found it."""
    try:
        yield
    except UsageError:
        key = str(Path(run_dir).resolve())
        fh = _RUN_LOCK.pop(key, None)
        if fh is not None:
            created, earlier = _CREATED.pop(key)
            fh.seek(0)
            fh.truncate()
            fh.write(earlier)
            fh.close()
            for path in created:
                with contextlib.suppress(OSError):    # rmdir: only if empty, the rest is not ours to delete
                    path.unlink() if path.name == ".lock" else path.rmdir()
        raise


def write_rank_file(run_dir: Path, info: dict) -> None:
    """ranks/rank-N.json: who this rank is, and at the end a digest of its parameters (equal on all ranks
    when DDP kept them in sync)."""
    ranks = run_dir / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ranks / f"rank-{info['rank']}.json", json.dumps(info))
