"""Model and optimizer: the architecture (`--arch`, see finetune.arch), where its weights come from
(finetune.weights), the new head, what is frozen, and the SGD parameter groups of the d2l recipe (backbone at
lr, head at lr x head_lr_mult). Works the same for every architecture: the head is found, not named."""

from __future__ import annotations

import torch
from torch import nn

from . import UsageError, arch as archs, weights
from .config import Config

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _load_backbone(model: nn.Module, sd: dict, head: str, cfg: Config) -> None:
    """Load everything but the head; any other missing or unexpected key (or shape) is an error."""
    backbone = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
    try:
        result = model.load_state_dict(backbone, strict=False)
    except RuntimeError as e:        # size mismatches: another architecture's weights
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise UsageError(f"--pretrained {cfg.pretrained}: does not fit --arch {cfg.arch} ({detail[:160]})") from None
    missing = [k for k in result.missing_keys if not k.startswith(head + ".")]
    if missing or result.unexpected_keys:
        bad = (["missing: " + ", ".join(missing[:3])] if missing else []) + \
              (["unexpected: " + ", ".join(result.unexpected_keys[:3])] if result.unexpected_keys else [])
        raise UsageError(f"--pretrained {cfg.pretrained}: not a state dict of --arch {cfg.arch} ({'; '.join(bad)})")


def _head_from_imagenet_class(new_head: nn.Linear, sd: dict | None, head: str, cfg: Config, classes: list[str]) -> str:
    """d2l exercise 4: the 'hotdog' row of the new head starts as row N of the pretrained ImageNet head."""
    row = int(cfg.head_init.split(":")[1])
    old = sd.get(head + ".weight") if sd is not None else None
    if old is None or old.ndim != 2 or old.shape[0] <= row:
        raise UsageError(f"--head-init {cfg.head_init}: needs pretrained weights with an ImageNet classifier "
                         f"({head}) of more than {row} rows (--pretrained imagenet or PATH)")
    if "hotdog" not in classes:
        raise UsageError(f"--head-init {cfg.head_init}: the manifest has no 'hotdog' class ({classes})")
    with torch.no_grad():
        new_head.weight[classes.index("hotdog")] = old[row]
        new_head.bias[classes.index("hotdog")] = sd[head + ".bias"][row]
    return f"; head row 'hotdog' from ImageNet class {row}"


def build_model(cfg: Config, classes: list[str]) -> tuple[nn.Module, str]:
    """Returns the model and a plain sentence saying which weights it started from."""
    model = archs.create(cfg.arch, getattr(cfg, "drop_path", 0.0))
    head = archs.find_head(model)
    sd, source = weights.resolve(cfg.arch, "none" if cfg.scratch else cfg.pretrained)
    if sd is not None:
        _load_backbone(model, sd, head, cfg)
    new_head = archs.replace_head(model, head, len(classes))
    if cfg.head_init != "xavier":
        source += _head_from_imagenet_class(new_head, sd, head, cfg, classes)
    if cfg.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(head + "."))
    return model, source


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """model.train(), except BatchNorm layers stay in eval mode (fixed running stats) under --freeze-bn
    (and --freeze-backbone: a frozen backbone should not drift through its running statistics either)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that --no-decay-norm-bias exempts: every normalisation layer's (BatchNorm, LayerNorm,
    GroupNorm, and timm's variants of them) and every bias."""
    names = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    for prefix, m in model.named_modules():
        if isinstance(m, NORM_TYPES) or "norm" in type(m).__name__.lower():
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters(recurse=False))
    return names


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Explicit SGD groups. Fine-tuning: backbone at lr, head at lr x head_lr_mult (d2l); --scratch: one group.
    --no-decay-norm-bias moves normalisation weights and biases to weight_decay 0."""
    split_head = not cfg.scratch
    head = archs.find_head(model) + "."
    exempt = set() if cfg.decay_norm_bias else no_decay_names(model)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = ("head" if name.startswith(head) else "backbone") if split_head else "all"
        no_decay = name in exempt
        key = part + ("_no_decay" if no_decay else "")
        if key not in groups:
            lr = cfg.lr * (cfg.head_lr_mult if part == "head" else 1.0)
            groups[key] = dict(name=key, params=[], lr=lr, initial_lr=lr,
                               weight_decay=0.0 if no_decay else cfg.weight_decay)
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


# ------------------------------------------------------------------------------------------------------
# A finished run's model.pt (and what finetune.export embeds from it): every field checked before use
# ------------------------------------------------------------------------------------------------------
MAX_SIDE = 4096                # resize / crop sides: far above any ImageNet recipe, far below a 30 GB allocation
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")   # what torchvision resizes tensors with


def finite_number(value) -> bool:
    import math
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sides(value, square_ok: bool) -> bool:
    """[height, width] ints 1..MAX_SIDE, or (square_ok: crop's short form) one such int."""
    items = [value, value] if square_ok and isinstance(value, int) else value
    return (isinstance(items, (list, tuple)) and len(items) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_SIDE for x in items))


