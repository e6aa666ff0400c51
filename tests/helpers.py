"""Helpers the tests share (import them from here; conftest re-exports the older ones, so `from conftest import
run_train` keeps working): train.py as a real subprocess (1 process, or 2 through `accelerate launch` on
CPU/gloo), a two-node launch, waiting on a condition, a run's files (model.pt, JSON, checkpoints, TensorBoard
events), a colour-field JPEG source, a train.py Config from flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

# Small enough for a 2-core CPU: 32 px images, a handful of steps.
TINY = ["--batch-size", "8", "--image-size", "32", "--workers", "0", "--precision", "no", "--log-every", "1"]


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


def two_nodes(args: list, tmp_path: Path, tag: str = "") -> list[subprocess.Popen]:
    """A 2-node train.py job (one process per node on 127.0.0.1), logs in tmp_path/{tag-}node{rank}.log."""
    port = free_port()
    prefix = f"{tag}-" if tag else ""
    return [start_train(args, nodes=2, node_rank=r, port=port, log=tmp_path / f"{prefix}node{r}.log") for r in (0, 1)]


def ckpt_paths(run_dir: Path) -> list[Path]:
    """The run's step checkpoints (checkpoints/ckpt-*.pt), oldest name first; [] before the first."""
    d = Path(run_dir) / "checkpoints"
    return sorted(d.glob("ckpt-*.pt")) if d.exists() else []


def ckpts(run_dir: Path) -> list[str]:
    """The names of ckpt_paths(run_dir)."""
    return [p.name for p in ckpt_paths(run_dir)]


def tb_events(tb_dir: Path, **size_guidance):
    """The TensorBoard events under tb_dir, loaded (EventAccumulator; it honours purge_step).
    size_guidance: {"scalars": 0, "images": 0} keeps every event, not a sample."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb_dir), size_guidance=size_guidance or None)
    events.Reload()
    return events


def config(*flags):
    """train.py's Config for `--data x` and flags (no data is read)."""
    from finetune.config import parse_config
    return parse_config(["--data", "x", *map(str, flags)])
