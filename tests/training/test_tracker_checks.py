"""Tracker settings are checked at start-up, before any data or model work, one line each (issue 20 item 11,
issue 22 item 5): a crafted trackers.json, a saved MLflow run looked for in another store, MLflow 3's file
store without its opt-in, a W&B id or project W&B refuses. And a resume from another folder continues the
MLflow run in the store trackers.json names (MLflow's default store is relative to the current folder)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from conftest import PYTHON, REPO, TINY
from finetune import UsageError
from finetune.tracker_checks import check_trackers

pytest.importorskip("mlflow")

RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)           # MLflow's default store is relative to the current folder
    return monkeypatch


def error(run_dir, names, ids=None) -> str:
    run_dir.mkdir(exist_ok=True)
    if ids is not None:
        (run_dir / "trackers.json").write_text(ids if isinstance(ids, str) else json.dumps(ids))
    with pytest.raises(UsageError) as exc:
        check_trackers(names, run_dir)
    return str(exc.value)


@pytest.mark.parametrize("ids, expected", [
    ("[]", "trackers.json: expected a JSON object of tracker name: ids, found list"),
    ('{"mlflow": "abc"}', "trackers.json: the 'mlflow' entry must be an object of ids, found 'abc'"),
    ('{"mlflow": {"run_id": 5}}', "trackers.json: mlflow run_id must be a non-empty string, found 5"),
    ('{"mlflow": {"run_id": "../x"}}', "trackers.json: mlflow run_id '../x' is not an MLflow run id"),
    ('{"mlflow": ', "trackers.json: unreadable (Expecting value"),
])
def test_a_crafted_trackers_json_is_one_line(clean_env, tmp_path, ids, expected):
    message = error(tmp_path / "run", ("tensorboard", "mlflow"), ids)
    assert expected in message and "\n" not in message
    assert "delete" in message          # says how to start afresh


def test_a_wandb_id_or_project_wandb_refuses(clean_env, tmp_path):
    message = error(tmp_path / "run", ("wandb",), {"wandb": {"id": "a/b", "project": "p"}})
    assert "wandb id 'a/b' contains '/', which W&B refuses" in message and "'wandb' entry" in message
    clean_env.setenv("WANDB_PROJECT", "team/project")
    (tmp_path / "run" / "trackers.json").unlink()
    assert "WANDB_PROJECT 'team/project' contains '/'" in error(tmp_path / "run", ("wandb",))


def test_mlflow_file_store_needs_the_opt_in(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    message = error(tmp_path / "run", ("mlflow",))
    assert f"MLFLOW_TRACKING_URI file:{tmp_path / 'mlruns'} is a file store" in message
    assert "export MLFLOW_ALLOW_FILE_STORE=true, or use a database store" in message
    clean_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_trackers(("mlflow",), tmp_path / "run")          # opted in: fine


def test_a_saved_mlflow_run_is_continued_in_its_own_store(clean_env, tmp_path):
    store = tmp_path / "elsewhere" / "mlflow.db"
    store.parent.mkdir()
    store.touch()
    saved = {"mlflow": {"run_id": RUN_ID, "tracking_uri": f"sqlite:///{store}"}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trackers.json").write_text(json.dumps(saved))
    notes = []
    check_trackers(("mlflow",), run_dir, notes.append)        # no MLFLOW_TRACKING_URI: the saved store
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{store}" and RUN_ID in notes[0]
    clean_env.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")     # another store: refused, naming both
    message = error(run_dir, ("mlflow",))
    assert f"of the store sqlite:///{store}, but MLFLOW_TRACKING_URI=sqlite:///other.db" in message
    clean_env.delenv("MLFLOW_TRACKING_URI")
    store.unlink()
    assert f"but {store} does not exist" in error(run_dir, ("mlflow",))


@pytest.mark.slow
def test_the_check_comes_before_any_data_or_model_work(tmp_path):
    """train.py with a crafted trackers.json and --data that does not exist: the tracker's line, not the
    data's, fast, and nothing written."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trackers.json").write_text('{"mlflow": "abc"}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    start = time.monotonic()
    proc = subprocess.run([PYTHON, "train.py", "--data", str(tmp_path / "no-such-shards"), "--output-dir",
                           str(run_dir), "--log-with", "tensorboard,mlflow", *TINY], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"train.py: error: {run_dir / 'trackers.json'}: the 'mlflow' entry must be an object of ids, found 'abc'; "
        f"restore it, or delete the 'mlflow' entry of {run_dir / 'trackers.json'} to start a new MLflow run"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["trackers.json"]
    assert took < 60, took


@pytest.mark.slow
def test_a_resume_from_another_folder_continues_the_mlflow_run(shards, tmp_path):
    """MLflow's default store (sqlite:///mlflow.db in the current folder): the first half runs in folder a,
    the resume in folder b; the run continues in a's store, and b gets no store of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="2", MLFLOW_EXPERIMENT_NAME="resume-elsewhere")
    run_dir = tmp_path / "run"
    args = [PYTHON, str(REPO / "train.py"), "--data", str(shards), "--output-dir", str(run_dir), "--pretrained",
            "none", "--max-steps-per-epoch", "1", "--eval-limit", "4", "--log-with", "mlflow", *TINY]
    for folder, epochs in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        proc = subprocess.run(args + ["--epochs", str(epochs), "--resume", "auto"], cwd=tmp_path / folder,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert saved["tracking_uri"] == f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    assert f"mlflow: continuing run {saved['run_id']} in {saved['tracking_uri']}" in proc.stdout
    assert not (tmp_path / "b" / "mlflow.db").exists()
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=saved["tracking_uri"])
    experiment = client.get_experiment_by_name("resume-elsewhere")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [saved["run_id"]]
    assert sorted(m.step for m in client.get_metric_history(saved["run_id"], "resume/from_step")) == [1]
