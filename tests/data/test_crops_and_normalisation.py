"""In-process checks of the pixel arithmetic the fast tier did not reach (bench/mutants.py found mutations of
it surviving): the exported file's numpy normalisation equals the training normaliser, and the crop's fallback
(no sampled crop fits) is torchvision's centred crop."""

import random

import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop

from finetune.data.transforms import DeviceNormalizer, random_resized_crop_params
from finetune.exported import normalize


def test_exported_numpy_normalisation_equals_the_training_normaliser():
    crops = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for mean, std in (((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))):
        ours, _ = DeviceNormalizer(torch.device("cpu"), False, mean, std)(crops)
        exported = normalize(crops, {"mean": list(mean), "std": list(std)})
        np.testing.assert_allclose(exported, ours.numpy(), rtol=1e-5, atol=1e-5)
        assert abs(float(exported[0, 0, 0, 0]) - (crops[0, 0, 0, 0].item() / 255 - mean[0]) / std[0]) < 1e-5


def test_crop_fallback_is_torchvisions_centred_crop():
    # 1000 x 10 px: no crop of >= 8 % of the area with an aspect ratio in [3/4, 4/3] fits, so every attempt
    # fails and both implementations fall back to the centred crop clamped to the ratio range.
    for height, width in ((10, 1000), (1000, 10), (9, 700)):
        expected = RandomResizedCrop.get_params(torch.empty(3, height, width), (0.08, 1.0), (3 / 4, 4 / 3))
        for seed in range(3):
            assert random_resized_crop_params(height, width, random.Random(seed)) == tuple(expected)
