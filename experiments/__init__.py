"""Experiment runner for the d2l "Fine-Tuning" comparison and its exercises, on your data and hardware.

    python -m experiments compare --data SHARDS                     # all default variants, runs/compare
    python -m experiments compare --data SHARDS --variants finetune,scratch -- --epochs 2 --image-size 64
    python -m experiments report --out runs/compare                 # re-render table + plot from the runs

Every variant is one ordinary `train.py` run (same shards, same seed, same extra flags), started the way a
user starts it (`python train.py ...`, or `--launcher "accelerate launch ..."`). See docs/experiments.md.
"""

from __future__ import annotations

# d2l's own numbers (PyTorch edition, section "Fine-Tuning": ImageNet weights, 224 px, 5 epochs, batch 128,
# d2l's hotdog set, trained on the book's GPUs). Quoted in results.md as the book's, never as ours.
D2L_REFERENCE = {"finetune": 0.939, "scratch": 0.843}

NO_WEIGHTS = "no ImageNet weights: 'pretrained' variants start from random init"
