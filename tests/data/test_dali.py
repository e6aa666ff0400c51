"""--loader dali (finetune/data/dali.py): index files, the one-line refusals, and -- where NVIDIA DALI imports (its
CPU-only mode; CI installs it) -- sample counts, labels, disjoint ranks, crop statistics against the torchvision
path, seeds, resume by replay, a 2-process run that learns and a resumed run equal to an uninterrupted one.
Also --per-gpu-batch (the throughput setting), which needs no DALI."""

from __future__ import annotations

import importlib.util
import itertools
import math
import random
import shutil
import statistics
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import TINY, colour_source, load_model_pt, read_json, run_train
from finetune.data import dali
from finetune.data.manifest import load_manifest
from finetune.data.streams import _tar_samples
from finetune.data.transforms import random_resized_crop_params

HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")


@pytest.fixture(autouse=True)
def _index_dir(tmp_path_factory, monkeypatch):
    """Index files into this session's temp folder, never the machine's shared $TMPDIR cache."""
    monkeypatch.setenv("HOTDOG_DALI_INDEX_DIR", str(tmp_path_factory.getbasetemp() / "dali-index"))


def _keys_and_labels(split) -> dict[str, int]:
    """Every sample of `split` as 'tar path:member name' -> label, read by webdataset."""
    return {f"{s['__url__']}:{s['__key__']}.jpg": int(s["cls"]) for s in _tar_samples(split.urls)}


def test_write_index_has_one_line_per_sample_with_the_members_offsets(shards, tmp_path):
    split = load_manifest(shards).train
    for url, shard in zip(split.urls, split.shards):
        assert dali.write_index(url, tmp_path / "x.idx") == shard["num_samples"]
        lines = (tmp_path / "x.idx").read_text().splitlines()
        assert lines[0] == f"v1.2 {shard['num_samples']}" and len(lines) == 1 + shard["num_samples"]
        data = open(url, "rb").read()
        for line in lines[1:]:
            fields = line.split()
            parts = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
            assert set(parts) == {"cls", "jpg"}
            offset, size = parts["jpg"]
            assert data[offset:offset + 2] == b"\xff\xd8" and data[offset + size - 2:offset + size] == b"\xff\xd9"


@pytest.mark.slow
def test_write_index_equals_dalis_wds2idx(shards, tmp_path):
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx tool is not installed")
    url = load_manifest(shards).train.urls[0]
    dali.write_index(url, tmp_path / "ours.idx")
    with wds2idx.IndexCreator(url, str(tmp_path / "theirs.idx"), verbose=False) as creator:
        creator.create_index()
    assert (tmp_path / "ours.idx").read_text() == (tmp_path / "theirs.idx").read_text()


def test_build_indexes_is_cached_by_shard_content(shards, tmp_path):
    split = load_manifest(shards).train
    assert dali.build_indexes([split], tmp_path / "idx") is None
    paths = dali.index_paths(split, tmp_path / "idx")
    assert len(set(paths)) == len(split.urls) and all(p.endswith(f"{s['sha256']}-{s['size']}.idx")
                                                      for p, s in zip(paths, split.shards))
    stamps = [(tmp_path / "idx" / p).stat().st_mtime_ns for p in paths]
    assert dali.build_indexes([split], tmp_path / "idx") is None            # second call: nothing rewritten
    assert [(tmp_path / "idx" / p).stat().st_mtime_ns for p in paths] == stamps
    (tmp_path / "a-file").write_text("")                                    # not a folder (root ignores chmod)
    problem = dali.build_indexes([split], tmp_path / "a-file" / "idx")
    assert problem and "HOTDOG_DALI_INDEX_DIR" in problem and "\n" not in problem


def _parse(argv, monkeypatch, dali_installed: bool):
    from finetune.config import parse_config
    real = importlib.util.find_spec

    def find_spec(name, *args):          # DALI installed or not, whatever this machine has
        if name.startswith("nvidia"):
            return real("os") if dali_installed else None
        return real(name, *args)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return parse_config(["--data", "x", *argv])


def test_without_dali_the_error_is_one_line_naming_the_install_command(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["--loader", "dali"], monkeypatch, dali_installed=False)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "pip install nvidia-dali-cuda130" in last and "hotdog-finetune[dali]" in last


