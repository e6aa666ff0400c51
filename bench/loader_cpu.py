"""Loader images per CPU-second WITH the IPC included (issue 23, item 3): a whole train loader as train.py
builds it -- DataLoader workers whose uint8 batches travel through shared memory into the training process
(pinned there when CUDA is present; persistent across epochs: one iterator per run) -- timed in CPU-seconds
of the whole process tree (the training process with all its threads, plus every worker), beside the
worker-only figure of bench/per_core.py (the same work in one thread, no DataLoader, no IPC).

    .venv/bin/python bench/loader_cpu.py                 # ~2-4 min; 256-px synthetic shards made once
    .venv/bin/python bench/loader_cpu.py --paths dali-cpu --workers 1 2 4

Paths: `torchvision` (TrainStream's default), `opencv` (--augment-with opencv), `dali-cpu` (finetune.data.dali's
pipeline in DALI's CPU-only mode, uint8 output like the others; DALI's threads run inside the training
process, so there is no inter-process copy, only the copy out of DALI into a torch tensor), and on a GPU
machine `dali-gpu` (the same pipeline with the "mixed" decoder on cuda:0: what --loader dali runs there).
"workers" is DataLoader workers, or DALI threads; 0 workers: the stream runs in the training process.

Why CPU-seconds: on a shared, loaded machine the wall-clock rate counts the time other processes held the
cores; the CPU time the loader itself burnt does not. The window: after a warm-up, the loader is left to go
idle (every prefetched batch ready), then N batches are taken, then it is left to go idle again, so the
window holds exactly the production of the N replacement batches, and all of the consuming side's work.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, machine, median, table

import psutil
import torch

from finetune.data.manifest import load_manifest
from finetune.data.streams import TrainStream, make_loader

SIZE = 224
SHUFFLE = 1000          # train.py's --shuffle-buffer default


def main_cpu_seconds() -> float:
    """User + system CPU time of this process alone (all its threads: DALI's, the pin-memory thread)."""
    return sum(psutil.Process().cpu_times()[:2])


def tree_cpu_seconds(children: list) -> float:
    """User + system CPU time of this process (all threads) and of `children` (the loader workers, found once:
    scanning /proc for them on every reading would cost more CPU than a batch)."""
    total = main_cpu_seconds()
    for child in children:
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def settle(children: list, quiet_s: float = 0.3, timeout_s: float = 20.0) -> float:
    """Wait until the process tree burns (almost) no CPU: every outstanding batch is produced. Returns the
    CPU time this waiting itself cost (this thread), which the caller takes out of its window."""
    own = time.thread_time()
    deadline, last = time.monotonic() + timeout_s, tree_cpu_seconds(children)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = tree_cpu_seconds(children)
        if now - last < 0.04 * quiet_s:
            break
        last = now
    return time.thread_time() - own


def synthetic_shards(work: Path) -> str:
    """128 + 128 synthetic photos of 256-400 px, sharded with data_prep --shorter-side 256 (made once)."""
    import subprocess
    from data_prep.synthetic import make_synthetic
    src = make_synthetic(work / "synthetic-256-400", train_per_class=128, test_per_class=1, min_side=256,
                         max_side=400, seed=0)
    out = work / "synthetic-shards-s256"
    subprocess.run([sys.executable, "-m", "data_prep", "--source", str(src), "--out", str(out), "--no-progress",
                    "--shorter-side", "256"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return str(out)


def torch_loader(split, path: str, workers: int, batch: int):
    stream = TrainStream(split, rank=0, world_size=1, micro_batch=batch, accum=1, steps=1 << 30, image_size=SIZE,
                         seed=0, order="random", shuffle_buffer=SHUFFLE,
                         augment_with="opencv" if path == "opencv" else "torchvision")
    return iter(make_loader(stream, workers, pin_memory=torch.cuda.is_available()))


def dali_loader(split, path: str, workers: int, batch: int):
    """finetune.data.dali's train loader: CPU-only mode, or (dali-gpu) the "mixed" decoder on cuda:0."""
    from finetune.data import dali
    spec = dali.DaliSpec(split, dali.index_paths(split), 0, 1, batch, SIZE, 0, SHUFFLE, workers,
                         0 if path == "dali-gpu" else None)
    return iter(dali.DaliTrainLoader(spec))


def measure(batches, n: int, batch: int, warmup: int) -> tuple[float, float, float]:
    """(images per CPU-second of the tree, the training process's share of that CPU time, images per
    wall-second) over n batches taken between idle points, after `warmup` batches (worker start-up, the
    shuffle buffers filled: the steady state of a long run)."""
    for _ in range(warmup):
        next(batches)
    children = psutil.Process().children(recursive=True)
    settle(children)
    cpu, main_cpu, wall = tree_cpu_seconds(children), main_cpu_seconds(), time.perf_counter()
    for x, _ in itertools.islice(batches, n):
        assert x.shape == (batch, 3, SIZE, SIZE)
    if x.is_cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    waiting = settle(children)
    cpu, main_cpu = tree_cpu_seconds(children) - cpu - waiting, main_cpu_seconds() - main_cpu - waiting
    return n * batch / cpu, main_cpu / cpu, n * batch / wall


def worker_only(split, path: str, images: int, batch: int) -> float:
    """bench/per_core.py's figure for `path`: the same work in this thread, no DataLoader (CPU time)."""
    if path.startswith("dali"):     # DALI runs in-process anyway: its pipeline alone, without the copy out
        from finetune.data import dali
        spec = dali.DaliSpec(split, dali.index_paths(split), 0, 1, batch, SIZE, 0, SHUFFLE, 1,
                             0 if path == "dali-gpu" else None)
        pipe = dali.build_pipeline(spec, 0)
        for _ in range(3):                                  # warm-up: the shuffle buffer, first allocations
            pipe.run()
        cpu = time.process_time()
        for _ in range(images // batch):
            pipe.run()
        return images // batch * batch / (time.process_time() - cpu)
    import per_core
    per_core.SIZE = SIZE
    fn = per_core.opencv if path == "opencv" else per_core.tv_tensor
    per_core.rate(fn, split.urls, batch, batch)             # warm-up: imports (cv2, simplejpeg), first allocations
    return per_core.rate(fn, split.urls, images, batch)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default="", help="a shard directory (default: 256-px synthetic shards in $TMPDIR)")
    p.add_argument("--paths", nargs="+", default=["torchvision", "opencv", "dali-cpu"],
                   choices=["torchvision", "opencv", "dali-cpu", "dali-gpu"],
                   help="dali-gpu: DALI's mixed decoder on cuda:0 (a GPU machine; not in the default list)")
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2],
                   help="DataLoader workers (0: the stream runs in the training process, no IPC; DALI: threads)")
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--batches", type=int, default=24, help="timed batches per repeat")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    shards = args.shards or synthetic_shards(Path(tempfile.gettempdir()) / "hotdog-bench")
    split = load_manifest(shards).train
    print(machine(f"cpu; pinned batches: {'yes' if torch.cuda.is_available() else 'no (no CUDA)'}"))
    print(f"shards: {shards} ({split.num_samples} train images); batch {args.batch} at {SIZE} px, "
          f"{args.batches} timed batches x {args.repeats} repeats")
    if any(path.startswith("dali") for path in args.paths):
        from finetune.data import dali
        problem = dali.build_indexes([split])
        if problem:
            sys.exit(problem)
    rows = []
    for path in args.paths:
        alone = median([worker_only(split, path, args.batches * args.batch, args.batch) for _ in range(args.repeats)])
        for workers in args.workers:
            if path.startswith("dali") and workers == 0:
                continue                                    # DALI has no in-process mode without threads
            rates = []
            for _ in range(args.repeats):
                loader = dali_loader(split, path, workers, args.batch) if path.startswith("dali") else \
                    torch_loader(split, path, workers, args.batch)
                # Past the shuffle buffers' filling (1000 samples per worker, or per DALI reader).
                warmup = max(1, 1 if path.startswith("dali") else workers) * (SHUFFLE // args.batch + 2)
                rates.append(measure(loader, args.batches, args.batch, warmup))
                del loader
            cpu = median([c for c, _, _ in rates])
            rows.append({"path": path, "workers": workers, "img per CPU-s, whole loader": f"{cpu:.0f}",
                         "worker-only (per_core.py)": f"{alone:.0f}", "loader / worker-only": f"{cpu / alone:.2f}",
                         "training process's share of CPU": f"{median([m for _, m, _ in rates]):.0%}",
                         "wall img/s": f"{median([w for _, _, w in rates]):.0f}",
                         "runs (CPU)": " ".join(f"{c:.0f}" for c, _, _ in rates)})
            print(rows[-1], flush=True)
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
