"""Contracts across processes and micro-batches that issue 11 found untested: gradient accumulation gives
the same update as one big batch (1 and 2 processes), --loss-reduction mean at lr x global batch equals sum,
and a preemption signal to ONE rank stops every rank at the same step, from which a resume ends with the
weights of an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal

import pytest
import torch

from conftest import TINY, load_model_pt, read_json, run_train, wait_for
from helpers import two_nodes

pytestmark = pytest.mark.slow    # every test here starts a process (train.py, accelerate...)

ONE_STEP = ["--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "1", "--freeze-bn", "--data-order",
            "sequential", "--eval-limit", "2", *TINY]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_accumulation_and_loss_reduction_give_the_same_update(shards, imagenet_like, tmp_path):
    """--grad-accum 2 (1 and 2 processes) and --loss-reduction mean with lr x 8 make the update of one batch of
    8 with the summed loss; the update itself moves weights by > 1e-4, so 1e-6 is not vacuous. A loop that
    stepped every micro-batch, or scaled the loss per micro-batch wrongly, fails this."""
    common = ["--data", shards, "--pretrained", imagenet_like, *ONE_STEP]
    # mean vs sum: without weight decay, whose step lr x wd x w would be 8x larger at lr x 8.
    runs = {"plain": (["--lr", "0.01"], 1), "accum": (["--lr", "0.01", "--grad-accum", "2"], 1),
            "accum-2proc": (["--lr", "0.01", "--grad-accum", "2"], 2),
            "sum-nowd": (["--lr", "0.01", "--weight-decay", "0"], 1),
            "mean-nowd": (["--lr", "0.08", "--loss-reduction", "mean", "--weight-decay", "0"], 1)}
    weights = {}
    for name, (flags, procs) in runs.items():
        run_train(common + flags + ["--output-dir", tmp_path / name], procs=procs)
        weights[name] = load_model_pt(tmp_path / name)["state_dict"]
    init = torch.load(imagenet_like, weights_only=True)
    assert max((weights["plain"][k] - init[k]).abs().max().item() for k in init if not k.startswith("fc.")) > 1e-4
    for name in ("accum", "accum-2proc"):
        assert _max_diff(weights["plain"], weights[name]) < 1e-6, name
    assert _max_diff(weights["sum-nowd"], weights["mean-nowd"]) < 1e-6


ARGS = ["--epochs", "2", "--max-steps-per-epoch", "3", "--save-every", "1", "--keep-last", "3", "--eval-limit", "4",
        *TINY]


def _finish(nodes, timeout=300):
    try:
        return [n.wait(timeout=timeout) for n in nodes]
    finally:
        for n in nodes:
            n.kill()


def test_a_signal_to_one_rank_stops_all_at_the_same_step_and_resumes_exactly(shards, imagenet_like, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = ["--data", shards, "--pretrained", imagenet_like, *ARGS]
    assert _finish(two_nodes(common + ["--output-dir", ref], tmp_path, "ref")) == [0, 0]

    nodes = two_nodes(common + ["--output-dir", run], tmp_path, "run")
    try:
        wait_for(lambda: (run / "checkpoints" / "ckpt-00000002.pt").exists(), 240, "step 2's checkpoint", nodes)
        os.kill(read_json(run / "ranks" / "rank-1.json")["pid"], signal.SIGUSR1)     # rank 1 only
    except BaseException:
        _finish(nodes, timeout=1)
        raise
    assert all(code != 0 for code in _finish(nodes))       # the launchers report their rank's exit...
    logs = [(tmp_path / f"run-node{r}.log").read_text() for r in (0, 1)]
    assert all(re.search(r"exitcode\s*:\s*75", log) for log in logs), logs[1][-2000:]   # ...75 on both ranks
    log0 = logs[0]
    saved = int(log0.split("checkpoint saved at step ")[1].split(";")[0])
    assert saved < 6 and (run / "checkpoints" / f"ckpt-{saved:08d}.pt").exists()

    assert _finish(two_nodes(common + ["--output-dir", run, "--resume", "auto"], tmp_path, "resume")) == [0, 0]
    a, b = load_model_pt(ref)["state_dict"], load_model_pt(run)["state_dict"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
