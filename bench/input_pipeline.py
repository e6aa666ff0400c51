"""Input pipeline: our WebDataset train stream vs d2l's ImageFolder + PIL transforms + DataLoader.

    .venv/bin/python bench/input_pipeline.py            # ~1-2 min on 2 cores; --help for every flag

Both sides read the same real photos (../shared/data/hotdog-food; ours after `data_prep` sharding into a
temp dir), apply the same augmentation (RandomResizedCrop(224, scale 0.08-1, ratio 3/4-4/3) + horizontal
flip) and deliver the same thing to the step -- a normalised float batch [B, 3, 224, 224] -- with the same
number of DataLoader workers:

- ours:     finetune.data.streams.TrainStream (decode_jpeg + crop/flip on uint8, collated uint8 batches in the
            workers) -> make_loader -> DeviceNormalizer (here the device is the CPU, so the normalisation
            runs in the main process and is counted);
- baseline: torchvision.datasets.ImageFolder + transforms.Compose([RandomResizedCrop(224),
            RandomHorizontalFlip(), ToTensor(), Normalize(...)]) -> DataLoader(shuffle=True), as in d2l.

`--decode-on device` times the optional device-decode path instead (workers only parse JPEG headers and
draw the crops; finetune.data.device_decode.DeviceDecoder decodes the batch with nvjpeg on a GPU, or on the CPU in the
main process when there is none -- on a CPU-only machine that is the fallback, not a speed-up).

Each repeat times `--batches` batches after `--warmup` batches (worker start-up excluded); ours and the
baseline alternate within each repeat, and the table shows the medians over the repeats.
"""

from __future__ import annotations

import argparse
import itertools
import time

from _common import COLUMNS, add_data_args, goal_row, in_turn, machine, median, shards_for, table

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from finetune.arch import IMAGENET_MEAN, IMAGENET_STD
from finetune.data.device_decode import DeviceDecoder
from finetune.data.manifest import load_manifest
from finetune.data.streams import TrainStream, auto_workers, make_loader

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ours_loader(shards: str, batch: int, size: int, workers: int, seed: int, decode_on: str = "cpu",
                augment_with: str = "torchvision"):
    manifest = load_manifest(shards)
    stream = TrainStream(manifest.train, rank=0, world_size=1, micro_batch=batch, accum=1, steps=1 << 30,
                         image_size=size, seed=seed, order="random", shuffle_buffer=1000, decode_on=decode_on,
                         augment_with=augment_with)
    normalize = DeviceDecoder(DEVICE, channels_last=True, image_size=size)   # = DeviceNormalizer for uint8 batches
    loader = make_loader(stream, workers, pin_memory=DEVICE.type == "cuda")
    return (normalize(x, y) for x, y in loader)


def d2l_loader(source: str, batch: int, size: int, workers: int, seed: int, **_ours_only):
    tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(f"{source}/train", transform=tf)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, generator=g,
                        persistent_workers=workers > 0, drop_last=True, pin_memory=DEVICE.type == "cuda")
    epochs = itertools.chain.from_iterable(itertools.repeat(loader))   # epochs back to back
    return ((x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)) for x, y in epochs)


def timed(batches, n_warmup: int, n: int, batch: int) -> float:
    """img/s over n batches after n_warmup batches."""
    it = iter(batches)
    for _ in range(n_warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(n):
        x, _ = next(it)
        assert x.dtype == torch.float32 and x.shape[0] == batch
    if x.is_cuda:
        torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(p)
    p.add_argument("--workers", type=int, default=-1,
                   help="DataLoader workers for BOTH loaders (-1: finetune.data.streams.auto_workers(1), "
                        "train.py's default)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--image-size", type=int, default=224, help="crop size")
    p.add_argument("--batches", type=int, default=30, help="timed batches per repeat and loader")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    p.add_argument("--repeats", type=int, default=5, help="repeats (ours and baseline alternate)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads of the main process (0: torch's default)")
    p.add_argument("--decode-on", choices=("cpu", "device"), default="cpu",
                   help="ours: decode in the workers (default) or on the device (TrainStream decode_on)")
    p.add_argument("--augment-with", choices=("torchvision", "opencv"), default="torchvision",
                   help="ours: train.py's --augment-with (the library that decodes, crops and flips)")
    p.add_argument("--goal", type=float, default=3.0, help="goal for ours / baseline")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = args.workers if args.workers >= 0 else auto_workers(1)
    shards = shards_for(args)
    print(machine())
    print(f"data: {args.source} (baseline) and {shards} (ours); batch {args.batch_size}, "
          f"{args.image_size}px, {workers} workers each, ours decodes on {args.decode_on} ({DEVICE}) "
          f"with --augment-with {args.augment_with}; "
          f"{args.repeats} repeats x {args.batches} batches")

    ours, base = [], []
    for r in range(args.repeats):
        pair = [("ours", ours_loader, shards, ours), ("d2l", d2l_loader, args.source, base)]
        for name, make, src, acc in in_turn(r, pair):
            acc.append(timed(make(src, args.batch_size, args.image_size, workers, r, decode_on=args.decode_on,
                                  augment_with=args.augment_with), args.warmup, args.batches, args.batch_size))
            print(f"  repeat {r + 1}: {name:4s} {acc[-1]:7.1f} img/s", flush=True)
    print()
    print(table([goal_row(f"train input pipeline, decode on {args.decode_on} (img/s)", ours, base, args.goal, "img/s")], COLUMNS))


if __name__ == "__main__":
    main()
