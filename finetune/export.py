"""Export a finished run's model.pt to one self-contained file, then prove that the file alone reproduces it.

    python -m finetune.export runs/hotdog-resnet18 --format onnx             # -> RUN_DIR/model.onnx
    python -m finetune.export runs/hotdog-resnet18 --format torchscript      # -> RUN_DIR/model.ts
    python -m finetune.export runs/hotdog-resnet18 --format onnx --ema       # the EMA weights (--ema-decay)
    python -m finetune.export runs/hotdog-resnet18 --format onnx --check-only   # re-check an existing file

The file maps float32 images [N, 3, H, W], normalised with the embedded mean/std, to logits [N, classes]
(any N). Embedded, each value JSON (ONNX: metadata_props; TorchScript: the _extra_files entry 'metadata.json'):
classes, preprocess (resize, crop, interpolation, mean, std: model.pt's), arch, weights ("raw" or "ema"), tta
(what the run evaluated with) and test_acc. `python predict.py --model FILE` reads them.

Parity check: the run's test shards (config.yaml's --data, or --data DIR; --eval-limit as in the run) are cut
into uint8 crops with finetune.data's EvalStream and the EMBEDDED preprocessing, normalised with the embedded
mean/std in numpy and scored by the exported file alone (onnxruntime / torch.jit.load). It passes when the
accuracy equals metrics.json's final (chosen) test accuracy for those weights and every probability is within
1e-4 of model.pt's (the PyTorch model, same crops). The new file is written under a temporary name and only
renamed to model.onnx / model.ts when it passes. Exit codes: 0 written (or checked) and parity holds; 1 parity
failed (one line saying how; no file written, and --check-only leaves the file alone); 2 usage error (no
finished run or test shards, an architecture the format cannot export, --ema without EMA weights).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.extras import check, require

from . import UsageError, cli_main

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
META_FILE = "metadata.json"                          # TorchScript _extra_files entry
META_KEYS = ("classes", "preprocess", "arch", "weights", "tta", "test_acc")
ATOL = 1e-4                                          # probabilities: exported vs model.pt


# ------------------------------------------------------------------------------------------------------
# Reading an exported file: its own runtime only (no project model code)
# ------------------------------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """'onnx', 'torchscript' or 'model.pt' (torch.save), by extension first, then by content: TorchScript
    and torch.save files are both zip archives, but only TorchScript ones hold code/ and constants.pkl."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".ts", ".torchscript"):
        return "torchscript"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        return "torchscript" if any(n.endswith("/constants.pkl") or "/code/" in n for n in names) else "model.pt"
    try:                                              # an ONNX protobuf without the .onnx name?
        import onnx
        # protobuf parses almost anything (an empty file too): an ONNX model must have graph nodes
        return "onnx" if len(onnx.load(str(path), load_external_data=False).graph.node) else "model.pt"
    except Exception:  # noqa: BLE001 -- not ONNX either: let the model.pt reader say what is wrong
        return "model.pt"


class Exported:
    """An exported model file, run with onnxruntime or torch.jit only. `meta` holds the embedded metadata;
    run(np float32 normalised) -> np logits; calling it with a torch tensor does the same (for predict.py)."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.format = str(path), detect_format(path)
        try:
            if self.format == "onnx":
                ort = require("onnxruntime", f"{path}: an ONNX model")
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
                self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
                raw = self.session.get_modelmeta().custom_metadata_map
            elif self.format == "torchscript":
                extra = {META_FILE: ""}
                with warnings.catch_warnings():      # torch.jit.load's deprecation notice, on every load
                    warnings.simplefilter("ignore", FutureWarning)
                    self.module = torch.jit.load(self.path, map_location="cpu", _extra_files=extra).eval()
                raw = json.loads(extra[META_FILE] or "{}")
                raw = {k: json.dumps(v) for k, v in raw.items()}
            else:
                raise ValueError("not an exported model (a model.pt? use it directly)")
            self.meta = {k: json.loads(raw[k]) for k in META_KEYS if k in raw}
        except UsageError:                            # a missing optional package: its own line
            raise
        except Exception as e:  # noqa: BLE001 -- any runtime's load failure: one line
            raise UsageError(f"{path}: not a loadable {self.format} model ({type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0][:120]})") from None
        missing = [k for k in ("classes", "preprocess") if k not in self.meta]
        if missing:
            raise UsageError(f"{path}: {self.format} file without the metadata finetune.export embeds "
                             f"(missing {', '.join(missing)})")

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.format == "onnx":
            return self.session.run(None, {"images": np.ascontiguousarray(x, dtype=np.float32)})[0]
        with torch.inference_mode():
            return self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.detach().float().cpu().numpy()))


def normalize(crops: torch.Tensor, spec: dict) -> np.ndarray:
    """uint8 crops [N, 3, H, W] -> float32, (x - 255 mean) / (255 std): plain numpy, as a user would."""
    shift = np.asarray(spec["mean"], dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255)
    scale = np.asarray(spec["std"], dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255)
    return (crops.numpy().astype(np.float32) - shift) / scale


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def exported_scores(model: Exported, crops: torch.Tensor, tta: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, predicted class) as train.py's evaluation computes them (--tta flip: mean of the image's
    and its mirror's probabilities), from the exported file and its embedded mean/std only."""
    x = normalize(crops, model.meta["preprocess"])
    logits = model.run(x).astype(np.float32)
    probs = softmax(logits)
    if tta == "flip":
        probs = (probs + softmax(model.run(x[..., ::-1]).astype(np.float32))) / 2
        return probs, probs.argmax(axis=1)
    return probs, logits.argmax(axis=1)


