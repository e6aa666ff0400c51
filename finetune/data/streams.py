"""The WebDataset train and eval streams (IterableDatasets that split the work by rank and loader worker
themselves), and the DataLoader over them.

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
import os
import random
from dataclasses import dataclass

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..mixing import augment
from .device_decode import collate_raw, raw_sample
from .manifest import Split, sample_fields
from .transforms import collate, decode, eval_transform, opencv_batch, train_transform


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


@dataclass(frozen=True)
class TrainSettings:
    """What a TrainStream draws, for one rank (see TrainStream)."""
    rank: int
    world_size: int
    micro_batch: int
    accum: int
    steps: int
    image_size: int
    seed: int
    order: str                      # "random" or "sequential"
    shuffle_buffer: int
    decode_on: str = "cpu"
    augment_with: str = "torchvision"

    def __post_init__(self):
        if self.decode_on not in ("cpu", "device"):
            raise ValueError(f"decode_on must be 'cpu' or 'device', not {self.decode_on!r}")
        if self.augment_with not in ("torchvision", "opencv"):
            raise ValueError(f"augment_with must be 'torchvision' or 'opencv', not {self.augment_with!r}")


class TrainStream(IterableDataset):
    """Micro-batches of uint8 images for ONE rank, as `settings` (TrainSettings) say. Set `.epoch` and `.skip`
    before iterating.

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

    def __init__(self, split: Split, settings: TrainSettings | None = None, **fields):
        """TrainStream(split, TrainSettings(...)), or TrainStream(split, rank=..., ...) with its fields."""
        self.split, self.settings = split, settings or TrainSettings(**fields)
        self.epoch, self.skip, self.continuous = 0, 0, False
        self.augment_policy = "none"      # --augment-policy (finetune.mixing.augment), torchvision path only

    def _random(self, worker: int, num_workers: int):
        s = self.settings
        rng = random.Random(f"shards-{s.seed}-{self.epoch}-{s.rank}-{worker}")
        urls = self.split.urls
        samples = _tar_samples(rng.choice(urls) for _ in itertools.count())
        if s.shuffle_buffer > 1:
            samples = wds.filters._shuffle(samples, s.shuffle_buffer, min(s.shuffle_buffer, 100), rng)
        my_skip = len(range(worker, self.skip, num_workers)) * s.micro_batch
        tag = f"{s.seed}-{self.epoch}-{s.rank}-{worker}"
        for n, sample in enumerate(samples):
            if n >= my_skip:
                yield f"{tag}-{n}", sample

    def _sequential(self, worker: int, num_workers: int):
        s = self.settings
        global_batch = s.micro_batch * s.accum * s.world_size
        per_rank = global_batch // s.world_size
        limit = s.steps * global_batch
        for g, sample in _indexed_samples(self.split.urls, self.split.offsets):
            if g >= limit:
                return
            k, p = divmod(g, global_batch)
            r, q = divmod(p, per_rank)
            i = k * s.accum + q // s.micro_batch   # this rank's loader-batch index
            if r == s.rank and i % num_workers == worker and i >= self.skip:
                yield f"{s.seed}-{self.epoch}-{g}", sample

    def __iter__(self):
        worker, num_workers = _worker()
        # The DataLoader takes batch n of an iterator from worker n % num_workers, starting at worker 0 on
        # every iter(). After a resume that skipped `skip` batches, worker w must therefore produce what worker
        # (w + skip) % num_workers would have: otherwise the same batches arrive in another order. Likewise
        # for later epochs of a continuous iteration, shifted by the batches handed out before them.
        if not self.continuous:
            yield from self._epoch_batches((worker + self.skip) % num_workers, num_workers)
            return
        per_epoch, handed_out = self.settings.steps * self.settings.accum, 0
        while True:         # in a loader worker: this worker's own copy of the stream advances
            role = (worker - handed_out + self.skip) % num_workers
            first = self.skip + (role - self.skip) % num_workers
            yield from itertools.islice(self._epoch_batches(role, num_workers),
                                        len(range(first, per_epoch, num_workers)))
            handed_out += per_epoch - self.skip
            self.epoch, self.skip = self.epoch + 1, 0

    def _epoch_batches(self, worker: int, num_workers: int):
        """This epoch's micro-batches i (>= skip) with i % num_workers == worker, in order."""
        source = self._random if self.settings.order == "random" else self._sequential
        make_batch = self._batch_maker()
        batch = []
        for seed_key, sample in source(worker, num_workers):
            jpg, label = sample_fields(sample, self.split.num_classes)
            batch.append((jpg, random.Random(seed_key), label))
            if len(batch) == self.settings.micro_batch:
                yield make_batch(batch)
                batch = []

    def _batch_maker(self):
        """A function: [(JPEG bytes, per-sample RNG, label)] -> one micro-batch, as decode_on/augment_with say."""
        size, s = self.settings.image_size, self.settings
        if s.decode_on == "device":
            return lambda items: collate_raw([(raw_sample(data, rng), y) for data, rng, y in items])
        if s.augment_with == "opencv":
            return lambda items: opencv_batch(items, size)
        policy = self.augment_policy
        return lambda items: collate([(augment(train_transform(decode(data), size, rng), policy, rng), y)
                                      for data, rng, y in items])


class ResampledTrainStream(TrainStream):
    """--class-balance resample: the random stream, each sample kept with probability
    min(count) / count[its class] (seeded, decided before decoding), so every class is drawn equally often.
    `skip` (resume) counts kept samples, as the loader saw them."""

    def __init__(self, split: Split, settings: TrainSettings | None = None, **fields):
        super().__init__(split, settings, **fields)
        counts = [max(c, 1) for c in split.class_counts]
        self.keep = [min(counts) / c for c in counts]

    def _random(self, worker: int, num_workers: int):
        skip, self.skip = self.skip, 0          # the parent skips unfiltered samples: filter first, then skip
        try:
            stream = super()._random(worker, num_workers)
            stream = itertools.chain([next(stream)], stream)    # the parent reads .skip on its first sample
        finally:
            self.skip = skip
        rng = random.Random(f"balance-{self.settings.seed}-{self.epoch}-{self.settings.rank}-{worker}")
        kept = ((key, s) for key, s in stream
                if rng.random() < self.keep[sample_fields(s, self.split.num_classes)[1]])
        my_skip = len(range(worker, skip, num_workers)) * self.settings.micro_batch
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
