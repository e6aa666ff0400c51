"""Issue 20 item 16: a resume with another --lr trains at that lr (it kept the checkpoint's, because
optimizer.load_state_dict restores initial_lr, while the run said "the recipe changes from here on").
A real train.py run, preempted with SIGUSR1 (what Slurm's --signal delivers), resumed with --lr 0.5: the lr
actually used is read back from TensorBoard's lr/* scalars and from the optimizer state of the checkpoints."""

from __future__ import annotations

import signal

import pytest
import torch

import faults
from conftest import TINY, start_train, run_train, wait_for
from helpers import ckpt_paths, tb_events
from finetune import EXIT_PREEMPTED

pytestmark = pytest.mark.slow    # every test here starts a process (train.py, accelerate...)

# 2 epochs x 3 steps, a checkpoint after every step; a slow checkpoint write leaves time to signal mid-run.
ARGS = ["--epochs", "2", "--max-steps-per-epoch", "3", "--save-every", "1", "--keep-last", "20",
        "--eval-limit", "4", "--pretrained", "none", *TINY]


def groups(path) -> dict:
    """{group name: (lr, initial_lr)} of a checkpoint's optimizer state."""
    state = torch.load(path, weights_only=True)["optimizer"]
    return {g["name"]: (g["lr"], g["initial_lr"]) for g in state["param_groups"]}


def test_resume_with_another_lr_trains_at_the_new_lr(shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--data", shards, "--output-dir", run_dir, *ARGS]
    proc = start_train(args + ["--lr", "0.01"], log=tmp_path / "first.log",
                       env=faults.env(FINETUNE_TEST_SAVE_DELAY_S=1))
    wait_for(lambda: len(ckpt_paths(run_dir)) >= 2, 240, "two checkpoints", [proc])
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=180) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    stopped = ckpt_paths(run_dir)[-1]
    stopped_at = torch.load(stopped, weights_only=True)["step"]
    assert stopped_at < 6, "the run finished before the signal; nothing was tested"
    assert groups(stopped) == {"backbone": (0.01, 0.01), "head": pytest.approx((0.1, 0.1))}

    resumed = run_train(args + ["--lr", "0.5", "--resume", "auto"])
    assert f"resumed from step {stopped_at}" in resumed.stdout
    assert "resuming with --lr 0.5 (the checkpoint used 0.01): the recipe changes from here on" in resumed.stdout
    # Every checkpoint written after the resume holds the new lr (head: --head-lr-mult 10 x 0.5).
    after = [p for p in ckpt_paths(run_dir) if torch.load(p, weights_only=True)["step"] > stopped_at]
    assert after and all(groups(p) == {"backbone": (0.5, 0.5), "head": pytest.approx((5.0, 5.0))} for p in after)
    # TensorBoard: the lr of each epoch end the resumed run logged (epoch 2 always ends after the resume).
    events = tb_events(run_dir / "tb", scalars=0)
    backbone = {e.step: e.value for e in events.Scalars("lr/backbone")}
    head = {e.step: e.value for e in events.Scalars("lr/head")}
    resumed_steps = [s for s in backbone if s > stopped_at]
    assert 6 in resumed_steps, backbone
    for step in resumed_steps:
        assert backbone[step] == pytest.approx(0.5) and head[step] == pytest.approx(5.0), (backbone, head)
