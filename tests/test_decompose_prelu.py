"""decompose_prelu: PReLU -> relu(x) + (-a) * relu(-x), exact in float, sound in int8."""
import copy
import warnings

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxq.passes.base import float_reason
from fxq.passes.decompose_prelu import decompose_prelu

CONV_BY_RANK = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
FUSED_BY_RANK = {2: nni.LinearReLU, 3: nni.ConvReLU1d, 4: nni.ConvReLU2d, 5: nni.ConvReLU3d}


def traced(model, *inputs):
    """What the pipeline hands a pass: a traced private copy with shapes propagated."""
    gm = fx.symbolic_trace(copy.deepcopy(model))
    ShapeProp(gm).propagate(*inputs)
    return gm


def op_sequence(gm):
    """The graph's computation as (op, module type or function name) pairs."""
    ops = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            ops.append((node.op, type(gm.get_submodule(node.target)).__name__))
        elif node.op in ("call_function", "call_method"):
            ops.append((node.op, getattr(node.target, "__name__", str(node.target))))
    return ops


def prelu_model(rank, channels, num_slopes, low, high):
    model = nn.Sequential(nn.PReLU(num_slopes)).eval()
    with torch.no_grad():
        model[0].weight.uniform_(low, high)
    shape = [4, channels] + [3] * (rank - 2)
    return model, torch.randn(shape) * 3


class FunctionalPrelu(nn.Module):
    def __init__(self, slopes):
        super().__init__()
        self.slopes = nn.Parameter(slopes)

    def forward(self, x):
        return F.prelu(x, self.slopes) * 2


class FusedModulesAsLeaves(fx.Tracer):
    """symbolic_trace would inline ConvReLU2d & co. (they are Sequentials); the pass calls them."""

    def is_leaf_module(self, module, qualified_name):
        return isinstance(module, nni._FusedModule) or super().is_leaf_module(module, qualified_name)


class ExpectedDecomposition(nn.Module):
    """The hand-written shape the pass should produce for a rank-``rank`` input."""

    def __init__(self, rank, channels):
        super().__init__()
        affine = nn.Linear(channels, channels) if rank == 2 else CONV_BY_RANK[rank](channels, channels, 1)
        self.pos = nn.ReLU()
        self.negrelu = FUSED_BY_RANK[rank](copy.deepcopy(affine), nn.ReLU())
        self.slope = affine

    def forward(self, x):
        return self.pos(x) + self.slope(self.negrelu(x))


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_before_expected(rank):
    model, x = prelu_model(rank, channels=5, num_slopes=5, low=0.0, high=1.0)
    gm = traced(model, x)
    result = decompose_prelu(gm)
    assert result.modified and len(result.changes) == 1
    expected_model = ExpectedDecomposition(rank, 5)
    expected = fx.GraphModule(expected_model, FusedModulesAsLeaves().trace(expected_model))
    assert op_sequence(gm) == op_sequence(expected)
    assert {"0_pos", "0_negrelu", "0_slope"} <= set(dict(gm.named_children()))
    new_nodes = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert all(n.meta["fxq"]["changed_by"] == "decompose_prelu" for n in new_nodes)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("single_slope", [True, False])
@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-2.0, -0.1), (1.0, 3.0)])
def test_exact_in_float(rank, single_slope, low, high):
    torch.manual_seed(rank)
    channels = int(torch.randint(1, 9, (1,)))
    model, x = prelu_model(rank, channels, 1 if single_slope else channels, low, high)
    gm = traced(model, x)
    assert decompose_prelu(gm).modified
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("rank", [2, 4])
def test_functional_prelu_with_parameter_slopes(rank):
    torch.manual_seed(0)
    model = FunctionalPrelu(torch.rand(6)).eval()
    x = torch.randn([3, 6] + [4] * (rank - 2))
    gm = traced(model, x)
    assert decompose_prelu(gm).modified
    assert ("call_function", "prelu") not in op_sequence(gm)
    assert {"prelu_pos", "prelu_negrelu", "prelu_slope"} <= set(dict(gm.named_children()))
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_shared_prelu_module_decomposed_at_each_call_site():
    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.PReLU(4, init=0.3)

        def forward(self, x):
            return self.act(x) - self.act(x * 2)

    model, x = TwoCalls().eval(), torch.randn(2, 4, 3, 3)
    gm = traced(model, x)
    assert len(decompose_prelu(gm).changes) == 2
    assert ("call_module", "PReLU") not in op_sequence(gm)
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_no_match_leaves_graph_unchanged():
    model, x = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval(), torch.randn(1, 3, 4, 4)
    gm = traced(model, x)
    before = op_sequence(gm)
    result = decompose_prelu(gm)
    assert not result.modified and result.changes == []
    assert op_sequence(gm) == before


