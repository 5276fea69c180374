"""torch.fx interpreters that call functions the way a GraphModule's generated code does.

Generated code builds a fresh list for a literal argument (``f([0, 0, 0], ...)``) on every call;
``fx.Interpreter`` passes the node's own immutable list, so a function that mutates its
argument fails under the interpreter although the model runs. torchvision's video Swin does
(``_get_window_and_shift_size`` shrinks its window list for small inputs): fxq's shape
propagation raised TypeError on swin3d_t where plain FX quantized it. Every interpreter fxq
runs hands each call mutable copies.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp


def _mutable(value: Any) -> Any:
    if isinstance(value, list):  # fx's immutable_list included
        return [_mutable(item) for item in value]
    if type(value) is tuple:  # not torch.Size or named tuples: those stay as they are
        return tuple(_mutable(item) for item in value)
    if isinstance(value, dict):
        return {key: _mutable(item) for key, item in value.items()}
    return value


class _FreshArguments:
    def fetch_args_kwargs_from_env(self, n: fx.Node):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)


class Interpreter(_FreshArguments, fx.Interpreter):
    """``fx.Interpreter`` whose calls get mutable copies of literal list/dict arguments."""


class ShapePropagation(_FreshArguments, ShapeProp):
    """``ShapeProp`` whose calls get mutable copies of literal list/dict arguments."""
