"""Turn functional convs/linears on stored weights into real ``nn`` modules; fold zero pads.

Ported TF code (EfficientNet/MobileNet "same" padding) subclasses ``nn.Conv2d`` and calls
``F.pad`` + ``F.conv2d(x, self.weight, ...)`` in ``forward``. torch.fx traces through it, so
the graph holds a functional conv on ``get_attr`` weights. As an ``nn.Conv2d`` call it gets
prepacked int8 weights once and fuses with the following BN/activation like any conv.

* ``F.conv{1,2,3}d`` / ``F.conv_transpose{1,2,3}d`` / ``F.linear`` whose weight (and bias)
  are ``get_attr`` nodes and whose hyperparameters are Python constants become a
  ``call_module`` to a new module holding the *same* Parameter objects (buffers are wrapped
  in a non-trainable Parameter sharing their storage). Weights computed at runtime
  (``self.weight * mask``) are left alone.
* A constant-zero pad (``F.pad`` or ``nn.ZeroPad*d`` / ``nn.ConstantPad*d(0)``) whose only
  user is a plain (non-transposed, ``padding_mode="zeros"``) conv and whose pads are
  symmetric per spatial dim is folded into the conv's padding — exact. Asymmetric pads stay.
  Existing conv modules are never mutated: a folded copy sharing the weights replaces them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq.passes.base import (
    PassResult, add_submodule_unique, finish, fxq_meta, get_attr_value, get_module,
)

PASS_NAME = "modularize_functional_convs"

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TRANSPOSE_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_LINEAR_ARGS = ("input", "weight", "bias")
_PAD_ARGS = ("input", "pad", "mode", "value")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0,
             "mode": "constant", "value": None}

# functional -> (kind, spatial dims); torch.conv2d *is* F.conv2d, listed for clarity.
_FUNCTIONAL_LAYERS = {
    F.conv1d: ("conv", 1), F.conv2d: ("conv", 2), F.conv3d: ("conv", 3),
    torch.conv1d: ("conv", 1), torch.conv2d: ("conv", 2), torch.conv3d: ("conv", 3),
    F.conv_transpose1d: ("conv_transpose", 1), F.conv_transpose2d: ("conv_transpose", 2),
    F.conv_transpose3d: ("conv_transpose", 3),
    torch.conv_transpose1d: ("conv_transpose", 1), torch.conv_transpose2d: ("conv_transpose", 2),
    torch.conv_transpose3d: ("conv_transpose", 3),
    F.linear: ("linear", 0),
}
_MODULE_CLASSES = {
    ("conv", 1): nn.Conv1d, ("conv", 2): nn.Conv2d, ("conv", 3): nn.Conv3d,
    ("conv_transpose", 1): nn.ConvTranspose1d, ("conv_transpose", 2): nn.ConvTranspose2d,
    ("conv_transpose", 3): nn.ConvTranspose3d,
}
_CONV_MODULE_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_ZERO_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                     nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)

Padding = Union[tuple[int, ...], str]


@dataclass(frozen=True)
class LayerSpec:
    """Everything but the weights that defines the module replacing a node."""

    kind: str  # "conv" | "conv_transpose" | "linear"
    dims: int  # spatial dims; 0 for linear
    stride: tuple[int, ...] = ()
    padding: Padding = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    output_padding: tuple[int, ...] = ()


@dataclass(frozen=True)
class Rewrite:
    """One decided replacement: ``node`` becomes a call of a module built from ``spec``."""

    node: fx.Node
    spec: LayerSpec
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    input: fx.Node
    stem: str  # name the new module is registered under (made unique)
    owner: str  # module path the weights came from; freed for reuse when nothing else needs it
    training: bool  # train/eval mode of the new module (conv-bn fusion needs them to agree)
    pads: tuple[fx.Node, ...] = ()  # folded pad nodes, nearest to the conv first


def modularize_functional_convs(gm: fx.GraphModule) -> PassResult:
    rewrites = [_fold_pads(gm, r) for r in _find_candidates(gm)]
    # Existing conv modules are only replaced when a pad actually folds into them.
    decided = [(r, _build_module(r)) for r in rewrites if r.node.op == "call_function" or r.pads]
    replaced: dict[fx.Node, fx.Node] = {}  # a decided input may be a node replaced just before
    changes = [_apply(gm, rewrite, module, replaced) for rewrite, module in decided if module is not None]
    return finish(gm, changes)


# --- deciding -------------------------------------------------------------------------

def _find_candidates(gm: fx.GraphModule) -> list[Rewrite]:
    candidates = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
            found = _match_functional(gm, node)
        elif node.op == "call_module":
            found = _match_conv_module(gm, node)
        else:
            found = None
        if found is not None:
            candidates.append(found)
    return candidates


def _match_functional(gm: fx.GraphModule, node: fx.Node) -> Optional[Rewrite]:
    kind, dims = _FUNCTIONAL_LAYERS[node.target]
    names = {"conv": _CONV_ARGS, "conv_transpose": _TRANSPOSE_ARGS, "linear": _LINEAR_ARGS}[kind]
    bound = _bind(node, names)
    if bound is None or not isinstance(bound["input"], fx.Node):
        return None
    weight = get_attr_value(gm, bound["weight"])
    bias = get_attr_value(gm, bound["bias"])
    if weight is None or (bound["bias"] is not None and bias is None):
        return None
    spec = _layer_spec(kind, dims, bound, weight)
    if spec is None or not _weights_fit(spec, weight, bias):
        return None
    weight_target = bound["weight"].target
    stem, owner = _name_stem(weight_target, node), weight_target.rpartition(".")[0]
    return Rewrite(node, spec, weight, bias, bound["input"], stem, owner, gm.training)


def _match_conv_module(gm: fx.GraphModule, node: fx.Node) -> Optional[Rewrite]:
    conv = get_module(gm, node)
    dims = _CONV_MODULE_DIMS.get(type(conv))
    if dims is None or _has_hooks(conv) or len(node.args) != 1 or node.kwargs:
        return None
    if conv.padding_mode != "zeros" or not isinstance(node.args[0], fx.Node):
        return None
    kernel = tuple(conv.weight.shape[2:])
    padding = _padding(conv.padding, dims, kernel, conv.dilation, conv.stride)
    if padding is None:
        return None
    spec = LayerSpec("conv", dims, tuple(conv.stride), padding, tuple(conv.dilation), conv.groups)
    return Rewrite(node, spec, conv.weight, conv.bias, node.args[0], node.target, node.target, conv.training)


def _bind(node: fx.Node, names: tuple[str, ...]) -> Optional[dict[str, Any]]:
    """Positional + keyword arguments of ``node`` by parameter name, defaults filled in."""
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    bound = {name: _DEFAULTS.get(name) for name in names}
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _layer_spec(kind: str, dims: int, bound: dict[str, Any], weight: torch.Tensor) -> Optional[LayerSpec]:
    if kind == "linear":
        return LayerSpec("linear", 0)
    if weight.dim() != dims + 2:
        return None
    stride, dilation = _int_tuple(bound["stride"], dims), _int_tuple(bound["dilation"], dims)
    groups = bound["groups"]
    if stride is None or dilation is None or not _is_int(groups) or groups < 1:
        return None
    if min(stride + dilation) < 1:
        return None
    kernel = tuple(weight.shape[2:])
    if kind == "conv":
        padding = _padding(bound["padding"], dims, kernel, dilation, stride)
        return None if padding is None else LayerSpec(kind, dims, stride, padding, dilation, groups)
    padding, output_padding = _int_tuple(bound["padding"], dims), _int_tuple(bound["output_padding"], dims)
    if padding is None or output_padding is None or min(padding + output_padding) < 0:
        return None
    return LayerSpec(kind, dims, stride, padding, dilation, groups, output_padding)


def _padding(padding: Any, dims: int, kernel: tuple[int, ...], dilation: tuple[int, ...],
             stride: tuple[int, ...]) -> Optional[Padding]:
    """Conv padding as ints where exact; ``"same"`` stays a string only when it is asymmetric."""
    if padding == "valid":
        return (0,) * dims
    if padding == "same":
        if any(s != 1 for s in stride):
            return None  # F.conv*d rejects this itself; leave the node to fail as written
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return "same" if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    as_ints = _int_tuple(padding, dims)
    return None if as_ints is None or min(as_ints) < 0 else as_ints


def _weights_fit(spec: LayerSpec, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    if not weight.is_floating_point() or (bias is not None and bias.dim() != 1):
        return False
    if spec.kind == "linear":
        return weight.dim() == 2 and (bias is None or bias.shape[0] == weight.shape[0])
    # conv weight is (out, in/groups, *k), transposed conv weight (in, out/groups, *k)
    out_channels = weight.shape[0] if spec.kind == "conv" else weight.shape[1] * spec.groups
    if weight.shape[0] % spec.groups:
        return False
    return bias is None or bias.shape[0] == out_channels


def _fold_pads(gm: fx.GraphModule, rewrite: Rewrite) -> Rewrite:
    """Absorb the chain of symmetric zero pads feeding ``rewrite``'s input into its padding."""
    spec, user, source, pads = rewrite.spec, rewrite.node, rewrite.input, []
    while spec.kind == "conv" and isinstance(spec.padding, tuple) and set(source.users) == {user}:
        found = _symmetric_zero_pad(gm, source, spec.dims)
        if found is None:
            break
        pad_input, extra = found
        spec = replace(spec, padding=tuple(p + e for p, e in zip(spec.padding, extra)))
        pads.append(source)
        user, source = source, pad_input
    return replace(rewrite, spec=spec, input=source, pads=tuple(pads))


