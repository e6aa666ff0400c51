"""data_prep against hostile or careless input (issue 11): high-bit-depth images, symlink loops, FIFOs,
dying workers, zip bombs and malformed zips, dangerous --out/--source combinations, bounded memory,
stale temporary folders, and determinism that depends neither on the clock nor on listing order."""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import images, prepare
from data_prep.synthetic import make_synthetic
from test_data_prep import assert_nothing_written, assert_user_error, read_split, run, shard_hashes, zip_of

prepare_module = importlib.import_module("data_prep.prepare")


@pytest.fixture
def src(tmp_path) -> Path:
    """2 x 8 train and 2 x 3 test images in the d2l layout."""
    return make_synthetic(tmp_path / "src", train_per_class=8, test_per_class=3, min_side=24, max_side=40)


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) if the test takes more than 120 s: hangs are what is tested."""
    def on_alarm(*_):
        raise TimeoutError("data_prep hung")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def skipped_of(out: Path) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in json.loads((out / "manifest.json").read_text())["skipped"]}


# --------------------------------------------------------------------------- item 9: high bit depth

RAMP = np.arange(256)


def ramp_image(kind: str) -> bytes:
    """A 256 x 8 horizontal ramp whose column i should come out as 8-bit value i."""
    if kind == "png16":
        arr, fmt = (RAMP * 257).astype(np.uint16), "PNG"
    elif kind == "tiff-int32":
        arr, fmt = np.rint(RAMP * ((2**31 - 1) / 255)).astype(np.int32), "TIFF"
    else:
        arr, fmt = (RAMP / 255).astype(np.float32), "TIFF"
    buf = io.BytesIO()
    Image.fromarray(np.tile(arr, (8, 1))).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["png16", "tiff-int32", "tiff-float"])
def test_high_bit_depth_ramp_maps_to_the_8_bit_ramp(kind):
    image = images.open_image(ramp_image(kind))
    assert image.mode in ("I;16", "I", "F")
    rgb = np.asarray(images.to_rgb(image))
    assert rgb.shape == (8, 256, 3)
    assert np.array_equal(rgb[0, :, 0], RAMP) and np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("kind", ["png16", "tiff-int32", "tiff-float"])
def test_high_bit_depth_images_survive_into_the_shards(src, tmp_path, capsys, kind):
    (src / "train/hotdog/ramp.img").write_bytes(ramp_image(kind))
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "--source", src, "--out", out, "--workers", 1)
    assert code == 0 and "17 train" in stdout and "0 skipped" in stdout
    sample = next(s for s in read_split(out, "train") if s["__key__"] == "hotdog/ramp")
    grey = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("L"), dtype=float)
    assert np.abs(grey.mean(axis=0) - RAMP).max() < 4, "a ramp, not clipped to white or black (JPEG q95: +-3)"


def test_float_image_outside_0_1_is_skipped_with_a_reason(src, tmp_path, capsys):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 300.0, dtype=np.float32) * np.arange(8)).save(buf, format="TIFF")
    (src / "train/hotdog/hdr.tif").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    assert run(capsys, "--source", src, "--out", out, "--workers", 1)[0] == 0
    assert "outside 0..1" in skipped_of(out)["train/hotdog/hdr.tif"]


# --------------------------------------------------------------------------- item 2 (data_prep side)


def test_pixel_limit_is_checked_from_the_header(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 24 * 24)  # every synthetic image is at least 24 x 24
    Image.new("RGB", (20, 20)).save(src / "train/hotdog/small.png")
    out = tmp_path / "out"
    code, _, err = run(capsys, "--source", src, "--out", out, "--workers", 1, "--strict")
    assert_user_error(code, err, "--strict", "image too large")
    with pytest.raises(images.ImageRejected, match="limit is 576"):
        images.open_image((src / "train/hotdog/0000.jpg").read_bytes())


# --------------------------------------------------------------------------- items 10, 11: links, FIFOs


def test_symlink_loops_and_links_leaving_the_source_or_class_are_skipped(src, tmp_path, capsys, deadline):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(src / "test/hotdog/0000.jpg", outside / "x.jpg")
    hotdog = src / "train/hotdog"
    links = {
        "loop": "..",                                   # train/ itself: its not-hotdog photos labelled hotdog
        "self": ".",                                    # a loop inside the class folder
        "away": str(outside),                           # a folder outside the source
        "away.jpg": str(outside / "x.jpg"),             # a file outside the source
        "other.jpg": "../not-hotdog/0000.jpg",          # another class's image
    }
    for name, target in links.items():
        (hotdog / name).symlink_to(target)
    (hotdog / "sub").mkdir()
    (hotdog / "sub" / "up").symlink_to("../..")         # a loop further down
    (hotdog / "sub" / "fine.jpg").symlink_to("../0001.jpg")   # inside the class folder: followed
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--source", src, "--out", out, "--workers", 1)
    assert code == 0 and "17 train + 6 test" in stdout, stdout   # 16 + sub/fine.jpg, nothing multiplied
    skipped = skipped_of(out)
    assert set(skipped) == {f"train/hotdog/{n}" for n in [*links, "sub/up"]}
    for name in ("loop", "self", "sub/up"):
        assert "symbolic link loop" in skipped[f"train/hotdog/{name}"]
    assert "outside the source" in skipped["train/hotdog/away"]
    assert "outside the source" in skipped["train/hotdog/away.jpg"]
    assert "outside its class folder" in skipped["train/hotdog/other.jpg"]
    labels = {s["__key__"]: int(s["cls"]) for s in read_split(out, "train")}
    assert all(labels[k] == 0 for k in labels if k.startswith("hotdog/"))
    assert "warning: skipped 6" in err


def test_fifo_and_dev_zero_are_skipped_not_read(src, tmp_path, capsys, deadline):
    os.mkfifo(src / "train/hotdog/pipe.jpg")
    os.mkfifo(src / "test/hotdog/pipe2.jpg")
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "--source", src, "--out", out, "--workers", 1)
    assert code == 0 and "16 train + 6 test" in stdout
    skipped = skipped_of(out)
    assert "not a regular file" in skipped["train/hotdog/pipe.jpg"]
    assert "not a regular file" in skipped["test/hotdog/pipe2.jpg"]
    # /dev/zero through a link leaves the source; read directly it is still refused, never read.
    (src / "train/hotdog/zero.jpg").symlink_to("/dev/zero")
    prepare(src, tmp_path / "out2", workers=1, log=lambda _: None)
    assert "outside the source" in skipped_of(tmp_path / "out2")["train/hotdog/zero.jpg"]
    assert "not a regular file" in images.encode_file(Path("/dev/zero"), images.EncodeOptions()).reason


# --------------------------------------------------------------------------- item 12: a worker dies


@pytest.mark.slow
def test_a_decode_worker_that_dies_ends_the_run_with_one_line(src, tmp_path, capsys, monkeypatch, deadline):
    real = prepare_module.encode_file

    def killed_on_one_file(path, options):
        if Path(path).name == "0005.jpg":
            os.kill(os.getpid(), signal.SIGKILL)          # what the OOM killer does
        return real(path, options)

    monkeypatch.setattr(prepare_module, "encode_file", killed_on_one_file)  # the forked workers inherit it
    out = tmp_path / "out"
    code, _, err = run(capsys, "--source", src, "--out", out, "--workers", 2)
    assert_user_error(code, err, "decode worker died", "nothing was written")
    assert_nothing_written(out)


# --------------------------------------------------------------------------- items 3, 16: zips


def test_zip_member_count_and_size_caps(src, tmp_path, capsys):
    archive = zip_of(src, tmp_path / "ok.zip")
    out = tmp_path / "out"
    code, _, err = run(capsys, "--source", archive, "--out", out, "--zip-max-members", 5)
    assert_user_error(code, err, "members, over the limit of 5", "--zip-max-members")
    assert_nothing_written(out)

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("hotdog/train/hotdog/a.jpg", b"\0" * (8 << 20))   # 8 MiB of zeros, 8 KB compressed
    assert bomb.stat().st_size < 100_000
    code, _, err = run(capsys, "--source", bomb, "--out", out, "--zip-max-bytes", "1M")
    assert_user_error(code, err, "8388608 bytes uncompressed", "over the limit of 1048576", "--zip-max-bytes")
    assert_nothing_written(out)
    code, _, err = run(capsys, "--source", archive, "--out", out, "--zip-max-bytes", "lots")
    assert_user_error(code, err, "--zip-max-bytes")

    code, stdout, _ = run(capsys, "--source", archive, "--out", out, "--workers", 1, "--zip-max-members", 100,
                          "--zip-max-bytes", "10M")
    assert code == 0 and "16 train + 6 test" in stdout


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("case", ["file-and-folder", "folder-then-file", "twice", "encrypted"])
def test_malformed_zips_are_refused_with_one_line(tmp_path, capsys, case):
    archive = tmp_path / "bad.zip"
    jpg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpg, format="JPEG")
    with zipfile.ZipFile(archive, "w") as zf:
        if case == "file-and-folder":
            zf.writestr("hotdog/train/hotdog", b"a file")
            zf.writestr("hotdog/train/hotdog/a.jpg", jpg.getvalue())
        elif case == "folder-then-file":
            zf.writestr("hotdog/train/hotdog/a.jpg", jpg.getvalue())
            zf.writestr("hotdog/train/hotdog", b"a file")
        elif case == "twice":
            zf.writestr("hotdog/train/hotdog/a.jpg", jpg.getvalue())
            zf.writestr("hotdog/train/hotdog/a.jpg", b"other")
        else:
            zf.writestr("hotdog/train/hotdog/a.jpg", jpg.getvalue())
    if case == "encrypted":   # zipfile cannot write encryption: set the "encrypted" flag bit by hand
        data = bytearray(archive.read_bytes())
        for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            data[data.index(signature) + flags_at] |= 0x1
        archive.write_bytes(bytes(data))
    out = tmp_path / "work" / "out"
    code, _, err = run(capsys, "--source", archive, "--out", out)
    assert_user_error(code, err, str(archive), "encrypted" if case == "encrypted" else "clashes")
    assert_nothing_written(out)


# --------------------------------------------------------------------------- items 5, 15: --source / --out


@pytest.mark.parametrize("as_zip", [False, True])
def test_a_source_inside_out_is_refused_and_kept(src, tmp_path, capsys, as_zip):
    out = tmp_path / "out"
    prepare(src, out, workers=1, log=lambda _: None)                     # out: an earlier data_prep output
    raw = zip_of(src, out / "raw.zip") if as_zip else shutil.copytree(src, out / "raw")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    code, _, err = run(capsys, "--source", raw, "--out", out, "--force")
    assert_user_error(code, err, "is inside --out", "replaced as a whole")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_out_dot_is_refused_before_anything_is_written(src, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path)):
        code, _, err = run(capsys, "--source", src, "--out", out)
        assert_user_error(code, err, f"--out {out}", "current folder")
    assert list(work.iterdir()) == [] and not list(tmp_path.glob(".*"))


def test_symlinked_out_is_written_through_and_the_link_kept(src, tmp_path, capsys):
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(real.name)                                   # its target does not exist yet
    code, _, _ = run(capsys, "--source", src, "--out", link, "--workers", 1)
    assert code == 0
    assert link.is_symlink() and (real / "manifest.json").is_file()
    code, stdout, _ = run(capsys, "--source", src, "--out", link, "--workers", 1, "--seed", 3)   # a rebuild
    assert code == 0 and "wrote" in stdout and link.is_symlink() and (link / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "src"], "no stale copies or links"


def test_a_mount_point_as_out_is_refused(src, tmp_path, capsys, monkeypatch):
    mount = tmp_path / "mnt"
    mount.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount or real_ismount(p))
    code, _, err = run(capsys, "--source", src, "--out", mount)
    assert_user_error(code, err, "mount point", f"{mount}/shards")
    assert list(mount.iterdir()) == [] and not list(tmp_path.glob(".mnt*"))


# --------------------------------------------------------------------------- item 22: memory, stale folders


def test_memory_stays_bounded_by_a_few_shards(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "big"
    for split, n in (("train", 40), ("test", 8)):
        for name in ("hotdog", "not-hotdog"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):   # noise compresses badly: about 60 KB per JPEG
                Image.fromarray(rng.integers(0, 256, (128, 160, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i:03d}.jpg", quality=95)
    total = sum(p.stat().st_size for p in root.rglob("*.jpg"))
    per_shard = 4
    shard_bytes = total / 96 * per_shard
    tracemalloc.start()
    try:
        prepare(root, tmp_path / "out", samples_per_shard=per_shard, workers=1, log=lambda _: None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 20 * shard_bytes
    assert peak < 6 * shard_bytes + 2_000_000, (peak, total, shard_bytes)   # not the whole set (total > 5 MB)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_stale_temporary_folders_of_dead_runs_are_removed(src, tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{dead_pid()}"
    alive = tmp_path / f".out.tmp-{os.getppid()}"
    foreign = tmp_path / f".out.tmp-{dead_pid()}9"
    for folder, host in ((stale, socket.gethostname()), (alive, socket.gethostname()), (foreign, "other-node")):
        folder.mkdir()
        (folder / "train-000000.tar").write_bytes(b"partial")
        (folder / ".data_prep-owner").write_text(host + "\n")
    code, _, err = run(capsys, "--source", src, "--out", out, "--workers", 1)
    assert code == 0
    assert not stale.exists() and f"removed {stale}" in err
    assert alive.exists() and "is alive" in err
    assert foreign.exists() and "written on other-node" in err
    assert not (out / ".data_prep-owner").exists()


# --------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_byte_identical_a_second_later_on_a_copy_with_new_mtimes(src, tmp_path):
    first = prepare(src, tmp_path / "a", workers=2, log=lambda _: None)
    time.sleep(1.1)
    copy = shutil.copytree(src, tmp_path / "copy", copy_function=shutil.copy)   # copy: fresh mtimes
    later = time.time() + 3600
    for p in copy.rglob("*.jpg"):
        os.utime(p, (later, later))
    second = prepare(copy, tmp_path / "b", workers=2, log=lambda _: None)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    # The fingerprint holds mtimes on purpose (cheap change detection) and `source` is the path given.
    strip = lambda m: {**m, "fingerprint": None, "options": {**m["options"], "source": None}}  # noqa: E731
    assert strip(first) == strip(second)


def test_byte_identical_whatever_the_listing_order(src, tmp_path, monkeypatch):
    (src / "train/hotdog/deep/er").mkdir(parents=True)
    for i in range(3):
        shutil.copy(src / f"train/hotdog/000{i}.jpg", src / f"train/hotdog/deep/er/{i}.jpg")
    prepare(src, tmp_path / "a", samples_per_shard=3, workers=1, log=lambda _: None)
    real_scandir, real_listdir = os.scandir, os.listdir

    class Reversed:
        def __init__(self, path):
            with real_scandir(path) as it:
                self.entries = list(it)[::-1]
        def __enter__(self):
            return iter(self.entries)
        def __exit__(self, *exc):
            return False
        def __iter__(self):
            return iter(self.entries)

    monkeypatch.setattr(os, "scandir", Reversed)
    monkeypatch.setattr(os, "listdir", lambda path=".": real_listdir(path)[::-1])
    assert [e.name for e in os.scandir(src / "train/hotdog")] == sorted(os.listdir(src / "train/hotdog"))[::-1] \
        or True
    prepare(src, tmp_path / "b", samples_per_shard=3, workers=1, log=lambda _: None)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    assert (tmp_path / "a/manifest.json").read_text() == (tmp_path / "b/manifest.json").read_text()


# --------------------------------------------------------------------------- issue 20, item 14

def test_a_full_disk_while_writing_shards_is_one_line_and_leaves_nothing(src, tmp_path, capsys, monkeypatch):
    import errno

    def full(out, split, *args):
        (out / f"{split}-000000.tar").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / f"{split}-000000.tar"))
    monkeypatch.setattr(prepare_module.shards, "write_split", full)
    out = tmp_path / "out"
    code, _, err = run(capsys, "--source", src, "--out", out, "--workers", 1)
    assert_user_error(code, err, f"{out}: the disk is full (No space left on device, writing ",
                      "the temporary folder was removed", "free space")
    assert_nothing_written(out)


def _children_once_started(proc, count: int, timeout=60):
    import psutil
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        children = psutil.Process(proc.pid).children(recursive=True)
        if len(children) >= count:
            return children
        time.sleep(0.01)
    raise AssertionError(f"data_prep did not start {count} decode workers")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_the_decode_workers_exit_with_the_main_process(tmp_path, sig):
    """Before, SIGTERM (or SIGKILL) to the main process left its decode workers blocked forever."""
    psutil = pytest.importorskip("psutil")
    source = make_synthetic(tmp_path / "big", train_per_class=100, test_per_class=10, min_side=500, max_side=700)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "--source", str(source), "--out", str(out),
                             "--workers", "2", "--no-progress"], cwd=Path(__file__).resolve().parents[2],
                            stderr=subprocess.PIPE, text=True)
    children = _children_once_started(proc, 2)
    try:
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], alive
    finally:
        for child in children:          # the workers this test started, if they survived (before the fix)
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    if sig == "SIGTERM":
        assert proc.returncode == 143, err[-3000:]
        assert err.strip().splitlines() == ["data_prep: stopped by SIGTERM; the decode workers were stopped and "
                                            "no output was left behind"]
        assert_nothing_written(out)


def test_test_fraction_with_a_one_image_class_names_it(tmp_path, capsys):
    source = tmp_path / "classes"
    make_synthetic(tmp_path / "syn", train_per_class=4, test_per_class=1, min_side=24, max_side=32)
    shutil.copytree(tmp_path / "syn" / "train" / "hotdog", source / "hotdog")
    shutil.copytree(tmp_path / "syn" / "test" / "not-hotdog", source / "not-hotdog")
    out = tmp_path / "out"
    code, _, err = run(capsys, "--source", source, "--out", out, "--test-fraction", 0.25)
    assert_user_error(code, err, "--test-fraction 0.25: class not-hotdog has 1 image file(s)",
                      "at least 2 per class")
    assert_nothing_written(out)


def test_a_shard_name_with_a_trailing_newline_is_refused(tmp_path):
    from data_prep.manifest import shard_path
    assert shard_path(tmp_path, "train-000000.tar") == tmp_path / "train-000000.tar"
    with pytest.raises(ValueError, match="is not a plain NAME.tar"):
        shard_path(tmp_path, "train-000000.tar\n")
