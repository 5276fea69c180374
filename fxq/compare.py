"""``fxq.compare``: where does the int8 model lose accuracy? SQNR per node, in graph order.

The float graph fxq quantized (after its passes, kept on the QuantizedModel) and the converted
graph are run side by side on the same inputs, and nodes are matched through the graphs:
module calls by target (a fused conv+bn+relu is compared with the last float node of the
fused pattern), function and method calls by name; int8 outputs are dequantized.

Two numbers per node: ``sqnr`` is the end-to-end error at that point (everything upstream
included); ``layer_sqnr`` is the node alone: its int8 op run on the float model's own inputs,
quantized with the scale the int8 model used. A low ``layer_sqnr`` names the culprit.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxq import stages, viz
from fxq.calibrate import as_args
from fxq.errors import InvalidInputError
from fxq.interpreters import Interpreter
from fxq.tensors import clone_inputs, float_tensors, sqnr_db

SKIPPED_KINDS = ("io", "constant", "quantize", "dequantize", "observer")


@dataclass
class Comparison:
    """What :func:`compare` returns: ``rows`` (dicts, graph order) and the output SQNR."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    output_sqnr: float = math.nan

    def worst(self, count: int = 5, key: str = "layer_sqnr") -> list[dict[str, Any]]:
        """The ``count`` rows with the lowest ``key`` (``layer_sqnr`` or ``sqnr``)."""
        return sorted(self.rows, key=lambda row: row[key])[:count]

    def __str__(self) -> str:
        header = f"{'node':<40} {'op':<28} {'runs':<6} {'SQNR dB':>8} {'layer dB':>9}"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            name = (row["unit"] + ":" if row["unit"] else "") + row["node"]
            lines.append(f"{name[:40]:<40} {row['op'][:28]:<28} {row['runs']:<6} {row['sqnr']:>8.1f} "
                         f"{row['layer_sqnr']:>9.1f}")
        lines.append(f"output SQNR: {self.output_sqnr:.1f} dB")
        return "\n".join(lines)


def compare(float_model: nn.Module, qmodel: nn.Module, inputs: Any) -> Comparison:
    """SQNR (dB) of every int8 node against the float model, in graph order, plus the output SQNR.

    Example::

        qmodel = fxq.quantize(model, example_inputs, calibration_data=batches)
        result = fxq.compare(model, qmodel, batches[0])
        print(result)                 # table: node, op, int8/float, SQNR, layer SQNR
        result.worst(3)               # the three layers that lose the most on their own
    """
    return compare_layers(float_model, qmodel, inputs)


def compare_layers(float_model: nn.Module, qmodel: nn.Module, inputs: Any,
                   layer_outputs: Optional[dict] = None) -> Comparison:
    """:func:`compare`; with ``layer_outputs``, also fills it: (unit, float node name) -> (the
    unit's float call (args, kwargs), the node's layer-alone int8 output, dequantized)."""
    float_graphs: Optional[dict] = getattr(qmodel, "float_graphs", None)
    if not float_graphs:
        raise InvalidInputError(f"{type(qmodel).__name__} was not produced by fxq.quantize (no float graphs "
                                "to compare with): pass the QuantizedModel fxq.quantize returned")
    inputs = as_args(inputs)
    float_inputs = _unit_inputs(copy.deepcopy(float_model).eval(), list(float_graphs), inputs)
    result = Comparison()
    with stages.quantized_engine(getattr(qmodel, "engine", None)), torch.no_grad():
        int8_inputs = _unit_inputs(qmodel.model, list(float_graphs), inputs, root_is_graph=True)
        for path, float_gm in float_graphs.items():
            if path not in int8_inputs or (path and path not in float_inputs):
                continue  # this unit did not run on these inputs
            converted = qmodel.model if path == "" else qmodel.model.get_submodule(path)
            float_call = int8_inputs[""] if path == "" else float_inputs[path]
            float_values, int8_values = _run(float_gm, float_call), _run(converted, int8_inputs[path])
            locals_ = {} if layer_outputs is not None else None
            result.rows.extend(_rows(path, float_gm, converted, float_values, int8_values, locals_))
            for name, local in (locals_ or {}).items():
                layer_outputs[(path, name)] = (float_call, local)
        result.output_sqnr = sqnr_db(float_model(*clone_inputs(inputs)), qmodel(*clone_inputs(inputs)))
    return result


def _unit_inputs(model: nn.Module, paths: list[str], inputs: tuple, root_is_graph: bool = False) -> dict:
    """The (args, kwargs) each unit's module was called with when ``model`` ran on ``inputs``."""
    seen: dict[str, tuple] = {}
    handles = []
    for path in paths:
        if path == "" and not root_is_graph:
            continue
        module = model.get_submodule(path) if path else model

        def hook(_module, args, kwargs, path=path):
            seen.setdefault(path, (args, kwargs))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*clone_inputs(inputs))
    finally:
        for handle in handles:
            handle.remove()
    return seen


class _Recorder(Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)


