"""The default backend: x86 CPUs through torch's fbgemm/x86 quantized engine.

torch's native x86 pattern table, plus fxq's entries:
- conv/conv-transpose/linear + clamp-like activations as one fused op (``fxq.fused``);
- constant zero padding (``F.pad``, ``nn.ZeroPad*d``) run on int8 tensors: zero in float
  is the zero point in int8, so TF-"same" padded convs need no float round trip;
- ``nn.Flatten`` (torch lists only the ``torch.flatten`` function).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq import fused, quant
from fxq.backends.base import Backend, QuantSpec

_INT8_WEIGHTED = quant.DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8,
                                   weight_dtype=torch.qint8, bias_dtype=torch.float)
_INT8_SHARED = quant.DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8)

ZERO_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)


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


#: Ops that only move or pad int8 values, missing from torch's table but run by its kernels.
EXTRA_SHARED_QPARAMS_OPS = (F.pad, *ZERO_PAD_MODULES, nn.Flatten)


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


def build_x86_backend_config() -> "quant.BackendConfig":
    config = quant.get_x86_backend_config()
    config.set_backend_pattern_configs(fused_activation_configs(_INT8_WEIGHTED))
    config.set_backend_pattern_configs(shared_qparams_configs(_INT8_SHARED))
    return config


def _needs_reduced_range() -> bool:
    # Without VNNI, fbgemm multiplies uint8 x int8 pairs into saturating int16 lanes; 7-bit
    # activations keep those sums exact. With VNNI the full 8 bits are safe and more accurate.
    return not torch.cpu._is_vnni_supported()


x86 = Backend(
    name="x86",
    engine="x86",
    build_backend_config=build_x86_backend_config,
    activation=QuantSpec(dtype=torch.quint8, observer="histogram", reduce_range=_needs_reduced_range()),
    weight=QuantSpec(dtype=torch.qint8, symmetric=True, per_channel=True, observer="minmax"),
    native_prelu=False,  # torch's quantized PReLU saturates the positive branch; see decompose_prelu
    torch_qconfig_base="x86",
    arg_checks={target: zero_pad_only for target in (F.pad, *ZERO_PAD_MODULES)},
    int8_passthrough_ops=frozenset(EXTRA_SHARED_QPARAMS_OPS),
)
