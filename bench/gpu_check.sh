#!/usr/bin/env bash
# GPU acceptance and figures in one command of at most 8 minutes (docs/performance.md section 8):
# every GPU-only path of train.py as a short real run with a PASS/FAIL line, and the figures the
# performance goals need (FIG lines): loader-only and end-to-end images/s per GPU for each loader path,
# ResNet-18 224 px at batch 128/256 in fp32/bf16/fp16 x NCHW/channels_last, ours vs a bare loop, the
# EMA's cost, eager vs --compile.
#
#   bash bench/gpu_check.sh              # on the GPU machine: about 8 minutes
#   bash bench/gpu_check.sh --dry-run    # or GPU_CHECK_DRY_RUN=1: the plan and the wheels; runs nothing
#
# First, before anything else, the wheels the GPU image lacks (bench/gpu_wheels.py downloads them into
# .whl/ on a machine with a package index) are installed with pip --no-index --no-deps --target into
# $GPU_CHECK_DIR/site and put on PYTHONPATH. Then bench/gpu_check.py runs the plan.
#
# Knobs: PYTHON [.venv/bin/python, else python3], GPU_CHECK_DIR [a new /tmp/gpu_check.*],
#        GPU_CHECK_WHEELS [.whl], GPU_CHECK_BUDGET [480 s in all], GPU_CHECK_GOAL [10000 img/s per H100],
#        GPU_CHECK_GPUS / GPU_CHECK_CORES [dry run: 1 / 16].
# Exit status: 0 every line passed or was skipped with its reason, 1 a FAIL; without a GPU it says so, 0.

set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1;;
        -h|--help) sed -n '2,22p' "$0"; exit 0;;
        *) echo "gpu_check.sh: unknown argument '$arg' (--dry-run, --help)" >&2; exit 2;;
    esac
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
export PYTHONUNBUFFERED=1        # lines appear as they happen, also through tee and when a timeout cuts the run
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
if [ "$DRY" = 1 ]; then
    WORK=${GPU_CHECK_DIR:-/tmp/gpu_check}
else
    WORK=${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
fi

# ------------------------------------------------------------------------------- wheels, before anything else
INSTALL=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site")
WHEELS_OK=0
if [ "$DRY" = 1 ]; then
    echo "gpu_check: wheels it would install (planned 15 s): ${INSTALL[*]} $WHEELS/*.whl"
    for w in "$WHEELS"/*.whl; do [ -e "$w" ] && echo "WHEEL $(basename "$w")"; done
    python3 bench/gpu_wheels.py --check --dest "$WHEELS" || WHEELS_OK=1
elif compgen -G "$WHEELS/*.whl" > /dev/null; then
    if "${INSTALL[@]}" "$WHEELS"/*.whl > "$WORK/wheels.log" 2>&1; then
        export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
        echo "PASS wheels: $(cd "$WHEELS" && ls *.whl | xargs) installed into $WORK/site in $(( $(date +%s) - T0 )) s"
    else
        echo "FAIL wheels: pip install failed (log: $WORK/wheels.log): $(tail -1 "$WORK/wheels.log")"; exit 1
    fi
else
    echo "SKIP wheels: no $WHEELS/*.whl (fine where webdataset, braceexpand and simplejpeg are installed;" \
         "else run python3 bench/gpu_wheels.py where pip can download, and carry .whl)"
fi

# ------------------------------------------------------------------------------------------------ the plan
"$PYTHON" bench/gpu_check.py --t0 "$T0" --work "$WORK" $([ "$DRY" = 1 ] && echo --dry-run)
rc=$?
[ "$rc" = 0 ] && rc=$WHEELS_OK
exit $rc
