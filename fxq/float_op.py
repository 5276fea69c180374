"""``FloatOp``: a function or method call fxq decided to run in float, as a leaf module.

prepare_fx matches patterns by target; wrapping the call in a module type no BackendConfig
names keeps it out of every pattern, so torch inserts dequantize before and quantize after
it and nothing inside. The reason travels with the module into the report.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import torch.nn as nn


class FloatOp(nn.Module):
    """Runs ``target`` (a callable, a module, or a method name called on the first argument) in float."""

    def __init__(self, target: Union[Callable, str], reason: str):
        super().__init__()
        self.target = target
        self.reason = reason

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.target, str):
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)

    def extra_repr(self) -> str:
        if isinstance(self.target, nn.Module):
            return self.reason  # the wrapped module prints itself as the child
        name = self.target if isinstance(self.target, str) else getattr(self.target, "__name__", repr(self.target))
        return f"{name}: {self.reason}"
