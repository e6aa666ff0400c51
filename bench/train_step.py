"""Train step: ours (finetune.loop.train_one_epoch -- DeviceNormalizer, batch_loss, accelerator.backward,
optimizer.step under an Accelerator, with its per-step timer, lr setting and preemption check) vs a bare
PyTorch loop with the same model, initial weights, batch, precision and memory format.

    .venv/bin/python bench/train_step.py                 # ~2-4 min on 2 CPU cores; --help for every flag
    .venv/bin/python bench/train_step.py --sweep         # + bare-loop img/s for fp32/bf16 x NCHW/channels_last

No data loading is timed: both sides cycle through the same few pre-built batches (ours gets uint8 batches
as the loader delivers them and normalises them inside the step, the bare loop gets already-normalised
float batches on the device -- so the bare loop does strictly less work). `--precision auto` and
`--channels-last` resolve exactly as in train.py (finetune.distributed.resolve_precision). Ours and the
bare loop alternate within each repeat; the table shows medians.
"""

from __future__ import annotations

import argparse
import copy
import time
import types

from _common import COLUMNS, goal_row, in_turn, machine, median, table

import torch
import torch.nn.functional as F

from finetune import distributed
from finetune.checkpoint import TrainState
from finetune.config import parse_config
from finetune.arch import IMAGENET_MEAN, IMAGENET_STD
from finetune.context import StepContext
from finetune.data.transforms import DeviceNormalizer
from finetune.loop import make_ema, train_one_epoch
from finetune.model import build_model, build_optimizer
from finetune.precision import configure_backends
from finetune.preempt import PreemptionFlag

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(n: int, batch: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g),
             torch.randint(0, 2, (batch,), generator=g)) for _ in range(n)]


def to_float(batches, device, channels_last: bool):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [(((x.float() - mean) / std).to(device).contiguous(memory_format=fmt), y.to(device)) for x, y in batches]


class BareLoop:
    """The textbook loop: autocast forward, summed cross-entropy, zero_grad/backward/step (GradScaler for fp16)."""

    def __init__(self, model, optimizer, precision: str, device):
        self.model, self.opt, self.device = model, optimizer, device
        self.dtype = DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def run(self, batches, steps: int) -> float:
        self.model.train()
        sync(self.device)
        t = time.perf_counter()
        for i in range(steps):
            x, y = batches[i % len(batches)]
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                out = self.model(x)
            loss = F.cross_entropy(out.float(), y, reduction="sum")
            self.opt.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                self.opt.step()
        sync(self.device)
        return steps * x.shape[0] / (time.perf_counter() - t)


class Ours:
    def __init__(self, model, optimizer, cfg, accelerator, normalize):
        self.model, self.opt, self.cfg, self.acc, self.normalize = model, optimizer, cfg, accelerator, normalize
        self.monitor = types.SimpleNamespace(scalars=lambda *a, **k: None, progress=lambda *a, **k: None)
        self.preempt = PreemptionFlag("")               # no signals: never stops
        self.ema = None                                 # --ema-decay: an AveragedModel updated every step

    def run(self, batches, steps: int) -> float:
        it = (batches[i % len(batches)] for i in range(steps * self.cfg.grad_accum))
        state = TrainState.fresh(self.acc.device)
        sync(self.acc.device)
        t = time.perf_counter()
        ctx = StepContext(self.model, self.opt, self.acc, self.cfg, self.normalize, self.monitor, ema=self.ema)
        train_one_epoch(ctx, it, state, steps=steps, preempt=self.preempt, checkpointer=None)
        sync(self.acc.device)
        return steps * self.cfg.batch_size / (time.perf_counter() - t)


def ema_cost(ours: Ours, batches, args) -> None:
    """--ema-decay: ms per optimizer step that train.py's EMA update adds (ours with and without it, taking
    turns repeat by repeat, medians compared)."""
    ema = make_ema(ours.acc.unwrap_model(ours.model), args.ema_decay)
    plain, with_ema = [], []
    for r in range(args.repeats):
        for name, e, rates in in_turn(r, [("no ema", None, plain), ("ema", ema, with_ema)]):
            ours.ema = e
            rates.append(ours.run(batches, args.steps))
            print(f"  repeat {r + 1}: ours, {name} {rates[-1]:8.2f} img/s", flush=True)
    ours.ema = None
    ms = [1000 * args.batch_size / median(rates) for rates in (plain, with_ema)]
    print(f"EMA (--ema-decay {args.ema_decay}): {ms[1] - ms[0]:+.2f} ms per step ({ms[0]:.1f} -> {ms[1]:.1f} ms, "
          f"{100 * (ms[1] / ms[0] - 1):+.1f}%)")


