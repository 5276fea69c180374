"""align_depthwise_padding: TF-"same" uneven pads moved into depthwise convs, exactly."""
import copy
import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from graphs import call_targets
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.shape_prop import ShapeProp

from fxq.passes.align_depthwise_padding import align_depthwise_padding
from fxq.passes.merge_activations import merge_activations


def tf_same_pad(size, kernel, stride):
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class PadThenDepthwise(nn.Module):
    def __init__(self, channels, kernel, stride, pads):
        super().__init__()
        self.pads = pads
        self.conv = nn.Conv2d(channels, channels, kernel, stride, 0, groups=channels)
        self.act = nn.ReLU()
        self.pointwise = nn.Conv2d(channels, 4, 1)

    def forward(self, x):
        return self.pointwise(self.act(self.conv(F.pad(x, self.pads))))


def _tf_model(channels, kernel, stride, height, width):
    top, bottom = tf_same_pad(height, kernel, stride)
    left, right = tf_same_pad(width, kernel, stride)
    return PadThenDepthwise(channels, kernel, stride, (left, right, top, bottom)).eval()


def _traced(model, x):
    gm = fx.symbolic_trace(copy.deepcopy(model))
    ShapeProp(gm).propagate(x)
    return gm


@settings(max_examples=30, deadline=None)
@given(kernel=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]), height=st.integers(5, 19),
       width=st.integers(5, 19), batch=st.integers(1, 2))
def test_exact_on_random_shapes(kernel, stride, height, width, batch):
    torch.manual_seed(height * 31 + width)
    model, x = _tf_model(8, kernel, stride, height, width), torch.randn(batch, 8, height, width)
    gm = _traced(model, x)
    result = align_depthwise_padding(gm)
    symmetric = all(a == b for a, b in zip(model.pads[::2], model.pads[1::2]))
    assert result.modified != (symmetric and model.pads[0] == (kernel - 1) // 2 and model.pads[2] == (kernel - 1) // 2)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
    gm.graph.lint()


def test_before_expected_after_fusion():
    model, x = _tf_model(16, 3, 2, 16, 16), torch.randn(1, 16, 16, 16)  # TF pads (0, 1, 0, 1)
    gm = _traced(model, x)
    merge_activations(gm)
    ShapeProp(gm).propagate(x)
    assert align_depthwise_padding(gm).modified
    assert call_targets(gm) == [F.pad, "ConvReLU2d", torch.narrow, torch.narrow, "Conv2d"]
    pad_node = next(n for n in gm.graph.nodes if n.target is F.pad)
    assert pad_node.args[1] == (1, 0, 1, 0) and gm.conv[0].padding == (1, 1)  # the conv adds the trailing zero
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_no_match_and_idempotent():
    x = torch.randn(1, 8, 12, 12)
    dense = PadThenDepthwise(8, 3, 2, (0, 1, 0, 1)).eval()
    dense.conv = nn.Conv2d(8, 8, 3, 2)  # not depthwise: the generic GEMM path does not care
    assert not align_depthwise_padding(_traced(dense, x)).modified
    gm = _traced(_tf_model(8, 5, 2, 12, 12), x)
    assert align_depthwise_padding(gm).modified
    ShapeProp(gm).propagate(x)
    assert not align_depthwise_padding(gm).modified
