"""Shape-specialized tracing of modules that compute on x.shape (TF-"same" padding convs)."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import fxq
from fxq.errors import TraceFailure
from fxq.shape_specialize import SHAPE_GUARD_PREFIX, specialize_to_shapes
from metrics import sqnr_db
from seed_models import SEED_MODELS, Conv2dDynamicSame


class BatchOneSpecialCase(nn.Module):
    def forward(self, x):
        if x.shape[0] == 1:  # a branch on the batch size: the guard must pin it
            return x * 2
        return x + 1


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


@pytest.mark.parametrize("stride, kernel", [(1, 3), (2, 3), (2, 5)])
def test_same_padding_conv_is_exact_for_any_batch(stride, kernel):
    conv = Conv2dDynamicSame(4, 6, kernel, stride).eval()
    gm = specialize_to_shapes(conv, (torch.randn(2, 4, 15, 16),), "conv")
    assert not any(n.op == "call_module" for n in gm.graph.nodes)  # inlined: pad + conv2d functions
    for batch in (1, 2, 5):
        x = torch.randn(batch, 4, 15, 16)
        assert torch.equal(gm(x), conv(x))
    with pytest.raises(AssertionError, match=SHAPE_GUARD_PREFIX):
        gm(torch.randn(2, 4, 16, 16))


def test_batch_dependent_graph_guards_the_batch_too():
    gm = specialize_to_shapes(BatchOneSpecialCase(), (torch.randn(3, 2),), "head")
    assert torch.equal(gm(torch.randn(3, 2).fill_(1)), torch.full((3, 2), 2.0))
    with pytest.raises(AssertionError, match=r"\(3, 2\)"):
        gm(torch.randn(1, 2))


def test_data_dependent_control_flow_is_not_specialized():
    with pytest.raises(TraceFailure):
        specialize_to_shapes(DataDependent(), (torch.randn(2, 3),), "gate")


@pytest.fixture(scope="module")
def dynamic_same_pad():
    fixture = SEED_MODELS["same_pad_dynamic_net"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        return fixture, fxq.quantize(fixture.model, fixture.example_inputs, calibration_data=fixture.calibration)


def test_dynamic_same_pad_net_runs_int8_end_to_end(dynamic_same_pad):
    fixture, qmodel = dynamic_same_pad
    report = fxq.report(qmodel)
    assert not report.float_parts  # no conv left as a float leaf
    assert sum("traced for its example input shape" in note for note in report.notes) == 9
    # one island: the global average pool, re-quantized with its own scale
    assert (report.quantize_ops, report.dequantize_ops) == (2, 2)
    modules = [type(m) for m in qmodel.modules()]
    assert sum(t.__name__ in ("Conv2d", "ConvReLU2d") and t.__module__.startswith("torch.ao") for t in modules) == 9


def test_other_input_shape_raises_a_clear_fxq_error(dynamic_same_pad):
    fixture, qmodel = dynamic_same_pad
    with torch.no_grad():
        qmodel(torch.randn(3, *fixture.example_inputs[0].shape[1:]))  # another batch size is fine
        with pytest.raises(fxq.FxqError, match="traced for other arguments.*quantize again"):
            qmodel(torch.randn(1, 3, 48, 48))


class PatchFold(nn.Module):
    """MobileViT's unfold: reshapes to sizes that multiply the batch by the channels and patches,
    after a branch on the input's shape."""

    def __init__(self, patch=2):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(4 * patch * patch, 4 * patch * patch)

    def forward(self, x):
        batch, channels, height, width = x.shape
        p = self.patch
        h, w = math.ceil(height / p), math.ceil(width / p)
        if h * p != height or w * p != width:  # a branch on the shape: symbolic tracing fails here
            x = nn.functional.interpolate(x, size=(h * p, w * p), mode="bilinear")
        y = x.reshape(batch * channels * h, p, w, p).transpose(1, 2)
        y = y.reshape(batch, channels, h * w, p * p).transpose(1, 2).reshape(batch * h * w, channels * p * p)
        y = self.proj(y) + batch + 1
        y = y.reshape(batch, h * w, channels, p * p).transpose(1, 2)
        return y.reshape(batch * channels * h, w, p, p).transpose(1, 2).reshape(batch, channels, height, width)


@pytest.mark.parametrize("example_batch", [1, 2, 4])
def test_constants_linear_in_the_batch_read_it_from_the_input(example_batch):
    torch.manual_seed(0)
    module = PatchFold().eval()
    gm = specialize_to_shapes(module, (torch.randn(example_batch, 4, 6, 8),), "block")
    assert any(n.op == "call_method" and n.target == "size" and n.args[1:] == (0,) for n in gm.graph.nodes)
    for batch in (1, 2, 3, 7):
        x = torch.randn(batch, 4, 6, 8)
        with torch.no_grad():
            assert torch.equal(gm(x), module(x))
    with pytest.raises(AssertionError, match=SHAPE_GUARD_PREFIX):
        gm(torch.randn(2, 4, 6, 10))  # other spatial sizes stay guarded


def test_quantize_with_a_batch_1_example_calibrates_on_larger_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), PatchFold(), nn.ReLU()).eval()
    batches = [torch.randn(4, 3, 6, 8) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        qmodel = fxq.quantize(model, torch.randn(1, 3, 6, 8), calibration_data=batches)
    x = torch.randn(5, 3, 6, 8)
    with torch.no_grad():
        assert sqnr_db(model(x), qmodel(x)) > 25
