"""An exported model file (python -m finetune.export's .onnx / .pt2), read back with its own runtime only:
onnxruntime or torch.export, no project model code.

- detect_format tells the kinds of model file apart (by extension, then by content);
- Exported loads one, checks its embedded metadata (meta_problem: the same checks as model.pt's fields) and
  runs it on normalised float32 images; a .pt2 only when trusted (torch.export.load can run code from it);
- exported_scores scores uint8 crops with the file and its embedded mean/std alone, as a user would.
predict.py runs exported files through Exported; finetune.export's parity check does too.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from common.extras import require

from . import UsageError

META_FILE = "metadata.json"                          # the .pt2's extra file (torch.export.save extra_files)
META_KEYS = ("classes", "preprocess", "arch", "weights", "tta", "test_acc")
TRUST_HINT = ("loading a .pt2 runs torch.export.load, which can run code stored in the file: pass --trust-model "
              "only for a file you exported yourself, or use the run's model.onnx")


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

