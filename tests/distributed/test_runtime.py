"""The training loop's runtime contracts (issue 19): collective timeouts that work on every supported torch
and arm the short one only once every rank is past an epoch's first step; votes that really are over all
ranks; no host stalls in the steady state (asynchronous running sums, a tracker thread, a cheap EMA that
skips skipped fp16 steps, evaluation counted on the device); an lr schedule that does not advance on a
skipped step. The GPU-only halves (no implicit sync under torch.cuda.set_sync_debug_mode) run in
bench/gpu_check.sh; the tests marked `cuda` here skip on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import faults
from conftest import REPO, TINY, free_port, read_json, run_train
from finetune import distributed, loop, trackers
from finetune.checkpoint import TrainState
from finetune.config import parse_config
from finetune.context import StepContext
from finetune.recipe import lr_factor
from finetune.preempt import PreemptionFlag

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------- two gloo processes

PRELUDE = """
import json, os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from finetune import distributed
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
out = {{}}
"""


def two_ranks(body: str, timeout: int = 120) -> list[dict]:
    """Run `body` in two processes of one gloo group (rank in `rank`); each fills the dict `out`, which comes
    back as JSON (rank order)."""
    script = PRELUDE.format(repo=str(REPO)) + textwrap.dedent(body) + "\nprint('OUT', json.dumps(out), flush=True)\n"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    results = []
    for r, text in enumerate(outputs):
        lines = [line for line in text.splitlines() if line.startswith("OUT ")]
        assert lines, f"rank {r} printed no result:\n{text[-3000:]}"
        results.append(json.loads(lines[-1][4:]))
    return results


@pytest.mark.slow
def test_any_rank_and_the_async_vote_are_votes_of_every_rank():
    """Only rank 1 says True: both ranks must see True (an any_rank that returned the local flag would give
    rank 0 False); nobody says True: both see False. The same for the per-step AsyncVote, one step later."""
    results = two_ranks("""
        cpu = torch.device("cpu")
        out["any"] = distributed.any_rank(rank == 1, cpu)
        out["none"] = distributed.any_rank(False, cpu)
        from finetune.preempt import AsyncVote
        vote = AsyncVote(cpu)
        out["votes"] = [vote.vote(rank == 1 and step == 1) for step in range(3)] + [vote.settle()]
    """)
    for r in results:
        assert r["any"] is True and r["none"] is False, results
        assert r["votes"] == [False, False, True, False], results      # read one step after it was cast


@pytest.mark.slow
def test_timeouts_switch_on_the_live_group():
    """The mechanism under every supported torch (dist.set_timeout is 2.12+; 2.11 has only _set_pg_timeout):
    inside patient() a rank 6 s late is waited for; in the steady state (2 s) the same lateness fails the
    other rank's collective after about 2 s, as a collective failure train.py explains in one line."""
    results = two_ranks("""
        cpu = torch.device("cpu")
        distributed.TIMEOUTS.update(steady=2, patient=30)
        distributed.steady()
        with distributed.patient():
            if rank == 1:
                time.sleep(6)
            out["patient"] = distributed.all_reduce([1.0], cpu)[0]
        if rank == 1:
            time.sleep(8)
        t0 = time.monotonic()
        try:
            distributed.all_reduce([1.0], cpu)
        except Exception as exc:
            out["failed_after"] = time.monotonic() - t0
            out["explained"] = distributed.collective_failure(exc) is not None
    """)
    assert [r["patient"] for r in results] == [2.0, 2.0], results
    assert 1.0 < results[0]["failed_after"] < 5.0 and results[0]["explained"], results


# ----------------------------------------------------------------------- item 2: when the short timeout arms

SLOW = ["--epochs", "2", "--max-steps-per-epoch", "4", "--eval-limit", "4", "--collective-timeout", "3",
        "--startup-timeout", "120", *TINY]


