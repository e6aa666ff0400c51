#!/usr/bin/env bash
# GPU acceptance in one command: every GPU-only path of train.py as a short real run with a PASS/FAIL line,
# then the end-to-end throughput in examples/sec per GPU beside the goal (>= 6,000 per H100, ResNet-18, 224 px).
#
#   bash bench/gpu_check.sh                  # on a machine with GPUs (about 10-20 minutes)
#   bash bench/gpu_check.sh --dry-run        # or GPU_CHECK_DRY_RUN=1: print every command, run nothing
#
# On a machine without a GPU it says so and exits 0. Exit status: 0 every check passed (or skipped with its
# reason), 1 at least one FAIL. Each check's console output: $GPU_CHECK_DIR/<check>.log.
#
# Knobs: PYTHON [.venv/bin/python, else python3], GPU_CHECK_DIR [a new temporary directory],
#        GPU_CHECK_GPUS [GPUs torch sees; in a dry run 2], GPU_CHECK_TRAIN_PER_CLASS [2048] (synthetic
#        images per class for the throughput run), GPU_CHECK_GOAL [6000] (examples/sec per GPU).
#
# Checks (docs/performance.md, "GPU acceptance"):
#   bf16            --precision bf16 autocast (compute capability >= 8.0; SKIP below)
#   fp16-scaler     --precision fp16 autocast with a GradScaler (its state is in the checkpoint)
#   precision-auto  --precision auto picks bf16 on compute capability >= 8.0, fp16 below
#   channels-last   --channels-last
#   compile         --compile (torch.compile, inductor)
#   decode-device   --decode-on device (nvJPEG)
#   no-sync         FINETUNE_SYNC_DEBUG=error: no implicit host-device sync inside a step
#   nccl            all GPUs, one process each: backend=nccl, world size = GPUs
#   sync-bn         --sync-bn on all GPUs
#   one-context     during the all-GPU run each rank's process has a CUDA context on its own GPU only
#                   (nvidia-smi --query-compute-apps)
#   bn-buffers      after a 2+-GPU run the BatchNorm buffers are identical on every rank (ranks/rank-N.json:
#                   final_buffer_sha256 when written, else final_param_sha256)
#   fp16-sum        fp16 + --loss-reduction sum on all GPUs logs no skipped optimizer steps
#   throughput      end-to-end examples/sec per GPU (train.py's metrics.json) beside the goal

set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1;;
        -h|--help) sed -n '2,30p' "$0"; exit 0;;
        *) echo "gpu_check.sh: unknown argument '$arg' (--dry-run, --help)" >&2; exit 2;;
    esac
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
GOAL=${GPU_CHECK_GOAL:-6000}

if [ "$DRY" = 1 ]; then
    NGPU=${GPU_CHECK_GPUS:-2}
    CC=8.0
    echo "gpu_check: DRY RUN ($NGPU GPUs assumed): the commands each check would run"
