"""Optional decoding on the device (TrainStream(decode_on="device") + DeviceDecoder).

The loader workers only read the JPEG headers (jpeg_size, a frame-header parser) and draw the crop/flip with
the same per-sample RNG as train_transform (raw_sample); the device decodes the whole micro-batch in one
batched decode_jpeg(list, device="cuda") call (nvjpeg), then crops, resizes and flips there. Without CUDA (or
for an image nvjpeg refuses) it falls back to the CPU decoder, with the same crops, so the path is testable
anywhere; a failure that is not a bad image (out of memory, a driver error) is warned about once.
"""

from __future__ import annotations

import random
import warnings
from typing import NamedTuple

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from ..arch import IMAGENET_MEAN, IMAGENET_STD
from .transforms import DeviceNormalizer, random_resized_crop_params


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG's frame header, without decoding. ValueError if there is none."""
    i, n = 2, len(data)
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"bad JPEG marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:   # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                break
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + length
    raise ValueError("no JPEG frame header found")


class RawJpegBatch(NamedTuple):
    """A micro-batch still encoded: JPEG bytes as 1-d uint8 tensors, and per image (top, left, h, w, flip)."""
    data: list
    params: torch.Tensor


def raw_sample(data: bytes, rng: random.Random) -> tuple[torch.Tensor, list[int]]:
    """The worker's share of decode_on="device": the bytes and the crop/flip train_transform would draw."""
    height, width = jpeg_size(data)
    top, left, h, w = random_resized_crop_params(height, width, rng)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), [top, left, h, w, int(rng.random() < 0.5)]


_BAD_IMAGE = ("BAD_JPEG", "JPEG_NOT_SUPPORTED", "corrupt", "Invalid", "not supported", "Unsupported")
_warned: set[str] = set()


def nvjpeg_failure(e: RuntimeError) -> str | None:
    """None when nvjpeg refused an image (bad or unsupported data: the CPU decodes it, nothing to say);
    else the reason (out of memory, a set-up or driver error), which a user should hear about."""
    text = str(e)
    return None if any(k in text for k in _BAD_IMAGE) else (text.strip().splitlines() or [type(e).__name__])[0]


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def _gpu_decode(data, device: torch.device):
    """nvjpeg decode of one tensor or a list; None where it fails (a non-image failure is warned about once)."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        reason = nvjpeg_failure(e)
        if reason:
            warn_once(f"--decode-on device: nvjpeg failed ({reason[:160]}); decoding on the CPU instead (slower)")
        return None


def decode_batch(raw: RawJpegBatch, device: torch.device, size: int) -> torch.Tensor:
    """RawJpegBatch -> uint8 [B, 3, size, size] on `device`. CUDA: one batched nvjpeg call; any image it
    refuses (or no CUDA at all) is decoded on the CPU instead."""
    images = _gpu_decode(list(raw.data), device) if device.type == "cuda" else None
    if images is None:          # one bad apple fails the batch: decode one by one
        images = [(_gpu_decode(d, device) if device.type == "cuda" else None) for d in raw.data]
        images = [img if img is not None else decode_jpeg(d, mode=ImageReadMode.RGB).to(device, non_blocking=True)
                  for img, d in zip(images, raw.data)]
    out = []
    for img, (top, left, h, w, flip) in zip(images, raw.params.tolist()):
        img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
        out.append(TF.horizontal_flip(img) if flip else img)
    return torch.stack(out)


class DeviceDecoder(DeviceNormalizer):
    """DeviceNormalizer that also accepts RawJpegBatch micro-batches (TrainStream(decode_on="device")) and
    decodes them on the device first; already decoded uint8 batches (the eval stream) pass straight on."""

    def __init__(self, device: torch.device, channels_last: bool, image_size: int, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        super().__init__(device, channels_last, mean, std)
        self.image_size = image_size

    def __call__(self, images, labels: torch.Tensor):
        if isinstance(images, RawJpegBatch):
            images = decode_batch(images, self.device, self.image_size)
        return super().__call__(images, labels)


def collate_raw(samples: list[tuple[tuple[torch.Tensor, list[int]], int]]):
    items, labels = zip(*samples)
    return (RawJpegBatch([d for d, _ in items], torch.tensor([p for _, p in items], dtype=torch.long)),
            torch.tensor(labels, dtype=torch.long))