def sweep(args, device, classes):
    """Bare-loop img/s for each precision x memory format (the evidence for train.py's precision default)."""
    precisions = ["no", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    results = {}
    batches = make_batches(2, args.batch_size, args.image_size, 1)
    for r in range(args.repeats):
        for precision in precisions:
            for cl in (False, True):
                cfg = parse_config(["--data", "-", "--pretrained", "none", "--seed", "0"])
                torch.manual_seed(0)
                model, _ = build_model(cfg, classes)
                model = model.to(device, memory_format=torch.channels_last if cl else torch.contiguous_format)
                bare = BareLoop(model, build_optimizer(model, cfg), precision, device)
                fb = to_float(batches, device, cl)
                bare.run(fb, 1)                                       # warm-up
                rate = bare.run(fb, args.steps)
                results.setdefault((precision, cl), []).append(rate)
                print(f"  sweep repeat {r + 1}: {precision:4s} {'channels_last' if cl else 'NCHW':13s} "
                      f"{rate:7.2f} img/s", flush=True)
    base = results[("no", False)]
    rows = [{"precision": "fp32" if p == "no" else p, "memory format": "channels_last" if cl else "NCHW",
             "bare loop img/s (median)": f"{median(v):.2f}",
             "vs fp32 NCHW": f"{median([a / b for a, b in zip(v, base)]):.2f}x"}   # paired per repeat
            for (p, cl), v in results.items()]
    print()
    print(table(rows, ["precision", "memory format", "bare loop img/s (median)", "vs fp32 NCHW"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
                   help="as train.py --precision (auto resolves like train.py)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="as train.py --channels-last (its default)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--image-size", type=int, default=224, help="input size")
    p.add_argument("--steps", type=int, default=4, help="timed steps per repeat and side")
    p.add_argument("--repeats", type=int, default=3, help="repeats (ours and bare alternate)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (as train.py --compile)")
    p.add_argument("--sweep", action="store_true",
                   help="also time the bare loop for every precision x memory format (CPU: fp32, bf16)")
    p.add_argument("--sweep-only", action="store_true", help="only the sweep")
    p.add_argument("--goal", type=float, default=0.97, help="goal for ours / bare")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="also measure the per-step cost of train.py's --ema-decay D (ours with vs without it)")
    args = p.parse_args()

    flags = ["--data", "-", "--pretrained", "none", "--batch-size", str(args.batch_size),
             "--image-size", str(args.image_size), "--precision", args.precision, "--seed", "0",
             "--channels-last" if args.channels_last else "--no-channels-last"] + (["--compile"] if args.compile else [])
    cfg = parse_config(flags)
    classes = ["hotdog", "not-hotdog"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_backends(device, debug=False)   # as train.py
    print(machine())
    if args.sweep or args.sweep_only:
        print(f"sweep: batch {args.batch_size}, {args.image_size}px, {args.steps} steps x {args.repeats} repeats")
        sweep(args, device, classes)
        if args.sweep_only:
            return
        print()

    accelerator = distributed.setup(cfg)          # the real Accelerator of train.py (precision, compile)
    precision = accelerator.mixed_precision
    print(f"step: batch {args.batch_size}, {args.image_size}px, precision {precision} (--precision {args.precision}), "
          f"channels_last {cfg.channels_last}, compile {cfg.compile}; {args.steps} steps x {args.repeats} repeats")
    torch.manual_seed(0)
    model, _ = build_model(cfg, classes)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    bare_model = copy.deepcopy(model).to(device)
    ours_model, ours_opt = accelerator.prepare(model, build_optimizer(model, cfg))
    bare_opt = build_optimizer(bare_model, cfg)
    if cfg.compile:
        bare_model = torch.compile(bare_model)
    ours = Ours(ours_model, ours_opt, cfg, accelerator, DeviceNormalizer(device, cfg.channels_last))
    bare = BareLoop(bare_model, bare_opt, precision, device)

    batches = make_batches(2, args.batch_size, args.image_size, 1)
    if device.type == "cuda":
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
    float_batches = to_float(batches, device, cfg.channels_last)
    warm = 3 if cfg.compile else 1
    ours.run(batches, warm)
    bare.run(float_batches, warm)
    o, b = [], []
    for r in range(args.repeats):
        sides = [("ours", lambda: ours.run(batches, args.steps), o), ("bare", lambda: bare.run(float_batches, args.steps), b)]
        for name, fn, acc in in_turn(r, sides):
            acc.append(fn())
            print(f"  repeat {r + 1}: {name} {acc[-1]:8.2f} img/s", flush=True)
    print()
    print(table([goal_row(f"train step, {precision}, channels_last={cfg.channels_last} (img/s)", o, b,
                          args.goal, "img/s", fmt="{:.2f}")], COLUMNS))
    if args.ema_decay:
        ema_cost(ours, batches, args)


if __name__ == "__main__":
    main()
