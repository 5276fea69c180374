"""requantize_wide_averages: which averages are kept float, and that it pays off in int8."""
import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import fxq
from fxq import pipeline
from fxq.passes.base import float_reason
from fxq.passes.requantize_wide_averages import MIN_AVERAGED_VALUES, requantize_wide_averages
from metrics import sqnr_db

X86 = fxq.get_backend("x86")


class Averages(nn.Module):
    """A global pool (wide), a 2x2 pool (narrow), a spatial mean (wide) and a channel mean."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.small_pool = nn.AvgPool2d(2)

    def forward(self, x):
        y = self.conv(x)  # each average gets a tensor of its own: sole consumers
        return (self.global_pool(torch.relu(y)).flatten(1), self.small_pool(torch.sigmoid(y)),
                torch.tanh(y).mean((2, 3)), F.adaptive_avg_pool2d(torch.abs(y), 4))


def _traced(model, x):
    gm = fx.symbolic_trace(copy.deepcopy(model))
    ShapeProp(gm).propagate(x)
    return gm


def _marked(gm):
    return sorted(n.name for n in gm.graph.nodes if float_reason(n) is not None)


@pytest.mark.parametrize("size", [8, 16])
def test_only_wide_averages_are_marked(size):
    gm = _traced(Averages().eval(), torch.randn(2, 3, size, size))
    result = requantize_wide_averages(gm, X86)
    assert result.modified
    wide_adaptive = (size // 4) ** 2 >= MIN_AVERAGED_VALUES
    assert _marked(gm) == sorted(["global_pool", "mean"] + (["adaptive_avg_pool2d"] if wide_adaptive else []))
    assert all("averages" in float_reason(n) for n in gm.graph.nodes if float_reason(n))


def test_graph_and_float_numerics_unchanged_and_idempotent():
    model, x = Averages().eval(), torch.randn(2, 3, 16, 16)
    gm = _traced(model, x)
    code = gm.code
    requantize_wide_averages(gm, X86)
    assert gm.code == code
    assert not requantize_wide_averages(gm, X86).modified
    for got, expected in zip(gm(x), model(x)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_squeeze_excite_pool_stays_int8():
    class SqueezeExcite(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.conv(x)
            return y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))

    gm = _traced(SqueezeExcite().eval(), torch.randn(1, 3, 16, 16))
    assert not requantize_wide_averages(gm, X86).modified


def test_no_match_without_averages():
    gm = _traced(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8))
    assert not requantize_wide_averages(gm, X86).modified


class PoolHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def _quantize(model, calibration):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        return fxq.quantize(model, calibration[0], calibration)


def test_wide_pool_runs_float_and_beats_int8_pooling(monkeypatch):
    torch.manual_seed(0)
    model, calibration = PoolHead().eval(), [(torch.randn(8, 3, 16, 16),) for _ in range(8)]
    x = torch.randn(32, 3, 16, 16)
    qmodel = _quantize(model, calibration)
    pool_kinds = [type(m).__name__ for name, m in qmodel.model.named_modules() if "pool" in name]
    assert "FloatOp" in pool_kinds  # a bare AdaptiveAvgPool2d would run on int8 despite a None qconfig
    report = fxq.report(qmodel)
    assert (report.quantize_ops, report.dequantize_ops) == (2, 2)
    every_pass = pipeline.passes_for
    monkeypatch.setattr(pipeline, "passes_for",
                        lambda *args, **kwargs: [p for p in every_pass(*args, **kwargs)
                                                 if p[0] != "requantize_wide_averages"])
    int8_pooled = _quantize(model, calibration)
    with torch.no_grad():
        reference = model(x)
        assert sqnr_db(reference, qmodel(x)) > sqnr_db(reference, int8_pooled(x)) + 3.0
