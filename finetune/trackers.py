"""Experiment trackers besides TensorBoard (`--log-with tensorboard,mlflow,wandb`), through Accelerate's
tracker classes (accelerate.tracking.MLflowTracker / WandBTracker), on the main process only.

A requeued or resumed job must continue the *same* tracker run, not open a second one: the run ids are
kept in RUN_DIR/trackers.json (written when a run first starts its trackers) and handed back to the
tracker on every later start of that run directory (MLflow: `run_id`; W&B: `id` with `resume="allow"`).

TensorBoard stays our own SummaryWriter (finetune/monitor.py): it needs `purge_step` after a resume."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from data_prep.extras import check

from . import UsageError, atomic_write_text

KNOWN = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}
IDS_FILE = "trackers.json"
DEFAULT_EXPERIMENT = "hotdog-finetune"


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
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
