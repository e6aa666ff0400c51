"""Data: the manifest (the contract with data_prep, see docs/manifest.md), the WebDataset train and eval
streams, and the d2l transforms.

Design, in brief:
- Images travel as uint8 tensors (decode_jpeg + crop/flip on uint8) and are normalised on the device,
  which is cheaper per image than PIL + float transforms and moves 4x fewer bytes to the GPU.
- Every random choice comes from an explicit seed -- (seed, epoch, rank, worker, sample) -- so a run is
  reproducible and a resumed run can fast-forward to the exact batch it stopped at without decoding.
- Training streams are infinite (resampled shards), so every rank can run exactly
  `train_samples // global_batch` steps: ranks never run out at different times, which is what hangs
  DDP when shards split unevenly.
- Evaluation assigns each test sample to exactly one rank: whole shards per rank when there are at least as
  many shards as ranks (the ranks together read the split once), else global index modulo world size; the
  sums are all-reduced by the caller and the total is checked against the manifest.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from data_prep.errors import UsageError
from data_prep.extras import require
from data_prep.manifest import file_sha256, read_manifest, shard_path, split_names

from .arch import IMAGENET_MEAN, IMAGENET_STD
from .mixing import augment


# ------------------------------------------------------------------------------------------------------
# Manifest
# ------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    name: str
    num_samples: int
    shards: list[dict]          # [{"name", "num_samples", "size", "sha256"}] in manifest order
    urls: list[str]             # absolute paths of the shards
    class_counts: list[int] | None = None   # samples per class (the manifest's; --class-balance)
    num_classes: int = 0        # the manifest's; the streams refuse a label outside it (0: unchecked)

    @property
    def offsets(self) -> list[int]:
        """Global index of each shard's first sample (manifest order)."""
        return [0] + list(itertools.accumulate(s["num_samples"] for s in self.shards))[:-1]


@dataclass
class Manifest:
    root: Path
    classes: list[str]
    train: Split
    test: Split
    val: Split | None = None    # data_prep --val-fraction; None for a set without one


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    """The shard folder's manifest, read and checked by data_prep's own reader (format, classes, counts,
    shard names: never a path outside `data_dir` or a URL webdataset would open, such as pipe:)."""
    root = Path(data_dir)
    raw = read_manifest(root)
    splits = {}
    for name in split_names(raw):
        s = raw["splits"][name]
        shards = [dict(name=x["name"], num_samples=int(x["num_samples"]), size=int(x["size"]),
                       sha256=x["sha256"]) for x in s["shards"]]
        splits[name] = Split(name, int(s["num_samples"]), shards, [str(shard_path(root, x["name"])) for x in shards],
                             s.get("class_counts"), len(raw["classes"]))
    return Manifest(root, list(raw["classes"]), splits["train"], splits["test"], splits.get("val"))


def check_shards(manifest: Manifest, hash_limit_bytes: int = 1 << 30) -> str | None:
    """Compare shards with the manifest: sizes always, sha256 too when the set is small enough to hash in
    seconds. Returns a one-line problem description, or None."""
    shards = [(s, u) for split in (manifest.train, manifest.test, manifest.val) if split
              for s, u in zip(split.shards, split.urls)]
    for shard, url in shards:
        if not os.path.isfile(url):
            return f"shard {url} is missing; re-run data_prep or fix --data"
        if os.path.getsize(url) != shard["size"]:
            return (f"shard {url} has {os.path.getsize(url)} bytes, manifest says {shard['size']}: damaged or "
                    f"replaced; re-run data_prep (python -m data_prep verify {manifest.root} shows all problems)")
    if sum(s["size"] for s, _ in shards) <= hash_limit_bytes:
        for shard, url in shards:
            if file_sha256(url) != shard["sha256"]:
                return f"shard {url} fails its sha256 check: damaged; re-run data_prep"
    # A matching sha256 only says the shard is the one the manifest names, not that it holds what training
    # needs: a crafted or foreign set fails here, before training, instead of mid-epoch.
    for shard, url in shards:
        problem = shard_contents(url, shard["num_samples"], len(manifest.classes))
        if problem:
            return f"{problem}; re-run data_prep (python -m data_prep verify {manifest.root} lists all problems)"
    return None


