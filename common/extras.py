"""Optional packages: each belongs to one extra of pyproject.toml, and a missing one is one line that names
the feature, the package and the extra that installs it (a UsageError: exit 2, no traceback).

It lives in `common`, the bottom of the import graph, because both sides use it: data_prep/remote_io.py
(fsspec, aiohttp, s3fs) and finetune (trackers, export, the fast augmentation).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import UsageError

# import name -> (distribution to pip install, pyproject.toml extra that holds it)
OPTIONAL = {
    "mlflow": ("mlflow", "trackers"),
    "wandb": ("wandb", "trackers"),
    "fsspec": ("fsspec", "remote"),
    "aiohttp": ("aiohttp", "remote"),
    "s3fs": ("s3fs", "remote"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "onnxscript": ("onnxscript", "export"),
    "simplejpeg": ("simplejpeg", "fast-aug"),
    "cv2": ("opencv-python-headless", "fast-aug"),
    "nvidia.dali": ("nvidia-dali-cuda130", "dali"),
}


def missing(module: str, feature: str) -> UsageError:
    """The one-line error for `feature` (a flag, a URL...) when the optional `module` is not installed."""
    dist, extra = OPTIONAL[module]
    return UsageError(f"{feature} needs the optional package '{dist}' (the '{extra}' extra): "
                      f"pip install -e '.[{extra}]' in the project folder, or pip install {dist}")


def check(module: str, feature: str) -> None:
    """Refuse `feature` now, without importing `module` (cheap: for start-up and flag checks)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):                 # a parent package missing, or None in sys.modules
        found = False
    if not found:
        raise missing(module, feature)


def require(module: str, feature: str) -> ModuleType:
    """`import module`, or the one-line error when it is absent. An ImportError from *inside* an installed
    package (a broken dependency) is not an absent package: it keeps its own message."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
            raise missing(module, feature) from None
        raise
