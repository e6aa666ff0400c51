"""Everything that knows about processes: building the Accelerator (DDP, precision, collective timeout),
who is who, cross-rank agreement and reductions. The training loop itself reads like one process."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object

from . import UsageError, atomic_write_text


def _cpu_has_fast_bf16() -> bool:
    """bf16 autocast on a CPU without native bf16 kernels (AVX512-BF16/AMX) is emulated and slower than
    fp32 -- measured here on such a CPU: 10 -> 4 img/s. oneDNN knows whether the kernels exist."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str) -> str:
    cuda = torch.cuda.is_available()
    if requested == "fp16" and not cuda:
        raise UsageError("--precision fp16 needs a GPU: fp16 autocast on CPU silently does nothing; "
                         "use --precision bf16 or no")
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if _cpu_has_fast_bf16() else "no"
    return requested


def setup(cfg) -> Accelerator:
    """One Accelerator for every way in: python, accelerate launch, torchrun, srun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.debug and world > 1:
        raise UsageError(f"--debug runs one process; this launch started {world} (use python train.py --debug)")
    if cfg.sync_bn and not torch.cuda.is_available():
        raise UsageError("--sync-bn needs GPUs: torch's SyncBatchNorm only runs on CUDA tensors "
                         "(use --freeze-bn for small per-process batches on CPU)")
    precision = resolve_precision(cfg.precision)
    # cpu=... : without it, torchrun on a CPU-only machine would start N independent single-process runs.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        dynamo_backend="inductor" if cfg.compile else None,
        # A rank that died must not leave the others waiting for 30 minutes (the gloo/NCCL default).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))],
    )


def node_rank() -> int:
    for var in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):   # torchrun / accelerate, then Slurm
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def describe(accelerator: Accelerator, run_dir: Path) -> dict:
    """Each rank records who it is (ranks/rank-N.json; the launch tests read these) and all ranks learn
    every rank's device and host, for the first log line and the d2l-style 'on [devices]' line."""
    me = dict(rank=accelerator.process_index, local_rank=accelerator.local_process_index,
              world_size=accelerator.num_processes, node_rank=node_rank(), hostname=socket.gethostname(),
              device=str(accelerator.device), pid=os.getpid())
    write_rank_file(run_dir, me)
    everyone = gather(me, accelerator.num_processes)
    return dict(me=me, world_size=accelerator.num_processes,
                nodes=len({(r["hostname"], r["node_rank"]) for r in everyone}),
                devices=[r["device"] for r in everyone],
                backend=dist.get_backend() if dist.is_initialized() else "none",
                precision=accelerator.mixed_precision)


def write_rank_file(run_dir: Path, info: dict) -> None:
    """ranks/rank-N.json: who this rank is, and at the end a digest of its parameters (equal on all ranks
    when DDP kept them in sync)."""
    ranks = run_dir / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ranks / f"rank-{info['rank']}.json", json.dumps(info))


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


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


def collective_failure(exc: BaseException) -> str | None:
    """A one-line explanation when `exc` is a collective that failed because another rank died or hung
    (gloo: connection reset / timed out; NCCL: watchdog timeout), else None."""
    text = str(exc)
    lost = isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection reset", "Timed out")))
    if not lost:
        return None
    rank = dist.get_rank() if dist.is_initialized() else "?"
    detail = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return (f"rank {rank}: a collective with the other ranks failed ({detail[:160]}); another process died, "
            f"hung or lost its network -- see its log, then restart with --resume auto")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on at least one (used to agree on stopping at a step boundary)."""
    return all_reduce([1.0 if flag else 0.0], device, op=dist.ReduceOp.MAX)[0] > 0


def configure_backends(device: torch.device, debug: bool) -> None:
    """Numerics switches, in one place for train.py and the benchmarks. On CUDA: TF32 matmuls and
    convolutions, and cudnn autotuning (input sizes are fixed, so it tunes once) -- except under --debug,
    where autotuning stays off because the kernels it picks may differ from run to run."""
    if debug:
        torch.autograd.set_detect_anomaly(True)
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not debug
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