_META = re.compile(r"__[^/]*__($|/)")       # what webdataset's tar reader skips


def shard_contents(url: str, expected: int, num_classes: int) -> str | None:
    """What the streams will find in one shard, from its tar headers and a few bytes per sample (not the
    images): the sample count the manifest says, a `jpg` and a `cls` in every sample, a label below
    `num_classes`, JPEG bytes (not a PNG named .jpg). Samples are grouped by key as webdataset does.
    Returns the first problem as one line naming the shard and the sample, or None."""
    count = 0
    try:
        with open(url, "rb") as f:
            for key, members in itertools.groupby(_tar_entries(f), key=lambda e: e[0]):
                count += 1
                problem = _sample_problem(f, {suffix: where for _, suffix, where in members}, num_classes)
                if problem:
                    return f"shard {url}: sample {key!r} {problem}"
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        return f"shard {url}: unreadable tar ({e})"
    if count != expected:
        return f"shard {url} holds {count} samples, its manifest says {expected}"
    return None


def _tar_entries(f):
    """(key, suffix, (data offset, size)) of the regular files of a tar, keyed like webdataset's base_plus_ext."""
    for name, where in _tar_index(f):
        match = None if _META.match(name) else re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
        if match:
            yield match.group(1), match.group(2).lower(), where


