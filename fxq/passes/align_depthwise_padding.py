"""Pattern: zero ``F.pad`` with uneven sides -> depthwise 2-D conv (+ fused activation) with
no padding of its own: TensorFlow "same" padding at stride 2 pads (0, 1).

Why: fbgemm's fast depthwise kernel needs the conv's own symmetric "same" padding
((k - 1) / 2). Without it int8 falls back to a generic path measured 10-300x slower than
the fast one (3x3 depthwise, 32 channels, 32x32: 1.7 ms vs 0.07 ms at stride 2), which is
what makes TF-ported MobileNets/EfficientNets slower in int8 than in fp32.

Rewrite: give the conv padding p = (k - 1) / 2, pad the input by (a', b') so the conv's
windows line up with the original ones shifted by t outputs, and crop t outputs off the
front with ``torch.narrow`` (an int8 view). Per spatial dim with original pads (a, b) and
stride s: t is the smallest integer with a' = t*s + a - p >= 0. Exact: every kept output
sees the same input window as before; the extra zeros only reach cropped outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxq.passes.base import (PassResult, finish, fxq_meta, get_module, is_depthwise, module_call_counts, root_conv2d,
                             tensor_shape)

NAME = "align_depthwise_padding"


@dataclass(frozen=True)
class _Alignment:
    input_pad: tuple[int, int, int, int]  # F.pad order: (left, right, top, bottom)
    conv_padding: tuple[int, int]
    crop: tuple[tuple[int, int], tuple[int, int]]  # per spatial dim (H, W): (start, length)


def _zero_pad_sides(node: fx.Node) -> Optional[tuple[int, ...]]:
    if not (node.op == "call_function" and node.target is F.pad and len(node.users) == 1):
        return None
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, (list, tuple)) or len(pad) != 4:
        return None
    return tuple(pad) if all(isinstance(p, int) and p >= 0 for p in pad) else None


def _align_dim(before: int, after: int, size: int, kernel: int, stride: int, out_size: int) -> tuple[int, int, int, int]:
    """(pad before, pad after, crop start, conv padding) for one spatial dim."""
    padding = (kernel - 1) // 2
    crop = -(-(padding - before) // stride) if padding > before else 0
    new_before = crop * stride + before - padding
    new_after = 0
    while (new_before + size + new_after + 2 * padding - kernel) // stride + 1 < crop + out_size:
        new_after += 1
    return new_before, new_after, crop, padding


def _plan(gm: fx.GraphModule, conv_node: fx.Node) -> Optional[_Alignment]:
    conv = root_conv2d(get_module(gm, conv_node)) if conv_node.op == "call_module" else None
    if not is_depthwise(conv) or conv.padding_mode != "zeros":
        return None
    if conv.padding not in ((0, 0), "valid") or conv.dilation != (1, 1):
        return None
    kernel_h, kernel_w = conv.kernel_size
    pad_node = conv_node.args[0] if conv_node.args else None
    sides = _zero_pad_sides(pad_node) if isinstance(pad_node, fx.Node) else None
    in_shape, out_shape = tensor_shape(pad_node.args[0]) if sides else None, tensor_shape(conv_node)
    if sides is None or in_shape is None or out_shape is None or len(in_shape) != 4 or kernel_h % 2 == 0 or kernel_w % 2 == 0:
        return None
    left, right, top, bottom = sides
    if (top, bottom) == ((kernel_h - 1) // 2,) * 2 and (left, right) == ((kernel_w - 1) // 2,) * 2:
        return None  # already "same": modularize_functional_convs folds it into the conv
    h = _align_dim(top, bottom, in_shape[2], kernel_h, conv.stride[0], out_shape[2])
    w = _align_dim(left, right, in_shape[3], kernel_w, conv.stride[1], out_shape[3])
    return _Alignment((w[0], w[1], h[0], h[1]), (h[3], w[3]), ((h[2], out_shape[2]), (w[2], out_shape[3])))


def align_depthwise_padding(gm: fx.GraphModule) -> PassResult:
    """Move uneven zero pads of depthwise convs into the conv, cropping the extra outputs.

    Example::

        # F.pad(x, (0, 1, 0, 1)) -> depthwise Conv2d(k=3, s=2, padding=0) becomes
        # F.pad(x, (1, 0, 1, 0)) -> Conv2d(padding=1) -> narrow(2, 1, H') -> narrow(3, 1, W')
        align_depthwise_padding(gm)
    """
    calls = module_call_counts(gm)
    plans = [(node, plan) for node in gm.graph.nodes
             if (plan := _plan(gm, node)) is not None and calls[node.target] == 1]
    changes = []
    for conv_node, plan in plans:
        pad_node = conv_node.args[0]
        pad_node.args = (pad_node.args[0], plan.input_pad, *pad_node.args[2:])
        root_conv2d(get_module(gm, conv_node)).padding = plan.conv_padding
        cropped = conv_node
        users = list(conv_node.users)
        for dim, (start, length) in zip((2, 3), plan.crop):
            with gm.graph.inserting_after(cropped):
                cropped = gm.graph.call_function(torch.narrow, (cropped, dim, start, length))
            fxq_meta(cropped)["changed_by"] = NAME
        for user in users:
            user.replace_input_with(conv_node, cropped)
        changes.append(f"{conv_node.target}: padding {plan.conv_padding}, input pad {plan.input_pad}, "
                       f"outputs cropped at {plan.crop[0][0]},{plan.crop[1][0]}")
    return finish(gm, changes)
