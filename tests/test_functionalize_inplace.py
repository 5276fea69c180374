"""functionalize_inplace: Before/Expected graphs, exact numerics, kept unsafe mutations,
no-match and idempotence."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from fxq.passes.base import float_reason, fxq_meta
from fxq.passes.functionalize_inplace import functionalize_inplace

IMAGE = (2, 3, 5, 5)


def _trace(model: nn.Module, *inputs: torch.Tensor, tracer=None) -> fx.GraphModule:
    """fxq works on a private copy of the model; ShapeProp runs on clones (mutations!)."""
    model = copy.deepcopy(model)
    if tracer is None:
        gm = fx.symbolic_trace(model)
    else:
        gm = fx.GraphModule(model, tracer.trace(model))
    ShapeProp(gm).propagate(*[t.clone() for t in inputs])
    return gm


def _from_graph(graph: fx.Graph, *inputs: torch.Tensor) -> fx.GraphModule:
    gm = fx.GraphModule(nn.Module(), graph)
    ShapeProp(gm).propagate(*[t.clone() for t in inputs])
    return gm


def _callee(gm: fx.GraphModule, node: fx.Node) -> object:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module).__name__, getattr(module, "inplace", None)
    if node.op == "call_function":
        return f"{getattr(node.target, '__module__', '')}.{node.target.__name__}"
    return node.target


def _structure(gm: fx.GraphModule) -> list[tuple]:
    """Op sequence with inputs as positions: compares wiring, not version-specific code text."""
    position = {node: f"%{index}" for index, node in enumerate(gm.graph.nodes)}

    def show(value):
        return fx.node.map_arg(value, position.__getitem__)

    return [(n.op, _callee(gm, n), show(n.args), dict(show(n.kwargs))) for n in gm.graph.nodes]


def _inplace_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    def is_inplace(node):
        if node.op == "call_module":
            return getattr(gm.get_submodule(node.target), "inplace", False)
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        return (isinstance(name, str) and name.endswith("_") and not name.startswith("_")
                or node.kwargs.get("inplace") is True or node.target is operator.iadd)
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and is_inplace(n)]


def _assert_same_outputs(model: nn.Module, gm: fx.GraphModule, *inputs: torch.Tensor) -> None:
    expected = copy.deepcopy(model)(*[t.clone() for t in inputs])
    torch.testing.assert_close(gm(*[t.clone() for t in inputs]), expected, atol=0, rtol=0)


# ---------------------------------------------------------------- models that the pass rewrites

class IssueExample(nn.Module):
    def forward(self, x):
        z = x + 0
        z += 1.0
        z.mul_(2)
        return z


class IssueExpected(nn.Module):
    def forward(self, x):
        z = x + 0
        z = z + 1.0
        return z.mul(2)


class TorchRelu(nn.Module):
    def forward(self, x):
        y = x * 2 - 1
        torch.relu_(y)
        return y + 1


class TorchReluExpected(nn.Module):
    def forward(self, x):
        y = x * 2 - 1
        y = torch.relu(y)
        return y + 1


class FunctionalInplace(nn.Module):
    def forward(self, x):
        y = F.relu(x - 0.5, inplace=True)
        return F.hardtanh(y * 3, -0.5, 0.5, True), y


class FunctionalExpected(nn.Module):
    def forward(self, x):
        y = F.relu(x - 0.5)
        return F.hardtanh(y * 3, -0.5, 0.5), y


class SharedReLU(nn.Module):
    def __init__(self, inplace: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        a = self.act(self.conv(x))
        b = self.act(a - 0.5)
        return a + b


class Chained(nn.Module):
    def forward(self, x):
        y = x + 1
        y.add_(1).mul_(3)
        return y


class ChainedExpected(nn.Module):
    def forward(self, x):
        y = x + 1
        return y.add(1).mul(3)


class OldValueRead(nn.Module):
    """``b`` is computed before the add_: it must not see the +1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        a = self.conv(x)
        b = a * 1
        a.add_(1)
        c = a + b
        a.relu_()
        return a, b, c


