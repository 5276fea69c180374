"""modularize_functional_convs: functional convs on stored weights -> nn modules, zero pads folded."""
from __future__ import annotations

import math
import random
import statistics
import time
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from torch.testing import assert_close

from fxq.passes.modularize_functional_convs import modularize_functional_convs

EXACT = {"rtol": 0.0, "atol": 0.0}


class Conv2dStaticSame(nn.Conv2d):
    """TF "same" padding as ported EfficientNet/MobileNet code writes it: pads fixed in __init__."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=True, size=(32, 32), dilation=1,
                 functional_padding=0):
        super().__init__(cin, cout, k, stride, 0, dilation, groups, bias)
        self.functional_padding = functional_padding
        pads = []
        for extent in reversed(size):  # F.pad order: last dim first
            total = max((math.ceil(extent / stride) - 1) * stride + (k - 1) * dilation + 1 - extent, 0)
            pads += [total // 2, total - total // 2]
        self.pads = tuple(pads)

    def forward(self, x):
        x = F.pad(x, self.pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.functional_padding,
                        self.dilation, self.groups)


class FunctionalZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4, 3))
        self.w3 = nn.Parameter(torch.randn(3, 2, 3, 3, 3))
        self.b3 = nn.Parameter(torch.randn(3))
        self.wt = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.register_buffer("wl", torch.randn(5, 16))
        self.register_buffer("bl", torch.randn(5))

    def forward(self, x1, x3, x2, v):
        a = F.conv1d(x1, self.w1, None, 1, 1)
        b = torch.conv3d(x3, self.w3, self.b3, stride=2, padding="valid")
        c = F.conv_transpose2d(x2, self.wt, stride=2, padding=1, output_padding=1)
        d = F.linear(v, self.wl, self.bl)
        return a, b, c, d


def zoo_inputs():
    return (torch.randn(2, 4, 16), torch.randn(1, 2, 5, 6, 7), torch.randn(2, 4, 8, 8), torch.randn(3, 16))


class ZeroPadThenConv(nn.Module):
    def __init__(self, pad: nn.Module):
        super().__init__()
        self.pad, self.conv = pad, nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.pad(x))


class RuntimeWeight(nn.Module):
    """Masked and standardized weights are computed in the graph: not get_attr, left alone."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.register_buffer("mask", (torch.rand(4, 3, 3, 3) > 0.3).float())

    def forward(self, x):
        w = self.weight
        standardized = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, self.weight * self.mask, padding=1) + F.conv2d(x, standardized, padding=1)


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1) + F.conv2d(x, self.weight, padding=2, dilation=2)


class DynamicPad(nn.Conv2d):
    """Pad amounts computed from x.shape are Proxies, not constants: the pad must stay."""

    def forward(self, x):
        p = x.shape[-1] // 16
        return F.conv2d(F.pad(x, (p, p, p, p)), self.weight, self.bias)


def trace(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    gm = fx.symbolic_trace(model.eval())
    ShapeProp(gm).propagate(*inputs)
    return gm


def op_sequence(gm: fx.GraphModule) -> list[str]:
    ops = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            ops.append(type(gm.get_submodule(node.target)).__name__)
        elif node.op == "call_function":
            ops.append(node.target.__name__)
        elif node.op in ("call_method", "get_attr"):
            ops.append(f"{node.op}:{node.target}" if node.op == "call_method" else "get_attr")
    return ops


def modules_of(gm: fx.GraphModule, kind: type) -> list[nn.Module]:
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and type(gm.get_submodule(n.target)) is kind]


def run_pass(model: nn.Module, *inputs: torch.Tensor):
    """Trace, run the pass, check numerics against eager; return (gm, result)."""
    gm = trace(model, *inputs)
    result = modularize_functional_convs(gm)
    with torch.no_grad():
        assert_close(gm(*inputs), model(*inputs))
    return gm, result


# --- Before / Expected ------------------------------------------------------------------

