"""Quantization modes: which scheme each layer of a model gets.

- ``static``: activations and weights int8 with calibrated ranges (the default, what fxq always did).
- ``dynamic``: only Linear and recurrent layers, int8 weights, activations quantized per batch at
  run time; everything else float. No calibration data needed.
- ``auto``: static int8 for conv/linear chains, dynamic for recurrent layers and for Linear layers
  whose neighbours run float (attention blocks, heads after a GRU), float for the attention ops
  int8 would harm (see ``fxq.passes.protect_attention``).

A dynamic layer is recorded in ``node.meta["fxq"]``: ``dynamic`` says why, and ``float_reason``
says that its activations stay float at the graph level, so the float-island pass plans the
transitions around it correctly; ``fxq.stages.prepare_unit`` gives it the dynamic qconfig.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from fxq import quant
from fxq.backends.base import Backend
from fxq.errors import InvalidInputError
from fxq.passes.base import fxq_meta

MODES = ("static", "dynamic", "auto")
DEFAULT_MODE = "static"

RECURRENT_TYPES = (nn.GRU, nn.LSTM, nn.GRUCell, nn.LSTMCell, nn.RNNCell)
LINEAR_TYPES = (nn.Linear, quant.nni.LinearReLU)
DYNAMIC_PREFIX = "dynamic int8"


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else an :class:`InvalidInputError` saying which are."""
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}. "
                                "'static' calibrates every int8 range, 'dynamic' quantizes Linear and "
                                "recurrent layers at run time, 'auto' picks per layer (see docs/modes.md)")
    return mode


def can_run_dynamic(module: nn.Module) -> bool:
    """Whether torch has a dynamic int8 kernel for this module type (exact type, no subclasses)."""
    return type(module) in RECURRENT_TYPES + LINEAR_TYPES


def backend_lacks_dynamic(backend: Backend, module: nn.Module) -> Optional[str]:
    """None when ``backend``'s op table runs ``module`` dynamically, else why not.

    Read from the backend's BackendConfig (a dtype config with ``is_dynamic``), the same
    table the float-island pass reads for static ops.
    """
    for config in backend.backend_config.configs:
        if config.pattern is type(module) and any(d.is_dynamic for d in config.dtype_configs):
            return None
    return f"backend {backend.name!r} has no dynamic int8 kernel for {type(module).__name__}"


def mark_dynamic(node: fx.Node, reason: str) -> None:
    """Mark a Linear/recurrent module call to run with int8 weights and run-time activation ranges."""
    meta = fxq_meta(node)
    meta["dynamic"] = reason
    meta["float_reason"] = f"{DYNAMIC_PREFIX}: {reason}"


def dynamic_reason(node: fx.Node) -> Optional[str]:
    return node.meta.get("fxq", {}).get("dynamic")


def dynamic_qconfig(module: nn.Module) -> "quant.QConfig":
    """torch's dynamic qconfig: per-channel weights for Linear, per-tensor for recurrent layers
    (torch's dynamic RNN modules take one weight scale per gate matrix)."""
    return quant.dynamic_qconfig(per_channel=isinstance(module, LINEAR_TYPES))
