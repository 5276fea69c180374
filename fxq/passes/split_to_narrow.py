"""Pattern: ``x.chunk(k, dim)`` / ``x.split(size, dim)`` / ``torch.chunk`` / ``torch.split``
(ints or a list of sizes) whose pieces are only taken by constant ``[i]``, on a dim whose
size is known.

Rewrite: each piece ``parts[i]`` becomes ``torch.narrow(x, dim, start_i, length_i)``.
Why: backend tables (torch's included) have no entry for chunk/split, whose output is a
tuple, so plain FX puts a dequantize before every channel split of ShuffleNet-style blocks
and the float island grows over the shuffle that follows. ``narrow`` is a listed int8
view op that shares its input's qparams. Exact: the same view of the same storage.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from fxq.passes.base import PassResult, finish, fxq_meta, tensor_shape

NAME = "split_to_narrow"
SPLIT_TARGETS = {"chunk", "split", torch.chunk, torch.split}


def split_to_narrow(gm: fx.GraphModule) -> PassResult:
    """Replace tuple-returning chunk/split calls by one ``torch.narrow`` per piece used.

    Example::

        gm = torch.fx.symbolic_trace(lambda x: x.chunk(2, dim=1)[0])
        split_to_narrow(gm)  # after ShapeProp: torch.narrow(x, 1, 0, C // 2)
    """
    changes = []
    for node in list(gm.graph.nodes):
        spans = _piece_spans(node)
        if spans is None:
            continue
        source, dim = node.args[0], _dim_of(node)
        for user in list(node.users):
            start, length = spans[user.args[1]]
            with gm.graph.inserting_before(user):
                narrow = gm.graph.call_function(torch.narrow, (source, dim, start, length))
            narrow.meta = dict(user.meta)
            fxq_meta(narrow)["changed_by"] = NAME
            user.replace_all_uses_with(narrow)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        changes.append(f"{node.name}: {node.target if isinstance(node.target, str) else node.target.__name__}"
                       f" -> {len(spans)} torch.narrow views")
    return finish(gm, changes)


def _dim_of(node: fx.Node) -> int:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    rank = len(tensor_shape(node.args[0]))
    return dim + rank if isinstance(dim, int) and dim < 0 else dim


def _piece_spans(node: fx.Node) -> Optional[list[tuple[int, int]]]:
    """(start, length) of every piece, when the call can be rewritten; else None."""
    if node.op not in ("call_method", "call_function") or node.target not in SPLIT_TARGETS:
        return None
    if not node.users or not node.args or set(node.kwargs) - {"dim"}:
        return None
    shape = tensor_shape(node.args[0])
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    sizes = node.args[1] if len(node.args) > 1 else None
    if shape is None or not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
        return None
    spans = _spans(node.target in ("chunk", torch.chunk), sizes, shape[dim])
    if spans is None:
        return None
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem
                and isinstance(user.args[1], int) and 0 <= user.args[1] < len(spans)):
            return None
    return spans


def _spans(is_chunk: bool, sizes, extent: int) -> Optional[list[tuple[int, int]]]:
    if extent <= 0:
        return None
    if is_chunk:
        if not isinstance(sizes, int) or sizes <= 0:
            return None
        step = -(-extent // sizes)  # torch.chunk: ceil-sized pieces, possibly fewer than asked
        lengths = [min(step, extent - start) for start in range(0, extent, step)]
    elif isinstance(sizes, int) and sizes > 0:
        lengths = [min(sizes, extent - start) for start in range(0, extent, sizes)]
    elif isinstance(sizes, (list, tuple)) and all(isinstance(s, int) for s in sizes) and sum(sizes) == extent:
        lengths = list(sizes)
    else:
        return None
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return list(zip(starts, lengths))
