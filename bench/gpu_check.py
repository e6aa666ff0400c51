"""GPU acceptance and figures in one command of at most 8 minutes (bench/gpu_check.sh calls this after it has
installed the wheels; docs/performance.md section 8 says how to run it and what every line means).

    python bench/gpu_check.py [--dry-run] [--t0 EPOCH] [--work DIR]

The plan is a list of lines, each one process with its own time budget, which is also its timeout: the
plan is printed first (PLAN lines, planned seconds), then every line prints FIG / PASS / FAIL / SKIP lines
and its time. A line that would not finish inside the total budget (GPU_CHECK_BUDGET, 480 s from --t0) is
skipped for time and says so. --dry-run runs nothing and needs no GPU: it prints the plan for the GPU
machine (GPU_CHECK_GPUS [1], GPU_CHECK_CORES [16], compute capability 9.0 assumed) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
PY = os.environ.get("PYTHON") or sys.executable
BATCHES = (128, 256)            # per-GPU batch sizes of the step figures
E2E_BATCH = 256                 # per-GPU batch of the end-to-end and loader-only figures
PREFETCH = 4                    # finetune.data.streams.make_loader's prefetch_factor
TRAIN_IMAGES = 1024             # distinct synthetic train images (256-px shorter side; repeated by replicate)


@dataclass
class Step:
    name: str
    budget: int                                  # seconds: planned, and the line's timeout
    what: str
    argv: list = field(default_factory=list)     # one command; empty: nothing to run (skip must say why)
    env: dict = field(default_factory=dict)
    skip: str = ""                               # non-empty: not run, for this reason
    report: Callable | None = None               # (step, rc, output) -> ok; prints its FIG/PASS/FAIL lines
    during: Callable | None = None               # started before the command; returns its stop()


@dataclass
class Facts:
    gpus: int
    cc: str
    gpu_name: str
    cores: int
    train_flags: str                             # train.py --help (which flags exist: --loader, --decode-on)
    dali: str                                    # "" when nvidia.dali imports, else why not

    @property
    def workers(self) -> int:                   # one core stays with the training process
        return max(1, self.cores - 1)


# ------------------------------------------------------------------------------------------------ facts
def probe(dry: bool) -> Facts:
    helptext = subprocess.run([PY, "train.py", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    dali = subprocess.run([PY, "-c", "import nvidia.dali"], capture_output=True, text=True)
    why = "" if dali.returncode == 0 else (dali.stderr.strip().splitlines() or ["import failed"])[-1]
    if dry:
        return Facts(int(os.environ.get("GPU_CHECK_GPUS", "1")), "9.0", "(dry run)",
                     int(os.environ.get("GPU_CHECK_CORES", "16")), helptext, why)
    code = ("import json, os, torch; n = torch.cuda.device_count(); print(json.dumps([n, '%d.%d' % "
            "torch.cuda.get_device_capability(0) if n else '0.0', torch.cuda.get_device_name(0) if n else '',"
            " len(os.sched_getaffinity(0))]))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    n, cc, name, cores = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else (0, "0.0", "", 1)
    return Facts(int(os.environ.get("GPU_CHECK_GPUS", n)), cc, name, cores, helptext, why)


def dali_gate(f: Facts) -> str:
    if "--loader" not in f.train_flags:
        return "train.py --help lists no --loader (the DALI loader is not in this checkout)"
    if f.dali:
        return (f"nvidia.dali does not import here ({f.dali}): its wheel (~200 MB) exceeds the device tool's "
                f"64 MiB carry limit; on a cluster node install the dali extra (nvidia-dali-cuda130)")
    return ""


# ------------------------------------------------------------------------------------------------- data
def data_step(f: Facts, work: Path) -> Step:
    src, base = work / "src", work / "shards"
    cmd = (f"{shlex.quote(PY)} -m data_prep synthetic --out {src} --train-per-class {TRAIN_IMAGES // 2} "
           f"--test-per-class 32 --min-side 256 --max-side 341 && {shlex.quote(PY)} -m data_prep prepare "
           f"--source {src} --out {base} --shorter-side 256 --samples-per-shard 128 --workers "
           f"{f.cores} --no-progress")
    return Step("data", 55, f"{TRAIN_IMAGES} train + 64 test synthetic JPEGs, sides 256-341 px -> shards at a "
                f"256-px shorter side; the train split then repeated by hard links (long epochs, same images)",
                ["bash", "-c", cmd])


def replicate(base: Path, out: Path, steps: int, batch: int) -> Path:
    """A shard folder whose train split lists every train shard k times (hard links, no copies), so one epoch
    lasts `steps` steps of `batch`; test split as is. With --data-order random the stream draws shards with
    replacement anyway: the same images, in the same proportions, only the epoch is longer."""
    m = json.loads((base / "manifest.json").read_text())
    train = m["splits"]["train"]
    k = max(1, math.ceil(steps * batch / train["num_samples"]))
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for copy in range(k):
        for s in train["shards"]:
            name = f"rep{copy:03d}-{s['name']}"
            if not (out / name).exists():
                os.link(base / s["name"], out / name)
            shards.append({**s, "name": name})
    for s in m["splits"]["test"]["shards"]:
        if not (out / s["name"]).exists():
            os.link(base / s["name"], out / s["name"])
    m["splits"]["train"] = {**{key: v for key, v in train.items() if key != "pattern"}, "shards": shards,
                            "num_samples": train["num_samples"] * k,
                            "class_counts": [c * k for c in train.get("class_counts", [])]}
    (out / "manifest.json").write_text(json.dumps(m, indent=1))
    return out


# ---------------------------------------------------------------------------------------------- figures
RESULTS: dict = {}              # what the lines measured, for the summary


def parse_results(out: str) -> list[dict]:
    return [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]


def figures(kind: str, argv_tail: list, budget: int, what: str, printer: Callable) -> Step:
    def report(step, rc, out):
        rows = parse_results(out)
        for r in rows:
            RESULTS.setdefault(r["kind"], []).append(r)
            print(printer(r) if r["kind"] != "skip" else f"SKIP {step.name}: {r['why']}")
        return rc == 0 and bool(rows)
    return Step(f"{kind}", budget, what, [PY, "bench/gpu_figures.py", kind, *map(str, argv_tail)], report=report)


def fig_bare(r):
    return f"FIG bare b{r['batch']} {r['precision']} {r['format']}: {r['img_s']:.0f} img/s (bare loop, no loader)"


def fig_step(r):
    if r["kind"] == "ema":
        return (f"FIG ema b{r['batch']}: --ema-decay {r['decay']} costs {r['ms_per_step']:+.2f} ms per step "
                f"({r['ours']:.0f} -> {r['ours_ema']:.0f} img/s)")
    return (f"FIG step b{r['batch']} {r['precision']} channels_last: ours {r['ours']:.0f} img/s, bare loop "
            f"{r['bare']:.0f} img/s, ratio {r['ours'] / r['bare']:.3f} (step overhead {r['overhead_ms']:+.2f} ms)")


def fig_compile(r):
    eager = [x["ours"] for x in RESULTS.get("step", []) if x["batch"] == r["batch"]]
    vs = f", eager {eager[0]:.0f} img/s, {r['img_s'] / eager[0]:.2f}x" if eager else ""
    return (f"FIG compile b{r['batch']} {r['precision']}: ours --compile {r['img_s']:.0f} img/s{vs} "
            f"(first 2 steps incl. compilation {r['compile_s']:.0f} s)")


def fig_loader(r):
    window = (f"{r['batches']} batches in {r['seconds']:.1f} s = {r['batches'] / r['depth']:.1f}x the prefetch "
              f"depth of {r['depth']}" + ("" if r["steady"] else ", SHORT of 3x: not steady state"))
    return f"FIG loader {r['path']}: {r['img_s']:.0f} img/s loader only, {r['workers']} workers ({window})"


def loader_step(path: str, f: Facts, shards: Path) -> Step:
    step = figures("loader", ["--path", path, "--shards", shards, "--workers", f.workers, "--batch", E2E_BATCH,
                              "--seconds", 5, "--max-seconds", 10], 25,
                   f"loader only, {path}: pinned batches of {E2E_BATCH} arriving in the process, "
                   f"{f.workers} workers, after the first round, >= 3x the prefetch depth and >= 5 s", fig_loader)
    step.name = f"loader-{path}"
    step.skip = dali_gate(f) if path == "dali" else ""
    return step


# ------------------------------------------------------------------------------------------ end to end
E2E_FLAGS = {"torchvision": [], "opencv": ["--augment-with", "opencv"], "dali": ["--loader", "dali"],
             "device": ["--decode-on", "device"]}


def e2e_window(f: Facts) -> tuple[int, int]:
    """(steps left out, steps timed) of an end-to-end run. During the left-out steps (cudnn autotuning) the
    workers fill the prefetch queue (depth D = workers x 4 batches); 2D steps drain it when the loader is at
    most half the compute rate, and the timed window of 3D steps keeps what is left of it small."""
    depth = f.workers * PREFETCH
    return 2 * depth + 2, 3 * depth


def bound(epoch: dict) -> str:
    """What limits an end-to-end run: the step waited for data >= 10 % of the time, or it did not."""
    return "input-bound" if epoch["data_wait_frac"] >= 0.10 else "compute-bound"


def e2e_step(path: str, f: Facts, shards: Path, work: Path) -> Step:
    skip, win = e2e_window(f)
    argv = [PY, "train.py", "--data", shards, "--pretrained", "none", "--arch", "resnet18", "--image-size", 224,
            "--batch-size", E2E_BATCH, "--epochs", 1, "--workers", f.workers, "--precision", "auto",
            "--eval-limit", 256, "--timing-warmup", skip, "--max-steps-per-epoch", skip + win,
            "--output-dir", work / "runs" / f"e2e-{path}", *E2E_FLAGS[path]]   # --log-every: the default

    def report(step, rc, out):
        if rc != 0:
            return False
        e = json.loads((work / "runs" / f"e2e-{path}" / "metrics.json").read_text())["epochs"][0]
        e["path"] = path
        RESULTS.setdefault("e2e", []).append(e)
        print(f"FIG e2e {path}: {e['examples_per_sec']:.0f} img/s per GPU end to end, steps {skip + 1}-"
              f"{skip + win} of batch {E2E_BATCH} (compute only {e['compute_examples_per_sec']:.0f}, data wait "
              f"{100 * e['data_wait_frac']:.1f} %) -> {bound(e)}")
        return path != "torchvision" or check_precision_auto(f, out)
    what = (f"train.py, {path} path, ResNet-18 224 px, batch {E2E_BATCH}, --precision auto, {f.workers} workers: "
            f"1 epoch of {skip + win} steps, the first {skip} left out (--timing-warmup), {win} timed")
    step = Step(f"e2e-{path}", 45, what, argv, report=report)
    if path == "dali":
        step.skip = dali_gate(f)
    elif path == "device" and "--decode-on" not in f.train_flags:
        step.skip = "train.py --help lists no --decode-on"
    return step


def check_precision_auto(f: Facts, out: str) -> bool:
    want = "bf16" if int(f.cc.split(".")[0]) >= 8 else "fp16"
    ok = f"precision={want}" in out
    print(f"{'PASS' if ok else 'FAIL'} precision-auto: --precision auto -> {want} on compute capability {f.cc}")
    return ok


# ----------------------------------------------------------------------------------------------- checks
def short_flags(shards: Path, work: Path, name: str, log_every: int = 1) -> list:
    """A short real run (2 epochs x 6 steps of 32 at 128 px) for the checks: they test paths, not speed."""
    return ["--data", shards, "--pretrained", "none", "--epochs", 2, "--max-steps-per-epoch", 6, "--batch-size",
            32, "--image-size", 128, "--eval-limit", 64, "--workers", 2, "--log-every", log_every,
            "--output-dir", work / "runs" / name]


def check_steps(f: Facts, shards: Path, work: Path) -> list[Step]:
    scaler = ("import glob, sys, torch; c = torch.load(sorted(glob.glob(sys.argv[1] + '/checkpoints/ckpt-*.pt'))"
              "[-1], weights_only=True); assert c['scaler'] and c['scaler']['scale'] > 0, c.get('scaler')")

    def scaler_report(step, rc, out):
        ok = rc == 0 and subprocess.run([PY, "-c", scaler, str(work / "runs" / "fp16-scaler")]).returncode == 0
        print(f"{'PASS' if ok else 'FAIL'} fp16-scaler: --precision fp16 trains; its checkpoint holds a GradScaler "
              f"state with scale > 0")
        return ok

    def nosync_report(step, rc, out):
        print(f"{'PASS' if rc == 0 else 'FAIL'} no-sync: no implicit host-device sync inside a step under "
              f"torch.cuda.set_sync_debug_mode('error') (EMA update included)")
        return rc == 0
    return [
        Step("no-sync", 30, "FINETUNE_SYNC_DEBUG=error: every step after an epoch's first two runs under "
             "set_sync_debug_mode('error'), with --ema-decay 0.999",
             [PY, "train.py", *short_flags(shards, work, "no-sync", log_every=1000), "--precision", "auto",
              "--ema-decay", 0.999], env={"FINETUNE_SYNC_DEBUG": "error"}, report=nosync_report),
        Step("fp16-scaler", 25, "--precision fp16 with a GradScaler; its state must be in the checkpoint",
             [PY, "train.py", *short_flags(shards, work, "fp16-scaler"), "--precision", "fp16", "--save-every", 3],
             report=scaler_report),
    ]


# -------------------------------------------------------------------------------------------- all GPUs
def multi_gpu_steps(f: Facts, shards: Path, work: Path) -> list[Step]:
    """One process per GPU through accelerate launch (only where there are 2+ GPUs)."""
    if f.gpus < 2:
        return [Step(n, 0, "all GPUs", skip=f"needs 2+ GPUs (this machine has {f.gpus})")
                for n in ("nccl", "sync-bn", "fp16-sum")]
    launch = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", f.gpus, "--num_machines", 1,
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", 0, "train.py"]

    def argv(name, *extra):
        return [*launch, *short_flags(shards, work, name), "--batch-size", 32 * f.gpus, *extra]

    def plain(check):
        def report(step, rc, out):
            ok = rc == 0 and check(out)
            print(f"{'PASS' if ok else 'FAIL'} {step.name}: {step.what}")
            return ok
        return report
    return [
        Step("nccl", 60, f"{f.gpus} processes: backend=nccl, each rank's CUDA context on its own GPU only "
             f"(nvidia-smi sampled every second), BatchNorm buffers identical on every rank at the end",
             argv("nccl", "--precision", "auto", "--epochs", 3), report=lambda s, rc, out: nccl_report(f, work, rc, out),
             during=lambda: sample_contexts(work)),
        Step("sync-bn", 45, f"--sync-bn on {f.gpus} GPUs trains", argv("sync-bn", "--sync-bn"),
             report=plain(lambda out: True)),
        Step("fp16-sum", 45, f"fp16 + --loss-reduction sum on {f.gpus} GPUs: no skipped optimizer steps",
             argv("fp16-sum", "--precision", "fp16", "--loss-reduction", "sum"),
             report=plain(lambda out: "skipped" not in out.lower())),
    ]


def nccl_report(f: Facts, work: Path, rc: int, out: str) -> bool:
    ok = rc == 0 and re.search(f"world_size={f.gpus} .*backend=nccl", out) is not None
    print(f"{'PASS' if ok else 'FAIL'} nccl: {f.gpus} processes, backend=nccl")
    ranks = [json.loads(p.read_text()) for p in sorted((work / "runs" / "nccl" / "ranks").glob("rank-*.json"))]
    key = "final_buffer_sha256" if ranks and all("final_buffer_sha256" in r for r in ranks) else "final_param_sha256"
    same = len(ranks) == f.gpus and len({r.get(key) for r in ranks}) == 1 and bool(ranks[0].get(key))
    print(f"{'PASS' if same else 'FAIL'} bn-buffers: {key} identical on every rank")
    pids = {r["pid"]: r["rank"] for r in ranks}
    seen: dict = {}
    apps = work / "compute-apps.csv"
    for row in (apps.read_text().splitlines() if apps.exists() else []):
        pid, _, uuid = row.partition(",")
        if pid.strip().isdigit() and int(pid) in pids:
            seen.setdefault(int(pid), set()).add(uuid.strip())
    one = (len(pids) == f.gpus and set(seen) == set(pids) and all(len(g) == 1 for g in seen.values())
           and len({next(iter(g)) for g in seen.values()}) == f.gpus)
    print(f"{'PASS' if one else 'FAIL'} one-context: each rank's process has a CUDA context on its own GPU only "
          f"(seen: {({pids[p]: sorted(g) for p, g in seen.items()})})")
    return ok and same and one


def sample_contexts(work: Path) -> Callable:
    """Append nvidia-smi's compute apps to work/compute-apps.csv every second until the returned stop()."""
    loop = (f"while :; do nvidia-smi --query-compute-apps=pid,gpu_uuid --format=csv,noheader >> "
            f"{work / 'compute-apps.csv'} 2>/dev/null; sleep 1; done")
    proc = subprocess.Popen(["bash", "-c", loop], start_new_session=True)
    return lambda: (os.killpg(proc.pid, 9), proc.wait())


