"""Shared test fixtures: tiny synthetic shards, a locally saved ResNet-18 state dict (never a hub), and a
runner for train.py as a real subprocess (1 process, or 2 through `accelerate launch` on CPU/gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

# Small enough for a 2-core CPU: 32 px images, a handful of steps.
TINY = ["--batch-size", "8", "--image-size", "32", "--workers", "0", "--precision", "no", "--log-every", "1"]


def _prep(tmp: Path, name: str, train_per_class: int, test_per_class: int, per_shard: int,
          drop_test: int = 0, extra: tuple = (), swap_test: bool = False) -> Path:
    from data_prep import main as data_prep_main
    from data_prep.synthetic import make_synthetic
    src = make_synthetic(tmp / f"{name}-src", train_per_class=train_per_class, test_per_class=test_per_class,
                         min_side=32, max_side=56, seed=1)
    for path in sorted((src / "test" / "not-hotdog").glob("*.jpg"))[:drop_test]:
        path.unlink()    # an odd test count: the eval split over 2 ranks is uneven
    if swap_test:    # test labels inverted: a model that gets better on val gets worse on test
        test = src / "test"
        (test / "hotdog").rename(test / "tmp")
        (test / "not-hotdog").rename(test / "hotdog")
        (test / "tmp").rename(test / "not-hotdog")
    out = tmp / name
    assert data_prep_main(["--source", str(src), "--out", str(out), "--samples-per-shard", str(per_shard),
                           "--workers", "1", "--no-progress", *map(str, extra)]) == 0
    return out


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """(All fixtures prepare shards in-process: --workers 1, the same output as any other count.)
    40 train samples in 5 shards (uneven over 2 ranks), 13 test samples in 2 shards."""
    return _prep(tmp_path_factory.mktemp("data"), "shards", 20, 7, per_shard=8, drop_test=1)


@pytest.fixture(scope="session")
def val_shards(tmp_path_factory) -> Path:
    """Like `shards` plus a val split (--val-fraction 0.25: 30 train, 10 val), with the TEST labels swapped,
    so that val and test disagree about which epoch is best."""
    return _prep(tmp_path_factory.mktemp("data"), "val-shards", 20, 7, per_shard=8,
                 extra=("--val-fraction", 0.25), swap_test=True)


def colour_source(root: Path, counts: dict, seed: int = 0) -> Path:
    """A d2l-layout JPEG folder that is easy to tell apart even through random features: every image a noisy
    40x40 colour field, hotdog reddish, not-hotdog bluish (per-image tint and per-pixel noise, seeded).
    counts: {split: {class: number of images}}."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for label, n in per_class.items():
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([170, 90, 60] if label == "hotdog" else [60, 90, 170], dtype=float)
            for i in range(n):
                pixels = base + rng.normal(0, 25, 3) + rng.normal(0, 30, (40, 40, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def skewed_shards(tmp_path_factory) -> Path:
    """A 1:9 train split (5 hotdog, 45 not-hotdog; 7 shards of 8) with a balanced test split (10 + 10), of
    colour_source images: the classes are easy to tell apart, but hotdog is rare in training."""
    from data_prep import main as data_prep_main
    tmp = tmp_path_factory.mktemp("data")
    src = colour_source(tmp / "skewed-src", {"train": {"hotdog": 5, "not-hotdog": 45},
                                             "test": {"hotdog": 10, "not-hotdog": 10}})
    out = tmp / "skewed-shards"
    assert data_prep_main(["--source", str(src), "--out", str(out), "--samples-per-shard", "8", "--workers", "1",
                            "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def imagenet_like(tmp_path_factory) -> Path:
    """A ResNet-18 state dict with a 1000-class fc, saved locally: stands in for ImageNet weights."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18-local.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    return path


def run_train(args: list, *, procs: int = 1, env: dict | None = None, timeout: int = 300,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run train.py for real. procs=2 uses `accelerate launch --multi_gpu` with ACCELERATE_USE_CPU=1:
    two gloo processes (note: `accelerate launch --cpu --num_processes 2` would start only one)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if procs > 1 else "2", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    if procs == 1:
        cmd = [PYTHON, "train.py"]
    else:
        full_env["ACCELERATE_USE_CPU"] = "1"
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "train.py"]
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def load_model_pt(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_train(args: list, *, nodes: int = 1, node_rank: int = 0, port: int = 0, log: Path | None = None,
                env: dict | None = None) -> subprocess.Popen:
    """train.py in the background: one plain process (nodes=1), or one node of a multi-node
    `accelerate launch` job with one process per node on 127.0.0.1."""
    # Same thread counts as run_train: CPU float results depend on them, and resume tests compare bitwise.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nodes > 1 else "2", "PYTHONUNBUFFERED": "1", **(env or {})}
    if nodes == 1:
        cmd = [PYTHON, "train.py"]
    else:
        full_env["ACCELERATE_USE_CPU"] = "1"
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_machines", str(nodes), "--machine_rank", str(node_rank),
               "--num_processes", str(nodes), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--mixed_precision", "no", "--dynamo_backend", "no", "train.py"]
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd + [str(a) for a in args], cwd=REPO, env=full_env, stdout=out,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout: float, what: str, procs=()):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process exited while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- The fast tier: every test not marked `slow` (make test-fast = pytest -m "not slow") -------------------
# A test that is not marked slow must not start a process: while such a test (its fixtures included) sets up
# and runs, every way of starting one fails it with a message saying to mark it slow. This holds in every
# run, not only `make test-fast`, so a test that starts a process and is not marked slow fails in `make test`
# too instead of silently slowing the fast tier down.

SLOW_HINT = ("this test starts a process ({what}) but is not marked slow: the fast tier (make test-fast, "
             "pytest -m 'not slow') runs in-process only. Mark it @pytest.mark.slow (or the file with "
             "pytestmark = pytest.mark.slow), or test the behaviour in-process.")


class ProcessStartInFastTest(AssertionError):
    pass


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise ProcessStartInFastTest(SLOW_HINT.format(what=what))
    return refuse


def _process_starters():
    """(owner, attribute, description) of every way the tests could start a process: subprocess (and
    everything built on it: run, check_output, os.popen, asyncio), fork/spawn, multiprocessing (and so
    torch.multiprocessing.spawn, DataLoader workers, ProcessPoolExecutor)."""
    import multiprocessing.process
    starters = [(subprocess.Popen, "__init__", "subprocess.Popen"),
                (multiprocessing.process.BaseProcess, "start", "multiprocessing Process.start")]
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "spawnv", "spawnve", "spawnvp",
                 "spawnvpe"):
        if hasattr(os, name):
            starters.append((os, name, f"os.{name}"))
    return starters


def process_guard():
    """A MonkeyPatch that makes every process start raise ProcessStartInFastTest (undo() lifts it)."""
    patch = pytest.MonkeyPatch()
    for owner, attr, what in _process_starters():
        patch.setattr(owner, attr, _refuse(what))
    return patch


def _guard_unless_slow(item):
    patch = process_guard() if item.get_closest_marker("slow") is None else None
    try:
        yield
    finally:
        if patch:
            patch.undo()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):    # the test's fixtures
    yield from _guard_unless_slow(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _guard_unless_slow(item)
