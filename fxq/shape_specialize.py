"""Trace a module whose forward computes on its input's shape, for the shapes it is called with.

TF-"same" padded convs (timm's Conv2dSame, efficientnet_pytorch's Conv2dDynamicSamePadding)
read ``x.shape`` and round with ``math.ceil``; symbolic tracing cannot follow Python
arithmetic on a Proxy, so they would stay float. Here tracing carries the example value of
every tensor alongside its Proxy and answers ``.shape``/``.size()``/``.dim()`` with concrete
numbers; everything else (``bool(tensor)``, data-dependent branches) stays symbolic and still
fails, so only shapes are specialized. The graph starts with a guard: called with another
shape, it raises instead of computing a wrong result. Tracing again at batch 1 and at one
more than the example's batch tells whether the graph depends on the batch size; if those
graphs are identical, the guard leaves dim 0 free.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxq.errors import TraceFailure

SHAPE_GUARD_PREFIX = "fxq shape guard"


def is_trace_guard(error: AssertionError) -> bool:
    """True for the run-time checks tracing left in the graph (bound arguments, specialized shapes)."""
    message = str(error)
    return message.startswith(SHAPE_GUARD_PREFIX) or "has been specialized to have value" in message


class _ShapeProxy(fx.Proxy):
    """A Proxy that knows the example value it stands for and reveals only its shape."""

    example: Any = None

    @property
    def shape(self):
        return self._concrete_shape()

    @property
    def ndim(self):
        return len(self._concrete_shape())

    def size(self, dim: Optional[int] = None):
        shape = self._concrete_shape()
        return shape if dim is None else shape[dim]

    def dim(self):
        return len(self._concrete_shape())

    def _concrete_shape(self) -> torch.Size:
        if not isinstance(self.example, torch.Tensor):
            raise TraceFailure(f"no example tensor for {self.node.name}: its shape is unknown")
        return self.example.shape


def _example_of(value: Any) -> Any:
    return fx.node.map_aggregate(value, lambda v: v.example if isinstance(v, _ShapeProxy) else v)


class _ShapeTracer(fx.Tracer):
    """Runs every traced op on the example values too (the way torch's MetaTracer does on
    meta tensors), with the tracer's module patches switched off while it does."""

    def __init__(self, examples: dict[str, Any]):
        super().__init__()
        self.examples = examples
        self._running_example = False
        self._module_forward = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._running_example:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        self._module_forward = forward
        return super().call_module(m, forward, args, kwargs)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, _ShapeProxy):
            self._running_example = True
            try:
                proxy.example = self._run_example(kind, target, args, kwargs, proxy.node)
            finally:
                self._running_example = False
        return proxy

    def _run_example(self, kind, target, args, kwargs, node: fx.Node) -> Any:
        if kind == "placeholder":
            return self.examples.get(node.name)
        if kind == "get_attr":
            return operator.attrgetter(target)(self.root)
        args, kwargs = _example_of(args), _example_of(kwargs)
        with torch.no_grad():
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                return self._module_forward(*args, **kwargs)
        return None


def _trace(module: nn.Module, example_args: tuple) -> fx.GraphModule:
    names = list(inspect.signature(module.forward).parameters)[: len(example_args)]
    tracer = _ShapeTracer(dict(zip(names, example_args)))
    concrete = {name: value for name, value in zip(names, example_args) if not isinstance(value, torch.Tensor)}
    graph = tracer.trace(module, concrete_args=concrete or None)
    return fx.GraphModule(module, graph, f"{type(module).__name__}ShapeSpecialized")


def _is_batch_free(module: nn.Module, gm: fx.GraphModule, example_args: tuple) -> bool:
    """Whether tracing at batch 1 and at one more than the example's batch gives this graph."""
    tensors = [a for a in example_args if isinstance(a, torch.Tensor) and a.dim() > 0]
    if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
        return False  # no common leading dim to call a batch
    batch = tensors[0].shape[0]
    for size in sorted({1, batch + 1} - {batch}):
        if _trace(module, tuple(_resize_batch(a, size) for a in example_args)).code != gm.code:
            return False
    return True


def _resize_batch(value: Any, size: int) -> Any:
    if not (isinstance(value, torch.Tensor) and value.dim() > 0):
        return value
    repeats = -(-size // value.shape[0])
    return value.repeat(repeats, *([1] * (value.dim() - 1)))[:size]


def _add_guard(gm: fx.GraphModule, example_args: tuple, batch_free: bool, where: str) -> None:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    for node, value in zip(placeholders, example_args):
        if not isinstance(value, torch.Tensor):
            continue
        expected = tuple(value.shape[1:] if batch_free else value.shape)
        described = f"(*, {', '.join(map(str, expected))})" if batch_free else str(expected)
        message = (f"{SHAPE_GUARD_PREFIX}: '{where}' computes on its input's shape, so fxq traced it for "
                   f"input '{node.name}' of shape {described}; call it with that shape or quantize again "
                   "with example_inputs of the new shape")
        with graph.inserting_after(anchor):
            size = graph.call_method("size", (node,))
        with graph.inserting_after(size):
            checked = graph.call_function(operator.getitem, (size, slice(1, None))) if batch_free else size
        with graph.inserting_after(checked):
            matches = graph.call_function(operator.eq, (checked, torch.Size(expected)))
        with graph.inserting_after(matches):
            anchor = graph.call_function(torch._assert, (matches, message))
    graph.lint()
    gm.recompile()


def specialize_to_shapes(module: nn.Module, example_args: tuple, where: str) -> fx.GraphModule:
    """``module`` traced for the shapes of ``example_args``, guarded, checked against eager.

    Raises ``TraceFailure`` when the module cannot be traced even with concrete shapes.

    Example::

        gm = specialize_to_shapes(Conv2dSame(3, 8, 3, stride=2), (torch.randn(1, 3, 32, 32),), "stem")
        gm(torch.randn(4, 3, 32, 32))   # fine: the batch size is free
        gm(torch.randn(1, 3, 64, 64))   # AssertionError: fxq shape guard: 'stem' ...
    """
    try:
        gm = _trace(module, example_args)
        batch_free = _is_batch_free(module, gm, example_args)
    except TraceFailure:
        raise
    except Exception as error:
        raise TraceFailure(f"{where}: cannot be traced even with concrete shapes: {type(error).__name__}: {error}") from error
    with torch.no_grad():
        expected, got = module(*example_args), gm(*example_args)
    if not _equal(expected, got):
        raise TraceFailure(f"{where}: the shape-specialized trace does not reproduce the module's output")
    _add_guard(gm, example_args, batch_free, where)
    return gm


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b
