"""Pattern: one submodule called from several places (``self.conv(a)`` and ``self.conv(b)``,
an activation module reused across a block).

Rewrite: every call after the first calls its own copy of the module. torch converts a module
once, and a quantized module holds one output scale: the observer of one call site sets the
scale every call uses. Measured: a siamese conv called on ``a`` and on ``10 * b`` ran its first
call with the second call's 10x coarser scale (21 dB at that point instead of ~32 dB), with no
warning. Copies cost memory: a weighted module's weights are stored once per call; the report
says so. A weighted module called more than ``MAX_WEIGHTED_CALLS`` times (a traced loop over
time steps) stays shared: copies would multiply its weights, and steps of one loop usually see
one range; the report names it. Exact in float. Not for QAT, where copies would untie weights
trained together.
"""
from __future__ import annotations

import copy

import torch.fx as fx

from fxq.passes.base import PassResult, add_submodule_unique, finish, get_module

NAME = "unshare_called_modules"
#: Calls of one weighted module beyond which it stays shared (siamese / triplet nets copy).
MAX_WEIGHTED_CALLS = 4


def _shared_calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return {target: nodes for target, nodes in calls.items() if len(nodes) > 1}


def unshare_called_modules(gm: fx.GraphModule) -> PassResult:
    """Give every call of a module called more than once its own copy, so each call site gets
    its own int8 output scale.

    Example::

        gm = torch.fx.symbolic_trace(siamese)   # self.conv(a) ... self.conv(b)
        unshare_called_modules(gm)                # self.conv(a) ... self.conv_1(b)
    """
    changes, notes = [], []
    for target, nodes in _shared_calls(gm).items():
        module = get_module(gm, nodes[0])
        weights = sum(p.numel() for p in module.parameters())
        if weights and len(nodes) > MAX_WEIGHTED_CALLS:
            notes.append(f"{target}: called {len(nodes)} times (a loop?), left shared: its calls use one int8 "
                         f"output scale; copies would store its {weights} weights {len(nodes)} times")
            continue
        copies = []
        for node in nodes[1:]:
            node.target = add_submodule_unique(gm, target, copy.deepcopy(module))
            copies.append(node.target)
        changes.append(f"{target}: called {len(nodes)} times; the later calls use copies ({', '.join(copies)}) "
                       f"so each call gets its own int8 output scale"
                       + (f" ({weights} weights stored {len(nodes)} times)" if weights else ""))
    result = finish(gm, changes)
    result.changes.extend(notes)  # a note, not a change: the result stays unmodified without copies
    return result
