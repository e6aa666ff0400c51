"""--recipe modern and its parts (issue #24): each test fails when its part is silently ignored -- the lr per
layer, no decay on norms/biases, the schedule, the smoothing in the loss, the mixup targets, the augmentation
policy, drop-path, the probe phase's frozen parameters, the epoch that sees every image -- and explicit flags
win over the recipe. One slow subprocess run resumes across LP-FT's phase boundary bitwise."""

from __future__ import annotations

import math
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, load_model_pt, read_json, run_train
from finetune import mixing, recipe
from finetune.config import Config, parse_config


def cfg_of(*flags: str) -> Config:
    return parse_config(["--data", "x", *flags])


class Tiny(nn.Module):
    """conv-bn stem, two 'layers', a Linear head: enough for layer ids, norms, biases and the probe phase."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.layer1(self.stem(x).relu()).mean((2, 3)))


# ------------------------------------------------------------------------------------------------------
# Recipe resolution
# ------------------------------------------------------------------------------------------------------
def test_d2l_is_unchanged_and_modern_sets_its_parts():
    d2l, modern = cfg_of(), cfg_of("--recipe", "modern", "--arch", "timm:tf_efficientnet_lite0")
    assert (d2l.optimizer, d2l.lr, d2l.batch_size, d2l.label_smoothing, d2l.layer_decay, d2l.epoch_steps,
            d2l.augment_policy, d2l.drop_path, d2l.schedule) == ("sgd", 5e-5, 128, 0.0, 1.0, "floor", "none", 0.0,
                                                                 "constant")
    for name, value in recipe.MODERN.items():
        assert getattr(modern, name) == value, name
    assert cfg_of("--recipe", "modern").drop_path == 0.0          # torchvision resnet18: no drop_path_rate


def test_explicit_flags_and_yaml_win_over_the_recipe(tmp_path):
    cfg = cfg_of("--recipe", "modern", "--lr", "1e-3", "--label-smoothing", "0", "--batch-size", "64",
                 "--optimizer", "sgd")
    assert (cfg.lr, cfg.label_smoothing, cfg.batch_size, cfg.optimizer) == (1e-3, 0.0, 64, "sgd")
    assert cfg.layer_decay == recipe.MODERN["layer_decay"]                  # the rest: the recipe's
    (tmp_path / "run.yaml").write_text("recipe: modern\nlayer_decay: 0.5\n")
    from_yaml = parse_config(["--config", str(tmp_path / "run.yaml"), "--data", "x"])
    assert (from_yaml.layer_decay, from_yaml.optimizer) == (0.5, "adamw")


def test_debug_still_makes_a_small_run_under_the_modern_recipe():
    assert cfg_of("--recipe", "modern", "--debug").batch_size == 8


# ------------------------------------------------------------------------------------------------------
# Parameter groups: lr per layer, no decay on norms and biases
# ------------------------------------------------------------------------------------------------------
def _group_of(optimizer, param) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_layer_decay_gives_each_layer_its_lr_and_norms_and_biases_no_decay():
    model = Tiny()
    cfg = cfg_of("--recipe", "modern")
    opt = recipe.build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    d, lr = cfg.layer_decay, cfg.lr
    # layers in module order: stem.0, stem.1, layer1.0, layer1.1 (4), the head above them
    expected = {"stem.0.weight": lr * d ** 3, "stem.1.weight": lr * d ** 2, "layer1.0.weight": lr * d,
                "layer1.1.weight": lr, "fc.weight": lr * cfg.head_lr_mult}
    params = dict(model.named_parameters())
    for name, want in expected.items():
        assert _group_of(opt, params[name])["lr"] == pytest.approx(want), name
    for name, p in params.items():
        exempt = name.endswith("bias") or ".1." in name          # BatchNorm weights and every bias
        assert _group_of(opt, p)["weight_decay"] == (0.0 if exempt else cfg.weight_decay), name


def test_timm_layers_come_from_its_group_matcher():
    from finetune import arch
    model = arch.create("timm:tf_efficientnet_lite0")
    ids, layers = recipe.layer_ids(model)
    assert layers == 18                     # stem, 16 blocks (the last one with conv_head), the classifier
    assert ids["conv_stem.weight"] == 0 and ids["blocks.0.0.conv_dw.weight"] == 1
    assert ids["conv_head.weight"] == 16 == ids["blocks.6.0.conv_pwl.weight"] and ids["classifier.weight"] == 17
    cfg = cfg_of("--recipe", "modern", "--arch", "timm:tf_efficientnet_lite0")
    lrs = {g["name"]: g["lr"] for g in recipe.build_optimizer(model, cfg).param_groups}
    assert lrs["layer16"] == pytest.approx(cfg.lr) and lrs["head"] == pytest.approx(cfg.lr * cfg.head_lr_mult)
    assert lrs["layer0"] == pytest.approx(cfg.lr * 0.85 ** 16)


# ------------------------------------------------------------------------------------------------------
# The lr schedule: warm-up then cosine, a pure function of the step
# ------------------------------------------------------------------------------------------------------
def test_warmup_then_cosine_values():
    cfg = cfg_of("--recipe", "modern", "--epochs", "5")          # warm-up 1 epoch
    f = [recipe.lr_factor(cfg, s, 10) for s in range(50)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10] == pytest.approx(1.0)
    assert f[30] == pytest.approx(0.5)                       # half-way through the 40 cosine steps
    assert f[49] == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert recipe.lr_factor(cfg_of(), 7, 2) == 1.0           # d2l: constant


# ------------------------------------------------------------------------------------------------------
# The loss: label smoothing reaches the loss that optimizer_step backpropagates
# ------------------------------------------------------------------------------------------------------
def _one_step(cfg, model, images, labels, normalize=None):
    from accelerate import Accelerator

    from finetune.context import StepContext
    from finetune.loop import optimizer_step
    from finetune.monitor import StepTimer
    acc = Accelerator(cpu=True)
    sums = torch.zeros(3, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    timer = StepTimer(0, torch.device("cpu"))
    timer.start()
    ctx = StepContext(model, opt, acc, cfg, normalize or (lambda x, y: (x, y)), monitor=None)
    optimizer_step(ctx, iter([(images, labels)]), sums, timer, 1.0)
    return sums


def test_label_smoothing_is_in_the_training_loss():
    torch.manual_seed(0)
    model, images, labels = Tiny(), torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 0])
    model.eval()                              # the same logits in both passes
    with torch.no_grad():
        logp = model(images).log_softmax(1)
    eps = 0.1
    formula = ((1 - eps) * -logp.gather(1, labels[:, None])[:, 0] - eps * logp.mean(1)).sum()
    plain = _one_step(cfg_of(), model, images, labels)[0]
    smoothed = _one_step(cfg_of("--label-smoothing", "0.1"), model, images, labels)[0]
    assert plain.item() == pytest.approx(F.nll_loss(logp, labels, reduction="sum").item(), rel=1e-5)
    assert smoothed.item() == pytest.approx(formula.item(), rel=1e-5)
    assert abs(smoothed.item() - plain.item()) > 1e-3


# ------------------------------------------------------------------------------------------------------
# Mixup / cutmix: soft targets that mix the labels of the mirrored batch
# ------------------------------------------------------------------------------------------------------
def test_mixup_targets_are_soft_and_mix_the_partner_labels():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 0, 1, 1])
    normalize = mixing.train_normalizer(lambda x, y: (x, y), cfg_of("--mixup", "0.4"), 2)
    mixed, targets = normalize(images.clone(), labels)
    lam = targets[0, 0].item()                    # sample 0 (class 0) mixed with sample 3 (class 1)
    assert 0 < lam < 1 and targets.shape == (4, 2)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    assert torch.allclose(targets, F.one_hot(labels, 2) * lam + F.one_hot(labels.flip(0), 2) * (1 - lam))
    assert torch.allclose(mixed, images * lam + images.flip(0) * (1 - lam))
    assert mixing.train_normalizer("plain", cfg_of(), 2) == "plain"        # off by default


def test_cutmix_pastes_a_box_and_weighs_the_labels_by_its_area():
    torch.manual_seed(1)
    images = torch.stack([torch.zeros(1, 10, 10), torch.ones(1, 10, 10)])
    mixed, targets = mixing.mix(images, torch.tensor([0, 1]), 2, mixup=0.0, cutmix=1.0, rng=random.Random(1))
    pasted = mixed[0].mean().item()               # sample 0 (zeros) got a box of its partner's ones
    assert 0 < pasted < 1 and targets[0, 1].item() == pytest.approx(pasted)


def test_soft_targets_reach_the_loss():
    torch.manual_seed(0)
    model, images, labels = Tiny().eval(), torch.randn(4, 3, 8, 8), torch.tensor([0, 0, 1, 1])
    hard = _one_step(cfg_of(), model, images, labels)[0]
    mixed = _one_step(cfg_of("--mixup", "0.4"), model, images, labels,
                      mixing.train_normalizer(lambda x, y: (x, y), cfg_of("--mixup", "0.4"), 2))[0]
    assert abs(hard.item() - mixed.item()) > 1e-4


# ------------------------------------------------------------------------------------------------------
# Augmentation policy and drop-path
# ------------------------------------------------------------------------------------------------------
def test_augment_policy_changes_the_crop_and_is_seeded_per_sample():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    outs = [mixing.augment(img, "trivialaugment", random.Random(f"s{i}")) for i in range(8)]
    assert any(not torch.equal(o, img) for o in outs)
    assert torch.equal(outs[3], mixing.augment(img, "trivialaugment", random.Random("s3")))
    assert mixing.augment(img, "none", random.Random(0)) is img


def test_train_stream_applies_the_policy(shards):
    from finetune.data.manifest import load_manifest
    from finetune.data.streams import TrainStream
    split = load_manifest(shards).train
    kw = dict(rank=0, world_size=1, micro_batch=8, accum=1, steps=1, image_size=32, seed=0, order="sequential",
              shuffle_buffer=0)
    plain, policy = TrainStream(split, **kw), TrainStream(split, **kw)
    policy.augment_policy = "trivialaugment"
    a, b = next(iter(plain))[0], next(iter(policy))[0]
    assert a.shape == b.shape and not torch.equal(a, b)


def test_drop_path_reaches_the_timm_model():
    from finetune.model import build_model
    cfg = cfg_of("--arch", "timm:tf_efficientnet_lite0", "--pretrained", "none", "--drop-path", "0.2")
    model, _ = build_model(cfg, ["hotdog", "not-hotdog"])
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2 * 15 / 16)         # timm's linear rule over 16 blocks


# ------------------------------------------------------------------------------------------------------
# LP-FT: the probe phase
# ------------------------------------------------------------------------------------------------------
def _train_step(model, opt):
    loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("world", [1, 2])
def test_probe_phase_freezes_the_backbone_and_its_batchnorm(world):
    from finetune.model import set_train_mode
    torch.manual_seed(0)
    model, cfg = Tiny(), cfg_of("--recipe", "modern", "--probe-epochs", "1")
    opt = recipe.build_optimizer(model, cfg)
    before = _snapshot(model)
    probe = recipe.enter_phase(model, cfg, 0, world)
    set_train_mode(model, probe)
    recipe.set_lr(opt, 1.0, probe and world > 1)
    assert probe and not model.stem[1].training
    if world == 1:
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    _train_step(model, opt)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}                    # running stats included: unchanged
    # after the probe epochs everything trains
    probe = recipe.enter_phase(model, cfg, 1, world)
    set_train_mode(model, probe)
    recipe.set_lr(opt, 1.0, probe and world > 1)
    assert not probe and model.stem[1].training and all(p.requires_grad for p in model.parameters())
    before = _snapshot(model)
    _train_step(model, opt)
    assert not torch.equal(before["stem.0.weight"], model.state_dict()["stem.0.weight"])


def test_probe_phase_follows_the_epoch():
    cfg = SimpleNamespace(probe_epochs=2)
    assert [recipe.probing(cfg, e) for e in range(4)] == [True, True, False, False]


# ------------------------------------------------------------------------------------------------------
# Small data: every image each epoch, and the note on large batches
# ------------------------------------------------------------------------------------------------------
def test_epoch_steps_round_up_to_see_every_image():
    assert recipe.steps_per_epoch(341, 32, "ceil") == 11 == math.ceil(341 / 32)
    assert recipe.steps_per_epoch(341, 32, "floor") == 10
    assert recipe.steps_per_epoch(341, 128, "ceil") == 3
    assert "38% of the 341" in recipe.batch_note(341, 128, 2)
    assert recipe.batch_note(341, 32, 11) is None


# ------------------------------------------------------------------------------------------------------
# train.py: the modern recipe with LP-FT, resumed across the phase boundary
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_modern_lpft_run_freezes_then_trains_and_resumes_across_the_phase(shards, imagenet_like, tmp_path):
    run_dir = tmp_path / "ref"
    args = ["--pretrained", imagenet_like, "--recipe", "modern", "--probe-epochs", "1", "--epochs", "2",
            "--save-every", "1", "--keep-last", "10", "--mixup", "0.2", "--eval-limit", "4", *TINY,
            "--batch-size", "16", "--epoch-steps", "ceil"]
    proc = run_train(["--data", shards, "--output-dir", run_dir, *args])
    assert "note: batch 16 is 40% of the 40 training images: 3 optimizer step(s)" in proc.stdout
    epochs = read_json(run_dir / "metrics.json")["epochs"]
    assert [e["train_samples"] for e in epochs] == [48, 48]               # ceil(40 / 16) = 3 steps
    pretrained = torch.load(imagenet_like, weights_only=True)
    probe_end = torch.load(run_dir / "checkpoints" / "ckpt-00000003.pt", weights_only=True)["model"]
    backbone = [k for k in probe_end if not k.startswith("fc.") and k in pretrained]
    assert all(torch.equal(probe_end[k], pretrained[k]) for k in backbone)      # weights and BN statistics
    final = load_model_pt(run_dir)["state_dict"]
    assert not torch.equal(final["layer1.0.conv1.weight"], pretrained["layer1.0.conv1.weight"])
    assert not torch.equal(probe_end["fc.weight"], torch.load(run_dir / "checkpoints" / "ckpt-00000001.pt",
                                                              weights_only=True)["model"]["fc.weight"])
    # resume from the middle of the probe epoch: through the boundary to the same weights, bit for bit
    again = tmp_path / "again"
    shutil.copytree(run_dir, again)
    (again / "model.pt").unlink()
    run_train(["--data", shards, "--output-dir", again, *args,
               "--resume", again / "checkpoints" / "ckpt-00000002.pt"])
    resumed = load_model_pt(again)["state_dict"]
    assert all(torch.equal(final[k], resumed[k]) for k in final)


# ------------------------------------------------------------------------------------------------------
# experiments report: the contact sheet of the best run's errors
# ------------------------------------------------------------------------------------------------------
def test_report_draws_the_best_runs_errors(shards, tmp_path):
    from PIL import Image

    from experiments import errors
    from finetune import arch
    torch.manual_seed(0)
    model = arch.create("resnet18")
    arch.replace_head(model, "fc", 2)
    spec = arch.preprocessing("resnet18", 32)
    for name, acc in (("worse", 0.1), ("best", 0.9)):
        (tmp_path / name).mkdir()
        torch.save(dict(state_dict=model.state_dict(), classes=["hotdog", "not-hotdog"], preprocess=spec,
                        arch="resnet18"), tmp_path / name / "model.pt")
    results = dict(data=str(shards), variants=[
        dict(name=n, status="ok", run_dir=str(tmp_path / n), final_test_acc=a) for n, a in (("worse", 0.1),
                                                                                         ("best", 0.9))]
        + [dict(name="failed", status="failed", run_dir=str(tmp_path / "nope"), final_test_acc=1.0)])
    assert errors.best_run(results)["name"] == "best"
    scored, classes = errors.predict_test(tmp_path / "best" / "model.pt", str(shards))
    wrong = [s for s in scored if s[1] != s[2]]
    assert len(scored) == 13 and classes == ["hotdog", "not-hotdog"] and wrong        # an untrained head errs
    sheet = errors.write_errors(results, tmp_path)
    with Image.open(sheet) as png:
        rows = -(-len(wrong) // errors.COLUMNS)
        assert png.size == (errors.COLUMNS * errors.TILE, 24 + rows * (errors.TILE + errors.CAPTION))
    errors.contact_sheet([], classes, "none", tmp_path / "empty.png")           # no errors: still a sheet
    assert Image.open(tmp_path / "empty.png").size[1] == 24 + errors.TILE + errors.CAPTION


def test_compare_knows_the_recipe_variants():
    from experiments import plan
    weights = plan.Weights("imagenet", "imagenet", None, True, "test")
    variants = plan.build_variants(["finetune", "frozen", "recipes", "ablation"], weights, [], [])
    flags = {v.name: v.flags for v in variants}
    assert list(flags)[:4] == ["finetune", "frozen", "modern", "lpft"]
    assert flags["lpft"][-4:] == ["--recipe", "modern", "--probe-epochs", "1"]
    assert all(flags[n][2:4] == ["--recipe", "modern"] for n in plan.ABLATIONS)
    plan.check_variant_configs(variants, ["--data", "x", "--arch", "timm:tf_efficientnet_lite0"])
    assert parse_config(["--data", "x", *flags["modern-mixup"]]).mixup == 0.2
