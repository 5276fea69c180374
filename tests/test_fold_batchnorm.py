"""fold_batchnorm (BN into its conv/Linear producer) and lower_batchnorm (the rest to a channel affine)."""
import copy

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxq.passes.base import float_reason
from fxq.passes.fold_batchnorm import TRANSPOSED_CONV_TYPES, fold_batchnorm
from fxq.passes.lower_batchnorm import lower_batchnorm
from metrics import int8_sqnr_on_fresh_inputs


def traced(model, *inputs):
    """What the pipeline hands a pass: a traced private copy with shapes propagated."""
    gm = fx.symbolic_trace(copy.deepcopy(model))
    ShapeProp(gm).propagate(*inputs)
    return gm


def run(pass_fn, gm, *inputs):
    ShapeProp(gm).propagate(*inputs)
    return pass_fn(gm)


def op_sequence(gm):
    """The graph's computation as (op, module type or function name) pairs."""
    ops = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            ops.append((node.op, type(gm.get_submodule(node.target)).__name__))
        elif node.op in ("call_function", "call_method"):
            ops.append((node.op, getattr(node.target, "__name__", str(node.target))))
    return ops


def with_realistic_stats(model, input_shape, batches=3):
    """Train-mode forwards so BN running stats are not the 0/1 defaults; random affine too."""
    torch.manual_seed(sum(input_shape))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            with torch.no_grad():
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_()
    model.train()
    for _ in range(batches):
        model(torch.randn(input_shape) * 2 + 0.5)
    return model.eval()


def assert_close_to_eager(gm, model, x):
    expected = model(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5 * scale)


FOLD_CASES = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), (4, 3, 9)),
    "conv2d_no_bias": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)), (2, 3, 7, 6)),
    "conv2d_grouped": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8)), (2, 4, 5, 5)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4)), (2, 2, 4, 5, 3)),
    "conv2d_bn_not_affine": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)), (2, 3, 4, 4)),
    "transpose1d": (lambda: nn.Sequential(nn.ConvTranspose1d(3, 4, 3, stride=2), nn.BatchNorm1d(4)), (2, 3, 6)),
    "transpose2d_grouped": (
        lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6)),
        (2, 4, 5, 5),
    ),
    "transpose3d": (lambda: nn.Sequential(nn.ConvTranspose3d(2, 3, 2), nn.BatchNorm3d(3)), (2, 2, 3, 3, 3)),
    "linear_bn1d": (lambda: nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5)), (8, 7)),
    "linear_no_bias_bn_not_affine": (
        lambda: nn.Sequential(nn.Linear(7, 5, bias=False), nn.BatchNorm1d(5, affine=False)),
        (8, 7),
    ),
}


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_fold_numerics(case):
    build, shape = FOLD_CASES[case]
    model = with_realistic_stats(build(), shape)
    x = torch.randn(shape) * 2
    gm = traced(model, x)
    result = fold_batchnorm(gm)
    assert result.modified and len(result.changes) == 1
    assert [op for op, _ in op_sequence(gm)] == ["call_module"]  # BN is gone
    assert_close_to_eager(gm, model, x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())


