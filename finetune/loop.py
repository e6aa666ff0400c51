"""The training loop: one epoch of optimizer steps (advancing a TrainState, checkpointing through a
Checkpointer), and an exact-once evaluation. Returns metrics only; where training stands is in the state."""

from __future__ import annotations

import itertools
import os
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from . import distributed
from .checkpoint import Checkpointer, TrainState
from .context import StepContext
from .preempt import PreemptionFlag
from .recipe import lr_factor, set_lr, start_epoch
from .monitor import StepTimer


def make_ema(model: torch.nn.Module, decay: float):
    """--ema-decay: an EMA of the parameters and buffers (HostCountEMA), or None when off."""
    return HostCountEMA(model, decay) if decay else None


class HostCountEMA(AveragedModel):
    """torch's AveragedModel with the rule of its get_ema_multi_avg_fn (the first update copies, later ones
    lerp by 1 - decay), updated without reading the device: torch's own update_parameters evaluates
    `n_averaged == 0` and `n_averaged > 0` on the host every step, i.e. two GPU syncs per optimizer step.
    Here the count is mirrored on the host (`count`), so the update only queues kernels. The state dict
    (`n_averaged` included) is AveragedModel's, so checkpoints and model.pt are unchanged; loading one
    refreshes the host count (one sync, at resume).

    Floating-point parameters and buffers are averaged (one foreach lerp per step). Integer buffers
    (BatchNorm's num_batches_tracked) are not: torch would run ~4 tiny kernels per buffer and step (~80 for
    a ResNet-18) to lerp a counter and truncate it, a number that nothing in eval mode reads. They are
    copied from the model whenever the state dict is taken (checkpoint, model.pt), so the EMA's counters
    are the model's."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model, use_buffers=True)
        self.decay, self.count = decay, 0
        self._pairs = None          # (model, our floats, its floats, our integers, its integers)
        self.module.register_state_dict_pre_hook(lambda *_: self._copy_counters())

    def _tensors(self, model: torch.nn.Module) -> tuple:
        """(our floats, its floats, our integers, its integers), built once per model (not every step)."""
        if self._pairs is None or self._pairs[0] is not model:
            ours = itertools.chain(self.module.parameters(), self.module.buffers())
            theirs = itertools.chain(model.parameters(), model.buffers())
            lists = ([], [], [], [])
            for a, b in zip(ours, theirs):
                k = 0 if a.is_floating_point() else 2
                lists[k].append(a)
                lists[k + 1].append(b.detach())
            self._pairs = (model, *lists)
        return self._pairs[1:]

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        our_f, their_f, our_i, their_i = self._tensors(model)
        if self.count == 0:
            torch._foreach_copy_(our_f + our_i, their_f + their_i)
        elif our_f:
            torch._foreach_lerp_(our_f, their_f, 1 - self.decay)
        self.n_averaged += 1
        self.count += 1

    @torch.no_grad()
    def _copy_counters(self) -> None:
        if self._pairs is not None and self._pairs[3]:
            torch._foreach_copy_(self._pairs[3], self._pairs[4])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.count = int(self.n_averaged)
        return result


def class_weights(counts: list[int] | None, mode: str, device: torch.device) -> torch.Tensor | None:
    """--class-balance loss: class c weighs N / (C x count_c) (1 for balanced classes); else None."""
    if mode != "loss" or not counts:
        return None
    counts_t = torch.tensor(counts, dtype=torch.float32)
    return (counts_t.sum() / (len(counts) * counts_t.clamp_min(1))).to(device)


def batch_loss(ctx: StepContext, images, labels, scale: float):
    """Forward pass. Returns (loss to backprop, per-sample losses, correct count). The loss is the one place
    that reads the criterion's settings: --class-balance's class_weight (`ctx`), --label-smoothing (`ctx.cfg`).

    `scale` makes the update depend only on the global batch, however it is split: DDP averages gradients
    over W processes, so the local sum is multiplied by W (sum over the global batch, d2l's `l.sum()`),
    and additionally divided by the global batch size for --loss-reduction mean. `labels`: class indices, or
    soft targets [N, C] (--mixup / --cutmix; accuracy then counts the larger share)."""
    with ctx.accelerator.autocast():
        logits = ctx.model(images)
    losses = F.cross_entropy(logits.float(), labels, weight=ctx.class_weight, reduction="none",
                             label_smoothing=ctx.cfg.label_smoothing)
    correct = (logits.argmax(dim=1) == (labels.argmax(dim=1) if labels.ndim == 2 else labels)).sum()
    return losses.sum() * scale, losses.detach(), correct


def train_one_epoch(ctx: StepContext, batches, state: TrainState, *, steps: int, preempt: PreemptionFlag,
                    checkpointer: Checkpointer | None) -> dict:
    """Runs optimizer steps state.step_in_epoch..steps-1 of state.epoch (steps = optimizer steps per epoch),
    advancing `state` (steps, sums) as it goes, and returns the epoch's training metrics. Checkpoints every
    --save-every steps through `checkpointer`. Stops early when any rank got a preemption signal (then
    preempt.stopping is True on every rank, all after the same step)."""
    cfg, accelerator, monitor, start = ctx.cfg, ctx.accelerator, ctx.monitor, state.step_in_epoch
    world = accelerator.num_processes
    scale = world / (cfg.batch_size if cfg.loss_reduction == "mean" else 1)
    probe = start_epoch(ctx.model, cfg, state.epoch, accelerator)     # train mode; --probe-epochs: the probe phase
    timer = StepTimer(min(cfg.timing_warmup, max(0, steps - start - 1)), accelerator.device)
    bar = tqdm(total=steps, initial=start, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", leave=False,
               disable=True if not accelerator.is_main_process else None,  # None: off when not a tty
               dynamic_ncols=True)
    log = RunningLog(accelerator.device, cfg.log_every, monitor)
    epoch_start = time.perf_counter()
    distributed.relaxed()     # until every rank is past this epoch's first step (compiling, forking workers)
    timer.start()
    for step in range(start, steps):
        with sync_debug(accelerator.device, step - start):
            set_lr(ctx.optimizer, lr_factor(cfg, state.global_step - state.skipped_steps, steps), probe and world > 1)
            optimizer_step(ctx, batches, state.sums, timer, scale)
            state.step_in_epoch, state.global_step = step + 1, state.global_step + 1
            note_skipped_step(state, accelerator, monitor)
            timer.step_done()
        bar.update(1)
        monitor.progress(state, steps, timer, cfg)       # one plain line every --log-every-s in non-terminal logs
        if cfg.save_every and state.global_step % cfg.save_every == 0 and step + 1 < steps:
            checkpointer.save(state)
        # Tiny asynchronous all-reduces, each read one step later (no host-device sync in the step): the
        # running sums every --log-every steps, and the vote by which every rank learns, all at the same
        # step, whether any rank was asked to stop.
        with sync_debug(accelerator.device, step - start):
            log.step(state)
            stop = preempt.poll(accelerator.device)
        if step == start + 1:    # this poll read the first step's vote: every rank is past that step
            distributed.steady()     # (docs/cluster.md "Timeouts"); from here a long wait is a hung rank
        if stop:
            break
    log.flush()
    preempt.settle()
    bar.close()
    return epoch_metrics(state.sums, timer, epoch_start, cfg.batch_size, accelerator)


class RunningLog:
    """train/loss and train/acc every --log-every steps, over all ranks: the running sums go through an
    asynchronous all-reduce (distributed.AsyncReduce) that is read one step later, when the device has long
    finished it. A blocking all-reduce here would drain the pipeline every --log-every steps."""

    def __init__(self, device: torch.device, every: int, monitor):
        self.reduce, self.every, self.monitor, self.at = distributed.AsyncReduce(device), every, monitor, None

    def step(self, state: TrainState) -> None:
        self.flush()
        if state.global_step % self.every == 0:
            self.reduce.start(state.sums.clone())
            self.at = state.global_step

    def flush(self) -> None:
        """Log the reduction in flight, if any (waits for it)."""
        totals = self.reduce.result()
        if totals is not None:
            loss_sum, correct_sum, n = totals
            self.monitor.scalars({"train/loss": loss_sum / n, "train/acc": correct_sum / n}, self.at)


def sync_debug(device: torch.device, step_in_run: int):
    """FINETUNE_SYNC_DEBUG=error|warn (CUDA only): torch.cuda.set_sync_debug_mode inside the step, so any
    implicit host-device synchronisation there raises (or warns). The first 2 steps of each epoch (cudnn
    autotuning, DDP bucket set-up) and the --log-every / --save-every work between steps are left out.
    The GPU test and bench/gpu_check.sh use it; fp16's GradScaler reads its inf check back on purpose."""
    mode = os.environ.get("FINETUNE_SYNC_DEBUG", "")
    if device.type != "cuda" or mode not in ("error", "warn") or step_in_run < 2:
        return nullcontext()
    return _sync_debug_mode(mode)


@contextmanager
def _sync_debug_mode(mode: str):
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def optimizer_step(ctx: StepContext, batches, sums: torch.Tensor, timer: StepTimer, scale: float) -> None:
    """One optimizer step over cfg.grad_accum micro-batches; adds [loss sum, correct, samples] to `sums`.
    Then updates ctx.ema (an AveragedModel, --ema-decay) from the new weights."""
    cfg, accelerator, model, optimizer, ema = ctx.cfg, ctx.accelerator, ctx.model, ctx.optimizer, ctx.ema
    for micro in range(cfg.grad_accum):
        images, labels = ctx.normalize(*timer.fetch(batches))
        # Only the last micro-batch all-reduces gradients; the others accumulate locally.
        sync = micro == cfg.grad_accum - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            loss, losses, correct = batch_loss(ctx, images, labels, scale)
            accelerator.backward(loss)
        sums[:2] += torch.stack([losses.sum(), correct.to(losses.dtype)]).to(sums)
        sums[2] += len(labels)       # a Python number: no host-to-device copy (a stream sync on CUDA)
    if cfg.clip_grad:
        accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None and not step_was_skipped(accelerator):    # a skipped step changed no weight
        ema.update_parameters(model)


def step_was_skipped(accelerator) -> bool:
    """fp16: did GradScaler skip the optimizer step just taken (inf/nan gradients)? Its inf check has
    already been read back by the scaler, so asking costs no further sync."""
    return accelerator.scaler is not None and accelerator.optimizer_step_was_skipped


def note_skipped_step(state: TrainState, accelerator, monitor) -> None:
    """fp16: GradScaler skips the optimizer step when the gradients overflowed (and lowers the scale). Such a
    step is not an update: it is counted (state.skipped_steps, TensorBoard train/skipped_steps, console) and
    the lr schedule advances by updates only."""
    if not step_was_skipped(accelerator):
        return
    state.skipped_steps += 1
    monitor.scalars({"train/skipped_steps": state.skipped_steps}, state.global_step)
    monitor.print(f"step {state.global_step}: fp16 gradients overflowed, optimizer step skipped "
                  f"({state.skipped_steps} so far; loss scale now {accelerator.scaler.get_scale():g})")


def epoch_metrics(sums: torch.Tensor, timer: StepTimer, epoch_start: float, batch_size: int, accelerator) -> dict:
    """The epoch's training metrics over all ranks: d2l's per-example loss and accuracy, and throughput."""
    world = accelerator.num_processes
    loss_sum, correct_sum, n = distributed.all_reduce(sums.tolist(), accelerator.device)
    data_s, compute_s = (x / world for x in distributed.all_reduce([timer.data, timer.compute],
                                                                    accelerator.device))
    counted = timer.steps * batch_size
    return dict(epoch_time=time.perf_counter() - epoch_start,
                train_loss=loss_sum / max(n, 1), train_acc=correct_sum / max(n, 1), train_samples=int(n),
                examples_per_sec=counted / (data_s + compute_s) if counted else 0.0,
                compute_examples_per_sec=counted / compute_s if counted else 0.0,
                data_wait_frac=data_s / (data_s + compute_s) if counted else 0.0)


def eval_batch(model, images, labels, accelerator, tta: str):
    """Per-sample losses and predictions; --tta flip: of the mean of the image's and its mirror's probabilities."""
    with accelerator.autocast():
        logits = model(images).float()
        if tta == "flip":
            probs = (logits.softmax(dim=1) + model(images.flip(3)).float().softmax(dim=1)) / 2
            return F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="none"), probs.argmax(dim=1)
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(dim=1)


