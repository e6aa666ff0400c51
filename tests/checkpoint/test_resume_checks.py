"""Resume safety (issue 11, items 8, 14, 19), in-process with a stand-in accelerator: the checkpoint's config
and data identity are compared with this run's, damaged checkpoints fall back or are refused in one line,
fewer ranks than saved RNG states resume, and rank 0's decision is what every rank loads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from finetune import UsageError, checkpoint
from finetune.checkpoint import Checkpointer, TrainState
from finetune.context import StepContext

CONFIG = dict(arch="resnet18", batch_size=8, lr=5e-5, epochs=2, data="shards")
IDENTITY = dict(classes=["hotdog", "not-hotdog"], data_sha256="a" * 64)


def fake_accelerator(rank=0, world=1):
    return SimpleNamespace(num_processes=world, process_index=rank, is_main_process=rank == 0,
                           device=torch.device("cpu"), scaler=None, wait_for_everyone=lambda: None,
                           unwrap_model=lambda m, keep_torch_compile=False: m)


def checkpointer(directory, config=CONFIG, identity=IDENTITY, out=2, **acc):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, out)
    cfg = SimpleNamespace(keep_last=5, to_dict=lambda: dict(config))      # what the Checkpointer reads of a Config
    ctx = StepContext(model, torch.optim.SGD(model.parameters(), lr=0.1), fake_accelerator(**acc), cfg,
                      normalize=None, monitor=None)
    return Checkpointer(ctx, directory, identity=dict(identity))


def write(directory, step=4, step_in_epoch=0, **kw):
    state = TrainState.fresh(torch.device("cpu"))
    state.global_step, state.step_in_epoch = step, step_in_epoch
    checkpointer(directory, **kw).save(state)


@pytest.mark.parametrize("change, needle", [
    (dict(identity={**IDENTITY, "classes": ["a", "b"]}), "trained on classes"),
    (dict(identity={**IDENTITY, "data_sha256": "b" * 64}), "another data set"),
    (dict(config={**CONFIG, "arch": "resnet34"}), "--arch resnet18, this run --arch resnet34"),
    (dict(config={**CONFIG, "batch_size": 16}, mid_epoch=True), "mid-epoch with another --batch-size"),
])
def test_resume_refuses_what_cannot_continue(tmp_path, change, needle):
    write(tmp_path, step_in_epoch=2 if change.pop("mid_epoch", False) else 0)
    with pytest.raises(UsageError, match=needle.replace("-", r"\-")) as e:
        checkpointer(tmp_path, **change).restore("auto", log=lambda _: None)
    assert "\n" not in str(e.value)


def test_resume_another_number_of_classes_without_identity_is_one_line(tmp_path):
    write(tmp_path, identity={})                  # an older checkpoint: no identity recorded
    with pytest.raises(UsageError, match="does not fit this model"):
        checkpointer(tmp_path, identity={}, out=5).restore("auto", log=lambda _: None)


def test_recipe_changes_warn_one_line_each(tmp_path):
    write(tmp_path)
    lines = []
    state = checkpointer(tmp_path, config={**CONFIG, "lr": 1e-3, "batch_size": 16, "epochs": 4}).restore(
        "auto", log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert state.global_step == 4 and len(warnings) == 3
    assert all(f"--{k}" in w for k, w in zip(("lr", "batch-size", "epochs"), warnings))


def test_checkpoint_missing_a_key_is_damaged(tmp_path):
    write(tmp_path, step=4)
    write(tmp_path, step=8)
    newest = tmp_path / "ckpt-00000008.pt"
    saved = torch.load(newest, weights_only=True)
    del saved["optimizer"]
    torch.save(saved, newest)
    lines = []
    assert checkpointer(tmp_path).restore("auto", log=lines.append).global_step == 4
    assert any(f"skipping damaged checkpoint {newest}" in line and "optimizer" in line for line in lines)
    with pytest.raises(UsageError, match=r"cannot load it \(KeyError: damaged: missing optimizer\)"):
        checkpointer(tmp_path / "other").restore(str(newest), log=lambda _: None)


def test_fewer_ranks_than_saved_rng_states(tmp_path):
    write(tmp_path, step=4, step_in_epoch=1)
    path = tmp_path / "ckpt-00000004.pt"
    saved = torch.load(path, weights_only=True)
    saved.update(rng=saved["rng"] * 3, train_sums=saved["train_sums"] * 3, world_size=3)
    torch.save(saved, path)
    lines = []
    state = checkpointer(tmp_path).restore("auto", log=lines.append)   # 1 process now, 3 then
    assert state.global_step == 4 and any("written by 3 processes" in line for line in lines)


def test_rank_0_decides_and_a_rank_that_cannot_read_it_stops_the_job(tmp_path, monkeypatch):
    """Item 19: a non-zero rank loads the path rank 0 chose (not its own --resume auto search); if it cannot
    read it, one line naming the rank and the file."""
    write(tmp_path, step=4)
    chosen = str(tmp_path / "ckpt-00000004.pt")
    monkeypatch.setattr(checkpoint.distributed, "gather", lambda obj, world: [(None, chosen), obj])
    monkeypatch.setattr(checkpoint.distributed, "agree", lambda acc, problem: (_ for _ in ()).throw(
        UsageError(problem)) if problem else None)
    empty = tmp_path / "elsewhere"                  # rank 1's own directory holds nothing: it still resumes
    state = checkpointer(empty, rank=1, world=2).restore("auto", log=lambda _: None)
    assert state.global_step == 4
    (tmp_path / "ckpt-00000004.pt").unlink()        # not visible to rank 1
    with pytest.raises(UsageError, match="rank 1 cannot read .*ckpt-00000004.pt.*every rank sees"):
        checkpointer(empty, rank=1, world=2).restore("auto", log=lambda _: None)


def test_disk_full_during_a_checkpoint_write(tmp_path, monkeypatch):
    """Item 17: torch.save fails with ENOSPC halfway: the partial .tmp file is removed, ckpt-4 is intact, and
    every rank (here rank 0, then rank 1 told by rank 0) stops with the same one line."""
    import errno
    write(tmp_path, step=4)
    before = (tmp_path / "ckpt-00000004.pt").read_bytes()

    def full_disk(obj, fh, *a, **k):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    state = TrainState.fresh(torch.device("cpu"))
    state.global_step = 5
    with pytest.raises(UsageError) as e:
        checkpointer(tmp_path).save(state)
    line = str(e.value)
    assert "\n" not in line and "No space left on device" in line and "step 5" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004.pt"]      # no .tmp, nothing pruned
    assert (tmp_path / "ckpt-00000004.pt").read_bytes() == before

    def gather(obj, world):                          # rank 1 of 2: the vote carries rank 0's problem
        return [line, obj] if obj is None else [obj, obj]
    monkeypatch.setattr(checkpoint.distributed, "gather", gather)
    with pytest.raises(UsageError, match="No space left on device"):
        checkpointer(tmp_path / "r1", rank=1, world=2).save(state)                # rank 1 writes nothing
