"""Numerics: the backend switches of every run (`configure_backends`: TF32, cudnn autotuning, --debug's
determinism), and --precision auto on a CPU with native bf16 kernels (AVX512-BF16 / AMX): fp32 or bf16, by
measurement.

Native kernels do not make bf16 faster for every model: measured on one such CPU, bf16 was 1.8x fp32 for
ResNet-18 at 224 px in one process, but 0.71x for EfficientNet-Lite0 at 96 px in two processes. So at start
every rank times a few training steps of this run's model, micro-batch and image size in both precisions
(all ranks at once, as they will share the CPU while training), rank 0's timings decide for all, and the
answer is cached per (CPU model, arch, image size, micro-batch, channels_last, torch version, processes x
threads) in $XDG_CACHE_HOME/hotdog-finetune/cpu-precision.json (default ~/.cache/...): the next run with the
same key starts at once. The choice and both timings are printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from . import atomic_write_text
from .config import Config


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


BF16_MARGIN = 1.05      # bf16 rounds activations: take it only when it is clearly (>= 5%) faster
WARMUP, TIMED = 1, 2    # steps per precision: one to warm up (allocations, oneDNN primitives), then the best of 2


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hotdog-finetune" / "cpu-precision.json"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform
    return platform.processor() or platform.machine()


def cache_key(cfg: Config, micro_batch: int, local_procs: int) -> str:
    return (f"{cpu_model()} | {cfg.arch} | {cfg.image_size}px | micro-batch {micro_batch} | channels_last "
            f"{bool(cfg.channels_last)} | torch {torch.__version__} | {local_procs} x {torch.get_num_threads()} "
            f"threads")


def choose(rates: dict) -> str:
    """'bf16' when its examples/s beat fp32's by BF16_MARGIN, else 'no' (fp32)."""
    return "bf16" if rates["bf16"] >= BF16_MARGIN * rates["fp32"] else "no"


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):       # none yet, or damaged: measure again and rewrite it
        return {}
    return data if isinstance(data, dict) else {}


def decide(key: str, measure, *, is_main: bool, share, path: Path | None = None) -> tuple[str, dict, bool]:
    """(choice, {'fp32': examples/s, 'bf16': examples/s}, from_cache). Rank 0 reads the cache; on a miss every
    rank runs `measure()` (the same contention as training) and rank 0's rates decide. `share(obj)` returns
    rank 0's obj on every rank (finetune.distributed.gather(obj, world)[0])."""
    path = path or cache_path()
    cached = share(read_cache(path).get(key) if is_main else None)
    if cached:
        return cached["choice"], {k: cached[k] for k in ("fp32", "bf16")}, True
    rates = share(measure())
    choice = choose(rates)
    if is_main:
        entries = read_cache(path)
        entries[key] = dict(choice=choice, **rates, measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with contextlib.suppress(OSError):       # a read-only home: the decision stands, uncached
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True))
    return choice, rates, False


def measure(arch: str, micro_batch: int, image_size: int, channels_last: bool) -> dict:
    """Training examples/s of `arch` (random init) in fp32 and under bf16 autocast: SGD steps on random
    images, the precisions interleaved so that drifting load hits both alike; the best step of each."""
    from .arch import create
    model = create(arch).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    images = torch.randn(micro_batch, 3, image_size, image_size).to(memory_format=fmt)
    labels = torch.randint(0, 2, (micro_batch,))
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for i in range(WARMUP + TIMED):
        for name in best:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= WARMUP:
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(micro_batch / seconds, 2) for name, seconds in best.items()}


def measured_cpu_precision(cfg: Config, state) -> str:
    """finetune.distributed.setup's answer for --precision auto on a bf16-capable CPU; prints one line."""
    from .distributed import gather
    world = state.num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    micro_batch = max(1, cfg.batch_size // (world * cfg.grad_accum))
    key = cache_key(cfg, micro_batch, local)

    def timed():
        if state.is_main_process:
            print(f"precision auto: timing fp32 and bf16 training steps of {cfg.arch} (micro-batch {micro_batch}, "
                  f"{cfg.image_size} px), once per CPU model and setting; cached in {cache_path()}", flush=True)
        return measure(cfg.arch, micro_batch, cfg.image_size, cfg.channels_last)

    choice, rates, cached = decide(key, timed, is_main=state.is_main_process, share=lambda obj: gather(obj, world)[0])
    if state.is_main_process:
        print(f"precision auto: {'bf16' if choice == 'bf16' else 'fp32 (no)'} -- bf16 {rates['bf16']:.1f} vs fp32 "
              f"{rates['fp32']:.1f} examples/s per process{' (cached)' if cached else ''}", flush=True)
    return choice
