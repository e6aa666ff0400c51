"""Model and optimizer: torchvision ResNet-18, where its weights come from, the new head, what is frozen,
and the SGD parameter groups of the d2l recipe (backbone at lr, head at lr x head_lr_mult)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from . import UsageError

HEAD = "fc"


def _imagenet_state_dict() -> dict:
    """torchvision's IMAGENET1K_V1 weights through its cache (TORCH_HOME), checksum-verified."""
    url = ResNet18_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as e:   # URLError is an OSError; a bad hash is a RuntimeError
        raise UsageError(f"could not get ImageNet weights ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         f"torchvision expects them at {cached} -- copy resnet18-f37072fd.pth there "
                         f"(from {url}) or pass --pretrained PATH (or --pretrained none)") from None


def _file_state_dict(path: str) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--pretrained {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means "not a state dict we can load"
        raise UsageError(f"--pretrained {path}: not a loadable state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # our own model.pt, or similar
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"--pretrained {path}: expected a dict of tensors (a ResNet-18 state_dict)")
    return sd


def _load_backbone(model: nn.Module, sd: dict, source: str) -> None:
    """Load everything but the head; any other missing or unexpected key is an error."""
    backbone = {k: v for k, v in sd.items() if not k.startswith(HEAD + ".")}
    result = model.load_state_dict(backbone, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD + ".")]
    if missing or result.unexpected_keys:
        bad = (["missing: " + ", ".join(missing[:3])] if missing else []) + \
              (["unexpected: " + ", ".join(result.unexpected_keys[:3])] if result.unexpected_keys else [])
        raise UsageError(f"--pretrained {source}: not a ResNet-18 state dict ({'; '.join(bad)})")


def build_model(cfg, classes: list[str]) -> tuple[nn.Module, str]:
    """Returns the model and a plain sentence saying which weights it started from."""
    model = resnet18(weights=None)
    sd = None
    if cfg.scratch or cfg.pretrained == "none":
        source = "random init (no pretrained weights)"
    elif cfg.pretrained == "imagenet":
        sd, source = _imagenet_state_dict(), "torchvision ImageNet weights (IMAGENET1K_V1)"
    else:
        sd, source = _file_state_dict(cfg.pretrained), f"pretrained weights from {cfg.pretrained}"
    if sd is not None:
        _load_backbone(model, sd, cfg.pretrained)

    # The new head (d2l: nn.Linear(512, 2) with xavier_uniform_ weights; bias keeps Linear's default init).
    old_head = model.fc
    model.fc = nn.Linear(old_head.in_features, len(classes))
    nn.init.xavier_uniform_(model.fc.weight)
    if cfg.head_init != "xavier":
        row = int(cfg.head_init.split(":")[1])
        if sd is None or "fc.weight" not in sd or sd["fc.weight"].shape[0] <= row:
            raise UsageError(f"--head-init {cfg.head_init}: needs pretrained weights with an ImageNet fc "
                             f"layer (--pretrained imagenet or PATH)")
        if "hotdog" not in classes:
            raise UsageError(f"--head-init {cfg.head_init}: the manifest has no 'hotdog' class ({classes})")
        with torch.no_grad():
            model.fc.weight[classes.index("hotdog")] = sd["fc.weight"][row]
            model.fc.bias[classes.index("hotdog")] = sd["fc.bias"][row]
        source += f"; head row '{'hotdog'}' from ImageNet class {row}"

    if cfg.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(HEAD + "."))
    return model, source


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """model.train(), except BatchNorm layers stay in eval mode (fixed running stats) under --freeze-bn
    (and --freeze-backbone: a frozen backbone should not drift through its running statistics either)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """Explicit SGD groups. Fine-tuning: backbone at lr, head at lr x head_lr_mult (d2l); --scratch: one group.
    --no-decay-norm-bias moves 1-d parameters (BatchNorm weights, biases) to weight_decay 0."""
    split_head = not cfg.scratch
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "head" if split_head and name.startswith(HEAD + ".") else ("backbone" if split_head else "all")
        no_decay = not cfg.decay_norm_bias and p.ndim <= 1
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
