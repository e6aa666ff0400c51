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
}
DEFAULT_VARIANTS = "finetune,scratch,frozen,head934,lr"
DEFAULT_LRS = "1e-5,1e-4,5e-4,1e-3"          # finetune itself is the 5e-5 point
DEFAULT_SCRATCH_LRS = "1e-4,1e-3,5e-3"       # scratch itself is the 5e-4 point
# Flags the runner sets itself: the same for every variant, or per variant.
RESERVED = {"data": "--data", "output_dir": "--out", "name": "--out", "pretrained": "--pretrained",
            "seed": "--seed", "resume": "(compare starts every run fresh)"}
IMAGENET_FILE = "resnet18-f37072fd.pth"


# A usage mistake found before any run starts is the project's one UsageError (one line, exit code 2).
# PlanError is the same class under its old name, still raised by resolve_weights.
PlanError = UsageError


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


def imagenet_cache_file() -> Path:
    import torch
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE


def resolve_weights(arg: str) -> Weights:
    """'auto' (default): torchvision's cached ImageNet file if present, else no weights -- said plainly.
    'imagenet': must be cached or downloadable now (checked once here, not by every variant).
    'none': no weights. PATH: a ResNet-18 state dict (checked here the way train.py checks it)."""
    if arg in ("auto", "imagenet"):
        cached = imagenet_cache_file()
        if cached.is_file():
            return Weights(arg, "imagenet", None, True, f"torchvision ImageNet weights ({cached})")
        if arg == "auto":
            return Weights(arg, "none", f"{NO_WEIGHTS} (no {cached}; copy {IMAGENET_FILE} there, or pass "
                                        f"--pretrained PATH to a ResNet-18 ImageNet state dict)", False,
                           "none found")
        from finetune import UsageError
        from finetune.model import _imagenet_state_dict
        try:
            _imagenet_state_dict()          # downloads into the cache when online; one clear line when not
        except UsageError as e:
            raise PlanError(f"--pretrained imagenet: {e}") from None
        return Weights(arg, "imagenet", None, True, f"torchvision ImageNet weights ({cached})")
    if arg == "none":
        return Weights(arg, "none", f"{NO_WEIGHTS} (--pretrained none)", False, "none (--pretrained none)")
    from finetune import UsageError
    from finetune.model import _file_state_dict
    path = os.path.abspath(arg)
    try:
        sd = _file_state_dict(path)
    except UsageError as e:
        raise PlanError(str(e)) from None
    fc = sd.get("fc.weight")
    return Weights(arg, path, None, fc is not None and fc.shape[0] > 934, f"state dict {path}")


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
