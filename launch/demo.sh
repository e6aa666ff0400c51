#!/usr/bin/env bash
# The README's first command (`make demo`): works offline on a CPU-only machine.
#   synthetic hotdog/not-hotdog photos -> WebDataset shards -> fine-tune on 2 CPU processes (gloo), or on
#   every GPU of this machine -> d2l-style results, metrics.json, model.pt and TensorBoard files.
# Knobs: DEMO_EPOCHS (3), DEMO_IMAGE_SIZE (96 on CPU, 224 on GPU), PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
ACCELERATE="$(dirname "$PYTHON")/accelerate"

"$PYTHON" -m data_prep synthetic --out data/synthetic
"$PYTHON" -m data_prep --source data/synthetic --out data/synthetic-shards --no-progress

# Real ImageNet weights when torchvision's cache has them; otherwise say so and start from random init.
weights_file=$("$PYTHON" -c "import os, torch; print(os.path.join(torch.hub.get_dir(), 'checkpoints', 'resnet18-f37072fd.pth'))")
if [ -f "$weights_file" ]; then
    weights=(--pretrained imagenet)
    echo "demo: fine-tuning from torchvision's ImageNet weights ($weights_file)"
else
    weights=(--scratch)   # d2l's from-scratch variant: random init, one lr group at 5e-4
    echo "demo: NO ImageNet weights at $weights_file (offline?): this demo trains from RANDOM init (--scratch)."
    echo "demo: for the real fine-tuning recipe put resnet18-f37072fd.pth there, or pass --pretrained PATH to train.py."
fi

rm -rf runs/demo      # a fresh demo each time (train.py refuses to mix runs in one directory)
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
common=(train.py --data data/synthetic-shards --output-dir runs/demo "${weights[@]}"
        --epochs "${DEMO_EPOCHS:-3}" --batch-size 32)
if [ "$gpus" -gt 0 ]; then
    echo "demo: $gpus GPU(s)"
    "$ACCELERATE" launch --multi_gpu --num_processes "$gpus" --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port 0 "${common[@]}" --image-size "${DEMO_IMAGE_SIZE:-224}"
else
    echo "demo: no GPU: 2 CPU processes (gloo) through accelerate launch"
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 "$ACCELERATE" launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no --main_process_port 0 "${common[@]}" \
        --image-size "${DEMO_IMAGE_SIZE:-96}" --workers 1
fi
echo "demo: done. metrics: runs/demo/metrics.json, model: runs/demo/model.pt"
echo "demo: view the curves with:  $(dirname "$PYTHON")/tensorboard --logdir runs/demo/tb"
