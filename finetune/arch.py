"""Architectures by name: torchvision classification models (`resnet18`, `convnext_tiny`, `vit_b_16`, ...) and
timm models (`timm:convnext_nano`, `timm:tf_efficientnet_lite0`, ...). For any of them: build it without
weights, find its classification head, replace the head, and say how its pretrained weights expect images
to be preprocessed (mean/std, eval resize/crop, interpolation), from the weights' own metadata."""

from __future__ import annotations

import difflib
import functools

from torch import nn

from . import UsageError

TIMM = "timm:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    import torchvision.models as tvm
    return tuple(tvm.list_models(module=tvm))       # classification models only


@functools.cache
def _timm_names() -> tuple[str, ...]:
    import timm
    return tuple(timm.list_models())


def check_name(arch: str) -> None:
    """A one-line UsageError suggesting close names when `arch` is not a known model."""
    if arch.startswith(TIMM):
        name, names, prefix = arch[len(TIMM):], _timm_names(), TIMM
    else:
        name, names, prefix = arch, _torchvision_names(), ""
    if name in names:
        return
    close = [prefix + n for n in difflib.get_close_matches(name, names, n=4, cutoff=0.6)]
    if not prefix and name in _timm_names():
        close.insert(0, TIMM + name)
    hint = f"; did you mean {', '.join(close)}?" if close else \
        ("; timm models are named timm:NAME" if not prefix else "")
    raise UsageError(f"--arch {arch}: unknown {'timm' if prefix else 'torchvision'} model{hint} "
                     f"(see README: Backbones)")


def create(arch: str, drop_path: float = 0.0) -> nn.Module:
    """The architecture with its original (ImageNet, 1000-class) head and random weights; `drop_path`: a timm
    model's drop_path_rate (--drop-path)."""
    check_name(arch)
    if arch.startswith(TIMM):
        import timm
        extra = {"drop_path_rate": drop_path} if drop_path else {}
        return timm.create_model(arch[len(TIMM):], pretrained=False, **extra)
    import torchvision.models as tvm
    return tvm.get_model(arch, weights=None)


def find_head(model: nn.Module) -> str:
    """Dotted name of the final classification Linear: timm's pretrained_cfg['classifier'] where it names
    one, else the last nn.Linear of the model (torchvision's fc, classifier[-1], heads.head)."""
    declared = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(declared, str) and isinstance(_get(model, declared), nn.Linear):
        return declared
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"{type(model).__name__}: no final nn.Linear classification head to replace")
    return linears[-1]


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def replace_head(model: nn.Module, head: str, num_classes: int) -> nn.Linear:
    """Put a new Linear(in_features, num_classes) where `head` was; d2l's init: xavier_uniform_ weights,
    Linear's default bias init."""
    old = model.get_submodule(head)
    new = nn.Linear(old.in_features, num_classes)
    nn.init.xavier_uniform_(new.weight)
    parent, _, attr = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return new


def preprocessing(arch: str, image_size: int) -> dict:
    """How the arch's ImageNet weights expect images: mean/std, eval interpolation, and the eval resize
    for a centre crop of `image_size` (the weights' crop/resize ratio; d2l's square Resize then CenterCrop).
    ResNet-18: exactly d2l's Resize(256, 256) + CenterCrop(224) with ImageNet mean/std."""
    if arch.startswith(TIMM):
        import timm
        cfg = timm.get_pretrained_cfg(arch[len(TIMM):])
        cfg = cfg.to_dict() if cfg is not None else {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        crop_pct, interpolation = cfg.get("crop_pct", 0.875), cfg.get("interpolation", "bilinear")
    else:
        import torchvision.models as tvm
        try:
            t = tvm.get_model_weights(arch).DEFAULT.transforms()
        except (ValueError, KeyError, AttributeError):
            t = None                           # an architecture without published weights: ImageNet defaults
        mean, std = (t.mean, t.std) if t else (IMAGENET_MEAN, IMAGENET_STD)
        crop_pct = t.crop_size[0] / t.resize_size[0] if t else 0.875
        interpolation = t.interpolation.value if t else "bilinear"
    resize = round(image_size / crop_pct)
    return dict(resize=[resize, resize], crop=image_size, mean=[float(x) for x in mean],
                std=[float(x) for x in std], interpolation=str(interpolation))


def describe_preprocessing(spec: dict) -> str:
    mean = ", ".join(f"{x:.3f}" for x in spec["mean"])
    std = ", ".join(f"{x:.3f}" for x in spec["std"])
    return (f"preprocessing: eval resize {spec['resize'][0]}x{spec['resize'][1]} ({spec['interpolation']}) + "
            f"centre crop {spec['crop']}, train RandomResizedCrop {spec['crop']} + flip; "
            f"mean [{mean}] std [{std}]")
