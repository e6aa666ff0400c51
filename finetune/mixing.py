"""Per-sample augmentation policies (`--augment-policy`: torchvision's TrivialAugmentWide / RandAugment on the
uint8 crop, in the loader workers) and batch mixing (`--mixup`, `--cutmix`: soft targets, on the device).

Both draw from generators seeded by where the run stands, never from global state: the policy from the
sample's own RNG (as the crop and flip do), the mixing from an RNG seeded by (--seed, micro-batch number). A
resumed run therefore sees the same images and the same mixes as an uninterrupted one, bit for bit. timm's
Mixup draws from numpy's global RNG, which checkpoints do not hold (and a resumed loader's start draws from
torch's), hence this small version of its batch mode (the same rule: each sample is mixed with the sample at
the mirrored position of the batch, one lambda per batch)."""

from __future__ import annotations

import functools
import random

import torch

POLICIES = ("none", "trivialaugment", "randaugment")


@functools.cache
def _policy(name: str):
    from torchvision.transforms import v2
    return {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}[name]()


def augment(img: torch.Tensor, policy: str, rng: random.Random) -> torch.Tensor:
    """`img` (uint8 [3, H, W]) through the policy, its random choices seeded from the sample's `rng`."""
    if policy == "none":
        return img
    with torch.random.fork_rng(devices=[]):      # leave the caller's RNG as it was
        torch.manual_seed(rng.getrandbits(63))
        return _policy(policy)(img)


class MixingNormalizer:
    """Wraps a normalizer for training batches: (images, int labels) -> (mixed images, soft targets [N, C]).
    With probability 1/2 (when both are on) a batch gets cutmix, else mixup; lambda ~ Beta(alpha, alpha).
    Micro-batch n of the run (counted from `first`) draws from random.Random(f"mix-{seed}-{n}")."""

    def __init__(self, normalize, num_classes: int, mixup: float, cutmix: float, seed: int, first: int):
        self.normalize, self.num_classes, self.mixup, self.cutmix = normalize, num_classes, mixup, cutmix
        self.seed, self.n = seed, first

    def __call__(self, images, labels):
        images, labels = self.normalize(images, labels)
        rng, self.n = random.Random(f"mix-{self.seed}-{self.n}"), self.n + 1
        return mix(images, labels, self.num_classes, self.mixup, self.cutmix, rng)


def mix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
        rng: random.Random):
    """Mixup or cutmix of a batch with its mirror (images.flip(0)); returns (images, soft targets)."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = rng.betavariate(alpha, alpha)
    partner = images.flip(0)
    if use_cutmix:
        images, lam = _paste_box(images, partner, lam, rng)
    else:
        images = images * lam + partner * (1 - lam)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(images.dtype if images.is_floating_point()
                                                                   else torch.float32)
    return images, one_hot * lam + one_hot.flip(0) * (1 - lam)


def _paste_box(images: torch.Tensor, partner: torch.Tensor, lam: float, rng: random.Random):
    """Cutmix: a box of area ~(1 - lam) from the partner; lam corrected to the box actually pasted."""
    h, w = images.shape[-2:]
    cut = (1 - lam) ** 0.5
    bh, bw = int(h * cut), int(w * cut)
    cy, cx = rng.randrange(h), rng.randrange(w)
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, w)
    images = images.clone()
    images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
    return images, 1 - (y1 - y0) * (x1 - x0) / (h * w)


def train_normalizer(normalize, cfg, num_classes: int, global_step: int = 0):
    """The normalizer for training batches from optimizer step `global_step` on: mixing when --mixup or
    --cutmix is on, else `normalize` itself."""
    if not (cfg.mixup or cfg.cutmix):
        return normalize
    return MixingNormalizer(normalize, num_classes, cfg.mixup, cfg.cutmix, cfg.seed, global_step * cfg.grad_accum)
