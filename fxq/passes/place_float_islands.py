"""Pattern: every value-producing node the backend cannot run in int8 (or that an earlier
pass marked float). Rewrite: keep it in float, grow the float region over neighbours where
that removes quantize/dequantize transitions, and make the decision binding for prepare_fx.

Why grow: a cheap op (reshape, add, pool) quantized between two float ops costs a quantize
and a dequantize and saves nothing; plain FX leaves exactly such Q/DQ pairs around every tiny
op of mobile nets and ends slower than fp32. Compute-heavy ops (conv, linear, matmul) stay
quantized unless they are surrounded by float on every side *and* do little work per element.

How the decision binds: function and method calls kept float become ``FloatOp`` modules
(see ``fxq.float_op``); module calls keep their module and get ``float_reason`` in their
meta, which the quantization stage turns into a ``None`` qconfig.
"""
from __future__ import annotations

import operator
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from fxq import quant
from fxq.backends.base import Backend
from fxq.float_op import FloatOp
from fxq.passes.base import (
    PassResult, add_submodule_unique, finish, float_reason, fxq_meta, get_module, tensor_owners,
)

NAME = "place_float_islands"
GROWN_REASON = "kept float with its float neighbours: quantizing it alone would add more Q/DQ transitions than it saves"
HEAVY_FUNCTIONS = {torch.matmul, torch.bmm, torch.nn.functional.linear, torch.nn.functional.conv1d,
                   torch.nn.functional.conv2d, torch.nn.functional.conv3d, operator.matmul}
INPUT_REASON = ("runs on the model's input in float, quantized once after it: in int8 the input would be "
                "rounded before the op and again after")
WEIGHTS_READ_REASON = ("the graph also reads this module's tensors directly (e.g. x.weight.device), and an "
                       "int8 module keeps no float weight")
INTEGER_REASON = "operates on an integer tensor: nothing to quantize"
#: Multiply-accumulates per output element from which an op is worth two transitions.
MIN_WORTHWHILE_MACS_PER_ELEMENT = 16


def carries_float_tensor(node: fx.Node) -> bool:
    """True when the node's output is (or contains) a floating-point tensor."""
    return any(meta.dtype.is_floating_point for meta in _tensor_metas(node.meta.get("tensor_meta")))


def _tensor_metas(meta) -> Iterator:
    if meta is None:
        return
    if hasattr(meta, "dtype") and hasattr(meta, "shape"):
        yield meta
    elif isinstance(meta, (list, tuple)):
        for item in meta:
            yield from _tensor_metas(item)
    elif isinstance(meta, dict):
        for item in meta.values():
            yield from _tensor_metas(item)


def _value_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op in ("call_module", "call_function", "call_method") and carries_float_tensor(n)]


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    inputs: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: inputs.append(a) if carries_float_tensor(a) or a.op == "placeholder" else None)
    return inputs


def _initial_float(gm: fx.GraphModule, backend: Backend, values: list[fx.Node]) -> dict[fx.Node, str]:
    floats: dict[fx.Node, str] = {}
    read_directly = tensor_owners(gm)
    for node in values:
        if node.op == "call_function" and node.target is operator.getitem:
            continue  # follows its producer, decided below
        reason = float_reason(node) or backend.unsupported_reason(gm, node) or (
            WEIGHTS_READ_REASON if node.op == "call_module" and node.target in read_directly
            and next(get_module(gm, node).parameters(), None) is not None else None)
        if reason:
            floats[node] = reason
    return floats


def _follow_producers(values: list[fx.Node], floats: dict[fx.Node, str]) -> None:
    for node in values:
        if node.op == "call_function" and node.target is operator.getitem:
            producer = node.args[0]
            if isinstance(producer, fx.Node) and (producer in floats or producer.op == "placeholder"):
                floats[node] = floats.get(producer, "element of a float value")


def _is_float(node: fx.Node, floats: dict[fx.Node, str]) -> bool:
    return node in floats or node.op in ("placeholder", "get_attr", "output") or not carries_float_tensor(node)


def _neighbours(node: fx.Node) -> list[fx.Node]:
    return _tensor_inputs(node) + [u for u in node.users if u.op == "output" or carries_float_tensor(u)]


