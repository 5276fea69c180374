"""Pattern: ``conv/conv-transpose/linear -> relu | relu6 | hardtanh(lo<=0<=hi) | clamp(lo<=0<=hi)``.

Rewrite: one fused module call. ReLU after conv1d/2d/3d or linear becomes torch's own
fused module (a real int8 conv+relu kernel); every other clamp becomes an fxq fused module
whose clamp is absorbed by the output quantization range (see ``fxq.fused``), so the
converted graph has no separate activation op — the ReLU6 the TFLite users in seed 003
lost 10% speed to.

Runs after BatchNorm folding, so ``conv -> bn -> relu6`` arrives here as ``conv -> relu6``.
The root must have exactly one user (the activation): otherwise the unclamped value is
needed elsewhere and fusing would change it. Users that only read its shape are the
exception (timm's BatchNormAct2d asserts ``x.ndim == 4`` between the conv and its ReLU):
they read the fused output, which has the same shape. Unfused, that ReLU left the conv's
int8 output with zero point ~128 and half its levels, and fbgemm's depthwise kernel loses
precision on such inputs (measured: a timm ese_vovnet19b_dw depthwise conv 16.9 dB at zero
point 125 against 36.0 dB at 0 on the same values).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq import fused
from fxq.passes.base import (PassResult, add_submodule_unique, finish, fxq_meta, get_module, module_call_counts,
                             reads_only_shape)
from fxq.quant import nni

NAME = "merge_activations"

_NATIVE_RELU_FUSION = {
    nn.Conv1d: nni.ConvReLU1d, nn.Conv2d: nni.ConvReLU2d, nn.Conv3d: nni.ConvReLU3d,
    nn.Linear: nni.LinearReLU,
}
_RELU_FUNCTIONS = {F.relu, torch.relu}


def clamp_bounds(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[float, float]]:
    """(lo, hi) when ``node`` is a clamp-like activation with constant bounds, else None."""
    module = get_module(gm, node)
    if module is not None:
        if type(module) is nn.ReLU:
            return 0.0, math.inf
        if type(module) in (nn.ReLU6, nn.Hardtanh):
            return float(module.min_val), float(module.max_val)
        return None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return 0.0, math.inf
    if node.op == "call_method" and node.target == "relu":
        return 0.0, math.inf
    if node.op == "call_function" and node.target is F.relu6:
        return 0.0, 6.0
    if node.op == "call_function" and node.target is F.hardtanh:
        return _constant_bounds(node, ("min_val", "max_val"), (-1.0, 1.0))
    if (node.op == "call_function" and node.target is torch.clamp) or (
            node.op == "call_method" and node.target == "clamp"):
        return _constant_bounds(node, ("min", "max"), (None, None))
    return None


def _constant_bounds(node: fx.Node, names: tuple[str, str], defaults) -> Optional[tuple[float, float]]:
    bounds = []
    for position, (name, default) in enumerate(zip(names, defaults)):
        value = node.args[position + 1] if len(node.args) > position + 1 else node.kwargs.get(name, default)
        if value is not None and not isinstance(value, (int, float)):
            return None  # a tensor or computed bound: not a constant clamp
        bounds.append(value)
    lo = -math.inf if bounds[0] is None else float(bounds[0])
    hi = math.inf if bounds[1] is None else float(bounds[1])
    return lo, hi


def _activation_module(lo: float, hi: float) -> nn.Module:
    if lo == 0.0 and hi == math.inf:
        return nn.ReLU()
    if lo == 0.0 and hi == 6.0:
        return nn.ReLU6()
    return nn.Hardtanh(lo, hi)


def _fusion_for(gm: fx.GraphModule, activation: fx.Node, absorb_clamps: bool):
    """The fused module replacing ``root -> activation``, or None when the pattern does not apply."""
    root_node = activation.args[0] if activation.args else None
    if not (isinstance(root_node, fx.Node) and root_node.op == "call_module"
            and all(user is activation or reads_only_shape(user) for user in root_node.users)):
        return None
    root = get_module(gm, root_node)
    bounds = clamp_bounds(gm, activation)
    if bounds is None or type(root) not in fused.FUSED_FOR_ROOT:
        return None
    lo, hi = bounds
    if (lo, hi) == (0.0, math.inf) and type(root) in _NATIVE_RELU_FUSION:
        return _NATIVE_RELU_FUSION[type(root)](root, nn.ReLU())
    if absorb_clamps and lo <= 0.0 <= hi:
        return fused.FUSED_FOR_ROOT[type(root)](root, _activation_module(lo, hi))
    return None


def merge_activations(gm: fx.GraphModule, absorb_clamps: bool = True) -> PassResult:
    """Fuse each ``root -> activation`` pair into one module call.

    ``absorb_clamps`` is the backend's answer to "does my activation quantization saturate
    at the clamp bounds?" — true for affine uint8 activations, false for symmetric ones.

    Example::

        gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6()))
        merge_activations(gm).modified  # True: one ConvAct2d call remains
    """
    module_calls = module_call_counts(gm)
    plan = []
    for node in gm.graph.nodes:
        fused_module = _fusion_for(gm, node, absorb_clamps)
        if fused_module is not None:
            plan.append((node, node.args[0], fused_module))
    changes = []
    for activation, root_node, fused_module in plan:
        if module_calls[root_node.target] == 1:
            target = root_node.target
            gm.add_submodule(target, fused_module)  # replaces the root in place: names stay readable
        else:  # the root module is shared with another call site, which must stay unfused
            target = add_submodule_unique(gm, f"{root_node.target}_fused", fused_module)
        # at the root's place: a shape read between root and activation moves to the fused node
        with gm.graph.inserting_before(root_node):
            fused_node = gm.graph.call_module(target, root_node.args, root_node.kwargs)
        fused_node.meta = {k: v for k, v in activation.meta.items() if k != "fxq"}
        fxq_meta(fused_node)["changed_by"] = NAME
        activation.replace_all_uses_with(fused_node)
        gm.graph.erase_node(activation)
        root_node.replace_all_uses_with(fused_node)  # the shape reads left
        gm.graph.erase_node(root_node)
        changes.append(f"{root_node.target} + {_describe(activation)} -> {type(fused_module).__name__}")
    return finish(gm, changes)


def _describe(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))
