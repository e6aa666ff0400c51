"""The data streams in isolation: exact-once evaluation for any world size and worker count, world-size
invariant global batches in sequential order, resume fast-forwarding with several workers, and the
device-decode path's CPU fallback, --class-balance resample, and --augment-with opencv against torchvision."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from finetune.data.device_decode import DeviceDecoder, RawJpegBatch
from finetune.data.manifest import load_manifest
from finetune.data.streams import EvalStream, ResampledTrainStream, TrainStream, make_loader, train_stream_for
from finetune.data.transforms import DeviceNormalizer


def train_kw(**over):
    kw = dict(rank=0, world_size=1, micro_batch=4, accum=1, steps=4, image_size=32, seed=1, order="random",
              shuffle_buffer=20)
    return {**kw, **over}


def _eval_multiset(split, world: int, workers: int) -> list[tuple[int, str]]:
    """Which test images all ranks together evaluated: (label, sha256 of the uint8 crop), sorted."""
    import hashlib
    seen = []
    for rank in range(world):
        stream = EvalStream(split, rank=rank, world_size=world, batch=3, limit=0,
                            preprocess=dict(resize=[37, 37], crop=32, interpolation="bilinear"))
        for images, labels in make_loader(stream, workers, pin_memory=False):
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            seen += [(int(y), hashlib.sha256(x.numpy().tobytes()).hexdigest()) for x, y in zip(images, labels)]
    return sorted(seen)


@pytest.mark.slow
@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_eval_covers_every_test_sample_exactly_once(shards, world, workers):
    """Not only how many: world sizes 1, 2 and 3 evaluate the same multiset of images (each exactly once)."""
    split = load_manifest(shards).test
    seen = _eval_multiset(split, world, workers)
    assert len(seen) == split.num_samples == 13 and len(set(seen)) == 13
    assert seen == _eval_multiset(split, 1, 0)


def test_sequential_global_batches_do_not_depend_on_world_size(shards):
    split = load_manifest(shards).train
    one = [labels for _, labels in TrainStream(split, **train_kw(order="sequential", micro_batch=8))]
    halves = [[labels for _, labels in TrainStream(split, **train_kw(order="sequential", rank=r, world_size=2))]
              for r in (0, 1)]
    assert len(one) == 4
    for k, whole in enumerate(one):
        assert torch.equal(whole, torch.cat([halves[0][k], halves[1][k]]))


@pytest.mark.slow
@pytest.mark.parametrize("skip", [1, 3])
def test_resume_skip_gives_the_remaining_batches_in_order(shards, skip):
    """With 2 loader workers, fast-forwarding `skip` batches yields exactly the tail of the full epoch."""
    split = load_manifest(shards).train
    full_stream = TrainStream(split, **train_kw())
    full = [x for x, _ in zip(make_loader(full_stream, 2, False), range(6))]
    resumed_stream = TrainStream(split, **train_kw())
    resumed_stream.skip = skip
    resumed = [x for x, _ in zip(make_loader(resumed_stream, 2, False), range(6 - skip))]
    for (a, la), (b, lb) in zip(full[skip:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)


def _label_counts(stream_cls, split, rank: int, batches: int, seed: int = 1) -> list[int]:
    stream = stream_cls(split, **train_kw(rank=rank, world_size=2, steps=batches, seed=seed))
    labels = [y for _, y in itertools.islice(iter(stream), batches)]
    return torch.bincount(torch.cat(labels), minlength=2).tolist()


def test_resample_draws_both_classes_equally_often_on_a_1_to_9_split(skewed_shards):
    """--class-balance resample on 5 hotdog vs 45 not-hotdog: each rank's 25 batches of 4 hold about as many of
    the rare class as of the common one (exact, seeded counts), while the plain stream keeps the 1:9 skew."""
    split = load_manifest(skewed_shards).train
    assert split.class_counts == [5, 45]
    resampled = [_label_counts(ResampledTrainStream, split, rank, 25) for rank in (0, 1)]
    plain = [_label_counts(TrainStream, split, rank, 25) for rank in (0, 1)]
    assert resampled == [[51, 49], [46, 54]]          # hotdog, not-hotdog per rank: 48.5 % of 200 are hotdog
    assert plain == [[10, 90], [8, 92]]               # the skew resample removes: 9 % hotdog
    # Deterministic for a seed (the same images, not only the same labels); another seed draws otherwise.
    kw = train_kw(rank=1, world_size=2, steps=6)
    first, again = (list(itertools.islice(iter(ResampledTrainStream(split, **kw)), 6)) for _ in range(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert _label_counts(ResampledTrainStream, split, 1, 25, seed=2) != resampled[1]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resample_gives_every_rank_the_same_number_of_full_batches(skewed_shards, workers):
    """The filtered stream stays infinite: each of 2 ranks gets exactly `steps` full micro-batches through the
    loader (what train.py cuts per epoch), so no rank runs out first and DDP stays even."""
    split = load_manifest(skewed_shards).train
    steps = split.num_samples // 8                    # train.py: train_samples // global batch (2 x 4)
    for rank in (0, 1):
        stream = ResampledTrainStream(split, **train_kw(rank=rank, world_size=2, steps=steps))
        sizes = [len(y) for _, y in itertools.islice(iter(make_loader(stream, workers, False)), steps + 1)]
        assert sizes == [4] * (steps + 1)             # one more than an epoch needs: never exhausted


@pytest.mark.slow
@pytest.mark.parametrize("skip", [1, 3])
def test_resample_resume_skip_counts_kept_samples(skewed_shards, skip):
    """A resumed epoch fast-forwards `skip` loader batches of the filtered stream (2 workers): the tail of the
    full epoch, in order."""
    split = load_manifest(skewed_shards).train
    full = list(itertools.islice(iter(make_loader(ResampledTrainStream(split, **train_kw()), 2, False)), 6))
    resumed_stream = ResampledTrainStream(split, **train_kw())
    resumed_stream.skip = skip
    resumed = list(itertools.islice(iter(make_loader(resumed_stream, 2, False)), 6 - skip))
    assert len(resumed) == 6 - skip
    for (a, la), (b, lb) in zip(full[skip:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_train_stream_for_follows_class_balance(skewed_shards):
    from finetune.config import parse_config
    split = load_manifest(skewed_shards).train
    for mode, cls in (("resample", ResampledTrainStream), ("loss", TrainStream), ("none", TrainStream)):
        stream = train_stream_for(parse_config(["--data", "x", "--class-balance", mode]), split, **train_kw())
        assert type(stream) is cls, mode
    assert ResampledTrainStream(split, **train_kw()).keep == [1.0, 5 / 45]


def test_device_decode_falls_back_to_the_cpu_path_bit_for_bit(shards):
    split = load_manifest(shards).train
    cpu = torch.device("cpu")
    pairs = zip(TrainStream(split, **train_kw()), TrainStream(split, decode_on="device", **train_kw()))
    for _, ((x, y), (raw, y2)) in zip(range(2), pairs):
        assert isinstance(raw, RawJpegBatch) and torch.equal(y, y2)
        a, _ = DeviceNormalizer(cpu, True)(x, y)
        b, _ = DeviceDecoder(cpu, True, 32)(raw, y2)
        assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["pipe:curl http://x | sh", "../elsewhere.tar", "sub/train-000000.tar",
                                  "/abs/train-000000.tar", "http://host/train-000000.tar"])
def test_manifest_refuses_shard_names_data_prep_would_not_write(shards, tmp_path, name):
    import json
    import shutil

    from finetune import UsageError
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="not a plain NAME.tar"):
        load_manifest(copy)


HOTDOG_FOOD = Path(__file__).resolve().parents[3] / "shared" / "data" / "hotdog-food"


def test_opencv_augment_draws_the_same_crops_and_flips_as_torchvision(tmp_path):
    """--augment-with opencv on real photos (512 px: crops both shrunk and enlarged to 224): the same samples,
    labels, crops and flips as the torchvision path, the pixels within a few levels (only the resampling
    differs), and a [B,3,224,224] uint8 batch already in channels_last layout."""
    import random

    from finetune.data.transforms import decode, opencv_batch, train_sample_opencv, train_transform
    photos = sorted((HOTDOG_FOOD / "train" / "hotdog").glob("*.jpg"))[:24]
    if not photos:
        pytest.skip(f"no real photos at {HOTDOG_FOOD} (../shared/data)")
    items, theirs = [], []
    for i, path in enumerate(photos):
        data = path.read_bytes()
        a = train_sample_opencv(data, 224, random.Random(f"s-{i}"))
        b = train_transform(decode(data), 224, random.Random(f"s-{i}"))
        items.append((data, random.Random(f"s-{i}"), i))
        theirs.append(b)
        a = torch.from_numpy(a).permute(2, 0, 1).float()
        same, flipped = (a - b.float()).abs().mean(), (a - b.flip(2).float()).abs().mean()
        assert same < 3.0 and same < flipped, (path.name, float(same), float(flipped))   # same crop, same flip
    images, labels = opencv_batch(items, 224)          # the same draws again, resized straight into the batch
    assert images.shape == (24, 3, 224, 224) and images.dtype == torch.uint8
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.tolist() == list(range(24))
    assert (images.float() - torch.stack(theirs).float()).abs().mean() < 1.5


@pytest.mark.floor
def test_train_stream_with_opencv_gives_the_same_samples_and_labels(shards):
    split = load_manifest(shards).train
    for (x, y), (x2, y2), _ in zip(TrainStream(split, **train_kw()),
                                   TrainStream(split, augment_with="opencv", **train_kw()), range(3)):
        assert torch.equal(y, y2) and x2.shape == x.shape == (4, 3, 32, 32)
        assert x2.is_contiguous(memory_format=torch.channels_last)
        assert (x.float() - x2.float()).abs().mean() < 6.0
    with pytest.raises(ValueError, match="augment_with"):
        TrainStream(split, augment_with="pil", **train_kw())


def test_opencv_augment_falls_back_to_torchvision_decoding(monkeypatch):
    """A JPEG simplejpeg refuses goes through torchvision's decoder (a CHW tensor seen as HWC): same pixels."""
    import io
    import random

    import numpy as np
    import simplejpeg
    from PIL import Image

    from finetune.data.transforms import train_sample_opencv
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    usual = train_sample_opencv(buf.getvalue(), 32, random.Random(0))

    def refuse(*args, **kwargs):
        raise ValueError("unsupported")
    monkeypatch.setattr(simplejpeg, "decode_jpeg", refuse)
    assert np.array_equal(train_sample_opencv(buf.getvalue(), 32, random.Random(0)), usual)
