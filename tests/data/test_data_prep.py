"""Tests for the data_prep package: synthetic set, prepare, verify, and the CLI's error contract.

Everything runs offline on tiny images; the d2l download is exercised against a closed local
port and file:// URLs only. The real-photo test uses ../shared/data/hotdog-mini when present.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import data_prep
from data_prep import main, prepare, sources, verify
from data_prep.shards import default_samples_per_shard
from data_prep.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[2]
HOTDOG_MINI = REPO.parent / "shared" / "data" / "hotdog-mini"
CLASSES = ["hotdog", "not-hotdog"]


# --------------------------------------------------------------------------- helpers


def run(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """The CLI contract for user errors: status 2 and exactly one `data_prep: error:` line."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("data_prep: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary output left behind"


def jpeg_bytes(size=(20, 14), colour=(200, 30, 30), mode="RGB", fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode != "L" else 128).save(buf, format=fmt)
    return buf.getvalue()


def read_split(out: Path, split: str) -> list[dict]:
    """Read a split back through WebDataset, starting from the manifest's brace pattern."""
    manifest = json.loads((out / "manifest.json").read_text())
    urls = str(out / manifest["splits"][split]["pattern"])
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


@pytest.fixture
def src(tmp_path) -> Path:
    """A tiny synthetic d2l-layout set: 2 x 8 train and 2 x 3 test images."""
    return make_synthetic(tmp_path / "src", train_per_class=8, test_per_class=3, min_side=24, max_side=40)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_layout_sizes_and_determinism(tmp_path):
    a = make_synthetic(tmp_path / "a", train_per_class=24, test_per_class=8, min_side=48, max_side=96)
    b = make_synthetic(tmp_path / "b", train_per_class=24, test_per_class=8, min_side=48, max_side=96)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.jpg"))
    assert len(files) == 64
    for split, n in (("train", 24), ("test", 8)):
        for name in CLASSES:
            assert len(list((a / split / name).glob("*.jpg"))) == n
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    sizes = {Image.open(a / f).size for f in files}
    assert all(48 <= side <= 96 for size in sizes for side in size)
    assert len({round(w / h, 1) for w, h in sizes}) > 5, "aspect ratios should vary"


def test_synthetic_is_idempotent_and_refuses_foreign_folder(tmp_path, capsys):
    out = make_synthetic(tmp_path / "s", train_per_class=2, test_per_class=1, min_side=20, max_side=30)
    before = (out / "train/hotdog/0000.jpg").stat().st_mtime_ns
    make_synthetic(out, train_per_class=2, test_per_class=1, min_side=20, max_side=30)
    assert (out / "train/hotdog/0000.jpg").stat().st_mtime_ns == before
    code, _, err = run(capsys, "synthetic", "--out", out, "--train-per-class", 3)
    assert_user_error(code, err, "--force")
    code, stdout, _ = run(capsys, "synthetic", "--out", out, "--train-per-class", 3, "--test-per-class", 1,
                          "--min-side", 20, "--max-side", 30, "--force")
    assert code == 0 and "6 train" in stdout
    assert len(list((out / "train/hotdog").glob("*.jpg"))) == 3


def test_synthetic_is_learnable_by_a_small_cnn(tmp_path):
    torch = pytest.importorskip("torch")
    root = make_synthetic(tmp_path / "s", train_per_class=24, test_per_class=8, min_side=48, max_side=96)

    def load(split):
        xs, ys = [], []
        for label, name in enumerate(CLASSES):
            for p in sorted((root / split / name).glob("*.jpg")):
                xs.append(np.asarray(Image.open(p).convert("RGB").resize((32, 32)), dtype=np.float32) / 255)
                ys.append(label)
        return torch.tensor(np.stack(xs)).permute(0, 3, 1, 2), torch.tensor(ys)

    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = load("train"), load("test")
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.9


# --------------------------------------------------------------------------- prepare: the happy path