@torch.no_grad()
def evaluate(model, loader, *, accelerator, normalize, num_classes: int = 2, split: str = "test",
             tta: str = "none") -> dict:
    """Each rank evaluates its disjoint share (see data.EvalStream); the loss sum and the confusion matrix
    are all-reduced. Returns `{split}_loss`, `_acc`, `_samples` and the per-class metrics (class_metrics).
    `model` must be the unwrapped module: DDP's forward would broadcast buffers, a collective that ranks
    with different numbers of eval batches would not match."""
    model.eval()
    c = num_classes
    sums = torch.zeros(1 + c * c, dtype=torch.float64, device=accelerator.device)   # loss sum, confusion
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = normalize(images, labels)
        losses, predicted = eval_batch(model, images, labels, accelerator, tta)
        sums[0] += losses.sum().to(sums)
        # Count into the confusion cells on the device: CUDA's bincount reads the largest index back to size
        # its output, a host sync every batch. The counts are exact in float64 whatever the order of adds.
        sums.index_put_((labels * c + predicted + 1,), torch.ones_like(losses, dtype=sums.dtype), accumulate=True)
    totals = distributed.all_reduce(sums.tolist(), accelerator.device)
    confusion = torch.tensor(totals[1:], dtype=torch.float64).view(c, c)
    n = int(confusion.sum())
    return dict(**{f"{split}_loss": totals[0] / max(n, 1), f"{split}_acc": confusion.trace().item() / max(n, 1),
                   f"{split}_samples": n}, **class_metrics(confusion, split),
                eval_time=time.perf_counter() - start)


def class_metrics(confusion: torch.Tensor, split: str) -> dict:
    """From a confusion matrix (rows: true class, columns: predicted): per-class precision and recall (0 where
    undefined), balanced accuracy (the mean recall) and the matrix itself as lists."""
    diag = confusion.diagonal()
    recall = diag / confusion.sum(dim=1).clamp_min(1)
    precision = diag / confusion.sum(dim=0).clamp_min(1)
    present = confusion.sum(dim=1) > 0       # a class absent from this split (e.g. --eval-limit) is left out
    return {f"{split}_balanced_acc": recall[present].mean().item() if present.any() else 0.0, f"{split}_precision": precision.tolist(),
            f"{split}_recall": recall.tolist(), f"{split}_confusion": confusion.long().tolist()}
