"""Shared helpers of the bench/ scripts: the machine line, medians and ratios, the result table, and
shards prepared once into a temp dir (never into the repo)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "hotdog-food"     # ../shared/data/hotdog-food
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | None = None) -> str:
    import torch
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device is None:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"machine: {cpu_model()}, {cpus} usable cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), python {platform.python_version()}, "
            f"device {device}, load average at start {load:.1f}")


def in_turn(repeat: int, sides: list) -> list:
    """Ours and the baseline alternate which goes first, repeat by repeat, so a drift in the machine's load
    falls on both sides alike (the per-repeat ratios are paired)."""
    return sides if repeat % 2 == 0 else sides[::-1]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-markdown table (so it can be pasted into docs/performance.md as printed)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def goal_row(what: str, ours: list[float], base: list[float], goal: float, unit: str, fmt="{:.1f}") -> dict:
    """One table row from per-repeat measurements of both sides (ours[i] and base[i] measured back to back).
    'ratio' is the median of the per-repeat ratios -- robust to load that drifts between repeats on a
    shared machine -- and decides 'met?'; 'ratio of medians' is shown next to it."""
    paired = [o / b for o, b in zip(ours, base) if b]
    ratio = median(paired)
    return {"metric": what, "ours": fmt.format(median(ours)) + f" {unit}",
            "baseline": fmt.format(median(base)) + f" {unit}", "ratio": f"{ratio:.2f}x",
            "ratio of medians": f"{median(ours) / median(base):.2f}x", "goal": f">= {goal}x",
            "met?": "yes" if ratio >= goal else "NO"}


COLUMNS = ["metric", "ours", "baseline", "ratio", "ratio of medians", "goal", "met?"]


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default=str(DEFAULT_SOURCE),
                        help="d2l-layout photo folder (train/<class>/*.jpg, test/...), read by the d2l baseline "
                             "and sharded for ours")
    parser.add_argument("--shards", default="",
                        help="existing shard directory of --source (data_prep output); default: prepare it once "
                             "under $TMPDIR/hotdog-bench/ (re-used while up to date)")
    parser.add_argument("--shorter-side", type=int, default=0,
                        help="when preparing shards: data_prep --shorter-side PX (0: original JPEG bytes)")


def shards_for(args) -> str:
    """The shard directory for --source: --shards, or data_prep output in a temp dir (up-to-date check is
    data_prep's own, so a second run costs a second)."""
    if args.shards:
        return args.shards
    if not Path(args.source, "train").is_dir():
        sys.exit(f"--source {args.source}: no train/ folder there (expected the d2l layout); pass --source")
    tag = f"s{args.shorter_side}" if args.shorter_side else "orig"
    out = Path(tempfile.gettempdir()) / "hotdog-bench" / f"{Path(args.source).name}-{tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "data_prep", "--source", str(args.source), "--out", str(out), "--no-progress"]
    if args.shorter_side:
        cmd += ["--shorter-side", str(args.shorter_side)]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return str(out)
