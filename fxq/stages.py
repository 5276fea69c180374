"""prepare_fx -> calibrate -> convert_fx for each traced unit, with automatic float fallback.

Before the real calibration, each unit is quantized once on its example inputs (a dry run).
A node whose int8 kernel is missing, or that turns finite float values into NaN/Inf, is
found by running the converted graph node by node; it is marked float, the float islands
are re-placed, and the dry run repeats. Only then is the (possibly one-shot) calibration
data consumed.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxq import quant
from fxq.backends.base import Backend
from fxq.calibrate import calibrate
from fxq.errors import QuantizationFailure
from fxq.float_op import FloatOp
from fxq.interpreters import Interpreter
from fxq.modes import dynamic_qconfig, dynamic_reason
from fxq.passes.base import float_reason, keep_float
from fxq.passes.place_float_islands import place_float_islands
from fxq.passes.read_shapes_from_int8 import read_shapes_from_int8
from fxq.passes.run_shared_ops_in_int8 import run_shared_ops_in_int8
from fxq.tensors import all_finite, clone_inputs, float_tensors

MAX_FALLBACKS = 32


@contextlib.contextmanager
def quantized_engine(engine: Optional[str]) -> Iterator[None]:
    """Use ``engine`` for torch's quantized kernels inside the block only."""
    if engine is None:
        yield
        return
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _is_torch_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.nn.", "torch.ao.nn."))


def prepare_unit(gm: fx.GraphModule, example_inputs: tuple, backend: Backend,
                 activation_observer: Optional[str] = None, qat: bool = False) -> fx.GraphModule:
    """prepare_fx on a copy of ``gm``: float nodes get a None qconfig, leaves stay opaque,
    dynamic layers (``fxq.modes``) torch's dynamic qconfig. With ``qat``, prepare_qat_fx on a
    copy in training mode: fake quantizers, and conv+BN as torch's QAT ConvBn modules."""
    gm = copy.deepcopy(gm)  # convert mutates fused modules in place; keep the float graph reusable
    if qat:
        gm.train()  # torch fuses conv+BN into a QAT ConvBn only when both train
    mapping = backend.qconfig_mapping(activation_observer, gm, qat=qat)
    leaves = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if dynamic_reason(node) is not None:  # float at the graph level, int8 weights inside
            mapping.set_module_name(node.target, dynamic_qconfig(module))
            continue
        if float_reason(node) is not None:
            mapping.set_module_name(node.target, None)
        if float_reason(node) is not None or not _is_torch_module(module):
            leaves.append(node.target)
    try:
        return quant.prepare(gm, mapping, example_inputs, backend.backend_config, leaves, [FloatOp], qat=qat)
    except Exception as error:
        raise QuantizationFailure(f"prepare_fx failed for {type(gm).__name__}: {type(error).__name__}: {error}. "
                                  "Please report this model to fxq.") from error


def convert_unit(prepared: fx.GraphModule, backend: Backend) -> fx.GraphModule:
    try:
        converted = quant.convert(prepared, backend.backend_config, reference=backend.reference)
    except Exception as error:
        raise QuantizationFailure(f"convert_fx failed: {type(error).__name__}: {error}. "
                                  "Please report this model to fxq.") from error
    converted = run_shared_ops_in_int8(converted, backend.int8_passthrough_ops).graph_module
    return read_shapes_from_int8(converted).graph_module


class _NodeTracker(Interpreter):
    """Runs a graph node by node, remembering the first node that fails or goes non-finite."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.bad_node: Optional[fx.Node] = None
        self.problem = ""

    def run_node(self, node: fx.Node):
        try:
            value = super().run_node(node)
        except Exception as error:
            self.bad_node, self.problem = node, f"int8 kernel failed ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
            raise
        if node.op != "output" and float_tensors(value) and not all_finite(value) and self._inputs_finite(node):
            self.bad_node, self.problem = node, "int8 execution produced NaN/Inf where float did not"
            raise FloatingPointError(self.problem)
        return value

    def _inputs_finite(self, node: fx.Node) -> bool:
        values = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: values.append(self.env.get(a)))
        return all(all_finite(v) for v in values if v is not None)


def _locate_failure(converted: fx.GraphModule, example_inputs: tuple) -> Optional[tuple[fx.Node, str]]:
    tracker = _NodeTracker(converted)
    try:
        with torch.no_grad():
            tracker.run(*clone_inputs(example_inputs))
    except Exception as error:
        if tracker.bad_node is None:
            return None if isinstance(error, FloatingPointError) else (None, f"{type(error).__name__}: {error}")
        return tracker.bad_node, tracker.problem
    return None


def _float_node_for(gm: fx.GraphModule, converted_node: Optional[fx.Node]) -> Optional[fx.Node]:
    """The node of the float graph that ``converted_node`` came from."""
    if converted_node is None:
        return None
    candidates = [converted_node]
    if converted_node.op == "call_method" and converted_node.target == "dequantize":
        candidates = [a for a in converted_node.all_input_nodes]  # blame the producer
    for candidate in candidates:
        for node in gm.graph.nodes:
            if candidate.op == "call_module" and node.op == "call_module" and node.target == candidate.target:
                return node
            if node.name == candidate.name and node.op == candidate.op:
                return node
    return None


def settle_float_nodes(gm: fx.GraphModule, example_inputs: tuple, backend: Backend) -> tuple[fx.GraphModule, list[str]]:
    """Dry-run quantization until every node either runs in int8 or is kept float."""
    notes = []
    for _ in range(MAX_FALLBACKS):
        prepared = prepare_unit(gm, example_inputs, backend, activation_observer="minmax")
        calibrate(prepared, [example_inputs], progress=False)
        converted = convert_unit(prepared, backend)
        failure = _locate_failure(converted, example_inputs)
        if failure is None:
            return gm, notes
        bad, problem = failure
        culprit = _float_node_for(gm, bad)
        if culprit is None or float_reason(culprit) is not None:
            where = bad.format_node() if bad is not None else "the converted model"
            raise QuantizationFailure(f"int8 model fails at {where}: {problem}; fxq could not map it to a "
                                      "node it can keep in float. Please report this model.")
        keep_float(culprit, problem)
        notes.append(f"{culprit.name}: {problem} -> kept float")
        gm = place_float_islands(gm, backend).graph_module
    raise QuantizationFailure(f"more than {MAX_FALLBACKS} nodes failed in int8; giving up")