def _macs_per_output_element(gm: fx.GraphModule, node: fx.Node) -> float:
    module = get_module(gm, node)
    root = module[0] if isinstance(module, nn.Sequential) and len(module) else module
    weight = getattr(root, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight[0].numel() if weight.dim() > 1 else 1.0
    if node.op == "call_function" and node.target in HEAVY_FUNCTIONS:
        return float("inf")  # shape-dependent; treat as heavy
    return 0.0


def _cheap_groups(gm: fx.GraphModule, values: list[fx.Node], floats: dict[fx.Node, str]) -> list[list[fx.Node]]:
    """Connected runs of quantizable nodes that do little work per element."""
    return _connected_runs([n for n in values
                            if n not in floats and _macs_per_output_element(gm, n) < MIN_WORTHWHILE_MACS_PER_ELEMENT])


def _connected_runs(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """``nodes`` split into groups connected through each other, in graph order."""
    members = set(nodes)
    groups, seen = [], set()
    for start in nodes:
        if start in seen:
            continue
        group, stack = [], [start]
        seen.add(start)
        while stack:
            node = stack.pop()
            group.append(node)
            for other in _neighbours(node):
                if other in members and other not in seen:
                    seen.add(other)
                    stack.append(other)
        groups.append(group)
    return groups


def _boundary_transitions(group: list[fx.Node], floats: dict[fx.Node, str], as_float: bool) -> int:
    """Quantize/dequantize ops the group adds at its border: one per value that crosses it,
    however many consumers share it (torch converts a value once for all its users), none for
    an input some consumer outside the group needs converted anyway."""
    members = set(group)

    def crosses(other: fx.Node) -> bool:
        return other not in members and _is_float(other, floats) != as_float

    def converted_anyway(value: fx.Node) -> bool:  # another consumer in the group's domain shares it
        return any(user not in members and _is_float(user, floats) == as_float for user in value.users
                   if user.op != "output" and carries_float_tensor(user))

    inputs = {other for node in group for other in _tensor_inputs(node) if crosses(other) and not converted_anyway(other)}
    outputs = [node for node in group
               if any(crosses(user) for user in node.users if user.op == "output" or carries_float_tensor(user))]
    return len(inputs) + len(outputs)


def _grow(gm: fx.GraphModule, values: list[fx.Node], floats: dict[fx.Node, str]) -> None:
    """Flip whole runs of cheap ops to float where that removes transitions, until stable.

    Runs, not single nodes: reshape -> flatten between two float ops is a tie for either
    node alone, but costs a quantize and a dequantize as a pair.
    """
    changed = True
    while changed:
        changed = False
        for group in _cheap_groups(gm, values, floats):
            if _boundary_transitions(group, floats, as_float=True) < _boundary_transitions(group, floats, as_float=False):
                floats.update({node: GROWN_REASON for node in group})
                changed = True


def _keep_input_preprocessing_float(gm: fx.GraphModule, values: list[fx.Node], floats: dict[fx.Node, str]) -> None:
    """Elementwise and per-channel ops fed by the model's inputs alone (a normalizing
    BatchNorm, ``(x - mean) / std``) run in float when that costs no extra transition: in
    int8 the raw input is quantized and the op's result rounded again; in float, once."""
    leading: list[fx.Node] = []
    for node in values:  # graph order: a node's inputs are decided before it
        inputs = _tensor_inputs(node)
        if (inputs and _macs_per_output_element(gm, node) <= 1
                and all(i.op == "placeholder" or i in leading for i in inputs)):
            leading.append(node)
    for group in _connected_runs(leading):
        if _boundary_transitions(group, floats, as_float=True) <= _boundary_transitions(group, floats, as_float=False):
            floats.update({node: INPUT_REASON for node in group if node not in floats})


def decide_float_nodes(gm: fx.GraphModule, backend: Backend) -> dict[fx.Node, str]:
    """Which value nodes run in float, and why. Reads only; the graph is not touched."""
    values = _value_nodes(gm)
    floats = _initial_float(gm, backend, values)
    _follow_producers(values, floats)
    _keep_input_preprocessing_float(gm, values, floats)
    _grow(gm, values, floats)
    _follow_producers(values, floats)
    return floats


def _runs_on_int8_regardless(module: nn.Module) -> bool:
    # torch's convert lets parameterless ops (pools, flatten, activations) run on whatever
    # dtype arrives, even under a None qconfig, and its lowering swaps some modules (LayerNorm)
    # for int8 kernels by pattern alone; only an opaque FloatOp keeps them float.
    if isinstance(module, FloatOp):
        return False
    return type(module) in quant.lowered_by_pattern() or (
        next(module.parameters(), None) is None and next(module.buffers(), None) is None)


def _wrap_call(gm: fx.GraphModule, node: fx.Node, reason: str, target=None) -> None:
    target = node.target if target is None else target
    name = add_submodule_unique(gm, f"float_ops.{node.name}", FloatOp(target, reason))
    with gm.graph.inserting_before(node):
        wrapped = gm.graph.call_module(name, node.args, node.kwargs)
    wrapped.meta = dict(node.meta)
    wrapped.meta["fxq"] = {**node.meta.get("fxq", {}), "float_reason": reason, "changed_by": NAME}
    node.replace_all_uses_with(wrapped)
    gm.graph.erase_node(node)


def _integer_ops(gm: fx.GraphModule, backend: Backend) -> list[fx.Node]:
    """Calls on integer tensors (``mask.unsqueeze(-1)``) that the backend's table matches by
    target: torch would put an observer, then a quantize, on their int64 input."""
    return [n for n in gm.graph.nodes
            if n.op in ("call_function", "call_method") and n.target is not operator.getitem
            and any(True for _ in _tensor_metas(n.meta.get("tensor_meta"))) and not carries_float_tensor(n)
            and backend.unsupported_reason(gm, n) is None]


def place_float_islands(gm: fx.GraphModule, backend: Backend) -> PassResult:
    """Keep every node ``backend`` cannot quantize in float, with as few transitions as possible.

    Example::

        result = place_float_islands(gm, fxq.get_backend("x86"))
        [n.meta["fxq"]["float_reason"] for n in result.graph_module.graph.nodes
         if "float_reason" in n.meta.get("fxq", {})]
    """
    floats = decide_float_nodes(gm, backend)
    changes = []
    for node, reason in floats.items():
        if node.op == "call_module" and _runs_on_int8_regardless(get_module(gm, node)):
            changes.append(f"{node.target}: {reason}")
            _wrap_call(gm, node, float_reason(node) or reason, get_module(gm, node))
        elif node.op == "call_module":
            if float_reason(node) is None:
                fxq_meta(node)["float_reason"] = reason
                changes.append(f"{node.target}: {reason}")
        elif node.op == "call_function" and node.target is operator.getitem:
            fxq_meta(node)["float_reason"] = reason  # element of a float tuple: float already
        else:
            changes.append(f"{node.name}: {reason}")
            _wrap_call(gm, node, reason)
    for node in _integer_ops(gm, backend):
        changes.append(f"{node.name}: {INTEGER_REASON}")
        _wrap_call(gm, node, INTEGER_REASON)
    return finish(gm, changes)
