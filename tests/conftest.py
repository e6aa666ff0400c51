"""Shared test fixtures: tiny synthetic shards, a locally saved ResNet-18 state dict (never a hub); the fast
tier's guard (below). The helper functions are in tests/helpers.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

# The helpers tests import from conftest (older tests; new ones import them from helpers).
from helpers import (ACCELERATE, PYTHON, REPO, TINY, colour_source, free_port, load_model_pt,  # noqa: F401
                     read_json, run_train, start_train, wait_for)


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
