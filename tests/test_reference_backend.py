"""The reference backend: N-bit fake quantization in float, and its agreement with real int8."""
import dataclasses
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxq
from fxq.backends.x86 import PRODUCT_BITS, x86
from fxq.quant import nnqr
from metrics import sqnr_db
from seed_models import SEED_MODELS

QDQ = torch.ops.quantized_decomposed
#: Seed models whose output is quantized (so "one output step" is defined) and that are
#: quick to quantize. lipreading_net ends in a float GRU that amplifies any rounding tie
#: (x86 itself is at 8 dB there), so elementwise agreement is not a meaningful check on it.
#: prelu_net (slow to quantize) is covered by the digits PReLU net in test_backends_digits.py.
AGREEMENT_MODELS = ["inplace_conv_net", "relu6_net", "hf_style_net", "standalone_bn_net"]
#: Output steps int8 and simulation may differ by (default 1). standalone_bn_net's BatchNorm1d
#: multiplies pooled features ~8x, so a one-step rounding difference upstream (fbgemm's int8
#: BatchNorm2d rounds differently) arrives as up to 3 output steps at 8-bit activations (measured:
#: both end at 24.7 dB output SQNR, layer by layer within 3 dB).
AGREEMENT_STEPS = {"standalone_bn_net": 3.0}


def _quantize(model, example, batches, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        return fxq.quantize(model, example, calibration_data=batches, backend=backend)


def _graph_modules(qmodel):
    return [m for m in qmodel.modules() if isinstance(m, fx.GraphModule)]


def _activation_quantizers(qmodel) -> list:
    return [node for gm in _graph_modules(qmodel) for node in gm.graph.nodes
            if node.op == "call_function" and node.target is QDQ.quantize_per_tensor.default]


def _net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU6(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 5))
    batches = [torch.randn(16, 3, 8, 8) for _ in range(8)]
    return model.eval(), batches


@pytest.mark.parametrize("weight_bits,activation_bits,symmetric_activations",
                         [(8, 8, False), (4, 8, False), (2, 3, False), (6, 5, True)])
def test_n_bit_ranges_are_in_the_graph_and_enforced(weight_bits, activation_bits, symmetric_activations):
    model, batches = _net()
    backend = fxq.reference_backend(weight_bits, activation_bits, symmetric_activations=symmetric_activations)
    qmodel = _quantize(model, batches[0], batches, backend)
    quantizers = _activation_quantizers(qmodel)
    assert quantizers
    levels = 2 ** activation_bits
    for node in quantizers:
        _, _, zero_point, quant_min, quant_max, dtype = node.args
        if symmetric_activations:
            assert (quant_min, quant_max, dtype, zero_point) == (-levels // 2, levels // 2 - 1, torch.int8, 0)
        else:
            assert (quant_min, quant_max, dtype) == (0, levels - 1, torch.uint8)
    weighted = [m for m in qmodel.modules() if isinstance(m, (nnqr.Conv2d, nnqr.Linear))]
    assert len(weighted) == 3
    for module in weighted:
        assert (module.weight_quant_min, module.weight_quant_max) == (-2 ** (weight_bits - 1), 2 ** (weight_bits - 1) - 1)
        assert module.weight_qscheme == torch.per_channel_affine  # torch stores symmetric as affine, zp 0
        assert module.weight_scale.numel() == module.weight.shape[0] and not module.weight_zero_point.any()
        codes = module.get_weight() / module.weight_scale.view(-1, *[1] * (module.weight.dim() - 1))
        assert torch.allclose(codes, codes.round(), atol=1e-4)  # the float weight sits on the N-bit grid
        codes = codes.round()
        assert -2 ** (weight_bits - 1) <= codes.min() and codes.max() <= 2 ** (weight_bits - 1) - 1
        assert codes.abs().max() >= 2 ** (weight_bits - 1) - 1  # and spans it
    # Outliers beyond the calibrated range saturate at the N-bit range, not at 8 bits.
    _, scale, zero_point, quant_min, quant_max, _ = quantizers[-1].args  # the output's quantizer
    with torch.no_grad():
        saturated = qmodel(100 * batches[0])
    assert float(saturated.max()) == pytest.approx((quant_max - zero_point) * scale, rel=1e-5)
    assert float(saturated.min()) == pytest.approx((quant_min - zero_point) * scale, rel=1e-5, abs=1e-6)


def test_lower_bit_widths_lose_accuracy_monotonically():
    model, batches = _net()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        sqnr = {bits: sqnr_db(expected, _quantize(model, batches[0], batches, fxq.reference_backend(bits, bits))(x))
                for bits in (8, 6, 4, 3)}
    print("reference SQNR by bit width (weights = activations):", {b: round(v, 1) for b, v in sqnr.items()})
    assert sqnr[8] > sqnr[6] > sqnr[4] > sqnr[3] > 0.0
    assert sqnr[8] >= 30.0


def test_per_tensor_and_affine_weights_are_honoured():
    model, batches = _net()
    backend = fxq.reference_backend(6, 8, symmetric_weights=False, per_channel_weights=False)
    qmodel = _quantize(model, batches[0], batches, backend)
    for module in (m for m in qmodel.modules() if isinstance(m, (nnqr.Conv2d, nnqr.Linear))):
        assert module.weight_qscheme == torch.per_tensor_affine
        assert module.weight_scale.numel() == 1


def test_reference_runs_without_any_quantized_engine():
    model, batches = _net()
    qmodel = _quantize(model, batches[0], batches, "reference")
    assert qmodel.engine is None
    for gm in _graph_modules(qmodel):
        for node in gm.graph.nodes:
            assert not (node.op == "call_function" and node.target in (torch.quantize_per_tensor, torch.quantize_per_channel))
    assert not any(type(m).__module__.startswith("torch.ao.nn.quantized.modules") for m in qmodel.modules())


def _output_step(output: torch.Tensor) -> float:
    """The quantization step of a dequantized output: the smallest gap between its values,
    checked to be a grid every value lies on."""
    levels = output.flatten().unique()
    gaps = levels[1:] - levels[:-1]
    step = float(gaps[gaps > 1e-6 * float(levels.abs().max())].min())
    offsets = (output - levels[0]) / step
    assert torch.allclose(offsets, offsets.round(), atol=1e-2), "output is not on a quantization grid"
    return step


#: x86 and each precision split it may choose (two without VNNI), alone: int8 and simulation
#: score the splits on slightly different outputs, so with both offered they may pick differently.
_X86_BOTH = dataclasses.replace(x86, max_product_bits=PRODUCT_BITS)
X86_SPLITS = [dataclasses.replace(split, max_product_bits=None) for split in (_X86_BOTH, *_X86_BOTH.alternatives)]


@pytest.mark.parametrize("split", X86_SPLITS, ids=[split.precision for split in X86_SPLITS])
@pytest.mark.parametrize("name", AGREEMENT_MODELS)
def test_simulation_of_x86_matches_x86_int8_within_one_step(name, split):
    fixture = SEED_MODELS[name]()
    int8 = _quantize(fixture.model, fixture.example_inputs, fixture.calibration, split)
    simulated = _quantize(fixture.model, fixture.example_inputs, fixture.calibration, fxq.simulation_of(split))
    torch.manual_seed(1234)
    inputs = fixture.sample()
    with torch.no_grad():
        expected, simulated_out = int8(*inputs), simulated(*inputs)
    step = _output_step(expected)
    worst = float((expected - simulated_out).abs().max()) / step
    print(f"{name}: simulated vs x86 int8, worst difference {worst:.2f} output steps")
    assert worst <= AGREEMENT_STEPS.get(name, 1.0) + 1e-3
