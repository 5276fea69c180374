"""Pattern (on the *converted* graph): ``dequantize`` whose users read only its shape
(``x.ndim``, ``x.shape``, ``x.size()``, ``x.dim()``, ``x.numel()``).

Rewrite: the shape is read from the int8 tensor, and a dequantize left with no users goes.
torch's convert dequantizes before any op it has no int8 entry for, shape reads included, so
timm's ``assert x.ndim == 4`` in every BatchNormAct cost a full dequantize of the activation
(timm efficientnet_b0: 49 of them). A quantized tensor has the shape of its float one: exact.
"""
from __future__ import annotations

import torch.fx as fx

from fxq.passes.base import PassResult, finish, reads_only_shape

NAME = "read_shapes_from_int8"


def read_shapes_from_int8(gm: fx.GraphModule) -> PassResult:
    """Read shapes from quantized tensors instead of dequantized copies of them.

    Example::

        converted = quant.convert(prepared, backend_config)   # x_dq = x.dequantize(); x_dq.ndim
        read_shapes_from_int8(converted)                       # x.ndim
    """
    changes = []
    for dequantize in list(gm.graph.nodes):
        if not (dequantize.op == "call_method" and dequantize.target == "dequantize"):
            continue
        readers = [user for user in dequantize.users if reads_only_shape(user)]
        for reader in readers:
            reader.replace_input_with(dequantize, dequantize.args[0])
        if readers:
            changes.append(f"{', '.join(r.name for r in readers)} read the shape of the int8 tensor")
        if not dequantize.users:
            gm.graph.erase_node(dequantize)
    return finish(gm, changes)
