"""Pattern: an average (avg pool, adaptive avg pool, mean) whose every output averages many
inputs, on a backend whose int8 kernel gives the output the *input's* scale.

Why: a mean of N values spans a far narrower range than the values themselves (a global
average pool of post-ReLU features typically 3-10x narrower), so rounding it to the input's
step throws away most of its precision, right before the classifier or a squeeze-excite
gate. Kept float, the average is computed exactly and quantized again with a scale observed
on its own output: one dequantize of the input, one quantize of the (small) output.

Only where the average is the tensor's sole consumer: then the dequantize replaces the int8
average kernel at about its cost. In squeeze-excite blocks the tensor is also multiplied by
the gate, stays int8 for that, and a float average would add a full extra pass: measured on
mobilenet_v3_large, 9 such pools cost 7% latency for no SQNR gain, so they are left int8.

Rewrite: mark the node float (``keep_float``); ``place_float_islands`` does the rest.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq.backends.base import Backend, pattern_key
from fxq.backends.patterns import single_op_patterns
from fxq.passes.base import PassResult, float_reason, keep_float, tensor_shape
from fxq.quant import ObservationType

AVERAGING_TARGETS = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    torch.mean, "mean",
)
#: Inputs per output from which the int8 result loses more than it saves: averaging 16
#: independent values narrows their spread 4x, i.e. 2 of the 7-8 bits.
MIN_AVERAGED_VALUES = 16


def requantize_wide_averages(gm: fx.GraphModule, backend: Backend) -> PassResult:
    """Keep wide averages float so their output gets its own quantization scale.

    Example::

        result = requantize_wide_averages(gm, fxq.get_backend("x86"))
        # adaptive_avg_pool2d(x, 1) on a 7x7 map now carries a float_reason
    """
    shared = single_op_patterns(backend.backend_config, ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT)
    changes = []
    for node in gm.graph.nodes:
        target = pattern_key(gm, node)
        if target not in AVERAGING_TARGETS or target not in shared or float_reason(node) is not None:
            continue
        if not _sole_consumer(node):
            continue  # the input stays int8 for its other users: a float average would cost an extra pass
        averaged = _values_per_output(node)
        if averaged >= MIN_AVERAGED_VALUES:
            reason = (f"averages {averaged:g} values per output: in int8 the result would keep the "
                      "input's scale, so it runs in float and is re-quantized with its own")
            keep_float(node, reason)
            changes.append(f"{node.name}: {reason}")
    return PassResult(gm, bool(changes), changes)  # meta only: the graph itself is unchanged


def _sole_consumer(node: fx.Node) -> bool:
    """Whether the averaged tensor has no other user (a squeeze-excite gate multiplies it back)."""
    source = node.args[0] if node.args else None
    return isinstance(source, fx.Node) and len(source.users) == 1


def _values_per_output(node: fx.Node) -> float:
    source = node.args[0] if node.args else None
    input_shape, output_shape = tensor_shape(source), tensor_shape(node)
    if input_shape is None or output_shape is None or not math.prod(output_shape):
        return 0.0
    return math.prod(input_shape) / math.prod(output_shape)
