"""Image transforms on the CPU, and the uint8 batches they fill (d2l's recipe: RandomResizedCrop(224) + flip
for training; Resize(256, 256) + CenterCrop(224) for evaluation).

Images travel as uint8 tensors (decode_jpeg + crop/flip on uint8) and are normalised on the device
(DeviceNormalizer), which is cheaper per image than PIL + float transforms and moves 4x fewer bytes to the GPU.
Every random draw comes from an explicit per-sample RNG (random_resized_crop_params), so the torchvision,
OpenCV (--augment-with opencv) and device-decode (device_decode.py) paths crop and flip the same way.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from common.extras import require

from ..arch import IMAGENET_MEAN, IMAGENET_STD


def decode(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 RGB tensor [3, H, W]."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)    # RandomResizedCrop's defaults (also dali.py's)


def random_resized_crop_params(height: int, width: int, rng: random.Random,
                               scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling, driven by an explicit RNG (so it is seedable per sample)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback: the whole image, clamped to the ratio range (as torchvision does).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(img: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    top, left, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1], rng)
    img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    return TF.horizontal_flip(img) if rng.random() < 0.5 else img


def train_sample_opencv(data: bytes, size: int, rng: random.Random, out: np.ndarray | None = None) -> np.ndarray:
    """train_transform's job for --augment-with opencv: the same crop and flip draws from `rng`, into an HWC
    uint8 array (`out`, e.g. a row of opencv_batch's buffer, so no stacking copy follows). simplejpeg
    (libjpeg-turbo) decodes straight to HWC RGB; OpenCV's resize is 2.6-4x cheaper than torchvision's
    antialiased one (docs/performance.md section 7): bilinear when the crop is enlarged, area averaging when
    it is shrunk (so shrinking is antialiased too). A JPEG simplejpeg refuses (e.g. CMYK) goes through
    torchvision's decoder instead. EXIF orientation is ignored by both, as in train_transform."""
    simplejpeg, cv2 = _fast_libs()
    try:
        img = simplejpeg.decode_jpeg(data, "RGB")
    except ValueError:
        img = decode(data).permute(1, 2, 0).numpy()
    top, left, h, w = random_resized_crop_params(img.shape[0], img.shape[1], rng)
    shrink = h >= size and w >= size
    out = cv2.resize(img[top:top + h, left:left + w], (size, size), dst=out,
                     interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cv2.flip(out, 1, dst=out) if rng.random() < 0.5 else out


def opencv_batch(items: list[tuple[bytes, random.Random, int]], size: int):
    """(JPEG bytes, per-sample RNG, label) -> ([B,3,size,size] uint8 in channels_last layout, labels): each
    image is resized straight into its row of one HWC buffer; the permute is a view, and the device's
    .float() keeps that layout, which is the one the model wants anyway."""
    batch = batch_buffer((len(items), size, size, 3))
    for row, (data, rng, _) in zip(batch.numpy(), items):
        train_sample_opencv(data, size, rng, out=row)
    return batch.permute(0, 3, 1, 2), torch.tensor([y for _, _, y in items], dtype=torch.long)


def batch_buffer(shape: tuple) -> torch.Tensor:
    """An empty uint8 batch; in a loader worker, allocated in shared memory (as torch's default_collate does),
    so handing it to the training process costs no copy into shared memory (docs/performance.md section 9)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _fast_libs():
    """(simplejpeg, cv2), imported on first use; OpenCV single-threaded: each loader worker is one core."""
    cv2 = require("cv2", "--augment-with opencv")
    simplejpeg = require("simplejpeg", "--augment-with opencv")
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return simplejpeg, cv2


def eval_transform(img: torch.Tensor, spec: dict) -> torch.Tensor:
    """d2l: Resize([256, 256]) then CenterCrop(224). The sizes and interpolation come from the weights'
    preprocessing (finetune.arch.preprocessing; for ResNet-18 exactly d2l's)."""
    mode = TF.InterpolationMode(spec.get("interpolation", "bilinear"))
    img = TF.resize(img, list(spec["resize"]), interpolation=mode, antialias=True)
    crop = spec["crop"]
    return TF.center_crop(img, [crop, crop] if isinstance(crop, int) else list(crop))


class DeviceNormalizer:
    """uint8 [B,3,H,W] on the host -> normalised float on the device (in the layout the model wants)."""

    def __init__(self, device: torch.device, channels_last: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.scale = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.shift = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        # A one-copy .to(float32, memory_format=...) variant was tried: faster in one measurement, slower in
        # three later ones (docs/performance.md, section 5), so the plain form stays.
        images = images.to(self.device, non_blocking=True).float().sub_(self.shift).div_(self.scale)
        labels = labels.to(self.device, non_blocking=True) if labels is not None else None
        return images.contiguous(memory_format=self.memory_format), labels


def collate(samples: list[tuple[torch.Tensor, int]]):
    """[(image, label)] -> (images stacked, in batch_buffer when uint8; labels as a long tensor)."""
    images, labels = zip(*samples)
    out = batch_buffer((len(images), *images[0].shape)) if images[0].dtype == torch.uint8 else None
    return torch.stack(images, out=out), torch.tensor(labels, dtype=torch.long)