def test_static_same_stride1_becomes_conv2d_with_the_pad_folded():
    torch.manual_seed(0)
    model, x = Conv2dStaticSame(3, 8, 3, stride=1), torch.randn(2, 3, 32, 32)
    gm, result = run_pass(model, x)
    expected = trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), x)
    assert result.modified and op_sequence(gm) == op_sequence(expected) == ["Conv2d"]
    (conv,) = modules_of(gm, nn.Conv2d)
    assert conv.padding == (1, 1) and conv.stride == (1, 1)
    assert conv.weight is model.weight and conv.bias is model.bias  # same Parameters, no copy
    with torch.no_grad():
        assert_close(gm(x), model(x), **EXACT)  # dilation 1 fold: bitwise on this torch


def test_static_same_stride2_keeps_the_asymmetric_pad():
    torch.manual_seed(0)
    model, x = Conv2dStaticSame(3, 8, 3, stride=2), torch.randn(2, 3, 32, 32)
    gm, result = run_pass(model, x)
    assert model.pads == (0, 1, 0, 1)
    assert result.modified and op_sequence(gm) == ["pad", "Conv2d"]
    (conv,) = modules_of(gm, nn.Conv2d)
    assert conv.padding == (0, 0) and conv.stride == (2, 2)
    with torch.no_grad():
        assert_close(gm(x), model(x), **EXACT)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert node.meta["fxq"]["changed_by"] == "modularize_functional_convs"
    assert node.meta["tensor_meta"].shape == (2, 8, 16, 16)  # ShapeProp's record carried over


def test_depthwise_without_bias():
    torch.manual_seed(0)
    model, x = Conv2dStaticSame(16, 16, 5, stride=2, groups=16, bias=False), torch.randn(1, 16, 32, 32)
    gm, _ = run_pass(model, x)
    (conv,) = modules_of(gm, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.groups, conv.bias) == (16, 16, 16, None)
    assert op_sequence(gm) == ["pad", "Conv2d"]  # (1, 2, 1, 2): asymmetric


def test_functional_conv1d_conv3d_conv_transpose2d_linear():
    torch.manual_seed(0)
    model, inputs = FunctionalZoo(), zoo_inputs()
    gm, result = run_pass(model, *inputs)
    assert len(result.changes) == 4
    assert op_sequence(gm) == ["Conv1d", "Conv3d", "ConvTranspose2d", "Linear"]
    conv_t = modules_of(gm, nn.ConvTranspose2d)[0]
    assert (conv_t.in_channels, conv_t.out_channels, conv_t.output_padding) == (4, 3, (1, 1))
    assert modules_of(gm, nn.Conv1d)[0].weight is model.w1
    assert modules_of(gm, nn.Conv3d)[0].padding == (0, 0, 0)  # "valid"
    linear = modules_of(gm, nn.Linear)[0]
    assert linear.weight.data_ptr() == model.wl.data_ptr() and not linear.weight.requires_grad
    with torch.no_grad():
        assert_close(gm(*inputs), model(*inputs), **EXACT)


def test_shared_weight_gets_one_module_per_call_sharing_the_parameter():
    torch.manual_seed(0)
    model, x = SharedWeight(), torch.randn(1, 3, 12, 12)
    gm, _ = run_pass(model, x)
    first, second = modules_of(gm, nn.Conv2d)
    assert first is not second and first.weight is second.weight is model.weight
    assert (first.padding, second.padding, second.dilation) == ((1, 1), (2, 2), (2, 2))


class SamePaddingString(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, k)

    def forward(self, x):
        return F.conv2d(input=F.pad(x, (1, 1)), weight=self.conv.weight, padding="same")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("k, padding, ops", [
    (3, (1, 2), ["Conv2d"]),  # symmetric "same" becomes ints, then the W pad folds in
    (4, "same", ["pad", "Conv2d"]),  # even kernel: "same" pads asymmetrically, kept as the string
])
def test_padding_same_string_keyword_args_and_unbatched_input(k, padding, ops):
    torch.manual_seed(0)
    model, x = SamePaddingString(k), torch.randn(3, 9, 7)  # unbatched (C, H, W)
    gm, _ = run_pass(model, x)
    assert op_sequence(gm) == ops and modules_of(gm, nn.Conv2d)[0].padding == padding