def _tar_index(f) -> list[tuple[str, tuple[int, int]]]:
    """(name, (data offset, size)) of every regular file of a tar, in order. Plain ustar headers (what
    data_prep writes) are parsed here, several times cheaper than tarfile's reader (which was ~130 us per
    member, minutes for a million-sample set); any other header (pax, GNU long names, base-256 sizes)
    sends the whole file through tarfile."""
    index, pos = [], 0
    while True:
        f.seek(pos)
        header = f.read(512)
        if len(header) < 512 or not header.strip(b"\0"):        # the end-of-archive block
            return index
        parsed = _ustar(header)
        if parsed is None:
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                return [(m.name, (m.offset_data, m.size)) for m in tar if m.isreg()]
        name, size, regular = parsed
        if regular:
            index.append((name, (pos + 512, size)))
        pos += 512 + -(-size // 512) * 512


def _ustar(header: bytes) -> tuple[str, int, bool] | None:
    """(name, size, is a regular file) of a plain tar header; None for anything _tar_index leaves to tarfile;
    a TarError for a damaged header (its checksum is wrong)."""
    if header[156:157] not in (b"0", b"\0", b"5") or header[124] & 0x80:
        return None
    try:
        checksum, size = int(header[148:156].strip(b"\0 "), 8), int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
        raise tarfile.ReadError("a tar header's checksum is wrong")
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode(), size, header[156:157] != b"5"


_NOT_JPEG = {b"\x89PNG": "a PNG", b"GIF8": "a GIF", b"RIFF": "a RIFF (WebP?)", b"BM": "a BMP"}


def _read(f, where: tuple[int, int], n: int) -> bytes:
    f.seek(where[0])
    return f.read(min(n, where[1]))


def _sample_problem(f, entries: dict, num_classes: int) -> str | None:
    if "jpg" not in entries or "cls" not in entries:
        return f"has {sorted(entries)}, not both 'jpg' and 'cls'"
    label = _read(f, entries["cls"], 32)
    if not label.strip().isdigit() or int(label) >= num_classes:
        return f"has label {label[:16]!r}, but the manifest has {num_classes} classes (0..{num_classes - 1})"
    head = _read(f, entries["jpg"], 4)
    if head[:2] != b"\xff\xd8":
        kind = next((what for magic, what in _NOT_JPEG.items() if head.startswith(magic)), "not JPEG data")
        return f"has an image that is {kind}, not a JPEG (starts with {head!r})"
    return None


class BadShard(UsageError):
    """A sample the streams cannot use (see sample_fields). Raised in a loader worker, it is re-raised in
    the main process as BadShard(the worker's whole traceback): only the message is kept, one line."""

    def __init__(self, message: str):
        super().__init__(message.rstrip().rsplit("BadShard: ", 1)[-1] if "Traceback" in message else message)


def sample_fields(sample: dict, num_classes: int) -> tuple[bytes, int]:
    """(jpg bytes, label) of a streamed sample, or BadShard naming its shard and key: the start-up check
    (shard_contents) has seen every sample, but shards can change during a run, and a label out of range
    would be an IndexError on the CPU and a device-side assert on a GPU."""
    label = sample.get("cls", b"")
    if "jpg" not in sample or not label.strip().isdigit() or (num_classes and int(label) >= num_classes):
        raise BadShard(f"shard {sample.get('__url__')}: sample {sample.get('__key__')!r} has no image or a bad "
                       f"label ({label[:16]!r}; {num_classes} classes); re-run data_prep")
    return sample["jpg"], int(label)


# ------------------------------------------------------------------------------------------------------
# Transforms (d2l: RandomResizedCrop(224) + flip for training; Resize(256, 256) + CenterCrop(224) for eval)
# ------------------------------------------------------------------------------------------------------
def decode(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 RGB tensor [3, H, W]."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)    # RandomResizedCrop's defaults (also finetune.dali's)


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


# ------------------------------------------------------------------------------------------------------
# Optional decoding on the device (TrainStream(decode_on="device") + DeviceDecoder): the workers only read
# the JPEG headers and draw the crop/flip with the same per-sample RNG as train_transform; the device
# decodes the whole micro-batch in one batched decode_jpeg(list, device="cuda") call, then crops, resizes
# and flips there. Without CUDA (or for an image nvjpeg refuses) it falls back to the CPU decoder, with the
# same crops, so the path is testable anywhere.
# ------------------------------------------------------------------------------------------------------
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


def collate(samples: list[tuple[torch.Tensor, int]]):
    images, labels = zip(*samples)
    out = batch_buffer((len(images), *images[0].shape)) if images[0].dtype == torch.uint8 else None
    return torch.stack(images, out=out), torch.tensor(labels, dtype=torch.long)


def collate_raw(samples: list[tuple[tuple[torch.Tensor, list[int]], int]]):
    items, labels = zip(*samples)
    return (RawJpegBatch([d for d, _ in items], torch.tensor([p for _, p in items], dtype=torch.long)),
            torch.tensor(labels, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------
# Streams
# ------------------------------------------------------------------------------------------------------
def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _tar_samples(urls):
    """Samples (dicts of __key__, __url__, jpg, cls) of the shards named by `urls`, in order: webdataset's
    own tar reader (it also accepts remote URLs such as pipe: or http)."""
    return wds.tarfile_samples(dict(url=url) for url in urls)


def _indexed_samples(urls: list[str], offsets: list[int]):
    """Samples of the given shards, in order, each tagged with its global index in the split."""
    for url, offset in zip(urls, offsets):
        for i, sample in enumerate(_tar_samples([url])):
            yield offset + i, sample


class TrainStream(IterableDataset):
    """Micro-batches of uint8 images for ONE rank. Set `.epoch` and `.skip` before iterating.

    random:     each worker draws shards with replacement (seed, epoch, rank, worker) through a shuffle
                buffer; an infinite stream, cut to length by the caller.
    sequential: the manifest order; global batch k holds samples [k*B, (k+1)*B), rank r takes its slice of
                it. Independent of the world size, so 1 process x B equals 2 processes x B/2.
    `skip` = loader batches already consumed this epoch (resume); skipped before decoding.
    decode_on:  "cpu" (default) yields (uint8 images, labels); "device" yields (RawJpegBatch, labels) with
                the same crops and flips, to be decoded by DeviceDecoder on the training device.
    augment_with: for decode_on="cpu": "torchvision" (train_transform) or "opencv" (train_sample_opencv:
                the same crops and flips, a cheaper resize, channels_last batches).
    continuous: False (default): one epoch per iteration. True (train.py): epoch after epoch from `.epoch`
                and `.skip` on, each cut to steps x accum loader batches, so that ONE DataLoader iterator
                serves the whole run and its workers are forked once, not once per epoch."""

    def __init__(self, split: Split, *, rank: int, world_size: int, micro_batch: int, accum: int,
                 steps: int, image_size: int, seed: int, order: str, shuffle_buffer: int,
                 decode_on: str = "cpu", augment_with: str = "torchvision"):
        if decode_on not in ("cpu", "device"):
            raise ValueError(f"decode_on must be 'cpu' or 'device', not {decode_on!r}")
        if augment_with not in ("torchvision", "opencv"):
            raise ValueError(f"augment_with must be 'torchvision' or 'opencv', not {augment_with!r}")
        self.decode_on, self.augment_with = decode_on, augment_with
        self.split, self.rank, self.world_size = split, rank, world_size
        self.micro_batch, self.accum, self.steps = micro_batch, accum, steps
        self.image_size, self.seed, self.order, self.shuffle_buffer = image_size, seed, order, shuffle_buffer
        self.epoch, self.skip, self.continuous = 0, 0, False
        self.augment_policy = "none"      # --augment-policy (finetune.mixing.augment), torchvision path only

    def _random(self, worker: int, num_workers: int):
        rng = random.Random(f"shards-{self.seed}-{self.epoch}-{self.rank}-{worker}")
        urls = self.split.urls
        samples = _tar_samples(rng.choice(urls) for _ in itertools.count())
        if self.shuffle_buffer > 1:
            samples = wds.filters._shuffle(samples, self.shuffle_buffer, min(self.shuffle_buffer, 100), rng)
        my_skip = len(range(worker, self.skip, num_workers)) * self.micro_batch
        tag = f"{self.seed}-{self.epoch}-{self.rank}-{worker}"
        for n, sample in enumerate(samples):
            if n >= my_skip:
                yield f"{tag}-{n}", sample

    def _sequential(self, worker: int, num_workers: int):
        global_batch = self.micro_batch * self.accum * self.world_size
        per_rank = global_batch // self.world_size
        limit = self.steps * global_batch
        for g, sample in _indexed_samples(self.split.urls, self.split.offsets):
            if g >= limit:
                return
            k, p = divmod(g, global_batch)
            r, q = divmod(p, per_rank)
            i = k * self.accum + q // self.micro_batch   # this rank's loader-batch index
            if r == self.rank and i % num_workers == worker and i >= self.skip:
                yield f"{self.seed}-{self.epoch}-{g}", sample

    def __iter__(self):
        worker, num_workers = _worker()
        # The DataLoader takes batch n of an iterator from worker n % num_workers, starting at worker 0 on
        # every iter(). After a resume that skipped `skip` batches, worker w must therefore produce what worker
        # (w + skip) % num_workers would have: otherwise the same batches arrive in another order. Likewise
        # for later epochs of a continuous iteration, shifted by the batches handed out before them.
        if not self.continuous:
            yield from self._epoch_batches((worker + self.skip) % num_workers, num_workers)
            return
        per_epoch, handed_out = self.steps * self.accum, 0
        while True:         # in a loader worker: this worker's own copy of the stream advances
            role = (worker - handed_out + self.skip) % num_workers
            first = self.skip + (role - self.skip) % num_workers
            yield from itertools.islice(self._epoch_batches(role, num_workers),
                                        len(range(first, per_epoch, num_workers)))
            handed_out += per_epoch - self.skip
            self.epoch, self.skip = self.epoch + 1, 0

    def _epoch_batches(self, worker: int, num_workers: int):
        """This epoch's micro-batches i (>= skip) with i % num_workers == worker, in order."""
        source = self._random if self.order == "random" else self._sequential
        make_batch = self._batch_maker()
        batch = []
        for seed_key, sample in source(worker, num_workers):
            jpg, label = sample_fields(sample, self.split.num_classes)
            batch.append((jpg, random.Random(seed_key), label))
            if len(batch) == self.micro_batch:
                yield make_batch(batch)
                batch = []

    def _batch_maker(self):
        """A function: [(JPEG bytes, per-sample RNG, label)] -> one micro-batch, as decode_on/augment_with say."""
        size = self.image_size
        if self.decode_on == "device":
            return lambda items: collate_raw([(raw_sample(data, rng), y) for data, rng, y in items])
        if self.augment_with == "opencv":
            return lambda items: opencv_batch(items, size)
        policy = self.augment_policy
        return lambda items: collate([(augment(train_transform(decode(data), size, rng), policy, rng), y)
                                      for data, rng, y in items])


class ResampledTrainStream(TrainStream):
    """--class-balance resample: the random stream, each sample kept with probability
    min(count) / count[its class] (seeded, decided before decoding), so every class is drawn equally often.
    `skip` (resume) counts kept samples, as the loader saw them."""

    def __init__(self, split: Split, **kw):
        super().__init__(split, **kw)
        counts = [max(c, 1) for c in split.class_counts]
        self.keep = [min(counts) / c for c in counts]

    def _random(self, worker: int, num_workers: int):
        skip, self.skip = self.skip, 0          # the parent skips unfiltered samples: filter first, then skip
        try:
            stream = super()._random(worker, num_workers)
            stream = itertools.chain([next(stream)], stream)    # the parent reads .skip on its first sample
        finally:
            self.skip = skip
        rng = random.Random(f"balance-{self.seed}-{self.epoch}-{self.rank}-{worker}")
        kept = ((key, s) for key, s in stream
                if rng.random() < self.keep[sample_fields(s, self.split.num_classes)[1]])
        my_skip = len(range(worker, skip, num_workers)) * self.micro_batch
        for n, item in enumerate(kept):
            if n >= my_skip:
                yield item


def train_stream_for(cfg, split: Split, **kw) -> TrainStream:
    """The train stream --class-balance asks for (resample: ResampledTrainStream; else TrainStream)."""
    return (ResampledTrainStream if cfg.class_balance == "resample" else TrainStream)(split, **kw)


class EvalStream(IterableDataset):
    """Each test sample exactly once over all ranks, reading as little as it can:
    - by shard, when the split has at least as many shards as ranks: rank r reads shards j with
      j % world == r, all of their samples (so the ranks together read the split once);
    - by sample otherwise: every rank reads every shard and keeps global indices g with g % world == r.
    Samples with g >= limit (when limit > 0) are left out either way; shards that start at or past the limit
    are not opened. Within a rank, workers take disjoint shards. Yields (uint8 images, labels) batches of
    `batch`, the last one possibly smaller; the caller counts samples and checks the total."""

    def __init__(self, split: Split, *, rank: int, world_size: int, batch: int, preprocess: dict, limit: int):
        self.split, self.rank, self.world_size = split, rank, world_size
        self.batch, self.preprocess, self.limit = batch, preprocess, limit

    @property
    def by_shard(self) -> bool:
        return len(self.split.shards) >= self.world_size

    def shards(self, worker: int = 0, num_workers: int = 1) -> list[tuple[str, int]]:
        """(url, offset) of the shards this rank's `worker` opens, in manifest order."""
        pairs = [(u, o) for u, o in zip(self.split.urls, self.split.offsets) if not self.limit or o < self.limit]
        if self.by_shard:
            pairs = [p for j, p in enumerate(pairs) if j % self.world_size == self.rank]
        return [p for j, p in enumerate(pairs) if j % num_workers == worker]

    def __iter__(self):
        mine = self.shards(*_worker())
        keep_all = self.by_shard
        batch = []
        for g, sample in _indexed_samples([u for u, _ in mine], [o for _, o in mine]):
            if (not keep_all and g % self.world_size != self.rank) or (self.limit and g >= self.limit):
                continue
            jpg, label = sample_fields(sample, self.split.num_classes)
            batch.append((eval_transform(decode(jpg), self.preprocess), label))
            if len(batch) == self.batch:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)


def make_loader(dataset: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    # Not passed through accelerator.prepare: that would re-shard or dispatch what the streams already split.
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None)


def auto_workers(local_processes: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, local_processes)))