def positional_args(gm: fx.GraphModule, call: tuple) -> tuple:
    """A recorded (args, kwargs) call of a traced module as the positional arguments of ``gm``."""
    args, kwargs = call
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    return tuple(list(args) + [kwargs[name] for name in placeholders[len(args):] if name in kwargs])


def _run(gm: fx.GraphModule, call: tuple) -> dict[str, Any]:
    """Every node's value (by name) when ``gm`` runs on the recorded (args, kwargs)."""
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*clone_inputs(positional_args(gm, call)))
    return {node.name: value for node, value in recorder.env.items()}


def _float_twin(converted: fx.GraphModule, node: fx.Node, float_nodes: dict, float_modules: dict,
                converted_keys: set, twins: dict) -> Optional[fx.Node]:
    """The float node whose output ``node`` (of the converted graph) computes."""
    twin = float_modules.get(str(node.target)) if node.op == "call_module" else float_nodes.get(node.name)
    if twin is None and node.op == "call_function":
        twin = _common_user(converted, node, twins)
    while twin is not None and len(twin.users) == 1:  # extend over float nodes fused into this one
        (user,) = twin.users
        if user.op in ("output", "placeholder") or user.name in converted_keys or str(user.target) in converted_keys:
            break
        if _value_inputs(user) > _value_inputs(node):
            break  # the user also reads other values (a residual add): not fused into this node
        twin = user
    return twin


def _common_user(converted: fx.GraphModule, node: fx.Node, twins: dict) -> Optional[fx.Node]:
    """For a call convert renamed (add + relu -> ``add_relu``): the one float node all its inputs feed."""
    sources = [_source_twin(converted, arg, twins) for arg in node.all_input_nodes if arg.op != "get_attr"]
    if not sources or None in sources:
        return None
    common = set(sources[0].users).intersection(*(source.users for source in sources[1:]))
    return common.pop() if len(common) == 1 else None


def _value_inputs(node: fx.Node) -> int:
    return sum(1 for arg in node.all_input_nodes if arg.op != "get_attr")


def _rows(path: str, float_gm, converted, float_values: dict, int8_values: dict,
          layer_outputs: Optional[dict] = None) -> list[dict[str, Any]]:
    float_nodes = {n.name: n for n in float_gm.graph.nodes}
    float_modules = {str(n.target): n for n in float_gm.graph.nodes if n.op == "call_module"}
    converted_keys = {n.name for n in converted.graph.nodes} | {
        str(n.target) for n in converted.graph.nodes if n.op == "call_module"}
    twins: dict[str, fx.Node] = {}
    rows = []
    for node in converted.graph.nodes:
        if node.op == "placeholder":
            twins[node.name] = float_nodes.get(node.name)
        kind = viz.node_kind(converted, node)
        if kind in SKIPPED_KINDS:
            continue
        twin = _float_twin(converted, node, float_nodes, float_modules, converted_keys, twins)
        if twin is None:
            continue
        twins[node.name] = twin
        reference, actual = float_tensors(float_values.get(twin.name)), float_tensors(int8_values.get(node.name))
        if not _comparable(reference, actual):
            continue
        local = _layer_output(converted, node, int8_values, float_values, twins)
        if layer_outputs is not None and local is not None:
            layer_outputs[twin.name] = local
        rows.append({
            "unit": path, "node": str(node.target) if node.op == "call_module" else node.name,
            "op": viz.describe_target(converted, node), "runs": "int8" if kind == "quantized" else "float",
            "sqnr": sqnr_db(reference, actual),
            "layer_sqnr": sqnr_db(reference, local) if local is not None else math.nan,
            "float_node": twin.name,
        })
    return rows


def _comparable(reference: list, actual: list) -> bool:
    return bool(reference) and len(reference) == len(actual) and all(
        r.shape == a.shape for r, a in zip(reference, actual))


def _source_twin(converted: fx.GraphModule, node: fx.Node, twins: dict) -> Optional[fx.Node]:
    """The float node feeding a converted input, looking through quantize/dequantize."""
    while node.name not in twins and viz.node_kind(converted, node) in ("quantize", "dequantize") \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return twins.get(node.name)


def _layer_output(converted, node: fx.Node, int8_values: dict, float_values: dict, twins: dict) -> Any:
    """``node``'s op alone, fed the float model's values, quantized as the int8 model's inputs were."""
    def substitute(arg: fx.Node) -> Any:
        actual = int8_values.get(arg.name)
        source = _source_twin(converted, arg, twins)
        value = float_values.get(source.name) if source is not None else None
        if not isinstance(actual, torch.Tensor) or not isinstance(value, torch.Tensor) or value.shape != actual.shape:
            return actual
        if actual.is_quantized and actual.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return torch.quantize_per_tensor(value.float(), actual.q_scale(), actual.q_zero_point(), actual.dtype)
        return value if not actual.is_quantized else actual

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), substitute)
    try:
        if node.op == "call_module":
            output = converted.get_submodule(node.target)(*args, **kwargs)
        elif node.op == "call_function":
            output = node.target(*args, **kwargs)
        else:
            output = getattr(args[0], node.target)(*args[1:], **kwargs)
    except Exception:  # an op that cannot be re-run alone: no layer SQNR for it
        return None
    return float_tensors(output)