def test_new_module_follows_the_train_eval_mode():
    model = Conv2dStaticSame(3, 4, 3)
    gm = fx.symbolic_trace(model.train())
    modularize_functional_convs(gm)
    assert modules_of(gm, nn.Conv2d)[0].training


def test_symmetric_zero_pad_module_folds_into_a_new_conv():
    torch.manual_seed(0)
    model, x = ZeroPadThenConv(nn.ZeroPad2d(2)), torch.randn(1, 3, 10, 10)
    gm, result = run_pass(model, x)
    assert result.modified and op_sequence(gm) == ["Conv2d"]
    (conv,) = modules_of(gm, nn.Conv2d)
    assert conv.padding == (3, 3) and conv.weight is model.conv.weight
    assert model.conv.padding == (1, 1)  # the user's module is not mutated


def test_pad_chain_and_conv_chain_fold_in_one_run():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.ZeroPad2d(1), nn.ConstantPad2d((2, 2, 0, 0), 0.0), nn.Conv2d(3, 4, 3))
    model, x = nn.Sequential(chain, Conv2dStaticSame(4, 4, 3, size=(14, 12))), torch.randn(1, 3, 10, 6)
    gm, _ = run_pass(model, x)
    assert op_sequence(gm) == ["Conv2d", "Conv2d"]
    assert [c.padding for c in modules_of(gm, nn.Conv2d)] == [(1, 3), (1, 1)]


# --- no match ---------------------------------------------------------------------------

@pytest.mark.parametrize("model_fn, shape", [
    (RuntimeWeight, (1, 3, 8, 8)),
    (lambda: ZeroPadThenConv(nn.ZeroPad2d((0, 1, 0, 1))), (1, 3, 8, 8)),  # asymmetric
    (lambda: ZeroPadThenConv(nn.ConstantPad2d(1, 0.5)), (1, 3, 8, 8)),  # not a zero pad
    (lambda: nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, 4, 3)), (1, 3, 8, 8)),
    (lambda: nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(3, 4, 3, padding_mode="reflect")), (1, 3, 8, 8)),
    (lambda: nn.Sequential(nn.ZeroPad2d(1), nn.ConvTranspose2d(3, 4, 3)), (1, 3, 8, 8)),
])
def test_no_match_leaves_the_graph_unchanged(model_fn, shape):
    torch.manual_seed(0)
    model, x = model_fn(), torch.randn(shape)
    before = op_sequence(trace(model, x))
    gm, result = run_pass(model, x)
    assert not result.modified and result.changes == [] and op_sequence(gm) == before


def test_pad_amounts_computed_from_the_input_shape_stay():
    model, x = DynamicPad(3, 4, 3), torch.randn(1, 3, 32, 32)
    gm, result = run_pass(model, x)
    assert result.modified and "pad" in op_sequence(gm) and "Conv2d" in op_sequence(gm)


# --- idempotence ------------------------------------------------------------------------

@pytest.mark.parametrize("model_fn, inputs_fn", [
    (lambda: Conv2dStaticSame(3, 8, 3, stride=2), lambda: (torch.randn(1, 3, 32, 32),)),
    (lambda: Conv2dStaticSame(3, 8, 3, stride=1), lambda: (torch.randn(1, 3, 32, 32),)),
    (FunctionalZoo, zoo_inputs),
    (lambda: ZeroPadThenConv(nn.ZeroPad2d(1)), lambda: (torch.randn(1, 3, 8, 8),)),
    (SharedWeight, lambda: (torch.randn(1, 3, 8, 8),)),
])
def test_second_run_changes_nothing(model_fn, inputs_fn):
    torch.manual_seed(0)
    model, inputs = model_fn(), inputs_fn()
    gm, first = run_pass(model, *inputs)
    ShapeProp(gm).propagate(*inputs)
    before = op_sequence(gm)
    second = modularize_functional_convs(gm)
    gm.graph.lint()
    assert first.modified and not second.modified and op_sequence(gm) == before