# ------------------------------------------------------------------------------------------------- plan
def plan(f: Facts, work: Path) -> list[Step]:
    base, rep = work / "shards", work / "shards-long"
    paths = ("torchvision", "opencv", "dali")
    step_figs = figures("step", ["--batch", *BATCHES, "--seconds", 3, "--ema-decay", 0.999], 50,
                        f"ours (train_one_epoch under train.py's Accelerator) vs a bare loop, --precision auto, "
                        f"channels_last, batch {' and '.join(map(str, BATCHES))}, 3 alternating repeats; then "
                        f"ours with --ema-decay 0.999", fig_step)
    compile_fig = figures("compile", ["--batch", E2E_BATCH, "--seconds", 3], 80,
                          f"ours with --compile (inductor), batch {E2E_BATCH}: compile time, then img/s "
                          f"(eager: the step line)", fig_compile)
    sweeps = []
    for b, budget in zip(BATCHES, (35, 40)):
        sweeps.append(figures("sweep", ["--batch", b, "--seconds", 1], budget,
                              f"bare loop, no loader, batch {b}: fp32 / bf16 / fp16 x NCHW / channels_last", fig_bare))
        sweeps[-1].name = f"sweep-b{b}"
    return [data_step(f, work),
            *(loader_step(p, f, base) for p in paths),
            *(e2e_step(p, f, rep, work) for p in paths),
            *sweeps, step_figs, *check_steps(f, base, work), compile_fig,
            e2e_step("device", f, rep, work),
            *multi_gpu_steps(f, base, work)]