@pytest.mark.floor
def test_folder_to_shards_round_trip(src, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "--source", src, "--out", out, "--samples-per-shard", 4, "--workers", 1)
    assert code == 0
    assert "16 train + 6 test samples" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "hotdog-wds/1" and manifest["classes"] == CLASSES
    for split, per_class in (("train", 8), ("test", 3)):
        entry = manifest["splits"][split]
        samples = read_split(out, split)
        expected = {f"{name}/{i:04d}" for name in CLASSES for i in range(per_class)}
        keys = [s["__key__"] for s in samples]
        assert sorted(keys) == sorted(expected), "every image exactly once"
        for s in samples:
            assert CLASSES[int(s["cls"])] == s["__key__"].split("/")[0], "label matches class folder"
            original = (src / split / (s["__key__"] + ".jpg")).read_bytes()
            assert s["jpg"] == original, "JPEGs are stored byte for byte"
        assert entry["num_samples"] == len(samples) == 2 * per_class
        assert entry["class_counts"] == [per_class, per_class]
        assert sum(sh["num_samples"] for sh in entry["shards"]) == entry["num_samples"]
        assert [sh["name"] for sh in entry["shards"]] == sorted(p.name for p in out.glob(f"{split}-*.tar"))
        for sh in entry["shards"]:
            assert sh["size"] == (out / sh["name"]).stat().st_size
            if sh["num_samples"] >= 2:
                assert all(c > 0 for c in sh["class_counts"]), f"{sh['name']} should mix both classes"
    assert manifest["options"]["samples_per_shard"] == 4 and manifest["skipped"] == []
    assert verify(out) == []
    code, stdout, _ = run(capsys, "verify", out)
    assert code == 0 and "OK" in stdout


def test_default_samples_per_shard_rule():
    assert default_samples_per_shard(2000) == 125
    assert default_samples_per_shard(341) == 21
    assert default_samples_per_shard(10) == 1
    assert default_samples_per_shard(10**7) == 1000  # capped for very large sets
    for n in (16, 100, 341, 2000, 15999):
        assert -(-n // default_samples_per_shard(n)) >= 16


@pytest.mark.slow
def test_two_runs_are_byte_identical_whatever_the_workers(src, tmp_path):
    a = prepare(src, tmp_path / "a", workers=1, log=lambda _: None)
    b = prepare(src, tmp_path / "b", workers=2, log=lambda _: None)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    assert a == b
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()


def test_rerun_is_a_no_op_unless_forced_or_changed(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "--source", src, "--out", out, "--workers", 1)[0] == 0
    stamp = (out / "manifest.json").stat().st_mtime_ns
    code, stdout, _ = run(capsys, "--source", src, "--out", out, "--workers", 1)
    assert code == 0 and "up to date" in stdout
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    code, stdout, _ = run(capsys, "--source", src, "--out", out, "--workers", 1, "--force")
    assert code == 0 and "wrote" in stdout
    # A changed option or a new input file both rebuild.
    code, stdout, _ = run(capsys, "--source", src, "--out", out, "--workers", 1, "--seed", 1)
    assert "wrote" in stdout
    shutil.copy(src / "train/hotdog/0000.jpg", src / "train/hotdog/extra.jpg")
    code, stdout, _ = run(capsys, "--source", src, "--out", out, "--workers", 1, "--seed", 1)
    assert "17 train" in stdout
    assert verify(out) == []


def test_class_folders_with_test_fraction(tmp_path, capsys):
    flat = tmp_path / "flat"
    for name, colour in zip(CLASSES, ((200, 40, 40), (40, 40, 200))):
        (flat / name).mkdir(parents=True)
        for i in range(10):
            (flat / name / f"{i}.jpg").write_bytes(jpeg_bytes(size=(10 + i, 12), colour=colour))
    out = tmp_path / "out"
    code, _, err = run(capsys, "--source", flat, "--out", out)
    assert_user_error(code, err, "--test-fraction")
    code, stdout, _ = run(capsys, "--source", flat, "--out", out, "--test-fraction", 0.3, "--workers", 1)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["class_counts"] == [7, 7]
    assert manifest["splits"]["test"]["class_counts"] == [3, 3]
    train_keys = {s["__key__"] for s in read_split(out, "train")}
    test_keys = {s["__key__"] for s in read_split(out, "test")}
    assert not train_keys & test_keys and len(train_keys | test_keys) == 20
    # Deterministic: the same seed picks the same test images.
    again = prepare(flat, tmp_path / "again", test_fraction=0.3, workers=1, log=lambda _: None)
    assert again["splits"] == manifest["splits"]


def test_val_fraction_carves_a_stratified_reproducible_val_split(tmp_path, capsys):
    src = make_synthetic(tmp_path / "src", train_per_class=10, test_per_class=2, min_side=24, max_side=32)
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "--source", src, "--out", out, "--val-fraction", 0.3, "--workers", 1,
                          "--no-progress")
    assert code == 0 and "14 train + 6 val + 4 test samples" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["class_counts"] == [7, 7]
    assert manifest["splits"]["val"]["class_counts"] == [3, 3]          # stratified: 30% of each class
    assert manifest["splits"]["test"]["class_counts"] == [2, 2]          # test untouched
    train_keys = {s["__key__"] for s in read_split(out, "train")}
    val_keys = {s["__key__"] for s in read_split(out, "val")}
    assert not train_keys & val_keys and len(train_keys | val_keys) == 20
    code, stdout, _ = run(capsys, "verify", out)
    assert code == 0 and "6 val samples" in stdout
    from data_prep.manifest import read_manifest, split_names
    assert split_names(read_manifest(out)) == ("train", "test", "val")
    # Reproducible, and a different seed picks other images.
    again = prepare(src, tmp_path / "again", val_fraction=0.3, workers=1, log=lambda _: None)
    assert again["splits"] == manifest["splits"]
    other = prepare(src, tmp_path / "other", val_fraction=0.3, seed=5, workers=1, log=lambda _: None)
    assert {s["__key__"] for s in read_split(tmp_path / "other", "val")} != val_keys
    # Adding photos to a class keeps every existing val image in val (content hash, not a reshuffle).
    for i in range(4):
        img = Image.new("RGB", (30, 30), (i * 60, 90, 20))
        img.save(src / "train" / "hotdog" / f"new{i}.jpg")
    grown = prepare(src, tmp_path / "grown", val_fraction=0.3, workers=1, log=lambda _: None)
    grown_val = {s["__key__"] for s in read_split(tmp_path / "grown", "val")}
    assert grown["splits"]["val"]["class_counts"] == [4, 3]
    moved = (val_keys - grown_val) | {k for k in grown_val - val_keys if "new" not in k}
    assert len(moved) <= 1, f"adding 4 photos reshuffled the val split: {moved}"


