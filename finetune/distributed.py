"""Everything that knows about processes: building the Accelerator (DDP, precision, collective timeout),
who is who, cross-rank agreement and reductions. The training loop itself reads like one process.
(Preemption votes: finetune/preempt.py; the run directory's lock and rank files: finetune/rundir.py;
the numerics switches: finetune/precision.py.)"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import GradScalerKwargs, InitProcessGroupKwargs, gather_object, parse_flag_from_env

from . import UsageError
from .config import Config


def _cpu_has_fast_bf16() -> bool:
    """bf16 autocast on a CPU without native bf16 kernels (AVX512-BF16/AMX) is emulated and slower than
    fp32 (how much slower: docs/performance.md section 3). oneDNN knows whether the kernels exist."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_precision(requested: str, cuda_available: bool, bf16_native: bool, cpu_fast_bf16: bool) -> str:
    """--precision after `auto`: bf16 only where the device computes it natively (a GPU of compute capability
    8.0+, a CPU with AVX512-BF16/AMX), fp16 on older GPUs (a T4 or V100 only emulates bf16, and cuDNN has no
    bf16 convolutions there), fp32 on other CPUs."""
    if requested == "fp16" and not cuda_available:
        raise UsageError("--precision fp16 needs a GPU: fp16 autocast on CPU silently does nothing; "
                         "use --precision bf16 or no")
    if requested == "auto":
        if cuda_available:
            return "bf16" if bf16_native else "fp16"
        return "bf16" if cpu_fast_bf16 else "no"
    return requested


def resolve_precision(requested: str, device: torch.device | None = None) -> str:
    """choose_precision() for `device` (default: CUDA's current device when there is one). The bf16 probe
    reads the device's compute capability (including_emulation=False: no test allocation, which would open a
    context on that GPU); call it after this rank's device is set."""
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    bf16_native = cuda and requested == "auto" and torch.cuda.is_bf16_supported(including_emulation=False)
    cpu_fast_bf16 = not cuda and requested == "auto" and _cpu_has_fast_bf16()
    return choose_precision(requested, cuda, bf16_native, cpu_fast_bf16)


def check_one_device_per_rank(local_world_size: int, gpus: int, visible: str | None) -> None:
    """Accelerate gives local rank r the GPU r % (GPUs torch sees): more processes on a node than GPUs
    means two ranks share a device (NCCL: "Duplicate GPU detected", or twice the memory on one GPU)."""
    if gpus and local_world_size > gpus:
        seen = f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
        raise UsageError(f"{local_world_size} processes on this node but torch sees {gpus} GPU(s) ({seen}): "
                         f"two ranks would share a GPU; start one process per GPU "
                         f"(accelerate launch --num_processes / torchrun --nproc_per_node {gpus} per node)")


