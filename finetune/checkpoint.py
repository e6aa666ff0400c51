"""Checkpoints: where training stands (`TrainState`), the `Checkpointer` that owns saving and resuming
(atomic save, keep the last k plus the best, resume from the newest complete one). The preemption flag
that signal handlers raise is in finetune/preempt.py."""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.fsutil import atomic_link, atomic_open

from . import UsageError, distributed
from .context import StepContext

CKPT = re.compile(r"^ckpt-(\d{8})\.pt$")


# ------------------------------------------------------------------------------------------------------
# Where training stands
# ------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything about the progress of a run that a checkpoint must carry (the Checkpointer adds the
    model, optimizer, scaler and RNG states). The loop advances it step by step; `end_epoch` closes an epoch."""
    sums: torch.Tensor              # this rank's [loss sum, correct, samples] of the current epoch so far
    epoch: int = 0                  # the epoch being trained (0-based; == cfg.epochs when done)
    step_in_epoch: int = 0          # optimizer steps of `epoch` already done
    global_step: int = 0            # optimizer steps done in the whole run
    history: list = field(default_factory=list)   # one record per finished epoch (metrics.json "epochs")
    best_acc: float = -1.0          # the best val accuracy so far (best.pt; none without a val split)
    skipped_steps: int = 0          # fp16 steps GradScaler skipped (overflow): global_step - these = updates
    best_epoch: int = 0             # the epoch (1-based) of best_acc; 0: none yet
    epochs_since_best: int = 0      # finished epochs since val accuracy last improved (--patience)
    stopped_early: bool = False     # --patience ran out: the run is over even though epoch < cfg.epochs

    @classmethod
    def fresh(cls, device: torch.device) -> TrainState:
        return cls(torch.zeros(3, dtype=torch.float64, device=device))

    def to_checkpoint(self) -> dict:
        """The checkpoint's fields of this state (train_sums, one list per rank, is added by the Checkpointer)."""
        return dict(epoch=self.epoch, step_in_epoch=self.step_in_epoch, step=self.global_step,
                    metrics=self.history, best_acc=self.best_acc, skipped_steps=self.skipped_steps,
                    best_epoch=self.best_epoch, epochs_since_best=self.epochs_since_best,
                    stopped_early=self.stopped_early)

    @classmethod
    def from_checkpoint(cls, saved: dict, rank: int, world: int, device: torch.device) -> TrainState:
        state = cls.fresh(device)
        state.epoch, state.step_in_epoch, state.global_step = saved["epoch"], saved["step_in_epoch"], saved["step"]
        state.history, state.best_acc = saved["metrics"], saved["best_acc"]
        state.skipped_steps = saved.get("skipped_steps", 0)
        state.best_epoch, state.epochs_since_best = saved.get("best_epoch", 0), saved.get("epochs_since_best", 0)
        state.stopped_early = saved.get("stopped_early", False)
        # Mid-epoch, this rank's sums go on from where they were (only if the ranks are the same ones).
        if state.step_in_epoch and len(saved["train_sums"]) == world:
            state.sums += torch.tensor(saved["train_sums"][rank], dtype=torch.float64, device=device)
        return state

    def end_epoch(self, record: dict) -> bool:
        """Record a finished epoch and move to the next one. Returns True if its VAL accuracy is the best so far
        (the test set never chooses: without a val split nothing is best)."""
        self.history.append(record)
        val = record.get("val_acc")
        is_best = val is not None and val > self.best_acc
        if is_best:
            self.best_acc, self.best_epoch, self.epochs_since_best = val, record["epoch"], 0
        elif val is not None:
            self.epochs_since_best += 1
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.sums.zero_()
        return is_best