@pytest.mark.slow
def test_a_rank_slow_at_an_epochs_first_steps_is_no_dead_rank(shards, imagenet_like, tmp_path):
    """Rank 1 takes 8 s (steady timeout: 3 s) before the second step of each epoch -- a fresh loader
    worker's first batch, or a compilation -- after rank 0 has queued the first: the run finishes. A short
    timeout armed as soon as this host had queued step 0 made rank 0's next collective time out."""
    run_dir = tmp_path / "run"
    run_train(["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *SLOW], procs=2,
              env=faults.env(FINETUNE_TEST_SLOW_AT="1:1", FINETUNE_TEST_SLOW_STEP_S=8), timeout=400)
    assert [e["epoch"] for e in read_json(run_dir / "metrics.json")["epochs"]] == [1, 2]


@pytest.mark.slow
def test_a_rank_hung_in_the_steady_state_fails_the_run_after_the_short_timeout(shards, imagenet_like, tmp_path):
    """Rank 1 stops answering two steps later (the steady state): rank 0 gives up after --collective-timeout
    (3 s; the whole run well under the 300 s start-up timeout) with the one-line explanation."""
    t0 = time.monotonic()
    proc = run_train(["--data", shards, "--output-dir", tmp_path / "run", "--pretrained", imagenet_like, *SLOW,
                      "--startup-timeout", "300"],
                     procs=2, env=faults.env(FINETUNE_TEST_SLOW_AT="1:2", FINETUNE_TEST_SLOW_STEP_S=1000),
                     timeout=400, check=False)
    assert proc.returncode != 0 and time.monotonic() - t0 < 250, proc.stderr[-3000:]
    assert "rank 0: a collective with the other ranks failed" in proc.stderr, proc.stderr[-3000:]


# -------------------------------------------------------------------------- the loop, in one process

class FakeAccelerator:
    """What train_one_epoch asks of an Accelerator, on the CPU, with an fp16 scaler that 'skips' the
    optimizer steps listed in `skipped` (0-based step numbers)."""

    def __init__(self, skipped=()):
        self.num_processes, self.process_index, self.is_main_process = 1, 0, True
        self.device = torch.device("cpu")
        self.scaler = SimpleNamespace(get_scale=lambda: 1024.0)
        self.skipped, self.steps = set(skipped), 0

    def autocast(self):
        return nullcontext()

    def no_sync(self, model):
        return nullcontext()

    def backward(self, loss):
        loss.backward()

    @property
    def optimizer_step_was_skipped(self):
        return self.steps - 1 in self.skipped


def _epoch(steps=6, skipped=(), log_every=1000, ema=None, monitor=None, events=None, **flags):
    """One epoch of a tiny BatchNorm model through loop.train_one_epoch; returns (lrs each step used,
    metrics, the model)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    ema = loop.make_ema(model, 0.9) if ema else None
    cfg = parse_config(["--data", "x", "--epochs", "1", "--batch-size", "4", "--lr", "0.1", "--schedule",
                        "cosine", "--log-every", str(log_every), "--save-every", "0", *flags.get("args", [])])
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    acc, lrs = FakeAccelerator(skipped), []
    real_step = optimizer.step

    def step():
        lrs.append(optimizer.param_groups[0]["lr"])
        acc.steps += 1
        real_step()
    optimizer.step = step

    def batches():
        for _ in range(steps):
            if events is not None:
                events.append("batch")
            yield torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,))
    monitor = monitor or SimpleNamespace(scalars=lambda values, step: None, print=lambda *a: None,
                                         progress=lambda *a: None)
    ctx = StepContext(model, optimizer, acc, cfg, normalize=lambda x, y: (x, y), monitor=monitor, ema=ema)
    metrics = loop.train_one_epoch(ctx, batches(), TrainState.fresh(acc.device), steps=steps,
                                   preempt=PreemptionFlag(""), checkpointer=None)
    return lrs, metrics, model, ema


def test_the_lr_schedule_does_not_advance_on_a_skipped_fp16_step():
    """GradScaler skips step 2 (overflow): step 3 uses the lr of update 2, i.e. lr_factor(2), not (3)."""
    lrs, _, _, _ = _epoch(steps=6, skipped=[2])
    cfg = parse_config(["--data", "x", "--epochs", "1", "--lr", "0.1", "--schedule", "cosine"])
    expected = [0.1 * lr_factor(cfg, update, 6) for update in (0, 1, 2, 2, 3, 4)]
    assert lrs == pytest.approx(expected, rel=1e-9), (lrs, expected)
    assert lrs[3] != pytest.approx(0.1 * lr_factor(cfg, 3, 6))


def test_the_ema_does_not_average_a_skipped_fp16_step():
    """An fp16 step GradScaler skipped changed no weight: the EMA must not take it as an update."""
    _, _, _, ema = _epoch(steps=5, skipped=[1, 3], ema=True)
    assert ema.count == 3 and int(ema.n_averaged) == 3


def test_running_sums_are_reduced_asynchronously_and_logged_correctly(monkeypatch):
    """--log-every 2 over 6 steps: no blocking all-reduce (distributed.all_reduce, which drains the pipeline)
    before the epoch's last batch -- the sums go through AsyncReduce, read a step later -- and the values
    logged at steps 2, 4, 6 are the running means (the one at 6 is the epoch's)."""
    events, logged = [], {}
    real = distributed.all_reduce
    monkeypatch.setattr(distributed, "all_reduce", lambda *a, **k: (events.append("blocking"), real(*a, **k))[1])
    monitor = SimpleNamespace(scalars=lambda values, step: logged.setdefault(step, values), print=print,
                              progress=lambda *a: None)
    _, metrics, _, _ = _epoch(steps=6, log_every=2, monitor=monitor, events=events)
    last_batch = len(events) - 1 - events[::-1].index("batch")
    assert "blocking" not in events[:last_batch], events
    assert sorted(logged) == [2, 4, 6]
    assert logged[6]["train/loss"] == pytest.approx(metrics["train_loss"], rel=1e-12)
    assert logged[6]["train/acc"] == pytest.approx(metrics["train_acc"], rel=1e-12)
    assert logged[2]["train/loss"] != logged[4]["train/loss"]


# ------------------------------------------------------------------------------------------------- EMA

class OpLog(TorchDispatchMode):
    """Records every aten op (and the dtype of its first tensor argument) run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = next((a for a in args if isinstance(a, torch.Tensor)),
                     next((a[0] for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)),
                          None))
        self.ops.append((str(func), first.dtype if first is not None else None))
        return func(*args, **(kwargs or {}))


def test_the_ema_update_runs_no_integer_kernels_and_its_counters_are_the_models():
    """A ResNet-18 has 20 BatchNorm layers: torch's rule lerps each num_batches_tracked (~4 kernels each, ~80
    per step) into a truncated, meaningless count. Ours runs no integer op per step -- one foreach lerp over
    the floats -- and the EMA's counters equal the model's whenever the state dict is taken."""
    import torchvision
    model = torchvision.models.resnet18(num_classes=2)
    ema = loop.make_ema(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        opt.step()
        with OpLog() as ops:
            ema.update_parameters(model)
    integer = [op for op, dtype in ops.ops if dtype == torch.int64 and "n_averaged" not in op]
    assert not [op for op in integer if "add_" not in op], integer      # only n_averaged += 1 is an int op
    assert len(ops.ops) <= 4, ops.ops
    counters = {k: v for k, v in ema.module.state_dict().items() if k.endswith("num_batches_tracked")}
    assert len(counters) == 20 and all(int(v) == 3 for v in counters.values()), counters
    assert all(int(v) == 3 for k, v in ema.state_dict().items() if k.endswith("num_batches_tracked"))


# ---------------------------------------------------------------------------------------------- evaluation

SYNCING = ("aten._local_scalar_dense", "aten.bincount", "aten.nonzero", "aten.unique", "aten._unique",
           "aten.masked_select", "aten.repeat_interleave", "aten.histc", "aten.item")


class HostReads(TorchDispatchMode):
    """Counts the ops that read a CUDA tensor back to the host (an implicit sync): .item() and friends, and
    ops whose output size depends on the data (CUDA's bincount reads the largest index back first)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(SYNCING):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def _evaluate(batches: int, device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).to(device)
    data = [(torch.randn(5, 3, 2, 2, device=device), torch.randint(0, 3, (5,), device=device))
            for _ in range(batches)]
    acc = SimpleNamespace(device=torch.device(device), autocast=nullcontext)
    return loop.evaluate(model, data, accelerator=acc, normalize=lambda x, y: (x, y), num_classes=3), data, model


def test_evaluation_reads_nothing_back_per_batch():
    """2 or 8 batches: the same number of host reads (the final ones) -- no per-batch bincount or .item()
    -- and the confusion matrix and loss are right."""
    counts = []
    for n in (2, 8):
        with HostReads() as reads:
            result, data, model = _evaluate(n)
        counts.append(len(reads.reads))
        confusion = torch.zeros(3, 3, dtype=torch.long)
        with torch.no_grad():
            for x, y in data:
                for t, p in zip(y.tolist(), model(x).argmax(1).tolist()):
                    confusion[t, p] += 1
        assert result["test_confusion"] == confusion.tolist() and result["test_samples"] == 5 * n
    assert counts[0] == counts[1], counts


@cuda
def test_cuda_evaluation_runs_without_an_implicit_sync():
    """bench/gpu_check.sh: evaluation's per-batch work under torch.cuda.set_sync_debug_mode('error') (the
    mode is on while the batches are iterated; the one final read-back comes after)."""
    def guarded(batches):
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield from batches
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).cuda()
    data = [(torch.randn(5, 3, 2, 2, device="cuda"), torch.randint(0, 3, (5,), device="cuda")) for _ in range(4)]
    acc = SimpleNamespace(device=torch.device("cuda"), autocast=nullcontext)
    result = loop.evaluate(model, guarded(data), accelerator=acc, normalize=lambda x, y: (x, y), num_classes=3)
    assert result["test_samples"] == 20


# ---------------------------------------------------------------------------------------------- trackers

class SlowTracker:
    """A tracking server that takes `first_delay` s to answer the first call, then answers at once."""

    def __init__(self, first_delay=5.0, fail=False):
        self.first_delay, self.fail, self.calls = first_delay, fail, []

    def log(self, values, step=None, **kw):
        if not self.calls and self.first_delay:
            time.sleep(self.first_delay)
        self.calls.append((step, dict(values), threading.current_thread().name))
        if self.fail:
            raise ConnectionError("tracking server unreachable")

    def finish(self):
        self.finished = True


def _trackers(tmp_path, tracker):
    t = trackers.Trackers(("wandb",), tmp_path, is_main=True)
    t.trackers = [tracker]
    return t


def test_a_slow_tracker_does_not_slow_the_training_loop_and_loses_nothing(tmp_path):
    """The tracking server takes 5 s to answer: the loop's 8 steps (each logging) still take well under a
    second, and after finish() every value arrived, in order, from the logging thread."""
    tracker = SlowTracker(first_delay=5.0)
    t = _trackers(tmp_path, tracker)
    monitor = SimpleNamespace(scalars=lambda values, step: t.log(values, step), print=lambda *a: None,
                              progress=lambda *a: None)
    start = time.perf_counter()
    _epoch(steps=8, log_every=1, monitor=monitor)
    elapsed = time.perf_counter() - start
    t.finish()
    assert elapsed < 3.0, elapsed
    assert [step for step, _, _ in tracker.calls] == list(range(1, 9))
    assert all("train/loss" in values for _, values, _ in tracker.calls)
    assert {thread for _, _, thread in tracker.calls} == {"tracker-log"} and tracker.finished


def test_tracker_errors_are_shown_once_and_training_goes_on(tmp_path, capsys):
    t = _trackers(tmp_path, SlowTracker(first_delay=0, fail=True))
    for step in range(5):
        t.log({"x": step}, step)
    t.finish()
    err = capsys.readouterr().err
    assert err.count("logging to wandb failed (ConnectionError: tracking server unreachable)") == 1, err
    assert "0 call(s) dropped (queue full), 5 failed" in err


def test_a_full_tracker_queue_drops_the_oldest_values(tmp_path, monkeypatch, capsys):
    """Drop-oldest: with room for 3 waiting calls and a tracker stuck on the first, 10 calls keep the first
    (in flight) and the newest 3; the drop is reported once, and again (counted) at close."""
    monkeypatch.setattr(trackers, "QUEUE_LIMIT", 3)
    gate = threading.Event()
    tracker = SlowTracker(first_delay=0)
    tracker.log = lambda values, step=None, **kw: (gate.wait(10), tracker.calls.append(step))
    t = _trackers(tmp_path, tracker)
    t.log({"x": 0}, 0)
    while not t._queue._busy:
        time.sleep(0.01)
    for step in range(1, 10):
        t.log({"x": step}, step)
    gate.set()
    t.finish()
    assert tracker.calls == [0, 7, 8, 9]
    err = capsys.readouterr().err
    assert err.count("dropping the oldest values") == 1 and "6 call(s) dropped (queue full), 0 failed" in err


def test_mlflow_is_logged_to_its_run_from_the_logging_thread(tmp_path):
    """MLflow's active run is thread-local: from the logging thread, values must name the run (run_id)."""
    seen = []
    tracker = SimpleNamespace(log=lambda values, step=None, **kw: seen.append(kw), finish=lambda: None)
    t = trackers.Trackers(("mlflow",), tmp_path, is_main=True)
    t.trackers, t.ids = [tracker], {"mlflow": {"run_id": "abc123"}}
    t.log({"x": 1.0}, 1)
    t.finish()
    assert seen == [{"run_id": "abc123"}]


# ---------------------------------------------------------------------------- ACCELERATE_USE_CPU on a GPU

def test_peak_memory_is_not_read_from_a_gpu_this_rank_does_not_use(monkeypatch):
    """ACCELERATE_USE_CPU=1 on a GPU node: cuda.is_available() is True, but the rank's device is the CPU;
    reading CUDA's peak memory would open a context on GPU 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: pytest.fail("touched the GPU"))
    assert distributed.peak_gpu_memory_gib(torch.device("cpu")) is None


def test_sync_bn_is_refused_when_the_run_is_forced_onto_the_cpu(monkeypatch):
    from finetune import UsageError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    cfg = SimpleNamespace(debug=False, sync_bn=True, precision="no", compile=False, collective_timeout=60,
                          startup_timeout=1800, batch_size=8, grad_accum=1, loss_reduction="sum")
    with pytest.raises(UsageError, match="--sync-bn needs GPUs"):
        distributed.setup(cfg)
