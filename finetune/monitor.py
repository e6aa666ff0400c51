"""What a run reports: TensorBoard scalars and hparams (main process only), the examples/sec meter
(end-to-end and compute-only, warm-up steps excluded), d2l-style console lines printed once per job, and
metrics.json in the run directory."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from . import atomic_write_text
from .config import Config


class StepTimer:
    """Splits each step's wall time into waiting for data and computing. The first `warmup` steps of an
    epoch (worker start-up, cudnn autotuning, compilation) are left out of the rates.

    On the CPU, perf_counter. On a GPU the host runs ahead of the device, so host clocks would bill the
    device's backlog to whatever the host waits on next -- and synchronising every step to avoid that
    would stall the pipeline. Instead each step records CUDA events (compute: from the first micro-batch in
    hand to the end of the step; wall: step end to step end) and they are read once, when the epoch's
    rates are asked for (`data` / `compute`)."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.cuda = device.type == "cuda"
        self._data = self._compute = 0.0
        self.steps = 0
        self.seen = 0
        self._t = None
        self._events = []           # CUDA: (compute start, step end) of every counted step
        self._first = None          # CUDA: the event ending the last warm-up step (the counted wall's start)
        self._started = None

    def start(self):
        self._t = self.host_start = time.perf_counter()
        self._data_dt = 0.0
        self.host_wait = 0.0        # host seconds in next(loader) this epoch, warm-up included (progress line)
        if self.cuda:
            self._first = torch.cuda.Event(enable_timing=True)
            self._first.record()

    def fetch(self, iterator):
        """next(iterator), timed as data wait."""
        t = time.perf_counter()
        item = next(iterator)
        waited = time.perf_counter() - t
        self._data_dt += waited
        self.host_wait += waited
        if self.cuda and self._started is None:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        return item

    def step_done(self):
        self.seen += 1
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            if self.seen > self.warmup:
                self._events.append((self._started or end, end))
                self.steps += 1
            else:
                self._first = end
            self._started = None
            return
        now = time.perf_counter()
        total, self._t = now - self._t, now
        if self.seen > self.warmup:
            self._data += self._data_dt
            self._compute += total - self._data_dt
            self.steps += 1
        self._data_dt = 0.0

    def _resolve(self):
        """CUDA: turn the recorded events into seconds (waits for the last one: once per epoch)."""
        if not self.cuda or not self._events:
            return
        self._events[-1][1].synchronize()
        wall = self._first.elapsed_time(self._events[-1][1]) / 1000
        compute = sum(a.elapsed_time(b) for a, b in self._events) / 1000
        self._compute, self._data = compute, max(0.0, wall - compute)
        self._events, self._first = [], self._events[-1][1]

    @property
    def data(self) -> float:
        self._resolve()
        return self._data

    @property
    def compute(self) -> float:
        self._resolve()
        return self._compute


