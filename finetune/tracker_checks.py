"""Start-up checks of the experiment trackers' settings (--log-with mlflow / wandb, the tracker environment
variables and RUN_DIR/trackers.json), on every rank right after the processes are set up and before any data
or model work. Each problem is one UsageError naming the tracker, the setting and the fix: a tracker that
fails when it starts comes after the shards are checked and the model is built, as a 40-line traceback.

The logging itself is finetune/trackers.py; this module only reads settings, except one thing it fixes: a
resumed run continues its MLflow run in the store where trackers.json says it lives, when
MLFLOW_TRACKING_URI is not set (MLflow's default store is relative to the current folder, so a resume from
another folder would look for the run in a new, empty store)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from . import UsageError
from .trackers import IDS_FILE

# MLflow's own rule for run ids (mlflow.utils.validation); W&B refuses these characters in ids and projects.
_MLFLOW_RUN_ID = re.compile(r"[a-zA-Z0-9][\w\-]{0,255}")
_WANDB_FORBIDDEN = "/\\#?%:"
_NAMES = {"mlflow": "MLflow", "wandb": "W&B"}


def _fresh(path: Path, key: str) -> str:
    return f"or delete the '{key}' entry of {path} to start a new {_NAMES[key]} run"


def check_trackers(names, run_dir: Path, log: Callable[[str], None] | None = None) -> None:
    """UsageError for the first problem with the trackers in `names` (parse_log_with's) for this run
    directory; `log` (the main process's print) hears what was decided, e.g. the saved MLflow store."""
    path = Path(run_dir) / IDS_FILE
    saved = saved_ids(path) if {"mlflow", "wandb"} & set(names) else {}
    if "mlflow" in names:
        note = check_mlflow(saved.get("mlflow") or {}, path)
        if note and log:
            log(note)
    if "wandb" in names:
        check_wandb(saved.get("wandb") or {}, path)


def saved_ids(path: Path) -> dict:
    """trackers.json, checked: a JSON object whose tracker entries are objects; {} when there is none."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({e}); it keeps the tracker run ids of this run directory: "
                         f"restore it, or delete it to start new tracker runs") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object of tracker name: ids, found {type(data).__name__}; "
                         f"restore it, or delete it to start new tracker runs")
    for name in ("mlflow", "wandb"):
        if name in data and not isinstance(data[name], dict):
            raise UsageError(f"{path}: the '{name}' entry must be an object of ids, found {data[name]!r}; "
                             f"restore it, {_fresh(path, name)}")
    return data


def _text(entry: dict, key: str, path: Path, tracker: str) -> str | None:
    value = entry.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise UsageError(f"{path}: {tracker} {key} must be a non-empty string, found {value!r}; restore it, "
                         + _fresh(path, tracker))
    return value


def check_mlflow(entry: dict, path: Path) -> str | None:
    """The saved run id's form, which store it lives in, and MLflow 3's file-store opt-in. Returns a note
    when the saved store is used."""
    run_id = _text(entry, "run_id", path, "mlflow")
    saved_uri = _text(entry, "tracking_uri", path, "mlflow")
    if run_id is not None and not _MLFLOW_RUN_ID.fullmatch(run_id):
        raise UsageError(f"{path}: mlflow run_id {run_id!r} is not an MLflow run id; restore it, "
                         + _fresh(path, "mlflow"))
    env_uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    note = None
    if run_id and saved_uri:
        gone = _missing_local_store(saved_uri)
        if gone:
            raise UsageError(f"--log-with mlflow: {path} continues MLflow run {run_id} of the store {saved_uri}, "
                             f"but {gone} does not exist: restore it, " + _fresh(path, "mlflow"))
        if env_uri is None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri       # read by mlflow when the tracker starts
            note = f"mlflow: continuing run {run_id} in {saved_uri} (from {path}; MLFLOW_TRACKING_URI is not set)"
        elif env_uri != saved_uri:
            raise UsageError(f"--log-with mlflow: {path} continues MLflow run {run_id} of the store {saved_uri}, "
                             f"but MLFLOW_TRACKING_URI={env_uri}: unset MLFLOW_TRACKING_URI or set it to "
                             f"{saved_uri}, " + _fresh(path, "mlflow"))
    _check_file_store(env_uri, saved_uri if run_id else None)
    return note


def _missing_local_store(uri: str) -> str | None:
    """The path of a local store (sqlite: database file, file: folder) that does not exist; else None."""
    parsed = urlparse(uri)
    local = uri[len("sqlite:///"):] if parsed.scheme == "sqlite" else parsed.path if parsed.scheme in ("", "file") \
        else None
    return local if local and local != ":memory:" and not os.path.exists(local) else None


def _check_file_store(env_uri: str | None, saved_uri: str | None) -> None:
    """MLflow 3 refuses a file store (file:..., a plain path, or its default when ./mlruns holds runs)
    without MLFLOW_ALLOW_FILE_STORE=true. The choice between the opt-in and a database store is the user's."""
    import mlflow
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:         # an MLflow before the opt-in: file stores just work
        return
    uri = mlflow.get_tracking_uri()
    if urlparse(uri).scheme not in ("", "file"):
        return
    try:
        allowed = MLFLOW_ALLOW_FILE_STORE.get()
    except ValueError:
        raise UsageError(f"--log-with mlflow: MLFLOW_ALLOW_FILE_STORE={os.environ['MLFLOW_ALLOW_FILE_STORE']}: "
                         f"must be true or false") from None
    if allowed:
        return
    source = ("MLFLOW_TRACKING_URI" if env_uri else "trackers.json's tracking_uri" if saved_uri
              else "MLflow's default store (./mlruns holds runs)")
    raise UsageError(f"--log-with mlflow: {source} {uri} is a file store, which MLflow {mlflow.__version__} "
                     f"refuses unless MLFLOW_ALLOW_FILE_STORE=true: export MLFLOW_ALLOW_FILE_STORE=true, or use a "
                     f"database store (MLFLOW_TRACKING_URI=sqlite:////ABS/PATH/mlflow.db)")


def check_wandb(entry: dict, path: Path) -> None:
    """W&B ids and project names cannot hold / \\ # ? % : (wandb.init fails on them, after the set-up)."""
    fresh = "fix it, " + _fresh(path, "wandb")
    checks = [(f"{path}: wandb id", _text(entry, "id", path, "wandb"), fresh),
              (f"{path}: wandb project", _text(entry, "project", path, "wandb"), fresh),
              ("WANDB_PROJECT", os.environ.get("WANDB_PROJECT"), "choose another WANDB_PROJECT")]
    for what, value, fix in checks:
        bad = [c for c in _WANDB_FORBIDDEN if value and c in value]
        if bad:
            raise UsageError(f"--log-with wandb: {what} {value!r} contains {bad[0]!r}, which W&B refuses in ids and "
                             f"project names (any of {' '.join(_WANDB_FORBIDDEN)}); {fix}")