def command(step: Step) -> str:
    env = " ".join(f"{k}={v}" for k, v in step.env.items())
    return ((env + " ") if env else "") + " ".join(shlex.quote(str(a)) for a in step.argv)


def print_plan(f: Facts, steps: list[Step], spent: float, budget: int) -> None:
    print(f"gpu_check: {f.gpus} GPU(s) {f.gpu_name}, compute capability {f.cc}, {f.cores} CPU cores -> "
          f"{f.workers} loader workers; budget {budget} s in all, {spent:.0f} s spent before the plan (wheels, probe)")
    total = spent
    for s in steps:
        total += 0 if s.skip else s.budget
        late = "" if s.skip or total <= budget else "  [over the budget as planned: runs only if earlier lines end early]"
        print(f"PLAN {s.name:<16} {0 if s.skip else s.budget:>3} s (by {total:>4.0f} s)  {s.what}{late}")
        if s.argv:
            print(f"     $ {command(s)}")
        if s.skip:
            print(f"     skipped: {s.skip}")


# -------------------------------------------------------------------------------------------------- run
def run_step(step: Step, deadline: float, work: Path) -> str:
    """'ok', 'fail', 'skip' or 'time' (not started: the line's budget no longer fits)."""
    if step.skip:
        print(f"SKIP {step.name}: {step.skip}")
        return "skip"
    left = deadline - time.time()
    if left < step.budget:
        print(f"SKIP {step.name}: skipped for time ({left:.0f} s of the budget left, the line needs up to "
              f"{step.budget} s)")
        return "time"
    log, t = work / f"{step.name}.log", time.time()
    stop = step.during() if step.during else None
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(a) for a in step.argv], cwd=REPO, env={**os.environ, **step.env}, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=step.budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)                # the whole group: loader workers, compile workers
            proc.wait()
            rc = None
    if stop:
        stop()
    out = log.read_text(errors="replace")
    # A report sees a timed-out line too (rc None): the figures it printed before the timeout still count.
    ok = step.report(step, rc, out) if step.report else rc == 0
    ok = ok and rc is not None
    if not ok:
        why = f"timed out after {step.budget} s" if rc is None else f"exit {rc}"
        last = (out.strip().splitlines() or [""])[-1][:200]
        print(f"FAIL {step.name}: {why} (log: {log}){': ' + last if last else ''}")
    print(f"TIME {step.name}: {time.time() - t:.0f} s of {step.budget} s")
    return "ok" if ok else "fail"


