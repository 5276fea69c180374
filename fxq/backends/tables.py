"""Building blocks for a backend's op table (its torch ``BackendConfig``).

A backend's table says which patterns it quantizes and with which dtypes; the float-island
pass reads the same table, so these helpers are the only way fxq's backends describe ops:

- ``with_fxq_patterns``: fxq's entries on top of any table (conv/linear + clamp fused into
  one op, zero padding and ``nn.Flatten`` on int8 values);
- ``without``: drop every pattern that names one of the given ops (a kernel the target lacks);
- ``retyped`` / ``generic``: torch's full op table with the dtypes of a backend's own
  ``QuantSpec``s, for simulated backends and third-party targets with no torch kernels.
"""
from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq import fused, quant
from fxq.backends.base import QuantSpec, config_targets

ZERO_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)

#: Ops that only move or pad int8 values, missing from torch's table but run by its kernels.
EXTRA_SHARED_QPARAMS_OPS = (F.pad, *ZERO_PAD_MODULES, nn.Flatten)


def dtype_configs(activation: QuantSpec, weight: QuantSpec) -> tuple:
    """(weighted-op, plain-op) ``DTypeConfig`` for the given activation and weight specs."""
    weighted = quant.DTypeConfig(input_dtype=activation.dtype, output_dtype=activation.dtype,
                                 weight_dtype=weight.dtype, bias_dtype=torch.float)
    plain = quant.DTypeConfig(input_dtype=activation.dtype, output_dtype=activation.dtype)
    return weighted, plain


def fused_activation_configs(dtype_config) -> list:
    """One pattern per fxq fused type: observed as a unit, lowered to its quantized root."""
    configs = []
    for fused_type, (root, reference, _) in fused.FUSED_TYPES.items():
        configs.append(
            quant.BackendPatternConfig(fused_type)
            .set_observation_type(quant.ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
            .set_dtype_configs([dtype_config])
            .set_root_module(root)
            .set_reference_quantized_module(reference)
            .set_fused_module(fused_type))
    return configs


def shared_qparams_configs(dtype_config) -> list:
    shared = quant.ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT
    return [quant.BackendPatternConfig(target).set_observation_type(shared).set_dtype_configs([dtype_config])
            for target in EXTRA_SHARED_QPARAMS_OPS]


def zero_pad_only(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """Padding runs in int8 only as a constant zero pad (the zero point is float zero)."""
    if node.op == "call_module":
        value = getattr(gm.get_submodule(node.target), "value", 0.0)
        return None if value == 0 else f"{node.target} pads with {value}: only zero padding runs in int8"
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if mode == "constant" and value in (None, 0, 0.0):
        return None
    return f"F.pad(mode={mode!r}, value={value!r}) at {node.name}: only constant zero padding runs in int8"


#: Argument checks for fxq's own entries; pass as ``Backend(arg_checks=...)``.
FXQ_ARG_CHECKS = {target: zero_pad_only for target in (F.pad, *ZERO_PAD_MODULES)}


def with_fxq_patterns(config, activation: QuantSpec, weight: QuantSpec):
    """``config`` plus fxq's fused clamp patterns and int8 padding/flatten (modified in place)."""
    weighted, plain = dtype_configs(activation, weight)
    config.set_backend_pattern_configs(fused_activation_configs(weighted))
    config.set_backend_pattern_configs(shared_qparams_configs(plain))
    return config


def without(config, targets: Iterable):
    """A copy of ``config`` without any pattern naming one of ``targets`` (module types,
    functions or method names), nor any fused pattern rooted at them: the backend has no
    kernel for them, so they stay float."""
    dropped = set(targets)

    def names_dropped(pattern_config) -> bool:
        return bool(config_targets(pattern_config) & dropped) or pattern_config.root_module in dropped

    # torch lists a fused module (ConvReLU3d) apart from the pattern that creates it (Conv3d, ReLU).
    dropped |= {c.fused_module for c in config.configs if names_dropped(c) and c.fused_module is not None}
    kept = [c for c in config.configs if not names_dropped(c)]
    return quant.BackendConfig(config.name).set_backend_pattern_configs(kept)


def _is_static_int8(dtype_config) -> bool:
    input_dtype = getattr(dtype_config.input_dtype, "dtype", dtype_config.input_dtype)
    return not dtype_config.is_dynamic and input_dtype in (torch.quint8, torch.qint8)


def retyped(config, activation: QuantSpec, weight: QuantSpec, name: str):
    """``config``'s static int8 patterns with the dtypes of ``activation``/``weight``.

    Dynamic, fp16 and weight-only entries are dropped, and so are torch's dtype constraints
    (value ranges, fixed scales): a simulated or third-party target states its own.
    """
    weighted, plain = dtype_configs(activation, weight)
    patterns = []
    for pattern_config in config.configs:
        static = [d for d in pattern_config.dtype_configs if _is_static_int8(d)]
        if not static:
            continue
        has_weight = any(d.weight_dtype is not None for d in static)
        patterns.append(copy.copy(pattern_config).set_dtype_configs([weighted if has_weight else plain]))
    return quant.BackendConfig(name).set_backend_pattern_configs(patterns)


def generic(activation: QuantSpec, weight: QuantSpec, name: str = "generic", exclude: Iterable = ()):
    """torch's full static op table plus fxq's entries, in ``activation``/``weight`` dtypes,
    minus the ops in ``exclude``. The starting point for a target with no torch kernels.

    Example::

        table = generic(ACTIVATION, WEIGHT, "my_npu", exclude=[nn.MaxPool3d, F.max_pool3d])
    """
    table = retyped(quant.get_x86_backend_config(), activation, weight, name)
    return without(with_fxq_patterns(table, activation, weight), exclude)