def random_conv_bn(generator):
    """A random (transposed) conv of rank 1-3 with random groups/bias, then a random BN."""
    def pick(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    dims, groups, transposed = pick(1, 3), pick(1, 2), bool(pick(0, 1))
    in_channels, out_channels = groups * pick(1, 4), groups * pick(1, 4)
    conv_class = getattr(nn, f"{'ConvTranspose' if transposed else 'Conv'}{dims}d")
    conv = conv_class(in_channels, out_channels, pick(1, 3), groups=groups, bias=bool(pick(0, 1)))
    bn = getattr(nn, f"BatchNorm{dims}d")(out_channels, affine=bool(pick(0, 1)))
    shape = (pick(2, 4), in_channels, *[pick(3, 6) for _ in range(dims)])
    return nn.Sequential(conv, bn), shape


def test_fold_numerics_random_convolutions():
    # Measured over 200 such draws: max |fused - eager| <= 4.2e-7 * max|eager|
    # (torch's fuse_conv_bn_eval: 5.9e-7), so 1e-5 leaves a wide margin.
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        model, shape = random_conv_bn(generator)
        model = with_realistic_stats(model, shape)
        x = torch.randn(shape) * 2
        gm = traced(model, x)
        assert fold_batchnorm(gm).modified
        assert_close_to_eager(gm, model, x)


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class ConvRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


def test_fold_before_expected_keeps_conv_name():
    model, x = with_realistic_stats(ConvBnRelu(), (2, 3, 6, 6)), torch.randn(2, 3, 6, 6)
    gm = traced(model, x)
    fold_batchnorm(gm)
    assert op_sequence(gm) == op_sequence(fx.symbolic_trace(ConvRelu()))
    conv_node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert conv_node.target == "conv" and conv_node.meta["fxq"]["changed_by"] == "fold_batchnorm"
    assert gm.conv.weight is not model.conv.weight and not torch.equal(gm.conv.weight, model.conv.weight)


class SharedConv(nn.Module):
    """One conv module called twice; only the first call feeds a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_shared_conv_gets_a_fused_copy():
    model, x = with_realistic_stats(SharedConv(), (2, 3, 4, 4)), torch.randn(2, 3, 4, 4)
    gm = traced(model, x)
    original_weight = gm.conv.weight.detach().clone()
    assert fold_batchnorm(gm).modified
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["conv_bn_folded", "conv"]
    assert torch.equal(gm.conv.weight, original_weight)
    assert_close_to_eager(gm, model, x)


class ConvTwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) * y


class BnFirstThenAfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_sum = nn.BatchNorm2d(3)

    def forward(self, x):
        x = self.bn_in(x)
        return self.bn_sum(self.conv(x) + x)


class BnAfterReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_seq = nn.BatchNorm1d(4)
        self.bn_flat = nn.BatchNorm1d(12)

    def forward(self, x):  # x: (N, 4, 3)
        return self.bn_flat(self.bn_seq(x).flatten(1))


class LinearOnSequenceThenBn(nn.Module):
    """Linear mixes the last dim but BN1d normalizes dim 1: must not fold."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):  # x: (N, 3, 5)
        return self.bn(self.linear(x))


LOWER_CASES = {
    "conv_two_users": (ConvTwoUsers, (2, 3, 6, 6), 1),
    "bn_first_and_after_add": (BnFirstThenAfterAdd, (2, 3, 4, 4), 2),
    "bn1d_3d_input_and_after_flatten": (BnAfterReshape, (5, 4, 3), 2),
    "linear_on_sequence": (LinearOnSequenceThenBn, (4, 3, 5), 1),
    "bn3d_alone": (lambda: nn.Sequential(nn.BatchNorm3d(2)), (2, 2, 3, 3, 3), 1),
}


@pytest.mark.parametrize("case", sorted(LOWER_CASES))
def test_unfoldable_batchnorm_is_lowered(case):
    build, shape, num_bn = LOWER_CASES[case]
    model = with_realistic_stats(build(), shape)
    x = torch.randn(shape) * 2
    gm = traced(model, x)
    before = op_sequence(gm)
    assert not fold_batchnorm(gm).modified
    assert op_sequence(gm) == before
    result = run(lower_batchnorm, gm, x)
    assert result.modified and len(result.changes) == num_bn
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    assert_close_to_eager(gm, model, x)


def test_lower_before_expected():
    model, x = with_realistic_stats(BnFirstThenAfterAdd(), (2, 3, 4, 4)), torch.randn(2, 3, 4, 4)
    gm = traced(model, x)
    lower_batchnorm(gm)
    expected = [
        ("call_module", "Conv2d"),  # bn_in as a depthwise 1x1 conv
        ("call_module", "Conv2d"),
        ("call_function", "add"),
        ("call_module", "Conv2d"),  # bn_sum
    ]
    assert op_sequence(gm) == expected
    assert gm.bn_in_affine.groups == 3 and gm.bn_sum_affine.groups == 3


def test_bn_on_2d_input_lowers_to_diagonal_linear():
    model, x = with_realistic_stats(nn.Sequential(nn.BatchNorm1d(6)), (8, 6)), torch.randn(8, 6)
    gm = traced(model, x)
    assert lower_batchnorm(gm).modified
    assert op_sequence(gm) == [("call_module", "Linear")]
    assert_close_to_eager(gm, model, x)


class ShapeBn(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = bn

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize(
    "bn, train, reason",
    [
        (nn.BatchNorm2d(2), True, "training mode"),
        (nn.BatchNorm2d(2, track_running_stats=False), False, "no running statistics"),
    ],
)
def test_batchnorm_without_fixed_stats_kept_float(bn, train, reason):
    model, x = ShapeBn(bn).train(train), torch.randn(2, 2, 3, 3)
    for pass_fn in (fold_batchnorm, lower_batchnorm):
        gm = traced(model, x)
        before = op_sequence(gm)
        assert not pass_fn(gm).modified
        assert op_sequence(gm) == before
        bn_node = next(n for n in gm.graph.nodes if n.target == "bn")
        assert reason in float_reason(bn_node) and "'bn'" in float_reason(bn_node)


def test_no_batchnorm_no_change():
    model, x = ConvRelu().eval(), torch.randn(1, 3, 5, 5)
    for pass_fn in (fold_batchnorm, lower_batchnorm):
        gm = traced(model, x)
        before = op_sequence(gm)
        result = pass_fn(gm)
        assert not result.modified and result.changes == []
        assert op_sequence(gm) == before


def test_producers_limits_what_folds():
    """QAT folds only BatchNorms after a transposed conv (torch's QAT ConvBn modules fold the rest)."""
    model = with_realistic_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                               nn.ConvTranspose2d(4, 4, 2, stride=2), nn.BatchNorm2d(4)), (2, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    gm = traced(model, x)
    result = run(lambda g: fold_batchnorm(g, producers=TRANSPOSED_CONV_TYPES), gm, x)
    assert result.changes == ["folded BatchNorm '3' into '2'"]
    assert op_sequence(gm) == [("call_module", "Conv2d"), ("call_module", "BatchNorm2d"),
                               ("call_module", "ConvTranspose2d")]
    assert_close_to_eager(gm, model, x)


def test_fold_then_lower_idempotent():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn0 = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn1 = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn1(self.conv(self.bn0(x)))

    model, x = with_realistic_stats(Mixed(), (2, 3, 6, 6)), torch.randn(2, 3, 6, 6)
    gm = traced(model, x)
    assert run(fold_batchnorm, gm, x).changes == ["folded BatchNorm 'bn1' into 'conv'"]
    assert run(lower_batchnorm, gm, x).modified
    for pass_fn in (fold_batchnorm, lower_batchnorm):
        assert not run(pass_fn, gm, x).modified
    gm.graph.lint()
    assert_close_to_eager(gm, model, x)


def test_batchnorm_the_backend_runs_natively_is_left_alone():
    model, x = with_realistic_stats(BnFirstThenAfterAdd(), (2, 3, 4, 4)), torch.randn(2, 3, 4, 4)
    gm = traced(model, x)
    before = op_sequence(gm)
    assert not lower_batchnorm(gm, native=frozenset({nn.BatchNorm2d})).modified
    assert op_sequence(gm) == before
    flat = with_realistic_stats(nn.Sequential(nn.BatchNorm1d(6)), (8, 6))
    gm = traced(flat, torch.randn(8, 6))
    assert lower_batchnorm(gm, native=frozenset({nn.BatchNorm2d})).modified  # no BN1d kernel: lowered


def test_x86_runs_batchnorm2d_alone_but_batchnorm1d_only_fused():
    from fxq import get_backend
    from fxq.backends.patterns import single_op_patterns

    alone = single_op_patterns(get_backend("x86").backend_config)
    assert {nn.BatchNorm2d, nn.BatchNorm3d} <= alone and nn.BatchNorm1d not in alone


def test_standalone_batchnorm_without_affine_weights_quantizes():
    """torch's int8 BatchNorm cannot be built from a BN with affine=False (convert_fx raised
    AttributeError on bn.weight); such a BN becomes a channel affine instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(8, affine=False),
                          nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    model[3].running_mean.uniform_(0.0, 0.5)
    model[3].running_var.uniform_(0.5, 2.0)
    batches = [torch.randn(2, 3, 16, 16) for _ in range(8)]
    assert int8_sqnr_on_fresh_inputs(model, batches, torch.randn(4, 3, 16, 16)) >= 25.0
