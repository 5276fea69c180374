"""Trace a module whose forward computes on its input's shape, for the shapes it is called with.

TF-"same" padded convs (timm's Conv2dSame, efficientnet_pytorch's Conv2dDynamicSamePadding)
read ``x.shape`` and round with ``math.ceil``; symbolic tracing cannot follow Python
arithmetic on a Proxy, so they would stay float. Here tracing carries the example value of
every tensor alongside its Proxy and answers ``.shape``/``.size()``/``.dim()`` with concrete
numbers; everything else (``bool(tensor)``, data-dependent branches) stays symbolic and still
fails, so only shapes are specialized. The graph starts with a guard: called with another
shape, it raises instead of computing a wrong result. Tracing again at two other batch sizes
tells whether the graph depends on the batch size; if those graphs are identical, the guard
leaves dim 0 free. If they differ only in integer constants that are a linear function of the
batch size (timm MobileViT reshapes to ``(B * C * h, ...)``), those constants are rewritten to
read the batch size from the input, checked against the module at the three sizes, and dim 0
is left free too: a model quantized with a batch-1 example runs calibration batches of 32.
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


def _batch_free_version(module: nn.Module, gm: fx.GraphModule, example_args: tuple) -> Optional[fx.GraphModule]:
    """``gm`` if it works for any batch size (traced at two other sizes, it is the same graph);
    a rewritten trace if the graphs differ only in integer constants linear in the batch size
    (they then compute from the input's dim 0; checked against ``module`` at all three sizes);
    otherwise None."""
    tensors = [a for a in example_args if isinstance(a, torch.Tensor) and a.dim() > 0]
    if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
        return None  # no common leading dim to call a batch
    batch = tensors[0].shape[0]
    sizes = [size for size in (1, 2, 3) if size != batch][:2]
    others = [_trace(module, tuple(_resize_batch(a, size) for a in example_args)) for size in sizes]
    if all(other.code == gm.code for other in others):
        return gm
    scaled = _batch_linear_constants(gm, others, [batch, *sizes])
    if not scaled:
        return None
    rewritten = _trace(module, example_args)
    _read_batch_from_input(rewritten, [(_node_named(rewritten, node.name), *rest) for node, *rest in scaled])
    for size in (batch, *sizes):
        args = tuple(_resize_batch(a, size) for a in example_args)
        try:
            with torch.no_grad():
                same = _equal(module(*args), rewritten(*args))
        except Exception:  # noqa: BLE001 - any failure means: keep the batch size pinned
            same = False
        if not same:
            return None
    return rewritten


def _node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(node for node in gm.graph.nodes if node.name == name)


#: One integer argument of a node that scales with the batch: (node, leaf index, per-batch
#: factor, offset): the constant is ``factor * batch + offset``.
_ScaledConstant = tuple[fx.Node, int, int, int]


def _leaves(node: fx.Node) -> list:
    found: list = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda value: found.append(value) or value)
    return found


def _batch_linear_constants(gm: fx.GraphModule, others: list[fx.GraphModule],
                            batches: list[int]) -> list[_ScaledConstant]:
    """The integer arguments where the three traces differ, each a linear function of the batch
    size; empty when the graphs differ in anything else."""
    graphs = [list(gm.graph.nodes), *(list(other.graph.nodes) for other in others)]
    if len({len(nodes) for nodes in graphs}) != 1:
        return []
    scaled = []
    for nodes in zip(*graphs):
        if len({(n.op, n.name, str(n.target)) for n in nodes}) != 1:
            return []
        leaves = [_leaves(n) for n in nodes]
        if len({len(values) for values in leaves}) != 1:
            return []
        for index, values in enumerate(zip(*leaves)):
            if all(isinstance(v, fx.Node) for v in values):
                if len({v.name for v in values}) != 1:
                    return []
                continue
            if _same_literal(values):
                continue
            if not all(type(v) is int for v in values):
                return []
            (b0, b1, b2), (c0, c1, c2) = batches, values
            factor, remainder = divmod(c2 - c1, b2 - b1)
            offset = c1 - factor * b1
            if remainder or factor == 0 or c0 != factor * b0 + offset:
                return []
            scaled.append((nodes[0], index, factor, offset))
    return scaled


def _same_literal(values: tuple) -> bool:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return all(isinstance(v, torch.Tensor) and v.shape == first.shape and torch.equal(v, first) for v in values)
    return all(type(v) is type(first) and v == first for v in values)


def _read_batch_from_input(gm: fx.GraphModule, scaled: list[_ScaledConstant]) -> None:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        batch = graph.call_method("size", (placeholders[0], 0))
    by_node: dict[fx.Node, dict[int, tuple[int, int]]] = {}
    for node, index, factor, offset in scaled:
        by_node.setdefault(node, {})[index] = (factor, offset)
    for node, replacements in by_node.items():
        with graph.inserting_before(node):
            values = {index: _linear(graph, batch, factor, offset) for index, (factor, offset) in replacements.items()}
        position = iter(range(len(_leaves(node))))

        def substitute(value, values=values, position=position):
            return values.get(next(position), value)

        node.args, node.kwargs = fx.node.map_aggregate((node.args, node.kwargs), substitute)
    graph.lint()
    gm.recompile()


def _linear(graph: fx.Graph, batch: fx.Node, factor: int, offset: int) -> fx.Node:
    value = batch if factor == 1 else graph.call_function(operator.mul, (batch, factor))
    return value if offset == 0 else graph.call_function(operator.add, (value, offset))


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
        free = _batch_free_version(module, gm, example_args)
    except TraceFailure:
        raise
    except Exception as error:
        raise TraceFailure(f"{where}: cannot be traced even with concrete shapes: {type(error).__name__}: {error}") from error
    gm, batch_free = (gm, False) if free is None else (free, True)
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
