"""predict.py against a real (tiny) train.py run: labels and probabilities, folders, non-JPEG inputs,
unreadable files, exit codes, and that its preprocessing is train.py's eval preprocessing."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from PIL import Image

import predict
from conftest import PYTHON, REPO, TINY, load_model_pt, run_train


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("predict") / "run"
    run_train(["--data", shards, "--output-dir", run_dir, "--pretrained", "none", "--epochs", "1",
               "--max-steps-per-epoch", "1", *TINY])
    saved = load_model_pt(run_dir)
    return dict(model=str(run_dir / "model.pt"), classes=saved["classes"], saved=saved, run_dir=run_dir)


def _photo(path, size=(48, 40), mode="RGB", seed=0):
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    """A folder tree with JPEG, PNG (RGBA), BMP (greyscale), WebP and an upper-case extension; plus a text
    file that must be ignored when the folder is searched."""
    root = tmp_path / "photos"
    files = [_photo(root / "a.jpg", seed=1), _photo(root / "sub" / "b.png", mode="RGBA", seed=2),
             _photo(root / "sub" / "deeper" / "c.bmp", mode="L", seed=3), _photo(root / "d.webp", seed=4),
             _photo(root / "E.JPG", size=(200, 90), seed=5)]
    (root / "notes.txt").write_text("not an image")
    return root, files


def _rows(out: str) -> list[list[str]]:
    return [line.split("\t") for line in out.splitlines() if line]


@pytest.mark.slow
def test_folder_is_searched_recursively_and_every_image_labelled(trained, photos, capsys):
    root, files = photos
    assert predict.main(["--model", trained["model"], str(root), "--top-k", "2", "--batch-size", "2"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert sorted(r[0] for r in rows) == sorted(str(f) for f in files)      # notes.txt left out, sub/ searched
    for row in rows:
        (l1, p1), (l2, p2) = (row[1], float(row[2])), (row[3], float(row[4]))
        assert {l1, l2} == set(trained["classes"])
        assert 0.0 <= p2 <= p1 <= 1.0
        assert p1 + p2 == pytest.approx(1.0, abs=2e-4)                      # 2 classes: top-2 is everything


@pytest.mark.slow
def test_batch_size_does_not_change_the_answer(trained, photos, capsys):
    root, _ = photos
    predict.main(["--model", trained["model"], str(root), "--batch-size", "1", "--json"])
    one = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    predict.main(["--model", trained["model"], str(root), "--batch-size", "64", "--json"])
    many = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in one] == [r["path"] for r in many] and len(one) == 5
    for a, b in zip(one, many):
        assert a["label"] == b["label"] and a["probability"] == pytest.approx(b["probability"], abs=1e-4)
        assert a["label"] in trained["classes"] and 0.0 <= a["probability"] <= 1.0


@pytest.mark.slow
def test_unreadable_files_are_named_and_the_rest_still_labelled(trained, photos, tmp_path, capsys):
    root, files = photos
    (root / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (root / "sub" / "empty.png").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(files[0].read_bytes()[:300])
    code = predict.main(["--model", trained["model"], str(root), str(tmp_path / "missing.jpg")])
    out, err = capsys.readouterr()
    assert code == 1
    assert sorted(r[0] for r in _rows(out)) == sorted(str(f) for f in files)
    for name in ("garbage.jpg", "empty.png", "truncated.jpg", "missing.jpg"):
        assert any(name in line and "cannot read" in line for line in err.splitlines()), (name, err)
    assert "labelled 5 image(s)" in err and "4 could not be read" in err


@pytest.mark.slow
def test_explicit_file_with_odd_extension_is_tried(trained, tmp_path, capsys):
    path = _photo(tmp_path / "photo.jpg")
    renamed = path.rename(tmp_path / "photo.data")
    assert predict.main(["--model", trained["model"], str(renamed)]) == 0
    assert _rows(capsys.readouterr().out)[0][0] == str(renamed)


@pytest.mark.slow
def test_score_against_class_folders(trained, tmp_path, capsys):
    for i, cls in enumerate(trained["classes"]):
        _photo(tmp_path / "test" / cls / f"{i}.jpg", seed=i)
    assert predict.main(["--model", trained["model"], "--score", str(tmp_path / "test")]) == 0
    err = capsys.readouterr().err
    assert "accuracy against folder names" in err and "/2 = " in err


@pytest.mark.slow
def test_usage_errors_exit_2_with_one_line(trained, tmp_path, capsys):
    img = _photo(tmp_path / "x.jpg")
    cases = [(["--model", str(tmp_path / "nope.pt"), str(img)], "no such file"),
             (["--model", str(img), str(img)], "not a loadable model.pt"),
             (["--model", trained["model"], str(tmp_path / "nothing-here")], "no images found"),
             (["--model", trained["model"], str(img), "--batch-size", "0"], "must be >= 1")]
    torch.save({"state_dict": {}}, tmp_path / "partial.pt")
    cases.append((["--model", str(tmp_path / "partial.pt"), str(img)], "missing classes, preprocess"))
    if not torch.cuda.is_available():
        cases.append((["--model", trained["model"], str(img), "--device", "cuda"], "no CUDA GPU"))
    for argv, needle in cases:
        assert predict.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("predict.py: error: ") and needle in err[-1], (argv, err)


@pytest.mark.slow
def test_preprocessing_is_train_pys_eval_preprocessing(trained):
    from finetune.arch import preprocessing
    from finetune.data.transforms import DeviceNormalizer, eval_transform
    spec = trained["saved"]["preprocess"]
    size = spec["crop"]
    assert spec == preprocessing("resnet18", size)
    assert spec["resize"] == [round(size * 256 / 224)] * 2     # d2l: Resize(256, 256) + CenterCrop(224), scaled
    img = torch.randint(0, 256, (3, 70, 50), dtype=torch.uint8)
    ours = predict.preprocess(img, spec)
    assert torch.equal(ours, eval_transform(img, spec))
    cpu = torch.device("cpu")
    expected, _ = DeviceNormalizer(cpu, channels_last=False)(ours[None], torch.zeros(1))
    # predict.py normalises with model.pt's mean/std: the same numbers as training's default
    assert torch.equal(DeviceNormalizer(cpu, False, mean=spec["mean"], std=spec["std"])(ours[None])[0], expected)


@pytest.mark.slow
def test_probabilities_are_the_models_softmax(trained, photos):
    """End to end: predict's probability equals softmax(model(eval_transform(image))) computed by hand."""
    from torchvision.io import decode_image, ImageReadMode
    from torchvision.models import resnet18
    from finetune.data.transforms import DeviceNormalizer, eval_transform
    _, files = photos
    saved = trained["saved"]
    model = resnet18(num_classes=len(saved["classes"]))
    model.load_state_dict(saved["state_dict"])
    model.eval()
    img = decode_image(str(files[0]), mode=ImageReadMode.RGB)
    x, _ = DeviceNormalizer(torch.device("cpu"), False)(eval_transform(img, saved["preprocess"])[None],
                                                        torch.zeros(1))
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)[0]
    net, classes, spec = predict.load_model(trained["model"], torch.device("cpu"))
    (path, top), = predict.predict(net, DeviceNormalizer(torch.device("cpu"), False, mean=spec["mean"], std=spec["std"]), classes, [files[0]], spec,
                                   8, 2, on_error=None)
    assert top[0][0] == classes[int(probs.argmax())]
    assert top[0][1] == pytest.approx(float(probs.max()), abs=1e-5)


