"""Checkpoints and faults: preempt-and-resume gives the same weights as an uninterrupted run, damaged
checkpoints are skipped, a kill during a write leaves the previous one loadable, and a dead or hung rank
ends a two-node job with a clear message instead of a 30-minute hang."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch

import faults
from conftest import (PYTHON, REPO, TINY, load_model_pt, read_json, run_train, start_train,
                      wait_for)
from helpers import ckpts, two_nodes
from finetune import EXIT_PREEMPTED, checkpoint

# 2 epochs x 4 steps, a checkpoint after every step; random data order through a shuffle buffer, read by 2
# loader workers (a resume at an odd step must still get the batches in their order).
# --ema-decay: the EMA of the weights must resume bitwise too.
ARGS = ["--epochs", "2", "--max-steps-per-epoch", "4", "--save-every", "1", "--keep-last", "3",
        "--eval-limit", "4", *TINY, "--workers", "2", "--ema-decay", "0.9"]


@pytest.fixture(scope="module")
def reference(shards, imagenet_like, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run_train(["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *ARGS])
    return run_dir


def assert_same_weights(a, b):
    for key in ("state_dict", "ema_state_dict"):        # the raw weights and their EMA
        sa, sb = load_model_pt(a)[key], load_model_pt(b)[key]
        assert sa.keys() == sb.keys()
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, (key, different[:5])


@pytest.mark.slow
@pytest.mark.floor
def test_keeps_the_last_k_and_no_best_without_a_val_split(reference):
    assert ckpts(reference) == ["ckpt-00000006.pt", "ckpt-00000007.pt", "ckpt-00000008.pt"]   # --keep-last 3
    assert not (reference / "checkpoints" / "best.pt").exists()      # the test set never chooses
    metrics = read_json(reference / "metrics.json")
    assert metrics["chosen"]["checkpoint"] == "last" and "no val split" in metrics["chosen"]["why"]
    assert metrics["final"] == metrics["epochs"][-1] and load_model_pt(reference)["chosen"] == metrics["chosen"]
    ema = torch.load(reference / "checkpoints" / "ckpt-00000008.pt", weights_only=True)["ema"]
    assert int(ema["n_averaged"]) == 8                                  # updated once per optimizer step
    assert {"ema_test_acc", "test_balanced_acc", "test_confusion"} <= set(metrics["final"])


def test_best_is_chosen_on_val_even_when_test_disagrees(tmp_path):
    """Test peaks at epoch 1, val at epoch 3: best.pt follows val; test accuracy never moves the choice."""
    state = checkpoint.TrainState.fresh(torch.device("cpu"))
    flags = [state.end_epoch(dict(epoch=e, test_acc=t, val_acc=v))
             for e, (t, v) in enumerate([(0.9, 0.5), (0.8, 0.6), (0.5, 0.7), (0.95, 0.65)], start=1)]
    assert flags == [True, True, True, False]
    assert (state.best_epoch, state.best_acc, state.epochs_since_best) == (3, 0.7, 1)
    no_val = checkpoint.TrainState.fresh(torch.device("cpu"))
    assert not any(no_val.end_epoch(dict(epoch=e, test_acc=0.1 * e)) for e in (1, 2, 3))
    saved = checkpoint.TrainState.from_checkpoint({**state.to_checkpoint(), "train_sums": [[0, 0, 0]]}, 0, 1,
                                                  torch.device("cpu"))
    assert (saved.best_epoch, saved.epochs_since_best, saved.stopped_early) == (3, 1, False)


@pytest.mark.slow
@pytest.mark.floor
def test_preempted_run_resumes_to_identical_weights(shards, imagenet_like, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *ARGS]
    proc = start_train(args, log=tmp_path / "first.log")
    wait_for(lambda: len(ckpts(run_dir)) >= 2, 180, "two checkpoints", [proc])
    proc.send_signal(signal.SIGUSR1)                      # what slurm's --signal=USR1 delivers
    assert proc.wait(timeout=120) == EXIT_PREEMPTED
    log = (tmp_path / "first.log").read_text()
    assert "SIGUSR1 received: checkpoint saved" in log
    stopped_at = torch.load(run_dir / "checkpoints" / ckpts(run_dir)[-1], weights_only=True)["step"]
    assert stopped_at < 8, "the run finished before the signal; nothing was tested"

    resumed = run_train(args + ["--resume", "auto"])
    assert f"resumed from step {stopped_at}" in resumed.stdout
    assert_same_weights(reference, run_dir)
    epochs = [e["epoch"] for e in read_json(run_dir / "metrics.json")["epochs"]]
    assert epochs == [1, 2]                                 # each epoch once, none repeated


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped(shards, imagenet_like, reference, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    names = ckpts(run_dir)
    newest = run_dir / "checkpoints" / names[-1]
    newest.write_bytes(newest.read_bytes()[:1000])          # truncated, as by a full disk
    (run_dir / "model.pt").unlink()
    proc = run_train(["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *ARGS,
                      "--resume", "auto"])
    assert f"skipping damaged checkpoint {newest}" in proc.stdout
    assert "resumed from step 7" in proc.stdout               # the one before: epoch 2, step 3 of 4
    assert_same_weights(reference, run_dir)


@pytest.mark.slow
def test_resume_path_errors_are_one_line(shards, reference, tmp_path):
    proc = run_train(["--data", shards, "--output-dir", tmp_path / "r", *TINY, "--pretrained", "none",
                      "--resume", str(tmp_path / "nope.pt")], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(f"--resume {tmp_path / 'nope.pt'}: no such file")
    # Starting afresh in a directory that holds checkpoints would mix two runs: refused.
    proc = run_train(["--data", shards, "--output-dir", reference, *TINY, "--pretrained", "none"], check=False)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr and "--resume auto" in proc.stderr


KILL_MID_WRITE = r"""
import os, signal, sys, torch
from pathlib import Path
from finetune import checkpoint
ckpt_dir = Path(sys.argv[1])
state = dict(model={"w": torch.ones(3)}, step=1, epoch=0)
checkpoint.save(state, ckpt_dir, keep_last=2, is_best=False)
real_save = torch.save
def dying_save(obj, fh, *a, **k):
    fh.write(b"PK\x03\x04 half a checkpoint")
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)                    # killed in the middle of the write
torch.save = dying_save
checkpoint.save(dict(model={"w": torch.zeros(3)}, step=2, epoch=0), ckpt_dir, keep_last=2, is_best=False)
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    proc = subprocess.run([PYTHON, "-c", KILL_MID_WRITE, str(tmp_path)], cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "ckpt-00000001.pt" in names and "ckpt-00000002.pt" not in names
    assert any(n.startswith(".ckpt-00000002.pt.tmp") for n in names)     # the torn write, under a temp name
    _, state = checkpoint.decide_resume("auto", tmp_path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))


