"""Fold eval-mode BatchNorm into the convolution or Linear that feeds it.

Why: an int8 backend runs conv+BN best as one conv whose weights already carry the BN
scale, so the BN costs nothing and adds no extra rounding step. Folding is valid only
when the producer's output goes nowhere but the BN; other BatchNorms are left for
``lower_batchnorm``. A producer module called from several places is never mutated:
the folded copy is registered under a new name for this call site.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from fxq.passes.base import (
    PassResult,
    add_submodule_unique,
    finish,
    float_reason,
    fxq_meta,
    get_module,
    keep_float,
    reads_only_shape,
    tensor_owners,
    tensor_shape,
)
from fxq.passes.channel_affine import (
    batchnorm_called_by,
    batchnorm_float_reason,
    batchnorm_scale_shift,
    has_hooks,
)

PASS_NAME = "fold_batchnorm"

# Exact types: subclasses (QAT modules, parametrized weights) compute their weight differently.
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PRODUCER_TYPES = (*_CONV_TYPES, *TRANSPOSED_CONV_TYPES, nn.Linear)


@dataclass(frozen=True)
class _Fold:
    bn_node: fx.Node
    producer: fx.Node
    fused: nn.Module


def fold_batchnorm(gm: fx.GraphModule, producers: tuple = PRODUCER_TYPES) -> PassResult:
    """Fold each BatchNorm whose only input is a single-user conv/Linear into that module;
    ``producers`` narrows which module types fold (QAT folds transposed convs only)."""
    folds: list[_Fold] = []
    for node in gm.graph.nodes:
        bn = batchnorm_called_by(gm, node)
        if bn is None or float_reason(node) is not None:
            continue
        reason = batchnorm_float_reason(bn)
        if reason is not None:
            keep_float(node, f"BatchNorm '{node.target}' stays float: {reason}")
            continue
        producer = _foldable_producer(gm, node, bn, producers)
        if producer is not None:
            folds.append(_Fold(node, producer, fuse_into(get_module(gm, producer), bn)))
    shared_targets = _targets_not_safe_to_replace(gm)
    return finish(gm, [_apply(gm, fold, shared_targets) for fold in folds])


def _foldable_producer(gm: fx.GraphModule, bn_node: fx.Node, bn: nn.Module, producers: tuple) -> Optional[fx.Node]:
    """The conv/Linear node that ``bn_node`` can be folded into, else None."""
    producer = bn_node.args[0]
    # other users may only read the shape (timm's BatchNormAct asserts x.ndim == 4), which folding keeps
    if not isinstance(producer, fx.Node) or any(user is not bn_node and not reads_only_shape(user)
                                                for user in producer.users):
        return None
    module = get_module(gm, producer)
    if module is None or type(module) not in producers or has_hooks(module) or float_reason(producer) is not None:
        return None
    if type(module) in _CONV_TYPES + TRANSPOSED_CONV_TYPES:
        channels = module.out_channels
    elif type(module) is nn.Linear:
        # Linear mixes the last dim; BN1d normalizes dim 1: the same dim only for (N, C).
        shape = tensor_shape(producer)
        if shape is None or len(shape) != 2:
            return None
        channels = module.out_features
    else:
        return None
    if channels != bn.num_features or not module.weight.is_floating_point():
        return None
    return producer


def fuse_into(module: nn.Module, bn: nn.Module) -> nn.Module:
    """A new copy of conv/Linear ``module`` computing ``bn(module(x))``; ``module`` is untouched."""
    scale, shift = batchnorm_scale_shift(bn)
    weight = module.weight.detach()
    bias = torch.zeros_like(scale) if module.bias is None else module.bias.detach().double()
    fused = copy.deepcopy(module)
    fused.weight = nn.Parameter(
        _scale_output_channels(module, weight.double(), scale).to(weight.dtype),
        requires_grad=module.weight.requires_grad,
    )
    fused.bias = nn.Parameter(
        (bias * scale + shift).to(weight.dtype), requires_grad=module.weight.requires_grad
    )
    return fused


def _scale_output_channels(
    module: nn.Module, weight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``weight`` with every output channel ``o`` multiplied by ``scale[o]``."""
    if type(module) not in TRANSPOSED_CONV_TYPES:
        # Conv (C_out, C_in/groups, *k) and Linear (C_out, C_in): output channels lead.
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    # Transposed conv weight is (C_in, C_out/groups, *k); output channel o of group g is
    # g * (C_out/groups) + j, so split the input dim by group to line the scale up.
    groups, kernel = module.groups, weight.shape[2:]
    grouped = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], *kernel)
    per_group = scale.reshape(groups, 1, weight.shape[1], *([1] * len(kernel)))
    return (grouped * per_group).reshape(weight.shape)


def _targets_not_safe_to_replace(gm: fx.GraphModule) -> set[str]:
    """Module paths called more than once or whose tensors are read via get_attr."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    shared = {target for target, count in calls.items() if count > 1}
    return shared | tensor_owners(gm)


def _apply(gm: fx.GraphModule, fold: _Fold, shared_targets: set[str]) -> str:
    """Install the fused module for the producer node, reroute the BN's users, erase it."""
    target = str(fold.producer.target)
    if target in shared_targets:
        fold.producer.target = add_submodule_unique(gm, f"{target}_bn_folded", fold.fused)
    else:
        gm.set_submodule(target, fold.fused)
    fxq_meta(fold.producer)["changed_by"] = PASS_NAME
    fold.bn_node.replace_all_uses_with(fold.producer)
    gm.graph.erase_node(fold.bn_node)
    return f"folded BatchNorm '{fold.bn_node.target}' into '{fold.producer.target}'"
