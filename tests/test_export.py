"""python -m finetune.export on a real (tiny) train.py run: both formats pass the parity check, embed classes and
preprocessing, the EMA weights export when asked, tampering (metadata, outputs, metrics) fails the check with
exit 1, an exporter failure is one line with exit 2, and predict.py gives model.pt's answers from the file."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from conftest import PYTHON, REPO, TINY, load_model_pt, run_train
from finetune import export as fexport
from finetune.model import load_trained


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory):
    """3 optimizer steps with --ema-decay, so that the EMA weights differ from the raw ones."""
    out = tmp_path_factory.mktemp("export") / "run"
    run_train(["--data", shards, "--output-dir", out, "--pretrained", "none", "--epochs", "1",
               "--max-steps-per-epoch", "3", "--ema-decay", "0.5", *TINY], timeout=900)
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A private copy of the run (model.pt, config.yaml, metrics.json) that a test may tamper with."""
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("model.pt", "config.yaml", "metrics.json"):
        shutil.copy(run_dir / name, copy / name)
    return copy


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.floor
def test_export_passes_parity_and_embeds_metadata(run_dir, fmt, capsys):
    assert fexport.main([str(run_dir), "--format", fmt]) == 0
    out = capsys.readouterr().out
    target = run_dir / fexport.FORMATS[fmt]
    assert target.is_file() and not list(run_dir.glob(".model.*tmp*"))
    assert "parity on 13 test images" in out
    saved = load_model_pt(run_dir)
    meta = fexport.Exported(target).meta
    assert meta["classes"] == saved["classes"] and meta["preprocess"] == saved["preprocess"]
    assert meta["arch"] == "resnet18" and meta["weights"] == "raw"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert meta["test_acc"] == metrics["final"]["test_acc"]
    # The file alone (no project code) gives model.pt's logits.
    model, _ = load_trained(str(run_dir / "model.pt"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert np.allclose(fexport.Exported(target).run(x.numpy()), model(x).numpy(), atol=1e-4)


def test_ema_export_ships_the_ema_weights(run_dir, capsys):
    assert fexport.main([str(run_dir), "--format", "onnx", "--ema"]) == 0
    raw, _ = load_trained(str(run_dir / "model.pt"))
    ema, _ = load_trained(str(run_dir / "model.pt"), ema=True)
    exported = fexport.Exported(run_dir / "model.onnx")
    assert exported.meta["weights"] == "ema"
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got, want, other = exported.run(x.numpy()), ema(x).numpy(), raw(x).numpy()
    assert np.allclose(got, want, atol=1e-4)
    assert not np.allclose(want, other, atol=1e-3)          # the EMA really is other weights
    fexport.main([str(run_dir), "--format", "onnx"])         # leave the raw export for the other tests


def test_ema_without_ema_weights_is_one_line_exit_2(run_copy, capsys):
    saved = torch.load(run_copy / "model.pt", weights_only=True)
    torch.save({**saved, "ema_state_dict": None}, run_copy / "model.pt")
    assert fexport.main([str(run_copy), "--format", "onnx", "--ema"]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "--ema" in lines[0] and "--ema-decay" in lines[0]


def test_tampered_mean_in_onnx_metadata_fails_parity(run_copy, capsys):
    import onnx
    assert fexport.main([str(run_copy), "--format", "onnx"]) == 0
    assert fexport.main([str(run_copy), "--format", "onnx", "--check-only"]) == 0
    path = run_copy / "model.onnx"
    proto = onnx.load(str(path))
    entry = next(p for p in proto.metadata_props if p.key == "preprocess")
    spec = json.loads(entry.value)
    spec["mean"] = [m + 0.05 for m in spec["mean"]]
    entry.value = json.dumps(spec)
    onnx.save(proto, str(path))
    capsys.readouterr()
    assert fexport.main([str(run_copy), "--format", "onnx", "--check-only"]) == 1
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "FAILED" in lines[0] and "probabilities differ" in lines[0]
    assert path.is_file()                                    # --check-only leaves the file alone


def test_wrong_torchscript_output_fails_and_writes_nothing(run_copy, monkeypatch, capsys):
    real_run = fexport.Exported.run
    monkeypatch.setattr(fexport.Exported, "run", lambda self, x: real_run(self, x) + np.array([0.0, 0.01], "f4"))
    assert fexport.main([str(run_copy), "--format", "torchscript"]) == 1
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "FAILED" in lines[0] and "nothing written" in lines[0]
    assert not (run_copy / "model.ts").exists() and not list(run_copy.glob(".model.*"))


def test_accuracy_that_differs_from_metrics_json_fails(run_copy, capsys):
    metrics = json.loads((run_copy / "metrics.json").read_text())
    acc = metrics["final"]["test_acc"]
    metrics["final"]["test_acc"] = acc + 1 / 13 if acc < 0.5 else acc - 1 / 13     # one image more/less right
    (run_copy / "metrics.json").write_text(json.dumps(metrics))
    assert fexport.main([str(run_copy), "--format", "onnx"]) == 1
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "metrics.json says" in lines[0] and "model.pt itself scores" in lines[0]


def test_exporter_failure_is_one_line_exit_2(run_copy, monkeypatch, capsys):
    def unsupported(*a, **k):
        raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX opset version 17 is not supported.\nmore")
    monkeypatch.setattr(torch.onnx, "export", unsupported)
    assert fexport.main([str(run_copy), "--format", "onnx"]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("finetune.export: error: --format onnx: --arch resnet18 cannot")
    assert "aten::fancy" in lines[0]
    assert not list(run_copy.glob("*.onnx")) and not list(run_copy.glob(".model.*"))


def test_cli_unknown_format_exits_2(run_dir):
    proc = subprocess.run([PYTHON, "-m", "finetune.export", str(run_dir), "--format", "tflite"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def _photos(root):
    files = []
    for i, size in enumerate([(48, 40), (200, 90), (33, 61)]):
        g = torch.Generator().manual_seed(i)
        arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / f"{i}.png")
        files.append(root / f"{i}.png")
    return files


def _predict_json(capsys, model: str, root, *extra) -> dict:
    assert predict.main(["--model", model, "--json", "--top-k", "2", str(root), *extra]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    return {r["path"]: r for r in rows}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.floor
def test_predict_on_exported_file_matches_model_pt(run_dir, fmt, tmp_path, capsys):
    target = run_dir / fexport.FORMATS[fmt]
    if not target.exists():
        assert fexport.main([str(run_dir), "--format", fmt]) == 0
    root = tmp_path / "photos"
    _photos(root)
    disguised = tmp_path / "model.bin"                      # told apart by content, not only by extension
    shutil.copy(target, disguised)
    for tta in ([], ["--tta", "flip"]):
        want = _predict_json(capsys, str(run_dir / "model.pt"), root, *tta)
        for model in (str(target), str(disguised)):
            got = _predict_json(capsys, model, root, *tta)
            assert got.keys() == want.keys()
            for path, row in got.items():
                assert row["label"] == want[path]["label"]
                for a, b in zip(row["top"], want[path]["top"]):
                    assert a["label"] == b["label"] and a["probability"] == pytest.approx(b["probability"], abs=1e-4)