# ------------------------------------------------------------------------------------------------------
# The Checkpointer: the loop calls save(state); train.py calls restore() once
# ------------------------------------------------------------------------------------------------------
class Checkpointer:
    """Owns what a checkpoint holds (the plain model, the optimizer, the scaler and the EMA of `ctx`, every
    rank's RNG and sums, the config), where it goes (`directory`), how many are kept (--keep-last) and
    best.pt. save() and restore() are collective: every rank calls them; only the main process writes."""

    def __init__(self, ctx: StepContext, directory: Path, identity: dict | None = None):
        self.accelerator, self.optimizer, self.ema = ctx.accelerator, ctx.optimizer, ctx.ema  # ema: --ema-decay's
        self.model = ctx.accelerator.unwrap_model(ctx.model, keep_torch_compile=False)   # plain keys in state dicts
        self.directory, self.keep_last, self.config = Path(directory), ctx.cfg.keep_last, ctx.cfg.to_dict()
        self.identity = identity or {}   # run_identity(): classes and data set, checked on resume
        self.log = print                 # restore() sets the run's logger (the pruning line)

    def save(self, state: TrainState, is_best: bool = False) -> None:
        acc, world = self.accelerator, self.accelerator.num_processes
        with distributed.patient():        # the others wait while rank 0 writes and fsyncs
            rngs = distributed.gather(rng_state(), world)
            train_sums = distributed.gather(state.sums.tolist(), world)
            problem = self._write(state, is_best, rngs, train_sums) if acc.is_main_process else None
            distributed.agree(acc, problem)     # a failed write (disk full) stops every rank with its line

    def _write(self, state: TrainState, is_best: bool, rngs: list, train_sums: list) -> str | None:
        """Rank 0: write the checkpoint; on an OSError (disk full, quota) the partial file is gone, the older
        checkpoints are untouched (pruning only follows a complete write), and the one-line reason returned."""
        acc = self.accelerator
        try:
            save(dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                      scaler=acc.scaler.state_dict() if acc.scaler is not None else None,
                      ema=self.ema.state_dict() if self.ema is not None else None,
                      rng=rngs, train_sums=train_sums, **state.to_checkpoint(), config=self.config,
                      identity=self.identity, world_size=acc.num_processes),
                 self.directory, self.keep_last, is_best, log=self.log)
        except OSError as e:
            return (f"cannot write the checkpoint of step {state.global_step} to {self.directory}: "
                    f"{e.strerror or e}; the partial file was removed and the older checkpoints are intact "
                    f"-- free space, then restart with --resume auto")
        return None

    def restore(self, resume: str, log=print) -> TrainState:
        """--resume '' (start afresh, refused if the directory already holds checkpoints), auto or PATH.
        Rank 0 decides which checkpoint (and whether it fits this run); every rank loads that same file, or
        the job stops with one line if a rank cannot read it. Returns where training stands."""
        acc, rank = self.accelerator, self.accelerator.process_index
        self.log = log
        problem, path, saved = None, None, None
        if acc.is_main_process:
            try:
                path, saved = self._decide(resume, log)
            except UsageError as e:
                problem = str(e)
        problem, path = distributed.gather((problem, path and str(path)), acc.num_processes)[0]
        if problem:
            raise UsageError(problem)
        if path is None:
            return TrainState.fresh(acc.device)
        if saved is None:
            try:
                saved = load(Path(path), REQUIRED)
            except Exception as e:  # noqa: BLE001
                problem = (f"rank {rank} cannot read {path}, the checkpoint rank 0 resumes from ({type(e).__name__}); "
                           f"the run directory must be on a filesystem every rank sees")
        distributed.agree(acc, problem)
        if resume != "auto" and acc.is_main_process:
            abandon_newer(self.directory, saved["step"], log=log)
        return self._load_into(saved, log)

    def _decide(self, resume: str, log) -> tuple[Path | None, dict | None]:
        """Rank 0: the checkpoint to resume from (None: start afresh), checked against this run."""
        if not resume and any(self.directory.glob("ckpt-*.pt")):
            raise UsageError(f"{self.directory.parent} already holds checkpoints of an earlier run: pass --resume "
                             f"auto to continue it, or choose another --output-dir / --name")
        path, saved = decide_resume(resume, self.directory, log=log, required=REQUIRED)
        if saved is not None:
            check_compatible(saved, self.config, self.identity, log)
        return path, saved

    def _load_into(self, saved: dict, log) -> TrainState:
        acc, world, rank = self.accelerator, self.accelerator.num_processes, self.accelerator.process_index
        recipe = [group.get("initial_lr") for group in self.optimizer.param_groups]   # this run's --lr, per group
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"the checkpoint does not fit this model ({str(e).splitlines()[0][:160]})") from None
        # load_state_dict brings back the checkpoint's initial_lr, which set_lr scales at every step: a resume
        # with another --lr (or --head-lr-mult) would go on at the old one. This run's lr applies from here on,
        # as check_compatible's warning says; the schedule's position (the step) comes from the checkpoint.
        for group, lr in zip(self.optimizer.param_groups, recipe):
            if lr is not None:              # (model.param_groups sets it; a bare optimizer has none)
                group["initial_lr"] = lr
        if acc.scaler is not None and saved.get("scaler"):
            acc.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None and saved.get("ema") is not None:
            self.ema.load_state_dict(saved["ema"])
        elif self.ema is not None:
            log("note: the checkpoint holds no EMA weights (--ema-decay was off): the EMA starts from here")
        set_rng_state(saved["rng"][rank % len(saved["rng"])])     # fewer ranks than saved: fine
        state = TrainState.from_checkpoint(saved, rank, world, acc.device)
        log(f"resumed from step {state.global_step} (epoch {state.epoch + 1}, step {state.step_in_epoch})")
        if saved["world_size"] != world:
            log(f"note: the checkpoint was written by {saved['world_size']} processes, this run has "
                f"{world}: training goes on, but the data order differs from an uninterrupted run")
        return state


