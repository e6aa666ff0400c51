"""Training recipes (`--recipe d2l|modern`): which defaults a recipe sets, the optimizer's parameter groups
(no weight decay on norms and biases, layer-wise lr decay), the lr schedule as a pure function of the
optimizer step, LP-FT's probe phase (`--probe-epochs`), and the steps of an epoch (`--epoch-steps`).

`d2l` changes nothing: the book's SGD recipe. `modern` sets the values of MODERN for every option the user did
not give (flag or --config YAML): an explicit option always wins. No torch at import: config.py calls
apply_recipe() before torch is loaded."""

from __future__ import annotations

import math

from . import UsageError

# What --recipe modern sets (docs/guide.md "Recipes"; measured in docs/experiments.md).
MODERN = dict(
    optimizer="adamw",          # decoupled weight decay
    lr=3e-4,                    # the top backbone layer's lr; lower layers x layer_decay per layer
    weight_decay=0.05,
    decay_norm_bias=False,      # no decay on normalisation weights and biases
    batch_size=32,              # 11 steps per epoch on 341 images, not 2
    epoch_steps="ceil",         # every training image once per epoch
    schedule="cosine",
    warmup_epochs=1.0,
    label_smoothing=0.1,
    layer_decay=0.85,
    augment_policy="trivialaugment",
    drop_path=0.1,              # timm backbones only
    ema_decay=0.9,              # evaluated alongside (ema_test_acc); ~10-step memory for runs of ~50-150 steps
    loss_reduction="mean",
)


def apply_recipe(cfg, given: set) -> None:
    """Set the recipe's values for the options not in `given` (those the user set win)."""
    if cfg.recipe == "d2l":
        return
    for name, value in MODERN.items():
        if name in given:
            continue
        if name == "drop_path" and not cfg.arch.startswith("timm:"):
            continue                # torchvision models take no drop_path_rate
        setattr(cfg, name, value)


def check_recipe_options(cfg) -> None:
    """Combinations that cannot work: one line each (UsageError)."""
    if cfg.augment_policy != "none" and (cfg.loader != "torchvision" or cfg.decode_on != "cpu"
                                         or cfg.augment_with != "torchvision"):
        raise UsageError(f"--augment-policy {cfg.augment_policy} runs in the torchvision loader workers: use it "
                         f"with --loader torchvision --decode-on cpu --augment-with torchvision")
    if cfg.drop_path and not cfg.arch.startswith("timm:"):
        raise UsageError(f"--drop-path is for timm backbones (--arch timm:NAME), not {cfg.arch}")
    if cfg.probe_epochs and (cfg.freeze_backbone or cfg.scratch):
        raise UsageError("--probe-epochs trains the head first, then everything: not with --freeze-backbone "
                         "or --scratch")
    if cfg.layer_decay <= 0 or cfg.layer_decay > 1:
        raise UsageError(f"--layer-decay {cfg.layer_decay}: expected 0 < D <= 1 (1: off)")
    if (cfg.mixup or cfg.cutmix) and cfg.batch_size < 2:
        raise UsageError("--mixup / --cutmix mix each sample with another one of its batch: batch size >= 2")


