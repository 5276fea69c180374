"""What every pass shares: its result type and the node bookkeeping in ``node.meta["fxq"]``.

A pass is a plain function ``GraphModule -> PassResult``. It decides first, then mutates;
when it changes nothing it returns ``modified=False`` and the graph untouched.
Shapes, where a pass needs them, are read from ``node.meta["tensor_meta"]`` which the
pipeline fills (torch.fx ShapeProp) before every pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx


@dataclass
class PassResult:
    """What a pass returns: the (possibly same) graph module and a human-readable log."""

    graph_module: fx.GraphModule
    modified: bool
    changes: list[str] = field(default_factory=list)


def fxq_meta(node: fx.Node) -> dict[str, Any]:
    """The fxq bookkeeping dict of ``node`` (created on first use)."""
    return node.meta.setdefault("fxq", {})


def keep_float(node: fx.Node, reason: str) -> None:
    """Mark ``node`` to run in float; the float-island pass and the report read the reason."""
    meta = fxq_meta(node)
    meta.setdefault("float_reason", reason)


def float_reason(node: fx.Node) -> Optional[str]:
    return node.meta.get("fxq", {}).get("float_reason")


def tensor_shape(node: Any) -> Optional[torch.Size]:
    """The shape ShapeProp recorded for ``node``'s output, or None when unknown / not a tensor."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return shape if isinstance(shape, torch.Size) else None


def produces_tensor(node: fx.Node) -> bool:
    return tensor_shape(node) is not None


def get_module(gm: fx.GraphModule, node: fx.Node) -> Optional[torch.nn.Module]:
    """The submodule a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def get_attr_value(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    """The tensor behind a ``get_attr`` node, else None."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    owner_path, _, name = node.target.rpartition(".")
    value = getattr(gm.get_submodule(owner_path), name, None)
    return value if isinstance(value, torch.Tensor) else None


def fused_root(module: Optional[torch.nn.Module], root_types: tuple) -> Optional[torch.nn.Module]:
    """The module of one of ``root_types`` that ``module`` computes with: itself, or the first
    element of a fused root + activation (torch's ConvReLU2d, fxq's fused conv + clamp)."""
    if type(module) in root_types:
        return module
    if isinstance(module, torch.nn.Sequential) and len(module) and type(module[0]) in root_types:
        return module[0]
    return None


def root_conv2d(module: Optional[torch.nn.Module]) -> Optional[torch.nn.Conv2d]:
    """The Conv2d a module computes with (see ``fused_root``)."""
    return fused_root(module, (torch.nn.Conv2d,))


def is_depthwise(conv: Optional[torch.nn.Module]) -> bool:
    """A grouped conv with one group per input channel."""
    return conv is not None and conv.groups > 1 and conv.groups == conv.in_channels


SHAPE_ATTRIBUTES = frozenset({"ndim", "shape"})
SHAPE_METHODS = frozenset({"size", "dim", "numel"})


def reads_only_shape(node: fx.Node) -> bool:
    """``x.ndim``, ``x.shape``, ``x.size()``, ``x.dim()``, ``x.numel()``: a use of ``x`` that a
    rewrite keeping ``x``'s shape (BN folding, quantization) cannot change."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in SHAPE_ATTRIBUTES
    return node.op == "call_method" and node.target in SHAPE_METHODS


def tensor_owners(gm: fx.GraphModule) -> set[str]:
    """Paths of the modules whose parameters or buffers the graph reads via ``get_attr``."""
    return {n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}


def module_call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many call_module nodes call each submodule (a rewrite of a shared module hits them all)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def add_submodule_unique(gm: fx.GraphModule, base_name: str, module: torch.nn.Module) -> str:
    """Register ``module`` on ``gm`` under a fresh name derived from ``base_name``; return it."""
    name = base_name.replace(".", "_")
    candidate, index = name, 0
    while hasattr(gm, candidate):
        index += 1
        candidate = f"{name}_{index}"
    gm.add_submodule(candidate, module)
    return candidate


def finish(gm: fx.GraphModule, changes: list[str]) -> PassResult:
    """Lint and recompile after a mutating pass; build its result.

    No generic dead-code elimination: torch.fx treats ``call_method`` nodes as pure, so it
    would delete a kept in-place mutation such as ``x.view(-1).add_(1)``. Passes erase the
    nodes they replace themselves.
    """
    if changes:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return PassResult(gm, bool(changes), changes)
