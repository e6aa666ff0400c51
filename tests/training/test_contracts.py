"""Contracts found missing by breaking features on purpose (issue 11, "Tests that are missing or too weak"):
each test here fails on a plausible broken implementation of the behaviour it names."""

from __future__ import annotations

import math
import random
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO, TINY, load_model_pt, read_json, run_train
from helpers import tb_events


# ------------------------------------------------------------------------------------------------------
# 1. A crafted pickle never runs: --pretrained PATH and --resume PATH refuse it in one line, exit 2.
# ------------------------------------------------------------------------------------------------------
class _Evil:
    """Unpickling calls open(marker, "w"): the marker file appears iff the pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--pretrained", "--resume"])
def test_crafted_pickle_is_refused_and_never_runs(flag, shards, imagenet_like, tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Evil(marker), "step": 1, "state_dict": _Evil(marker)}, evil)
    assert not marker.exists()
    args = ["--data", shards, "--output-dir", tmp_path / "run", *TINY, "--epochs", "1",
            "--max-steps-per-epoch", "2", "--eval-limit", "4"]
    args += [flag, evil] if flag == "--pretrained" else ["--pretrained", imagenet_like, "--resume", evil]
    proc = run_train(args, check=False, timeout=200)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert flag in errors[0] and str(evil) in errors[0], errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "the crafted pickle was executed"


@pytest.mark.slow
def test_crafted_pickle_as_predict_model_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "model.pt"
    torch.save({"state_dict": _Evil(marker), "classes": ["a", "b"], "preprocess": {}}, evil)
    photo = tmp_path / "x.jpg"
    photo.write_bytes(b"not really a photo")
    proc = subprocess.run([PYTHON, "predict.py", "--model", str(evil), "--device", "cpu", str(photo)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("predict.py: error:")]
    assert len(errors) == 1 and "--model" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "the crafted pickle was executed"


# ------------------------------------------------------------------------------------------------------
# 2. lr_factor: warm-up, cosine and step values (worked out by hand); TensorBoard's lr/backbone follows it.
# ------------------------------------------------------------------------------------------------------
def _cfg(*extra):
    from finetune.config import parse_config
    return parse_config(["--data", "x", "--pretrained", "none", *map(str, extra)])


def test_lr_factor_values_by_hand():
    from finetune.recipe import lr_factor
    # Linear warm-up over 4 steps, then constant.
    cfg = _cfg("--warmup-steps", 4)
    assert [lr_factor(cfg, s, 5) for s in (0, 1, 2, 3, 4, 50)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    # Cosine over epochs x steps = 2 x 5 = 10 steps: 1 -> 0.5 half-way -> 0 at the end (and stays 0).
    cfg = _cfg("--schedule", "cosine", "--epochs", 2)
    got = [lr_factor(cfg, s, 5) for s in (0, 3, 5, 10, 12)]
    assert got == pytest.approx([1.0, 0.7938926, 0.5, 0.0, 0.0], abs=1e-6)    # 0.5(1+cos(0.3 pi)) = 0.79389
    # Cosine after a 2-step warm-up: the cosine spans the remaining 8 steps.
    cfg = _cfg("--schedule", "cosine", "--epochs", 2, "--warmup-steps", 2)
    got = [lr_factor(cfg, s, 5) for s in (0, 1, 2, 4, 6, 10)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.8535534, 0.5, 0.0], abs=1e-6)  # 0.5(1+cos(pi/4)) = 0.85355
    # Step decay: x0.1 every 2 epochs of 5 steps.
    cfg = _cfg("--schedule", "step", "--epochs", 6, "--step-epochs", 2, "--gamma", 0.1)
    got = [lr_factor(cfg, s, 5) for s in (0, 9, 10, 19, 20, 29)]
    assert got == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rel=1e-9)
    # Step decay with a warm-up: the warm-up comes first.
    cfg = _cfg("--schedule", "step", "--step-epochs", 1, "--gamma", 0.5, "--warmup-steps", 2)
    assert [lr_factor(cfg, s, 4) for s in (0, 1, 2, 4, 8)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.25])


@pytest.mark.slow
def test_tensorboard_lr_follows_the_cosine_schedule(shards, imagenet_like, tmp_path):
    run_dir = tmp_path / "run"
    run_train(["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *TINY,
               "--epochs", "2", "--max-steps-per-epoch", "2", "--eval-limit", "4", "--schedule", "cosine",
               "--warmup-steps", "1", "--log-every", "1"], timeout=300)
    events = tb_events(run_dir / "tb")
    series = [(e.step, e.value) for e in events.Scalars("lr/backbone")]
    # Logged at each epoch's end (global steps 2 and 4) with the lr of the step just taken (0-based 1 and 3).
    # 2 epochs x 2 steps, 1 warm-up step: the cosine spans 3 steps; step 1 -> 1.0, step 3 -> 0.5(1+cos(2pi/3))
    assert [s for s, _ in series] == [2, 4], series
    assert [v for _, v in series] == pytest.approx([5e-5 * 1.0, 5e-5 * 0.25], rel=1e-5), series
    from finetune.recipe import lr_factor
    cfg = _cfg("--schedule", "cosine", "--warmup-steps", 1, "--epochs", 2)
    assert [v for _, v in series] == pytest.approx([5e-5 * lr_factor(cfg, s - 1, 2) for s, _ in series], rel=1e-5)


# ------------------------------------------------------------------------------------------------------
# 3. --clip-grad C bounds what one optimizer step applies.
# ------------------------------------------------------------------------------------------------------
def _one_step(clip: float):
    """One finetune.loop.optimizer_step on a tiny linear model with large inputs (a large gradient); SGD with
    lr 1 and no momentum / weight decay, so the update is exactly minus the gradient the optimizer saw.
    Returns (norm of the gradient at optimizer.step, norm of the weight update, the update)."""
    from accelerate import Accelerator
    from finetune.context import StepContext
    from finetune.loop import optimizer_step
    from finetune.monitor import StepTimer
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0, weight_decay=0.0)
    seen = []
    real_step = opt.step

    def step(*a, **kw):
        seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
        return real_step(*a, **kw)

    opt.step = step
    before = torch.cat([p.detach().clone().flatten() for p in model.parameters()])
    images = torch.full((8, 4), 50.0) * torch.arange(1, 9).view(8, 1)
    labels = torch.tensor([0, 1] * 4)
    cfg = _cfg("--clip-grad", clip) if clip else _cfg()
    timer = StepTimer(0, torch.device("cpu"))
    timer.start()
    ctx = StepContext(model, opt, Accelerator(cpu=True), cfg, normalize=lambda x, y: (x, y), monitor=None)
    optimizer_step(ctx, iter([(images, labels)]), torch.zeros(3, dtype=torch.float64), timer, scale=1.0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    update = after - before
    assert len(seen) == 1
    return seen[0], update.norm().item(), update


def test_clip_grad_bounds_the_update_norm():
    raw_grad, raw_update, raw = _one_step(0)
    assert raw_grad > 100 and raw_update == pytest.approx(raw_grad, rel=1e-4)   # unclipped: a big step
    clip = 0.5
    grad, update_norm, clipped = _one_step(clip)
    assert grad <= clip * (1 + 1e-5), grad
    assert update_norm <= clip * (1 + 1e-5), update_norm
    assert update_norm == pytest.approx(clip, rel=1e-3)        # scaled to the bound, not zeroed
    # ... in the same direction as the unclipped gradient
    assert torch.allclose(clipped, raw * (update_norm / raw_update), rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# 4. order="random": each rank draws its own samples (the rank is in the shard seed), reproducibly.
# ------------------------------------------------------------------------------------------------------
def _random_stream(shards, rank: int, seed: int = 0):
    from finetune.data.manifest import load_manifest
    from finetune.data.streams import TrainStream
    split = load_manifest(shards).train
    return TrainStream(split, rank=rank, world_size=2, micro_batch=4, accum=1, steps=6, image_size=32, seed=seed,
                       order="random", shuffle_buffer=8)


def _sample_keys(stream, n: int) -> list[str]:
    import itertools
    return [f"{s['__url__']}:{s['__key__']}" for _, s in itertools.islice(stream._random(0, 1), n)]


def _batches(stream, n: int):
    import itertools
    return list(itertools.islice(iter(stream), n))


def test_random_order_differs_between_ranks_and_repeats_per_rank(shards):
    # Which samples (shard + key) each rank reads: not the same draw on both ranks ...
    keys0, keys1 = _sample_keys(_random_stream(shards, 0), 24), _sample_keys(_random_stream(shards, 1), 24)
    assert keys0 != keys1
    # ... and the same draw when the same rank runs again (seeded, not clock- or process-dependent).
    assert keys0 == _sample_keys(_random_stream(shards, 0), 24)
    assert keys1 == _sample_keys(_random_stream(shards, 1), 24)
    # The batches themselves (what the loader yields).
    b0, b0_again, b1 = (_batches(_random_stream(shards, r), 6) for r in (0, 0, 1))
    labels = [torch.cat([y for _, y in b]) for b in (b0, b0_again, b1)]
    images = [torch.cat([x for x, _ in b]) for b in (b0, b0_again, b1)]
    assert torch.equal(labels[0], labels[1]) and torch.equal(images[0], images[1])
    assert not torch.equal(labels[0], labels[2])
    assert not torch.equal(images[0], images[2])
    # The seed matters too.
    assert _sample_keys(_random_stream(shards, 0, seed=1), 24) != keys0


# ------------------------------------------------------------------------------------------------------
# 5. examples/sec is the job's, not one rank's: on 2 processes it times the epoch's global samples.
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_examples_per_sec_is_global_on_two_processes(shards, imagenet_like, tmp_path):
    run_dir = tmp_path / "run"
    run_train(["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *TINY, "--epochs", "1",
               "--max-steps-per-epoch", "2", "--eval-limit", "4", "--timing-warmup", "0"], procs=2, timeout=300)
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["world_size"] == 2
    (epoch,) = metrics["epochs"]
    # 2 optimizer steps x global batch 8 (4 per rank), all timed (--timing-warmup 0).
    assert epoch["train_samples"] == 2 * 8
    eps, ceps, frac = epoch["examples_per_sec"], epoch["compute_examples_per_sec"], epoch["data_wait_frac"]
    assert eps > 0 and ceps >= eps and 0 <= frac < 1
    # The three rates come from the same timed seconds: eps / ceps = compute / (data + compute) = 1 - frac.
    assert eps / ceps == pytest.approx(1 - frac, rel=1e-6, abs=1e-9)
    # Every step was timed, so examples/sec x the epoch's time ~ the epoch's (global) training samples; a
    # per-rank figure (or per-rank seconds summed over ranks) would give half of them.
    ratio = eps * epoch["epoch_time"] / epoch["train_samples"]
    assert 0.8 < ratio < 1.6, (ratio, epoch)


# ------------------------------------------------------------------------------------------------------
# 6. predict.py's own command line normalises with model.pt's preprocessing: a softmax by hand agrees.
# ------------------------------------------------------------------------------------------------------
def _by_hand(model_pt, photo):
    """softmax(model(normalise(eval_transform(decode(photo))))) with model.pt's own spec, written out."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from finetune.data.transforms import eval_transform
    from finetune.model import load_trained
    model, saved = load_trained(str(model_pt))
    spec = saved["preprocess"]
    img = eval_transform(decode_jpeg(read_file(str(photo)), mode=ImageReadMode.RGB), spec)
    x = img.float() / 255
    x = (x - torch.tensor(spec["mean"]).view(3, 1, 1)) / torch.tensor(spec["std"]).view(3, 1, 1)
    with torch.no_grad():
        probs = torch.softmax(model(x[None]).float(), dim=1)[0]
    return dict(zip(saved["classes"], probs.tolist()))


