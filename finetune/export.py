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
into uint8 crops with finetune.data.streams' EvalStream and the EMBEDDED preprocessing, normalised with the embedded
mean/std in numpy and scored by the exported file alone (onnxruntime / torch.export.load). It passes when the
accuracy equals metrics.json's final (chosen) test accuracy for those weights and every probability is within
1e-4 of model.pt's (the PyTorch model, same crops). The new file is written under a temporary name and only
renamed to model.onnx / model.pt2 when it passes. Exit codes: 0 written (or checked) and parity holds; 1 parity
failed (one line saying how; no file written, and --check-only leaves the file alone); 2 usage error (no
finished run or test shards, a damaged model.pt / config.yaml / metrics.json field, an architecture the format
cannot export, --ema without EMA weights).

Here: writing the file (export, metadata), reading the run (load_run), the parity check and the command.
Reading an exported file back (Exported, detect_format; predict.py uses them too) is finetune/exported.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.extras import check
from common.fsutil import new_temp_file

from . import UsageError, cli_main
from .exported import META_FILE, Exported, exported_scores

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
ATOL = 1e-4                                          # probabilities: exported vs model.pt


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
# The run (model.pt, config.yaml's test shards, metrics.json's accuracy) and the parity check
# ------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    model: torch.nn.Module          # model.pt's weights (raw or EMA), CPU, eval mode
    saved: dict                     # model.pt
    test: object                    # finetune.data.manifest.Split of the run's test shards
    eval_limit: int
    tta: str
    precision: str
    expected_acc: float             # metrics.json final test_acc (or ema_test_acc)


def load_run(run_dir: Path, ema: bool, data: str | None) -> Run:
    import yaml

    from .data.manifest import load_manifest
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


@torch.inference_mode()
def reference_scores(model: torch.nn.Module, crops: torch.Tensor, spec: dict, tta: str):
    """exported_scores' (probabilities, predicted class) for the PyTorch model from model.pt, normalised
    exactly as train.py does."""
    from .data.transforms import DeviceNormalizer
    x = DeviceNormalizer(torch.device("cpu"), False, mean=spec["mean"], std=spec["std"])(crops)[0]
    logits = model(x).float()
    probs = logits.softmax(dim=1)
    if tta == "flip":
        probs = (probs + model(x.flip(3)).float().softmax(dim=1)) / 2
        return probs.numpy(), probs.argmax(dim=1).numpy()
    return probs.numpy(), logits.argmax(dim=1).numpy()


def parity(path: Path, run: Run, trusted: bool, batch: int = 32) -> tuple[str | None, str]:
    """Score the test shards with the file at `path` alone and with model.pt. Returns (problem or None, a
    summary of what was compared). trusted: see Exported."""
    from .data.streams import EvalStream
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