def summary(f: Facts, goal: float) -> bool:
    """The per-path lines, which path wins and by how much, and the best one against the goal (False: FAIL)."""
    loaders = {r["path"]: r["img_s"] for r in RESULTS.get("loader", [])}
    e2e = RESULTS.get("e2e", [])
    for e in e2e:
        lo = loaders.get(e["path"])
        print(f"FIG path {e['path']}: end to end {e['examples_per_sec']:.0f} img/s per GPU, loader only "
              f"{f'{lo:.0f}' if lo else '-'} img/s, compute only {e['compute_examples_per_sec']:.0f} img/s: {bound(e)}")
    if not e2e:
        return True
    best = max(e2e, key=lambda e: e["examples_per_sec"])
    default = [e for e in e2e if e["path"] == "torchvision"]
    if default and best is not default[0]:
        print(f"FIG best path: {best['path']}, {best['examples_per_sec'] / default[0]['examples_per_sec']:.2f}x the "
              f"default torchvision path end to end")
    line = (f"{best['examples_per_sec']:.0f} img/s per GPU end to end with the {best['path']} path (ResNet-18, "
            f"224 px, batch {E2E_BATCH}; goal >= {goal:.0f} per H100) on {f.gpu_name}")
    if "H100" not in f.gpu_name:
        print(f"INFO throughput: {line} (the goal is set for an H100; not judged here)")
        return True
    ok = best["examples_per_sec"] >= goal
    print(f"{'PASS' if ok else 'FAIL'} throughput: {line}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing (no GPU needed)")
    p.add_argument("--t0", type=float, default=0.0, help="when gpu_check.sh started (epoch seconds)")
    p.add_argument("--work", default="", help="work directory (default: a new /tmp/gpu_check.*)")
    args = p.parse_args()
    t0 = args.t0 or time.time()
    budget = int(os.environ.get("GPU_CHECK_BUDGET", "480"))
    f = probe(args.dry_run)
    if not args.dry_run and f.gpus == 0:
        print("gpu_check: no GPU on this machine (torch.cuda.device_count() == 0): nothing to check here; run it on "
              "a machine with GPUs (bash bench/gpu_check.sh --dry-run prints the plan)")
        return 0
    work = Path(args.work or (tempfile.gettempdir() + "/gpu_check" if args.dry_run
                              else tempfile.mkdtemp(prefix="gpu_check.")))
    steps = plan(f, work)
    # A dry run here says nothing about the GPU machine's start-up: count the planned 20 s (wheels ~5-15 s,
    # probe ~5 s) instead of this machine's.
    print_plan(f, steps, 20 if args.dry_run else time.time() - t0, budget)
    if args.dry_run:
        print("gpu_check: dry run: nothing was run")
        return 0
    work.mkdir(parents=True, exist_ok=True)
    deadline, status = t0 + budget, {}
    for step in steps:
        status[step.name] = run_step(step, deadline, work)
        if step.name == "data":
            if status["data"] != "ok":
                return 1
            replicate(work / "shards", work / "shards-long", sum(e2e_window(f)), E2E_BATCH)
    if not summary(f, float(os.environ.get("GPU_CHECK_GOAL", "10000"))):
        status["throughput"] = "fail"
    late = [n for n, s in status.items() if s == "time"]
    print(f"gpu_check: skipped for time: {', '.join(late) if late else 'nothing'}")
    print(f"gpu_check: {time.time() - t0:.0f} s in all (budget {budget} s); logs and runs in {work}")
    return 1 if "fail" in status.values() else 0


if __name__ == "__main__":
    sys.exit(main())
