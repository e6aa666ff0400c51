"""Model and optimizer: the architecture (`--arch`, see finetune.arch), where its weights come from
(finetune.weights), the new head, what is frozen, and the SGD parameter groups of the d2l recipe (backbone at
lr, head at lr x head_lr_mult). Works the same for every architecture: the head is found, not named."""

from __future__ import annotations

import torch
from torch import nn

from . import UsageError, arch as archs, weights

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _load_backbone(model: nn.Module, sd: dict, head: str, cfg) -> None:
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


def _head_from_imagenet_class(new_head: nn.Linear, sd: dict | None, head: str, cfg, classes: list[str]) -> str:
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


def build_model(cfg, classes: list[str]) -> tuple[nn.Module, str]:
    """Returns the model and a plain sentence saying which weights it started from."""
    model = archs.create(cfg.arch)
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


def param_groups(model: nn.Module, cfg) -> list[dict]:
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


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def lr_factor(cfg, step: int, steps_per_epoch: int) -> float:
    """Multiplier of each group's initial lr at optimizer step `step` (0-based): warm-up, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / total)
        return 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())
    if cfg.schedule == "step":
        return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    # Computed per optimizer step, not via a scheduler through accelerator.prepare (which steps N times on N
    # processes).
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def load_trained(path: str, *, flag: str = "--model", ema: bool = False) -> tuple[nn.Module, dict]:
    """A run's model.pt (weights_only) -> (model in eval mode on the CPU, the saved dict). The architecture is
    the one model.pt names (train.py --arch), built without weights, its head sized to the classes; ema=True
    loads the EMA weights (train.py --ema-decay) instead of the raw ones. Problems are one-line UsageErrors
    naming `flag` and `path`."""
    import os
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file (train.py writes RUN_DIR/model.pt at the end of a run)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means "not a model.pt we can use"
        import pickle
        why = ("not a PyTorch file that loads with weights_only=True" if isinstance(e, pickle.UnpicklingError)
               else (str(e).strip().splitlines() or [""])[0][:120])
        raise UsageError(f"{flag} {path}: not a loadable model.pt ({type(e).__name__}: {why})") from None
    missing = [k for k in ("state_dict", "classes", "preprocess") if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise UsageError(f"{flag} {path}: not a train.py model.pt (missing {', '.join(missing)})")
    if ema and not saved.get("ema_state_dict"):
        raise UsageError(f"{flag} {path}: --ema, but this run kept no EMA weights (train.py --ema-decay D keeps them)")
    arch, classes = str(saved.get("arch", "resnet18")), list(saved["classes"])
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
