"""Classify images with a trained run's model.pt (or its export), using the run's own eval preprocessing.

    python predict.py --model runs/hotdog-resnet18/model.pt photo.jpg more/photos/
    python predict.py --model runs/hotdog-resnet18/model.pt --top-k 2 --json photos/ > predictions.jsonl
    python predict.py --model runs/hotdog-resnet18/model.pt --score ../shared/data/hotdog-mini/test
    python predict.py --model runs/hotdog-resnet18/model.onnx photo.jpg     # python -m finetune.export's file

Folders are searched recursively for .jpg .jpeg .png .bmp .gif .webp .tif .tiff (any case); files named on the
command line are tried whatever their extension. Output, one line per image, in input order:

    PATH<TAB>LABEL<TAB>PROBABILITY                      (--top-k K adds the next K-1 LABEL<TAB>PROBABILITY pairs)
    {"path": ..., "label": ..., "probability": ..., "top": [{"label": ..., "probability": ...}, ...]}   (--json)

The eval preprocessing is the one model.pt records (`preprocess`: resize to [H, W], centre crop, normalise with
mean/std), i.e. what train.py evaluated with; an exported model.onnx / model.ts carries the same spec in its
metadata and runs on the CPU with onnxruntime / torch.jit. Images are read as data_prep reads them
(data_prep.images: the same pixel limit, 16-bit and float images scaled to 8 bits, transparency onto white). An
image that cannot be read, or is over the pixel limit, is reported on stderr in one line naming the file, and
the others are still labelled. Exit codes: 0 every image labelled, 1 some could not be read (or a
path does not exist), 2 usage error (no/unloadable model file, no images found, --device cuda without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from finetune import UsageError, cli_main
from finetune.data import DeviceNormalizer

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------
def load_model(path: str, device: torch.device):
    """model.pt, or a file written by `python -m finetune.export` (.onnx / .ts, told apart by extension, else by
    content) -> (model in eval mode, classes, preprocess spec). model.pt: the architecture it names (train.py
    --arch), built without weights, its head sized to the classes, on `device`. An exported file runs with its
    own runtime on the CPU (onnxruntime / torch.jit); classes and preprocessing come from its metadata."""
    from finetune.export import Exported, detect_format
    from finetune.model import load_trained
    if os.path.isfile(path) and detect_format(path) != "model.pt":
        exported = Exported(path)
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
        elif path.is_file():
            images.append(path)
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
    im = open_image(data)                           # ImageRejected (a ValueError): not an image, too large...
    if im.format == "JPEG" and im.mode in ("RGB", "L"):
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass                                    # libjpeg refuses what Pillow read: use Pillow's pixels
    arr = np.asarray(to_rgb(im))                    # an animated GIF: its first frame
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def preprocess(img: torch.Tensor, spec: dict) -> torch.Tensor:
    """uint8 [3, H, W] -> the eval crop, still uint8: exactly train.py's evaluation transform."""
    from finetune.data import eval_transform
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
                   help="a run's model.pt (written by train.py), or its model.onnx / model.ts (finetune.export)")
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
    model, classes, spec = load_model(args.model, device)
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
