"""Capture a model as torch.fx graphs, degrading gracefully instead of giving up.

1. Non-tensor arguments (``forward(self, x, embed=False)``) are bound as concrete values, so
   Python control flow on them resolves at trace time; the quantized model checks callers
   pass the same values.
2. When tracing fails inside a submodule, the innermost failing module is traced again with
   concrete shapes (``fxq.shape_specialize``: TF-"same" padded convs compute on x.shape) and
   inlined, guarded to its example shape. If that fails too, it becomes a leaf: it stays
   float, with dequantize/quantize around it, and its error is reported. Repeat.
3. When the root's own forward cannot be traced, each child is captured on its own
   (recursively) and the root stays eager around the quantized children.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxq.errors import TraceFailure
from fxq.passes.base import keep_float
from fxq.shape_specialize import specialize_to_shapes

MAX_LEAF_ATTEMPTS = 64


@dataclass
class Unit:
    """One traced graph module standing at ``path`` inside the model ("" is the root)."""

    path: str
    graph_module: fx.GraphModule
    example_inputs: tuple
    concrete_args: dict[str, Any]
    leaves: dict[str, str] = field(default_factory=dict)


@dataclass
class CapturePlan:
    units: list[Unit]
    #: module path -> why it stays float (trace errors of leaves and of eager parents)
    float_parts: dict[str, str]
    #: module path -> the trace error that made fxq trace it for its example shapes
    specialized: dict[str, str] = field(default_factory=dict)


class _LeafTracer(fx.Tracer):
    """A tracer that treats ``leaf_names`` as leaves and remembers where tracing failed."""

    def __init__(self, leaf_names: set[str]):
        super().__init__()
        self.leaf_names = leaf_names
        self.failing_module: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaf_names or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failing_module is None:  # the innermost module sees the error first
                self.failing_module = self.path_of_module(m)
            raise


def describe_error(error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}"[:300]


def concrete_arguments(module: nn.Module, args: tuple, kwargs: Optional[dict] = None) -> dict[str, Any]:
    """Arguments to bind at trace time: every non-tensor argument, given or defaulted."""
    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(*args, **(kwargs or {}))
    concrete = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name in bound.arguments:
            value = bound.arguments[name]
        elif parameter.default is not parameter.empty:
            value = parameter.default
        else:
            continue
        if not isinstance(value, torch.Tensor):
            concrete[name] = value
    return concrete


@dataclass
class _Capture:
    graph_module: Optional[fx.GraphModule]
    leaves: dict[str, str]
    specialized: dict[str, str]
    root_error: Optional[str]


def trace_with_leaves(module: nn.Module, concrete: dict[str, Any], example_inputs: tuple) -> _Capture:
    """Trace ``module``; failing submodules are shape-specialized in place, or become leaves."""
    leaves: dict[str, str] = {}
    specialized: dict[str, str] = {}
    for _ in range(MAX_LEAF_ATTEMPTS):
        tracer = _LeafTracer(set(leaves))
        try:
            graph = tracer.trace(module, concrete_args=concrete or None)
        except Exception as error:
            failing = tracer.failing_module
            if not failing or failing in leaves:
                return _Capture(None, leaves, specialized, describe_error(error))
            if failing in specialized or not _specialize_in_place(module, failing, example_inputs):
                leaves[failing] = describe_error(error)
            else:
                specialized[failing] = describe_error(error)
            continue
        _retarget_none_guards(graph)
        gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
        _mark_leaves(gm, leaves)
        return _Capture(gm, leaves, specialized, None)
    return _Capture(None, leaves, specialized, f"more than {MAX_LEAF_ATTEMPTS} submodules failed to trace")


@fx.node.has_side_effect  # no users, but dead-code elimination must keep it
def assert_is_none(value: Any, message: str) -> None:
    """torch.fx's guard for an argument bound to None, under a name fx can trace again."""
    assert value is None, message


torch.fx.wrap("assert_is_none")


