"""drop_inference_identities: stochastic depth / dropout traced with training=False become their input."""
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.ops import StochasticDepth

import fxq
from fxq.passes.drop_inference_identities import drop_inference_identities
from graphs import call_targets


class Block(nn.Module):
    """A residual block as torchvision writes it: conv, stochastic depth, dropout, add."""

    def __init__(self, training_flag=False):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.depth = StochasticDepth(0.2, "row")
        self.training_flag = training_flag

    def forward(self, x):
        y = self.depth(self.conv(x))
        return x + F.dropout(y, 0.1, self.training_flag)


class Expected(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def _traced(module):
    return fx.symbolic_trace(module.eval())


def test_before_expected():
    result = drop_inference_identities(_traced(Block()))
    assert result.modified and len(result.changes) == 2
    assert call_targets(result.graph_module) == call_targets(_traced(Expected()))


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 3), size=st.integers(3, 9))
def test_exact_on_random_shapes(batch, size):
    torch.manual_seed(batch * 10 + size)
    model = Block().eval()
    x = torch.randn(batch, 4, size, size)
    rewritten = drop_inference_identities(_traced(model)).graph_module
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), model(x), rtol=0, atol=0)


def test_calls_that_may_train_stay():
    # torchvision's StochasticDepth module in train mode (its functional form is fx-wrapped only
    # inside torchvision; called from elsewhere, tracing runs it), and dropout at its default
    gm = fx.symbolic_trace(nn.Sequential(StochasticDepth(0.2, "row"), nn.Dropout(0.1)).train())
    gm.graph.call_function(F.dropout, (next(iter(gm.graph.nodes)),))  # unused: still must stay
    gm.recompile()
    before = call_targets(gm)
    result = drop_inference_identities(gm)
    assert not result.modified and call_targets(result.graph_module) == before


class NormAct(nn.Module):
    """timm's BatchNormAct2d shape: BN, then ``self.drop`` (an Identity), then the activation."""

    def __init__(self, channels):
        super().__init__()
        self.bn, self.drop, self.act = nn.BatchNorm2d(channels), nn.Identity(), nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(self.bn(x)))


class IdentityModules(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 6, 3, padding=1), NormAct(6)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(6 * 25, 4), nn.Identity())

    def forward(self, x):
        return self.head(nn.functional.adaptive_avg_pool2d(self.norm(self.conv(x)), 5))


def test_identity_and_eval_dropout_modules_become_their_input():
    torch.manual_seed(0)
    model = IdentityModules().eval()
    result = drop_inference_identities(_traced(model))
    assert result.modified and len(result.changes) == 3
    kept = [n.target for n in result.graph_module.graph.nodes if n.op == "call_module"]
    assert kept == ["conv", "norm.bn", "norm.act", "head.0", "head.2"]
    for shape in [(1, 3, 5, 5), (3, 3, 11, 7)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(result.graph_module(x), model(x), rtol=0, atol=0)


def test_dropout_module_in_training_stays():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Identity()).train())
    result = drop_inference_identities(gm)
    assert [n.target for n in result.graph_module.graph.nodes if n.op == "call_module"] == ["0", "1"]


def test_idempotent():
    gm = drop_inference_identities(_traced(Block())).graph_module
    again = drop_inference_identities(gm)
    assert not again.modified
    again.graph_module.graph.lint()


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_stochastic_depth_blocks_quantize_with_no_float_island(backend):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.ReLU(), Block()).eval()
    batches = [torch.randn(2, 4, 8, 8) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        qmodel = fxq.quantize(model, batches[0], calibration_data=batches, backend=backend)
    report = fxq.report(qmodel)
    assert report.float_nodes == [] and (report.quantize_ops, report.dequantize_ops) == (1, 1)
