"""run_passes' float-equivalence check: a wrong rewrite is caught, float32 rounding is not."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxq
from fxq import pipeline
from fxq.passes.base import PassResult


def _scale_first_conv(factor):
    def broken_pass(gm):
        conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            conv.weight.mul_(factor)
        return PassResult(gm, True, [f"scaled conv weights by {factor}"])
    return broken_pass


def _run_with(monkeypatch, extra_pass, model, x):
    every_pass = pipeline.passes_for
    monkeypatch.setattr(pipeline, "passes_for", lambda *a, **k: [("extra", extra_pass), *every_pass(*a, **k)])
    return pipeline.run_passes(fx.symbolic_trace(model), (x,), fxq.get_backend("x86"))


def test_wrong_rewrite_raises_naming_the_pass(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with pytest.raises(fxq.RewriteError, match="pass 'extra' changed the float model's output"):
        _run_with(monkeypatch, _scale_first_conv(1.01), model, torch.randn(2, 3, 8, 8))


def test_rounding_sized_change_passes(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    _run_with(monkeypatch, _scale_first_conv(1 + 1e-7), model, torch.randn(2, 3, 8, 8))
