#!/usr/bin/env bash
# Fine-tune ResNet-18 on the hotdog shards across Slurm nodes.
#
#   mkdir -p logs && sbatch slurm/finetune.sh --data SHARDS_DIR [train.py flags...]
#
# One Slurm task per node runs the launcher (accelerate launch by default,
# torchrun with LAUNCHER=torchrun); the launcher starts one training process
# per GPU on its node. Every argument after the script name goes to train.py
# unchanged; this script adds `--output-dir "$RUN_DIR" --resume auto` in front
# of them, so a requeued job continues from its newest checkpoint (a flag given
# again on the command line wins: argparse keeps the last value).
#
# The header holds real GPU defaults. Override any of them on the sbatch
# command line (it wins over #SBATCH lines), e.g.
#   sbatch --nodes=4 --gpus-per-node=8 --time=12:00:00 slurm/finetune.sh --data ...
#
# Environment knobs (exported by sbatch's default --export=ALL):
#   RUN_DIR         run directory            [$SLURM_SUBMIT_DIR/runs/$SLURM_JOB_NAME-$SLURM_JOB_ID]
#   TRAIN_PY        training script          [$SLURM_SUBMIT_DIR/train.py]
#   PYTHON          interpreter with torch + accelerate   [python3]
#   LAUNCHER        accelerate | torchrun    [accelerate]
#   NPROC_PER_NODE  processes per node       [GPUs torch sees in the step (at most Slurm's), else 1]
#   USE_CPU         1 = CPU-only nodes (gloo), 0 = GPUs, empty = GPUs if torch sees any
#   RDZV_BACKEND    static | c10d            [static]
#   MASTER_PORT     rendezvous port          [derived from the job id]
#   ACCELERATE_CONFIG   optional accelerate config file (launch/*.yaml); flags set here win
#   MIXED_PRECISION fp16 | bf16: accelerate's mixed_precision for both launchers; train.py uses it unless
#                   --precision is given (then one line says which wins). Unset or 'no': train.py's
#                   --precision auto decides ('no' is also accelerate's default); fp32: pass --precision no
#   DYNAMO_BACKEND  accelerate's dynamo_backend (e.g. inductor): train.py compiles with it unless
#                   --compile / --no-compile is given
#   PREEMPT_SIGNAL  signal forwarded to the training on preemption [USR1]
#   SHUTDOWN_TIMEOUT seconds the launcher waits for workers to checkpoint and exit
#                   after forwarding a signal, before SIGKILL   [120]
#   MAX_REQUEUES    give up requeueing after this many restarts  [20]
#
# Preemption / time limit (see docs/cluster.md, "Signals"):
#   --signal=B:USR1@300 makes Slurm send USR1 to this batch shell only, about
#   300 s (give or take up to a minute) before the time limit. The trap below
#   records that and forwards $PREEMPT_SIGNAL to the srun step; srun hands it to
#   the launcher on every node, and the launcher (told via
#   PET_SIGNALS_TO_HANDLE) forwards it to its workers. train.py then agrees
#   across ranks at a step boundary, checkpoints, and exits 75. The launcher
#   itself then exits 1 (torch re-raises the signal as an exception), so the
#   decision to requeue is taken from the trap's flag, not from an exit code:
#   preemption requested and training not finished -> `scontrol requeue`.
#
#SBATCH --job-name=hotdog-finetune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# (Slurm does not create the log directory: `mkdir -p logs` before sbatch.)

set -euo pipefail