# ------------------------------------------------------------------------------------------------------
# Does a checkpoint fit this run?
# ------------------------------------------------------------------------------------------------------
REQUIRED = ("model", "optimizer", "rng", "train_sums", "epoch", "step_in_epoch", "step", "metrics", "best_acc",
            "world_size", "config")


def run_identity(classes: list, shards: list) -> dict:
    """What a checkpoint must share with the run that resumes it: the class names (in order) and the data
    set (a digest of the manifest's shard names and sha256s)."""
    import hashlib
    import json
    digest = hashlib.sha256(json.dumps([[s["name"], s["sha256"]] for s in shards]).encode()).hexdigest()
    return dict(classes=list(classes), data_sha256=digest)


def check_compatible(saved: dict, config: dict, identity: dict, log=print) -> None:
    """Refuse (UsageError, one line) what cannot continue; one warning line per recipe change."""
    old, old_id = saved["config"], saved.get("identity") or {}
    if "classes" in old_id and old_id["classes"] != identity.get("classes"):
        raise UsageError(f"cannot resume: the checkpoint was trained on classes {old_id['classes']}, this data "
                         f"set has {identity.get('classes')}")
    if "data_sha256" in old_id and old_id["data_sha256"] != identity.get("data_sha256"):
        raise UsageError(f"cannot resume: the checkpoint was trained on another data set ({old.get('data')}, "
                         f"other shards than {config.get('data')}); resume with the same --data")
    if old.get("arch") != config.get("arch"):
        raise UsageError(f"cannot resume: the checkpoint is --arch {old.get('arch')}, this run --arch "
                         f"{config.get('arch')}")
    if saved["step_in_epoch"] and old.get("batch_size") != config.get("batch_size"):
        raise UsageError(f"cannot resume mid-epoch with another --batch-size ({old.get('batch_size')} -> "
                         f"{config.get('batch_size')}): the epoch's remaining batches would differ; resume with "
                         f"--batch-size {old.get('batch_size')}")
    for key in ("lr", "batch_size", "epochs"):
        if old.get(key) != config.get(key):
            log(f"warning: resuming with --{key.replace('_', '-')} {config.get(key)} (the checkpoint used "
                f"{old.get(key)}): the recipe changes from here on")


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
    with atomic_open(path) as fh:   # disk full, quota, Ctrl-C: no partial file left behind
        torch.save(obj, fh)