def test_val_carve_moves_byte_identical_copies_together(tmp_path, capsys):
    """--val-fraction on a train split where every hotdog image has a byte-identical twin under another name:
    a pair is never split between train and val (that would leak val into training). 12 hotdog records at
    0.25 ask for 3 val records; the carve takes whole pairs, so 4 (2 pairs) go to val, never an odd number."""
    src = tmp_path / "src"
    for k, (split, label, n) in enumerate((("train", "not-hotdog", 6), ("test", "hotdog", 2), ("test", "not-hotdog", 2))):
        (src / split / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):                                            # every one of these images distinct
            (src / split / label / f"{i}.jpg").write_bytes(jpeg_bytes(size=(20 + i, 14), colour=(30, 30 * i, 60 * k)))
    twins = src / "train" / "hotdog"
    twins.mkdir(parents=True)
    for g in range(6):
        data = jpeg_bytes(size=(24, 16 + g), colour=(200, 20 * g, 30))
        (twins / f"pair{g}-a.jpg").write_bytes(data)
        (twins / f"copy-of-pair{g}.jpg").write_bytes(data)       # same bytes; sorts apart from its twin
    for seed in (0, 1, 2):
        out = tmp_path / f"out-{seed}"
        code, stdout, _ = run(capsys, "--source", src, "--out", out, "--val-fraction", 0.25, "--seed", seed,
                              "--workers", 1, "--no-progress")
        assert code == 0 and "6 duplicate group(s)" in stdout
        keys = {split: {s["__key__"] for s in read_split(out, split)} for split in ("train", "val")}
        where = {}
        for split, names in keys.items():
            for key in names:
                if key.startswith("hotdog/"):
                    group = key.removeprefix("hotdog/").removeprefix("copy-of-").removesuffix("-a")
                    where.setdefault(group, set()).add(split)
        assert len(where) == 6 and all(len(splits) == 1 for splits in where.values()), (seed, where)
        assert sorted(len([k for k in keys["val"] if k.startswith(label)]) for label in ("hotdog/", "not-hotdog/")) \
            == [2, 4], (seed, keys["val"])                               # 2 of 6 not-hotdog, 2 whole pairs
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["splits"]["val"]["class_counts"] == [4, 2] and manifest["splits"]["train"]["class_counts"] == [8, 4]
        code, stdout, err = run(capsys, "verify", out)
        assert code == 0 and "6 val samples" in stdout, err


