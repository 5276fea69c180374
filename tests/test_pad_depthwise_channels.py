"""pad_depthwise_channels: depthwise convs widened to a multiple of 8 channels, exactly."""
import copy
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from graphs import call_targets
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.shape_prop import ShapeProp

import fxq
from fxq.passes.merge_activations import merge_activations
from fxq.passes.pad_depthwise_channels import pad_depthwise_channels


class Depthwise(nn.Module):
    def __init__(self, channels, stride=1, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=bias)
        self.act = nn.ReLU()
        self.pointwise = nn.Conv2d(channels, 8, 1)

    def forward(self, x):
        return self.pointwise(self.act(self.conv(x)))


def _traced(model, x):
    gm = fx.symbolic_trace(copy.deepcopy(model))
    ShapeProp(gm).propagate(x)
    return gm


@settings(max_examples=20, deadline=None)
@given(channels=st.integers(3, 30), size=st.integers(3, 12), stride=st.sampled_from([1, 2]), bias=st.booleans())
def test_exact_on_random_shapes(channels, size, stride, bias):
    torch.manual_seed(channels * 7 + size)
    model, x = Depthwise(channels, stride, bias).eval(), torch.randn(2, channels, size, size)
    gm = _traced(model, x)
    assert pad_depthwise_channels(gm).modified == (channels % 8 != 0)
    assert torch.equal(gm(x), model(x)) or torch.allclose(gm(x), model(x), rtol=1e-6, atol=1e-6)
    gm.graph.lint()


def test_before_expected_after_fusion_and_idempotent():
    model, x = Depthwise(58).eval(), torch.randn(1, 58, 8, 8)
    gm = _traced(model, x)
    merge_activations(gm)
    ShapeProp(gm).propagate(x)
    assert pad_depthwise_channels(gm).modified
    assert call_targets(gm) == [F.pad, "ConvReLU2d", torch.narrow, "Conv2d"]
    assert gm.conv[0].groups == 64 and gm.conv[0].weight.shape[0] == 64
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
    ShapeProp(gm).propagate(x)
    assert not pad_depthwise_channels(gm).modified


def test_no_match_for_dense_or_aligned_convs():
    x = torch.randn(1, 24, 8, 8)
    assert not pad_depthwise_channels(_traced(Depthwise(24).eval(), x)).modified
    dense = nn.Sequential(nn.Conv2d(5, 5, 3, padding=1)).eval()
    assert not pad_depthwise_channels(_traced(dense, torch.randn(1, 5, 8, 8))).modified


def test_widened_conv_runs_int8_without_transitions():
    torch.manual_seed(0)
    model, x = Depthwise(58).eval(), torch.randn(2, 58, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        report = fxq.report(fxq.quantize(model, x))
    assert (report.quantize_ops, report.dequantize_ops) == (1, 1)  # pad and narrow run on int8
