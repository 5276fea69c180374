"""Randomly initialised torchvision classifiers, and the plain torch.ao FX int8 baseline.

No weights are downloaded: every model is built with ``weights=None`` and its BatchNorm
statistics are re-estimated on standard-normal images, so activations have realistic ranges
for calibration even though the model has learned nothing.
"""

import sys
from pathlib import Path

import torch
import torchvision

from seed_models import Fixture, recalibrate_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for bench/
from bench.harness import PlainFxError, plain_fx_int8  # noqa: E402,F401  (the plain-FX baseline lives there)

# Chosen to cover residual adds, depthwise convs, channel shuffle, hardswish/SE, SiLU and
# stochastic depth, concatenating branches, grouped convs and LayerNorm. On one CPU thread each
# builds (with BatchNorm recalibration) in 0.2-2.2 s, runs a 64 px batch of 2 in 8-70 ms, and
# plain FX int8 takes 0.8-5.6 s (densenet121 and convnext_tiny are the slowest).
# Random-init nets amplify noise layer after layer (resnet50 loses ~4 dB of SQNR per stage),
# so their SQNR is for comparing two quantizers on one model, not an absolute quality bar.
ZOO_SMOKE = [
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "mnasnet0_5",
    "efficientnet_b0",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "googlenet",
    "densenet121",
    "convnext_tiny",
]

# Without these, googlenet builds auxiliary heads and warns that init_weights will change.
BUILD_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
}

BATCHNORM_RECALIBRATION_BATCHES = 8
RECALIBRATION_BATCH_SIZE = 8
#: 32 calibration images: with 16, the classifier's calibrated output range was a third of what
#: fresh images reach (random-init mobilenet_v3_small logits), and which tool clipped less decided
#: the comparison (fxq 9.3 dB vs plain FX 9.8 dB; with 32 images 11.3 vs 9.9 dB).
NUM_CALIBRATION_BATCHES = 16


def _image_batch(batch_size: int, image_size: int) -> tuple:
    # Standard normal, like ImageNet-normalised pixels; uniform [0, 1) inputs push randomly
    # initialised nets into degenerate (all-positive, ever-growing) activations.
    return (torch.randn(batch_size, 3, image_size, image_size),)


def make_zoo_model(name: str, image_size: int = 64, batch_size: int = 2) -> Fixture:
    """A torchvision classifier in eval mode, with example inputs and calibration batches."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **BUILD_KWARGS.get(name, {}))
    recalibration = [_image_batch(RECALIBRATION_BATCH_SIZE, image_size)
                     for _ in range(BATCHNORM_RECALIBRATION_BATCHES)]
    model = recalibrate_batchnorm(model, recalibration)
    calibration = [_image_batch(batch_size, image_size) for _ in range(NUM_CALIBRATION_BATCHES)]
    return Fixture(model, _image_batch(batch_size, image_size), calibration,
                   lambda: _image_batch(batch_size, image_size))
