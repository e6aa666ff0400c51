"""Atomic writes never follow a link planted at a guessable temporary name (issue 20, item 3): before, every
atomic write went through `.NAME.tmp-<pid>`, so a symlink pre-created there made train.py / finetune.export
overwrite the link's target (the victim) and leave NAME itself a symlink to it."""

from __future__ import annotations

import os
import subprocess

import pytest

import faults
from conftest import PYTHON, REPO, TINY, wait_for
from common import fsutil

# What a run writes atomically, relative to its run directory (the checkpoint names of a 1-step epoch).
RUN_FILES = ["config.yaml", "metrics.json", "model.pt", "checkpoints/ckpt-00000001.pt"]


def plant(target, pid, victim):
    """A symlink at the old predictable temporary name of `target` -> `victim`."""
    link = target.with_name(f".{target.name}.tmp-{pid}")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    return link


def assert_untouched(victim, target):
    assert victim.read_bytes() == b"precious\n"
    assert target.is_file() and not target.is_symlink(), target


def test_helpers_create_their_temporary_file_exclusively(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    monkeypatch.setattr(os, "getpid", lambda: 4242)     # the pid an attacker would guess
    target = tmp_path / "out.json"
    plant(target, 4242, victim)
    fsutil.atomic_write_text(target, "{}\n")
    assert_untouched(victim, target)
    assert target.read_text() == "{}\n"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~fsutil._UMASK)   # not mkstemp's 0600
    with pytest.raises(ZeroDivisionError), fsutil.atomic_open(target, "w") as fh:
        fh.write("half")
        1 / 0
    assert target.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == \
        [".out.json.tmp-4242"]         # the planted link only: the failed write left nothing behind
    fsutil.atomic_link(target, tmp_path / "best.json")
    assert os.path.samefile(target, tmp_path / "best.json")


@pytest.mark.slow
def test_a_run_and_its_export_never_follow_planted_links(shards, tmp_path):
    """train.py (config.yaml, metrics.json, checkpoints, model.pt) and finetune.export (model.onnx), with links
    planted at every old temporary name for their real pids."""
    from finetune import export as fexport
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2", **faults.env(FINETUNE_TEST_STARTUP_DELAY_S=3)}
    proc = subprocess.Popen([PYTHON, "train.py", "--data", str(shards), "--output-dir", str(run_dir),
                             "--pretrained", "none", "--epochs", "1", "--max-steps-per-epoch", "1",
                             "--eval-limit", "4", *TINY], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # The links go in while the run sleeps in start-up (after it locked its run directory, before any write).
    wait_for(lambda: (run_dir / ".lock").exists(), 120, "the run directory's lock", [proc])
    for name in RUN_FILES:
        plant(run_dir / name, proc.pid, victim)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    for name in RUN_FILES:
        assert_untouched(victim, run_dir / name)
    plant(run_dir / "model.onnx", os.getpid(), victim)
    assert fexport.main([str(run_dir), "--format", "onnx"]) == 0
    assert_untouched(victim, run_dir / "model.onnx")


def test_the_experiments_plot_never_follows_a_planted_link(tmp_path):
    """The report's PNG went through the fixed name test_acc.png.tmp.png."""
    pytest.importorskip("matplotlib")
    from experiments.report import plot
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "test_acc.png"
    (tmp_path / "test_acc.png.tmp.png").symlink_to(victim)
    plot({"data": "shards", "variants": []}, target)
    assert_untouched(victim, target)
    assert target.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_acc.png", "test_acc.png.tmp.png", "victim.txt"]
