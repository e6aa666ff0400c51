"""Worker-side images per second PER CORE (issue 13, item 3): what one DataLoader worker on one core delivers,
read + decode + RandomResizedCrop/flip + collate into uint8 batches (no normalisation: on a GPU that runs on
the device), for the original photos and for data_prep's --shorter-side 256 shards, beside d2l's per-image
PIL transforms (which also make float tensors and normalise, as d2l's loader does).

    .venv/bin/python bench/per_core.py            # ~1 min; one process, one thread: a per-core figure
    .venv/bin/python bench/per_core.py --breakdown   # CPU ms per image of each decode/resize/collate step

Variants, all on the same samples and the same crop/flip draws (finetune.data.transforms.random_resized_crop_params):
- tv-tensor: what TrainStream runs today: torchvision decode_jpeg + resized_crop(antialias) on uint8 tensors,
  torch.stack of [3,224,224];
- opencv:    TrainStream with --augment-with opencv (finetune.data.transforms.opencv_batch): simplejpeg decode to HWC,
             the same crop (a view), one cv2.resize (bilinear up, area down) straight into the batch buffer
             and cv2.flip in place: a channels_last [B,3,H,W] batch with no stacking or transposing copy;
- pil-box:   Pillow decode, with JPEG draft mode (DCT-domain 1/2, 1/4, 1/8 decode) when the crop is at least
             twice the output size, then one Image.resize(box=crop, BILINEAR) and a flip, collated HWC
             (np.stack; the device permutes to NCHW/channels_last for free);
- d2l:       PIL decode + transforms.RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize.
"""

from __future__ import annotations

import argparse
import io
import random
import time

from _common import add_data_args, machine, median, shards_for, table

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms.v2 import functional as TF

from finetune.arch import IMAGENET_MEAN, IMAGENET_STD
from finetune.data.manifest import load_manifest
from finetune.data.streams import _tar_samples
from finetune.data.transforms import collate, decode, opencv_batch, random_resized_crop_params, train_transform

SIZE = 224


def tv_tensor(samples, rng):
    return collate([(train_transform(decode(s["jpg"]), SIZE, rng), int(s["cls"])) for s in samples])


def opencv(samples, rng):
    return opencv_batch([(s["jpg"], rng, int(s["cls"])) for s in samples], SIZE)


