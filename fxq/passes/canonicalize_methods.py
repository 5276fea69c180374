"""Pattern: ``x.add(y)``, ``x.mul(y)``, ``x.flatten(1)``... — a tensor method with a torch function twin.

Rewrite: ``torch.add(x, y)`` etc. Backend pattern tables (torch's included) list the
function spellings; the method spellings — which users write, and which in-place
functionalization produces from ``x.add_(y)`` — would otherwise stay float between two
quantize/dequantize ops. Exact: the method and the function are the same ATen op.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxq.passes.base import PassResult, finish, fxq_meta

NAME = "canonicalize_methods"

#: method name -> keyword arguments it may carry and still mean exactly the function call.
CANONICAL_METHODS: dict[str, frozenset] = {
    "add": frozenset(), "sub": frozenset(), "mul": frozenset(), "div": frozenset(),
    "matmul": frozenset(), "relu": frozenset(), "sigmoid": frozenset(), "tanh": frozenset(),
    "flatten": frozenset({"start_dim", "end_dim"}), "clamp": frozenset({"min", "max"}),
    "mean": frozenset({"dim", "keepdim"}),
}


def _rewritable(node: fx.Node) -> bool:
    allowed = CANONICAL_METHODS.get(node.target) if node.op == "call_method" else None
    return allowed is not None and set(node.kwargs) <= allowed


def canonicalize_methods(gm: fx.GraphModule) -> PassResult:
    """Turn tensor-method calls into their torch-function twins.

    Example::

        gm = torch.fx.symbolic_trace(lambda x: x.mul(2).add(x))
        canonicalize_methods(gm)  # torch.mul(x, 2), torch.add(mul, x)
    """
    plan = [node for node in gm.graph.nodes if _rewritable(node)]
    for node in plan:
        with gm.graph.inserting_before(node):
            function_call = gm.graph.call_function(getattr(torch, node.target), node.args, dict(node.kwargs))
        function_call.meta = dict(node.meta)
        fxq_meta(function_call)["changed_by"] = NAME
        node.replace_all_uses_with(function_call)
        gm.graph.erase_node(node)
    return finish(gm, [f"{node.name}: .{node.target}() -> torch.{node.target}()" for node in plan])