def _pid(run_dir, rank):
    return read_json(run_dir / "ranks" / f"rank-{rank}.json")["pid"]


@pytest.mark.slow
def test_killed_rank_fails_fast_then_resume_completes(shards, imagenet_like, tmp_path):
    """kill -9 of the rank on 'node 1': both nodes exit non-zero within seconds; --resume auto finishes."""
    run_dir = tmp_path / "run"
    args = ["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *ARGS]
    nodes = two_nodes(args, tmp_path)
    try:
        wait_for(lambda: len(ckpts(run_dir)) >= 1, 240, "a checkpoint", nodes)
        os.kill(_pid(run_dir, 1), signal.SIGKILL)
        t0 = time.monotonic()
        codes = [n.wait(timeout=90) for n in nodes]
        elapsed = time.monotonic() - t0
    finally:
        for n in nodes:
            n.kill()
    assert all(c != 0 for c in codes) and elapsed < 60, (codes, elapsed)
    log0 = (tmp_path / "node0.log").read_text()
    assert "train.py: error: rank 0: a collective with the other ranks failed" in log0
    assert "--resume auto" in log0
    assert "SIGKILL" in (tmp_path / "node1.log").read_text()

    nodes = two_nodes(args + ["--resume", "auto"], tmp_path)
    assert [n.wait(timeout=300) for n in nodes] == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
    assert "resumed from step" in (tmp_path / "node0.log").read_text()
    assert [e["epoch"] for e in read_json(run_dir / "metrics.json")["epochs"]] == [1, 2]


@pytest.mark.slow
def test_hung_rank_hits_the_collective_timeout(shards, imagenet_like, tmp_path):
    """A rank that stops answering (SIGSTOP: the socket stays open, as with a frozen node) makes the other
    node fail after --collective-timeout seconds, not the 30-minute default."""
    run_dir = tmp_path / "run"
    args = ["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *ARGS,
            "--collective-timeout", "10", "--startup-timeout", "15", "--epochs", "50"]
    nodes = two_nodes(args, tmp_path)
    try:
        wait_for(lambda: len(ckpts(run_dir)) >= 1, 240, "a checkpoint", nodes)
        os.kill(_pid(run_dir, 1), signal.SIGSTOP)
        t0 = time.monotonic()
        code = nodes[0].wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        try:
            os.kill(_pid(run_dir, 1), signal.SIGKILL)
        except ProcessLookupError:
            pass
        for n in nodes:
            n.kill()
    assert code != 0 and 5 < elapsed < 60, (code, elapsed)
    log0 = (tmp_path / "node0.log").read_text()
    assert "train.py: error: rank 0: a collective with the other ranks failed" in log0, log0[-3000:]


@pytest.mark.slow
def test_signal_during_start_up_exits_75(shards, imagenet_like, tmp_path):
    """Item 20: the handler is installed before set-up; a SIGUSR1 while the job starts (here: right after the
    rank file appears, during a simulated slow start) ends it with 75, not a death by signal (-10)."""
    run_dir = tmp_path / "run"
    proc = start_train(["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *ARGS],
                       log=tmp_path / "log", env=faults.env(FINETUNE_TEST_STARTUP_DELAY_S=3))
    wait_for(lambda: (run_dir / "ranks" / "rank-0.json").exists(), 120, "the rank file", [proc])
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "log").read_text()[-2000:]
    assert "received during start-up" in (tmp_path / "log").read_text()
    assert ckpts(run_dir) == []


def _fake(step):
    return dict(model={"w": torch.full((2,), float(step))}, step=step, epoch=0)


def test_pruning_keeps_this_lineage_after_resume_to_an_older_checkpoint(tmp_path):
    """Item 6: ckpt 13..16 exist; --resume PATH to ckpt-12 then saving 13 with --keep-last 1 must keep the new
    ckpt-13, move the abandoned 13..16 aside (not delete them), and --resume auto must then pick 13."""
    d = tmp_path / "checkpoints"
    for step in range(12, 17):
        checkpoint.save(_fake(step), d, keep_last=10, is_best=False)
    lines = []
    dest = checkpoint.abandon_newer(d, 12, log=lines.append)
    assert sorted(p.name for p in dest.iterdir()) == [f"ckpt-{s:08d}.pt" for s in range(13, 17)]
    checkpoint.save(_fake(13), d, keep_last=1, is_best=False, log=lines.append)
    assert ckpts(tmp_path) == ["ckpt-00000013.pt"]
    assert any("pruned 1 checkpoint(s)" in line and "ckpt-00000012.pt" in line for line in lines), lines
    assert checkpoint.decide_resume("auto", d)[1]["step"] == 13


def test_pruning_never_deletes_the_file_just_written_or_newer_ones(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (5, 16):
        checkpoint.save(_fake(step), d, keep_last=10, is_best=False)
    checkpoint.save(_fake(13), d, keep_last=1, is_best=False, log=lambda _: None)
    assert ckpts(tmp_path) == ["ckpt-00000013.pt", "ckpt-00000016.pt"]


@pytest.mark.slow
def test_second_job_on_the_same_run_directory_is_refused(shards, tmp_path):
    """Item 7: an exclusive flock on RUN_DIR/.lock for the job's lifetime; a second job is refused with one
    line naming the holder; once the holder is dead (SIGKILL), the kernel has released the lock."""
    from finetune import rundir
    run_dir = tmp_path / "run"
    args = ["--data", shards, "--output-dir", run_dir, "--pretrained", "none", *ARGS]
    first = start_train(args, log=tmp_path / "first.log", env=faults.env(FINETUNE_TEST_STARTUP_DELAY_S=60))
    try:
        wait_for(lambda: (run_dir / "ranks" / "rank-0.json").exists(), 120, "the first job's rank file", [first])
        second = run_train(args, check=False)
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert "is in use by another job" in line and f"pid {first.pid}" in line, second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (run_dir / ".lock").exists()                      # left behind, but no longer locked
    rundir.lock_run_dir(SimpleNamespace(is_main_process=True, num_processes=1), run_dir)


@pytest.mark.slow
def test_resume_with_another_arch_is_one_line(shards, reference, tmp_path):
    """Item 8 through train.py: a checkpoint of resnet18 is not resumed as resnet34 (one line, exit 2)."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    proc = run_train(["--data", shards, "--output-dir", run_dir, "--pretrained", "none", *ARGS, "--arch",
                      "resnet34", "--resume", "auto"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: cannot resume: the checkpoint is "
                                                           "--arch resnet18, this run --arch resnet34")


@pytest.mark.slow
def test_two_processes_resume_the_path_rank_0_chose_and_abandon_newer(shards, imagenet_like, reference,
                                                                      tmp_path):
    """Items 19 + 6 on 2 processes: --resume PATH to ckpt-6 of a finished run: both ranks load it (same final
    weights), ckpt-7/8 of the abandoned branch are moved aside, not pruned, and the new 7/8 are kept."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    path = run_dir / "checkpoints" / "ckpt-00000006.pt"
    proc = run_train(["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *ARGS,
                      "--workers", "0", "--resume", path], procs=2)
    assert "resumed from step 6" in proc.stdout and "moved 2 newer checkpoint(s)" in proc.stdout
    (moved,) = (run_dir / "checkpoints" / "abandoned").iterdir()
    assert sorted(p.name for p in moved.iterdir()) == ["ckpt-00000007.pt", "ckpt-00000008.pt"]
    assert ckpts(run_dir) == ["ckpt-00000006.pt", "ckpt-00000007.pt", "ckpt-00000008.pt"]
    digests = {read_json(run_dir / "ranks" / f"rank-{r}.json")["final_param_sha256"] for r in (0, 1)}
    assert len(digests) == 1


@pytest.mark.slow
def test_patience_survives_a_preemption(val_shards, imagenet_like, tmp_path):
    """--patience 1 with an lr too small to change a prediction (as the early-stop test in test_train.py): val
    cannot improve after epoch 1, so an uninterrupted run stops after epoch 2 of 5. Preempted in epoch 2 --
    after epoch 1 was evaluated -- and resumed, it must still stop after epoch 2 with best.pt = epoch 1: the
    best val accuracy and the epochs-without-improvement count come back from the checkpoint (were they
    reset, epoch 2 would count as an improvement and the run would go on to epoch 3)."""
    run_dir = tmp_path / "run"
    args = ["--data", val_shards, "--output-dir", run_dir, "--pretrained", imagenet_like, "--epochs", "5",
            "--max-steps-per-epoch", "3", "--save-every", "1", "--patience", "1", "--lr", "1e-12", "--freeze-bn",
            *TINY]
    proc = start_train(args, log=tmp_path / "first.log", env=faults.env(FINETUNE_TEST_SAVE_DELAY_S=2))
    wait_for(lambda: "epoch 1:" in (tmp_path / "first.log").read_text(), 240, "epoch 1's evaluation", [proc])
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-2000:]
    stopped_at = torch.load(run_dir / "checkpoints" / ckpts(run_dir)[-1], weights_only=True)["step"]
    assert 3 <= stopped_at < 6, stopped_at                 # inside epoch 2 (steps 4-6), or at its start
    assert [e["epoch"] for e in read_json(run_dir / "metrics.json")["epochs"]] == [1]

    resumed = run_train(args + ["--resume", "auto"])
    assert f"resumed from step {stopped_at}" in resumed.stdout
    assert "early stop after epoch 2" in resumed.stdout and "epoch 3:" not in resumed.stdout
    metrics = read_json(run_dir / "metrics.json")
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["chosen"]["checkpoint"] == "best.pt" and metrics["chosen"]["epoch"] == 1
    assert torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["step"] == 3
