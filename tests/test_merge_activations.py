"""merge_activations and canonicalize_methods: Before/Expected, numerics, no-match, idempotence."""
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq import fused
from fxq.passes.canonicalize_methods import canonicalize_methods
from fxq.passes.merge_activations import merge_activations
from fxq.quant import nni


class ConvActs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = F.relu6(self.c1(x))
        x = F.hardtanh(self.c2(x), 0.0, 6.0)
        x = torch.relu(self.c3(x))
        x = nn.functional.relu(self.up(x))
        return self.fc(x.mean((2, 3))).clamp(0, 3)


def _module_types(gm):
    return [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]


def test_before_expected_and_exact_numerics():
    torch.manual_seed(0)
    model = ConvActs().eval()
    gm = fx.symbolic_trace(model)
    result = merge_activations(gm)
    assert result.modified
    assert _module_types(gm) == [fused.ConvAct2d, fused.ConvAct2d, nni.ConvReLU2d, fused.ConvTransposeAct2d,
                                 fused.LinearAct]
    for shape in [(1, 3, 9, 9), (2, 3, 16, 12)]:
        x = torch.randn(shape)
        torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)
    gm.graph.lint()


def test_symmetric_activations_keep_the_clamp():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6()).eval())
    assert not merge_activations(gm, absorb_clamps=False).modified


def test_no_match_when_conv_output_has_another_user():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return F.relu6(y) + y

    gm = fx.symbolic_trace(TwoUsers().eval())
    before = [n.format_node() for n in gm.graph.nodes]
    assert not merge_activations(gm).modified
    assert [n.format_node() for n in gm.graph.nodes] == before


class ShapeCheckBetween(nn.Module):
    """timm's BatchNormAct2d asserts ``x.ndim == 4`` on the conv output before its ReLU."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, "expected 4D input")
        return self.act(y) * y.shape[1]


def test_users_that_only_read_the_shape_do_not_block_fusion():
    torch.manual_seed(0)
    model = ShapeCheckBetween().eval()
    gm = fx.symbolic_trace(model)
    assert merge_activations(gm).modified
    assert _module_types(gm) == [nni.ConvReLU2d]
    fused_node = next(n for n in gm.graph.nodes if n.op == "call_module")
    readers = {n.args[1] for n in fused_node.users if n.op == "call_function" and n.target is getattr}
    assert readers == {"ndim", "shape"}  # both shape reads now read the fused output
    gm.graph.lint()
    for shape in [(1, 3, 5, 5), (2, 3, 9, 4)]:
        x = torch.randn(shape)
        torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_hardtanh_with_positive_lower_bound_is_not_absorbed():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardtanh(0.5, 2.0)).eval())
    assert not merge_activations(gm).modified


def test_idempotent():
    gm = fx.symbolic_trace(ConvActs().eval())
    merge_activations(gm)
    assert not merge_activations(gm).modified


def test_canonicalize_methods_exact_and_idempotent():
    def f(x, y):
        return x.mul(2).add(y).flatten(1).clamp(min=0.0).mean(dim=1)

    gm = fx.symbolic_trace(f)
    result = canonicalize_methods(gm)
    assert result.modified
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.mul, torch.add, torch.flatten, torch.clamp, torch.mean]
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(gm(x, y), f(x, y), atol=0, rtol=0)
    assert not canonicalize_methods(gm).modified


def test_canonicalize_leaves_add_with_alpha():
    gm = fx.symbolic_trace(lambda x: x.add(x, alpha=2))
    assert not canonicalize_methods(gm).modified