@pytest.mark.parametrize("flags, word", [(["--decode-on", "device"], "--decode-on device"),
                                         (["--augment-with", "opencv"], "--augment-with opencv"),
                                         (["--class-balance", "resample"], "--class-balance resample"),
                                         (["--data-order", "sequential"], "--data-order sequential")])
def test_dali_refuses_options_of_the_torchvision_path(monkeypatch, capsys, flags, word):
    with pytest.raises(SystemExit):
        _parse(["--loader", "dali", *flags], monkeypatch, dali_installed=True)
    assert word in capsys.readouterr().err.strip().splitlines()[-1]
    cfg = _parse(["--loader", "dali", "--debug"], monkeypatch, dali_installed=True)
    assert cfg.data_order == "random" and cfg.loader == "dali"     # --debug keeps DALI's random order


def test_per_gpu_batch_refusals(monkeypatch, capsys):
    for flags, word in ((["--batch-size", "64"], "drop --batch-size"), (["--loss-reduction", "mean"], "sum")):
        with pytest.raises(SystemExit):
            _parse(["--per-gpu-batch", "128", *flags], monkeypatch, dali_installed=False)
        assert word in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_per_gpu_batch_sets_the_global_batch_from_the_number_of_processes(shards, tmp_path):
    """--per-gpu-batch 4 on 2 processes: a global batch of 8 (config.yaml), 40 // 8 = 5 steps of 8 samples, at
    the recipe's lr (unchanged: the summed loss makes it per sample)."""
    run_dir = tmp_path / "run"
    run_train(["--data", shards, "--output-dir", run_dir, "--pretrained", "none", "--epochs", "1", "--eval-limit", "4",
               *[a for a in TINY if a not in ("--batch-size", "8")], "--per-gpu-batch", "4"], procs=2)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["batch_size"], saved["per_gpu_batch"], saved["lr"]) == (8, 4, 5e-5)
    assert read_json(run_dir / "metrics.json")["epochs"][0]["train_samples"] == 40


# ------------------------------------------------------------------------------------------------------
# With DALI (CPU-only mode)
# ------------------------------------------------------------------------------------------------------
def _loader(split, *, rank=0, world=1, batch=4, seed=1, threads=1, size=32):
    assert dali.build_indexes([split]) is None
    spec = dali.DaliSpec(split, dali.index_paths(split), rank, world, batch, size, seed, 20, threads, None,
                         (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return dali.DaliTrainLoader(spec, keys=True)


def _epoch(loader, epoch: int, batches: int, skip: int = 0) -> list:
    loader.epoch, loader.skip = epoch, skip
    return list(itertools.islice(iter(loader), batches - skip))


@needs_dali
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_samples_with_their_labels_and_equal_steps(shards, world):
    """train.py's steps: 40 // global batch (4 per rank); every rank gets exactly that many full micro-batches,
    the ranks' samples are disjoint within an epoch, every label is the sample's own, and the next epoch
    hands each rank other samples (the shard order is permuted per epoch)."""
    split = load_manifest(shards).train
    truth = _keys_and_labels(split)
    steps = split.num_samples // (4 * world)
    per_epoch = []
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            batches = _epoch(_loader(split, rank=rank, world=world), epoch, steps)
            assert [tuple(x.shape) for x, _, _ in batches] == [(4, 3, 32, 32)] * steps
            assert all(x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
                       for x, _, _ in batches)
            keys = [k.split(":", 1)[0] + ":" + k.rsplit(":", 1)[1] for _, _, ks in batches for k in ks]
            labels = [int(y) for _, ys, _ in batches for y in ys]
            assert [truth[k] for k in keys] == labels
            seen.append(keys)
        flat = [k for keys in seen for k in keys]
        assert len(flat) == len(set(flat)) == steps * 4 * world
        per_epoch.append(seen)
    assert set(per_epoch[0][0]) != set(per_epoch[1][0])


@needs_dali
def test_same_seed_same_batches_and_resume_replays_to_the_same_tail(shards):
    split = load_manifest(shards).train
    full = _epoch(_loader(split, threads=2), 1, 5)
    again = _epoch(_loader(split, threads=2), 1, 5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    other = _epoch(_loader(split, threads=2, seed=2), 1, 5)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, other))
    for skip in (1, 3):
        resumed = _epoch(_loader(split, threads=2), 1, 5, skip=skip)
        assert len(resumed) == 5 - skip
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
                   for a, b in zip(full[skip:], resumed))


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory):
    """16 photos-sized synthetic images (160-320 px): crops not dominated by rounding."""
    from data_prep import main as data_prep_main
    from data_prep.synthetic import make_synthetic
    tmp = tmp_path_factory.mktemp("big")
    src = make_synthetic(tmp / "src", train_per_class=8, test_per_class=1, min_side=160, max_side=320, seed=3)
    assert data_prep_main(["--source", str(src), "--out", str(tmp / "shards"), "--no-progress"]) == 0
    return tmp / "shards"