def test_idempotent():
    model, x = prelu_model(4, channels=3, num_slopes=1, low=0.0, high=1.0)
    gm = traced(model, x)
    assert decompose_prelu(gm).modified
    ShapeProp(gm).propagate(x)
    assert not decompose_prelu(gm).modified
    gm.graph.lint()


class RuntimeSlopes(nn.Module):
    def __init__(self):
        super().__init__()
        self.raw = nn.Parameter(torch.rand(3))

    def forward(self, x):
        return F.prelu(x, self.raw.sigmoid())


def with_hook(module):
    module.register_forward_hook(lambda *_: None)
    return module


@pytest.mark.parametrize(
    "model, x, reason",
    [
        (nn.Sequential(nn.PReLU()), torch.randn(5), "rank 1"),  # no batch dim
        (nn.Sequential(nn.PReLU(2)), torch.randn(1, 2, 1, 1, 1, 2), "rank 6"),
        (RuntimeSlopes(), torch.randn(2, 3), "computed at run time"),
        (nn.Sequential(with_hook(nn.PReLU())), torch.randn(2, 3), "forward hooks"),
    ],
)
def test_undecomposable_prelu_kept_float(model, x, reason):
    gm = traced(model.eval(), x)
    before = op_sequence(gm)
    assert not decompose_prelu(gm).modified
    assert op_sequence(gm) == before
    prelu_node = next(n for n in gm.graph.nodes if "prelu" in n.name.lower() or n.target == "0")
    assert reason in float_reason(prelu_node)


def test_unknown_shape_kept_float():
    model = nn.Sequential(nn.PReLU()).eval()
    gm = fx.symbolic_trace(model)  # no ShapeProp
    assert not decompose_prelu(gm).modified
    assert "shape is unknown" in float_reason(next(n for n in gm.graph.nodes if n.op == "call_module"))


class ConvBnPrelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.PReLU(16)
        self.head = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


def quantize_int8(model, example):
    threads = torch.get_num_threads()
    # Tiny tensors: one thread is ~100x faster than several on a loaded CI machine.
    torch.set_num_threads(1)
    try:
        return _calibrate_and_convert(model, example)
    finally:
        torch.set_num_threads(threads)


def _calibrate_and_convert(model, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,))
        for _ in range(20):
            prepared(torch.randn_like(example))
        return convert_fx(prepared)


def sqnr_db(reference, quantized):
    return (10 * torch.log10(reference.pow(2).sum() / (reference - quantized).pow(2).sum())).item()


@pytest.mark.slow
def test_int8_after_decomposition_beats_torch_prelu_kernel():
    torch.manual_seed(0)
    model = ConvBnPrelu().train()
    for _ in range(5):
        model(torch.randn(8, 3, 8, 8))
    model.eval()
    with torch.no_grad():
        model.act.weight.uniform_(0.05, 0.5)  # trained-like slopes, all below 1
    example, x = torch.randn(8, 3, 8, 8), torch.randn(16, 3, 8, 8)
    gm = traced(model, example)
    assert decompose_prelu(gm).modified
    reference = model(x)
    quantized = quantize_int8(gm, example)
    # Every piece of the decomposition became one int8 module.
    assert type(quantized.act_negrelu).__module__.startswith("torch.ao.nn.intrinsic.quantized")
    assert type(quantized.act_slope).__module__.startswith("torch.ao.nn.quantized")
    fxq_db = sqnr_db(reference, quantized(x))
    plain_db = sqnr_db(reference, quantize_int8(copy.deepcopy(model), example)(x))
    print(f"int8 SQNR: decomposed PReLU {fxq_db:.1f} dB, torch PReLU {plain_db:.1f} dB")
    assert fxq_db >= 25
    assert plain_db < fxq_db - 10