log() { echo "[finetune $(date -u +%FT%TZ) batch] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm/finetune.sh: submit with sbatch (see the header); SLURM_JOB_ID is not set" >&2
    exit 2
fi

# --------------------------------------------------------------- preemption
# Installed first so a signal that arrives during setup is not lost (bash's
# default action for USR1 would kill the script without a requeue).
PREEMPT_SIGNAL=${PREEMPT_SIGNAL:-USR1}
PREEMPT_REQUESTED=0
SRUN_PID=""
on_preempt() {
    if [ "$PREEMPT_REQUESTED" = 1 ]; then
        # Once is enough: a second signal would interrupt the launcher while it
        # waits for its workers to finish the checkpoint.
        log "got SIG$1 again; already stopping"
        return
    fi
    log "got SIG$1: asking the training to checkpoint and stop (forwarding SIG$PREEMPT_SIGNAL to srun)"
    PREEMPT_REQUESTED=1
    if [ -n "$SRUN_PID" ]; then
        # srun relays the signal to the task (the launcher) on every node.
        kill -s "$PREEMPT_SIGNAL" "$SRUN_PID" 2>/dev/null || true
    fi
}
trap 'on_preempt USR1' USR1
# SIGTERM reaches this shell when the job is cancelled, hits its time limit or
# is preempted by Slurm; Slurm signals the steps itself, and requeues on its own
# when preemption says so. Only wait so the step can checkpoint (within
# KillWait); never requeue here, or `scancel` could not end the job.
on_term() { log "got SIGTERM: Slurm is ending the job; waiting for the step"; }
trap on_term TERM

# ------------------------------------------------------------------- layout
PYTHON=${PYTHON:-python3}
LAUNCHER=${LAUNCHER:-accelerate}
TRAIN_PY=${TRAIN_PY:-$SLURM_SUBMIT_DIR/train.py}
RUN_DIR=${RUN_DIR:-$SLURM_SUBMIT_DIR/runs/${SLURM_JOB_NAME:-finetune}-$SLURM_JOB_ID}
RDZV_BACKEND=${RDZV_BACKEND:-static}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-120}
MAX_REQUEUES=${MAX_REQUEUES:-20}
case "$LAUNCHER" in accelerate|torchrun) ;; *)
    echo "slurm/finetune.sh: LAUNCHER must be accelerate or torchrun, not '$LAUNCHER'" >&2; exit 2;;
esac

# The first node of the allocation hosts the rendezvous. Every task resolves
# this name itself, so it must resolve on all nodes (it does on a cluster).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
# A port derived from the job id: stable across a requeue (same id), distinct
# for two jobs sharing a head node. Range 20000-39999.
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
NNODES=${SLURM_NNODES:-1}

mkdir -p "$RUN_DIR"
log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} nodes=$NNODES ($SLURM_JOB_NODELIST)" \
    "master=$MASTER_ADDR:$MASTER_PORT launcher=$LAUNCHER run_dir=$RUN_DIR"

# The launcher handles only SIGTERM/INT/HUP/QUIT unless told otherwise; this is
# torchrun's --signals-to-handle read from the environment, which also works
# under `accelerate launch` (it builds torch's parser, whose defaults read PET_*).
export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIG$PREEMPT_SIGNAL"
# How long the launcher waits for its workers after forwarding a signal
# (torch's default of 30 s may be too short for a step plus a checkpoint).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT
export PYTHON LAUNCHER TRAIN_PY RUN_DIR RDZV_BACKEND MASTER_ADDR MASTER_PORT NNODES
export PYTHONUNBUFFERED=1

# ----------------------------------------------------------- per-node task
# Runs once on every node (srun --ntasks-per-node=1). Single-quoted: the node
# rank ($SLURM_NODEID) and the GPU count are expanded inside each task, on its
# own node. Arguments: train.py's extra flags.
TASK='
set -euo pipefail
# The GPUs this step may use, as torch counts them: Slurm binds the step to its GPUs through
# CUDA_VISIBLE_DEVICES (and cgroups), and a MIG-partitioned GPU is one device per process (`nvidia-smi -L`
# would list every GPU of the node and every MIG instance).
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ -z "${USE_CPU:-}" ]; then
    if [ "$GPUS" -gt 0 ]; then USE_CPU=0; else USE_CPU=1; fi
fi
if [ "$USE_CPU" = 0 ] && [ "$GPUS" -eq 0 ]; then
    echo "slurm/finetune.sh: USE_CPU=0 but torch sees no GPU on $(hostname)" \
         "(CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})" >&2
    exit 2
fi
if [ -n "${NPROC_PER_NODE:-}" ]; then NPROC=$NPROC_PER_NODE
elif [ "$USE_CPU" = 0 ]; then
    # One process per GPU; never more than Slurm gave the node (unbound GPUs belong to other jobs).
    NPROC=$GPUS
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "$SLURM_GPUS_ON_NODE" -lt "$NPROC" ]; then NPROC=$SLURM_GPUS_ON_NODE; fi
else NPROC=1
fi
NODE_RANK=$SLURM_NODEID
WORLD=$((NNODES * NPROC))
# The CPUs this step may run on (the srun below passes --cpus-per-task, else it would be one).
CPUS=$(nproc)
# Give each process its share of them (torch would start a thread per CPU in every process).
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS=$(( CPUS / NPROC )); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
fi
echo "[finetune $(date -u +%FT%TZ) node] host=$(hostname) node_rank=$NODE_RANK nproc=$NPROC" \
     "world_size=$WORLD device=$([ "$USE_CPU" = 1 ] && echo cpu || echo gpu) gpus_seen=$GPUS" \
     "slurm_gpus=${SLURM_GPUS_ON_NODE:-none} cpus=$CPUS launcher=$LAUNCHER" \
     "master=$MASTER_ADDR:$MASTER_PORT restart=${SLURM_RESTART_COUNT:-0}"
