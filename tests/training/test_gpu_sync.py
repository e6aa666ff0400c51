"""No implicit host-device synchronisation inside a training step on a GPU: train.py runs with
FINETUNE_SYNC_DEBUG=error, i.e. torch.cuda.set_sync_debug_mode("error") around every step after the first
two of an epoch (the preemption vote is asynchronous, the step timer uses CUDA events). Skips on CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import run_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: set_sync_debug_mode only watches CUDA synchronisation")


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_no_sync_inside_the_step(shards, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    proc = run_train(["--data", shards, "--output-dir", tmp_path / "run", "--pretrained", "none",
                      "--epochs", "2", "--max-steps-per-epoch", "5", "--batch-size", "8", "--image-size", "64",
                      "--workers", "0", "--precision", precision, "--log-every", "1000"],
                     env={"FINETUNE_SYNC_DEBUG": "error"}, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "synchroniz" not in proc.stderr.lower(), proc.stderr[-4000:]
