"""What the launchers and train.py decide from the GPUs a machine has, checked without GPUs: torch's answers
(device count, compute capability) are stubbed, the launch scripts run against a stand-in interpreter that
reports a chosen GPU count and prints the command it would start."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune import UsageError, distributed

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"


def _fake_python(tmp_path: Path, gpus: int) -> Path:
    """A PYTHON for the launch scripts: answers torch.cuda.device_count() with `gpus`, skips data_prep, runs
    anything else with the real interpreter; `accelerate` / `-m torch.distributed.run` print their argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    py = bin_dir / "python"
    py.write_text(f"""#!/usr/bin/env bash
case "$*" in
    *torch.cuda.device_count*) echo {gpus} ;;
    *torch.hub.get_dir*) echo /nonexistent/resnet18-f37072fd.pth ;;
    "-m data_prep"*) ;;
    "-m torch.distributed.run"*) echo "LAUNCH: $*" ;;
    *) exec {shlex.quote(sys.executable)} "$@" ;;
esac
""")
    acc = bin_dir / "accelerate"
    acc.write_text('#!/usr/bin/env bash\necho "LAUNCH: ACCELERATE_USE_CPU=${ACCELERATE_USE_CPU:-} accelerate $*"\n')
    py.chmod(0o755)
    acc.chmod(0o755)
    return py


# ------------------------------------------------------------------------------------------ launch/demo.sh