def test_verify_reports_an_image_in_both_train_and_val(tmp_path, capsys):
    src = make_synthetic(tmp_path / "src", train_per_class=6, test_per_class=2, min_side=24, max_side=32)
    out = tmp_path / "out"
    prepare(src, out, val_fraction=0.5, samples_per_shard=100, workers=1, log=lambda _: None)
    manifest = json.loads((out / "manifest.json").read_text())
    train0 = read_split(out, "train")[0]
    val_tar = out / manifest["splits"]["val"]["shards"][0]["name"]
    samples = [s for s in read_split(out, "val")]
    samples[0] = {"__key__": train0["__key__"], "jpg": samples[0]["jpg"], "cls": samples[0]["cls"]}
    val_tar.unlink()
    with wds.TarWriter(str(val_tar)) as sink:
        for s in samples:
            sink.write({k: s[k] for k in ("__key__", "jpg", "cls")})
    code, _, err = run(capsys, "verify", out)
    assert code == 1 and f"duplicate key {train0['__key__']!r}" in err


def test_reencoding_resizing_and_keys(tmp_path, capsys):
    root = tmp_path / "src"
    for split in ("train", "test"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            (root / split / name / "big.jpg").write_bytes(jpeg_bytes(size=(120, 60)))
    train = root / "train" / "hotdog"
    (train / "big.png").write_bytes(jpeg_bytes(size=(30, 90), fmt="PNG"))  # key collision with big.jpg
    (train / "grey.v2.jpg").write_bytes(jpeg_bytes(mode="L"))  # dot in stem; not RGB
    rgba = io.BytesIO()
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(rgba, format="PNG")
    (train / "alpha.png").write_bytes(rgba.getvalue())
    out = tmp_path / "out"
    code, _, _ = run(capsys, "--source", root, "--out", out, "--max-side", 48, "--quality", 80, "--workers", 1)
    assert code == 0
    samples = {s["__key__"]: s for s in read_split(out, "train")}
    assert set(samples) == {"hotdog/big", "hotdog/big_png", "hotdog/grey_v2", "hotdog/alpha", "not-hotdog/big"}
    for s in samples.values():
        image = Image.open(io.BytesIO(s["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= 48
    assert Image.open(io.BytesIO(samples["hotdog/big"]["jpg"])).size == (48, 24)
    assert Image.open(io.BytesIO(samples["hotdog/alpha"]["jpg"])).getpixel((8, 8)) > (240, 240, 240)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["max_side"] == 48 and manifest["options"]["quality"] == 80


# --------------------------------------------------------------------------- bad inputs


def test_unusable_files_are_skipped_and_reported(src, tmp_path, capsys):
    good = (src / "train/hotdog/0000.jpg").read_bytes()
    bad = {
        "train/hotdog/truncated.jpg": good[: len(good) // 2],
        "train/hotdog/empty.jpg": b"",
        "train/not-hotdog/notes.txt": b"not an image at all\n",
        "test/hotdog/corrupt.jpg": good[:200] + bytes(range(256)) * 4,
    }
    for rel, data in bad.items():
        (src / rel).write_bytes(data)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--source", src, "--out", out, "--workers", 1)
    assert code == 0
    assert "16 train + 6 test samples" in stdout and "4 skipped" in stdout
    assert "warning: skipped 4" in err
    skipped = {s["path"]: s["reason"] for s in json.loads((out / "manifest.json").read_text())["skipped"]}
    assert set(skipped) == set(bad)
    assert skipped["train/hotdog/empty.jpg"] == "zero-byte file"
    assert skipped["train/not-hotdog/notes.txt"] == "not an image"
    assert "truncated or corrupt JPEG" in skipped["train/hotdog/truncated.jpg"]
    assert verify(out) == []

    strict = tmp_path / "strict"
    code, _, err = run(capsys, "--source", src, "--out", strict, "--strict", "--workers", 1)
    assert_user_error(code, err, "--strict", "4 unusable")
    assert_nothing_written(strict)


def test_a_class_with_no_readable_image_is_an_error(src, tmp_path, capsys):
    for p in (src / "test/not-hotdog").iterdir():
        p.write_bytes(b"")
    out = tmp_path / "out"
    code, _, err = run(capsys, "--source", src, "--out", out, "--workers", 1)
    assert_user_error(code, err, "test/not-hotdog", "no readable image")
    assert_nothing_written(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, needles",
    [
        (lambda s: [p.unlink() for p in (s / "train/hotdog").iterdir()], ["train/hotdog", "no readable image"]),
        (lambda s: shutil.rmtree(s / "test"), ["test", "missing folder"]),
        (lambda s: (s / "test/hotdog").rename(s / "test/hot-dog"), ["class mismatch"]),
        (lambda s: shutil.rmtree(s), ["--source", "no such file"]),
    ],
    ids=["empty-class", "missing-test-folder", "class-mismatch", "missing-source"],
)
def test_layout_errors_exit_2_with_one_line_and_no_output(src, tmp_path, capsys, damage, needles):
    damage(src)
    out = tmp_path / "out"
    code, _, err = run(capsys, "--source", src, "--out", out)
    assert_user_error(code, err, *needles)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--out", "X"], "--source"),
        (["--source", "S", "--out", "X", "--quality", "0"], "--quality"),
        (["--source", "S", "--out", "X", "--max-side", "64", "--shorter-side", "64"], "--shorter-side"),
        (["--source", "S", "--out", "X", "--workers", "0"], "--workers"),
        (["--source", "S", "--out", "X", "--test-fraction", "1.5"], "--test-fraction"),
        (["--source", "S", "--out", "X", "--val-fraction", "0"], "--val-fraction"),
    ],
)
def test_bad_flags_exit_2_with_one_line(src, tmp_path, capsys, argv, needle):
    argv = [str(src) if a == "S" else str(tmp_path / "out") if a == "X" else a for a in argv]
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, needle)
    assert_nothing_written(tmp_path / "out")


def test_refuses_to_overwrite_a_foreign_folder(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run(capsys, "--source", src, "--out", out)
    assert_user_error(code, err, "--out", "not empty")
    assert (out / "precious.txt").read_text() == "keep me"


def test_duplicates_and_leakage(src, tmp_path, capsys):
    shutil.copy(src / "train/hotdog/0001.jpg", src / "test/hotdog/leaked.jpg")
    shutil.copy(src / "train/hotdog/0002.jpg", src / "train/hotdog/twin.jpg")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--source", src, "--out", out, "--workers", 1)
    assert code == 0 and "2 duplicate group(s), 1 train/test leak(s)" in stdout
    assert "leakage" in err
    duplicates = json.loads((out / "manifest.json").read_text())["duplicates"]
    leak = next(d for d in duplicates if d["leak"])
    assert leak["paths"] == ["test/hotdog/leaked.jpg", "train/hotdog/0001.jpg"]
    assert sum(1 for d in duplicates if not d["leak"]) == 1

    dedup = prepare(src, tmp_path / "dedup", drop_duplicates=True, workers=1, log=lambda _: None)
    assert dedup["splits"]["train"]["num_samples"] == 15  # 17 files less the leaked copy and the twin
    assert dedup["splits"]["test"]["num_samples"] == 7  # the test copy is kept
    assert {p for d in dedup["duplicates"] for p in d["dropped"]} == {
        "train/hotdog/0001.jpg", "train/hotdog/twin.jpg",
    }


# --------------------------------------------------------------------------- zips and the d2l download


def zip_of(folder: Path, dest: Path, prefix: str = "hotdog/") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return dest


def test_zip_source_with_a_top_level_folder(src, tmp_path, capsys):
    archive = zip_of(src, tmp_path / "hotdog.zip")
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "--source", archive, "--out", out, "--workers", 1)
    assert code == 0 and "16 train + 6 test" in stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".tar")) == ["manifest.json"]
    prepare(src, tmp_path / "dir", workers=1, log=lambda _: None)
    assert shard_hashes(out) == shard_hashes(tmp_path / "dir"), "same images as the unzipped folder"