@pytest.mark.slow
def test_tta_flip_averages_the_image_and_its_mirror(trained, photos):
    from finetune.data.transforms import DeviceNormalizer
    _, files = photos
    net, classes, spec = predict.load_model(trained["model"], torch.device("cpu"))
    norm = DeviceNormalizer(torch.device("cpu"), False, mean=spec["mean"], std=spec["std"])
    (_, plain), = predict.predict(net, norm, classes, [files[0]], spec, 8, 2, on_error=None)
    (_, flipped), = predict.predict(net, norm, classes, [files[0]], spec, 8, 2, on_error=None, tta="flip")
    (x,), = [b for _, b in predict.batches([files[0]], spec, 8, None)]
    x = norm(x[None])[0]
    with torch.no_grad():
        expected = ((torch.softmax(net(x), 1) + torch.softmax(net(x.flip(3)), 1)) / 2)[0]
    assert dict(flipped)[classes[0]] == pytest.approx(float(expected[0]), abs=1e-5)
    assert dict(flipped) != dict(plain)


@pytest.mark.slow
@pytest.mark.floor
def test_command_line_script(trained, photos):
    root, _ = photos
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    proc = subprocess.run([PYTHON, "predict.py", "--model", trained["model"], str(root)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert len(_rows(proc.stdout)) == 5 and "broken.jpg" in proc.stderr


@pytest.mark.slow
@pytest.mark.floor
def test_accuracy_on_the_source_photos_equals_train_pys_test_accuracy(trained, shards, capsys):
    """The shards' test split holds the source JPEGs byte for byte, so predict.py on the source folder must
    reproduce the test accuracy train.py measured: same decode, same eval preprocessing, same model."""
    from conftest import read_json
    source_test = shards.parent / "shards-src" / "test"          # where conftest's _prep made the images
    if not source_test.is_dir():
        pytest.skip(f"conftest no longer keeps the source images at {source_test}")
    final = read_json(trained["run_dir"] / "metrics.json")["final"]
    assert predict.main(["--model", trained["model"], "--score", str(source_test)]) == 0
    err = capsys.readouterr().err
    n = final["test_samples"]
    assert f"accuracy against folder names {round(final['test_acc'] * n)}/{n} " in err, (final, err)


# ------------------------------------------------------------------------------------------------------
# Issue 11: predict.py reads images the way data_prep does (one shared module, data_prep.images)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pixel_limit_is_data_preps_and_reported_per_file(trained, tmp_path, capsys, monkeypatch):
    import data_prep.images
    small, big = _photo(tmp_path / "small.jpg", size=(40, 30)), _photo(tmp_path / "big.png", size=(90, 80))
    monkeypatch.setattr(data_prep.images, "MAX_PIXELS", 40 * 30)     # data_prep's own limit, lowered
    assert predict.main(["--model", trained["model"], str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert [r[0] for r in _rows(out)] == [str(small)]
    lines = [line for line in err.splitlines() if "cannot read" in line]
    assert len(lines) == 1 and str(big) in lines[0] and "image too large (90 x 80" in lines[0], err


@pytest.mark.slow
def test_a_20000_x_10000_png_is_refused_from_its_header(trained, tmp_path, capsys):
    """The file of the issue (a tiny PNG of 200 megapixels): refused before any pixel is decoded."""
    import struct
    import zlib
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 1, 0, 0, 0, 0))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b""))
    _photo(tmp_path / "ok.jpg")
    assert predict.main(["--model", trained["model"], str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "bomb.png: image too large" in err and "labelled 1 image(s)" in err


@pytest.mark.slow
def test_16_bit_png_among_jpegs_is_labelled_and_scaled(trained, photos, capsys):
    import numpy as np
    root, files = photos
    ramp = (np.arange(256) * 257).astype(np.uint16)
    Image.fromarray(np.tile(ramp, (8, 1))).save(root / "deep.png")
    img = predict.read_image(root / "deep.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 8, 256)
    assert torch.equal(img[0, 0], torch.arange(256, dtype=torch.uint8)), "a ramp, not clipped to white"
    assert predict.main(["--model", trained["model"], str(root), "--batch-size", "64"]) == 0
    assert len(_rows(capsys.readouterr().out)) == len(files) + 1


def test_transparency_is_composited_onto_white_as_in_data_prep(tmp_path):
    import io
    import numpy as np
    from data_prep.images import EncodeOptions, encode_file
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    img = predict.read_image(tmp_path / "clear.png")
    assert int(img.min()) == 255, "white, like data_prep (not black)"
    shard_jpg = encode_file(tmp_path / "clear.png", EncodeOptions()).jpg
    assert np.asarray(Image.open(io.BytesIO(shard_jpg))).min() >= 250


def test_crafted_pickle_as_model_never_runs(tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"state_dict": Evil(), "classes": ["a", "b"], "preprocess": {}}, tmp_path / "evil.pt")
    img = _photo(tmp_path / "x.jpg")
    assert predict.main(["--model", str(tmp_path / "evil.pt"), str(img)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("predict.py: error: --model") and "weights_only" in err[0], err
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------
# Issue 20: crafted model / weights files (12), memory per pixel (13), FIFOs and the pickle message (15)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("field, value, needle", [
    ("classes", 5, "field classes: expected a list of 2 or more distinct class names, found 5"),
    ("classes", ["a", "a"], "field classes: expected a list of 2 or more distinct"),
    ("preprocess", {}, "field preprocess.resize: missing"),
    ("resize", [100000, 100000], "field preprocess.resize: expected [height, width], ints 1..4096, "
                                 "found [100000, 100000]"),
    ("crop", 0, "field preprocess.crop: expected an int or [height, width], ints 1..4096, found 0"),
    ("mean", [0.5, "x", 0.5], "field preprocess.mean: expected 3 finite numbers"),
    ("std", [0.5, 0.0, 0.5], "field preprocess.std: expected 3 positive finite numbers"),
    ("interpolation", "magic", "field preprocess.interpolation: expected nearest or nearest-exact"),
    ("arch", 7, "field arch: expected a name"),
    ("state_dict", {0: torch.zeros(1)}, "field state_dict: expected parameter names as keys, found the key 0"),
])
def test_crafted_model_pt_field_is_one_line_naming_file_and_field(trained, tmp_path, capsys, field, value, needle):
    """Each of these was a traceback (TypeError, KeyError) or a 30 GB allocation: now one line, exit 2."""
    saved = dict(trained["saved"], preprocess=dict(trained["saved"]["preprocess"]))
    if field in saved["preprocess"]:
        saved["preprocess"][field] = value
    else:
        saved[field] = value
    path = tmp_path / "crafted.pt"
    torch.save(saved, path)
    img = _photo(tmp_path / "x.jpg")
    assert predict.main(["--model", str(path), str(img)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"predict.py: error: --model {path}: not a usable train.py model.pt")
    assert needle in err[0], err


@pytest.mark.slow
def test_pretrained_with_non_string_keys_is_one_line(shards, tmp_path):
    """--pretrained holding {0: tensor} was an AttributeError traceback inside train.py's model set-up."""
    from conftest import run_train
    torch.save({0: torch.zeros(3)}, tmp_path / "keys.pt")
    proc = run_train(["--data", shards, "--output-dir", tmp_path / "run", "--pretrained", tmp_path / "keys.pt",
                      "--epochs", "1", *TINY], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"train.py: error: --pretrained {tmp_path / 'keys.pt'}: expected parameter names as keys, "
                    f"found the key 0 (int) (a state_dict of --arch resnet18)"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _png_header(path, width, height, bit_depth, colour_type=0):
    """A PNG whose header says width x height x bit_depth (colour_type 0: grey) and holds no pixel data:
    what matters is refused from the header alone, before any decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b""))
    return path


@pytest.mark.slow
def test_16_bit_png_under_the_pixel_limit_is_refused_by_its_memory(trained, tmp_path, capsys):
    """Issue 20 item 13: a 13000 x 13000 16-bit PNG (169 MP, under the 179 MP pixel limit) held 5.4 GB for 32 s.
    It costs ~31 bytes a pixel to decode, more than an 8-bit RGB image at the pixel limit (19): refused from
    its header. The same size in 8-bit grey (13 bytes a pixel) is within the limit: not refused for memory."""
    from data_prep.images import MAX_PIXELS
    assert 13000 * 13000 <= MAX_PIXELS
    deep = _png_header(tmp_path / "deep.png", 13000, 13000, 16)
    grey = _png_header(tmp_path / "grey.png", 13000, 13000, 8)
    _photo(tmp_path / "ok.jpg")
    assert predict.main(["--model", trained["model"], str(tmp_path)]) == 1
    err = capsys.readouterr().err
    lines = {line.split(": cannot read ")[1].split(": ")[0]: line for line in err.splitlines() if "cannot read" in line}
    assert "image too large to decode: 13000 x 13000 in mode I;16 would take about 4.9 GiB" in lines[str(deep)], err
    assert "the limit is 3.2 GiB" in lines[str(deep)]
    assert "too large" not in lines[str(grey)] and "truncated or corrupt PNG" in lines[str(grey)], err
    assert "labelled 1 image(s)" in err


def test_memory_table_covers_what_to_rgb_decodes():
    """Each Pillow mode the table prices is a mode Pillow knows; the unknown ones fall back to 4-byte pixels."""
    from PIL import ImageMode
    for mode in predict.DECODE_BYTES_PER_PIXEL:
        ImageMode.getmode(mode)
    assert predict.DECODE_BYTES_PER_PIXEL["I;16"] > predict.MULTI_CHANNEL_COST > predict.DECODE_BYTES_PER_PIXEL["L"]


@pytest.mark.slow
def test_fifo_is_not_a_regular_file_and_never_blocks(trained, tmp_path):
    """Issue 20 item 15: a FIFO was 'no such file or folder'; it must be named as what it is, without opening
    it for a blocking read (a subprocess with a timeout, so a regression hangs no test run)."""
    import os
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    img = _photo(tmp_path / "ok.jpg")
    proc = subprocess.run([PYTHON, "predict.py", "--model", trained["model"], str(fifo), str(img)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"predict.py: cannot read {fifo}: not a regular file (a FIFO); only regular files are read" in proc.stderr
    assert len(_rows(proc.stdout)) == 1
    proc = subprocess.run([PYTHON, "predict.py", "--model", str(fifo), str(img)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"predict.py: error: --model {fifo}: not a regular file (train.py writes RUN_DIR/model.pt at the end of "
        f"a run)"), proc.stderr


def _evil_pickle(path, marker):
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"state_dict": Evil(), "classes": ["a", "b"], "preprocess": {}}, path)
    return path


REFUSED_PICKLE = ("refused: it asks to build the Python object io.open, and unpickling such a file can run code, "
                  "so it is only ever loaded with weights_only=True: tensors, numbers, strings, lists and dicts")


@pytest.mark.slow
def test_malicious_pickle_refusal_is_a_whole_message(trained, tmp_path, shards, capsys):
    """Issue 20 item 15: the --pretrained refusal was torch's first line cut at 120 characters, mid-word and with
    terminal escapes. Both readers now say the whole sentence; the pickle never runs."""
    from finetune import weights
    marker = tmp_path / "PWNED"
    evil = _evil_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(weights.UsageError) as e:
        weights.from_file(str(evil), "resnet18")
    assert str(e.value) == f"--pretrained {evil}: not a loadable state dict ({REFUSED_PICKLE})"
    assert predict.main(["--model", str(evil), str(_photo(tmp_path / "x.jpg"))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"predict.py: error: --model {evil}: not a loadable model.pt ({REFUSED_PICKLE})"
    assert "\x1b" not in err and not marker.exists()
