"""place_float_islands (which nodes run float, with few transitions) and run_shared_ops_in_int8."""
import copy
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import fxq
from fxq import pipeline, quant, stages
from fxq.calibrate import calibrate
from fxq.float_op import FloatOp
from fxq.passes.base import float_reason
from fxq.passes.place_float_islands import GROWN_REASON, INPUT_REASON, decide_float_nodes, place_float_islands
from fxq.passes.run_shared_ops_in_int8 import run_shared_ops_in_int8

X86 = fxq.get_backend("x86")


class Sandwich(nn.Module):
    """sin and softplus (no x86 kernels) around a cheap reshape, and around a conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Softplus()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        x = torch.sin(self.conv1(x))
        x = x.reshape(x.shape[0], 8, -1).reshape(x.shape)  # cheap, between two float ops
        x = self.act(x)
        x = torch.sin(self.conv2(x))  # conv2 sits between float ops but is heavy: stays int8
        return self.conv3(x)


def _traced(model, x):
    gm = fx.symbolic_trace(copy.deepcopy(model))
    ShapeProp(gm).propagate(x)
    return gm


def _float_nodes(gm):
    return {n.name: float_reason(n) for n in gm.graph.nodes if float_reason(n) is not None}


def test_islands_grow_over_cheap_ops_but_not_heavy_ones():
    model, x = Sandwich().eval(), torch.randn(2, 3, 8, 8)
    gm = _traced(model, x)
    floats = {node.name: reason for node, reason in decide_float_nodes(gm, X86).items()}
    assert floats["reshape"] == floats["reshape_1"] == GROWN_REASON
    assert "no int8 kernel" in floats["sin"] and "no int8 kernel" in floats["act"]
    assert not any(name.startswith("conv") for name in floats)
    assert place_float_islands(gm, X86).modified
    # Function calls and parameterless modules become opaque FloatOp leaves; convs are untouched.
    wrapped = [type(m.target) for m in gm.modules() if isinstance(m, FloatOp)]
    assert nn.Softplus in wrapped
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("conv")] == [
        "conv1", "conv2", "conv3"]
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    gm.graph.lint()


def test_idempotent_and_no_match():
    model, x = Sandwich().eval(), torch.randn(1, 3, 8, 8)
    gm = _traced(model, x)
    place_float_islands(gm, X86)
    ShapeProp(gm).propagate(x)
    assert not place_float_islands(gm, X86).modified
    plain = _traced(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), x)
    assert not place_float_islands(plain, X86).modified


def test_grown_island_saves_transitions_in_the_int8_model():
    torch.manual_seed(0)
    model, x = Sandwich().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        report = fxq.report(fxq.quantize(model, x))
    # int8 in -> conv1 -> [sin, reshapes, softplus] float -> conv2 -> [sin] float -> conv3 -> out
    assert (report.quantize_ops, report.dequantize_ops) == (3, 3)


class NormalizedInput(nn.Module):
    """Input preprocessing in forward: a normalizing BatchNorm, then a shift and a scale."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv((self.bn(x) + 0.25) * 0.5)


class InputSharedWithConv(nn.Module):
    """The raw input also feeds an int8 conv: it is quantized anyway, so the BN stays int8."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv_a, self.conv_b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv_a(self.bn(x)) + self.conv_b(x)


def _with_running_stats(model):
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_input_preprocessing_runs_float_and_is_quantized_once():
    torch.manual_seed(0)
    model, x = _with_running_stats(NormalizedInput()), torch.randn(2, 3, 8, 8)
    floats = {node.name: reason for node, reason in decide_float_nodes(_traced(model, x), X86).items()}
    assert floats == {"bn": INPUT_REASON, "add": INPUT_REASON, "mul": INPUT_REASON}
    batches = [torch.randn(2, 3, 8, 8) for _ in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        report = fxq.report(fxq.quantize(model, x, calibration_data=batches))
    assert (report.quantize_ops, report.dequantize_ops) == (1, 1)  # in int8: the same count


def test_input_preprocessing_stays_int8_when_the_input_is_quantized_anyway():
    torch.manual_seed(0)
    model, x = _with_running_stats(InputSharedWithConv()), torch.randn(2, 3, 8, 8)
    floats = decide_float_nodes(_traced(model, x), X86)
    assert not floats  # float would add a quantize of the BN's output to the input's


class ZeroPadded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.conv2(F.pad(torch.relu(self.conv1(x)), (0, 1, 0, 1)))  # asymmetric: no conv padding absorbs it


def _converted_without_passthrough(model, x):
    gm, _ = pipeline.run_passes(fx.symbolic_trace(copy.deepcopy(model)), (x,), X86)
    with stages.quantized_engine(X86.engine):
        prepared = stages.prepare_unit(gm, (x,), X86)
        calibrate(prepared, [(x,)], progress=False)
        return quant.convert(prepared, X86.backend_config)


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target == target)


def test_zero_pad_runs_on_int8_exactly():
    torch.manual_seed(0)
    model, x = ZeroPadded().eval(), torch.randn(2, 3, 10, 10)
    converted = _converted_without_passthrough(model, x)
    assert _count(converted, "dequantize") == 2  # torch leaves dequantize -> pad -> quantize
    with stages.quantized_engine(X86.engine), torch.no_grad():
        expected = converted(x)
        result = run_shared_ops_in_int8(copy.deepcopy(converted), X86.int8_passthrough_ops)
        assert result.modified and _count(result.graph_module, "dequantize") == 1
        assert torch.equal(result.graph_module(x), expected)  # same qparams: bit-exact
        assert not run_shared_ops_in_int8(result.graph_module, X86.int8_passthrough_ops).modified


def test_depthwise_convs_without_a_fast_fbgemm_kernel_run_float():
    """fbgemm's generic path for a 9x9 depthwise conv measured 460x slower than fp32, 5x5 at dilation 2 166x."""
    model = nn.Sequential(nn.Conv2d(16, 16, 7, padding=3, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 16, 9, padding=4, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 16, 9, padding=4), nn.ReLU(),  # not depthwise: int8
                          nn.Conv2d(16, 16, 3, padding=4, dilation=4, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 16, 5, padding=4, dilation=2, groups=16)).eval()
    x = torch.randn(1, 16, 12, 12)
    gm, _ = pipeline.run_passes(fx.symbolic_trace(copy.deepcopy(model)), (x,), X86)
    floats = {str(node.target): reason for node, reason in decide_float_nodes(gm, X86).items()
              if node.op == "call_module"}
    assert list(floats) == ["2", "8"]
    assert "depthwise 9x9 conv" in floats["2"] and "depthwise 5x5 dilation 2 conv" in floats["8"]


class ReadsWeightDevice(nn.Module):
    """As timm's EdgeNeXt positional encoding: reads a conv's weight besides calling the conv."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        bias = torch.zeros(1, 8, 1, 1, device=self.proj.weight.device)
        return self.conv(torch.relu(self.proj(x) + bias))


def test_a_module_whose_weights_the_graph_reads_stays_float():
    torch.manual_seed(0)
    model, batches = ReadsWeightDevice().eval(), [torch.randn(2, 3, 8, 8) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        qmodel = fxq.quantize(model, batches[0], calibration_data=batches)
    reasons = {node.target: node.reason for node in fxq.report(qmodel).float_nodes}
    assert "reads this module's tensors directly" in reasons["proj"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(qmodel(x)).all() and float(((model(x) - qmodel(x)) ** 2).mean()) < 1e-2