else
    NGPU=${GPU_CHECK_GPUS:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
    if [ "${NGPU:-0}" -eq 0 ]; then
        echo "gpu_check: no GPU on this machine (torch.cuda.device_count() == 0): nothing to check here;" \
             "run it on a machine with GPUs (bash bench/gpu_check.sh --dry-run lists the checks)"
        exit 0
    fi
    CC=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
    echo "gpu_check: $NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | xargs), compute capability $CC"
fi
CC_MAJOR=${CC%%.*}
WORK=${GPU_CHECK_DIR:-$( [ "$DRY" = 1 ] && echo /tmp/gpu_check || mktemp -d /tmp/gpu_check.XXXXXX)}
SHARDS=$WORK/shards
BIG=$WORK/shards-224
FAILED=0

# ------------------------------------------------------------------------------------------------ helpers
say() { echo "gpu_check: $*"; }
# run NAME CMD...: the command (logged to $WORK/NAME.log); in a dry run, print it.
run() {
    local name=$1; shift
    if [ "$DRY" = 1 ]; then echo "DRY-RUN $name: $*"; return 0; fi
    "$@" > "$WORK/$name.log" 2>&1
}
result() {  # result NAME STATUS(0 pass) [detail]
    local name=$1 status=$2 detail=${3:-}
    if [ "$DRY" = 1 ]; then return 0; fi
    if [ "$status" = 0 ]; then echo "PASS $name${detail:+: $detail}"
    else echo "FAIL $name${detail:+: $detail} (log: $WORK/$name.log)"; FAILED=1; fi
}
skip() { echo "SKIP $1: $2"; }
grep_log() { [ "$DRY" = 1 ] || grep -q -- "$2" "$WORK/$1.log"; }

SHORT=(--data "$SHARDS" --pretrained none --epochs 2 --max-steps-per-epoch 6 --batch-size 32 --image-size 128
       --eval-limit 64 --workers 2 --log-every 1)
train1() { local name=$1; shift; run "$name" "$PYTHON" train.py "${SHORT[@]}" --output-dir "$WORK/runs/$name" "$@"; }
trainN() {
    local name=$1; shift
    run "$name" "$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$NGPU" --num_machines 1 \
        --mixed_precision no --dynamo_backend no --main_process_port 0 train.py "${SHORT[@]}" \
        --batch-size $((32 * NGPU)) --output-dir "$WORK/runs/$name" "$@"
}

# ------------------------------------------------------------------------------------------------- data
run data-small "$PYTHON" -m data_prep synthetic --out "$WORK/src" --train-per-class 256 --test-per-class 32 \
    --min-side 160 --max-side 256
run data-small-shards "$PYTHON" -m data_prep --source "$WORK/src" --out "$SHARDS" --no-progress
if [ "$DRY" != 1 ] && [ ! -f "$SHARDS/manifest.json" ]; then
    echo "FAIL data: could not write synthetic shards (log: $WORK/data-small*.log)"; exit 1
fi

# ------------------------------------------------------------------------------------- one GPU, one run each
if [ "$CC_MAJOR" -ge 8 ]; then
    train1 bf16 --precision bf16; rc=$?
    grep_log bf16 "precision=bf16" || rc=1
    result bf16 $rc "bf16 autocast"
else
    skip bf16 "compute capability $CC < 8.0 has no native bf16"
fi

train1 fp16-scaler --precision fp16 --save-every 3; rc=$?
grep_log fp16-scaler "precision=fp16" || rc=1
run fp16-scaler-state "$PYTHON" -c "import glob, torch; c = torch.load(sorted(glob.glob('$WORK/runs/fp16-scaler/checkpoints/ckpt-*.pt'))[-1], weights_only=True); assert c['scaler'] and c['scaler']['scale'] > 0, c.get('scaler'); print('scaler', c['scaler'])" || rc=1
result fp16-scaler $rc "fp16 autocast + GradScaler"

WANT=$([ "$CC_MAJOR" -ge 8 ] && echo bf16 || echo fp16)
train1 precision-auto --precision auto; rc=$?
grep_log precision-auto "precision=$WANT" || rc=1
result precision-auto $rc "--precision auto -> $WANT on compute capability $CC"

train1 channels-last --channels-last; rc=$?
result channels-last $rc

train1 compile --compile; rc=$?
result compile $rc "torch.compile"

train1 decode-device --decode-on device; rc=$?
result decode-device $rc "nvJPEG decode on the GPU"

FINETUNE_SYNC_DEBUG=error train1 no-sync --precision "$WANT" --log-every 1000 --ema-decay 0.999; rc=$?
[ "$DRY" = 1 ] && echo "         (with FINETUNE_SYNC_DEBUG=error)"
result no-sync $rc "set_sync_debug_mode(error) inside every step (EMA update included)"

# ---------------------------------------------------------------------------------------- all GPUs
if [ "$NGPU" -ge 2 ]; then
    # Sample nvidia-smi while the all-GPU run trains: which process holds a context on which GPU.
    APPS=$WORK/compute-apps.csv
    if [ "$DRY" = 1 ]; then
        echo "DRY-RUN one-context: nvidia-smi --query-compute-apps=pid,gpu_uuid --format=csv,noheader (every second during nccl)"
    else
        : > "$APPS"
        ( while :; do nvidia-smi --query-compute-apps=pid,gpu_uuid --format=csv,noheader >> "$APPS" 2>/dev/null; sleep 1; done ) &
        SAMPLER=$!
    fi
    trainN nccl --precision "$WANT" --epochs 3; rc=$?
    [ "$DRY" = 1 ] || kill "$SAMPLER" 2>/dev/null
    grep_log nccl "world_size=$NGPU .*backend=nccl" || rc=1
    result nccl $rc "NCCL, $NGPU processes"

    if [ "$DRY" != 1 ]; then
        "$PYTHON" - "$WORK/runs/nccl" "$APPS" "$NGPU" > "$WORK/one-context.log" 2>&1 <<'EOF'
import csv, glob, json, sys
run_dir, apps, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
pids = {json.load(open(p))["pid"]: json.load(open(p))["rank"] for p in glob.glob(run_dir + "/ranks/rank-*.json")}
seen = {}
for row in csv.reader(open(apps)):
    if len(row) >= 2 and row[0].strip().isdigit() and int(row[0]) in pids:
        seen.setdefault(int(row[0]), set()).add(row[1].strip())
print("rank pids:", pids, "contexts:", seen)
assert len(pids) == n and set(seen) == set(pids), "not every rank was seen by nvidia-smi"
assert all(len(g) == 1 for g in seen.values()), "a rank holds contexts on more than one GPU"
assert len({next(iter(g)) for g in seen.values()}) == n, "two ranks on one GPU"
EOF
        result one-context $? "each rank's process has a context on its own GPU only"
        "$PYTHON" - "$WORK/runs/nccl" > "$WORK/bn-buffers.log" 2>&1 <<'EOF'
import glob, json, sys
ranks = [json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + "/ranks/rank-*.json"))]
key = "final_buffer_sha256" if all("final_buffer_sha256" in r for r in ranks) else "final_param_sha256"
print(key, [r.get(key) for r in ranks])
assert len(ranks) >= 2 and len({r[key] for r in ranks}) == 1 and ranks[0][key], "ranks differ"
EOF
        result bn-buffers $? "identical on every rank ($(grep -o 'final_[a-z]*_sha256' "$WORK/bn-buffers.log" | head -1))"
    else
        echo "DRY-RUN bn-buffers: compare final_buffer_sha256 (else final_param_sha256) of $WORK/runs/nccl/ranks/rank-*.json"
    fi

    trainN sync-bn --sync-bn --precision "$WANT"; rc=$?
    result sync-bn $rc "SyncBatchNorm on $NGPU GPUs"

    trainN fp16-sum --precision fp16 --loss-reduction sum; rc=$?
    if [ "$DRY" != 1 ] && grep -qi "skipped" "$WORK/fp16-sum.log"; then rc=1; fi
    [ "$DRY" = 1 ] && echo "         (then: grep -i skipped $WORK/fp16-sum.log must find nothing)"
    result fp16-sum $rc "fp16 + --loss-reduction sum on $NGPU GPUs: no skipped optimizer steps"
