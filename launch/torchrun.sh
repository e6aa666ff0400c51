#!/usr/bin/env bash
# Start train.py with torchrun on this node; run it once per node.
#
# One node (all visible GPUs, or NPROC_PER_NODE processes):
#   launch/torchrun.sh --data SHARDS [train.py flags...]
# Several nodes, static rendezvous (fixed node ranks), on every node:
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 address> MASTER_PORT=29500 \
#       launch/torchrun.sh --data SHARDS ...
# Several nodes, c10d rendezvous (elastic; ranks by arrival; same command everywhere):
#   NNODES=2 RDZV_BACKEND=c10d RDZV_ENDPOINT=<node 0 address>:29400 RDZV_ID=<job id> \
#       launch/torchrun.sh --data SHARDS ...
# CPU only (gloo; train.py picks the CPU when no GPU is visible):
#   NPROC_PER_NODE=2 OMP_NUM_THREADS=1 launch/torchrun.sh --data SHARDS --pretrained none --precision no ...
#
# Environment: NPROC_PER_NODE [GPUs torch sees (CUDA_VISIBLE_DEVICES), else 1], NNODES [1], NODE_RANK [0],
# MASTER_ADDR [127.0.0.1], MASTER_PORT [29500], RDZV_BACKEND [static], RDZV_ENDPOINT
# [$MASTER_ADDR:$MASTER_PORT], RDZV_ID [hotdog], PYTHON [python3], TRAIN_PY [train.py next
# to this script's directory], PREEMPT_SIGNALS [SIGUSR1]: signals torchrun forwards to its workers
# besides its default SIGTERM,SIGINT,SIGHUP,SIGQUIT (train.py checkpoints and exits 75 on USR1/TERM).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
TRAIN_PY=${TRAIN_PY:-$here/../train.py}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_BACKEND=${RDZV_BACKEND:-static}
PREEMPT_SIGNALS=${PREEMPT_SIGNALS:-SIGUSR1}

if [ -z "${NPROC_PER_NODE:-}" ]; then
    # One process per GPU that torch sees: honours CUDA_VISIBLE_DEVICES and Slurm's binding, and counts a
    # MIG-partitioned GPU as the one device a process can use (`nvidia-smi -L` lists every MIG instance).
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    [ "$NPROC_PER_NODE" -ge 1 ] || NPROC_PER_NODE=1      # no GPU: one CPU process
fi
if ! [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/torchrun.sh: NPROC_PER_NODE must be a positive number of processes, not '$NPROC_PER_NODE'" >&2
    exit 2
fi

cmd=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC_PER_NODE"
     # Without this torchrun would treat USR1 as fatal to itself and never tell the workers.
     --signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,$PREEMPT_SIGNALS")
if [ "$NNODES" = 1 ] && [ "$RDZV_BACKEND" = static ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
    # One node: a private rendezvous on a free port; parallel runs do not collide.
    cmd+=(--standalone)
elif [ "$RDZV_BACKEND" = c10d ]; then
    cmd+=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}"
          --rdzv_id "${RDZV_ID:-hotdog}")
else
    cmd+=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi
echo "[torchrun.sh] host=$(hostname) node_rank=$NODE_RANK nnodes=$NNODES nproc_per_node=$NPROC_PER_NODE" \
     "rdzv=$RDZV_BACKEND" >&2
exec "${cmd[@]}" "$TRAIN_PY" "$@"
