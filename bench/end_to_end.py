"""End to end: `train.py` with its defaults vs the d2l-style fp32 loop (bench/d2l_baseline.py), each in its
own process, on the same real photos, same batch size, epochs and number of DataLoader workers.

    .venv/bin/python bench/end_to_end.py                 # ~4-5 min on 2 CPU cores; --help for every flag

Reported for both: examples/sec end to end (data wait + compute of the timed train steps), compute-only
examples/sec, and the data-wait fraction -- train.py's own metrics.json figures, and the same
finetune.monitor.StepTimer inside the baseline (the first steps of each epoch left out). Weights start
random on both sides (`--pretrained none`; the speed does not depend on the values). The two runs
alternate within each repeat; the table shows medians over all timed epochs.

Add train.py flags after `--`, e.g. `-- --precision no` or `-- --compile`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import COLUMNS, REPO, add_data_args, goal_row, in_turn, machine, median, shards_for, table

from finetune.data.streams import auto_workers


def run_ours(shards, args, extra, out_dir) -> list[dict]:
    cmd = [sys.executable, str(REPO / "train.py"), "--data", shards, "--pretrained", "none",
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--output-dir", out_dir,
           "--workers", str(args.workers), "--max-steps-per-epoch", str(args.max_steps_per_epoch)] + extra
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(Path(out_dir, "metrics.json").read_text())["epochs"]


def run_d2l(args) -> list[dict]:
    cmd = [sys.executable, str(REPO / "bench" / "d2l_baseline.py"), "--source", args.source,
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--max-steps-per-epoch", str(args.max_steps_per_epoch)]
    out = subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.PIPE, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="train.py flags go after --",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(p)
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (each epoch times its own steps)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (train.py and d2l default: 128)")
    p.add_argument("--workers", type=int, default=-1,
                   help="DataLoader workers for both (-1: finetune.data.streams.auto_workers(1), train.py's default)")
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help="cap on steps per epoch (0: all)")
    p.add_argument("--repeats", type=int, default=3, help="repeats (ours and baseline alternate)")
    p.add_argument("--goal", type=float, default=2.0, help="goal for ours / baseline (end-to-end examples/sec)")
    p.add_argument("--wait-goal", type=float, default=0.05, help="goal for our data-wait fraction (below)")
    args = p.parse_args(argv)
    args.workers = args.workers if args.workers >= 0 else auto_workers(1)
    shards = shards_for(args)
    print(machine())
    print(f"train.py --data {shards} --pretrained none --epochs {args.epochs} --batch-size {args.batch_size} "
          f"--workers {args.workers} {' '.join(extra)}  vs  bench/d2l_baseline.py --source {args.source}; "
          f"{args.repeats} repeats")

    ours, base = [], []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for r in range(args.repeats):
            sides = [("ours", lambda: run_ours(shards, args, extra, f"{tmp}/run{r}"), ours),
                     ("d2l", lambda: run_d2l(args), base)]
            for name, fn, acc in in_turn(r, sides):
                epochs = fn()
                acc += epochs
                for e in epochs:
                    print(f"  repeat {r + 1} {name:4s} epoch {e['epoch']}: {e['examples_per_sec']:6.2f} ex/s, "
                          f"compute-only {e['compute_examples_per_sec']:6.2f}, data wait "
                          f"{100 * e['data_wait_frac']:4.1f}%", flush=True)

    m = lambda runs, key: median([e[key] for e in runs])
    k = lambda runs, key: [e[key] for e in runs]      # per (repeat, epoch), paired by position
    rows = [goal_row("end-to-end examples/sec", k(ours, "examples_per_sec"), k(base, "examples_per_sec"),
                     args.goal, "ex/s", fmt="{:.2f}"),
            goal_row("compute-only examples/sec", k(ours, "compute_examples_per_sec"),
                     k(base, "compute_examples_per_sec"), args.goal, "ex/s", fmt="{:.2f}"),
            {"metric": "data-wait fraction", "ours": f"{100 * m(ours, 'data_wait_frac'):.1f} %",
             "baseline": f"{100 * m(base, 'data_wait_frac'):.1f} %", "goal": f"< {100 * args.wait_goal:.0f} %",
             "met?": "yes" if m(ours, "data_wait_frac") < args.wait_goal else "NO"}]
    rows[1]["goal"], rows[1]["met?"] = "(info)", ""
    print()
    print(table(rows, COLUMNS))

if __name__ == "__main__":
    main()