def _symmetric_zero_pad(gm: fx.GraphModule, node: fx.Node,
                        dims: int) -> Optional[tuple[fx.Node, tuple[int, ...]]]:
    """The input of a symmetric constant-zero pad and its amounts, first spatial dim first."""
    found = _zero_pad(gm, node)
    if found is None:
        return None
    pad_input, amounts = found
    if len(amounts) % 2 or len(amounts) > 2 * dims or any(not _is_int(a) or a < 0 for a in amounts):
        return None
    lefts, rights = amounts[0::2], amounts[1::2]  # F.pad order: last dim first
    if lefts != rights:
        return None
    return pad_input, (0,) * (dims - len(lefts)) + tuple(reversed(lefts))


def _zero_pad(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[fx.Node, tuple[Any, ...]]]:
    """(input, raw pad amounts) of a constant-zero pad node; amounts may still hold Nodes."""
    if node.op == "call_function" and node.target is F.pad:
        bound = _bind(node, _PAD_ARGS)
        if bound is None or bound["mode"] != "constant" or not _is_zero(bound["value"]):
            return None
        amounts, pad_input = bound["pad"], bound["input"]
    elif node.op == "call_module" and type(get_module(gm, node)) in _ZERO_PAD_MODULES:
        pad = get_module(gm, node)
        if _has_hooks(pad) or node.kwargs or len(node.args) != 1 or not _is_zero(pad.value):
            return None
        amounts, pad_input = pad.padding, node.args[0]
    else:
        return None
    if not isinstance(pad_input, fx.Node) or not isinstance(amounts, (tuple, list)):
        return None
    return pad_input, tuple(amounts)


