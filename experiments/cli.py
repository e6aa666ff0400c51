"""Command line: `compare` runs the variants and writes the table and plot; `report` re-renders them.

Exit codes of `compare`: 0 every variant that ran finished (skipped ones are listed with their reason),
1 at least one variant failed (the others still ran; see results.md), 2 usage error (nothing ran),
130 interrupted (the results so far are written)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError, cli_main

from . import errors, plan, report, slurm
from .run import launcher_argv, prepare_out, run_variant, summarize_metrics


def _machine() -> str:
    import torch
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU"
    return f"{platform.machine()} {platform.system()}, {cpus} CPU cores, {gpus}; torch {torch.__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", usage="python -m experiments compare --data DIR [options] [-- train.py flags]",
                       help="run the variants on the same shards and seed; write table and plot",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Run fine-tune / scratch / frozen / head934 / lr-sweep variants through "
                                   "train.py. Flags after '--' go to every train.py run, e.g. "
                                   "`-- --epochs 3 --image-size 96`.")
    c.add_argument("--data", required=True, help="shard directory from `python -m data_prep`")
    c.add_argument("--out", default="runs/compare", help="one run directory per variant, results.md/json, "
                                                         "test_acc.png")
    c.add_argument("--variants", default=plan.DEFAULT_VARIANTS,
                   help=f"comma-separated groups from {', '.join(plan.GROUPS)}, or 'all'")
    c.add_argument("--lrs", default=plan.DEFAULT_LRS, help="backbone lrs of the 'lr' group (fine-tune)")
    c.add_argument("--scratch-lrs", default=plan.DEFAULT_SCRATCH_LRS, help="lrs of the 'scratch-lr' group")
    c.add_argument("--pretrained", default="auto",
                   help="'auto': torchvision's cached ImageNet weights if present, else none (said plainly); "
                        "'imagenet': cached or downloaded now, else an error; 'none'; or PATH to a ResNet-18 "
                        "state dict")
    c.add_argument("--seed", type=int, default=0, help="train.py --seed of every run")
    c.add_argument("--seeds", help="comma-separated seeds: every variant runs once per seed, and the table shows "
                                   "the mean and a 95%% interval over them (e.g. 0,1,2; overrides --seed)")
    c.add_argument("--launcher", default="python",
                   help="how to start train.py: 'python' (this interpreter), or e.g. 'accelerate launch "
                        "--num_processes 4' or 'torchrun --nproc_per_node 8'; 'slurm': submit every run as one "
                        "Slurm job array (one task per run, requeued on preemption) and return; gather the table "
                        "later with `python -m experiments report --out OUT`")
    c.add_argument("--sbatch-args", default="",
                   help="with --launcher slurm: extra sbatch options for the job array, e.g. \"--partition gpu "
                        "--time 02:00:00\", or on a CPU-only cluster \"--gpus-per-node=0 --cpus-per-task=4\"")
    c.add_argument("--overwrite", action="store_true", help="replace run directories of an earlier comparison")
    c.add_argument("--dry-run", action="store_true", help="print the train.py commands and stop")
    c.add_argument("--quiet", action="store_true", help="do not echo train.py's output (it is in OUT/logs/)")
    r = sub.add_parser("report", help="re-read the runs under OUT and rewrite results.md/json and test_acc.png")
    r.add_argument("--out", default="runs/compare")
    return parser


@dataclass
class Plan:
    """Everything `compare` decided before any run starts."""
    data: str
    out: Path
    manifest: object            # finetune.data.manifest.Manifest
    weights: plan.Weights
    variants: list[plan.Variant]
    argvs: dict[str, list[str]]  # variant name -> its full command line
    seeds: list[int]


def compare(args, train_args: list[str], argv: list[str]) -> int:
    p = make_plan(args, train_args)
    print_plan(p)
    if args.dry_run:
        return 0
    prepare_out(p.out, p.variants, args.overwrite)
    results = dict(command="python -m experiments " + shlex.join(argv), data=p.data, out=str(p.out),
                   classes=", ".join(p.manifest.classes), pretrained=args.pretrained,
                   weights_value=p.weights.value, weights_source=p.weights.source, weights_note=p.weights.note,
                   seed=p.seeds[0], seeds=p.seeds, train_args=train_args, launcher=args.launcher, machine=_machine(),
                   started=time.strftime("%Y-%m-%d %H:%M:%S"), variants=[])
    if args.launcher.strip() == slurm.LAUNCHER:
        return submit_array(p, results, slurm.parse_sbatch_args(args.sbatch_args))
    interrupted = run_all(p, results["variants"], results, quiet=args.quiet)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report.write_all(results, p.out)
    return finish(p, results["variants"], interrupted)


def make_plan(args, train_args: list[str]) -> Plan:
    """Every check that can fail before a run starts: shards, flags, weights, variants, launcher."""
    from finetune.data.manifest import load_manifest

    data = os.path.abspath(args.data)
    out = Path(args.out).absolute()
    manifest = load_manifest(data)
    plan.check_train_args(train_args)
    weights = plan.resolve_weights(args.pretrained, plan.train_arch(train_args))
    groups = list(plan.GROUPS) if args.variants.strip() == "all" else \
        [g.strip() for g in args.variants.split(",") if g.strip()]
    seeds = plan.parse_seeds(args.seeds) if args.seeds else [args.seed]
    variants = plan.with_seeds(plan.build_variants(groups, weights, plan.parse_floats(args.lrs, "--lrs"),
                                                   plan.parse_floats(args.scratch_lrs, "--scratch-lrs")), seeds)
    common = ["--data", data, *train_args]
    if args.launcher.strip() == slurm.LAUNCHER:
        slurm.check_available()
        slurm.parse_sbatch_args(args.sbatch_args)
    launch = launcher_argv("python" if args.launcher.strip() == slurm.LAUNCHER else args.launcher)
    if shutil.which(launch[0]) is None:
        raise UsageError(f"--launcher {args.launcher}: {launch[0]} not found (is it installed / on PATH?)")
    argvs = {v.name: launch + common + ["--output-dir", str(out / v.name)] + v.flags for v in variants}
    plan.check_variant_configs(variants, common + ["--output-dir", str(out)])
    return Plan(data, out, manifest, weights, variants, argvs, seeds)


def print_plan(p: Plan) -> None:
    if p.weights.note:
        print(f"experiments: NOTE: {p.weights.note}", flush=True)
    print(f"experiments: {len([v for v in p.variants if not v.skip])} run(s) on {p.data} "
          f"({p.manifest.train.num_samples} train / {p.manifest.test.num_samples} test images), seed(s) "
          f"{','.join(map(str, p.seeds))}, "
          f"output {p.out}", flush=True)
    for v in p.variants:
        print(f"  {v.name:<16} " + (f"SKIPPED: {v.skip}" if v.skip else shlex.join(p.argvs[v.name])), flush=True)


def run_all(p: Plan, rows: list[dict], results: dict, *, quiet: bool) -> bool:
    """Run the variants one after the other, appending their rows and rewriting the results after each.
    Returns True when interrupted (Ctrl-C, or TERM: the running train.py gets TERM too, checkpoints and
    exits 75, and the rows so far are kept)."""
    old_term = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    pending = [dict(name=v.name, group=v.group, what=v.what, flags=v.flags, **v.extra,
                    **(dict(status="skipped", reason=v.skip) if v.skip else dict(status="not run", reason="not reached")))
               for v in p.variants]
    try:
        for i, v in enumerate(p.variants):
            print(f"experiments: [{i + 1}/{len(p.variants)}] {v.name}" + (f": skipped ({v.skip})" if v.skip else ""),
                  flush=True)
            try:
                row = run_variant(v, p.argvs[v.name], p.out, quiet=quiet)
            except KeyboardInterrupt:
                rows.append(dict(pending[i], status="failed", reason="interrupted", run_dir=str(p.out / v.name),
                                 **summarize_metrics(p.out / v.name)))
                rows.extend(x if x["status"] == "skipped" else dict(x, reason="interrupted") for x in pending[i + 1:])
                return True
            rows.append(row)
            _print_row(v.name, row)
            report.write_all(dict(results, variants=rows + pending[i + 1:]), p.out)
        return False
    finally:
        signal.signal(signal.SIGTERM, old_term)


def submit_array(p: Plan, results: dict, sbatch_args: list[str]) -> int:
    """--launcher slurm: every run that is not skipped becomes one task of one job array; results.json lists
    them as submitted (report fills in the rest)."""
    runs = [v for v in p.variants if not v.skip]
    rows = [dict(name=v.name, group=v.group, what=v.what, flags=v.flags, **v.extra,
                 **(dict(status="skipped", reason=v.skip) if v.skip else
                    dict(status="submitted", reason="queued", argv=p.argvs[v.name], run_dir=str(p.out / v.name),
                         log=str(p.out / "logs" / f"{v.name}.log"))))
            for v in p.variants]
    if not runs:
        results["variants"] = rows
        report.write_all(results, p.out)
        print("experiments: nothing to submit (every variant was skipped)", flush=True)
        return 0
    script = slurm.write_array_script(p.out, [(v.name, p.argvs[v.name]) for v in runs])
    job, cmd = slurm.submit(script, len(runs), sbatch_args)
    for i, v in enumerate(runs):
        next(r for r in rows if r["name"] == v.name).update(slurm_task=f"{job}_{i}", reason=f"job array {job}")
    results.update(variants=rows, slurm=dict(job_id=job, tasks=len(runs), script=str(script), sbatch=cmd))
    report.write_all(results, p.out)
    print(f"experiments: submitted job array {job} ({len(runs)} task(s)): {shlex.join(cmd)}\n"
          f"experiments: logs in {p.out / 'logs'}; when the tasks are done: "
          f"python -m experiments report --out {p.out}", flush=True)
    return 0


def _print_row(name: str, row: dict) -> None:
    if row["status"] == "ok":
        print(f"experiments: {name}: final test acc {row['final_test_acc']:.3f}, best "
              f"{row['best_test_acc']:.3f} (epoch {row['best_epoch']}), {row['duration_s']:.0f} s", flush=True)
    elif row["status"] == "failed":
        print(f"experiments: {name} FAILED ({row['reason']}); log: {row['log']}", flush=True)


def finish(p: Plan, rows: list[dict], interrupted: bool) -> int:
    """Where the results are, and the exit code: 130 interrupted, 1 some variant failed, else 0."""
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    print(f"experiments: table {p.out / 'results.md'}, plot {p.out / 'test_acc.png'}, "
          f"TensorBoard: tensorboard --logdir {p.out}", flush=True)
    if p.weights.note:
        print(f"experiments: NOTE: {p.weights.note}", flush=True)
    if interrupted:
        print("experiments: interrupted; results so far are written", file=sys.stderr)
        return 130
    if failed:
        print(f"experiments: {len(failed)} variant(s) failed: {', '.join(failed)} (the others ran; see "
              f"results.md)", file=sys.stderr)
        return 1
    return 0


def rerender(args) -> int:
    out = Path(args.out).absolute()
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{out / 'results.json'}: cannot read it ({e})") from None
    array = results.get("slurm")
    waiting = slurm.unfinished_tasks(array["job_id"]) if array else 0
    for row in results["variants"]:
        if row["status"] in ("ok", "failed", "submitted") and row.get("run_dir"):
            row.update(summarize_metrics(Path(row["run_dir"])))
        if array and row.get("slurm_task"):
            row.update(_array_status(row, waiting))
    report.write_all(results, out)
    print(f"experiments: wrote {out / 'results.md'} and {out / 'test_acc.png'}")
    sheet = errors.write_errors(results, out)      # the best run's misclassified test photos
    print(f"experiments: wrote {sheet}" if sheet else "experiments: no finished run with a model.pt: no errors.png")
    pending = [r["name"] for r in results["variants"] if r["status"] == "submitted"]
    if pending:
        print(f"experiments: {len(pending)} run(s) of job array {array['job_id']} not finished yet: "
              f"{', '.join(pending)}; run report again when they are", flush=True)
    return 0


def _array_status(row: dict, waiting: int | None) -> dict:
    """A job-array run's status from its run directory and the queue: ok once train.py wrote its final
    metrics; while the array still has tasks in the queue (or squeue cannot tell), submitted; else failed."""
    if row.get("complete"):
        return dict(status="ok", reason="")
    if waiting is None or waiting > 0:
        return dict(status="submitted", reason=f"queued or running (task {row['slurm_task']})")
    from .run import _last_line
    return dict(status="failed", reason="job array finished without final metrics: " +
                (_last_line(Path(row["log"])) or "no output"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    if args.command == "compare":
        return cli_main("experiments", lambda: compare(args, train_args, argv))
    return cli_main("experiments", lambda: rerender(args))