@torch.inference_mode()
def reference_scores(model: torch.nn.Module, crops: torch.Tensor, spec: dict, tta: str):
    """The same for the PyTorch model from model.pt, normalised exactly as train.py does."""
    from .data import DeviceNormalizer
    x = DeviceNormalizer(torch.device("cpu"), False, mean=spec["mean"], std=spec["std"])(crops)[0]
    logits = model(x).float()
    probs = logits.softmax(dim=1)
    if tta == "flip":
        probs = (probs + model(x.flip(3)).float().softmax(dim=1)) / 2
        return probs.numpy(), probs.argmax(dim=1).numpy()
    return probs.numpy(), logits.argmax(dim=1).numpy()


# ------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------
def metadata(saved: dict, ema: bool, test_acc: float, tta: str) -> dict:
    return dict(classes=list(saved["classes"]), preprocess=dict(saved["preprocess"]),
                arch=str(saved.get("arch", "resnet18")), weights="ema" if ema else "raw", tta=tta, test_acc=test_acc)


def export(model: torch.nn.Module, meta: dict, path: Path, fmt: str) -> None:
    """Write `model` (CPU, eval mode) with `meta` embedded to `path` (fsynced). An exporter failure (an
    architecture the format cannot express) becomes a one-line UsageError."""
    crop = meta["preprocess"]["crop"]
    h, w = (crop, crop) if isinstance(crop, int) else crop
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            data = _onnx_bytes(model, example, meta) if fmt == "onnx" else _torchscript_bytes(model, example, meta)
    except Exception as e:  # noqa: BLE001 -- the exporters raise many kinds; the user needs the first line
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UsageError(f"--format {fmt}: --arch {meta['arch']} cannot be exported to {fmt} "
                         f"({type(e).__name__}: {first}); try the other --format") from None
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _onnx_bytes(model, example, meta: dict) -> bytes:
    import io

    import onnx
    buf = io.BytesIO()
    # dynamo=False: the TorchScript-based exporter, which needs no onnxscript and takes every model trace does.
    torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    proto = onnx.load_model_from_string(buf.getvalue())
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return proto.SerializeToString()


def _torchscript_bytes(model, example, meta: dict) -> bytes:
    import io
    traced = torch.jit.trace(model, example, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={META_FILE: json.dumps(meta)})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------
# The run: model.pt, config.yaml's test shards, metrics.json's accuracy
# ------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    model: torch.nn.Module          # model.pt's weights (raw or EMA), CPU, eval mode
    saved: dict                     # model.pt
    test: object                    # finetune.data.Split of the run's test shards
    eval_limit: int
    tta: str
    precision: str
    expected_acc: float             # metrics.json final test_acc (or ema_test_acc)


