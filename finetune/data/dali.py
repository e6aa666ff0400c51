"""--loader dali: NVIDIA DALI reads the training shards and decodes, crops, flips and normalises them.

The same shards and manifest as the torchvision path (streams.py's TrainStream), the same recipe:
- `fn.readers.webdataset` over the split's tar files, with one index file per shard (DALI's `wds2idx`
  format, written by `write_index`, built once per node by the local main process and cached by the shard's
  sha256, so a changed shard never meets a stale index);
- RandomResizedCrop's scale and ratio (transforms.py's CROP_SCALE / CROP_RATIO, 10 attempts) decoded by
  `fn.decoders.image_random_crop` (only the crop's region is decoded), resized with antialiasing, flipped
  with probability 1/2 and normalised with the weights' mean/std by `fn.crop_mirror_normalize`, in HWC
  order: the batch reaches the model as a channels_last [B, 3, H, W] float view, no transposing copy;
- on a GPU the decode is DALI's "mixed" decoder (nvJPEG, and the A100/H100 hardware JPEG decoder) and
  everything after it runs on that GPU; without one, DALI's CPU-only mode (`device_id=None`).

Sharding, steps and seeds: every rank builds one pipeline per epoch over the same shard order (permuted per
epoch with the run's seed, identical on all ranks) and reads its own contiguous 1/world of the samples
(`shard_id=rank`), so the ranks' samples are disjoint within an epoch; each rank is then cut to the same
`train_samples // batch_size` steps as the torchvision path (the pipeline never runs dry: DALI readers
wrap around), so uneven splits cannot hang DDP. The reader's shuffle and the crop/flip draws are seeded by
(seed, epoch, rank). A resumed epoch replays the `skip` micro-batches it had consumed (decoded and dropped:
DALI cannot fast-forward its random state without running it), which gives the uninterrupted run's batches.
Evaluation stays on the torchvision path (streams.py's EvalStream: each test image exactly once).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import socket
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import UsageError
from .manifest import Split
from .transforms import CROP_RATIO, CROP_SCALE, DeviceNormalizer

INSTALL = "pip install 'hotdog-finetune[dali]' (i.e. pip install nvidia-dali-cuda130)"


def import_dali():
    """(nvidia.dali, its fn and types modules), or a one-line UsageError naming the install command."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError as e:
        raise UsageError(f"--loader dali needs NVIDIA DALI, which cannot be imported here ({e}); install it with "
                         f"{INSTALL}, or use --loader torchvision") from None
    return dali, fn, types


