"""bench/gpu_check.sh on a CPU-only machine: the dry run lists every GPU-only check with its command, and
the plain run says there is no GPU and exits 0 (the checks themselves need GPUs)."""

from __future__ import annotations

import os
import subprocess

from conftest import PYTHON, REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"
CHECKS = ["bf16", "fp16-scaler", "precision-auto", "channels-last", "compile", "decode-device", "no-sync", "nccl",
          "one-context", "bn-buffers", "sync-bn", "fp16-sum", "throughput"]


def gpu_check(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": PYTHON, **(env or {})})


def test_dry_run_lists_every_check():
    for proc in (gpu_check("--dry-run"), gpu_check(env={"GPU_CHECK_DRY_RUN": "1"})):
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        for name in CHECKS:
            assert f"DRY-RUN {name}:" in out, (name, out)
        assert "--precision bf16" in out and "--precision fp16" in out and "--sync-bn" in out
        assert "--compile" in out and "--decode-on device" in out and "--channels-last" in out
        assert "--multi_gpu --num_processes 2" in out and "--loss-reduction sum" in out
        assert "nvidia-smi --query-compute-apps" in out and "final_buffer_sha256" in out
        assert "FINETUNE_SYNC_DEBUG=error" in out and "--image-size 224" in out
        assert "dry run: nothing was run" in out


def test_plain_run_without_a_gpu_says_so_and_exits_0():
    proc = gpu_check(env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert "no GPU on this machine" in proc.stdout and "PASS" not in proc.stdout


def test_bad_argument_is_one_line_exit_2():
    proc = gpu_check("--bogus")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "gpu_check.sh: unknown argument '--bogus' (--dry-run, --help)"]
