"""What the benchmark measures on: randomly initialised zoo models and the plain FX baseline.

No weights are downloaded: torchvision models are built with ``weights=None`` (and
``weights_backbone=None``), timm models with ``pretrained=False``. BatchNorm statistics are
re-estimated on standard-normal inputs in train mode, so activations have realistic ranges.
Random-init nets amplify noise layer after layer, so their SQNR compares two quantizers on one
model; it is not an absolute quality bar.

This module is importable (``from bench.harness import ...``) so that tests can share the
model factory and the plain-FX baseline instead of keeping their own copy.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
import torch
import torch.nn as nn
import torchvision

from fxq.cli import recalibrate_batchnorm

FAMILIES = ("classification", "segmentation", "video", "timm")
TIMM_PREFIX = "timm:"

# Models whose input size is fixed by the architecture (position embeddings, attention biases
# or window partitions sized for 224 px), or that need a minimum size; everything else runs
# at --image-size.
FIXED_IMAGE_SIZE = {
    "vit_b_16": 224, "vit_b_32": 224, "vit_h_14": 224, "vit_l_16": 224, "vit_l_32": 224,
    "maxvit_t": 224, "timm:vit_tiny_patch16_224": 224, "timm:deit_tiny_patch16_224": 224,
    "timm:levit_128s": 224, "timm:efficientformer_l1": 224,
}
MIN_IMAGE_SIZE = {"inception_v3": 96, "timm:inception_v3": 96}
# Video models take (B, 3, T, H, W); S3D's final pooling and MViT's position embeddings need 16x224x224.
VIDEO_CLIP = {"s3d": (16, 224, 224), "mvit_v1_b": (16, 224, 224), "mvit_v2_s": (16, 224, 224)}
DEFAULT_VIDEO_CLIP = (8, 112, 112)

# Without these, googlenet/inception build auxiliary heads, and segmentation models would
# download an ImageNet backbone.
BUILD_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
SEGMENTATION_KWARGS = {"weights_backbone": None, "aux_loss": False}

# Name fragments of attention-based models: the ">= 1.3x fp32" speed target is for CNNs only.
TRANSFORMER_MARKERS = ("vit", "swin", "deit", "former", "edgenext", "mvit")


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: ``name`` is a torchvision name or ``timm:<name>``."""

    name: str
    family: str

    @property
    def kind(self) -> str:
        return "transformer" if any(m in self.name for m in TRANSFORMER_MARKERS) else "cnn"

    def input_shape(self, batch: int, image_size: int) -> tuple[int, ...]:
        if self.family == "video":
            return (batch, 3, *VIDEO_CLIP.get(self.name, DEFAULT_VIDEO_CLIP))
        size = FIXED_IMAGE_SIZE.get(self.name, max(image_size, MIN_IMAGE_SIZE.get(self.name, 0)))
        return (batch, 3, size, size)

    def build(self) -> nn.Module:
        """The model with random weights, in train mode (as constructors return it)."""
        if self.family == "timm":
            import timm  # optional: `pip install -e ".[bench]"`
            return timm.create_model(self.name[len(TIMM_PREFIX):], pretrained=False)
        kwargs = SEGMENTATION_KWARGS if self.family == "segmentation" else BUILD_KWARGS.get(self.name, {})
        return torchvision.models.get_model(self.name, weights=None, **kwargs)


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of ``spec``'s model, built on the meta device when the constructor allows it."""
    try:
        with torch.device("meta"):
            model = spec.build()
    except Exception:  # some constructors compute on tensors (regnet widths) and need real data
        model = spec.build()
    return sum(p.numel() for p in model.parameters())


def torchvision_specs(family: str) -> list[ModelSpec]:
    module = {"classification": torchvision.models, "segmentation": torchvision.models.segmentation,
              "video": torchvision.models.video}[family]
    return [ModelSpec(name, family) for name in torchvision.models.list_models(module=module)]


def random_batches(spec: ModelSpec, count: int, batch: int, image_size: int, seed: int) -> list[tuple]:
    """``count`` standard-normal input tuples (like normalised pixels), from their own seed."""
    generator = torch.Generator().manual_seed(seed)
    shape = spec.input_shape(batch, image_size)
    return [(torch.randn(*shape, generator=generator),) for _ in range(count)]


def prepare_model(spec: ModelSpec, image_size: int, batch: int, batches: int = 8, seed: int = 0) -> nn.Module:
    """The eval-mode model with BatchNorm statistics re-estimated on random data."""
    torch.manual_seed(seed)
    model = spec.build()
    _randomize_zero_weights(model)
    recalibration = iter(random_batches(spec, batches, batch, image_size, seed + 1))
    recalibrate_batchnorm(model, lambda: next(recalibration)[0], batches=batches)
    return model.eval()


def _randomize_zero_weights(model: nn.Module) -> None:
    # torchvision's ViTs zero-initialise the classifier head: every output would be 0, SQNR
    # infinite and top-1 agreement trivially 1.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.any():
                nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)


class PlainFxError(RuntimeError):
    """Plain FX quantization failed; ``stage`` says which step, the cause is chained."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
        self.stage = stage


@contextmanager
def plain_fx_stage(name: str):
    try:
        yield
    except Exception as error:
        raise PlainFxError(name, error) from error


def plain_fx_int8(model: nn.Module, example_inputs: tuple, calibration_batches) -> nn.Module:
    """Quantize a copy of ``model`` the way the torch.ao FX docs do (x86 qconfig), with no repairs.

    Raises PlainFxError naming the stage that failed: trace, prepare, calibrate or convert.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.fx.tracer import QuantizationTracer
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation warnings, here only
        # Tracing first, with prepare_fx's own tracer, tells a failure to capture the graph
        # apart from a failure to insert observers.
        with plain_fx_stage("trace"):
            QuantizationTracer([], []).trace(model)
        with plain_fx_stage("prepare"):
            prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example_inputs)
        with plain_fx_stage("calibrate"), torch.no_grad():
            for inputs in calibration_batches:
                prepared(*inputs)
        with plain_fx_stage("convert"):
            return convert_fx(prepared)