def pil_box_image(data: bytes, rng: random.Random) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    top, left, h, w = random_resized_crop_params(height, width, rng)
    flip = rng.random() < 0.5
    scale = 1
    while scale < 8 and min(h, w) >= 2 * scale * SIZE:
        scale *= 2
    if scale > 1:                    # decode at 1/scale in the DCT domain: the crop still has >= SIZE pixels
        img.draft("RGB", (width // scale, height // scale))
    sx, sy = img.width / width, img.height / height
    out = img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR, box=(left * sx, top * sy, (left + w) * sx,
                                                                        (top + h) * sy))
    return np.asarray(out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out)


def pil_box(samples, rng):
    return torch.from_numpy(np.stack([pil_box_image(s["jpg"], rng) for s in samples])), \
        torch.tensor([int(s["cls"]) for s in samples])


D2L = transforms.Compose([transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip(),
                          transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def d2l(samples, rng):
    return torch.stack([D2L(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples])


VARIANTS = {"tv-tensor": tv_tensor, "opencv": opencv, "pil-box": pil_box, "d2l": d2l}


def rate(fn, urls, images: int, batch: int) -> tuple[float, float]:
    """(images per CPU-second, images per wall-second) of `fn` over `images` samples, read from the shards
    in the timed loop. CPU time (time.process_time, one thread) is the per-core figure: on a shared machine
    the wall-clock rate also counts the time other processes held the core."""
    rng, n = random.Random(0), 0
    cpu, wall = time.process_time(), time.perf_counter()
    samples = _tar_samples(urls)
    while n < images:
        chunk = [s for _, s in zip(range(batch), samples)]
        if not chunk:
            samples = _tar_samples(urls)
            continue
        fn(chunk, rng)
        n += len(chunk)
    return n / (time.process_time() - cpu), n / (time.perf_counter() - wall)


def breakdown(urls, images: int) -> None:
    """--breakdown: CPU ms per image of each step of the two fast paths (best of 3), on `images` samples."""
    import cv2
    import simplejpeg
    cv2.setNumThreads(1)
    datas = [s["jpg"] for _, s in zip(range(images), _tar_samples(urls))]
    hwc = [simplejpeg.decode_jpeg(d, "RGB") for d in datas]
    chw = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in hwc]
    rng = random.Random(0)
    crops = [random_resized_crop_params(a.shape[0], a.shape[1], rng) for a in hwc]
    outs = [cv2.resize(a[t:t + h, l:l + w], (SIZE, SIZE)) for a, (t, l, h, w) in zip(hwc, crops)]

    rgb_flags = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION

    def area_or_linear(h, w):
        return cv2.INTER_AREA if h >= SIZE and w >= SIZE else cv2.INTER_LINEAR
    steps = {
        "decode: torchvision decode_jpeg (CHW)": lambda: [decode(d) for d in datas],
        "decode: simplejpeg (HWC)": lambda: [simplejpeg.decode_jpeg(d, "RGB") for d in datas],
        "decode: cv2.imdecode (BGR)": lambda: [cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR) for d in datas],
        "decode: cv2.imdecode (RGB, EXIF ignored: what we need)": lambda: [
            cv2.imdecode(np.frombuffer(d, np.uint8), rgb_flags) for d in datas],
        "crop+resize: torchvision resized_crop(antialias)": lambda: [
            TF.resized_crop(a, t, l, h, w, [SIZE, SIZE], antialias=True) for a, (t, l, h, w) in zip(chw, crops)],
        "crop+resize: cv2.resize bilinear": lambda: [
            cv2.resize(a[t:t + h, l:l + w], (SIZE, SIZE)) for a, (t, l, h, w) in zip(hwc, crops)],
        "crop+resize: cv2.resize area when shrinking": lambda: [
            cv2.resize(a[t:t + h, l:l + w], (SIZE, SIZE), interpolation=area_or_linear(h, w))
            for a, (t, l, h, w) in zip(hwc, crops)],
        "CHW -> HWC copy (torchvision decode for OpenCV)": lambda: [a.permute(1, 2, 0).contiguous() for a in chw],
        "collate: np.stack of HWC": lambda: [np.stack(outs[i:i + 32]) for i in range(0, len(outs), 32)],
        "collate: np.stack of flipped views": lambda: [np.stack([o[:, ::-1] for o in outs[i:i + 32]])
                                                      for i in range(0, len(outs), 32)],
    }
    rows = []
    for name, fn in steps.items():
        best = []
        for _ in range(3):
            t = time.process_time()
            fn()
            best.append((time.process_time() - t) / len(datas) * 1000)
        rows.append({"step": name, "CPU ms per image (best of 3)": f"{min(best):.3f}"})
    print(table(rows, ["step", "CPU ms per image (best of 3)"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser)
    parser.add_argument("--images", type=int, default=384, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: CPU ms per image of each decode/resize/collate step on the 256-px shards")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine("cpu (one core: torch.set_num_threads(1), no DataLoader workers)"))
    if args.breakdown:
        args.shorter_side = 256
        breakdown(load_manifest(shards_for(args)).train.urls, args.images)
        return
    rows = []
    for side in (0, 256):
        args.shorter_side = side
        urls = load_manifest(shards_for(args)).train.urls
        results = {name: [] for name in VARIANTS}
        for r in range(args.repeats):
            for name, fn in (VARIANTS.items() if r % 2 == 0 else reversed(VARIANTS.items())):
                results[name].append(rate(fn, urls, args.images, args.batch))
        base = median([c for c, _ in results["d2l"]])
        for name, rates in results.items():
            cpu = median([c for c, _ in rates])
            rows.append({"shards": f"--shorter-side {side}" if side else "original photos", "variant": name,
                         "img/s per core (CPU time)": f"{cpu:.0f}", "vs d2l": f"{cpu / base:.2f}x",
                         "wall img/s": f"{median([w for _, w in rates]):.0f}",
                         "runs (CPU time)": " ".join(f"{c:.0f}" for c, _ in rates)})
    print(table(rows, ["shards", "variant", "img/s per core (CPU time)", "vs d2l", "wall img/s", "runs (CPU time)"]))


if __name__ == "__main__":
    main()
