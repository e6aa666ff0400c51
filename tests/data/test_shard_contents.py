"""Shard contents are checked, not only their sha256 (issue 20, item 10): a label >= the number of classes
(was an IndexError mid-epoch), a PNG stored as .jpg, a sample without its image (KeyError), a manifest count
off by one (a whole epoch trained, then RuntimeError, no checkpoint). Each is one line naming the shard and
the sample, found at start-up, before any training step. The shards are crafted here with tarfile, and the
manifest's sizes and sha256 updated to match, as a hostile or foreign data set would be."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile

import pytest
import torch
from PIL import Image

from conftest import TINY, run_train
from finetune.data.manifest import BadShard, load_manifest
from finetune.data.streams import TrainStream, make_loader

SHARD = "train-000001.tar"


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def rewrite(folder, shard: str, edit) -> str:
    """Rewrite one shard, member by member: edit(index_of_sample, suffix, data) -> data, or None to drop
    the member. Returns the key of the edited sample (the second one). Updates size and sha256."""
    path = folder / shard
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isreg()]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for member, data in members:
            key, suffix = member.name.split(".", 1)
            data = edit(suffix, data) if key == keys[1] else data
            if data is not None:
                member.size = len(data)
                out.addfile(member, io.BytesIO(data))
    path.chmod(0o644)
    path.write_bytes(buf.getvalue())
    manifest = json.loads((folder / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if entry["name"] == shard:
                entry.update(size=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return keys[1]


def crafted(shards, tmp_path, case: str):
    folder = tmp_path / "crafted"
    shutil.copytree(shards, folder)
    if case == "count":      # the test split's first shard: one sample more in the manifest than in the tar
        manifest = json.loads((folder / "manifest.json").read_text())
        test = manifest["splits"]["test"]
        test["shards"][0]["num_samples"] += 1
        test["num_samples"] += 1
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder, "test-000000.tar", None
    edit = {"label": lambda suffix, data: b"5" if suffix == "cls" else data,
            "png": lambda suffix, data: png_bytes() if suffix == "jpg" else data,
            "no-image": lambda suffix, data: None if suffix == "jpg" else data}[case]
    return folder, SHARD, rewrite(folder, SHARD, edit)


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("label", "has label b'5', but the manifest has 2 classes (0..1)"),
    ("png", "has an image that is a PNG, not a JPEG"),
    ("no-image", "has ['cls'], not both 'jpg' and 'cls'"),
    ("count", "holds 8 samples, its manifest says 9"),
])
def test_a_crafted_shard_is_one_line_before_training(shards, tmp_path, case, expected):
    folder, shard, key = crafted(shards, tmp_path, case)
    run_dir = tmp_path / "run"
    proc = run_train(["--data", folder, "--output-dir", run_dir, "--pretrained", "none", "--epochs", "1", *TINY],
                     check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: shard {folder / shard}"), lines
    assert expected in lines[0] and (key is None or f"sample {key!r}" in lines[0])
    assert "re-run data_prep" in lines[0]
    assert not (run_dir / "checkpoints").exists() and "train_loss" not in proc.stdout


@pytest.mark.slow
def test_a_bad_sample_met_while_streaming_is_one_line_from_a_worker(shards, tmp_path):
    """A shard that changes after the start-up check: the loader worker's BadShard reaches the main process
    as the same one line (the DataLoader re-raises it with the worker's whole traceback)."""
    folder, shard, key = crafted(shards, tmp_path, "label")
    split = load_manifest(folder).train
    stream = TrainStream(split, rank=0, world_size=1, micro_batch=4, accum=1, steps=10, image_size=32, seed=0,
                         order="sequential", shuffle_buffer=0)
    with pytest.raises(BadShard) as exc:
        for _ in make_loader(stream, workers=1, pin_memory=False):
            pass
    assert str(exc.value) == (f"shard {folder / shard}: sample {key!r} has no image or a bad label (b'5'; "
                              f"2 classes); re-run data_prep")
    assert torch.utils.data.get_worker_info() is None


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_tar_index_matches_tarfile_whatever_the_header_kinds(tmp_path, fmt):
    """shard_contents parses plain ustar headers itself (cheaper) and leaves any other kind to tarfile: a
    long key (> 100 bytes: a GNU or pax extension header) or a non-ASCII one must come out the same."""
    from finetune.data.manifest import _tar_index
    names = ["a/short.jpg", "a/short.cls", "x" * 60 + "/" + "y" * 70 + ".jpg", "d/é.cls"]
    if fmt == tarfile.USTAR_FORMAT:
        names = names[:2] + ["p" * 90 + "/" + "q" * 60 + ".jpg"]     # ustar's own prefix field
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 * i + 3
            tar.addfile(info, io.BytesIO(b"z" * info.size))
    with tarfile.open(path) as tar:
        expected = [(m.name, (m.offset_data, m.size)) for m in tar if m.isreg()]
    with open(path, "rb") as f:
        assert _tar_index(f) == expected and [n for n, _ in expected] == names
