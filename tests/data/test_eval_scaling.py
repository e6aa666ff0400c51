"""Evaluation I/O that scales (issue 13, item 2): with at least as many test shards as ranks every shard is read
by exactly one rank; with fewer, the per-sample split. 64 ranks are simulated by one EvalStream per rank (no
processes); bytes read are counted at the shard reader."""

from __future__ import annotations

import os

import pytest

import finetune.data.streams as data
from data_prep.shards import default_samples_per_shard, eval_samples_per_shard
from finetune.data.manifest import load_manifest
from finetune.data.streams import EvalStream

from conftest import _prep

PRE = dict(resize=[20, 20], crop=16, interpolation="bilinear")


@pytest.fixture(scope="module")
def many_test_shards(tmp_path_factory):
    """70 test samples, one per shard (70 >= 64 ranks); 4 train samples."""
    return _prep(tmp_path_factory.mktemp("many"), "many", 2, 35, per_shard=1)


def simulate(split, world: int, monkeypatch, limit: int = 0) -> tuple[list[int], int]:
    """Every rank's EvalStream, one after another: the global indices evaluated, and the shard bytes the
    iteration opened (counted at the shard reader)."""
    streams = [EvalStream(split, rank=r, world_size=world, batch=8, preprocess=PRE, limit=limit) for r in range(world)]
    seen = [g for stream in streams for g in _keys(stream)]
    opened, real = [], data._tar_samples

    def counting(urls):
        urls = list(urls)
        opened.extend(urls)
        return real(urls)
    monkeypatch.setattr(data, "_tar_samples", counting)
    evaluated = sum(len(labels) for stream in streams for _, labels in stream)
    assert evaluated == len(seen)
    return seen, sum(os.path.getsize(u) for u in opened)


def _keys(stream: EvalStream) -> list[str]:
    """The global indices this rank evaluates (the same rule __iter__ applies)."""
    mine = stream.shards()
    return [g for g, _ in data._indexed_samples([u for u, _ in mine], [o for _, o in mine])
            if (stream.by_shard or g % stream.world_size == stream.rank) and (not stream.limit or g < stream.limit)]


def test_64_ranks_read_the_test_set_once(many_test_shards, monkeypatch):
    split = load_manifest(many_test_shards).test
    one_pass = sum(s["size"] for s in split.shards)
    seen, read = simulate(split, 64, monkeypatch)
    assert sorted(seen) == list(range(split.num_samples)) == list(range(70))   # each sample once
    assert read == one_pass, f"64 ranks read {read / one_pass:.1f} passes over the test set, expected 1"


def test_fewer_shards_than_ranks_fall_back_to_the_sample_split(shards, monkeypatch):
    split = load_manifest(shards).test            # 13 samples in 2 shards
    seen, read = simulate(split, 3, monkeypatch)
    assert sorted(seen) == list(range(13))
    assert read == 3 * sum(s["size"] for s in split.shards)    # every rank reads everything


def test_limit_is_applied_and_shards_past_it_are_not_opened(many_test_shards, monkeypatch):
    split = load_manifest(many_test_shards).test
    seen, read = simulate(split, 64, monkeypatch, limit=10)
    assert sorted(seen) == list(range(10))
    assert read == sum(s["size"] for s in split.shards[:10])


def test_data_prep_gives_at_least_16_test_shards_by_default():
    for n_train, n_test in [(2000, 500), (341, 126), (200, 50), (128, 64), (10**6, 50_000)]:
        size = eval_samples_per_shard(n_test, default_samples_per_shard(n_train), None, explicit=False)
        assert -(-n_test // size) >= 16 and size <= default_samples_per_shard(n_train)
    assert eval_samples_per_shard(13, 8, None, explicit=True) == 8          # an explicit size wins
    assert eval_samples_per_shard(640, 8, 64, explicit=True) == 8           # never bigger than train's
    assert eval_samples_per_shard(640, 100, 64, explicit=True) == 10        # ...but enough for 64 ranks