@pytest.mark.slow
@needs_dali
def test_crop_statistics_match_the_torchvision_path(big_shards):
    """DALI's image_random_crop with CROP_SCALE / CROP_RATIO against random_resized_crop_params on the same
    images: mean crop area fraction, mean log aspect ratio and their spread agree within sampling error
    (1600 crops each)."""
    split = load_manifest(big_shards).train
    assert dali.build_indexes([split]) is None
    spec = dali.DaliSpec(split, dali.index_paths(split), 0, 1, 16, 32, 0, 0, 1, None)
    ours, theirs, rng = [], [], random.Random(0)
    for epoch in range(100):
        crops, shapes = dali.build_pipeline(spec, epoch, crops_only=True).run()
        for i in range(len(crops)):
            (h, w, _), (height, width, _) = crops.at(i).shape, tuple(int(v) for v in shapes.at(i))
            ours.append((h * w / (height * width), math.log(w / h)))
            _, _, th, tw = random_resized_crop_params(height, width, rng)
            theirs.append((th * tw / (height * width), math.log(tw / th)))
    for k, tolerance in ((0, 0.03), (1, 0.03)):
        a, b = [x[k] for x in ours], [x[k] for x in theirs]
        assert abs(statistics.mean(a) - statistics.mean(b)) < tolerance, (k, statistics.mean(a), statistics.mean(b))
        assert abs(statistics.stdev(a) - statistics.stdev(b)) < tolerance, (k, statistics.stdev(a), statistics.stdev(b))
    assert min(x[0] for x in ours) >= 0.07 and max(abs(x[1]) for x in ours) <= math.log(4 / 3) + 0.05


@pytest.fixture(scope="module")
def colour_shards(tmp_path_factory):
    """Reddish hotdogs, bluish not-hotdogs: 48 train (6 shards), 20 test."""
    from data_prep import main as data_prep_main
    tmp = tmp_path_factory.mktemp("colour")
    src = colour_source(tmp / "src", {"train": {"hotdog": 24, "not-hotdog": 24}, "test": {"hotdog": 10, "not-hotdog": 10}})
    assert data_prep_main(["--source", str(src), "--out", str(tmp / "shards"), "--samples-per-shard", "8",
                           "--no-progress"]) == 0
    return tmp / "shards"


LEARN = ["--epochs", "3", "--lr", "1e-3", "--freeze-backbone", "--seed", "0", *TINY, "--loader", "dali"]


@pytest.mark.slow
@needs_dali
def test_two_processes_learn_with_dali_and_evaluate_every_test_image_once(colour_shards, imagenet_like, tmp_path):
    run_dir = tmp_path / "run"
    run_train(["--data", colour_shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *LEARN], procs=2)
    metrics = read_json(run_dir / "metrics.json")
    assert [e["train_samples"] for e in metrics["epochs"]] == [48] * 3
    assert [e["test_samples"] for e in metrics["epochs"]] == [20] * 3
    assert metrics["final"]["test_acc"] >= 0.9, metrics["final"]
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    digests = {read_json(run_dir / "ranks" / f"rank-{r}.json")["final_param_sha256"] for r in (0, 1)}
    assert len(digests) == 1


RESUME = ["--epochs", "2", "--max-steps-per-epoch", "4", "--save-every", "1", "--keep-last", "3", "--eval-limit", "4",
          *TINY, "--workers", "2", "--ema-decay", "0.9", "--loader", "dali"]


