"""Classify images with a trained run's model.pt (or its export), using the run's own eval preprocessing.

    python predict.py --model runs/hotdog-resnet18/model.pt photo.jpg more/photos/
    python predict.py --model runs/hotdog-resnet18/model.pt --top-k 2 --json photos/ > predictions.jsonl
    python predict.py --model runs/hotdog-resnet18/model.pt --score ../shared/data/hotdog-mini/test
    python predict.py --model runs/hotdog-resnet18/model.onnx photo.jpg     # python -m finetune.export's file
    python predict.py --model runs/hotdog-resnet18/model.pt2 --trust-model photo.jpg     # its torch.export file

Folders are searched recursively for .jpg .jpeg .png .bmp .gif .webp .tif .tiff (any case); files named on the
command line are tried whatever their extension. Output, one line per image, in input order:

    PATH<TAB>LABEL<TAB>PROBABILITY                      (--top-k K adds the next K-1 LABEL<TAB>PROBABILITY pairs)
    {"path": ..., "label": ..., "probability": ..., "top": [{"label": ..., "probability": ...}, ...]}   (--json)

The eval preprocessing is the one model.pt records (`preprocess`: resize to [H, W], centre crop, normalise with
mean/std), i.e. what train.py evaluated with; every field of model.pt is checked before use. An exported
model.onnx / model.pt2 carries the same spec in its metadata and runs on the CPU with onnxruntime /
torch.export; a .pt2 only with --trust-model (loading one can run code stored in it). Images are read as
data_prep reads them (data_prep.images: the same pixel limit, 16-bit and float images scaled to 8 bits,
transparency onto white), and an image whose decoding would need more memory than an 8-bit RGB image at the
pixel limit (a 16-bit one costs several times more per pixel) is refused from its header. An image that
cannot be read, is not a regular file, or is over either limit, is reported on stderr in one line naming the
file, and the others are still labelled. Exit codes: 0 every image labelled, 1 some could not be read (or a
path does not exist), 2 usage error (no/unloadable model file, no images found, --device cuda without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from common.errors import UsageError, cli_main
from finetune.data.transforms import DeviceNormalizer

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------
def load_model(path: str, device: torch.device, trusted: bool = False):
    """model.pt, or a file written by `python -m finetune.export` (.onnx / .pt2, told apart by extension, else
    by content) -> (model in eval mode, classes, preprocess spec). model.pt: the architecture it names (train.py
    --arch), built without weights, its head sized to the classes, on `device`. An exported file runs with its
    own runtime on the CPU (onnxruntime / torch.export; a .pt2 only when `trusted`); classes and preprocessing
    come from its metadata."""
    from finetune.exported import Exported, detect_format
    from finetune.model import load_trained
    if os.path.isfile(path) and detect_format(path) != "model.pt":
        exported = Exported(path, trusted)
        return exported, list(exported.meta["classes"]), dict(exported.meta["preprocess"])
    model, saved = load_trained(path, flag="--model")
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, list(saved["classes"]), dict(saved["preprocess"])


# ------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------
def find_images(paths: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given; folders recursively (sorted) by extension. Returns (images, [(path, problem)])."""
    images, problems = [], []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not found:
                problems.append((p, f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder"))
            images += found
        elif path.exists():
            images.append(path)           # read_image refuses a FIFO or device with its kind, never blocking
        else:
            problems.append((p, "no such file or folder"))
    return images, problems


def read_image(path: Path) -> torch.Tensor:
    """Any common image file -> uint8 RGB [3, H, W], read the way data_prep reads it (data_prep.images):
    only a regular file, the same pixel limit (checked from the header, before decoding), high-bit-depth
    images scaled to 8 bits and transparency composited onto white. An 8-bit JPEG is decoded by torchvision's
    decode_jpeg, as train.py decodes the shards' JPEGs. Raises ValueError with a short reason when the file
    cannot be used."""
    import numpy as np
    from torchvision.io import ImageReadMode, decode_jpeg

    from data_prep.images import open_image, read_regular_file, to_rgb
    data = read_regular_file(path)
    if not data:
        raise ValueError("empty file")
    check_decode_memory(data)
    im = open_image(data)                           # ImageRejected (a ValueError): not an image, too large...
    if im.format == "JPEG" and im.mode in ("RGB", "L"):
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass                                    # libjpeg refuses what Pillow read: use Pillow's pixels
    arr = np.asarray(to_rgb(im))                    # an animated GIF: its first frame
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# Peak bytes per pixel that read_image holds while decoding an image of each Pillow mode: Pillow's buffer,
# to_rgb's 8-bit RGB copy, the numpy and torch copies; one-channel high-bit-depth modes also pass through
# float64 temporaries in data_prep.images. Measured (peak RSS, 3000 x 3000 PNG / TIFF): L 12.4, RGB 17.4,
# RGBA 18.4, I;16 30.1, F 36.4; rounded up here. The 13000 x 13000 16-bit PNG of issue 20 peaked at 5.4 GB.
_BYTES_PER_PIXEL = {13: ("1", "L", "P"), 31: ("I;16", "I;16L", "I;16B", "I;16N"), 37: ("I", "F")}
DECODE_BYTES_PER_PIXEL = {mode: cost for cost, modes in _BYTES_PER_PIXEL.items() for mode in modes}
MULTI_CHANNEL_COST = 19        # every other mode (RGB, RGBA, LA, CMYK, YCbCr...): 4 bytes a pixel in Pillow


def decode_memory_limit() -> int:
    """What the largest image data_prep's pixel limit lets through costs as 8-bit RGB: no image may cost more."""
    from data_prep.images import MAX_PIXELS
    return MAX_PIXELS * MULTI_CHANNEL_COST


def check_decode_memory(data: bytes) -> None:
    """Refuse (ValueError, one line) an image whose decoding would hold more than decode_memory_limit() bytes:
    the size and mode come from the header alone (Image.open reads no pixel), so nothing big is allocated."""
    import io
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():      # Pillow's warning above 89 MP: this check and open_image decide
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                (width, height), mode = im.size, im.mode
    except Exception:  # noqa: BLE001 -- not an image, a bomb Pillow refuses...: open_image says which
        return
    from data_prep.images import MAX_PIXELS
    need, limit = width * height * DECODE_BYTES_PER_PIXEL.get(mode, MULTI_CHANNEL_COST), decode_memory_limit()
    if need > limit and width * height <= MAX_PIXELS:         # over the pixel limit: open_image says so
        raise ValueError(f"image too large to decode: {width} x {height} in mode {mode} would take about "
                         f"{need / 2**30:.1f} GiB (the limit is {limit / 2**30:.1f} GiB, an 8-bit RGB image at "
                         f"the pixel limit); downsize it or convert it to 8 bits first")


def preprocess(img: torch.Tensor, spec: dict) -> torch.Tensor:
    """uint8 [3, H, W] -> the eval crop, still uint8: exactly train.py's evaluation transform."""
    from finetune.data.transforms import eval_transform
    return eval_transform(img, spec)


# ------------------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------------------
def batches(images: list[Path], spec: dict, batch_size: int, on_error):
    """Yields (paths, uint8 batch); unreadable files go to on_error(path, reason) and are left out."""
    paths, tensors = [], []
    for path in images:
        try:
            tensors.append(preprocess(read_image(path), spec))
            paths.append(path)
        except (OSError, ValueError) as e:
            on_error(str(path), e.strerror if isinstance(e, OSError) and e.strerror else str(e))
        if len(tensors) == batch_size:
            yield paths, torch.stack(tensors)
            paths, tensors = [], []
    if tensors:
        yield paths, torch.stack(tensors)


@torch.inference_mode()
def predict(model, normalize: DeviceNormalizer, classes: list[str], images: list[Path], spec: dict, batch_size: int,
            top_k: int, on_error, tta: str = "none"):
    """Yields (path, [(label, probability)] * top_k) per readable image, in input order. tta="flip": the
    probabilities are the mean of the image's and its mirror's (train.py --tta flip)."""
    k = min(top_k, len(classes))
    for paths, batch in batches(images, spec, batch_size, on_error):
        x = normalize(batch)[0]
        probs = torch.softmax(model(x).float(), dim=1)
        if tta == "flip":
            probs = (probs + torch.softmax(model(x.flip(3)).float(), dim=1)) / 2
        probs = probs.cpu()
        values, indices = probs.topk(k, dim=1)
        for path, vals, idxs in zip(paths, values.tolist(), indices.tolist()):
            yield path, [(classes[i], v) for i, v in zip(idxs, vals)]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU visible here (use --device cpu or auto)")
    return torch.device(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0],
                                epilog="Exit codes: 0 all labelled, 1 some images unreadable (the rest labelled), "
                                       "2 usage error.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    p.add_argument("--model", required=True,
                   help="a run's model.pt (written by train.py), or its model.onnx / model.pt2 (finetune.export)")
    p.add_argument("--trust-model", action="store_true",
                   help="allow a .pt2 --model: loading one (torch.export.load) can run code stored in the file, "
                        "so only for a file you exported yourself")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--top-k", type=int, default=1, help="print the K most likely labels (default: 1)")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="flip: average each image's and its mirror's probabilities (default: none)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of tab-separated")
    p.add_argument("--score", action="store_true",
                   help="when an image's folder is named like a class (d2l layout: .../hotdog/x.jpg), print "
                        "the accuracy against those folder names to stderr at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main("predict.py", lambda: label_images(build_parser().parse_args(argv)))


def label_images(args) -> int:
    if args.batch_size < 1 or args.top_k < 1:
        raise UsageError("--batch-size and --top-k must be >= 1")
    failures: list[tuple[str, str]] = []

    def on_error(path: str, reason: str):
        failures.append((path, reason))
        print(f"predict.py: cannot read {path}: {reason}", file=sys.stderr, flush=True)

    device = pick_device(args.device)
    model, classes, spec = load_model(args.model, device, args.trust_model)
    if not isinstance(model, torch.nn.Module):
        device = torch.device("cpu")     # an exported file (finetune.export) runs on the CPU
    images, problems = find_images(args.paths)
    for path, reason in problems:
        on_error(path, reason)
    if not images:
        raise UsageError("no images found in " + " ".join(args.paths))

    # The run's own normalisation (model.pt records mean/std); channels_last where it pays, on the GPU.
    normalize = DeviceNormalizer(device, device.type == "cuda", mean=spec["mean"], std=spec["std"])
    labelled = correct = scored = 0
    for path, top in predict(model, normalize, classes, images, spec, args.batch_size, args.top_k, on_error,
                             args.tta):
        labelled += 1
        if args.json:
            print(json.dumps(dict(path=str(path), label=top[0][0], probability=round(top[0][1], 6),
                                  top=[dict(label=lab, probability=round(p, 6)) for lab, p in top])), flush=False)
        else:
            print(str(path) + "".join(f"\t{lab}\t{p:.4f}" for lab, p in top))
        if args.score and path.parent.name in classes:
            scored += 1
            correct += top[0][0] == path.parent.name
    sys.stdout.flush()
    summary = f"predict.py: labelled {labelled} image(s) on {device}"
    if failures:
        summary += f"; {len(failures)} could not be read"
    if args.score:
        summary += (f"; accuracy against folder names {correct}/{scored} = {correct / scored:.3f}" if scored else
                    "; --score: no image sits in a folder named like a class")
    print(summary, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
