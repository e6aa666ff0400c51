"""Per-component costs behind the input-pipeline figures (single thread, no DataLoader), most of them
measured against the alternative they replaced or compete with, in the same run:

    .venv/bin/python bench/components.py                 # ~15 s on 2 CPU cores; --help for every flag

- decode + augment per image: ours (decode_jpeg + v2 resized_crop/flip on uint8) vs d2l's PIL chain
  (open/convert + RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize), vs a PIL draft()
  half-size decode before the same crop, and the two decoders alone;
- shard reading per sample: webdataset.tarfile_samples (what finetune.data.streams' _tar_samples wraps), all train
  shards read through;
- DeviceNormalizer per batch of 32 at 224 px (.float() ... .contiguous(memory_format)) vs a one-copy
  .to(float32, memory_format=...) variant (bitwise equal results; both layouts).
"""

from __future__ import annotations

import argparse
import io
import random
import time

from _common import add_data_args, machine, median, shards_for, table

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from finetune.arch import IMAGENET_MEAN, IMAGENET_STD
from finetune.data.manifest import load_manifest
from finetune.data.streams import _tar_samples
from finetune.data.transforms import DeviceNormalizer, decode, train_transform


def _pil_draft(data: bytes) -> torch.Tensor:
    """PIL's DCT-domain downscale (JPEG draft mode) to half size, as a uint8 [3, H, W] tensor."""
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (im.size[0] // 2, im.size[1] // 2))
    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def rate(fn, items, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for x in items:
            fn(x)
        out.append(len(items) / (time.perf_counter() - t))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(p)
    p.add_argument("--images", type=int, default=150, help="images per decode measurement")
    p.add_argument("--repeats", type=int, default=5, help="repeats of every measurement")
    args = p.parse_args()
    torch.set_num_threads(1)
    shards = shards_for(args)
    print(machine("cpu") + " -- measured with 1 thread")
    urls = load_manifest(shards).train.urls
    jpegs = [s["jpg"] for u in urls for s in _tar_samples([u])][:args.images]

    d2l = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                     T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    counter = iter(range(1 << 30))
    cases = {
        "ours: decode_jpeg + uint8 crop/flip": lambda b: train_transform(decode(b), 224, random.Random(next(counter))),
        "d2l: PIL + RandomResizedCrop/flip/ToTensor/Normalize": lambda b: d2l(Image.open(io.BytesIO(b)).convert("RGB")),
        "PIL draft() half-size decode + uint8 crop/flip": lambda b: train_transform(_pil_draft(b), 224, random.Random(next(counter))),
        "decode_jpeg only": decode,
        "PIL decode only": lambda b: Image.open(io.BytesIO(b)).convert("RGB"),
    }
    res = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():
            res[k] += rate(fn, jpegs, 1)
    rows = [{"component": k, "median": f"{median(v):.0f} img/s"} for k, v in res.items()]

    n = sum(1 for u in urls for _ in _tar_samples([u]))
    tres = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for u in urls:
            list(wds.tarfile_samples([dict(url=u)]))
        tres.append((time.perf_counter() - t) / n * 1e6)
    rows.append({"component": "shard reading: webdataset.tarfile_samples", "median": f"{median(tres):.0f} us/sample"})

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    x = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8)
    for cl in (True, False):
        fmt = torch.channels_last if cl else torch.contiguous_format
        new = DeviceNormalizer(torch.device("cpu"), cl)
        one_copy = lambda x: x.to(torch.float32, memory_format=fmt).sub_(mean).div_(std)
        assert torch.equal(new(x, torch.zeros(1))[0], one_copy(x))
        nres = {"DeviceNormalizer (.float()...contiguous())": [], "one-copy .to(float32, memory_format)": []}
        for _ in range(args.repeats):
            for k, fn in (("DeviceNormalizer (.float()...contiguous())", lambda: new(x, torch.zeros(1))),
                          ("one-copy .to(float32, memory_format)", lambda: one_copy(x))):
                t = time.perf_counter()
                fn()
                nres[k].append((time.perf_counter() - t) * 1e3)
        rows += [{"component": f"normalise 32x224px, {'channels_last' if cl else 'NCHW'}: {k}",
                  "median": f"{median(v):.1f} ms/batch"} for k, v in nres.items()]
    print(table(rows, ["component", "median"]))


if __name__ == "__main__":
    main()