class OldValueExpected(OldValueRead):
    def forward(self, x):
        a = self.conv(x)
        b = a * 1
        a = a.add(1)
        c = a + b
        return a.relu(), b, c


class Fills(nn.Module):
    def forward(self, x):
        y = x * 3
        y.fill_(2.5)
        z = x * 1
        z.zero_()
        return y + z + x


class FillsExpected(nn.Module):
    def forward(self, x):
        y = torch.full_like(x * 3, 2.5)
        z = torch.zeros_like(x * 1)
        return y + z + x


class ShapeOnly(nn.Module):
    """unsqueeze_ changes metadata only; the view's size() is read after the mutation."""

    def forward(self, x):
        y = x * 2
        v = y.view(-1)
        y.unsqueeze_(0)
        return y.sum(1), v.size(0)


class ShapeOnlyExpected(nn.Module):
    def forward(self, x):
        y = x * 2
        v = y.view(-1)
        y = y.unsqueeze(0)
        return y.sum(1), v.size(0)


class Dropouts(nn.Module):
    """Eval-mode dropout returns its input: the inplace flag is all that changes."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.drop = nn.Dropout(0.3, inplace=inplace)
        self.eval()

    def forward(self, x):
        y = self.drop(x * 2)
        return F.dropout(y + 1, 0.2, False, self.drop.inplace)


REWRITTEN = [
    pytest.param(IssueExample, IssueExpected, (2, 3), id="issue-example"),
    pytest.param(TorchRelu, TorchReluExpected, (2, 3), id="torch.relu_"),
    pytest.param(FunctionalInplace, FunctionalExpected, (2, 3), id="F-inplace-kwarg"),
    pytest.param(SharedReLU, lambda: SharedReLU(inplace=False), IMAGE, id="module-two-sites"),
    pytest.param(Chained, ChainedExpected, (2, 3), id="chained"),
    pytest.param(OldValueRead, OldValueExpected, IMAGE, id="old-value-read"),
    pytest.param(Fills, FillsExpected, (2, 3), id="zero_-fill_"),
    pytest.param(ShapeOnly, ShapeOnlyExpected, (2, 3), id="unsqueeze_-size"),
    pytest.param(Dropouts, lambda: Dropouts(inplace=False), (2, 3), id="dropout"),
]


@pytest.mark.parametrize("before, expected, shape", REWRITTEN)
def test_rewrites_to_the_expected_graph(before, expected, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    gm = _trace(before(), x)
    result = functionalize_inplace(gm)
    assert result.modified and result.changes
    assert _structure(gm) == _structure(fx.symbolic_trace(expected()))
    assert _inplace_nodes(gm) == []


@pytest.mark.parametrize("before, expected, shape", REWRITTEN)
def test_rewrite_is_exact_and_idempotent(before, expected, shape):
    torch.manual_seed(0)
    model = before()
    x = torch.randn(shape)
    gm = _trace(model, x)
    functionalize_inplace(gm)
    _assert_same_outputs(model, gm, x)
    structure = _structure(gm)
    again = functionalize_inplace(gm)
    assert not again.modified and again.changes == []
    assert _structure(gm) == structure
    gm.graph.lint()


def test_exact_on_random_shapes():
    torch.manual_seed(0)
    models = [IssueExample(), TorchRelu(), FunctionalInplace(), Chained(), Fills(), Dropouts(),
              KeptMix(), MutatesInput(), MutatesThroughLiveView()]
    for _ in range(5):
        shape = tuple(torch.randint(1, 5, (int(torch.randint(2, 5, ())),)).tolist())
        x = torch.randn(shape)
        for model in models:
            gm = _trace(model, x)
            functionalize_inplace(gm)
            _assert_same_outputs(model, gm, x)


def test_new_nodes_carry_meta_but_not_fxq_bookkeeping():
    x = torch.randn(2, 3)
    gm = _trace(IssueExample(), x)
    mul_ = next(n for n in gm.graph.nodes if n.target == "mul_")
    fxq_meta(mul_)["stale"] = True
    functionalize_inplace(gm)
    mul = next(n for n in gm.graph.nodes if n.target == "mul")
    assert mul.meta["fxq"] == {"changed_by": "functionalize_inplace"}
    assert mul.meta["tensor_meta"].shape == torch.Size([2, 3])


def test_shared_module_turns_inplace_off():
    gm = _trace(SharedReLU(), torch.randn(IMAGE))
    result = functionalize_inplace(gm)
    assert gm.act.inplace is False
    assert [c for c in result.changes if "ReLU" in c] == [
        "ReLU(inplace=True) act -> ReLU(inplace=False) (node act)",
        "ReLU(inplace=True) act -> ReLU(inplace=False) (node act_1)",
    ]


# ---------------------------------------------------------------- operator.iadd, positional inplace

def _iadd_graph(on_tensor: bool) -> fx.Graph:
    graph = fx.Graph()
    x = graph.placeholder("x")
    if on_tensor:
        a = graph.call_function(operator.add, (x, 0))
    else:
        a = graph.call_method("size", (x, 0))
    b = graph.call_function(operator.iadd, (a, 1))
    graph.output((a, b))
    return graph


@pytest.mark.parametrize("on_tensor", [True, False], ids=["tensor", "int"])
def test_operator_iadd_becomes_add(on_tensor):
    # FX emits iadd as ``a += 1; iadd = a``: the later read of ``a`` sees the new value,
    # for a tensor (written in place) and for a python int (name rebound) alike.
    x = torch.randn(2, 3)
    gm = _from_graph(_iadd_graph(on_tensor), x)
    expected = copy.deepcopy(gm)(x.clone())
    result = functionalize_inplace(gm)
    assert result.changes == ["iadd -> add (node iadd)"]
    add = next(n for n in gm.graph.nodes if n.target is operator.add and n.args[1] == 1)
    assert next(iter(gm.graph.find_nodes(op="output"))).args[0] == (add, add)
    torch.testing.assert_close(gm(x.clone()), expected, atol=0, rtol=0)
    assert not functionalize_inplace(gm).modified


def test_positional_inplace_flag_is_cleared():
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(operator.mul, (x, -1))
    relu = graph.call_function(F.relu, (a, True))
    graph.output((a, relu))
    gm = _from_graph(graph, torch.randn(4))
    functionalize_inplace(gm)
    new = next(n for n in gm.graph.nodes if n.target is F.relu)
    assert new.args[1] is False
    assert next(iter(gm.graph.find_nodes(op="output"))).args[0] == (new, new)


# ---------------------------------------------------------------- mutations kept in place, in float

class MutatesInput(nn.Module):
    def forward(self, x):
        x.add_(1)
        return x * 2


class MutatesThroughLiveView(nn.Module):
    def forward(self, x):
        a = x + 0
        v = a.view(-1)
        a.add_(1)
        return v


class MutatesBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        # A parameter: FX records get_attr for it, while a buffer's add_ would run at trace time.
        self.count = nn.Parameter(torch.zeros(3), requires_grad=False)

    def forward(self, x):
        self.count.add_(1)
        return x + self.count


class CopiesInto(nn.Module):
    def forward(self, x):
        a = x + 0
        a.copy_(x * 5)
        return a * 2


class FillsWithTensor(nn.Module):
    def forward(self, x):
        a = x + 0
        a.fill_(x.sum())
        return a


class Passthrough(nn.Module):
    def forward(self, x):
        return x


class MutatesUnknownOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.leaf = Passthrough()

    def forward(self, x):
        a = self.leaf(x * 1)
        a.add_(1)
        return a


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, module, name):
        return isinstance(module, Passthrough) or super().is_leaf_module(module, name)


KEPT = [
    pytest.param(MutatesInput, "add_", "placeholder x", id="placeholder"),
    pytest.param(MutatesThroughLiveView, "add_", "alias view, read afterwards by output",
                 id="live-view"),
    pytest.param(MutatesBuffer, "add_", "module attribute count", id="buffer"),
    pytest.param(CopiesInto, "copy_", "no out-of-place form", id="copy_"),
    pytest.param(FillsWithTensor, "fill_", "no out-of-place form", id="fill_-tensor"),
    pytest.param(MutatesUnknownOutput, "add_", "output of leaf, whose aliasing is unknown",
                 id="unknown-leaf"),
]


@pytest.mark.parametrize("model_type, op, why", KEPT)
def test_unsafe_mutation_is_kept_in_float(model_type, op, why):
    model = model_type()
    x = torch.randn(3)
    gm = _trace(model, x, tracer=LeafTracer())
    before = _structure(gm)
    result = functionalize_inplace(gm)
    assert not result.modified and _structure(gm) == before
    mutation = next(n for n in gm.graph.nodes if n.target == op)
    reason = float_reason(mutation)
    assert reason.startswith(f"in-place {op} (node {mutation.name})") and why in reason
    readers = [u for u in mutation.users if u.op != "output"] + [mutation.args[0]]
    assert all(float_reason(node) for node in readers)
    if model_type is MutatesBuffer:
        model(x.clone())                    # ShapeProp already bumped gm's copy once
    _assert_same_outputs(model, gm, x)
    assert not functionalize_inplace(gm).modified


class KeptMix(nn.Module):
    """mul_ is safe (the view comes later); add_ is seen through the view and stays."""

    def forward(self, x):
        a = x + 0
        a.mul_(2)
        v = a.view(-1)
        a.add_(1)
        return v


def test_safe_mutation_before_a_kept_one_is_rewritten():
    x = torch.randn(2, 3)
    gm = _trace(KeptMix(), x)
    assert functionalize_inplace(gm).changes == ["mul_ -> mul (node mul_)"]
    add_ = next(n for n in gm.graph.nodes if n.target == "add_")
    mul = next(n for n in gm.graph.nodes if n.target == "mul")
    assert add_.args[0] is mul and "alias view" in float_reason(add_)
    assert float_reason(mul)            # quantizing mul would copy away the kept add_
    _assert_same_outputs(KeptMix(), gm, x)


def test_module_with_one_unsafe_site_is_copied_for_the_safe_one():
    class Mixed(SharedReLU):
        def forward(self, x):
            y = self.act(self.conv(x))
            return y + self.act(x)

    model, x = Mixed(), torch.randn(IMAGE)
    gm = _trace(model, x)
    result = functionalize_inplace(gm)
    assert result.changes == ["ReLU(inplace=True) act -> ReLU(inplace=False) (node act)"]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != "conv"]
    assert targets == ["act_out_of_place", "act"]
    assert gm.act.inplace is True and gm.act_out_of_place.inplace is False
    assert "placeholder x" in float_reason(next(n for n in gm.graph.nodes if n.target == "act"))
    _assert_same_outputs(model, gm, x)


# ---------------------------------------------------------------- nothing to do

class NoMutation(nn.Module):
    def forward(self, x):
        v = x.view(-1)
        return F.relu(x) + v.sum(), torch.relu(v)


def test_no_match_leaves_the_graph_alone():
    x = torch.randn(2, 3)
    gm = _trace(NoMutation(), x)
    before, code = _structure(gm), gm.code
    result = functionalize_inplace(gm)
    assert not result.modified and result.changes == []
    assert _structure(gm) == before and gm.code == code
    assert all(float_reason(n) is None for n in gm.graph.nodes)
    gm.graph.lint()