def load_run(run_dir: Path, ema: bool, data: str | None) -> Run:
    import yaml

    from .data import load_manifest
    from .model import load_trained
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {run_dir}: no such folder (train.py's --output-dir/--name)")
    model, saved = load_trained(str(run_dir / "model.pt"), flag="RUN_DIR", ema=ema)
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        final = json.loads((run_dir / "metrics.json").read_text()).get("final") or {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UsageError(f"RUN_DIR {run_dir}: cannot read config.yaml / metrics.json ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:100]}); is it a finished train.py run?") from None
    key = "ema_test_acc" if ema else "test_acc"
    if final.get(key) is None:
        raise UsageError(f"RUN_DIR {run_dir}: metrics.json has no final {key} to check against")
    manifest = load_manifest(data or cfg.get("data", ""))
    return Run(model, saved, manifest.test, int(cfg.get("eval_limit") or 0), str(cfg.get("tta") or "none"),
               str(cfg.get("precision", "no")), float(final[key]))


def parity(path: Path, run: Run, batch: int = 32) -> tuple[str | None, str]:
    """Score the test shards with the file at `path` alone and with model.pt. Returns (problem or None, a
    summary of what was compared)."""
    from .data import EvalStream
    exported = Exported(path)
    if exported.meta["classes"] != list(run.saved["classes"]):
        return f"embedded classes {exported.meta['classes']} != model.pt's {run.saved['classes']}", ""
    ref_spec, exp_spec = run.saved["preprocess"], exported.meta["preprocess"]

    def stream(spec):
        return EvalStream(run.test, rank=0, world_size=1, batch=batch, preprocess=spec, limit=run.eval_limit)

    same_crops = all(ref_spec.get(k) == exp_spec.get(k) for k in ("resize", "crop", "interpolation"))
    n = correct = ref_correct = 0
    worst = 0.0
    for (crops, labels), ref in zip(stream(exp_spec), itertools.repeat(None) if same_crops else stream(ref_spec)):
        probs, predicted = exported_scores(exported, crops, run.tta)
        ref_probs, ref_predicted = reference_scores(run.model, crops if ref is None else ref[0], ref_spec, run.tta)
        worst = max(worst, float(np.abs(probs - ref_probs).max()))
        correct += int((predicted == labels.numpy()).sum())
        ref_correct += int((ref_predicted == labels.numpy()).sum())
        n += len(labels)
    expected = run.expected_acc
    summary = (f"parity on {n} test images: accuracy {correct}/{n} = {correct / max(n, 1):.4f}, "
               f"max |p - p_model.pt| = {worst:.1e}")
    if not n:
        return "no test images to score", summary
    if worst > ATOL:
        return f"probabilities differ from model.pt's by up to {worst:.2e} (> {ATOL:g}) on the test shards", summary
    if abs(correct / n - expected) > 1e-9:
        why = (f"; model.pt itself scores {ref_correct}/{n} here, so the run's figure came from other numerics "
               f"(--precision {run.precision}, its device)" if abs(ref_correct / n - expected) > 1e-9 else "")
        return f"test accuracy {correct}/{n} = {correct / n:.4f}, metrics.json says {expected:.4f}{why}", summary
    return None, summary


# ------------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune.export", description=__doc__.split("\n\n")[0],
                                epilog="Exit codes: 0 exported and parity holds, 1 parity failed, 2 usage error.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished train.py run (model.pt, config.yaml, metrics.json)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS),
                   help="onnx (RUN_DIR/model.onnx) or torchscript (RUN_DIR/model.ts)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (the run needs --ema-decay)")
    p.add_argument("--data", default=None, help="the run's shard folder, if it moved (default: config.yaml's --data)")
    p.add_argument("--check-only", action="store_true",
                   help="do not export: re-run the parity check on RUN_DIR's existing model.onnx / model.ts")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main("finetune.export", lambda: export_run(build_parser().parse_args(argv)))


def export_run(args) -> int:
    run_dir = Path(args.run_dir)
    for module in ("onnx", "onnxruntime", "onnxscript") if args.format == "onnx" else ():
        check(module, "--format onnx")               # before loading anything
    run = load_run(run_dir, args.ema, args.data)
    target = run_dir / FORMATS[args.format]
    if args.check_only and not target.is_file():
        raise UsageError(f"--check-only: {target} does not exist (export it first)")
    path = target if args.check_only else target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        if not args.check_only:
            export(run.model, metadata(run.saved, args.ema, run.expected_acc, run.tta), path, args.format)
        problem, summary = parity(path, run)
        if problem is None and not args.check_only:
            os.replace(path, target)
    finally:
        if not args.check_only:
            path.unlink(missing_ok=True)
    what = f"{target} ({args.format}, {'EMA' if args.ema else 'raw'} weights of {run.saved.get('arch')})"
    if problem:
        print(f"finetune.export: parity check FAILED for {what}: {problem}"
              + ("" if args.check_only else "; nothing written"), file=sys.stderr)
        return 1
    print(f"finetune.export: {'checked' if args.check_only else 'wrote'} {what}; {summary}, "
          f"= metrics.json's test accuracy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
