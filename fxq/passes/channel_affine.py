"""A per-channel ``y = x * scale[c] + shift[c]`` as one module the int8 backend can run.

Several passes need a channel-wise affine (a lowered BatchNorm, a PReLU slope). Written
as ``x * scale + shift`` it would quantize as two elementwise ops with per-tensor
constants; written as a depthwise 1x1 convolution (or a diagonal Linear for ``(N, C)``
inputs) it becomes ONE quantized op whose per-channel weight quantization represents
each channel's factor exactly (each weight row has a single non-zero entry).

Also here: the channel affine an eval-mode BatchNorm computes, shared by the passes that
fold BatchNorm into a producer and that lower the remaining ones.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch import nn

# Input ranks build_channel_affine handles: (N, C) and (N, C, *spatial) with 1-3 spatial dims.
CHANNEL_AFFINE_RANKS = (2, 3, 4, 5)

_DEPTHWISE_CONV_BY_RANK = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


def build_channel_affine(
    scale: torch.Tensor, shift: Optional[torch.Tensor], rank: int
) -> nn.Module:
    """A module computing ``x * scale[c] + shift[c]`` along dim 1 of a rank-``rank`` input.

    Rank 2 gives an ``nn.Linear(C, C)`` with ``diag(scale)``; ranks 3-5 a depthwise 1x1
    ``nn.Conv1d/2d/3d``. In float the result is ``x * scale + shift`` computed as one
    product and one sum per element (the conv may fuse them into one rounding, so the
    two differ by at most an ulp of the product), except that the diagonal Linear turns
    an inf in one channel into NaN in the others (``0 * inf``). Raises ValueError for
    other ranks or a ``scale`` that is not 1-D; callers check ``CHANNEL_AFFINE_RANKS``.
    """
    if scale.dim() != 1:
        raise ValueError(f"channel affine needs a 1-D scale, got shape {tuple(scale.shape)}")
    if rank not in CHANNEL_AFFINE_RANKS:
        raise ValueError(f"channel affine supports input ranks 2..5, got rank {rank}")
    channels = scale.numel()
    factory = {"device": scale.device, "dtype": scale.dtype}
    with_bias = shift is not None
    if rank == 2:
        module: nn.Module = nn.Linear(channels, channels, bias=with_bias, **factory)
        weight = torch.diag(scale.detach())
    else:
        conv_class = _DEPTHWISE_CONV_BY_RANK[rank]
        module = conv_class(channels, channels, 1, groups=channels, bias=with_bias, **factory)
        weight = scale.detach().reshape(channels, *([1] * (rank - 1)))
    module.weight = nn.Parameter(weight.clone())
    if shift is not None:
        module.bias = nn.Parameter(shift.detach().to(scale.dtype).clone())
    return module.eval()


# Exact types: a subclass (QAT, parametrized, user-defined) may compute something else.
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_called_by(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    """The BatchNorm module ``node`` calls on a single input, else None."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    module = gm.get_submodule(node.target)
    return module if type(module) in BATCHNORM_TYPES else None


def has_hooks(module: nn.Module) -> bool:
    """Whether replacing ``module`` would silently drop the user's forward hooks."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def batchnorm_float_reason(bn: nn.Module) -> Optional[str]:
    """Why ``bn`` cannot be turned into a fixed channel affine, or None when it can."""
    if has_hooks(bn):
        return "the BatchNorm has forward hooks, which a rewrite would drop; remove them"
    if bn.training:
        return "BatchNorm is in training mode; call model.eval() before quantizing"
    if bn.running_mean is None or bn.running_var is None:
        return (
            "BatchNorm has no running statistics (track_running_stats=False), so it "
            "normalizes with batch statistics; train it with track_running_stats=True"
        )
    return None


def batchnorm_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` in float64 with ``bn(x) == x * scale + shift`` per channel (eval).

    float64 so that constants folded from them carry a single rounding, at the final cast.
    """
    mean = bn.running_mean.detach().double()
    inv_std = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    gamma = torch.ones_like(mean) if bn.weight is None else bn.weight.detach().double()
    beta = torch.zeros_like(mean) if bn.bias is None else bn.bias.detach().double()
    scale = gamma * inv_std
    return scale, beta - mean * scale