class Monitor:
    """Console lines from the start; the trackers (TensorBoard, and --log-with's others, finetune/trackers.py)
    from open() on, once the run knows the step it resumes from."""

    def __init__(self, run_dir: Path, is_main: bool, log_with: tuple[str, ...] = ("tensorboard",)):
        from .trackers import Trackers
        self.run_dir, self.is_main = run_dir, is_main
        self.tensorboard = is_main and "tensorboard" in log_with
        self.writer = None
        self.trackers = Trackers(log_with, run_dir, is_main)
        # The plain progress line is for logs tqdm does not draw in (Slurm, pipes: stderr not a terminal).
        self.plain_progress = is_main and not sys.stderr.isatty()
        self._last_progress = 0.0

    def open(self, global_step: int, config: dict) -> None:
        """Start the trackers at `global_step` (0: a fresh run). On a resume, TensorBoard gets
        purge_step = global_step + 1: whatever an earlier run logged after the checkpoint it resumes from
        (step > global_step; everything up to it was logged before that checkpoint was saved) is dropped
        by TensorBoard's readers, so the curves have no repeated or out-of-order steps."""
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"),
                                        purge_step=global_step + 1 if global_step else None)
        self.trackers.start(config, global_step)

    def print(self, *args, **kw):
        """Once per job: the global main process (accelerator.print would print once per node)."""
        if self.is_main:
            print(*args, **kw, flush=True)

    def progress(self, state, steps: int, timer: StepTimer, cfg: Config) -> None:
        """After each optimizer step: every --log-every-s seconds, one progress line on the main process when
        the output is not a terminal (progress_line)."""
        now = time.perf_counter()
        if not self.plain_progress or now - max(self._last_progress, timer.host_start) < cfg.log_every_s:
            return
        self._last_progress = now
        loss_sum, _, seen = state.sums.tolist()     # this rank's running sums: a device read every few seconds
        elapsed = now - timer.host_start
        per_step = elapsed / max(timer.seen, 1)
        left = steps - state.step_in_epoch
        self.print(progress_line((state.epoch + 1, cfg.epochs, state.step_in_epoch, steps), loss_sum / max(seen, 1),
                                 timer.seen * cfg.batch_size / max(elapsed, 1e-9), timer.host_wait / max(elapsed, 1e-9),
                                 left * per_step, (left + (cfg.epochs - state.epoch - 1) * steps) * per_step))

    def scalars(self, values: dict, step: int):
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        self.trackers.log(values, step)

    def epoch_end(self, record: dict, optimizer, step: int, devices: list[str]):
        """TensorBoard scalars of one epoch and the d2l-style console lines."""
        values = {"train/loss": record["train_loss"], "train/acc": record["train_acc"],
                  "test/loss": record["test_loss"], "test/acc": record["test_acc"],
                  "perf/examples_per_sec": record["examples_per_sec"],
                  "perf/compute_examples_per_sec": record["compute_examples_per_sec"],
                  "perf/data_wait_frac": record["data_wait_frac"], "perf/epoch_time_s": record["epoch_time"]}
        values.update({f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups})
        if record.get("peak_gpu_mem_gib") is not None:       # the largest of any rank, this epoch
            values["perf/peak_gpu_mem_gib"] = record["peak_gpu_mem_gib"]
        self.scalars(values, step)
        self.print(f"epoch {record['epoch']}: loss {record['train_loss']:.3f}, train acc {record['train_acc']:.3f}, "
                   f"test acc {record['test_acc']:.3f} ({record['test_samples']} test images)")
        self.print(f"{record['examples_per_sec']:.1f} examples/sec on [{', '.join(devices)}] "
                   f"(compute only {record['compute_examples_per_sec']:.1f}, data wait "
                   f"{100 * record['data_wait_frac']:.1f}%, epoch {record['epoch_time']:.1f}s)")

    def class_metrics(self, record: dict, classes: list[str], step: int):
        """Per-class precision and recall and balanced accuracy as scalars, the confusion matrix as an image,
        for every evaluated split in `record` (test, val, ema_test, ema_val). The scalars go to every tracker
        (--log-with); the image to TensorBoard only."""
        for split in (k[:-len("_confusion")] for k in record if k.endswith("_confusion")):
            values = {f"{split}/balanced_acc": record[f"{split}_balanced_acc"]}
            for i, name in enumerate(classes):
                values[f"{split}/precision/{name}"] = record[f"{split}_precision"][i]
                values[f"{split}/recall/{name}"] = record[f"{split}_recall"][i]
            self.scalars(values, step)
            if self.writer:
                self.writer.add_image(f"{split}/confusion", confusion_image(record[f"{split}_confusion"]), step)

    def hparams(self, hparams: dict, metrics: dict):
        """hparams with final metrics, in the run's own event directory (TensorBoard's HPARAMS tab)."""
        self.trackers.log(metrics, None)
        if not self.writer:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, sei = hp_summary(clean, metrics)
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)

    def write_metrics(self, metrics: dict):
        if self.is_main:
            atomic_write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=2))

    def close(self):
        if self.writer:
            self.writer.close()
            self.writer = None
        self.trackers.finish()


def progress_line(where: tuple, loss: float, rate: float, wait_frac: float, eta_epoch_s: float,
                  eta_run_s: float) -> str:
    """'epoch 2/5 step 120/468: loss 0.412, 34.1 examples/s, data wait 12%, ETA epoch 3m20s, run 16m05s' for
    where = (epoch, epochs, step, steps). The ETAs are training time at this rate, evaluation not included."""
    epoch, epochs, step, steps = where
    return (f"epoch {epoch}/{epochs} step {step}/{steps}: loss {loss:.3f}, {rate:.1f} examples/s, data wait "
            f"{100 * wait_frac:.0f}%, ETA epoch {duration(eta_epoch_s)}, run {duration(eta_run_s)}")


def duration(seconds: float) -> str:
    """45s, 3m20s, 2h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def confusion_image(confusion: list[list[int]], cell: int = 16) -> torch.Tensor:
    """A CHW image of a confusion matrix (rows: true class, columns: predicted), each cell `cell` pixels,
    shaded by the fraction of its row (white: none, dark blue: all)."""
    m = torch.tensor(confusion, dtype=torch.float32)
    frac = m / m.sum(dim=1, keepdim=True).clamp_min(1)
    shade = torch.stack([1 - frac, 1 - frac, 1 - 0.5 * frac])          # white -> dark blue
    return shade.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)
