"""The GPU-path defects of a first real cluster run, tested as far as a CPU allows: fp16's first loss scale
and skipped steps, patient vs steady collective timeouts, per-epoch peak GPU memory over ranks, and nvjpeg
failures that are not bad images. (The GPU-only halves are in bench/gpu_check.sh.)"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torchvision

import faults
from conftest import TINY, read_json, run_train
from finetune import distributed
from finetune.data import device_decode as data
from finetune.checkpoint import TrainState
from finetune.config import parse_config
from finetune.loop import note_skipped_step

FP16_MAX = 65504.0


@pytest.mark.parametrize("world, batch, reduction, expected", [(8, 128, "sum", 2 ** 9), (1, 128, "sum", 2 ** 9),
                                                              (2, 8, "sum", 2 ** 13), (8, 128, "mean", 2 ** 16)])
def test_fp16_loss_scale_starts_where_the_loss_fits(world, batch, reduction, expected):
    cfg = parse_config(["--data", "x", "--batch-size", str(batch), "--loss-reduction", reduction])
    assert distributed.loss_scale_start(cfg, world) == expected


def test_default_scale_would_overflow_fp16_gradients_ours_does_not():
    """The d2l loss (W x the summed loss of 16 images per rank, W = 8): its gradients times GradScaler's
    default 65536 exceed fp16's range -- every such step is skipped -- and times our start they do not."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 2, (16,))
    (8 * torch.nn.functional.cross_entropy(model(x), y, reduction="sum")).backward()
    largest = max(p.grad.abs().max().item() for p in model.parameters())
    start = distributed.loss_scale_start(parse_config(["--data", "x"]), 8)
    assert largest * 65536 > FP16_MAX and largest * start < FP16_MAX, (largest, start)


def test_setup_hands_the_start_scale_to_accelerate(monkeypatch):
    cfg = parse_config(["--data", "x", "--precision", "no"])
    acc = distributed.setup(cfg)
    assert acc.scaler_handler.init_scale == distributed.loss_scale_start(cfg, 1) == 2 ** 9


def test_a_skipped_step_is_counted_logged_and_not_an_update():
    logged, printed = {}, []
    monitor = types.SimpleNamespace(scalars=lambda values, step: logged.update(values),
                                    print=lambda line: printed.append(line))
    state = TrainState.fresh(torch.device("cpu"))
    state.global_step = 7
    scaler = types.SimpleNamespace(get_scale=lambda: 256.0)
    note_skipped_step(state, types.SimpleNamespace(scaler=scaler, optimizer_step_was_skipped=True), monitor)
    assert state.skipped_steps == 1 and logged == {"train/skipped_steps": 1}
    assert "step 7: fp16 gradients overflowed, optimizer step skipped" in printed[0] and "256" in printed[0]
    note_skipped_step(state, types.SimpleNamespace(scaler=scaler, optimizer_step_was_skipped=False), monitor)
    note_skipped_step(state, types.SimpleNamespace(scaler=None, optimizer_step_was_skipped=True), monitor)
    assert state.skipped_steps == 1
    saved = state.to_checkpoint()
    assert saved["skipped_steps"] == 1


def test_patient_timeout_inside_steady_outside():
    distributed.TIMEOUTS.update(steady=60, patient=1800, current=1800)
    distributed.steady()
    with distributed.patient():
        assert distributed.TIMEOUTS["current"] == 1800
    assert distributed.TIMEOUTS["current"] == 60
    distributed.relaxed()
    with distributed.patient():
        pass
    assert distributed.TIMEOUTS["current"] == 1800          # back to what it was before


@pytest.mark.slow
def test_slow_checkpoint_write_is_not_a_dead_rank(shards, imagenet_like, tmp_path):
    """Rank 0 takes 6 s to write each checkpoint (a slow shared filesystem) while the steady timeout is 3 s:
    the other rank waits patiently and the run finishes. With one 3 s timeout it would fail at the barrier."""
    run_dir = tmp_path / "run"
    run_train(["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, "--epochs", "2",
               "--max-steps-per-epoch", "2", "--eval-limit", "4", "--collective-timeout", "3",
               "--startup-timeout", "120", *TINY], procs=2, env=faults.env(FINETUNE_TEST_SAVE_DELAY_S=6), timeout=400)
    assert [e["epoch"] for e in read_json(run_dir / "metrics.json")["epochs"]] == [1, 2]


def test_peak_gpu_memory_is_the_largest_rank_and_reset_per_epoch(monkeypatch):
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(1))
    monkeypatch.setattr(distributed, "all_reduce", lambda values, device, op=None: [max(values + [5.0])])
    assert distributed.peak_gpu_memory_gib(torch.device("cuda", 0)) == 5.0 and resets == [1]
    assert distributed.peak_gpu_memory_gib(torch.device("cpu")) is None and resets == [1]   # a CPU rank


def test_nvjpeg_failures_other_than_bad_images_are_warned_once(monkeypatch):
    def failing(message):
        def decode_jpeg(*a, **k):
            raise RuntimeError(message)
        return decode_jpeg
    cuda = torch.device("cuda")
    monkeypatch.setattr(data, "_warned", set())
    monkeypatch.setattr(data, "decode_jpeg", failing("nvjpeg: NVJPEG_STATUS_BAD_JPEG"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data._gpu_decode(torch.zeros(4, dtype=torch.uint8), cuda) is None      # a bad image: silent
    monkeypatch.setattr(data, "decode_jpeg", failing("CUDA error: out of memory"))
    with pytest.warns(RuntimeWarning, match="nvjpeg failed \\(CUDA error: out of memory\\); decoding on the CPU"):
        assert data._gpu_decode(torch.zeros(4, dtype=torch.uint8), cuda) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data._gpu_decode(torch.zeros(4, dtype=torch.uint8), cuda)                   # once only
