"""Rewrite PReLU as ``relu(x) + (-a) * relu(-x)``, a form whose int8 kernels are sound.

Why: torch's quantized PReLU computes the positive branch as ``x * quantize(1.0)`` using
the *slope's* quantization parameters. Trained slopes are mostly below 1, so 1.0
saturates to the slope range's maximum and every positive activation shrinks (a digits
classifier drops from 97% to 9.6% top-1). The decomposition is exact in float:

    x > 0:  x + (-a) * 0     == x
    x <= 0: 0 + (-a) * (-x)  == a * x     (negation is exact, so the product rounds alike)

and each piece is a module the backend runs as one int8 op: ``nn.ReLU`` for the positive
branch, a fused ConvReLU/LinearReLU with weight -1 for ``relu(-x)``, and a per-channel
affine (depthwise 1x1 conv or diagonal Linear) for the slopes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx
from torch import nn

from fxq.passes.base import (
    PassResult,
    add_submodule_unique,
    finish,
    float_reason,
    fxq_meta,
    get_attr_value,
    get_module,
    keep_float,
    tensor_shape,
)
from fxq.passes.channel_affine import CHANNEL_AFFINE_RANKS, build_channel_affine, has_hooks
from fxq.quant import nni

PASS_NAME = "decompose_prelu"

# Fused "channel affine then ReLU" modules with real int8 kernels, by input rank.
_AFFINE_RELU_BY_RANK = {
    2: nni.LinearReLU,
    3: nni.ConvReLU1d,
    4: nni.ConvReLU2d,
    5: nni.ConvReLU3d,
}


@dataclass(frozen=True)
class _PreluCall:
    """A PReLU application found in the graph, before any check on its shape."""

    node: fx.Node
    input: fx.Node
    slopes: Optional[torch.Tensor]  # None when the slope is computed at run time
    base_name: str


@dataclass(frozen=True)
class _Decomposition:
    """A PReLU call that passed every check, with its slopes expanded to one per channel."""

    call: _PreluCall
    slopes: torch.Tensor
    rank: int


def decompose_prelu(gm: fx.GraphModule) -> PassResult:
    """Replace every decomposable PReLU with ``relu(x) + (-a) * relu(-x)``."""
    plans: list[_Decomposition] = []
    for node in gm.graph.nodes:
        call = _match_prelu(gm, node)
        if call is None or float_reason(node) is not None:
            continue
        plan = _plan(gm, call)
        if isinstance(plan, str):
            keep_float(node, f"PReLU '{call.base_name}' stays float: {plan}")
        else:
            plans.append(plan)
    return finish(gm, [_rewrite(gm, plan) for plan in plans])


def _match_prelu(gm: fx.GraphModule, node: fx.Node) -> Optional[_PreluCall]:
    """``node`` as a PReLU call (``nn.PReLU`` module or ``F.prelu``/``torch.prelu``), or None."""
    # Exact type: a subclass may compute something other than F.prelu.
    if node.op == "call_module" and type(get_module(gm, node)) is nn.PReLU:
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        module = get_module(gm, node)
        return _PreluCall(node, node.args[0], module.weight, str(node.target))
    if node.op == "call_function" and node.target is torch.prelu:
        arguments = {**dict(zip(("input", "weight"), node.args)), **node.kwargs}
        if set(arguments) != {"input", "weight"} or not isinstance(arguments["input"], fx.Node):
            return None
        slopes = get_attr_value(gm, arguments["weight"])
        return _PreluCall(node, arguments["input"], slopes, node.name)
    return None


def _plan(gm: fx.GraphModule, call: _PreluCall) -> Union[_Decomposition, str]:
    """The checked decomposition of ``call``, or the reason it must stay float."""
    shape = tensor_shape(call.input)
    module = get_module(gm, call.node)
    if module is not None and has_hooks(module):
        return "the PReLU has forward hooks, which the rewrite would drop; remove them"
    if call.slopes is None:
        return "its slope is computed at run time, not a stored parameter"
    if shape is None:
        return "the input shape is unknown (shape propagation did not reach it)"
    if len(shape) not in CHANNEL_AFFINE_RANKS:
        return f"input rank {len(shape)} is not supported (need 2..5, channels in dim 1)"
    dtype = call.input.meta["tensor_meta"].dtype
    if dtype != call.slopes.dtype:
        return f"input dtype {dtype} differs from slope dtype {call.slopes.dtype}"
    channels, count = shape[1], call.slopes.numel()
    if count not in (1, channels):
        return f"{count} slopes do not match the {channels} input channels"
    slopes = call.slopes.detach().reshape(-1).expand(channels).clone()
    return _Decomposition(call, slopes, len(shape))


def _rewrite(gm: fx.GraphModule, plan: _Decomposition) -> str:
    """Insert the decomposition before the PReLU node, reroute its users, erase it."""
    call, graph = plan.call, gm.graph
    names = _register_modules(gm, plan)
    with graph.inserting_before(call.node):
        positive = graph.call_module(names["pos"], (call.input,))
        negated_relu = graph.call_module(names["negrelu"], (call.input,))
        negative = graph.call_module(names["slope"], (negated_relu,))
        total = graph.call_function(operator.add, (positive, negative))
    for new_node in (positive, negated_relu, negative, total):
        fxq_meta(new_node)["changed_by"] = PASS_NAME
    call.node.replace_all_uses_with(total)
    graph.erase_node(call.node)
    return f"decomposed PReLU '{call.base_name}' into relu(x) - a * relu(-x)"


def _register_modules(gm: fx.GraphModule, plan: _Decomposition) -> dict[str, str]:
    """Build and register the three modules of one decomposition; return their names."""
    slopes, rank = plan.slopes, plan.rank
    negate = build_channel_affine(-torch.ones_like(slopes), None, rank)
    modules = {
        "pos": nn.ReLU(),
        "negrelu": _AFFINE_RELU_BY_RANK[rank](negate, nn.ReLU()).eval(),
        "slope": build_channel_affine(-slopes, None, rank),
    }
    base = plan.call.base_name
    return {key: add_submodule_unique(gm, f"{base}_{key}", m) for key, m in modules.items()}