if [ "$USE_CPU" = 1 ]; then export ACCELERATE_USE_CPU=1; fi
# accelerate launch passes its settings on as these variables; torchrun does not, so set them here.
if [ -n "${MIXED_PRECISION:-}" ]; then export ACCELERATE_MIXED_PRECISION=$MIXED_PRECISION; fi
if [ -n "${DYNAMO_BACKEND:-}" ]; then export ACCELERATE_DYNAMO_BACKEND=$DYNAMO_BACKEND; fi
if [ "$LAUNCHER" = accelerate ]; then
    cmd=("$PYTHON" -m accelerate.commands.launch)
    [ -n "${ACCELERATE_CONFIG:-}" ] && cmd+=(--config_file "$ACCELERATE_CONFIG")
    # --multi_gpu is the DDP launcher; with ACCELERATE_USE_CPU=1 it runs gloo on CPU.
    [ "$WORLD" -gt 1 ] && cmd+=(--multi_gpu)
    cmd+=(--num_machines "$NNODES" --machine_rank "$NODE_RANK" --num_processes "$WORLD"
          --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
          --rdzv_backend "$RDZV_BACKEND")
    # Only when set: else the values of ACCELERATE_CONFIG (or the defaults of accelerate) apply.
    [ -n "${MIXED_PRECISION:-}" ] && cmd+=(--mixed_precision "$MIXED_PRECISION")
    [ -n "${DYNAMO_BACKEND:-}" ] && cmd+=(--dynamo_backend "$DYNAMO_BACKEND")
    cmd+=("$TRAIN_PY")
else
    cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC")
    if [ "$RDZV_BACKEND" = c10d ]; then
        # Elastic rendezvous: node ranks are assigned by arrival, not SLURM_NODEID.
        cmd+=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID")
    else
        cmd+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    fi
    cmd+=("$TRAIN_PY")
fi
exec "${cmd[@]}" --output-dir "$RUN_DIR" --resume auto "$@"
'

if [ "$PREEMPT_REQUESTED" = 1 ]; then
    log "preemption requested before the training started"
    rc=1
else
    # In the background so the traps run at once (bash runs a trap only after
    # the foreground command returns). --kill-on-bad-exit=0: on preemption a
    # node's launcher exits non-zero as soon as its workers are done; that must
    # not kill a node that is still writing the checkpoint. A crashed node makes
    # the others fail in their next collective (gloo/NCCL error or train.py's
    # --collective-timeout) instead.
    # --cpus-per-task again: since Slurm 22.05 srun no longer inherits it from the batch job, and each
    # node's task (launcher, ranks, loader workers) would be bound to a single CPU.
    srun --nodes="$NNODES" --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
        --kill-on-bad-exit=0 --export=ALL bash -c "$TASK" finetune-task "$@" &
    SRUN_PID=$!
    # `wait` returns early (status > 128) when a trapped signal arrives; keep
    # waiting until srun itself has exited and we have its status.
    while :; do
        rc=0
        wait "$SRUN_PID" || rc=$?
        kill -0 "$SRUN_PID" 2>/dev/null || break
    done
    SRUN_PID=""
fi

if [ "$rc" -eq 0 ]; then
    log "training finished (srun exit 0)"
    exit 0
fi
if [ "$PREEMPT_REQUESTED" = 1 ]; then
    restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
        log "preempted (srun exit $rc) but already restarted $restarts times (MAX_REQUEUES=$MAX_REQUEUES); not requeueing"
        exit "$rc"
    fi
    log "preempted (srun exit $rc); requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    # The requeued job keeps its id, so RUN_DIR and MASTER_PORT stay the same and
    # `--resume auto` picks up the newest complete checkpoint.
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
log "training failed (srun exit $rc)"
exit "$rc"