else
    for c in nccl one-context bn-buffers sync-bn; do skip $c "needs 2+ GPUs (this machine has $NGPU)"; done
    train1 sync-bn --sync-bn --precision "$WANT"; rc=$?
    result sync-bn $rc "SyncBatchNorm on 1 GPU"
    train1 fp16-sum --precision fp16 --loss-reduction sum; rc=$?
    if [ "$DRY" != 1 ] && grep -qi "skipped" "$WORK/fp16-sum.log"; then rc=1; fi
    result fp16-sum $rc "fp16 + --loss-reduction sum: no skipped optimizer steps"
fi

# ---------------------------------------------------------------------------------------- throughput
PER_CLASS=${GPU_CHECK_TRAIN_PER_CLASS:-2048}
run data-224 "$PYTHON" -m data_prep synthetic --out "$WORK/src-224" --train-per-class "$PER_CLASS" \
    --test-per-class 64 --min-side 256 --max-side 320
run data-224-shards "$PYTHON" -m data_prep --source "$WORK/src-224" --out "$BIG" --no-progress --shorter-side 256
LAUNCH=("$PYTHON" train.py)
[ "$NGPU" -ge 2 ] && LAUNCH=("$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$NGPU"
                             --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port 0 train.py)
run throughput "${LAUNCH[@]}" --data "$BIG" --pretrained none --arch resnet18 --image-size 224 --epochs 3 \
    --batch-size $((256 * NGPU)) --precision auto --eval-limit 256 --output-dir "$WORK/runs/throughput"
rc=$?
if [ "$DRY" != 1 ]; then
    if [ $rc = 0 ]; then
        PER_GPU=$("$PYTHON" -c "import json; m = json.load(open('$WORK/runs/throughput/metrics.json')); print('%.0f' % (max(e['examples_per_sec'] for e in m['epochs']) / $NGPU))")
        NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
        LINE="$PER_GPU examples/sec per GPU end to end (ResNet-18, 224 px, best epoch; goal >= $GOAL per H100) on $NGPU x $NAME"
        if [[ "$NAME" == *H100* ]]; then
            [ "$PER_GPU" -ge "$GOAL" ]; result throughput $? "$LINE"
        else
            echo "INFO throughput: $LINE (the goal is set for an H100; not judged here)"
        fi
    else
        result throughput $rc "train.py failed"
    fi
fi

if [ "$DRY" = 1 ]; then say "dry run: nothing was run"; exit 0; fi
say "logs and run directories in $WORK"
exit $FAILED