# ------------------------------------------------------------------------------------------------------
# Index files (DALI's wds2idx format, v1.2)
# ------------------------------------------------------------------------------------------------------
def write_index(tar_path: str | os.PathLike, index_path: str | os.PathLike) -> int:
    """DALI's `wds2idx` as a function: one line per sample, `ext offset size name` per regular file, files
    grouped into samples by the name up to the first dot of the file name (webdataset's rule). Only the tar
    headers are read (tarfile seeks over the contents). Written atomically. Returns the sample count."""
    samples, last = [], None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if member.type != tarfile.REGTYPE:
                continue
            name = member.name
            dot = name.find(".", name.rfind("/") + 1)
            base, ext = (name[:dot], name[dot + 1:]) if dot >= 0 else (name, "")
            if not base or base.endswith("/"):          # hidden files (".x"): not samples, as in wds2idx
                continue
            component = f"{ext} {member.offset_data} {member.size} {name}"
            if base != last:
                samples.append([component])
                last = base
            else:
                samples[-1].append(component)
    if not samples:
        raise ValueError(f"{tar_path}: no samples in this tar file")
    # Atomically, under a temporary name unique per host and process: nodes may share the index folder.
    index_path = Path(index_path)
    tmp = index_path.with_name(f".{index_path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        tmp.write_text(f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples))
        os.replace(tmp, index_path)
    except OSError:
        tmp.unlink(missing_ok=True)             # nothing half-written left behind
        raise
    return len(samples)


def index_dir() -> Path:
    """Where index files are cached: $HOTDOG_DALI_INDEX_DIR, else a node-local temp folder."""
    return Path(os.environ.get("HOTDOG_DALI_INDEX_DIR") or Path(tempfile.gettempdir()) / "hotdog-dali-index")


def index_paths(split: Split, cache: Path | None = None) -> list[str]:
    """The index file of each shard of `split`, named by the shard's sha256 and size from the manifest."""
    cache = cache or index_dir()
    return [str(cache / f"{s['sha256']}-{s['size']}.idx") for s in split.shards]


def build_indexes(splits: list[Split], cache: Path | None = None) -> str | None:
    """Write the missing index files of `splits` (the local main process does this once per node). Returns
    a one-line problem description, or None."""
    cache = cache or index_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for split in splits:
            for url, idx in zip(split.urls, index_paths(split, cache)):
                if not os.path.isfile(idx):
                    write_index(url, idx)
    except (OSError, ValueError, tarfile.TarError) as e:
        return (f"--loader dali: cannot write DALI index files into {cache} ({e}); set HOTDOG_DALI_INDEX_DIR "
                f"to a writable folder")
    return None


# ------------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------------
@dataclass
class DaliSpec:
    """What one rank's training pipeline needs. mean/std None: uint8 output, no normalisation (benchmarks)."""
    split: Split
    index: list[str]                 # index_paths(split), same order
    rank: int
    world_size: int
    micro_batch: int
    image_size: int
    seed: int
    shuffle_buffer: int
    threads: int                     # DALI CPU threads (train.py: its loader workers per process)
    device_id: int | None            # the rank's CUDA device; None: CPU-only mode
    mean: tuple | None = None
    std: tuple | None = None


def epoch_shards(spec: DaliSpec, epoch: int) -> tuple[list[str], list[str]]:
    """(tar paths, index paths) in this epoch's order: a permutation seeded by (seed, epoch) only, so every
    rank sees the same order and their 1/world slices of it are disjoint; a new slice each epoch."""
    order = list(range(len(spec.split.urls)))
    random.Random(f"dali-shards-{spec.seed}-{epoch}").shuffle(order)
    return [spec.split.urls[i] for i in order], [spec.index[i] for i in order]


def _seed(spec: DaliSpec, epoch: int) -> int:
    digest = hashlib.sha256(f"dali-{spec.seed}-{epoch}-{spec.rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def random_crop(fn, types, jpegs, spec: DaliSpec):
    """RandomResizedCrop's draw (CROP_SCALE, CROP_RATIO, 10 attempts), decoding only the crop's region."""
    return fn.decoders.image_random_crop(jpegs, device="cpu" if spec.device_id is None else "mixed",
                                         output_type=types.RGB, random_area=list(CROP_SCALE),
                                         random_aspect_ratio=list(CROP_RATIO), num_attempts=10)


def augment(fn, types, jpegs, spec: DaliSpec):
    """RandomResizedCrop(image_size, CROP_SCALE, CROP_RATIO) + flip (+ mean/std), as DALI nodes."""
    images = random_crop(fn, types, jpegs, spec)
    images = fn.resize(images, resize_x=spec.image_size, resize_y=spec.image_size,
                       interp_type=types.INTERP_LINEAR, antialias=True)
    flip = fn.random.coin_flip(probability=0.5)
    if spec.mean is None:
        return fn.flip(images, horizontal=flip)
    return fn.crop_mirror_normalize(images, mirror=flip, dtype=types.FLOAT, output_layout="HWC",
                                    mean=[m * 255 for m in spec.mean], std=[s * 255 for s in spec.std])


def build_pipeline(spec: DaliSpec, epoch: int, keys: bool = False, crops_only: bool = False):
    """One epoch's pipeline: outputs (images HWC, cls bytes[, source_info of each sample when `keys`]).
    `crops_only`: (the decoded crop, the stored image's shape) instead, for the crop statistics tests."""
    dali, fn, types = import_dali()
    paths, index = epoch_shards(spec, epoch)
    pipe = dali.Pipeline(batch_size=spec.micro_batch, num_threads=max(1, spec.threads), device_id=spec.device_id,
                         seed=_seed(spec, epoch), prefetch_queue_depth=2)
    with pipe:
        jpegs, cls = fn.readers.webdataset(paths=paths, index_paths=index, ext=["jpg", "cls"], shard_id=spec.rank,
                                           num_shards=spec.world_size, random_shuffle=spec.shuffle_buffer > 1,
                                           initial_fill=max(1, spec.shuffle_buffer),
                                           missing_component_behavior="error", name="reader")
        if crops_only:
            pipe.set_outputs(random_crop(fn, types, jpegs, spec), fn.peek_image_shape(jpegs))
        else:
            extra = [fn.get_property(jpegs, key="source_info")] if keys else []
            pipe.set_outputs(augment(fn, types, jpegs, spec), cls, *extra)
    pipe.build()
    return pipe


def _text(tensor_list) -> list[str]:
    import numpy as np
    return [bytes(np.asarray(tensor_list.at(i))).decode() for i in range(len(tensor_list))]


def to_torch(images, device: torch.device | None) -> torch.Tensor:
    """A DALI batch of HWC images -> a torch [B, 3, H, W] view in channels_last layout (one copy, on the
    pipeline's device; on a GPU on torch's current stream)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    batch = images.as_tensor()
    out = torch.empty(batch.shape(), dtype=to_torch_type[batch.dtype], device=device or "cpu")
    feed_ndarray(batch, out, cuda_stream=torch.cuda.current_stream(out.device) if out.is_cuda else None)
    return out.permute(0, 3, 1, 2)


class DaliTrainLoader:
    """Micro-batches (images, labels) for ONE rank; TrainStream's interface as train.py uses it: set `.epoch`
    and `.skip`, then iterate. A new pipeline per epoch, its first `skip` micro-batches replayed (resume).
    batches_per_epoch 0: one epoch, never ending; N: epoch after epoch of N micro-batches (continuous, one
    iterator per run). keys=True also yields each sample's source ("tar:offset:name"), for tests."""

    def __init__(self, spec: DaliSpec, keys: bool = False, batches_per_epoch: int = 0):
        import_dali()                                   # the one-line error now, not at the first batch
        self.spec, self.keys, self.batches_per_epoch = spec, keys, batches_per_epoch
        self.epoch, self.skip = 0, 0

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        while True:
            pipe = build_pipeline(self.spec, epoch, keys=self.keys)
            for _ in range(skip):
                pipe.run()
            count = range(self.batches_per_epoch - skip) if self.batches_per_epoch else itertools.count()
            for _ in count:
                yield self._batch(pipe.run())
            del pipe                                    # free its buffers before the next epoch's are allocated
            epoch, skip = epoch + 1, 0

    def _batch(self, outputs):
        device = None if self.spec.device_id is None else torch.device("cuda", self.spec.device_id)
        labels = torch.tensor([int(t) for t in _text(outputs[1])], dtype=torch.long)
        batch = (to_torch(outputs[0], device), labels)
        return batch + (_text(outputs[2]),) if self.keys else batch


class FloatPassNormalizer(DeviceNormalizer):
    """The loop's `normalize` for --loader dali: DALI's float batches are already normalised (moved to the
    device and the model's memory format only); uint8 batches (evaluation's EvalStream) as DeviceNormalizer."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if not images.is_floating_point():
            return super().__call__(images, labels)
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True) if labels is not None else None


def make_train_loader(run, split: Split, *, steps: int, threads: int) -> DaliTrainLoader:
    """train.py's DALI train loader for this rank (`run`: train.Run; index files must exist: build_indexes):
    epoch after epoch of `steps` optimizer steps, continuously, like train.py's TrainStream."""
    cfg, acc = run.cfg, run.accelerator
    world = acc.num_processes
    spec = DaliSpec(split, index_paths(split), acc.process_index, world, cfg.batch_size // (world * cfg.grad_accum),
                    cfg.image_size, cfg.seed, cfg.shuffle_buffer, threads, _cuda_index(acc.device),
                    tuple(run.preprocess["mean"]), tuple(run.preprocess["std"]))
    return DaliTrainLoader(spec, batches_per_epoch=steps * cfg.grad_accum)


def _cuda_index(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()
