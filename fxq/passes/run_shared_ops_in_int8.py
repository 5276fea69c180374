"""Pattern (on the *converted* graph): ``dequantize -> op -> quantize_per_tensor`` where ``op``
is one of the backend's extra shared-qparams ops (zero pad, nn.Flatten).

Rewrite: ``op`` applied to the int8 tensor directly. torch's lowering decides which ops may
run on quantized tensors from lists private to its functions, so ops fxq adds to a
BackendConfig are observed correctly but left between a dequantize and a quantize. Their
output shares the input's observer, so scale and zero point are unchanged and dropping the
round trip is exact (a zero pad writes the zero point, which is float zero).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxq.backends.base import pattern_key
from fxq.passes.base import PassResult, finish

NAME = "run_shared_ops_in_int8"


def _matches(gm: fx.GraphModule, node: fx.Node, targets: frozenset) -> bool:
    if pattern_key(gm, node) not in targets or not node.args or len(node.users) != 1:
        return False
    dequantize, (quantize,) = node.args[0], node.users
    return (isinstance(dequantize, fx.Node) and dequantize.op == "call_method" and dequantize.target == "dequantize"
            and len(dequantize.users) == 1
            and quantize.op == "call_function" and quantize.target is torch.quantize_per_tensor)


def run_shared_ops_in_int8(gm: fx.GraphModule, targets: frozenset) -> PassResult:
    """Drop the float round trip around ``targets`` ops in a converted graph."""
    plan = [node for node in gm.graph.nodes if _matches(gm, node, targets)]
    for node in plan:
        dequantize, quantize = node.args[0], next(iter(node.users))
        node.replace_input_with(dequantize, dequantize.args[0])
        quantize.replace_all_uses_with(node)
        qparams = [a for a in quantize.args[1:3] if isinstance(a, fx.Node)]
        gm.graph.erase_node(quantize)
        gm.graph.erase_node(dequantize)
        for qparam in qparams:
            if not qparam.users:
                gm.graph.erase_node(qparam)
    return finish(gm, [f"{node.name} runs on int8" for node in plan])