def save(state: dict, ckpt_dir: Path, keep_last: int, is_best: bool, log=print) -> Path:
    """Called on the main process only. state['step'] names the file."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{state['step']:08d}.pt"
    atomic_save(state, path)
    if is_best:
        atomic_link(path, ckpt_dir / "best.pt")   # a hard link: best.pt survives the pruning of its ckpt-*.pt name
    prune(ckpt_dir, path, keep_last, log)
    return path


def _step(path: Path) -> int:
    return int(CKPT.match(path.name).group(1))


def prune(ckpt_dir: Path, just_written: Path, keep_last: int, log=print) -> list[Path]:
    """Keep `just_written` and the keep_last - 1 newest checkpoints before it; delete older ones of this
    lineage only: a checkpoint with a later step than the one just written is never touched (after a
    --resume PATH to an older one, abandon_newer() has already moved those aside)."""
    mine = _step(just_written)
    older = sorted((p for p in ckpt_dir.iterdir() if CKPT.match(p.name) and _step(p) < mine), key=_step)
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    for old in doomed:
        old.unlink()
    if doomed:
        log(f"pruned {len(doomed)} checkpoint(s) (--keep-last {keep_last}): {', '.join(p.name for p in doomed)}")
    return doomed


def abandon_newer(ckpt_dir: Path, step: int, log=print) -> Path | None:
    """Resuming from an older checkpoint than the directory's newest starts a new lineage (like `git reset`):
    the newer checkpoints are not deleted but moved into checkpoints/abandoned/from-STEP-TIME/, so that
    pruning cannot delete what is written next and --resume auto cannot pick the abandoned branch."""
    newer = sorted(p for p in ckpt_dir.glob("ckpt-*.pt") if CKPT.match(p.name) and _step(p) > step)
    if not newer:
        return None
    import time
    dest = ckpt_dir / "abandoned" / f"from-{step:08d}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    dest.mkdir(parents=True)
    for p in newer:
        os.replace(p, dest / p.name)
    log(f"resuming from step {step}: moved {len(newer)} newer checkpoint(s) of the abandoned branch to {dest}")
    return dest


# ------------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------------
def load(path: Path, required: tuple = ()) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError("not a train.py checkpoint")
    missing = [k for k in required if k not in state]
    if missing:
        raise KeyError(f"damaged: missing {', '.join(missing)}")
    return state


def decide_resume(resume: str, ckpt_dir: Path, log=print, required: tuple = ()) -> tuple[Path | None, dict | None]:
    """--resume auto: newest complete checkpoint (damaged ones are skipped with a message); PATH: that one.
    Returns (path, its contents), or (None, None) to start afresh."""
    if not resume:
        return None, None
    if resume != "auto":
        try:
            return Path(resume), load(Path(resume), required)
        except FileNotFoundError:
            raise UsageError(f"--resume {resume}: no such file") from None
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--resume {resume}: cannot load it ({type(e).__name__}: {_first(e)})") from None
    candidates = sorted((p for p in ckpt_dir.glob("ckpt-*.pt") if CKPT.match(p.name)), reverse=True)
    for path in candidates:
        try:
            return path, load(path, required)
        except Exception as e:  # noqa: BLE001 -- a truncated/corrupt file: fall back to an older one
            log(f"skipping damaged checkpoint {path} ({type(e).__name__}: {_first(e)})")
    return None, None


def _first(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return (text.splitlines() or [""])[0][:100]