# --- building and mutating ------------------------------------------------------------

def _build_module(rewrite: Rewrite) -> Optional[nn.Module]:
    """The replacement module, holding ``rewrite``'s own weight objects; None if nn refuses it."""
    spec, weight, bias = rewrite.spec, rewrite.weight, rewrite.bias
    common = {"bias": bias is not None, "device": "meta", "dtype": weight.dtype}
    try:
        if spec.kind == "linear":
            module = nn.Linear(weight.shape[1], weight.shape[0], **common)
        elif spec.kind == "conv":
            module = _MODULE_CLASSES[("conv", spec.dims)](
                weight.shape[1] * spec.groups, weight.shape[0], tuple(weight.shape[2:]), spec.stride,
                spec.padding, spec.dilation, spec.groups, **common)
        else:
            module = _MODULE_CLASSES[("conv_transpose", spec.dims)](
                weight.shape[0], weight.shape[1] * spec.groups, tuple(weight.shape[2:]), spec.stride,
                spec.padding, spec.output_padding, spec.groups, dilation=spec.dilation, **common)
    except (ValueError, RuntimeError):
        return None
    module.train(rewrite.training)
    module.weight = _as_parameter(weight)
    if bias is not None:
        module.bias = _as_parameter(bias)
    return module


def _apply(gm: fx.GraphModule, rewrite: Rewrite, module: nn.Module, replaced: dict[fx.Node, fx.Node]) -> str:
    graph, old = gm.graph, rewrite.node
    source = replaced.get(rewrite.input, rewrite.input)
    with graph.inserting_before(old):  # target is set once the old nodes are gone, see below
        new = graph.create_node("call_module", rewrite.stem, (source,))
    replaced[old] = new
    new.meta = {**old.meta, "fxq": dict(old.meta.get("fxq", {}))}  # tensor_meta stays valid
    fxq_meta(new)["changed_by"] = PASS_NAME
    weight_nodes = [a for a in old.all_input_nodes if a.op == "get_attr"]
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    for node in (*rewrite.pads, *dict.fromkeys(weight_nodes)):
        if not node.users:  # a weight get_attr may still feed another call
            graph.erase_node(node)
    # Freeing a now-unused top-level owner first lets "conv_stem" keep its name, not "conv_stem_1".
    _release_root_owner(gm, rewrite.owner, new)
    new.target = add_submodule_unique(gm, rewrite.stem, module)
    description = f"{old.name}: {_describe(old)} -> {type(module).__name__} module '{new.target}'"
    folded = f", folded zero pad(s) {[p.name for p in rewrite.pads]}" if rewrite.pads else ""
    return description + folded