def setup(cfg: Config, dynamo_backend: str | None = None) -> Accelerator:
    """One Accelerator for every way in: python, accelerate launch, torchrun, srun. `dynamo_backend`: what
    finetune.launcher decided (default: inductor with --compile, else none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.debug and world > 1:
        raise UsageError(f"--debug runs one process; this launch started {world} (use python train.py --debug)")
    # cpu=... : without it, torchrun on a CPU-only machine would start N independent single-process runs.
    cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    if cfg.sync_bn and cpu:
        raise UsageError("--sync-bn needs GPUs: torch's SyncBatchNorm only runs on CUDA tensors "
                         "(use --freeze-bn for small per-process batches on CPU)")
    if not cpu:
        check_one_device_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count(),
                                  os.environ.get("CUDA_VISIBLE_DEVICES"))
    # NCCL's watchdog would abort the process on a timeout before our one-line explanation could print;
    # "2" (clean up only) aborts the communicators and raises in the waiting Python thread instead.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    TIMEOUTS.update(steady=cfg.collective_timeout, patient=max(cfg.startup_timeout, cfg.collective_timeout))
    TIMEOUTS["current"] = TIMEOUTS["patient"]
    # Start-up (rank 0 hashes the shards, the model is built, a checkpoint loaded) may take long: the group
    # starts with the patient timeout; the loop switches to the steady one after an epoch's first step.
    process_group = InitProcessGroupKwargs(timeout=timedelta(seconds=TIMEOUTS["patient"]))
    # The process state first: it sets this rank's device, so the precision probe reads this rank's GPU.
    state = PartialState(cpu=cpu, **process_group.to_kwargs())
    precision = resolve_precision(cfg.precision, state.device)
    if cfg.precision == "auto" and precision == "bf16" and state.device.type == "cpu":
        from .precision import measured_cpu_precision      # bf16 kernels exist; whether they win, timing says
        precision = measured_cpu_precision(cfg, state)
    scaler = GradScalerKwargs(init_scale=loss_scale_start(cfg, state.num_processes))
    return Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        dynamo_backend=dynamo_backend or ("inductor" if cfg.compile else "no"),
        kwargs_handlers=[process_group, scaler],
    )


def loss_scale_start(cfg: Config, world: int) -> float:
    """fp16's first loss scale. GradScaler starts at 2**16 for a loss of order 1 (a mean); each rank here
    backpropagates its micro-batch's loss times `scale` (finetune.loop: world x the summed loss for
    --loss-reduction sum), up to world x micro-batch times larger, and the fp16 gradients would overflow:
    every overflow skips an optimizer step while the schedule goes on. Start where the loss fits."""
    micro_batch = cfg.batch_size // (world * cfg.grad_accum)
    per_sample = world / (cfg.batch_size if cfg.loss_reduction == "mean" else 1)
    magnitude = max(1.0, per_sample * micro_batch)
    return float(2 ** max(0, 16 - math.ceil(math.log2(magnitude))))


# ------------------------------------------------------------------------------------------------------
# Collective timeouts: patient while a legitimate wait may be long, short in the steady state of training
# ------------------------------------------------------------------------------------------------------
TIMEOUTS = {"steady": 60, "patient": 1800, "current": 1800}   # seconds; set from the config by setup()


def _set_timeout(seconds: float) -> None:
    TIMEOUTS["current"] = seconds
    if dist.is_initialized():
        set_group_timeout(timedelta(seconds=seconds))


def set_group_timeout(timeout: timedelta, group=None) -> None:
    """The timeout of every collective started from now on in `group` (default: the default group, the one
    DDP's gradient all-reduce and our votes use), on the live group, gloo and NCCL. torch >= 2.12 has the
    public dist.set_timeout (ProcessGroup::setTimeout, which forwards to each backend); torch 2.2 .. 2.11 only
    have distributed_c10d._set_pg_timeout, which calls each gloo/NCCL backend's _set_default_timeout (2.12+
    keeps it as a deprecated alias of set_timeout). A separate group per timeout would not do: DDP's
    all-reduce, which a hung peer blocks first, always runs on the group DDP was built with."""
    if hasattr(dist, "set_timeout"):
        dist.set_timeout(timeout, group)
    else:
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def steady() -> None:
    """From now on a collective that waits longer than --collective-timeout fails (a dead or hung rank)."""
    _set_timeout(TIMEOUTS["steady"])


def relaxed() -> None:
    """From now on collectives may wait --startup-timeout (an epoch's first step: compilation, autotuning)."""
    _set_timeout(TIMEOUTS["patient"])


@contextlib.contextmanager
def patient():
    """Inside: collectives may wait --startup-timeout (rank 0 fsyncing a checkpoint, an evaluation
    compiling). Afterwards: the timeout from before."""
    previous = TIMEOUTS["current"]
    _set_timeout(TIMEOUTS["patient"])
    try:
        yield
    finally:
        _set_timeout(previous)


def node_rank() -> int:
    for var in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):   # torchrun / accelerate, then Slurm
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def describe(accelerator: Accelerator) -> dict:
    """Each rank learns who it is (`me`: the caller writes it, train.py to ranks/rank-N.json once the start is
    accepted -- finetune.rundir.write_rank_file; the launch tests read these) and every rank's device and
    host, for the first log line and the d2l-style 'on [devices]' line. Collective; writes nothing."""
    me = dict(rank=accelerator.process_index, local_rank=accelerator.local_process_index,
              world_size=accelerator.num_processes, node_rank=node_rank(), hostname=socket.gethostname(),
              device=str(accelerator.device), pid=os.getpid(),
              cpus=len(os.sched_getaffinity(0)))        # the CPUs this process may run on (Slurm binding)
    everyone = gather(me, accelerator.num_processes)
    return dict(me=me, world_size=accelerator.num_processes,
                nodes=len({(r["hostname"], r["node_rank"]) for r in everyone}),
                devices=[r["device"] for r in everyone],
                backend=dist.get_backend() if dist.is_initialized() else "none",
                precision=accelerator.mixed_precision)