# --- random shapes ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(10))
def test_random_static_same_convs_match_eager(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cin = rng.choice([1, 3, 8])
    groups = rng.choice([1, cin])
    k, stride, dilation = rng.choice([1, 2, 3, 5]), rng.choice([1, 2]), rng.choice([1, 2])
    size = (rng.randint(5, 33), rng.randint(5, 33))
    cout = cin * rng.choice([1, 2]) if groups > 1 else rng.choice([4, 6])
    model = Conv2dStaticSame(cin, cout, k, stride, groups, rng.random() < 0.5, size, dilation)
    x = torch.randn(rng.randint(1, 3), cin, *size)
    gm, result = run_pass(model, x)  # assert_close default float32 tolerance
    assert result.modified and op_sequence(gm)[-1] == "Conv2d"
    assert ("pad" in op_sequence(gm)) == (model.pads[0::2] != model.pads[1::2])


# --- quantization -----------------------------------------------------------------------

def separable_block(cin, cout, stride, size, padding_arg):
    return nn.Sequential(
        Conv2dStaticSame(cin, cin, 3, stride, groups=cin, bias=False, size=(size, size),
                         functional_padding=padding_arg),
        nn.BatchNorm2d(cin), nn.ReLU(),
        Conv2dStaticSame(cin, cout, 1, bias=False, size=(size // stride,) * 2,
                         functional_padding=padding_arg),
        nn.BatchNorm2d(cout), nn.ReLU())


class SeparableNet(nn.Module):
    def __init__(self, padding_arg=0):
        super().__init__()
        self.stem = Conv2dStaticSame(3, 16, 3, 2, size=(64, 64), functional_padding=padding_arg)
        widths = [(16, 32, 1, 32), (32, 64, 2, 32), (64, 64, 1, 16), (64, 128, 2, 16)]
        self.blocks = nn.Sequential(*[separable_block(*w, padding_arg) for w in widths])
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


def separable_net(padding_arg=0) -> nn.Module:
    torch.manual_seed(0)
    model = SeparableNet(padding_arg).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return model


def quantize(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,))
        with torch.no_grad():
            for _ in range(2):
                prepared(torch.randn(2, *example.shape[1:]))
        return convert_fx(prepared)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return 20 * math.log10(reference.norm() / (reference - approx).norm())


@pytest.fixture(scope="module")
def quantized_after_pass():
    """(float model, its int8 version after this pass); padding passed as literal 0, as ported code does."""
    model, x = separable_net(), torch.randn(1, 3, 64, 64)
    gm, result = run_pass(model, x)
    assert len(result.changes) == 9
    return model, quantize(gm, x)


def test_quantizes_to_int8_conv_modules_with_good_sqnr(quantized_after_pass):
    from torch.ao.nn.quantized import Conv2d as QuantizedConv2d
    model, quantized = quantized_after_pass
    convs = [m for m in quantized.modules() if isinstance(m, QuantizedConv2d)]
    assert len(convs) == 9  # every former functional conv, fused with its BN + ReLU
    test_x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert sqnr_db(model(test_x), quantized(test_x)) >= 25


def test_report_fp32_vs_int8_latency_with_and_without_the_pass(quantized_after_pass):
    """Measured, not asserted. The baseline passes padding (0, 0): with a literal int 0,
    torch's functional-conv lowering fails in conv2d_prepack (needs a list) without this pass."""
    model, with_pass = quantized_after_pass
    x = torch.randn(1, 3, 64, 64)
    without_pass = quantize(separable_net(padding_arg=(0, 0)), x)
    runs = {"fp32": model, "int8 without pass": without_pass, "int8 with pass": with_pass}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        medians = median_latencies_ms(runs, x, repeats=20)
    finally:
        torch.set_num_threads(threads)
    for name in ("int8 without pass", "int8 with pass"):
        print(f"fp32 {medians['fp32']:.2f} ms / {name} {medians[name]:.2f} ms = "
              f"{medians['fp32'] / medians[name]:.2f}x")


def median_latencies_ms(runs: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn(x)
        for _ in range(repeats):  # interleaved, so load changes hit every variant alike
            for name, fn in runs.items():
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}
