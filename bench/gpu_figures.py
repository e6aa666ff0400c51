"""In-process GPU figures for bench/gpu_check.py, one measurement kind per call (each call is one line of the
plan, run as its own process with its own timeout). Every result is printed as `RESULT {json}`; the
driver turns them into the FIG lines that docs/performance.md section 8 explains.

    python bench/gpu_figures.py sweep   --batch 256 --seconds 1.5   # bare loop: fp32/bf16/fp16 x NCHW/channels_last
    python bench/gpu_figures.py step    --batch 128 256 --seconds 2 --ema-decay 0.999   # ours vs bare, EMA cost
    python bench/gpu_figures.py compile --batch 256 --seconds 2      # ours under --compile: compile time, img/s
    python bench/gpu_figures.py loader  --shards DIR --augment-with opencv --workers 15 --batch 256

No data loading in sweep/step/compile (pre-built batches, bench/train_step.py's BareLoop and Ours); `loader`
is the loader alone: pinned uint8 batches arriving in this process from finetune.data.streams' TrainStream through
make_loader, as train.py wires them, nothing on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from _common import machine
from train_step import BareLoop, Ours, make_batches, to_float

import torch

from finetune import distributed
from finetune.config import parse_config
from finetune.data.manifest import load_manifest
from finetune.data.streams import TrainStream, make_loader
from finetune.data.transforms import DeviceNormalizer
from finetune.loop import make_ema
from finetune.model import build_model, build_optimizer
from finetune.precision import configure_backends

CLASSES = ["hotdog", "not-hotdog"]
SIZE = 224                                      # --image-size changes it (tests run small images on the CPU)


def result(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def steady(run, batch: int, seconds: float, warm: int = 3) -> float:
    """img/s of `run(steps) -> img/s` over a window of about `seconds`: `warm` steps first (cudnn autotuning,
    allocator), then 5 steps to size the window, then the window itself (run syncs the device at both ends)."""
    run(warm)
    steps = max(10, math.ceil(seconds * run(5) / batch))
    return run(steps)


def cfg_for(batch: int, precision: str, channels_last: bool, compile: bool = False):
    flags = ["--data", "-", "--pretrained", "none", "--batch-size", str(batch), "--image-size", str(SIZE),
             "--precision", precision, "--seed", "0", "--channels-last" if channels_last else "--no-channels-last"]
    return parse_config(flags + (["--compile"] if compile else []))


def bare_for(cfg, precision: str, device):
    torch.manual_seed(0)
    model, _ = build_model(cfg, CLASSES)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    return BareLoop(model, build_optimizer(model, cfg), precision, device)


def sweep(args, device) -> None:
    """Bare loop, no loader: every precision x memory format at each batch size."""
    for batch in args.batch:
        batches = make_batches(2, batch, SIZE, 1)
        for precision in ("no", "bf16", "fp16") if device.type == "cuda" else ("no",):
            for cl in (False, True):
                bare = bare_for(cfg_for(batch, "no", cl), precision, device)
                fb = to_float(batches, device, cl)
                rate = steady(lambda n: bare.run(fb, n), batch, args.seconds)
                result(kind="bare", batch=batch, precision="fp32" if precision == "no" else precision,
                       format="channels_last" if cl else "NCHW", img_s=rate)
                del bare, fb
                torch.cuda.empty_cache()


def ours_for(cfg, accelerator):
    torch.manual_seed(0)
    model, _ = build_model(cfg, CLASSES)
    model = model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    m, opt = accelerator.prepare(model, build_optimizer(model, cfg))
    return Ours(m, opt, cfg, accelerator, DeviceNormalizer(accelerator.device, cfg.channels_last))


def pinned(batch: int, device):
    batches = make_batches(2, batch, SIZE, 1)
    return [(x.pin_memory(), y.pin_memory()) for x, y in batches] if device.type == "cuda" else batches


def step(args, device) -> None:
    """Ours (train_one_epoch under train.py's Accelerator, --precision auto, channels_last) vs the bare loop
    on the same device, alternating 3 times; then ours with and without --ema-decay."""
    accelerator = distributed.setup(cfg_for(args.batch[0], "auto", True))   # one Accelerator per process
    precision = accelerator.mixed_precision
    for batch in args.batch:
        cfg = cfg_for(batch, "auto", True)
        ours, bare = ours_for(cfg, accelerator), bare_for(cfg, precision, device)
        u8, fb = pinned(batch, device), to_float(make_batches(2, batch, SIZE, 1), device, True)
        o, b = [], []
        for r in range(3):
            sides = [(o, lambda n: ours.run(u8, n)), (b, lambda n: bare.run(fb, n))]
            for acc, run in sides if r % 2 == 0 else sides[::-1]:
                acc.append(steady(run, batch, args.seconds / 3))
        ours_s, bare_s = sorted(o)[1], sorted(b)[1]
        result(kind="step", batch=batch, precision=precision, ours=ours_s, bare=bare_s,
               overhead_ms=1000 * batch * (1 / ours_s - 1 / bare_s))
        if args.ema_decay:
            ours.ema = make_ema(accelerator.unwrap_model(ours.model), args.ema_decay)
            with_ema = steady(lambda n: ours.run(u8, n), batch, args.seconds / 3)
            ours.ema = None
            result(kind="ema", batch=batch, decay=args.ema_decay, ours=ours_s, ours_ema=with_ema,
                   ms_per_step=1000 * batch * (1 / with_ema - 1 / ours_s))
        del ours, bare, u8, fb
        torch.cuda.empty_cache()


def compile_(args, device) -> None:
    """Ours with train.py's --compile (Accelerate's dynamo_backend=inductor): time to the first compiled step,
    then steady img/s. The eager figure is `step`'s (another process: one Accelerator per process)."""
    batch = args.batch[0]
    accelerator = distributed.setup(cfg_for(batch, "auto", True, compile=True))
    ours = ours_for(cfg_for(batch, "auto", True, compile=True), accelerator)
    u8 = pinned(batch, device)
    t = time.perf_counter()
    ours.run(u8, 2)
    first = time.perf_counter() - t
    rate = steady(lambda n: ours.run(u8, n), batch, args.seconds)
    result(kind="compile", batch=batch, precision=accelerator.mixed_precision, compile_s=first, img_s=rate)


