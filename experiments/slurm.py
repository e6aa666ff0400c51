"""`compare --launcher slurm`: the variants x seeds as ONE Slurm job array, one train.py run per array task.

OUT/slurm/array.sh is written with every run's command in it (task i runs run i) and submitted with
`sbatch --array=0-(N-1)`; train.py gets `--resume auto`, so a requeued task continues from its newest
checkpoint. Preemption works as in slurm/finetune.sh: `--signal=B:USR1@300` reaches the task's batch shell,
which forwards USR1 to train.py; train.py checkpoints and exits 75 and the shell runs
`scontrol requeue JOBID_TASKID`. `python -m experiments report --out OUT` gathers the table whenever asked:
finished runs are rows, the others are listed as still queued or running."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from finetune import UsageError

LAUNCHER = "slurm"

HEADER = """#!/usr/bin/env bash
# Written by `python -m experiments compare --launcher slurm`; task i of the array runs run i below.
# GPU defaults; `--sbatch-args` (given on the sbatch command line) override them, e.g. on a CPU-only
# cluster: --sbatch-args "--gpus-per-node=0 --cpus-per-task=4".
#SBATCH --job-name={job_name}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={logs}/slurm-%A_%a.out
"""

BODY = r"""
set -uo pipefail
log() { echo "[compare $(date -u +%FT%TZ) task ${SLURM_ARRAY_TASK_ID:-?}] $*"; }
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "array.sh: submit with sbatch --array (python -m experiments compare --launcher slurm)" >&2
    exit 2
fi
case "$SLURM_ARRAY_TASK_ID" in
@CASES@
    *) echo "array.sh: no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2;;
esac
MAX_REQUEUES=${MAX_REQUEUES:-20}
PREEMPTED=0
CHILD=""
on_preempt() {
    [ "$PREEMPTED" = 1 ] && return
    PREEMPTED=1
    log "got SIGUSR1: asking train.py to checkpoint and stop"
    [ -n "$CHILD" ] && kill -s USR1 "$CHILD" 2>/dev/null || true
}
trap on_preempt USR1
trap 'log "got SIGTERM: Slurm is ending the job"' TERM
# Threads for this task's CPUs (torch would otherwise start one per CPU of the node).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}} PYTHONUNBUFFERED=1
log "run $NAME job ${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID restart ${SLURM_RESTART_COUNT:-0} on $(hostname)"
echo "$ ${CMD[*]} --resume auto" >> "$LOG"
"${CMD[@]}" --resume auto >> "$LOG" 2>&1 &
CHILD=$!
while :; do
    rc=0
    wait "$CHILD" || rc=$?
    kill -0 "$CHILD" 2>/dev/null || break
done
if [ "$rc" = 0 ]; then log "run $NAME finished"; exit 0; fi
if [ "$PREEMPTED" = 1 ] || [ "$rc" = 75 ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
        log "preempted (exit $rc) but restarted ${SLURM_RESTART_COUNT:-0} times already; not requeueing"
        exit "$rc"
    fi
    log "preempted (exit $rc); requeueing ${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID"
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID"
    exit 0
fi
log "run $NAME failed (exit $rc); see $LOG"
exit "$rc"
"""


def check_available() -> None:
    if shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm: sbatch not found (run on a Slurm login node, or choose another "
                         "--launcher)")


def parse_sbatch_args(text: str | None) -> list[str]:
    try:
        return shlex.split(text or "")
    except ValueError as e:
        raise UsageError(f"--sbatch-args: {e}") from None


def write_array_script(out: Path, runs: list[tuple[str, list[str]]], job_name: str = "hotdog-compare") -> Path:
    """OUT/slurm/array.sh: task i runs runs[i] = (name, argv), logging to OUT/logs/<name>.log."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cases = "\n".join(
        f"    {i}) NAME={shlex.quote(name)}; LOG={shlex.quote(str(logs / (name + '.log')))}; "
        f"CMD=({shlex.join(argv)});;" for i, (name, argv) in enumerate(runs))
    path = out / "slurm" / "array.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER.format(job_name=job_name, logs=logs) + BODY.replace("@CASES@", cases))
    path.chmod(0o755)
    return path


def submit(script: Path, tasks: int, sbatch_args: list[str]) -> tuple[int, list[str]]:
    """sbatch --array=0-(tasks-1) [sbatch_args] script; returns (job id, the command)."""
    cmd = ["sbatch", "--parsable", f"--array=0-{tasks - 1}", *sbatch_args, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=script.parent)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
        raise UsageError(f"sbatch refused the job array: {lines[-1]}")
    return int(proc.stdout.strip().split(";")[0]), cmd


def unfinished_tasks(job_id: int) -> int | None:
    """How many tasks of the array are still queued or running (None: squeue cannot tell)."""
    if shutil.which("squeue") is None:
        return None
    proc = subprocess.run(["squeue", "-h", "-r", "-j", str(job_id), "-o", "%i"], capture_output=True, text=True)
    if proc.returncode != 0:
        return 0 if "Invalid job id" in proc.stderr else None
    return len([line for line in proc.stdout.splitlines() if line.strip()])
