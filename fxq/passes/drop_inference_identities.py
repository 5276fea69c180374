"""Pattern: ``stochastic_depth(x, p, mode, training=False)``, ``F.dropout(x, p, training=False)``,
an ``nn.Identity`` call, an ``nn.Dropout*`` module call in eval mode.

Rewrite: ``x``. Traced in eval mode, torchvision's EfficientNet, ConvNeXt and Swin blocks call
``torchvision.ops.stochastic_depth`` with the constant ``training=False``: the identity. No
backend has a kernel for it, so left in it put a float island (a dequantize/quantize pair) in
every residual block (measured: efficientnet_b0 11, efficientnet_b7 50 Q/DQ pairs, and int8
no faster than fp32). Exact. A call that may train (``training`` True or not a constant) stays.

Identity and eval-mode Dropout modules cost nothing in float, but standing between a conv and
its activation they hide the conv + ReLU pattern from fusion: timm's BatchNormAct2d calls
``self.drop`` (an ``nn.Identity``) between the BatchNorm that folds into the conv and the ReLU.
Unfused, the conv's int8 output spans negative values the ReLU then zeroes, so the activation
keeps half of its 256 levels (measured on timm ese_vovnet19b_dw: every ReLU'd conv output at
zero point 128, output SQNR 4.4 dB against 6.9 dB for plain FX).
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq.passes.base import PassResult, finish

NAME = "drop_inference_identities"


def _identity_targets() -> dict:
    """function -> position of its ``training`` argument (its default is True for all of them)."""
    targets = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2, F.alpha_dropout: 2,
               F.feature_alpha_dropout: 2}
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # torchvision is optional for fxq's users
        return targets
    return {**targets, stochastic_depth: 3}


IDENTITY_WHEN_NOT_TRAINING = _identity_targets()


#: Modules whose call returns its input: always, or outside training.
IDENTITY_MODULES = (nn.Identity,)
IDENTITY_WHEN_NOT_TRAINING_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                                      nn.FeatureAlphaDropout)


def _is_identity_module_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return False
    module = gm.get_submodule(node.target)
    # exact types: a subclass may override forward
    return type(module) in IDENTITY_MODULES or (type(module) in IDENTITY_WHEN_NOT_TRAINING_MODULES
                                                and not module.training)


def _is_inference_identity(node: fx.Node) -> bool:
    position = IDENTITY_WHEN_NOT_TRAINING.get(node.target) if node.op == "call_function" else None
    if position is None:
        return False
    training = node.kwargs.get("training", node.args[position] if len(node.args) > position else True)
    return training is False and bool(node.args) and isinstance(node.args[0], fx.Node)


def drop_inference_identities(gm: fx.GraphModule) -> PassResult:
    """Replace stochastic depth and dropout calls traced with ``training=False``, Identity
    modules and eval-mode Dropout modules by their input.

    Example::

        gm = torch.fx.symbolic_trace(block.eval())  # x + stochastic_depth(f(x), 0.2, "row", False)
        drop_inference_identities(gm)                 # x + f(x)
    """
    changes = []
    for node in list(gm.graph.nodes):
        if _is_inference_identity(node):
            changes.append(f"{node.name}: {getattr(node.target, '__name__', node.target)}(training=False) -> its input")
        elif _is_identity_module_call(gm, node):
            changes.append(f"{node.name}: {type(gm.get_submodule(node.target)).__name__} module {node.target} -> its input")
        else:
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    return finish(gm, changes)