def _predict_cli(model_pt, photo) -> dict:
    import json
    proc = subprocess.run([PYTHON, "predict.py", "--model", str(model_pt), "--device", "cpu", "--json",
                           "--top-k", "2", str(photo)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = proc.stdout.strip().splitlines()
    out = json.loads(line)
    return {t["label"]: t["probability"] for t in out["top"]}


@pytest.mark.slow
def test_predict_cli_probability_equals_softmax_by_hand(shards, imagenet_like, tmp_path):
    run_dir = tmp_path / "run"
    run_train(["--data", shards, "--output-dir", run_dir, "--pretrained", imagenet_like, *TINY, "--epochs", "1",
               "--max-steps-per-epoch", "2", "--eval-limit", "4"], timeout=300)
    photo = sorted((shards.parent / "shards-src" / "test" / "hotdog").glob("*.jpg"))[0]
    model_pt = run_dir / "model.pt"
    got, want = _predict_cli(model_pt, photo), _by_hand(model_pt, photo)
    assert set(got) == set(want)
    for label in want:
        assert got[label] == pytest.approx(want[label], abs=1e-4), (label, got, want)
    # A model.pt whose recorded preprocessing differs from ImageNet's defaults: predict.py must use the
    # recorded one (sizes and mean/std), not defaults of its own.
    saved = load_model_pt(run_dir)
    saved["preprocess"] = {**saved["preprocess"], "resize": [48, 40], "crop": 24,
                           "mean": [0.2, 0.6, 0.3], "std": [0.1, 0.4, 0.2]}
    odd = tmp_path / "odd-model.pt"
    torch.save(saved, odd)
    got_odd, want_odd = _predict_cli(odd, photo), _by_hand(odd, photo)
    for label in want_odd:
        assert got_odd[label] == pytest.approx(want_odd[label], abs=1e-4), (label, got_odd, want_odd)
    assert max(abs(want_odd[k] - want[k]) for k in want) > 1e-3     # the spec really changes the answer
