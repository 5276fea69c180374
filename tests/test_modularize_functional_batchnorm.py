"""modularize_functional_batchnorm (timm's BatchNormAct calls F.batch_norm) and
read_shapes_from_int8 (shape reads need no dequantize)."""
import copy
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import fxq
from fxq.passes.modularize_functional_batchnorm import modularize_functional_batchnorm
from fxq.passes.read_shapes_from_int8 import read_shapes_from_int8
from metrics import sqnr_db


class BatchNormAct2d(nn.BatchNorm2d):
    """As timm writes it: a BatchNorm2d subclass whose forward asserts the rank, calls
    F.batch_norm itself and applies an activation module."""

    def __init__(self, channels, affine=True, weight_scale=None):
        super().__init__(channels, affine=affine)
        self.act = nn.ReLU()
        self.weight_scale = weight_scale

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        weight = self.weight if self.weight_scale is None else self.weight * self.weight_scale
        x = F.batch_norm(x, self.running_mean, self.running_var, weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


class TimmStyleNet(nn.Module):
    def __init__(self, weight_scale=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), BatchNormAct2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), BatchNormAct2d(16, affine=False)
        self.conv3 = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = BatchNormAct2d(8, weight_scale=weight_scale)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def _with_statistics(model):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _traced(model, x):
    gm = fx.symbolic_trace(copy.deepcopy(model))
    ShapeProp(gm).propagate(x)
    return gm


def _batch_norm_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm]


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 3), size=st.integers(4, 12), seed=st.integers(0, 100))
def test_functional_batch_norm_becomes_a_module_exactly(batch, size, seed):
    torch.manual_seed(seed)
    model, x = _with_statistics(TimmStyleNet()), torch.randn(batch, 3, size, size)
    gm = _traced(model, x)
    assert len(_batch_norm_calls(gm)) == 3
    result = modularize_functional_batchnorm(gm)
    assert result.modified and len(result.changes) == 3 and not _batch_norm_calls(result.graph_module)
    modules = [type(result.graph_module.get_submodule(n.target)) for n in result.graph_module.graph.nodes
               if n.op == "call_module"]
    assert modules.count(nn.BatchNorm2d) == 3
    assert torch.equal(result.graph_module(x), model(x))
    assert not modularize_functional_batchnorm(result.graph_module).modified


def test_weights_computed_at_run_time_stay_functional():
    model, x = _with_statistics(TimmStyleNet(weight_scale=2.0)), torch.randn(1, 3, 8, 8)
    result = modularize_functional_batchnorm(_traced(model, x))
    assert len(_batch_norm_calls(result.graph_module)) == 1  # bn3's weight is self.weight * 2
    assert torch.equal(result.graph_module(x), model(x))


def test_timm_style_batch_norms_fold_and_run_without_float_islands():
    torch.manual_seed(0)
    model = _with_statistics(TimmStyleNet())
    batches = [torch.randn(4, 3, 12, 12) for _ in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        qmodel = fxq.quantize(model, batches[0][:1], calibration_data=batches)
    report = fxq.report(qmodel)
    assert not [n for n in report.float_nodes if "batch_norm" in n.reason]
    # the rank asserts read the int8 tensors: one quantize in, one dequantize out (plus the head's pool)
    assert report.dequantize_ops <= 2 and report.quantize_ops <= 2
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert sqnr_db(model(x), qmodel(x)) >= 25.0


def test_shape_reads_move_to_the_int8_tensor():
    graph = fx.Graph()
    x = graph.placeholder("x")
    quantized = graph.call_function(torch.quantize_per_tensor, (x, 0.1, 0, torch.quint8))
    dequantized = graph.call_method("dequantize", (quantized,))
    ndim = graph.call_function(getattr, (dequantized, "ndim"))
    size = graph.call_method("size", (dequantized, 1))
    graph.output((ndim, size))
    gm = fx.GraphModule(nn.Module(), graph)
    expected = gm(torch.randn(2, 5, 3))
    result = read_shapes_from_int8(gm)
    assert result.modified
    assert not [n for n in result.graph_module.graph.nodes if n.target == "dequantize"]
    assert result.graph_module(torch.randn(2, 5, 3)) == expected == (3, 5)
    assert not read_shapes_from_int8(result.graph_module).modified
