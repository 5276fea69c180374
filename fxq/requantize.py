"""Quantize an fxq model again with chosen nodes kept float: prepare -> calibrate -> convert only.

fxq's passes do not re-run. The float graphs fxq quantized (``QuantizedModel.float_graphs``)
are copied, the chosen nodes marked float (``keep_float``), the float islands re-placed around
them, and only torch's stages repeat. ``fxq.sensitivity`` and ``fxq.quantize(target_sqnr=...)``
use it to try one set of float nodes after another.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxq import stages
from fxq.backends.base import Backend
from fxq.calibrate import as_args, calibrate, calibration_batches
from fxq.compare import _unit_inputs, positional_args
from fxq.passes.base import keep_float
from fxq.passes.place_float_islands import place_float_islands
from fxq.tensors import clone_inputs, sqnr_db

#: A node of a unit's float graph: (unit path, node name).
NodeKey = tuple[str, str]


def split_calibration(calibration_data: Optional[Iterable], example_inputs: tuple) -> tuple[list, list]:
    """(calibration batches, held-out batches the output error is measured on), both lists.

    The data is read once into a list, so a one-shot iterator (a generator, a DataLoader
    iterator) can be replayed for every re-calibration. With two or more batches, the last
    quarter (at least one) is held out and not calibrated on; with one, ``example_inputs``
    is the held-out batch.
    """
    batches = [as_args(batch) for batch in calibration_batches(calibration_data, example_inputs)]
    if len(batches) < 2:
        return batches, [example_inputs]
    held = max(1, len(batches) // 4)
    return batches[:-held], batches[-held:]


def output_sqnr(model: nn.Module, qmodel: nn.Module, batches: list, reference: Optional[list] = None) -> float:
    """SQNR (dB) of ``qmodel``'s outputs against ``model``'s over all ``batches`` together."""
    with torch.no_grad():
        if reference is None:
            reference = [model(*clone_inputs(batch)) for batch in batches]
        return sqnr_db(reference, [qmodel(*clone_inputs(batch)) for batch in batches])


def fresh_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy whose ``node.meta["fxq"]`` dicts are its own (deepcopy shares node meta values)."""
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        if "fxq" in node.meta:
            node.meta["fxq"] = dict(node.meta["fxq"])
    return gm


class Requantizer:
    """Re-quantizes ``qmodel`` in place with some nodes of its float graphs kept float.

    Example::

        requantizer = Requantizer(model, qmodel, example_inputs, batches, fxq.get_backend("x86"))
        graphs, converted = requantizer.build({("", "layer1_0_conv1_1"): "too much error"})
        requantizer.install(graphs, converted)      # qmodel now runs that conv in float
    """

    def __init__(self, model: nn.Module, qmodel: nn.Module, example_inputs: tuple, batches: list,
                 backend: Backend):
        self.qmodel, self.batches, self.backend = qmodel, batches, backend
        self.pristine = {path: fresh_copy(gm) for path, gm in qmodel.float_graphs.items()}
        calls = _unit_inputs(copy.deepcopy(model).eval(), list(self.pristine), example_inputs)
        self.unit_inputs = {path: example_inputs if path == "" else positional_args(gm, calls[path])
                            for path, gm in self.pristine.items() if path == "" or path in calls}

    def build(self, floats: dict[NodeKey, str]) -> tuple[dict[str, fx.GraphModule], dict[str, fx.GraphModule]]:
        """(float graphs, converted units) with every node of ``floats`` (key -> reason) float."""
        graphs = {}
        for path, gm in self.pristine.items():
            gm = fresh_copy(gm)
            marked = [node for node in gm.graph.nodes if (path, node.name) in floats]
            for node in marked:
                keep_float(node, floats[(path, node.name)])
            graphs[path] = place_float_islands(gm, self.backend).graph_module if marked else gm
        with stages.quantized_engine(self.backend.engine):
            prepared = {path: stages.prepare_unit(gm, self.unit_inputs[path], self.backend)
                        for path, gm in graphs.items()}
            calibrate(self._install(prepared), self.batches, progress=False)
            converted = {path: stages.convert_unit(module, self.backend) for path, module in prepared.items()}
        return graphs, converted

    def install(self, graphs: dict[str, fx.GraphModule], converted: dict[str, fx.GraphModule]) -> None:
        """Make ``qmodel`` run ``converted``, and compare against ``graphs`` from now on."""
        self.qmodel.model = self._install(converted)
        self.qmodel.float_graphs = graphs

    def _install(self, units: dict[str, nn.Module]) -> nn.Module:
        from fxq.api import _install  # fxq.api imports this module
        return _install(self.qmodel.model, units)


def pattern_nodes(float_gm: fx.GraphModule, row: dict[str, Any]) -> list[str]:
    """Names of the float nodes a ``fxq.compare`` row's int8 op computes (conv, bn, relu fused)."""
    by_name = {node.name: node for node in float_gm.graph.nodes}
    end = by_name[row["float_node"]]
    start = next((n for n in float_gm.graph.nodes if n.op == "call_module" and str(n.target) == row["node"]),
                 by_name.get(row["node"]))
    if start is None:  # a call convert renamed (add + relu -> add_relu): the multi-input op before ``end``
        inputs = _value_inputs(end)
        start = inputs[0] if len(inputs) == 1 and len(_value_inputs(inputs[0])) > 1 else end
    names, node = [end.name], end
    while node is not start and len(names) < 8 and len(_value_inputs(node)) == 1:
        node = _value_inputs(node)[0]
        names.append(node.name)
    return names[::-1] if node is start else [end.name]


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    return [arg for arg in node.all_input_nodes if arg.op != "get_attr"]