@pytest.mark.slow
@needs_dali
def test_resumed_mid_epoch_equals_the_uninterrupted_run(shards, imagenet_like, tmp_path):
    """Resumed from ckpt-6 (epoch 2, step 2 of 4: DALI replays 2 micro-batches), the final weights and their EMA
    are bitwise those of the uninterrupted run, as with the torchvision loader (tests/checkpoint/test_checkpoint.py)."""
    args = ["--data", shards, "--pretrained", imagenet_like, *RESUME]
    run_train([*args, "--output-dir", tmp_path / "ref"])
    shutil.copytree(tmp_path / "ref", tmp_path / "run")
    (tmp_path / "run" / "model.pt").unlink()
    proc = run_train([*args, "--output-dir", tmp_path / "run", "--resume",
                      tmp_path / "run" / "checkpoints" / "ckpt-00000006.pt"])
    assert "resumed from step 6" in proc.stdout
    for key in ("state_dict", "ema_state_dict"):
        ref, resumed = load_model_pt(tmp_path / "ref")[key], load_model_pt(tmp_path / "run")[key]
        assert all(torch.equal(ref[k], resumed[k]) for k in ref), key


# ------------------------------------------------------------------------------------------------------
# One train-loader iterator per run (issue 23 item 3: no worker re-fork, no stall, at each epoch)
# ------------------------------------------------------------------------------------------------------
def _stream_kw(**over):
    kw = dict(rank=0, world_size=1, micro_batch=4, accum=1, steps=3, image_size=32, seed=1, order="random",
              shuffle_buffer=20)
    return {**kw, **over}


@pytest.mark.slow
@pytest.mark.parametrize("order, skip", [("random", 0), ("random", 1), ("sequential", 2)])
def test_a_continuous_stream_gives_each_epoch_as_a_fresh_one_would(shards, order, skip):
    """One DataLoader iterator over a continuous TrainStream (2 workers, 3 batches per epoch: the workers swap
    parts from epoch to epoch) hands out epoch 1 from `skip` on, then epochs 2 and 3, exactly as three
    one-epoch iterations (fresh workers each) would."""
    from finetune.data.streams import TrainStream, make_loader
    split = load_manifest(shards).train
    stream = TrainStream(split, **_stream_kw(order=order))
    stream.epoch, stream.skip, stream.continuous = 1, skip, True
    got = list(itertools.islice(iter(make_loader(stream, 2, False)), 3 - skip + 3 + 3))
    expected = []
    for epoch, first in ((1, skip), (2, 0), (3, 0)):
        fresh = TrainStream(split, **_stream_kw(order=order))
        fresh.epoch, fresh.skip = epoch, first
        expected += list(itertools.islice(iter(make_loader(fresh, 2, False)), 3 - first))
    assert len(got) == len(expected) == 9 - skip
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))


def test_train_py_reuses_one_loader_iterator_across_epochs():
    """train.Data.batches: epoch 1 right after a whole epoch 0 continues the same iterator (no iter(): the
    DataLoader would fork its workers again); a resume, or an epoch cut short, starts a new one there."""
    import train

    class Loader:
        iters = 0

        def __iter__(self):
            Loader.iters += 1
            return iter(range(1000))

    stream = SimpleNamespace(epoch=None, skip=None)
    data = train.Data(stream, Loader(), None, steps=3, expected_test=0)
    assert list(data.batches(0, 0, 2)) == list(range(6)) and Loader.iters == 1
    assert list(data.batches(1, 0, 2)) == list(range(6, 12)) and Loader.iters == 1
    part = data.batches(2, 0, 2)
    next(part)                                              # epoch 2 cut short (a preemption, say)
    assert list(data.batches(2, 1, 2)) == list(range(4)) and Loader.iters == 2
    assert (stream.epoch, stream.skip) == (2, 2)


class _SharedInWorker(torch.utils.data.IterableDataset):
    """Yields whether collate's / opencv_batch's batches are in shared memory where they are made."""

    def __init__(self, shards):
        self.shards = shards

    def __iter__(self):
        from finetune.data.transforms import collate, opencv_batch
        samples = list(itertools.islice(_tar_samples(load_manifest(self.shards).train.urls), 2))
        tv = collate([(torch.zeros(3, 8, 8, dtype=torch.uint8), int(s["cls"])) for s in samples])[0]
        cv = opencv_batch([(s["jpg"], random.Random(0), int(s["cls"])) for s in samples], 8)[0]
        yield torch.tensor([tv.is_shared(), cv.is_shared()])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_batches_are_made_in_shared_memory_inside_loader_workers(shards, workers):
    """In a loader worker a batch is collated straight into shared memory (no copy when it is sent to the
    training process, as torch's default_collate does); in the training process itself, plain memory."""
    from finetune.data.streams import make_loader
    (flags,) = list(make_loader(_SharedInWorker(shards), workers, False))
    assert flags.tolist() == [bool(workers)] * 2