def _release_root_owner(gm: fx.GraphModule, owner: str, new: fx.Node) -> None:
    """Delete top-level submodule ``owner`` when no node refers to it or below it any more.

    Only top-level: deleting there detaches it from ``gm`` alone, never from a user module.
    """
    if not owner or "." in owner or not isinstance(getattr(gm, owner, None), nn.Module):
        return
    for node in gm.graph.nodes:
        refers = node.op in ("get_attr", "call_module") and node is not new
        if refers and (node.target == owner or node.target.startswith(owner + ".")):
            return
    gm.delete_submodule(owner)


def _as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    """``tensor`` itself if already a Parameter, else a frozen Parameter sharing its storage."""
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _name_stem(weight_target: str, node: fx.Node) -> str:
    """The owner's path for ``<owner>.weight``, else e.g. ``w1_conv1d`` (or ``conv2d`` at root)."""
    owner, _, attr = weight_target.rpartition(".")
    if attr == "weight" and owner:
        return owner
    op_name = node.target.__name__
    return op_name if weight_target == "weight" else f"{weight_target}_{op_name}"


def _describe(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else f"{node.target.__name__}(functional)"


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _int_tuple(value: Any, dims: int) -> Optional[tuple[int, ...]]:
    if _is_int(value):
        return (value,) * dims
    if isinstance(value, (tuple, list)) and len(value) == dims and all(_is_int(v) for v in value):
        return tuple(value)
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_zero(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)
