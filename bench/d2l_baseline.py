"""The d2l-style fine-tuning loop (d2l.ai, "Fine-Tuning", train_fine_tuning + train_ch13) as the end-to-end
baseline: ImageFolder + torchvision.transforms (RandomResizedCrop(224), RandomHorizontalFlip, ToTensor,
Normalize), DataLoader(shuffle=True), ResNet-18 with a new xavier-initialised Linear(512, 2) head, fp32,
NCHW, SGD with the backbone at lr and the head at 10x lr, weight decay 1e-3, summed cross-entropy, and a
test-set evaluation after each epoch.

    .venv/bin/python bench/d2l_baseline.py --epochs 1    # normally run for you by bench/end_to_end.py

Its train steps are timed with the same finetune.monitor.StepTimer as train.py (data wait vs compute,
the first --timing-warmup steps of each epoch left out), and it prints one JSON line per epoch:
{"epoch", "examples_per_sec", "compute_examples_per_sec", "data_wait_frac", "epoch_time", "test_acc"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torchvision
from torch import nn
from torchvision import transforms

from _common import DEFAULT_SOURCE
from finetune.monitor import StepTimer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default=str(DEFAULT_SOURCE), help="d2l-layout folder with train/ and test/")
    p.add_argument("--epochs", type=int, default=1, help="epochs")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (d2l: 128)")
    p.add_argument("--lr", type=float, default=5e-5, help="backbone lr; the head gets 10x (d2l: 5e-5)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (d2l's fine-tuning section: 0)")
    p.add_argument("--pretrained", default="none", help="'none' (random init) or PATH to a ResNet-18 state dict")
    p.add_argument("--timing-warmup", type=int, default=2, help="steps per epoch left out of the rates "
                   "(capped at steps-1, as in train.py)")
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help="cap on steps per epoch (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_augs = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), normalize])
    test_augs = transforms.Compose([transforms.Resize([256, 256]), transforms.CenterCrop(224),
                                    transforms.ToTensor(), normalize])
    train_iter = torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(os.path.join(args.source, "train"), transform=train_augs),
        batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True)
    test_iter = torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(os.path.join(args.source, "test"), transform=test_augs),
        batch_size=args.batch_size, num_workers=args.workers)

    net = torchvision.models.resnet18(weights=None)
    if args.pretrained != "none":
        net.load_state_dict(torch.load(args.pretrained, map_location="cpu", weights_only=True), strict=False)
    net.fc = nn.Linear(net.fc.in_features, 2)
    nn.init.xavier_uniform_(net.fc.weight)
    net = net.to(device)
    loss = nn.CrossEntropyLoss(reduction="none")
    params_1x = [param for name, param in net.named_parameters() if name not in ["fc.weight", "fc.bias"]]
    trainer = torch.optim.SGD([{"params": params_1x}, {"params": net.fc.parameters(), "lr": args.lr * 10}],
                              lr=args.lr, weight_decay=0.001)

    steps = len(train_iter) if not args.max_steps_per_epoch else min(len(train_iter), args.max_steps_per_epoch)
    for epoch in range(args.epochs):
        timer = StepTimer(min(args.timing_warmup, max(0, steps - 1)), device)
        net.train()
        it = iter(train_iter)
        start = time.perf_counter()
        timer.start()
        for _ in range(steps):
            X, y = timer.fetch(it)
            X, y = X.to(device), y.to(device)
            trainer.zero_grad()
            pred = net(X)
            l = loss(pred, y)
            l.sum().backward()
            trainer.step()
            (pred.argmax(dim=1) == y).sum().item()     # d2l's accuracy bookkeeping
            timer.step_done()
        epoch_time = time.perf_counter() - start
        del it
        net.eval()
        correct = n = 0
        with torch.no_grad():
            for X, y in test_iter:
                X, y = X.to(device), y.to(device)
                correct += (net(X).argmax(dim=1) == y).sum().item()
                n += len(y)
        counted = timer.steps * args.batch_size
        print(json.dumps(dict(epoch=epoch + 1, examples_per_sec=counted / (timer.data + timer.compute),
                              compute_examples_per_sec=counted / timer.compute,
                              data_wait_frac=timer.data / (timer.data + timer.compute), epoch_time=epoch_time,
                              test_acc=correct / n)), flush=True)


if __name__ == "__main__":
    main()