@pytest.mark.parametrize("member", ["../evil.jpg", "hotdog/../../evil.jpg", "/tmp/evil.jpg", "link"])
def test_zip_slip_is_refused(tmp_path, capsys, member):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("hotdog/train/hotdog/ok.jpg", jpeg_bytes())
        info = zipfile.ZipInfo(member)
        if member == "link":
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(info, b"gotcha")
    out = tmp_path / "work" / "out"
    code, _, err = run(capsys, "--source", archive, "--out", out)
    assert_user_error(code, err, "zip-slip", "refusing")
    assert_nothing_written(out)
    assert not list(tmp_path.rglob("evil.jpg"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_d2l_download_offline_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOTDOG_URL", f"http://127.0.0.1:{closed_port()}/hotdog.zip")
    out = tmp_path / "out"
    code, _, err = run(capsys, "--source", "d2l", "--out", out, "--cache-dir", tmp_path / "cache")
    assert_user_error(code, err, "could not download hotdog.zip", "by hand", "--source /path/to/hotdog.zip")
    assert_nothing_written(out)
    assert not list((tmp_path / "cache").glob("*"))


def test_d2l_download_sha1_check_and_success(src, tmp_path, capsys, monkeypatch):
    archive = zip_of(src, tmp_path / "served.zip")
    monkeypatch.setenv("HOTDOG_URL", archive.as_uri())
    monkeypatch.setenv("HOTDOG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code, _, err = run(capsys, "--source", "d2l", "--out", out)
    assert_user_error(code, err, "sha1", sources.D2L_SHA1, "by hand")
    assert not list((tmp_path / "cache").glob("*")), "no partial download left in the cache"
    assert_nothing_written(out)

    # With the expected checksum pointed at our zip, the same path downloads, caches and prepares.
    monkeypatch.setattr(sources, "D2L_SHA1", hashlib.sha1(archive.read_bytes()).hexdigest())
    code, stdout, _ = run(capsys, "--source", "d2l", "--out", out, "--workers", 1)
    assert code == 0 and "16 train + 6 test" in stdout
    assert (tmp_path / "cache" / "hotdog.zip").read_bytes() == archive.read_bytes()
    archive.unlink()  # the cached copy is used from now on
    code, stdout, _ = run(capsys, "--source", "d2l", "--out", out, "--workers", 1)
    assert code == 0 and "up to date" in stdout


# --------------------------------------------------------------------------- verify


@pytest.mark.floor
def test_verify_catches_tampering(src, tmp_path, capsys):
    out = tmp_path / "out"
    prepare(src, out, samples_per_shard=4, workers=1, log=lambda _: None)
    assert verify(out) == []
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(out)
    assert any("train-000001.tar: sha256" in p for p in problems)
    code, _, err = run(capsys, "verify", out)
    assert code == 1 and "train-000001.tar" in err

    (out / "train-000001.tar").unlink()
    assert any("missing" in p for p in verify(out))
    (out / "stray-000000.tar").write_bytes(b"")
    assert any("stray-000000.tar: not listed" in p for p in verify(out))
    code, _, err = run(capsys, "verify", tmp_path / "nowhere")
    assert_user_error(code, err, "manifest.json", "not found")


# --------------------------------------------------------------------------- real photos


@pytest.mark.slow
@pytest.mark.skipif(not HOTDOG_MINI.is_dir(), reason=f"real photos not available at {HOTDOG_MINI}")
def test_real_photos_hotdog_mini(tmp_path):
    manifest = prepare(HOTDOG_MINI, tmp_path / "out", log=lambda _: None)
    assert manifest["splits"]["train"]["num_samples"] == 200
    assert manifest["splits"]["test"]["num_samples"] == 50
    assert manifest["splits"]["train"]["class_counts"] == [100, 100]
    assert len(manifest["splits"]["train"]["shards"]) >= 16
    assert manifest["skipped"] == []
    assert verify(tmp_path / "out") == []


def test_public_api():
    assert data_prep.main is main and callable(data_prep.prepare) and callable(data_prep.verify)


@pytest.mark.parametrize("copies", [1, 3])
def test_val_carve_of_a_class_with_one_distinct_image_is_one_line(tmp_path, capsys, copies):
    """A class whose train images are all copies of one image (or a single image) cannot give val an image
    without leaking it into train: one line naming the class and the flag, exit 2, no output written."""
    src = tmp_path / "src"
    for k, (split, label, n) in enumerate((("train", "not-hotdog", 4), ("test", "hotdog", 2), ("test", "not-hotdog", 2))):
        (src / split / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (src / split / label / f"{i}.jpg").write_bytes(jpeg_bytes(size=(20 + i, 14), colour=(30, 30 * i, 60 * k)))
    (src / "train" / "hotdog").mkdir(parents=True)
    data = jpeg_bytes(size=(24, 16), colour=(200, 20, 30))
    for i in range(copies):
        (src / "train" / "hotdog" / f"same-{i}.jpg").write_bytes(data)
    code, _, err = run(capsys, "--source", src, "--out", tmp_path / "out", "--val-fraction", 0.5, "--workers", 1,
                       "--no-progress")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "--val-fraction 0.5: train/hotdog has 1 distinct image(s)" in lines[0] and f"({copies} file(s))" in lines[0]
    assert not (tmp_path / "out").exists()
