"""Accelerate's own settings against train.py's flags.

`accelerate config`, its config file, `accelerate launch --mixed_precision / --dynamo_backend` and
slurm/finetune.sh's MIXED_PRECISION reach train.py as the environment variables ACCELERATE_MIXED_PRECISION and
ACCELERATE_DYNAMO_BACKEND (accelerate launch always sets both). The rule:

- a flag the user gave (--precision, --compile / --no-compile, on the command line or in --config YAML, or
  --debug's fp32) wins; when the launcher says otherwise, one line says which is used;
- else the launcher's fp16 / bf16 and its dynamo backend are used, with one line saying so;
- else train.py's defaults (--precision auto, no compile). The launcher's mixed_precision 'no' is also what
  accelerate launch sets when nothing was chosen, so it cannot tell a choice from none: it leaves
  --precision auto in charge (pass --precision no for fp32); the same for its dynamo backend 'no'.

No torch here: plain decisions, tested without processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import UsageError
from .config import Config

PRECISION_VAR, DYNAMO_VAR = "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND"
SOURCE = "accelerate's {what} (accelerate config / launch --{what} / {var})"


@dataclass
class Choice:
    precision: str                  # what finetune.distributed resolves: auto, no, fp16 or bf16
    dynamo_backend: str             # "no" or a torch.compile backend for Accelerator(dynamo_backend=...)
    notes: list[str] = field(default_factory=list)     # one line per setting the launcher decided or lost


def decide(cfg: Config, env=None) -> Choice:
    """The precision and compile backend of this run from cfg (and which options the user gave:
    cfg.explicit, set by finetune.config.parse_config) and the launcher's environment."""
    env = os.environ if env is None else env
    explicit = getattr(cfg, "explicit", frozenset())
    notes: list[str] = []
    precision = _precision(cfg.precision, "precision" in explicit, _read(env, PRECISION_VAR), notes)
    backend = _dynamo(bool(cfg.compile), "compile" in explicit, _read(env, DYNAMO_VAR), notes)
    return Choice(precision, backend, notes)


def _read(env, var: str) -> str | None:
    value = env.get(var, "").strip().lower()
    return value or None


def _precision(flag: str, given: bool, launcher: str | None, notes: list) -> str:
    source = SOURCE.format(what="mixed_precision", var=PRECISION_VAR)
    if launcher is None or launcher == flag:
        return flag
    if given:
        notes.append(f"precision: train.py's --precision {flag} is used, not {source}: {launcher}")
        return flag
    if launcher == "no":
        return flag      # accelerate's default as well as a choice: --precision auto decides
    if launcher not in ("fp16", "bf16"):
        raise UsageError(f"{source} is {launcher}, which train.py does not support: choose no, fp16 or bf16 "
                         f"there, or pass --precision")
    notes.append(f"precision: {launcher}, from {source} (--precision not given)")
    return launcher


def _dynamo(compile_flag: bool, given: bool, launcher: str | None, notes: list) -> str:
    source = SOURCE.format(what="dynamo_backend", var=DYNAMO_VAR)
    ours = "inductor" if compile_flag else "no"
    if launcher is None or launcher in ("no", ours):
        return ours
    if given:
        notes.append(f"compile: train.py's --{'' if compile_flag else 'no-'}compile ({ours}) is used, not "
                     f"{source}: {launcher}")
        return ours
    notes.append(f"compile: torch.compile with backend {launcher}, from {source} (--compile not given)")
    return launcher
