"""Fault injection for tests that run train.py as a subprocess: slow steps the production code knows nothing of.

Python imports `sitecustomize` at start-up from sys.path; tests put this folder on PYTHONPATH (tests/faults/
__init__.py: `faults.env(...)`), so every Python process of the run -- accelerate launch's workers too --
loads this file. It wraps library functions after their module is imported, reading the same variables:

  FINETUNE_TEST_STARTUP_DELAY_S=S   sleep S seconds right after the first ranks/rank-N.json is written (the
                                    start was accepted): a slow start-up (a model download) to signal into
  FINETUNE_TEST_SAVE_DELAY_S=S      sleep S seconds after rank 0 writes each checkpoint: a slow shared filesystem
  FINETUNE_TEST_SLOW_AT=RANK:STEP   that rank sleeps FINETUNE_TEST_SLOW_STEP_S seconds before the STEP-th optimizer
  FINETUNE_TEST_SLOW_STEP_S=S       step it runs in each epoch (0: the first) -- a rank still compiling, or a
                                    fresh loader worker's first batch -- while the others wait in its collectives

Without any of them set, it installs nothing.
"""

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time


APPLIED = set()     # the modules patched in this process


def _seconds(variable: str) -> float:
    return float(os.environ.get(variable, "0") or 0)


def _slow_start_up(module) -> None:
    delay, real, calls = _seconds("FINETUNE_TEST_STARTUP_DELAY_S"), module.write_rank_file, []

    @functools.wraps(real)
    def write_rank_file(*args, **kwargs):
        real(*args, **kwargs)
        if not calls:                   # the start-up's rank file, not the final one
            time.sleep(delay)
        calls.append(1)
    module.write_rank_file = write_rank_file


def _slow_save(module) -> None:
    delay, real = _seconds("FINETUNE_TEST_SAVE_DELAY_S"), module.Checkpointer._write

    @functools.wraps(real)
    def _write(self, *args, **kwargs):
        problem = real(self, *args, **kwargs)
        if problem is None:             # a checkpoint was written (rank 0 only: the others never call _write)
            time.sleep(delay)
        return problem
    module.Checkpointer._write = _write


def _slow_rank(module) -> None:
    delay, at, nth = _seconds("FINETUNE_TEST_SLOW_STEP_S"), os.environ["FINETUNE_TEST_SLOW_AT"], [0]
    real_epoch, real_step = module.train_one_epoch, module.optimizer_step

    @functools.wraps(real_epoch)
    def train_one_epoch(*args, **kwargs):
        nth[0] = 0                      # steps this rank has run in this epoch
        return real_epoch(*args, **kwargs)

    @functools.wraps(real_step)
    def optimizer_step(ctx, *args, **kwargs):
        if at == f"{ctx.accelerator.process_index}:{nth[0]}":
            time.sleep(delay)
        nth[0] += 1
        return real_step(ctx, *args, **kwargs)
    module.train_one_epoch, module.optimizer_step = train_one_epoch, optimizer_step


PATCHES = {}        # module name -> what to wrap in it once it has been executed
if _seconds("FINETUNE_TEST_STARTUP_DELAY_S"):
    PATCHES["finetune.rundir"] = _slow_start_up
if _seconds("FINETUNE_TEST_SAVE_DELAY_S"):
    PATCHES["finetune.checkpoint"] = _slow_save
if os.environ.get("FINETUNE_TEST_SLOW_AT") and _seconds("FINETUNE_TEST_SLOW_STEP_S"):
    PATCHES["finetune.loop"] = _slow_rank


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules of PATCHES as usual, and patches each right after its code has run (before the
    importer -- train.py's `from finetune.loop import train_one_epoch` -- sees its names)."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, PATCHES[name])
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)
        APPLIED.add(module.__name__)

    def __getattr__(self, name):        # get_source, get_filename...: the real loader's
        return getattr(self.loader, name)


def _report_unused() -> None:
    """A training process (one that imported finetune.loop) that never imported a patched module: the fault
    did not happen, and a test relying on it would prove nothing -- say so in its log."""
    if "finetune.loop" in sys.modules:
        for name in sorted(set(PATCHES) - APPLIED):
            print(f"tests/faults: {name} was never imported here; its fault was not injected", file=sys.stderr)


if PATCHES:
    sys.meta_path.insert(0, _PatchAfterImport())
    import atexit
    atexit.register(_report_unused)