# ------------------------------------------------------------------------------------------------------
# Steps per epoch, and the note on large batches
# ------------------------------------------------------------------------------------------------------
def steps_per_epoch(num_samples: int, batch_size: int, rounding: str) -> int:
    """'floor' (d2l): whole batches only, the remainder unseen that epoch; 'ceil': every image once (the
    random stream resamples, so the last batch is full too)."""
    return -(-num_samples // batch_size) if rounding == "ceil" else num_samples // batch_size


def batch_note(num_samples: int, batch_size: int, steps: int) -> str | None:
    """A line for the start of a run when one batch is more than a tenth of the training set."""
    if batch_size * 10 <= num_samples:
        return None
    return (f"note: batch {batch_size} is {batch_size / num_samples:.0%} of the {num_samples} training images: "
            f"{steps} optimizer step(s) per epoch; a smaller --batch-size takes more, smaller steps")


# ------------------------------------------------------------------------------------------------------
# Parameter groups: head / backbone, layer-wise lr decay, no decay on norms and biases
# ------------------------------------------------------------------------------------------------------
def layer_ids(model) -> tuple[dict, int]:
    """({parameter name: layer index}, number of layers), input side first. timm models: their own group
    matcher (timm.models.group_parameters, as timm.optim.param_groups_layer_decay uses it); any other model:
    the order of its modules, one layer per distinct two-level name prefix (resnet: conv1, layer1.0, ...)."""
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters
        ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        known = dict(ids)
        top = max(known.values()) + 1 if known else 1
        return {n: known.get(n, top - 1) for n, _ in model.named_parameters()}, top
    prefixes: dict[str, int] = {}
    ids = {}
    for name, _ in model.named_parameters():
        prefix = ".".join(name.split(".")[:-1][:2])
        ids[name] = prefixes.setdefault(prefix, len(prefixes))
    return ids, max(len(prefixes), 1)


def param_groups(model, cfg) -> list[dict]:
    """Groups keyed by (head or layer, decay or not): lr = cfg.lr x layer_decay ** (top layer - layer),
    the head at cfg.lr x head_lr_mult; weight decay 0 for norms and biases unless --decay-norm-bias.
    Each group carries `initial_lr` (the schedule multiplies it) and `is_head` (the probe phase)."""
    from .arch import find_head
    from .model import no_decay_names
    head = find_head(model) + "."
    exempt = set() if cfg.decay_norm_bias else no_decay_names(model)
    ids, _ = layer_ids(model)
    top = max((i for n, i in ids.items() if not n.startswith(head)), default=0)    # the backbone's last layer
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head, no_decay = name.startswith(head), name in exempt
        key = f"{'head' if is_head else f'layer{ids[name]}'}{'_no_decay' if no_decay else ''}"
        if key not in groups:
            lr = cfg.lr * (cfg.head_lr_mult if is_head else cfg.layer_decay ** (top - ids[name]))
            groups[key] = dict(name=key, params=[], lr=lr, initial_lr=lr, is_head=is_head,
                               weight_decay=0.0 if no_decay else cfg.weight_decay)
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(model, cfg):
    """--optimizer sgd (d2l: SGD, one backbone group unless --layer-decay) or adamw (decoupled weight decay)."""
    import torch

    from . import model as models
    if cfg.scratch or (cfg.layer_decay == 1 and cfg.optimizer == "sgd"):
        return models.build_optimizer(model, cfg)       # the d2l groups, unchanged
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# ------------------------------------------------------------------------------------------------------
# The lr schedule: a pure function of the optimizer step (resume lands on the same value)
# ------------------------------------------------------------------------------------------------------
def warmup_steps(cfg, steps_per_epoch_: int) -> int:
    return cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch_)


def lr_factor(cfg, step: int, steps_per_epoch_: int) -> float:
    """Multiplier of each group's initial lr at optimizer step `step` (0-based): linear warm-up over
    --warmup-steps (or --warmup-epochs), then --schedule (cosine: to 0 at the last step of --epochs)."""
    warm = warmup_steps(cfg, steps_per_epoch_)
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch_ - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / total)))
    if cfg.schedule == "step":
        return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch_))
    return 1.0


# ------------------------------------------------------------------------------------------------------
# LP-FT: the probe phase follows from the epoch (TrainState.epoch), so a resume lands in the right phase
# ------------------------------------------------------------------------------------------------------
def probing(cfg, epoch: int) -> bool:
    return epoch < cfg.probe_epochs


def enter_phase(model, cfg, epoch: int, world: int) -> bool:
    """Before an epoch: in the probe phase (epoch < --probe-epochs) the backbone's parameters get
    requires_grad False (one process; with several, DDP needs every parameter's gradient, so set_lr gives the
    backbone lr 0 instead: unchanged either way), after it True again. Returns whether this epoch probes
    (the caller keeps BatchNorm in eval mode then). `model`: the unwrapped module."""
    if not cfg.probe_epochs:
        return False
    from .arch import find_head
    probe = probing(cfg, epoch)
    head = find_head(model) + "."
    for name, p in model.named_parameters():
        if not name.startswith(head):
            p.requires_grad_(not probe or world > 1)
    return probe


def start_epoch(model, cfg, epoch: int, accelerator) -> bool:
    """The model's mode for an epoch: train, BatchNorm in eval under --freeze-bn / --freeze-backbone and in the
    probe phase, whose parameters enter_phase sets. Returns whether this epoch probes."""
    from .model import set_train_mode
    probe = bool(cfg.probe_epochs) and enter_phase(accelerator.unwrap_model(model, keep_torch_compile=False), cfg,
                                                   epoch, accelerator.num_processes)
    set_train_mode(model, cfg.freeze_bn or cfg.freeze_backbone or probe)
    return probe


def set_lr(optimizer, factor: float, backbone_frozen: bool = False) -> None:
    """Each group's lr = its initial lr x factor; 0 for the backbone's groups while `backbone_frozen`."""
    for group in optimizer.param_groups:
        frozen = backbone_frozen and not group.get("is_head", str(group.get("name", "")).startswith("head"))
        group["lr"] = 0.0 if frozen else group["initial_lr"] * factor
