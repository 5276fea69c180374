"""Pattern: ``nn.SiLU`` / ``F.silu`` / ``torch.nn.functional.silu`` on a backend with no int8
SiLU kernel but int8 sigmoid and mul.

Why: x86 has no quantized SiLU, so every SiLU of an EfficientNet becomes a float island with a
dequantize and a quantize around it (efficientnet_b0: ~50 transitions, int8 only 1.1x fp32).
``x * sigmoid(x)`` is two ops the backend runs in int8 (sigmoid with its fixed 1/256 output
scale, then a quantized mul with its own observed range).

Rewrite: ``silu(x)`` -> ``torch.mul(x, torch.sigmoid(x))``. Float: the same function, equal
to within an ulp.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq.backends.base import Backend, pattern_key
from fxq.passes.base import PassResult, finish, float_reason, fxq_meta

NAME = "decompose_silu"
SILU_TARGETS = (nn.SiLU, F.silu, torch.nn.functional.silu)


def backend_needs_it(backend: Backend) -> bool:
    """True when the backend lacks SiLU but runs sigmoid and mul in int8."""
    supported = backend.supported_targets
    return (not any(t in supported for t in SILU_TARGETS)
            and torch.sigmoid in supported and torch.mul in supported)


def decompose_silu(gm: fx.GraphModule) -> PassResult:
    """Rewrite every SiLU as ``x * sigmoid(x)``.

    Example::

        gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU()))
        decompose_silu(gm)  # conv -> sigmoid -> mul(conv, sigmoid)
    """
    plan = [node for node in gm.graph.nodes
            if pattern_key(gm, node) in SILU_TARGETS and node.args and float_reason(node) is None]
    for node in plan:
        source = node.args[0]
        with gm.graph.inserting_before(node):
            gate = gm.graph.call_function(torch.sigmoid, (source,))
            product = gm.graph.call_function(torch.mul, (source, gate))
        for added in (gate, product):
            fxq_meta(added)["changed_by"] = NAME
        node.replace_all_uses_with(product)
        gm.graph.erase_node(node)
    return finish(gm, [f"{node.name}: silu -> x * sigmoid(x)" for node in plan])
