"""Experiment trackers besides TensorBoard (`--log-with tensorboard,mlflow,wandb`), through Accelerate's
tracker classes (accelerate.tracking.MLflowTracker / WandBTracker), on the main process only.

A requeued or resumed job must continue the *same* tracker run, not open a second one: the run ids are
kept in RUN_DIR/trackers.json (written when a run first starts its trackers) and handed back to the
tracker on every later start of that run directory (MLflow: `run_id`; W&B: `id` with `resume="allow"`).

TensorBoard stays our own SummaryWriter (finetune/monitor.py): it needs `purge_step` after a resume.

Values reach MLflow / W&B from a background thread (BackgroundLog): a slow or unreachable tracking server
must not stall rank 0's training loop -- every other rank would wait for it at the next collective, and
past --collective-timeout that reads as a dead peer."""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import uuid
from pathlib import Path

from common.extras import check

from . import UsageError, atomic_write_text

KNOWN = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}
IDS_FILE = "trackers.json"
DEFAULT_EXPERIMENT = "hotdog-finetune"
QUEUE_LIMIT = 10_000        # log calls waiting for a slow tracker before the oldest are dropped
CLOSE_TIMEOUT_S = 20        # at close, how long the queue may take to drain (within Slurm's 30 s KillWait)


def parse_log_with(text: str) -> tuple[str, ...]:
    """'tensorboard,mlflow' -> ('tensorboard', 'mlflow'). Unknown names and trackers whose package is not
    installed are a UsageError (one line, exit 2) -- raised while parsing flags, before anything is written."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if not names:
        raise UsageError(f"--log-with '{text}': name at least one of {', '.join(KNOWN)}")
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise UsageError(f"--log-with: unknown tracker '{unknown[0]}' (choose from {', '.join(KNOWN)})")
    for name in names:
        package = PACKAGES.get(name)
        if package:
            check(package, f"--log-with {name}")      # one line naming the extra that installs it
    return names


def read_ids(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}


class Trackers:
    """The non-TensorBoard trackers of one run (main process only; an empty object elsewhere)."""

    def __init__(self, names: tuple[str, ...], run_dir: Path, is_main: bool):
        self.names = [n for n in names if n != "tensorboard"] if is_main else []
        self.run_dir = Path(run_dir)
        self.trackers: list = []
        self.ids: dict = {}
        self._queue: BackgroundLog | None = None

    def start(self, config: dict, resumed_step: int) -> None:
        """Start (or continue, with the ids in trackers.json) each tracker's run. The config is logged as
        parameters only when the run is new (MLflow refuses to change a logged parameter)."""
        if not self.names:
            return
        saved = read_ids(self.run_dir)
        self.ids = dict(saved)
        for name in self.names:
            tracker, new = getattr(self, f"_start_{name}")(saved.get(name) or {})
            self.trackers.append(tracker)
            # Saved as soon as it is known: a job killed right after this still continues the same run.
            atomic_write_text(self.run_dir / IDS_FILE, json.dumps(self.ids, indent=2))
            if new:
                tracker.store_init_configuration(
                    {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                     for k, v in config.items()})
        if resumed_step:
            self.log({"resume/from_step": resumed_step}, resumed_step)

    def _start_mlflow(self, saved: dict):
        from accelerate.tracking import MLflowTracker
        import mlflow
        tracker = MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT),
                                run_id=saved.get("run_id"), run_name=self.run_dir.name)
        tracker.start()
        info = tracker.active_run.info
        self.ids["mlflow"] = dict(run_id=info.run_id, experiment_id=info.experiment_id,
                                  tracking_uri=mlflow.get_tracking_uri())
        return tracker, not saved.get("run_id")

    def _start_wandb(self, saved: dict):
        from accelerate.tracking import WandBTracker
        run_id = saved.get("id") or uuid.uuid4().hex[:8]
        project = os.environ.get("WANDB_PROJECT", DEFAULT_EXPERIMENT)
        self.ids["wandb"] = dict(id=run_id, project=project)
        tracker = WandBTracker(project, id=run_id, resume="allow", name=self.run_dir.name,
                               dir=str(self.run_dir))
        tracker.start()
        self.ids["wandb"].update(mode=getattr(tracker.run.settings, "mode", None) or os.environ.get("WANDB_MODE"))
        return tracker, not saved.get("id")

    def log(self, values: dict, step: int) -> None:
        """Queue `values` for every tracker; returns at once (BackgroundLog)."""
        if not self.trackers:
            return
        if self._queue is None:
            self._queue = BackgroundLog(self._write)
        self._queue.put(dict(values), step)

    def _write(self, values: dict, step: int) -> None:
        """On the logging thread: each tracker in turn; one failing does not keep values from the others."""
        for name, tracker in zip(self.names, self.trackers):
            try:
                # MLflow's active run is thread-local: name it, or this thread would open a second run.
                extra = {"run_id": self.ids["mlflow"]["run_id"]} if name == "mlflow" else {}
                tracker.log(values, step=step, **extra)
            except Exception as exc:        # a tracker server's failure must not end the training run
                self._queue.failed(name, exc)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued value is logged (at most `timeout` s); False if some are still waiting."""
        return self._queue.flush(timeout) if self._queue else True

    def finish(self) -> None:
        if self._queue is not None:
            self._queue.close(CLOSE_TIMEOUT_S)
            self._queue = None
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


class BackgroundLog:
    """Calls write(values, step) on a daemon thread, in order. The queue holds at most QUEUE_LIMIT calls;
    when a tracker falls that far behind, the OLDEST waiting call is dropped (drop-oldest, not block: the
    training loop never waits for a tracker; the newest values are the ones worth having). Drops and write
    errors are reported once each on stderr, and counted in the line close() prints."""

    def __init__(self, write):
        self._write = write
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._busy = self._closing = False
        self.dropped, self.errors = 0, 0
        self._thread = threading.Thread(target=self._run, name="tracker-log", daemon=True)
        self._thread.start()

    def put(self, values: dict, step) -> None:
        with self._cond:
            if len(self._items) >= QUEUE_LIMIT:
                self._items.popleft()
                self.dropped += 1
                if self.dropped == 1:
                    _warn(f"the trackers are more than {QUEUE_LIMIT} log calls behind (a slow tracking "
                          f"server?); dropping the oldest values from now on")
            self._items.append((values, step))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._closing)
                if not self._items:
                    return
                values, step = self._items.popleft()
                self._busy = True
            try:
                self._write(values, step)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def failed(self, name: str, exc: Exception) -> None:
        self.errors += 1
        if self.errors == 1:
            _warn(f"logging to {name} failed ({type(exc).__name__}: {str(exc)[:200]}); training goes on, "
                  f"further failures are only counted")

    def flush(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)

    def close(self, timeout: float) -> None:
        """Drain the queue (at most `timeout` s), stop the thread, and say what did not reach the trackers."""
        drained = self.flush(timeout)
        with self._cond:
            left = len(self._items)
            self._items.clear()
            self._closing = True
            self._cond.notify_all()
        if not drained:
            _warn(f"the trackers did not take the last {left} log call(s) within {timeout} s; they are lost")
        if self.dropped or self.errors:
            _warn(f"tracker logging: {self.dropped} call(s) dropped (queue full), {self.errors} failed")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