def _demo(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    """launch/demo.sh from a copy in tmp_path (it works in its parent directory: runs/, data/)."""
    (tmp_path / "launch").mkdir(exist_ok=True)
    script = tmp_path / "launch" / "demo.sh"
    script.write_text((LAUNCH / "demo.sh").read_text())
    python = tmp_path / "bin" / "python"
    if not python.exists():
        _fake_python(tmp_path, 0)
    return subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": str(python), **env})


DEMO_TAIL = "--num_machines 1 --mixed_precision no --dynamo_backend no train.py --data data/synthetic-shards " \
            "--output-dir runs/demo"


@pytest.mark.slow
@pytest.mark.parametrize("gpus, cpu, launch, batch, extra", [
    (0, True, "--config_file launch/cpu_multiprocess.yaml --num_processes 2", 32, "--image-size 96 --workers 1"),
    (1, False, "--config_file launch/single_gpu.yaml --num_processes 1", 32, "--image-size 224"),
    (2, False, "--config_file launch/multi_gpu.yaml --num_processes 2", 32, "--image-size 224"),
    (3, False, "--config_file launch/multi_gpu.yaml --num_processes 3", 33, "--image-size 224"),
    (8, False, "--config_file launch/multi_gpu.yaml --num_processes 8", 32, "--image-size 224"),
])
def test_demo_launch_follows_the_gpu_count(tmp_path, gpus, cpu, launch, batch, extra):
    """1 GPU: one process, no --multi_gpu (accelerate refuses it with 1 process); N GPUs: N processes and a
    global batch that divides by N; no GPU: 2 gloo processes on the CPU. The real run executes the same
    command (the stand-in accelerate prints it)."""
    for dry_run in ("1", "0"):
        proc = _demo(tmp_path, {"DEMO_GPUS": str(gpus), "DEMO_DRY_RUN": dry_run})
        assert proc.returncode == 0, proc.stderr
        marker = "demo: dry run: " if dry_run == "1" else "LAUNCH: "
        line = next(l for l in proc.stdout.splitlines() if l.startswith(marker))
        assert ("ACCELERATE_USE_CPU=1 " in line) == cpu, line
        assert f"accelerate launch {launch} {DEMO_TAIL} " in line, line
        assert "--multi_gpu" not in line
        assert f" --epochs 3 --batch-size {batch} {extra}" in line, line
        assert batch % (gpus or 2) == 0


@pytest.mark.slow
def test_demo_counts_the_gpus_torch_sees(tmp_path):
    _fake_python(tmp_path, 3)          # DEMO_GPUS unset: the count comes from torch.cuda.device_count()
    proc = _demo(tmp_path, {"DEMO_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "demo: 3 GPUs: 3 processes, global batch 33 (11 per GPU)" in proc.stdout
    assert "--num_processes 3 " in proc.stdout


@pytest.mark.slow
def test_demo_refuses_a_bad_gpu_count(tmp_path):
    proc = _demo(tmp_path, {"DEMO_GPUS": "two", "DEMO_DRY_RUN": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["demo: DEMO_GPUS must be a number of GPUs (0, 1, 2, ...), not 'two'"]


# ------------------------------------------------------------------- launch/torchrun.sh, multi_gpu.yaml

@pytest.mark.slow
@pytest.mark.parametrize("gpus, nproc", [(0, 1), (1, 1), (4, 4)])
def test_torchrun_sh_starts_one_process_per_gpu_torch_sees(tmp_path, gpus, nproc):
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "RDZV_ENDPOINT")}
    proc = subprocess.run([str(LAUNCH / "torchrun.sh"), "--data", "x"], capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHON": str(_fake_python(tmp_path, gpus))})
    assert proc.returncode == 0, proc.stderr
    assert f"-m torch.distributed.run --nproc_per_node {nproc} " in proc.stdout, proc.stdout
    assert f"nproc_per_node={nproc}" in proc.stderr


@pytest.mark.slow
def test_torchrun_sh_refuses_a_bad_nproc(tmp_path):
    proc = subprocess.run([str(LAUNCH / "torchrun.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(_fake_python(tmp_path, 2)), "NPROC_PER_NODE": "0"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "launch/torchrun.sh: NPROC_PER_NODE must be a positive number of processes, not '0'"]


def test_multi_gpu_yaml_has_no_fixed_process_count():
    """The config used to say 8 processes (two ranks per GPU on a 4-GPU node); now the command line must
    say how many, and accelerate stops when it does not."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    parse = launch_command_parser().parse_args
    args, _, _ = _validate_launch_command(parse(["--config_file", str(LAUNCH / "multi_gpu.yaml"),
                                                 "--num_processes", "4", "train.py"]))
    assert args.multi_gpu and args.num_processes == 4
    with pytest.raises(ValueError, match="manually pass in `--num_processes`"):
        _validate_launch_command(parse(["--config_file", str(LAUNCH / "multi_gpu.yaml"), "train.py"]))


# ------------------------------------------------------------------------- two ranks on one GPU (train.py)

def test_more_local_ranks_than_gpus_is_refused():
    distributed.check_one_device_per_rank(4, 4, None)
    distributed.check_one_device_per_rank(8, 0, None)         # CPU processes share the CPU
    with pytest.raises(UsageError, match=r"^5 processes on this node but torch sees 4 GPU\(s\) "
                                         r"\(CUDA_VISIBLE_DEVICES=0,1,2,3\): two ranks would share a GPU"):
        distributed.check_one_device_per_rank(5, 4, "0,1,2,3")


def test_train_py_exits_2_with_one_line_when_two_ranks_share_a_gpu(shards, tmp_path, monkeypatch, capsys):
    """What an 8-process launch on a node where torch sees 4 GPUs does: one line, exit 2, before any process
    group or CUDA context exists (accelerate would map local rank r to GPU r % 4)."""
    import train
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    built = []
    monkeypatch.setattr(distributed, "PartialState", lambda *a, **k: built.append("state"))
    rc = train.main(["--data", str(shards), "--output-dir", str(tmp_path / "run"), "--pretrained", "none"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == [
        "train.py: error: 8 processes on this node but torch sees 4 GPU(s) (CUDA_VISIBLE_DEVICES=0,1,2,3): two "
        "ranks would share a GPU; start one process per GPU (accelerate launch --num_processes / torchrun "
        "--nproc_per_node 4 per node)"]
    assert built == [] and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- --precision auto

@pytest.mark.parametrize("requested, cuda, bf16_native, cpu_fast, expected", [
    ("auto", True, True, False, "bf16"),       # A100 / H100 / L4 ...: compute capability >= 8.0
    ("auto", True, False, False, "fp16"),      # T4 (7.5), V100 (7.0): bf16 only emulated
    ("auto", False, False, True, "bf16"),      # CPU with AVX512-BF16 / AMX
    ("auto", False, False, False, "no"),
    ("bf16", True, False, False, "bf16"),      # asked for explicitly: given
    ("no", True, True, False, "no"),
    ("fp16", True, False, False, "fp16"),
])
def test_choose_precision(requested, cuda, bf16_native, cpu_fast, expected):
    assert distributed.choose_precision(requested, cuda, bf16_native, cpu_fast) == expected


def test_choose_precision_refuses_fp16_on_cpu():
    with pytest.raises(UsageError, match="--precision fp16 needs a GPU"):
        distributed.choose_precision("fp16", False, False, True)


def _t4(monkeypatch, calls: list) -> None:
    """torch.cuda as on a T4: bf16 works only by emulation (is_bf16_supported() is True by default)."""
    def is_bf16_supported(including_emulation: bool = True):
        calls.append(("probe", including_emulation))
        return including_emulation
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_auto_precision_is_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    calls: list = []
    _t4(monkeypatch, calls)
    assert distributed.resolve_precision("auto", torch.device("cuda", 1)) == "fp16"
    assert calls == [("probe", False)]
    assert distributed.resolve_precision("auto", torch.device("cpu")) in ("bf16", "no")   # a CPU rank: no probe
    assert calls == [("probe", False)]


def test_setup_probes_bf16_after_the_rank_has_its_device(monkeypatch):
    """The process state (which sets this rank's GPU) first, then the probe, then the Accelerator with the
    answer: no rank probes -- or opens a context on -- GPU 0 before it has its own device."""
    calls: list = []
    _t4(monkeypatch, calls)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)

    def state(cpu, **kwargs):
        calls.append(("state", cpu, kwargs))
        return SimpleNamespace(device=torch.device("cuda", 1), num_processes=2)
    monkeypatch.setattr(distributed, "PartialState", state)
    monkeypatch.setattr(distributed, "Accelerator",
                        lambda **kw: calls.append(("accelerator", kw["cpu"], kw["mixed_precision"])))
    cfg = SimpleNamespace(debug=False, sync_bn=False, precision="auto", compile=False, collective_timeout=60,
                          startup_timeout=1800, batch_size=128, grad_accum=1, loss_reduction="sum")
    distributed.setup(cfg)
    assert [c[0] for c in calls] == ["state", "probe", "accelerator"], calls
    assert calls[0][1] is False and "timeout" in calls[0][2]
    assert calls[1] == ("probe", False) and calls[2] == ("accelerator", False, "fp16")


# ---------------------------------------------------------------------------------- docs/install.md

@pytest.mark.skipif(not torch.version.cuda, reason="a CPU-only torch build has no GPU kernels to list")
def test_install_doc_lists_the_gpu_kernels_of_the_installed_torch():
    """docs/install.md's supported-GPU list is this wheel's: update it when torch changes."""
    archs = torch._C._cuda_getArchFlags().split()
    text = (REPO / "docs" / "install.md").read_text()
    start = text.index("## Supported GPUs")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else len(text)]
    assert ", ".join(archs[:-1]) + " and " + archs[-1] in " ".join(section.split()), archs
    assert "sm_70" not in archs and "V100 (7.0)" in section


def test_ema_update_never_reads_its_count_from_the_device():
    """--ema-decay on a GPU: torch's AveragedModel.update_parameters evaluates `n_averaged == 0` and `> 0` on the
    host, two device syncs per optimizer step. finetune.loop's EMA keeps the count on the host: it must give
    bitwise torch's EMA of every floating-point parameter and buffer (the first update a copy), and it must
    not read n_averaged at all -- checked by making n_averaged a meta tensor, which has no value to read.
    (Integer buffers, BatchNorm's num_batches_tracked, are the model's own counts rather than torch's
    truncated lerp of them: tests/distributed/test_runtime.py.)"""
    import torchvision
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from finetune.loop import make_ema
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    torchs, ours = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True), make_ema(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
        opt.step()
        torchs.update_parameters(model)
        ours.update_parameters(model)
    a, b = torchs.state_dict(), ours.state_dict()
    floats = [k for k in a if a[k].is_floating_point()]
    assert a.keys() == b.keys() and len(floats) == 102 and all(torch.equal(a[k], b[k]) for k in floats)
    assert int(b["n_averaged"]) == 3 and all(int(b[k]) == 3 for k in a if k.endswith("num_batches_tracked"))
    resumed = make_ema(model, 0.9)
    resumed.load_state_dict(b)                                  # a resume refreshes the host count
    assert resumed.count == 3
    for ema in (torchs, ours):
        ema.n_averaged = torch.zeros((), dtype=torch.long, device="meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        torchs.update_parameters(model)                         # reads it: what would sync on a GPU
    ours.update_parameters(model)                               # does not
