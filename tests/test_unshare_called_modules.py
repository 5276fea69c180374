"""unshare_called_modules: each call of a module called from several places gets its own copy."""
import copy
import warnings

import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxq
from fxq import pipeline
from fxq.passes.unshare_called_modules import MAX_WEIGHTED_CALLS, unshare_called_modules
from metrics import sqnr_db


class Siamese(nn.Module):
    """One conv (and one Hardswish) applied to two inputs whose ranges differ 10x."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.act = nn.Hardswish()

    def forward(self, a, b):
        return self.act(self.conv(a)), self.act(self.conv(b * 10.0))


class Loop(nn.Module):
    """A cell applied at every step of a traced loop: more calls than copies are worth."""

    def __init__(self, steps=MAX_WEIGHTED_CALLS + 2):
        super().__init__()
        self.cell, self.steps = nn.Linear(8, 8), steps

    def forward(self, x):
        for _ in range(self.steps):
            x = torch.relu(self.cell(x))
        return x


def _call_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 3), size=st.integers(3, 9))
def test_every_call_gets_its_own_copy_and_float_is_exact(batch, size):
    torch.manual_seed(size)
    model = Siamese().eval()
    a, b = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    gm = fx.symbolic_trace(copy.deepcopy(model))
    result = unshare_called_modules(gm)
    assert result.modified and len(result.changes) == 2
    targets = _call_targets(result.graph_module)
    assert len(targets) == len(set(targets)) == 4  # conv, act, conv_1, act_1
    for rewritten, original in zip(result.graph_module(a, b), model(a, b)):
        assert torch.equal(rewritten, original)
    assert not unshare_called_modules(result.graph_module).modified


def test_a_loop_cell_stays_shared_and_the_report_says_so():
    gm = fx.symbolic_trace(Loop().eval())
    result = unshare_called_modules(gm)
    assert not result.modified
    assert _call_targets(result.graph_module) == ["cell"] * (MAX_WEIGHTED_CALLS + 2)
    assert "left shared" in result.changes[0] and "cell" in result.changes[0]


def test_each_call_site_gets_its_own_int8_scale():
    torch.manual_seed(0)
    model = Siamese().eval()
    batches = [(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)) for _ in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        qmodel = fxq.quantize(model, batches[0], calibration_data=batches)
    converted = qmodel.model
    # the second call sees inputs 10x larger: its output scale must not be the first call's
    assert converted.conv.scale * 4 < converted.conv_1.scale
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected, actual = model(a, b), qmodel(a, b)
    # measured 29.7 / 31.9 dB; with one scale for both calls (no copies) 13.5 / 31.9 dB
    assert min(sqnr_db(e, q) for e, q in zip(expected, actual)) >= 25.0
    assert any("unshare_called_modules" == record.name and record.modified
               for record in fxq.report(qmodel).passes[""])


def test_not_run_for_qat_or_dynamic():
    backend = fxq.get_backend("x86")
    names = lambda **kwargs: [name for name, _ in pipeline.passes_for(backend, **kwargs)]  # noqa: E731
    assert "unshare_called_modules" in names(mode="static")
    assert "unshare_called_modules" not in names(mode="dynamic")
    assert "unshare_called_modules" not in names(qat=True)
