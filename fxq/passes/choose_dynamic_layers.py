"""Pattern: Linear and recurrent module calls (``fxq.modes.can_run_dynamic``) the backend has a
dynamic int8 kernel for. Rewrite: none; chosen calls are marked dynamic (``fxq.modes.mark_dynamic``):
int8 weights, the activation range measured on each batch at run time, float in and out.

Which ones (``mode="auto"``):

- recurrent layers always: torch has no static int8 GRU/LSTM, so static mode leaves them float;
- a Linear whose input runs float (after a GRU, a LayerNorm, a float island): static int8 would
  put a quantize with one calibrated range in front of it, dynamic measures every batch;
- a Linear whose every consumer runs float (the logits, a residual add into a LayerNorm): its
  int8 result would be dequantized at once, so quantizing it only adds error.

Deciding one Linear can make its neighbours' regions float (a GELU between two dynamic Linears
has no int8 neighbour left), so the choice repeats with the float-island planner's view of the
graph until nothing changes. With ``everything=True`` (``mode="dynamic"``) every candidate is
dynamic and every other op is kept float, like ``torch.ao.quantization.quantize_dynamic``.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from fxq.backends.base import Backend
from fxq.modes import RECURRENT_TYPES, backend_lacks_dynamic, can_run_dynamic, mark_dynamic
from fxq.passes.base import PassResult, float_reason, get_module, keep_float
from fxq.passes.place_float_islands import carries_float_tensor, decide_float_nodes

NAME = "choose_dynamic_layers"
RECURRENT_REASON = "recurrent layer (torch has no static int8 kernel for it)"
FLOAT_INPUT_REASON = "Linear fed by a float value ({}): dynamic measures each batch instead of one calibrated range"
FLOAT_OUTPUT_REASON = "Linear whose every consumer runs float: an int8 output would be dequantized at once"
DYNAMIC_ONLY_REASON = "mode='dynamic' quantizes only Linear and recurrent layers"


def _candidates(gm: fx.GraphModule, backend: Backend) -> list[fx.Node]:
    return [node for node in gm.graph.nodes
            if node.op == "call_module" and float_reason(node) is None and can_run_dynamic(get_module(gm, node))
            and backend_lacks_dynamic(backend, get_module(gm, node)) is None]


def _auto_reason(gm: fx.GraphModule, node: fx.Node, floats: dict[fx.Node, str]) -> str | None:
    source = node.args[0] if node.args else None
    if isinstance(source, fx.Node) and source in floats:
        return FLOAT_INPUT_REASON.format(source.name)
    if node.users and all(user.op == "output" or user in floats for user in node.users):
        return FLOAT_OUTPUT_REASON
    return None


def _choose_auto(gm: fx.GraphModule, backend: Backend) -> list[str]:
    changes: list[str] = []
    pending = _candidates(gm, backend)
    for node in [n for n in pending if isinstance(get_module(gm, n), RECURRENT_TYPES)]:
        mark_dynamic(node, RECURRENT_REASON)  # first, so the Linears after them see a float input
        changes.append(f"{node.target}: dynamic ({RECURRENT_REASON})")
    pending = [node for node in pending if float_reason(node) is None]
    while pending:
        floats = decide_float_nodes(gm, backend)  # read-only: what the island pass would keep float
        chosen = {node: reason for node in pending if (reason := _auto_reason(gm, node, floats))}
        if not chosen:
            break
        for node, reason in chosen.items():
            mark_dynamic(node, reason)
            changes.append(f"{node.target}: dynamic ({reason})")
        pending = [node for node in pending if node not in chosen]
    return changes


def _choose_everything(gm: fx.GraphModule, backend: Backend) -> list[str]:
    chosen = _candidates(gm, backend)
    changes = []
    for node in chosen:
        mark_dynamic(node, DYNAMIC_ONLY_REASON)
        changes.append(f"{node.target}: dynamic")
    for node in gm.graph.nodes:
        if (node.op in ("call_module", "call_function", "call_method") and node not in chosen
                and float_reason(node) is None and node.target is not operator.getitem and carries_float_tensor(node)):
            keep_float(node, DYNAMIC_ONLY_REASON)
            changes.append(f"{node.name}: float")
    return changes


def choose_dynamic_layers(gm: fx.GraphModule, backend: Backend, everything: bool = False) -> PassResult:
    """Mark the Linear and recurrent layers that should run dynamically quantized.

    Example::

        result = choose_dynamic_layers(gm, fxq.get_backend("x86"))
        [n.target for n in gm.graph.nodes if "dynamic" in n.meta.get("fxq", {})]  # ["gru", "classifier"]
    """
    changes = _choose_everything(gm, backend) if everything else _choose_auto(gm, backend)
    return PassResult(gm, bool(changes), changes)
