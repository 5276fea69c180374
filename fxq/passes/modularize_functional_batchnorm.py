"""Pattern: ``F.batch_norm(x, running_mean, running_var, weight, bias, training=False, ...)``
on stored statistics (``get_attr`` nodes), with constant ``training=False`` and ``eps``.

Rewrite: a call of a new eval ``nn.BatchNorm{1,2,3}d`` holding the same tensors. timm's
``BatchNormAct2d`` (EfficientNet, MobileNetV3, RegNet, CSPNet, VoVNet... nearly every timm
CNN) subclasses ``nn.BatchNorm2d`` but calls ``F.batch_norm`` in its own ``forward``, so
torch.fx traces a function that neither BN folding nor any backend knows: every BN stayed a
float island (measured, timm efficientnet_b0 at 128 px: 48 float batch_norms, 43 Q/DQ pairs,
int8 0.77x fp32). As a module it folds into the preceding conv like any BatchNorm.
Exact in float (the module makes the same ``F.batch_norm`` call).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq.passes.base import PassResult, add_submodule_unique, finish, get_attr_value, tensor_shape

NAME = "modularize_functional_batchnorm"

_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_MODULE_FOR_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _bound(node: fx.Node) -> Optional[dict[str, Any]]:
    if len(node.args) > len(_ARGS) or any(key not in _ARGS for key in node.kwargs):
        return None
    bound = dict(_DEFAULTS)
    bound.update(zip(_ARGS, node.args))
    bound.update(node.kwargs)
    return bound if "input" in bound and "running_mean" in bound and "running_var" in bound else None


def _as_parameter(value: torch.Tensor) -> nn.Parameter:
    return value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)


def _module_for(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[nn.Module, str, fx.Node]]:
    """The BatchNorm module computing ``node``, the path its statistics came from, and its input."""
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    bound = _bound(node)
    if bound is None or bound["training"] is not False or not isinstance(bound["eps"], (int, float)):
        return None
    shape = tensor_shape(bound["input"])
    mean, var = get_attr_value(gm, bound["running_mean"]), get_attr_value(gm, bound["running_var"])
    weight, bias = (get_attr_value(gm, bound[name]) for name in ("weight", "bias"))
    if shape is None or len(shape) not in _MODULE_FOR_RANK or mean is None or var is None:
        return None
    if (bound["weight"] is not None and weight is None) or (bound["bias"] is not None and bias is None):
        return None  # weights computed at run time: not a stored BatchNorm
    channels = shape[1]
    if any(t is not None and t.shape != (channels,) for t in (mean, var, weight, bias)):
        return None
    module = _MODULE_FOR_RANK[len(shape)](channels, eps=float(bound["eps"]),
                                          affine=weight is not None or bias is not None)
    module.running_mean, module.running_var = mean, var
    if module.affine:
        module.weight = _as_parameter(weight) if weight is not None else nn.Parameter(torch.ones_like(mean), False)
        module.bias = _as_parameter(bias) if bias is not None else nn.Parameter(torch.zeros_like(mean), False)
    return module.eval(), bound["running_mean"].target.rpartition(".")[0], bound["input"]


def modularize_functional_batchnorm(gm: fx.GraphModule) -> PassResult:
    """Turn eval-mode ``F.batch_norm`` calls on stored statistics into BatchNorm module calls.

    Example::

        gm = torch.fx.symbolic_trace(timm.create_model("efficientnet_b0").eval())
        modularize_functional_batchnorm(gm)   # F.batch_norm(...) -> call_module(bn1_bn)
    """
    plan = [(node, found) for node in gm.graph.nodes if (found := _module_for(gm, node)) is not None]
    changes = []
    for node, (module, owner, source) in plan:
        name = add_submodule_unique(gm, f"{owner}.bn" if owner else "batch_norm", module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (source,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        statistics = [arg for arg in node.all_input_nodes if arg.op == "get_attr"]
        gm.graph.erase_node(node)
        for leftover in statistics:
            if not leftover.users:
                gm.graph.erase_node(leftover)
        changes.append(f"{node.name}: F.batch_norm on {owner or 'stored statistics'} -> {type(module).__name__} {name}")
    return finish(gm, changes)
