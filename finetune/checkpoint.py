"""Checkpoints: atomic save (temporary file, then rename), keep the last k plus the best, resume from the
newest complete one, and the preemption flag that signal handlers raise."""

from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path

import torch

from . import UsageError

CKPT = re.compile(r"^ckpt-(\d{8})\.pt$")


# ------------------------------------------------------------------------------------------------------
# Preemption: the handler only sets a flag; the loop checks it at step boundaries (all ranks agree).
# ------------------------------------------------------------------------------------------------------
class PreemptionFlag:
    def __init__(self, names: str):
        self.requested = False
        self.signal_name = None
        for name in filter(None, (n.strip().upper() for n in names.split(","))):
            sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
            if not isinstance(sig, signal.Signals):
                raise UsageError(f"--preempt-signals: unknown signal '{name}'")
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name


# ------------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary name in the same directory, fsync, then rename: a reader (or a crash) sees
    either the old file or the complete new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(state: dict, ckpt_dir: Path, keep_last: int, is_best: bool) -> Path:
    """Called on the main process only. state['step'] names the file."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{state['step']:08d}.pt"
    atomic_save(state, path)
    if is_best:
        tmp = ckpt_dir / f".best.pt.tmp-{os.getpid()}"
        os.link(path, tmp)          # a hard link: best.pt survives the pruning of its ckpt-*.pt name
        os.replace(tmp, ckpt_dir / "best.pt")
    for old in sorted(p for p in ckpt_dir.iterdir() if CKPT.match(p.name))[:-keep_last]:
        old.unlink()
    return path


# ------------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------------
def load(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError("not a train.py checkpoint")
    return state


def find_resume(resume: str, ckpt_dir: Path, log=print) -> dict | None:
    """--resume auto: newest complete checkpoint (damaged ones are skipped with a message); PATH: that one."""
    if not resume:
        return None
    if resume != "auto":
        try:
            return load(Path(resume))
        except FileNotFoundError:
            raise UsageError(f"--resume {resume}: no such file") from None
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--resume {resume}: cannot load it ({type(e).__name__}: {e})") from None
    candidates = sorted((p for p in ckpt_dir.glob("ckpt-*.pt") if CKPT.match(p.name)), reverse=True)
    for path in candidates:
        try:
            return load(path)
        except Exception as e:  # noqa: BLE001 -- a truncated/corrupt file: fall back to an older one
            log(f"skipping damaged checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    return None