def preprocess_problem(spec) -> str | None:
    """None for a usable eval preprocessing spec (finetune.arch.preprocessing's), else 'FIELD: what is wrong'."""
    if not isinstance(spec, dict):
        return f"preprocess: expected a dict, found {type(spec).__name__}"
    checks = {"resize": (lambda v: _sides(v, False), f"[height, width], ints 1..{MAX_SIDE}"),
              "crop": (lambda v: _sides(v, True), f"an int or [height, width], ints 1..{MAX_SIDE}"),
              "mean": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(map(finite_number, v)),
                       "3 finite numbers (R, G, B)"),
              "std": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3
                      and all(finite_number(x) and x > 0 for x in v), "3 positive finite numbers (R, G, B)"),
              "interpolation": (lambda v: v in INTERPOLATIONS, " or ".join(INTERPOLATIONS))}
    for key, (ok, expected) in checks.items():
        if key not in spec:
            return f"preprocess.{key}: missing"
        if not ok(spec[key]):
            return f"preprocess.{key}: expected {expected}, found {spec[key]!r:.60}"
    return None


def classes_problem(classes) -> str | None:
    if (not isinstance(classes, (list, tuple)) or len(classes) < 2
            or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes)):
        return f"classes: expected a list of 2 or more distinct class names, found {classes!r:.60}"
    return None


def trained_fields_problem(saved: dict, ema: bool = False) -> str | None:
    """The first problem with a model.pt's fields (classes, preprocess, arch, the weights to load), or None.
    predict.py and finetune.export read model.pt only through load_trained, which calls this first."""
    from .weights import state_dict_problem
    problem = classes_problem(saved.get("classes")) or preprocess_problem(saved.get("preprocess"))
    if problem:
        return problem
    if not isinstance(saved.get("arch", "resnet18"), str):
        return f"arch: expected a name (train.py --arch), found {saved['arch']!r:.60}"
    key = "ema_state_dict" if ema else "state_dict"
    problem = state_dict_problem(saved[key])
    return f"{key}: {problem}" if problem else None


def load_trained(path: str, *, flag: str = "--model", ema: bool = False) -> tuple[nn.Module, dict]:
    """A run's model.pt (weights_only) -> (model in eval mode on the CPU, the saved dict). The architecture is
    the one model.pt names (train.py --arch), built without weights, its head sized to the classes; ema=True
    loads the EMA weights (train.py --ema-decay) instead of the raw ones. Problems (every field is checked
    before use: trained_fields_problem) are one-line UsageErrors naming `flag` and `path`."""
    saved = _load_model_pt(path, flag)
    kept = saved.get("ema_state_dict")
    if ema and (kept is None or (isinstance(kept, dict) and not kept)):
        raise UsageError(f"{flag} {path}: --ema, but this run kept no EMA weights (train.py --ema-decay D keeps them)")
    problem = trained_fields_problem(saved, ema)
    if problem:
        raise UsageError(f"{flag} {path}: not a usable train.py model.pt (field {problem})")
    arch, classes = saved.get("arch", "resnet18"), list(saved["classes"])
    try:
        model = archs.create(arch)
    except UsageError as e:
        raise UsageError(f"{flag} {path}: {e}") from None
    archs.replace_head(model, archs.find_head(model), len(classes))
    try:
        model.load_state_dict(saved["ema_state_dict" if ema else "state_dict"])
    except RuntimeError as e:
        raise UsageError(f"{flag} {path}: weights do not fit {arch} with {len(classes)} classes "
                         f"({str(e).splitlines()[0][:120]})") from None
    return model.eval(), saved


def _load_model_pt(path: str, flag: str) -> dict:
    """torch.load(weights_only=True) of a model.pt, and its required keys present; else one-line UsageError."""
    import os
    if not os.path.isfile(path):
        what = "not a regular file" if os.path.exists(path) else "no such file"
        raise UsageError(f"{flag} {path}: {what} (train.py writes RUN_DIR/model.pt at the end of a run)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means "not a model.pt we can use"
        raise UsageError(f"{flag} {path}: not a loadable model.pt ({weights.load_failure(e)})") from None
    missing = [k for k in ("state_dict", "classes", "preprocess") if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise UsageError(f"{flag} {path}: not a train.py model.pt (missing {', '.join(missing)})")
    return saved