def batches_of(args, device):
    """(iterator of training batches, prefetch depth in batches) of the path under test."""
    batch, workers = args.batch[0], args.workers
    if args.path == "dali":
        from finetune.data import dali                   # --loader dali (optional extra): what train.py runs on a GPU
        split = load_manifest(args.shards).train
        dali.build_indexes([split])
        spec = dali.DaliSpec(split, dali.index_paths(split), 0, 1, batch, SIZE, 0, 1000, workers,
                             device.index or 0 if device.type == "cuda" else None)
        return iter(dali.DaliTrainLoader(spec)), 2                 # DALI prefetches 2 batches
    stream = TrainStream(load_manifest(args.shards).train, rank=0, world_size=1, micro_batch=batch, accum=1,
                         steps=1 << 30, image_size=SIZE, seed=0, order="random", shuffle_buffer=1000,
                         augment_with=args.path)
    return iter(make_loader(stream, workers, pin_memory=device.type == "cuda")), workers * 4


def loader(args, device) -> None:
    """The loader alone: skip the first round (every worker's first batch lands at once), then count batches
    until the window holds >= 3x the prefetch depth (workers x prefetch_factor 4) and >= --seconds, or
    --max-seconds ran out (then the result says so)."""
    batch, workers = args.batch[0], args.workers
    it, depth = batches_of(args, device)
    if it is None:
        return
    for _ in range(workers + 2):
        next(it)
    n, t = 0, time.perf_counter()
    while (n < 3 * depth or time.perf_counter() - t < args.seconds) and time.perf_counter() - t < args.max_seconds:
        x, _ = next(it)
        n += 1
    if x.is_cuda:
        torch.cuda.synchronize()                    # DALI hands over device tensors: count them as done
    dt = time.perf_counter() - t
    result(kind="loader", path=args.path, batch=batch, workers=workers, img_s=n * batch / dt,
           batches=n, seconds=dt, depth=depth, steady=n >= 3 * depth, channels_last=x.is_contiguous(
               memory_format=torch.channels_last))


KINDS = {"sweep": sweep, "step": step, "compile": compile_, "loader": loader}


def main() -> None:
    global SIZE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("--batch", type=int, nargs="+", default=[256], help="per-GPU batch size(s)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed window per figure")
    p.add_argument("--ema-decay", type=float, default=0.0, help="step: also time ours with --ema-decay D")
    p.add_argument("--shards", default="", help="loader: shard directory (data_prep output)")
    p.add_argument("--path", default="torchvision", choices=("torchvision", "opencv", "dali"),
                   help="loader: train.py's --augment-with torchvision|opencv, or --loader dali")
    p.add_argument("--workers", type=int, default=8, help="loader: DataLoader workers")
    p.add_argument("--max-seconds", type=float, default=15.0, help="loader: stop the window after this long")
    p.add_argument("--image-size", type=int, default=SIZE, help="input size (224: the figures; smaller: tests)")
    args = p.parse_args()
    SIZE = args.image_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_backends(device, debug=False)          # cudnn.benchmark, TF32: as train.py
    print(machine(), flush=True)
    KINDS[args.kind](args, device)


if __name__ == "__main__":
    main()
