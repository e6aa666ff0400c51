"""Trackers across a preemption: TensorBoard curves without repeated steps after a resume from an older
checkpoint (purge_step; the event files are read back), and MLflow (local file store) / W&B (offline)
runs that a resumed job continues under the same run id (RUN_DIR/trackers.json)."""

from __future__ import annotations

import json
import signal
import struct

import pytest

from conftest import TINY, read_json, run_train, start_train, wait_for
from helpers import ckpts, tb_events
from finetune import EXIT_PREEMPTED, UsageError

pytestmark = pytest.mark.slow    # every test here starts a process (train.py, accelerate...)

ARGS = ["--max-steps-per-epoch", "4", "--save-every", "1", "--keep-last", "20", "--eval-limit", "4",
        "--pretrained", "none", *TINY]


def preempt_after(args, run_dir, log, checkpoints=2, env=None) -> int:
    """Start train.py, SIGUSR1 once `checkpoints` exist; return the step it stopped at (exit 75)."""
    import torch
    proc = start_train(args, log=log, env=env)
    wait_for(lambda: len(ckpts(run_dir)) >= checkpoints, 240, f"{checkpoints} checkpoints", [proc])
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=180) == EXIT_PREEMPTED, log.read_text()[-3000:]
    return torch.load(run_dir / "checkpoints" / ckpts(run_dir)[-1], weights_only=True)["step"]


def tb_steps(tb_dir, tag):
    """The steps of `tag` as TensorBoard shows them (EventAccumulator honours purge_step)."""
    return [e.step for e in tb_events(tb_dir, scalars=0).Scalars(tag)]


def raw_steps(tb_dir, tag):
    """Every step written for `tag` in every event file, purged or not."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    steps = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_tensorboard_has_no_repeated_steps_after_resuming_an_older_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--data", shards, "--output-dir", run_dir, "--epochs", "3", *ARGS]
    stopped_at = preempt_after(args, run_dir, tmp_path / "first.log")
    assert 2 <= stopped_at < 12, stopped_at
    # Back to step 1: steps 2..stopped_at were logged by the first run and are trained (and logged) again.
    resumed = run_train(args + ["--resume", str(run_dir / "checkpoints" / "ckpt-00000001.pt")])
    assert "resumed from step 1 " in resumed.stdout
    tb = run_dir / "tb"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2
    # What an uninterrupted run logs: train/loss every step, and the epoch's mean again at its last step.
    expected = sorted([*range(1, 13), 4, 8, 12])
    # The event files do hold the repeated steps 2..stopped_at ...
    raw = raw_steps(tb, "train/loss")
    assert len(raw) >= len(expected) + stopped_at - 1, raw
    # ... and TensorBoard shows each step as often as an uninterrupted run would, in order.
    assert tb_steps(tb, "train/loss") == expected
    assert tb_steps(tb, "test/acc") == [4, 8, 12]
    assert [e["epoch"] for e in read_json(run_dir / "metrics.json")["epochs"]] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------------
# MLflow (local file store) and W&B (offline): one run across the preemption
# ------------------------------------------------------------------------------------------------------
def wandb_records(path):
    """The records of a W&B offline .wandb file (a LevelDB-style log: 7-byte file header, 32 KiB blocks of
    [crc32, length, type] chunks), parsed with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_history(path, tag):
    """(run id, steps at which `tag` was logged) of one offline run file."""
    run_id, steps = None, []
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            if tag in items:
                steps.append(int(items["_step"]))
    return run_id, steps


@pytest.mark.floor
def test_mlflow_and_wandb_continue_the_same_run_after_a_resume(shards, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    env = {"MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "MLFLOW_EXPERIMENT_NAME": "trackers-test", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run_dir = tmp_path / "run"
    args = ["--data", shards, "--output-dir", run_dir, "--epochs", "2", *ARGS,
            "--log-with", "tensorboard,mlflow,wandb"]
    stopped_at = preempt_after(args, run_dir, tmp_path / "first.log", env=env)
    assert stopped_at < 8
    first = json.loads((run_dir / "trackers.json").read_text())
    run_train(args + ["--resume", "auto"], env=env)
    second = json.loads((run_dir / "trackers.json").read_text())
    assert second["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    assert second["wandb"]["id"] == first["wandb"]["id"]

    import mlflow
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("trackers-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first["mlflow"]["run_id"]]       # one run, not two
    steps = sorted(m.step for m in client.get_metric_history(first["mlflow"]["run_id"], "train/loss"))
    # Both halves, each step once (plus each epoch's mean at its last step), in the one run.
    assert steps == sorted([*range(1, 9), 4, 8]), steps
    assert [m.step for m in client.get_metric_history(first["mlflow"]["run_id"], "resume/from_step")] == \
        [stopped_at]

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files                                   # one offline file per process ...
    halves = [wandb_history(f, "train/loss") for f in files]
    assert {run_id for run_id, _ in halves} == {first["wandb"]["id"]}   # ... of the one run id
    # W&B merges the values of one step into one history row.
    assert sorted(set(halves[0][1])) == list(range(1, stopped_at + 1))
    # (A stop at an epoch's last step saves before the evaluation: the second half logs that epoch's end.)
    assert set(range(stopped_at + 1, 9)) <= set(halves[1][1]) <= set(range(stopped_at, 9)), halves


def test_bad_tracker_is_one_line_before_anything_is_written(shards, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    proc = run_train(["--data", shards, "--output-dir", run_dir, *TINY, "--log-with", "tensorboard,comet"],
                     check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "train.py: error: --log-with: unknown tracker 'comet' (choose from tensorboard, mlflow, wandb)"]
    assert not run_dir.exists()
    # A tracker whose package is missing: the same, naming the package.
    import importlib.util
    from finetune.config import parse_config
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UsageError, match=r"--log-with wandb needs the optional package 'wandb' "
                                         r"\(the 'trackers' extra\): pip install -e '\.\[trackers\]'"):
        parse_config(["--data", str(shards), "--log-with", "wandb"])