def _digest(named_tensors, dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(name.encode())
        h.update(t.detach().to(dtype).cpu().numpy().tobytes())
    return h.hexdigest()


def param_digest(model: torch.nn.Module) -> str:
    return _digest(model.named_parameters(), torch.float32)


def agree(accelerator: Accelerator, problem: str | None) -> None:
    """Raise the same UsageError on every rank if any rank found a problem (so none is left waiting)."""
    problems = gather(problem, accelerator.num_processes)
    found = [p for p in problems if p]
    if found:
        raise UsageError(found[0])


def gather(obj, world: int) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] without a process group."""
    return gather_object([obj]) if world > 1 else [obj]


def all_reduce(values: list[float], device: torch.device, op=None) -> list[float]:
    """Sum (or `op`) a few numbers over all ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def shut_down() -> None:
    """Destroy the process group on an early exit (a usage error after set-up). A process that exits with it
    alive can die of SIGABRT at interpreter shutdown ("terminate called without an active exception", exit -6
    instead of 2: seen 1 run in 4 with gloo)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_failure(exc: BaseException) -> str | None:
    """A one-line explanation when `exc` is a collective that failed because another rank died or hung
    (gloo: connection reset / timed out; NCCL: watchdog timeout), else None."""
    text = str(exc)
    lost = isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection reset", "Timed out",
                                                     "pair closure")))    # gloo: "Application timeout caused pair closure"
    if not lost:
        return None
    rank = dist.get_rank() if dist.is_initialized() else "?"
    detail = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return (f"rank {rank}: a collective with the other ranks failed ({detail[:160]}); another process died, "
            f"hung or lost its network -- see its log, then restart with --resume auto")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on at least one (used to agree on stopping at a step boundary)."""
    return all_reduce([1.0 if flag else 0.0], device, op=dist.ReduceOp.MAX)[0] > 0


def sync_buffers(model: torch.nn.Module, world: int) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics). DDP broadcasts them at the START of
    each forward, so after the last training step every rank's statistics include its own last batch:
    without this, evaluation would measure W slightly different models while model.pt holds rank 0's."""
    if world > 1 and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def buffer_digest(model: torch.nn.Module) -> str:
    return _digest(model.named_buffers(), torch.float64)     # float64: num_batches_tracked counts stay exact


def peak_gpu_memory_gib(device: torch.device) -> float | None:
    """The largest peak GPU memory of any rank since the last call (then reset, so it is per epoch)."""
    if device.type != "cuda":       # not cuda.is_available(): ACCELERATE_USE_CPU=1 on a GPU node would open
        return None                 # a CUDA context on GPU 0 just to read a peak of zero
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return all_reduce([peak], device, op=dist.ReduceOp.MAX)[0]


class AsyncReduce:
    """An all-reduce of a few numbers whose result the host reads later, without blocking on the device.

    start(t) starts an all-reduce of `t` (a tensor it now owns) with async_op=True and, on CUDA, queues a
    non-blocking copy of the result into pinned host memory plus an event; result() waits for *that* event
    only. Read a step after it started, the device has long finished the step the numbers belong to while the
    next step is already queued, so the host stays ahead and the pipeline is never drained. One reduction in
    flight at a time; every rank must start them in the same order (they are collectives)."""

    def __init__(self, device: torch.device, op=None):
        self.device, self.op = device, op
        self._host = None           # pinned host memory the result is copied into (CUDA)
        self._pending = None        # (work or None, reduced tensor, event or None)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def start(self, t: torch.Tensor) -> None:
        assert self._pending is None, "read the previous result first"
        work = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(t, op=self.op or dist.ReduceOp.SUM, async_op=True)
        event = None
        if self.device.type == "cuda":
            if work is not None:
                work.wait()                 # on CUDA: the current stream waits for NCCL; the host does not
                work = None
            if self._host is None or self._host.shape != t.shape or self._host.dtype != t.dtype:
                self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending = (work, t, event)

    def result(self) -> list[float] | None:
        """The reduced numbers of the reduction in flight (None when none), waiting for it."""
        if self._pending is None:
            return None
        work, t, event = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()             # waits for that event only, not for work queued after it
            return self._host.tolist()
        return t.tolist()
