"""What a user meets first (issue 22): --help, --debug, run directories, refused starts, accelerate's own
settings, the progress line in non-terminal logs, and --precision auto on a CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import ACCELERATE, PYTHON, REPO, TINY, run_train
from helpers import config as _cfg
from finetune import UsageError, launcher, precision
from finetune.config import HELP_GROUPS, Config, parse_config
from finetune.monitor import duration, progress_line

SMALL = ["--epochs", "1", "--max-steps-per-epoch", "2", "--eval-limit", "4", "--pretrained", "none"]


# ------------------------------------------------------------------------------------------------------
# 1. --help: groups by concern, each default once, fast (parsed before torch is imported)
# ------------------------------------------------------------------------------------------------------
def _help_entries(text: str) -> dict:
    """{'--flag': its help text (one line)} from argparse's --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (--[a-z0-9-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line.strip()
        elif current and line.startswith(" " * 6):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.slow
def test_help_is_grouped_with_each_default_said_once_and_fast():
    start = time.perf_counter()
    proc = subprocess.run([PYTHON, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120"}, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 3, f"train.py --help took {elapsed:.1f}s"       # torch alone takes several seconds
    out = proc.stdout
    assert out.startswith("usage: train.py --data SHARDS [options]")
    titles = [t for t, _, _ in HELP_GROUPS]
    assert titles[:2] == ["data", "model and weights"] and "cluster" in titles
    positions = [out.index(f"\n{title}:\n") for title in titles]
    assert positions == sorted(positions), "groups in HELP_GROUPS order"
    assert "more options:" not in out
    entries = _help_entries(out)
    assert len(entries) == len(Config.__dataclass_fields__) + 1, sorted(entries)   # + --config
    for flag, text in entries.items():
        assert text.count("(default") <= 1, text
        assert "(default: )" not in text and "(default: None)" not in text, text
    assert "(required, here or in --config)" in entries["--data"] and "(default" not in entries["--data"]
    assert entries["--epochs"].endswith("(default: 5, as in d2l)")
    assert entries["--channels-last"].endswith("(default: on)") and entries["--compile"].endswith("(default: off)")
    assert "(default 0: off)" in entries["--clip-grad"]
    assert "(default: $TMPDIR/hotdog-shards)" in entries["--cache-dir"]


def test_every_option_is_in_exactly_one_help_group():
    grouped = [name for _, _, names in HELP_GROUPS for name in names]
    assert len(grouped) == len(set(grouped))
    missing = set(Config.__dataclass_fields__) - set(grouped)
    assert not missing, f"add {sorted(missing)} to HELP_GROUPS in finetune/config.py"


@pytest.mark.slow
def test_parsing_and_usage_errors_import_no_torch():
    code = ("import sys; from finetune.config import parse_config; "
            "cfg = parse_config(['--data', 'x', '--arch', 'timm:tf_efficientnet_lite0', '--debug']); "
            "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'accelerate') if m in sys.modules))")
    proc = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)
    start = time.perf_counter()
    proc = subprocess.run([PYTHON, "train.py", "--data", "x", "--epochs", "0"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--epochs: must be a positive integer" in proc.stderr
    assert time.perf_counter() - start < 3


@pytest.mark.slow
def test_an_unknown_arch_is_still_one_line():
    proc = subprocess.run([PYTHON, "train.py", "--data", "x", "--arch", "resnet19"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("train.py: error: --arch resnet19")


# ------------------------------------------------------------------------------------------------------
# 2. --debug keeps what the user gave; run directories follow the arch; refused starts leave nothing
# ------------------------------------------------------------------------------------------------------
def test_debug_keeps_every_flag_given_on_the_command_line_or_in_yaml(tmp_path):
    cfg = parse_config(["--data", "x", "--debug", "--precision", "bf16", "--workers", "2", "--data-order", "random",
                        "--max-steps-per-epoch", "0", "--eval-limit", "5"])
    assert (cfg.precision, cfg.workers, cfg.data_order, cfg.max_steps_per_epoch, cfg.eval_limit) == \
        ("bf16", 2, "random", 0, 5)
    assert (cfg.epochs, cfg.batch_size, cfg.image_size) == (2, 8, 112)           # the rest: debug's
    (tmp_path / "run.yaml").write_text("workers: 3\ntiming_warmup: 4\n")
    cfg = parse_config(["--data", "x", "--debug", "--config", str(tmp_path / "run.yaml")])
    assert (cfg.workers, cfg.timing_warmup, cfg.precision, cfg.data_order) == (3, 4, "no", "sequential")


def test_run_directory_follows_the_arch():
    assert parse_config(["--data", "x"]).run_dir() == Path("runs/hotdog-resnet18")
    cfg = parse_config(["--data", "x", "--arch", "timm:tf_efficientnet_lite0"])
    assert cfg.run_dir() == Path("runs/hotdog-timm-tf_efficientnet_lite0") and cfg.name == cfg.run_dir().name
    assert parse_config(["--data", "x", "--name", "mine", "--debug"]).run_dir() == Path("runs/mine")
    assert parse_config(["--data", "x", "--output-dir", "o", "--debug"]).run_dir() == Path("o")
    assert re.fullmatch(r"runs/hotdog-resnet50-debug-\d{8}-\d{6}",
                        str(parse_config(["--data", "x", "--debug", "--arch", "resnet50"]).run_dir()))


@pytest.mark.slow
def test_a_debug_run_can_be_rerun_and_keeps_its_flags(shards, tmp_path):
    """Two --debug runs in the same place both train (each in a fresh directory); explicit flags stay."""
    cmd = [PYTHON, str(REPO / "train.py"), "--data", str(shards), "--debug", "--pretrained", "none",
           "--image-size", "32", "--data-order", "random", "--max-steps-per-epoch", "1", "--epochs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for _ in range(2):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        time.sleep(1.1)          # the directory's name has the start time to the second
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("hotdog-resnet18-debug-") for r in runs), runs
    saved = yaml.safe_load((runs[1] / "config.yaml").read_text())
    assert saved["data_order"] == "random" and saved["precision"] == "no" and saved["name"] == runs[1].name


@pytest.mark.slow
def test_a_refused_start_leaves_nothing_behind(shards, tmp_path):
    fresh = tmp_path / "new" / "run"
    proc = run_train(["--data", shards, "--output-dir", fresh, *TINY, *SMALL, "--resume", tmp_path / "none.pt"],
                     check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "new").exists(), list((tmp_path / "new").rglob("*"))
    # An earlier run's directory: a refused re-run leaves its lock file and rank files as they were.
    run_dir = tmp_path / "done"
    run_train(["--data", shards, "--output-dir", run_dir, *TINY, *SMALL])
    before = {p: p.read_bytes() for p in [run_dir / ".lock", *(run_dir / "ranks").iterdir()]}
    proc = run_train(["--data", shards, "--output-dir", run_dir, *TINY, *SMALL], check=False)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr
    assert {p: p.read_bytes() for p in [run_dir / ".lock", *(run_dir / "ranks").iterdir()]} == before


# ------------------------------------------------------------------------------------------------------
# 3. Accelerate's own mixed_precision / dynamo_backend
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, env, precision, says", [
    ([], {}, "auto", None),
    ([], {"ACCELERATE_MIXED_PRECISION": "bf16"}, "bf16", "precision: bf16, from accelerate's mixed_precision"),
    ([], {"ACCELERATE_MIXED_PRECISION": "no"}, "auto", None),      # accelerate's default too: auto decides
    (["--precision", "no"], {"ACCELERATE_MIXED_PRECISION": "fp16"}, "no",
     "train.py's --precision no is used, not accelerate's mixed_precision"),
    (["--precision", "bf16"], {"ACCELERATE_MIXED_PRECISION": "bf16"}, "bf16", None),
    (["--debug"], {"ACCELERATE_MIXED_PRECISION": "bf16"}, "no", "--precision no is used"),
])
def test_precision_between_flag_and_launcher(flags, env, precision, says):
    choice = launcher.decide(_cfg(*flags), env)
    assert choice.precision == precision and choice.dynamo_backend == "no"
    assert len(choice.notes) == (1 if says else 0) and (not says or says in choice.notes[0]), choice.notes


@pytest.mark.parametrize("flags, backend, used, says", [
    ([], "INDUCTOR", "inductor", "torch.compile with backend inductor, from accelerate's dynamo_backend"),
    ([], "NO", "no", None),
    (["--compile"], "NO", "inductor", None),
    (["--compile"], "AOT_EAGER", "inductor", "--compile (inductor) is used, not accelerate's dynamo_backend"),
    (["--no-compile"], "INDUCTOR", "no", "--no-compile (no) is used"),
])
def test_compile_between_flag_and_launcher(flags, backend, used, says):
    choice = launcher.decide(_cfg(*flags), {"ACCELERATE_DYNAMO_BACKEND": backend})
    assert choice.dynamo_backend == used
    assert len(choice.notes) == (1 if says else 0) and (not says or says in choice.notes[0]), choice.notes


def test_an_unsupported_launcher_precision_is_one_line():
    with pytest.raises(UsageError, match="accelerate's mixed_precision .* is fp8, which train.py does not"):
        launcher.decide(_cfg(), {"ACCELERATE_MIXED_PRECISION": "fp8"})


def _accelerate_config(path: Path, processes: int) -> Path:
    """A config file as `accelerate config` writes it, with mixed_precision bf16."""
    text = yaml.safe_load((REPO / "launch" / "cpu_multiprocess.yaml").read_text())
    text.update(mixed_precision="bf16", num_processes=processes,
                distributed_type="MULTI_GPU" if processes > 1 else "NO")
    path.write_text(yaml.safe_dump(text))
    return path


@pytest.mark.slow
def test_accelerate_config_precision_wins_unless_flag_given_and_progress_lines_come_from_rank_0(shards, tmp_path):
    """Under a real `accelerate launch --config_file` (mixed_precision: bf16), 2 gloo processes, a non-terminal
    log: no --precision -> bf16 (said in one line, saved in config.yaml); --no-compile beats the launcher's
    --dynamo_backend; --log-every-s 0 prints one progress line per step, from rank 0 only."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["--data", str(shards), *map(str, TINY[:6]), "--workers", "0", *SMALL, "--log-every-s", "0"]
    cmd = [ACCELERATE, "launch", "--config_file", str(_accelerate_config(tmp_path / "acc.yaml", 2)),
           "--dynamo_backend", "inductor", "--main_process_port", "0", "train.py"]
    proc = subprocess.run(cmd + args + ["--output-dir", str(tmp_path / "a"), "--no-compile"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert out.count("precision: bf16, from accelerate's mixed_precision") == 1, out
    assert out.count("compile: train.py's --no-compile (no) is used, not accelerate's dynamo_backend") == 1
    assert "world_size=2 " in out and "precision=bf16" in out
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["precision"] == "bf16" and saved["compile"] is False
    lines = re.findall(r"^epoch 1/1 step (\d)/2: loss \d+\.\d{3}, \d+\.\d examples/s, data wait \d+%, "
                       r"ETA epoch \d+s, run \d+s$", out, flags=re.M)
    assert lines == ["1", "2"], out          # one per step: rank 1 prints none
    # One process, the same config file, --precision given: the flag wins, and says so.
    cmd[3] = str(_accelerate_config(tmp_path / "acc1.yaml", 1))
    proc = subprocess.run(cmd + args + ["--output-dir", str(tmp_path / "b"), "--precision", "no", "--log-every-s",
                                        "1000"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "precision: train.py's --precision no is used, not accelerate's mixed_precision" in proc.stdout
    assert "precision=no" in proc.stdout and " step 1/2:" not in proc.stdout       # nothing within 1000 s
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["precision"] == "no"


def test_slurm_script_hands_mixed_precision_to_both_launchers():
    text = (REPO / "slurm" / "finetune.sh").read_text()
    assert "--mixed_precision \"${MIXED_PRECISION:-no}\"" not in text and "--dynamo_backend no" not in text
    assert 'export ACCELERATE_MIXED_PRECISION=$MIXED_PRECISION' in text
    assert 'cmd+=(--mixed_precision "$MIXED_PRECISION")' in text


# ------------------------------------------------------------------------------------------------------
# 4. The progress line
# ------------------------------------------------------------------------------------------------------
def test_progress_line_fields():
    line = progress_line((2, 5, 120, 468), 0.41234, 34.06, 0.123, 200, 965)
    assert line == ("epoch 2/5 step 120/468: loss 0.412, 34.1 examples/s, data wait 12%, ETA epoch 3m20s, "
                    "run 16m05s")
    assert [duration(s) for s in (0, 59.4, 60, 3599, 7500)] == ["0s", "59s", "1m00s", "59m59s", "2h05m"]


# ------------------------------------------------------------------------------------------------------
# 7. --precision auto on a CPU: timed, cached
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rates, choice", [({"fp32": 16.1, "bf16": 29.0}, "bf16"),    # ResNet-18 224 px
                                           ({"fp32": 111.0, "bf16": 79.5}, "no"),    # Lite0 96 px, 2 procs
                                           ({"fp32": 100.0, "bf16": 103.0}, "no")])  # within the margin
def test_cpu_precision_follows_the_timings_and_is_cached(tmp_path, rates, choice):
    calls = []

    def measure():
        calls.append(1)
        return dict(rates)
    path = tmp_path / "cache" / "cpu-precision.json"
    first = precision.decide("key", measure, is_main=True, share=lambda x: x, path=path)
    assert first == (choice, rates, False) and calls == [1]
    second = precision.decide("key", measure, is_main=True, share=lambda x: x, path=path)
    assert second == (choice, rates, True) and calls == [1]            # the cache answered
    assert json.loads(path.read_text())["key"]["choice"] == choice
    precision.decide("other", measure, is_main=True, share=lambda x: x, path=path)
    assert calls == [1, 1] and set(json.loads(path.read_text())) == {"key", "other"}


def test_a_damaged_cache_is_measured_again(tmp_path):
    path = tmp_path / "cpu-precision.json"
    path.write_text("{not json")
    assert precision.decide("k", lambda: {"fp32": 1.0, "bf16": 2.0}, is_main=True, share=lambda x: x,
                            path=path)[0] == "bf16"
    assert json.loads(path.read_text())["k"]["choice"] == "bf16"


@pytest.mark.slow
@pytest.mark.skipif(not precision.torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="this CPU has no native bf16 kernels: auto is fp32 without timing")
def test_train_py_times_precision_once_then_uses_the_cache(shards, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ["--data", shards, *TINY[:6], "--workers", "0", *SMALL, "--precision", "auto"]
    first = run_train(args + ["--output-dir", tmp_path / "a"], env=env)
    second = run_train(args + ["--output-dir", tmp_path / "b"], env=env)
    pattern = r"precision auto: (bf16|fp32 \(no\)) -- bf16 [\d.]+ vs fp32 [\d.]+ examples/s per process"
    assert re.search(pattern + "$", first.stdout, flags=re.M) and "timing fp32 and bf16" in first.stdout
    assert re.search(pattern + r" \(cached\)$", second.stdout, flags=re.M) and "timing" not in second.stdout
    entry, = json.loads((tmp_path / "cache" / "hotdog-finetune" / "cpu-precision.json").read_text()).values()
    assert f"precision={entry['choice']}" in second.stdout
