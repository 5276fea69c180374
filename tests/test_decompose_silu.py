"""decompose_silu: SiLU as x * sigmoid(x) where the backend has no SiLU kernel."""
import copy
import operator
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from graphs import call_targets
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq.passes.base import keep_float
from fxq.passes.decompose_silu import backend_needs_it, decompose_silu


class SiLUs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x):
        return F.silu(self.act(self.conv(x)) * 2.0)


def test_before_expected_and_idempotent():
    gm = fx.symbolic_trace(SiLUs().eval())
    assert decompose_silu(gm).modified
    assert call_targets(gm) == ["Conv2d", torch.sigmoid, torch.mul, operator.mul, torch.sigmoid, torch.mul]
    assert not decompose_silu(gm).modified
    gm.graph.lint()


@settings(max_examples=20, deadline=None)
@given(size=st.integers(1, 9), batch=st.integers(1, 3), scale=st.floats(0.1, 20.0))
def test_numerics_on_random_shapes(size, batch, scale):
    model = SiLUs().eval()
    gm = fx.symbolic_trace(copy.deepcopy(model))
    decompose_silu(gm)
    x = torch.randn(batch, 3, size, size) * scale
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_no_match_when_kept_float_or_absent():
    gm = fx.symbolic_trace(SiLUs().eval())
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            keep_float(node, "test")
    assert not decompose_silu(gm).modified
    assert not decompose_silu(fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))).modified


def test_x86_needs_it_and_the_int8_model_has_no_silu_island():
    assert backend_needs_it(fxq.get_backend("x86"))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        report = fxq.report(fxq.quantize(SiLUs().eval(), torch.randn(2, 3, 8, 8)))
    assert (report.quantize_ops, report.dequantize_ops) == (1, 1) and not report.float_nodes
