"""`StepContext`: what every training step needs, built once per run and passed as one argument instead of
a dozen -- to finetune.loop (train_one_epoch, optimizer_step, batch_loss) and to the Checkpointer (which
saves its model, optimizer, scaler and EMA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from accelerate import Accelerator

from .config import Config


@dataclass
class StepContext:
    """The run's training objects. A new per-step ingredient (a recipe's criterion: mixup, label smoothing)
    becomes one more field here, read where it acts (finetune.loop.batch_loss for a loss)."""
    model: torch.nn.Module              # as accelerator.prepare returned it (DDP-wrapped on several processes)
    optimizer: torch.optim.Optimizer    # prepared too
    accelerator: Accelerator
    cfg: Config
    normalize: Callable                 # (uint8 images, labels) on the host -> normalised floats on the device
    monitor: Any                        # finetune.monitor.Monitor (scalars, print, progress)
    ema: Any = None                     # finetune.loop.HostCountEMA (--ema-decay), or None
    class_weight: torch.Tensor | None = None    # --class-balance loss: per-class weights of the loss, or None