def _retarget_none_guards(graph: fx.Graph) -> None:
    """fx guards an argument bound to None with its private ``_assert_is_none``, which
    ``prepare_fx`` cannot trace again out of a GraphModule (KeyError
    'torch.fx._symbolic_trace._assert_is_none': timm's ViTs have such arguments). The same
    check, as fxq's own wrapped function, traces again."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _FX_NONE_GUARD:
            node.target = assert_is_none
            node.meta["is_wrapped"] = True  # generated code re-registers it with torch.fx.wrap


_FX_NONE_GUARD = getattr(fx._symbolic_trace, "_assert_is_none", None)


def _specialize_in_place(model: nn.Module, path: str, example_inputs: tuple) -> bool:
    """Replace submodule ``path`` by its shape-specialized graph; False when that is not possible."""
    submodule = model.get_submodule(path)
    calls = _record_calls(model, {path: submodule}, example_inputs).get(path)
    args = _consistent_args(calls, match_shapes=True) if calls else None
    if args is None or calls[0][1] or not any(isinstance(a, torch.Tensor) for a in args):
        return False
    try:
        specialized = specialize_to_shapes(submodule, args, path)
    except TraceFailure:
        return False
    model.set_submodule(path, specialized)
    return True


def _mark_leaves(gm: fx.GraphModule, leaves: dict[str, str]) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in leaves:
            keep_float(node, f"could not be traced ({leaves[node.target]})")


def plan_units(model: nn.Module, example_inputs: tuple, path: str = "") -> CapturePlan:
    """Capture ``model`` as one unit, or as its traceable descendants when the root is not."""
    concrete = concrete_arguments(model, example_inputs)
    tensors = tuple(a for a in example_inputs if isinstance(a, torch.Tensor))
    capture = trace_with_leaves(model, concrete, example_inputs)
    float_parts = {_join(path, leaf): error for leaf, error in capture.leaves.items()}
    specialized = {_join(path, name): error for name, error in capture.specialized.items()}
    if capture.graph_module is not None:
        unit = Unit(path, capture.graph_module, tensors, concrete, capture.leaves)
        return CapturePlan([unit], float_parts, specialized)
    float_parts = {path or "<model>": f"forward kept eager: {capture.root_error}"}
    units: list[Unit] = []
    children = dict(model.named_children())
    for name, recorded in _record_calls(model, children, example_inputs).items():
        child_args = _consistent_args(recorded)
        if child_args is None:
            float_parts[_join(path, name)] = "called with changing non-tensor arguments or tensor keywords"
            continue
        sub = plan_units(children[name], child_args, _join(path, name))
        units.extend(sub.units)
        float_parts.update(sub.float_parts)
        specialized.update(sub.specialized)
    return CapturePlan(units, float_parts, specialized)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _record_calls(model: nn.Module, watched: dict[str, nn.Module], example_inputs: tuple) -> dict[str, list]:
    """The (args, kwargs) each watched submodule is called with when ``model`` runs once."""
    calls: dict[str, list] = {}
    handles = []
    for name, submodule in watched.items():
        def hook(_module, args, kwargs, name=name):
            calls.setdefault(name, []).append((args, kwargs))
        handles.append(submodule.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _consistent_args(recorded: list, match_shapes: bool = False) -> Optional[tuple]:
    """The positional args of the first call when every call agrees on the non-tensor ones
    (and, with ``match_shapes``, on tensor shapes); None otherwise."""
    first_args, first_kwargs = recorded[0]
    if any(isinstance(v, torch.Tensor) for v in first_kwargs.values()):
        return None

    def skeleton(args, kwargs):
        tensor = (lambda a: a.shape) if match_shapes else (lambda a: None)
        return ([tensor(a) if isinstance(a, torch.Tensor) else a for a in args], kwargs)

    try:
        if any(skeleton(a, k) != skeleton(first_args, first_kwargs) for a, k in recorded[1:]):
            return None
    except Exception:  # values whose == is not a bool (e.g. tensors inside containers)
        return None
    return tuple(first_args)
