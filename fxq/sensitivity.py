"""``fxq.sensitivity``: which layers hurt the int8 model's output most?

Two measurements per int8 layer, cheapest first:

- ``alone_sqnr``: the output SQNR when this layer *alone* is int8. From one ``fxq.compare``
  run: the layer's int8 op is fed the float model's own values (quantized with the scales the
  int8 model uses), and its output is carried through the rest of the float graph. One float
  forward per layer, no re-quantization; random-init and real nets alike amplify some layers'
  noise far more than others, which this sees and ``layer_sqnr`` does not.
- ``float_sqnr``: the output SQNR of the real int8 model re-quantized with this layer *alone*
  kept float (prepare -> calibrate -> convert again), for the ``refine`` worst layers only.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxq import precision
from fxq.backends import get_backend
from fxq.calibrate import as_args
from fxq.interpreters import Interpreter
from fxq.compare import compare_layers, positional_args
from fxq.requantize import Requantizer, output_sqnr, pattern_nodes, split_calibration
from fxq.tensors import clone_inputs, sqnr_db


@dataclass
class Sensitivity:
    """What :func:`sensitivity` returns: ``rows`` (dicts), most damaging layer first."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    #: output SQNR (dB) of the all-int8 model on the held-out batches
    output_sqnr: float = math.nan

    def worst(self, count: int = 5) -> list[dict[str, Any]]:
        return self.rows[:count]

    def __str__(self) -> str:
        header = f"{'node':<36} {'op':<26} {'layer dB':>8} {'int8 alone':>10} {'float alone':>11}"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            name = (row["unit"] + ":" if row["unit"] else "") + row["node"]
            lines.append(f"{name[:36]:<36} {row['op'][:26]:<26} {row['layer_sqnr']:>8.1f} "
                         f"{row['alone_sqnr']:>10.1f} {row['float_sqnr']:>11.1f}")
        lines.append(f"all int8: output SQNR {self.output_sqnr:.1f} dB   (int8 alone: output SQNR with only this "
                     "layer int8; float alone: re-quantized with only this layer float)")
        return "\n".join(lines)


def sensitivity(model: nn.Module, example_inputs: Any, calibration_data: Optional[Iterable] = None,
                backend: Any = "x86", refine: int = 5) -> Sensitivity:
    """Rank ``model``'s int8 layers by the output error each causes, most damaging first.

    ``calibration_data`` is read once into a list; its last quarter (at least one batch, or
    ``example_inputs`` when there is only one) is held out and the SQNR measured on it. Every
    layer gets ``alone_sqnr`` (cheap); the ``refine`` worst are re-quantized with that layer
    kept float (``float_sqnr``) and ranked first, by it. The model is never modified.

    Example::

        result = fxq.sensitivity(model, example_inputs, batches, backend="x86", refine=3)
        print(result)                        # node, op, layer dB, int8 alone, float alone
        result.worst(1)[0]["node"]           # the layer to keep float first
    """
    from fxq.api import quantize  # fxq.api imports fxq.fallback, which imports this module
    example_inputs, backend = as_args(example_inputs), get_backend(backend)
    batches, held_out = split_calibration(calibration_data, example_inputs)
    qmodel = quantize(model, example_inputs, batches, backend)
    reference = _reference(model, held_out)
    result = Sensitivity(rank_layers(model, qmodel, held_out[0]), output_sqnr(model, qmodel, held_out, reference))
    requantizer = Requantizer(model, qmodel, example_inputs, batches, precision.split_used(backend, qmodel.report))
    for row in result.rows[:refine]:
        reason = "fxq.sensitivity: kept float alone"
        graphs, converted = requantizer.build({key: reason for key in row_nodes(qmodel, row)})
        requantizer.install(graphs, converted)
        row["float_sqnr"] = output_sqnr(model, qmodel, held_out, reference)
    result.rows[:refine] = sorted(result.rows[:refine], key=lambda row: -row["float_sqnr"])
    return result


def rank_layers(model: nn.Module, qmodel: nn.Module, inputs: tuple) -> list[dict[str, Any]]:
    """``fxq.compare`` rows of the int8 layers, each with ``alone_sqnr``, lowest first."""
    layer_outputs: dict = {}
    comparison = compare_layers(model, qmodel, inputs, layer_outputs)
    reference = _reference(model, [inputs])[0]
    runner = copy.deepcopy(model).eval()  # carries a sub-unit's substituted output to the model output
    rows = []
    for row in comparison.rows:
        found = layer_outputs.get((row["unit"], row["float_node"]))
        if row["runs"] != "int8" or found is None:
            continue
        output = _output_with(runner, qmodel.float_graphs, row["unit"], row["float_node"], *found, inputs)
        rows.append({**row, "alone_sqnr": sqnr_db(reference, output) if output is not None else math.nan,
                     "float_sqnr": math.nan})
    return sorted(rows, key=lambda row: (math.isnan(row["alone_sqnr"]), row["alone_sqnr"]))


def row_nodes(qmodel: nn.Module, row: dict[str, Any]) -> list[tuple[str, str]]:
    """The (unit, node) keys to keep float for a row of :func:`rank_layers`."""
    return [(row["unit"], name) for name in pattern_nodes(qmodel.float_graphs[row["unit"]], row)]


def _reference(model: nn.Module, batches: list) -> list:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return [model(*clone_inputs(batch)) for batch in batches]


class _Substitute(Interpreter):
    """Runs a float graph with one node's value replaced."""

    def __init__(self, gm: fx.GraphModule, name: str, value: torch.Tensor):
        super().__init__(gm)
        self.name, self.value = name, value

    def run_node(self, node: fx.Node) -> Any:
        return self.value if node.name == self.name else super().run_node(node)


def _output_with(runner: nn.Module, float_graphs: dict, unit: str, name: str, call: tuple, local: list,
                 inputs: tuple) -> Optional[Any]:
    """The model's output with float node ``name`` of ``unit`` replaced by ``local`` (its int8 value)."""
    if len(local) != 1:
        return None  # a tuple-valued node: not substituted
    gm = float_graphs[unit]
    with torch.no_grad():
        if unit == "":
            return _Substitute(gm, name, local[0]).run(*clone_inputs(positional_args(gm, call)))

        def substitute(_module, args, kwargs, _output):
            return _Substitute(gm, name, local[0]).run(*positional_args(gm, (args, kwargs)))
        handle = runner.get_submodule(unit).register_forward_hook(substitute, with_kwargs=True)
        try:
            return runner(*clone_inputs(inputs))
        finally:
            handle.remove()
