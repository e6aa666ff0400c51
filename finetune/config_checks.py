"""train.py's cross-field option checks (each one line, exit 2, before anything is written) and --debug's
adjustments: what `finetune.config.parse_config` applies after reading flags and YAML. Imports no torch."""

from __future__ import annotations

import argparse
import importlib.util
import signal
from typing import TYPE_CHECKING

from common.extras import check as check_extra

from . import UsageError
from .recipe import check_recipe_options
from .trackers import parse_log_with

if TYPE_CHECKING:
    from .config import Config

UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def parse_signals(names: str) -> list:
    """--preempt-signals 'USR1,TERM' -> [signal.SIGUSR1, signal.SIGTERM]; a UsageError for an unknown signal
    or one no handler can catch (KILL, STOP) -- checked by parse_config, before anything is written."""
    result = []
    for name in filter(None, (n.strip().upper() for n in names.split(","))):
        full = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal, full, None)
        if not isinstance(sig, signal.Signals):
            raise UsageError(f"--preempt-signals: unknown signal '{name}'")
        if full in UNCATCHABLE:
            raise UsageError(f"--preempt-signals: {full} cannot be caught by any process; use USR1 or TERM")
        result.append(sig)
    return result


def check_config(cfg: Config, parser: argparse.ArgumentParser, given: set) -> None:
    """The cross-field checks, each one line (exit 2) before anything is written."""
    if cfg.scratch and cfg.pretrained not in ("imagenet", "none"):
        parser.error("--scratch trains from random init; drop --pretrained PATH")
    if cfg.scratch and cfg.freeze_backbone:
        parser.error("--scratch and --freeze-backbone contradict each other (a frozen random backbone)")
    if cfg.head_init != "xavier":
        prefix, _, num = cfg.head_init.partition(":")
        if prefix != "imagenet-class" or not num.isdigit() or not 0 <= int(num) < 1000:
            parser.error("--head-init: expected 'xavier' or 'imagenet-class:N' with 0 <= N < 1000")
    parse_log_with(cfg.log_with)     # a UsageError (one line, exit 2) before anything is written
    if not cfg.ema_decay < 1:
        parser.error(f"--ema-decay {cfg.ema_decay}: must be below 1 (e.g. 0.999), or 0 for off")
    if cfg.class_balance == "resample" and cfg.data_order != "random":
        parser.error("--class-balance resample draws samples at random: use it with --data-order random")
    if cfg.augment_with == "opencv" and cfg.decode_on == "device":
        parser.error("--augment-with opencv is for the loader workers (--decode-on cpu); with --decode-on device "
                     "the GPU decodes, crops and flips")
    check_batch_and_loader(cfg, parser, given)
    for module in ("simplejpeg", "cv2") if cfg.augment_with == "opencv" else ():
        check_extra(module, "--augment-with opencv")    # one line now, not a loader worker's traceback later
    parse_signals(cfg.preempt_signals)
    check_recipe_options(cfg)


def check_batch_and_loader(cfg: Config, parser: argparse.ArgumentParser, given: set) -> None:
    """--per-gpu-batch against --batch-size / --loss-reduction; --loader dali against the options that belong
    to the torchvision path."""
    if cfg.per_gpu_batch and "batch_size" in given:
        parser.error("--per-gpu-batch sets the global batch (x the number of processes): drop --batch-size")
    if cfg.per_gpu_batch and cfg.loss_reduction != "sum":
        parser.error("--per-gpu-batch keeps the recipe's per-sample lr, which needs --loss-reduction sum; with mean, "
                     "set --batch-size and scale --lr yourself")
    if cfg.loader != "dali":
        return
    for bad, why in ((cfg.decode_on != "cpu", "--decode-on device (DALI decodes on the GPU itself)"),
                     (cfg.augment_with != "torchvision", "--augment-with opencv (DALI crops and flips itself)"),
                     (cfg.class_balance == "resample", "--class-balance resample (use --class-balance loss)"),
                     (cfg.data_order != "random", "--data-order sequential (DALI reads in random order)")):
        if bad:
            parser.error(f"--loader dali does not take {why}; use --loader torchvision for it")
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        parser.error("--loader dali needs NVIDIA DALI, which is not installed: pip install 'hotdog-finetune[dali]' "
                     "(i.e. pip install nvidia-dali-cuda130), or use --loader torchvision")


DEBUG = dict(epochs=2, batch_size=8, image_size=112,      # anomaly mode is slow: keep it small
             max_steps_per_epoch=3, eval_limit=16, workers=0, precision="no", data_order="sequential")


def apply_debug(cfg: Config, given: set) -> None:
    """--debug: a small deterministic smoke run. Every option the user gave (flag or YAML) keeps its value;
    the precision counts as given (the smoke run's fp32 beats accelerate's mixed_precision)."""
    for name, value in DEBUG.items():
        if name not in given and not (name == "data_order" and cfg.loader == "dali"):   # DALI: random order only
            setattr(cfg, name, value)
    if "timing_warmup" not in given:
        cfg.timing_warmup = min(cfg.timing_warmup, 1)
    given.add("precision")
