"""Turn each BatchNorm that could not be folded into a per-channel affine module.

Why: runs after ``fold_batchnorm``; what is left is BatchNorm with no foldable producer
(first layer of the net, after ``cat``/``add``, after a reshape, or behind a producer
with other users). An eval-mode BN is just ``x * scale[c] + shift[c]``, which
``build_channel_affine`` expresses as one depthwise 1x1 conv (or diagonal Linear) with
per-channel weights, for backends with no int8 kernel for that BatchNorm (BatchNorm1d
everywhere). Where the backend has one (x86: BatchNorm2d/3d), the BN stays: on densenet121,
whose 58 BatchNorms follow a ``cat``, the native kernel measured 0.6 dB closer to fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch.fx as fx
from torch import nn

from fxq.passes.base import (
    PassResult,
    add_submodule_unique,
    finish,
    float_reason,
    fxq_meta,
    keep_float,
    tensor_shape,
)
from fxq.passes.channel_affine import (
    CHANNEL_AFFINE_RANKS,
    batchnorm_called_by,
    batchnorm_float_reason,
    batchnorm_scale_shift,
    build_channel_affine,
)

PASS_NAME = "lower_batchnorm"


@dataclass(frozen=True)
class _Lowering:
    node: fx.Node
    bn: nn.Module
    rank: int


def lower_batchnorm(gm: fx.GraphModule, native: frozenset = frozenset()) -> PassResult:
    """Replace every eval-mode BatchNorm with running statistics by a channel affine.

    BatchNorm modules whose type is in ``native`` (the backend has an int8 kernel) stay, unless
    they have no affine weights: torch's int8 BatchNorm cannot be built from one (convert_fx
    raises on ``bn.weight`` being None).
    """
    lowerings: list[_Lowering] = []
    for node in gm.graph.nodes:
        bn = batchnorm_called_by(gm, node)
        if bn is None or float_reason(node) is not None or (type(bn) in native and bn.affine):
            continue
        plan = _plan(node, bn)
        if isinstance(plan, str):
            keep_float(node, f"BatchNorm '{node.target}' stays float: {plan}")
        else:
            lowerings.append(plan)
    affine_names: dict[str, str] = {}  # one affine per BN module, shared by its call sites
    return finish(gm, [_lower(gm, plan, affine_names) for plan in lowerings])


def _plan(node: fx.Node, bn: nn.Module) -> Union[_Lowering, str]:
    """The checked lowering of BatchNorm call ``node``, or the reason it must stay float."""
    reason = batchnorm_float_reason(bn)
    if reason is not None:
        return reason
    shape = tensor_shape(node.args[0])
    if shape is None:
        return "its input shape is unknown (shape propagation did not reach it)"
    if len(shape) not in CHANNEL_AFFINE_RANKS or shape[1] != bn.num_features:
        return f"input shape {tuple(shape)} does not have {bn.num_features} channels in dim 1"
    dtype = node.args[0].meta["tensor_meta"].dtype
    if dtype != bn.running_mean.dtype:
        return f"input dtype {dtype} differs from the running statistics' {bn.running_mean.dtype}"
    return _Lowering(node, bn, len(shape))


def _lower(gm: fx.GraphModule, plan: _Lowering, affine_names: dict[str, str]) -> str:
    """Call a channel affine instead of the BN at ``plan.node``; erase the BN call."""
    key = f"{plan.node.target}@rank{plan.rank}"
    if key not in affine_names:
        affine_names[key] = add_submodule_unique(gm, f"{plan.node.target}_affine", _affine_of(plan))
    graph = gm.graph
    with graph.inserting_before(plan.node):
        affine = graph.call_module(affine_names[key], plan.node.args)
    fxq_meta(affine)["changed_by"] = PASS_NAME
    plan.node.replace_all_uses_with(affine)
    graph.erase_node(plan.node)
    return f"lowered BatchNorm '{plan.node.target}' to channel affine '{affine_names[key]}'"


def _affine_of(plan: _Lowering) -> nn.Module:
    scale, shift = batchnorm_scale_shift(plan.bn)
    dtype = plan.bn.running_mean.dtype
    return build_channel_affine(scale.to(dtype), shift.to(dtype), plan.rank)
