"""Pattern: a depthwise 2-D conv (+ fused activation) whose channel count is not a multiple of 8.

Why: fbgemm's fast depthwise kernel needs a multiple of 8 channels; otherwise int8 runs a
generic path measured ~100x slower (3x3, 58 channels, 28x28: 17.6 ms int8 vs 0.17 ms fp32;
64 channels: 0.12 ms int8). ShuffleNetV2's 58/116-channel branches made the whole int8 model
5x slower than fp32.

Rewrite: zero-pad the input's channels up to the next multiple of 8 (``F.pad``, an int8 op),
run the conv widened with zero filters and zero bias, keep the first C output channels with
``torch.narrow``. Exact: the extra channels see zeros, compute zeros and are dropped.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq.passes.base import PassResult, finish, fxq_meta, get_module, module_call_counts, root_conv2d, tensor_shape

NAME = "pad_depthwise_channels"
CHANNEL_MULTIPLE = 8


def _depthwise_root(gm: fx.GraphModule, node: fx.Node):
    """(container, key, conv) for a depthwise Conv2d call that needs widening, else None."""
    module = get_module(gm, node) if node.op == "call_module" else None
    conv = root_conv2d(module)
    if conv is None:
        return None
    if conv is module:
        owner_path, _, key = node.target.rpartition(".")
        container = gm.get_submodule(owner_path)
    else:
        container, key = module, "0"
    channels = conv.in_channels
    if not (conv.groups == channels == conv.out_channels and channels % CHANNEL_MULTIPLE):
        return None
    shape = tensor_shape(node.args[0]) if node.args else None
    if shape is None or len(shape) != 4 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    return container, key, conv


def _widened(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    wide = nn.Conv2d(channels, channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     groups=channels, bias=conv.bias is not None).to(conv.weight.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[: conv.out_channels] = conv.weight
        if conv.bias is not None:
            wide.bias.zero_()
            wide.bias[: conv.out_channels] = conv.bias
    return wide


def pad_depthwise_channels(gm: fx.GraphModule) -> PassResult:
    """Widen depthwise convs to a multiple of 8 channels, exactly.

    Example::

        # x (58 channels) -> Conv2d(58, 58, 3, groups=58) becomes
        # F.pad(x, (0, 0, 0, 0, 0, 6)) -> Conv2d(64, 64, 3, groups=64) -> narrow(1, 0, 58)
        pad_depthwise_channels(gm)
    """
    calls = module_call_counts(gm)
    plans = [(node, found) for node in gm.graph.nodes
             if calls.get(node.target) == 1 and (found := _depthwise_root(gm, node)) is not None]
    changes = []
    for node, (container, key, conv) in plans:
        channels = conv.in_channels
        wide = -(-channels // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
        setattr(container, key, _widened(conv, wide))
        graph = gm.graph
        with graph.inserting_before(node):
            padded = graph.call_function(F.pad, (node.args[0], (0, 0, 0, 0, 0, wide - channels)))
        node.replace_input_with(node.args[0], padded)
        users = list(node.users)
        with graph.inserting_after(node):
            kept = graph.call_function(torch.narrow, (node, 1, 0, channels))
        for user in users:
            user.replace_input_with(node, kept)
        for added in (padded, kept):
            fxq_meta(added)["changed_by"] = NAME
        changes.append(f"{node.target}: depthwise conv widened from {channels} to {wide} channels")
    return finish(gm, changes)
