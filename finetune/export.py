"""Export a finished run's model.pt to one self-contained file, then prove that the file alone reproduces it.

    python -m finetune.export runs/hotdog-resnet18 --format onnx             # -> RUN_DIR/model.onnx
    python -m finetune.export runs/hotdog-resnet18 --format pt2              # -> RUN_DIR/model.pt2 (torch.export)
    python -m finetune.export runs/hotdog-resnet18 --format onnx --ema       # the EMA weights (--ema-decay)
    python -m finetune.export runs/hotdog-resnet18 --format onnx --check-only   # re-check an existing file

Both formats come from the pinned torch's supported exporters: ONNX from `torch.onnx.export(dynamo=True)`
(needs onnxscript), .pt2 an ExportedProgram from `torch.export.export` + `torch.export.save` (TorchScript,
torch.jit.trace/save/load, is deprecated in torch 2.14 and no longer written). The file maps float32 images
[N, 3, H, W] (H, W: the crop; any N), normalised with the embedded mean/std, to logits [N, classes].
Embedded, each value JSON (ONNX: metadata_props; .pt2: the extra file 'metadata.json'): classes, preprocess
(resize, crop, interpolation, mean, std: model.pt's), arch, weights ("raw" or "ema"), tta (what the run
evaluated with) and test_acc. `python predict.py --model FILE` reads them. Loading a .pt2 can run code from
the file (torch.export.load unpickles parts of it), so it is loaded only when trusted: the file this command
just wrote, or --trust-model.

Parity check: the run's test shards (config.yaml's --data, or --data DIR; --eval-limit as in the run) are cut
into uint8 crops with finetune.data's EvalStream and the EMBEDDED preprocessing, normalised with the embedded
mean/std in numpy and scored by the exported file alone (onnxruntime / torch.export.load). It passes when the
accuracy equals metrics.json's final (chosen) test accuracy for those weights and every probability is within
1e-4 of model.pt's (the PyTorch model, same crops). The new file is written under a temporary name and only
renamed to model.onnx / model.pt2 when it passes. Exit codes: 0 written (or checked) and parity holds; 1 parity
failed (one line saying how; no file written, and --check-only leaves the file alone); 2 usage error (no
finished run or test shards, a damaged model.pt / config.yaml / metrics.json field, an architecture the format
cannot export, --ema without EMA weights).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.extras import check, require
from common.fsutil import new_temp_file

from . import UsageError, cli_main

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
META_FILE = "metadata.json"                          # the .pt2's extra file (torch.export.save extra_files)
META_KEYS = ("classes", "preprocess", "arch", "weights", "tta", "test_acc")
ATOL = 1e-4                                          # probabilities: exported vs model.pt
TRUST_HINT = ("loading a .pt2 runs torch.export.load, which can run code stored in the file: pass --trust-model "
              "only for a file you exported yourself, or use the run's model.onnx")


# ------------------------------------------------------------------------------------------------------
# Reading an exported file: its own runtime only (no project model code)
# ------------------------------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """'onnx', 'pt2', 'torchscript' or 'model.pt' (torch.save), by extension first, then by content: .pt2,
    TorchScript and torch.save files are all zip archives; a .pt2 holds archive_format, TorchScript code/."""
    suffix = Path(path).suffix.lower()
    if suffix in (".onnx", ".pt2"):
        return suffix[1:]
    if suffix in (".ts", ".torchscript"):
        return "torchscript"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("/archive_format") for n in names):
            return "pt2"
        return "torchscript" if any(n.endswith("/constants.pkl") or "/code/" in n for n in names) else "model.pt"
    try:                                              # an ONNX protobuf without the .onnx name?
        import onnx
        # protobuf parses almost anything (an empty file too): an ONNX model must have graph nodes
        return "onnx" if len(onnx.load(str(path), load_external_data=False).graph.node) else "model.pt"
    except Exception:  # noqa: BLE001 -- not ONNX either: let the model.pt reader say what is wrong
        return "model.pt"


def meta_problem(meta: dict) -> str | None:
    """The first problem with embedded metadata (the same checks as model.pt's fields), or None."""
    from .model import finite_number, classes_problem, preprocess_problem
    missing = [k for k in ("classes", "preprocess") if k not in meta]
    if missing:
        return f"missing {', '.join(missing)}"
    problem = classes_problem(meta["classes"]) or preprocess_problem(meta["preprocess"])
    if problem:
        return problem
    for key, ok in (("arch", lambda v: isinstance(v, str)), ("weights", lambda v: v in ("raw", "ema")),
                    ("tta", lambda v: v in ("none", "flip")),
                    ("test_acc", lambda v: v is None or (finite_number(v) and 0 <= v <= 1))):
        if key in meta and not ok(meta[key]):
            return f"{key}: unexpected value {meta[key]!r:.60}"
    return None


class Exported:
    """An exported model file, run with onnxruntime or torch.export only. `meta` holds the embedded metadata;
    run(np float32 normalised) -> np logits; calling it with a torch tensor does the same (for predict.py).
    trusted=False refuses a .pt2 (loading one can run code from it)."""

    def __init__(self, path: str | os.PathLike, trusted: bool = False):
        self.path, self.format = str(path), detect_format(path)
        if self.format == "torchscript":
            raise UsageError(f"{path}: a TorchScript file; torch deprecates TorchScript and finetune.export now "
                             f"writes .onnx or .pt2: re-export the run with --format onnx or pt2")
        if self.format == "pt2" and not trusted:
            raise UsageError(f"{path}: {TRUST_HINT}")
        try:
            raw = self._load_onnx() if self.format == "onnx" else self._load_pt2()
        except UsageError:                            # a missing optional package: its own line
            raise
        except Exception as e:  # noqa: BLE001 -- any runtime's load failure: one line
            raise UsageError(f"{path}: not a loadable {self.format} model ({type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0][:120]})") from None
        self.meta = {}
        for key in META_KEYS:
            try:
                if key in raw:
                    self.meta[key] = json.loads(raw[key])
            except (TypeError, ValueError):
                raise UsageError(f"{path}: embedded metadata {key} is not JSON") from None
        problem = meta_problem(self.meta)
        if problem:
            raise UsageError(f"{path}: {self.format} file without usable finetune.export metadata ({problem})")

    def _load_onnx(self) -> dict:
        ort = require("onnxruntime", f"{self.path}: an ONNX model")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        return self.session.get_modelmeta().custom_metadata_map

    def _load_pt2(self) -> dict:
        if self.format != "pt2":
            raise ValueError("not an exported model (a model.pt? use it directly)")
        import io
        extra = {META_FILE: ""}
        # From memory: torch.export.load wants a name ending in .pt2 (a temporary or disguised file has none).
        self.module = torch.export.load(io.BytesIO(Path(self.path).read_bytes()), extra_files=extra).module()
        meta = json.loads(extra[META_FILE] or "{}")
        return {k: json.dumps(v) for k, v in meta.items()} if isinstance(meta, dict) else {}

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
    architecture the format cannot express) becomes a one-line UsageError. No warning is silenced: the
    exporters used here emit none for the architectures tested, so any that appears is news."""
    crop = meta["preprocess"]["crop"]
    h, w = (crop, crop) if isinstance(crop, int) else crop
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    # Any batch size: example batch 2, so that the exporter does not specialise the batch dimension to 1.
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)
    try:
        with torch.no_grad():
            data = (_onnx_bytes if fmt == "onnx" else _pt2_bytes)(model, example, dynamic, meta)
    except ImportError as e:
        raise UsageError(f"--format {fmt}: needs the optional package {e.name or e} (pip install onnx onnxscript "
                         f"onnxruntime: the project's export extra)") from None
    except Exception as e:  # noqa: BLE001 -- the exporters raise many kinds; the user needs the first line
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UsageError(f"--format {fmt}: --arch {meta['arch']} cannot be exported to {fmt} "
                         f"({type(e).__name__}: {first}); try the other --format") from None
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _onnx_bytes(model, example, dynamic, meta: dict) -> bytes:
    """torch.onnx.export(dynamo=True): torch.export's graph translated by onnxscript, the exporter torch
    supports (the TorchScript-based one, dynamo=False, is deprecated). verbose=False: no progress lines."""
    import onnxscript  # noqa: F401 -- the dynamo exporter needs it: fail early with the package's name
    program = torch.onnx.export(model, (example,), None, dynamo=True, verbose=False, input_names=["images"],
                                output_names=["logits"], dynamic_shapes=dynamic)
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return proto.SerializeToString()


def _pt2_bytes(model, example, dynamic, meta: dict) -> bytes:
    """An ExportedProgram (torch.export), saved with the metadata as an extra file."""
    import io
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={META_FILE: json.dumps(meta)})
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
    from .staging import staged_or_local
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {run_dir}: no such folder (train.py's --output-dir/--name)")
    model, saved = load_trained(str(run_dir / "model.pt"), flag="RUN_DIR", ema=ema)
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UsageError(f"RUN_DIR {run_dir}: cannot read config.yaml / metrics.json ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:100]}); is it a finished train.py run?") from None
    eval_limit, tta, precision, expected = run_fields(run_dir, cfg, metrics, "ema_test_acc" if ema else "test_acc")
    manifest = load_manifest(data or staged_or_local(cfg.get("data", ""), cfg.get("cache_dir")))
    return Run(model, saved, manifest.test, eval_limit, tta, precision, expected)


def run_fields(run_dir: Path, cfg, metrics, key: str) -> tuple[int, str, str, float]:
    """config.yaml's eval_limit, tta, precision (and data's type) and metrics.json's final[key], each checked
    before use: a damaged field is one line naming the file and the field."""
    from .model import finite_number

    def bad(where: str, expected: str, value) -> UsageError:
        return UsageError(f"RUN_DIR {run_dir}: {where} should be {expected}, found {value!r:.60}; "
                          f"is it a finished train.py run?")
    if not isinstance(cfg, dict):
        raise bad("config.yaml", "a mapping of train.py's settings", cfg)
    final = metrics.get("final") if isinstance(metrics, dict) else None
    if not isinstance(final, dict) or final.get(key) is None:
        raise UsageError(f"RUN_DIR {run_dir}: metrics.json has no final {key} to check against")
    checks = (("config.yaml field eval_limit", "an integer >= 0",
               lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0), "eval_limit"),
              ("config.yaml field tta", "none or flip", lambda v: v in (None, "none", "flip"), "tta"),
              ("config.yaml field precision", "a name (no, bf16, fp16...)", lambda v: isinstance(v, str), "precision"),
              ("config.yaml field data", "a folder or URL", lambda v: isinstance(v, str), "data"))
    for where, expected, ok, field in checks:
        if field in cfg and not ok(cfg[field]):
            raise bad(where, expected, cfg[field])
    if not (finite_number(final[key]) and 0 <= final[key] <= 1):
        raise bad(f"metrics.json field final.{key}", "an accuracy between 0 and 1", final[key])
    return int(cfg.get("eval_limit") or 0), str(cfg.get("tta") or "none"), str(cfg.get("precision", "no")), \
        float(final[key])


def parity(path: Path, run: Run, trusted: bool, batch: int = 32) -> tuple[str | None, str]:
    """Score the test shards with the file at `path` alone and with model.pt. Returns (problem or None, a
    summary of what was compared). trusted: see Exported."""
    from .data import EvalStream
    exported = Exported(path, trusted)
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
                   help="onnx (RUN_DIR/model.onnx, torch.onnx.export dynamo=True) or pt2 (RUN_DIR/model.pt2, "
                        "a torch.export ExportedProgram)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (the run needs --ema-decay)")
    p.add_argument("--data", default=None, help="the run's shard folder, if it moved (default: config.yaml's --data)")
    p.add_argument("--check-only", action="store_true",
                   help="do not export: re-run the parity check on RUN_DIR's existing model.onnx / model.pt2")
    p.add_argument("--trust-model", action="store_true",
                   help="--check-only of a model.pt2: load it although loading a .pt2 can run code from the file")
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
    path = target if args.check_only else new_temp_file(target)    # exclusive: never a planted link
    try:
        if not args.check_only:
            export(run.model, metadata(run.saved, args.ema, run.expected_acc, run.tta), path, args.format)
        # The file just written is ours; an existing one (--check-only) is loaded as trusted only when asked.
        problem, summary = parity(path, run, trusted=args.trust_model or not args.check_only)
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
