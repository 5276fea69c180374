"""The default backend: x86 CPUs through torch's fbgemm/x86 quantized engine.

torch's native x86 pattern table plus fxq's entries (``tables.with_fxq_patterns``):
conv/conv-transpose/linear + clamp-like activations as one fused op, constant zero padding
and ``nn.Flatten`` run on int8 tensors.
"""
from __future__ import annotations

import torch

from fxq import quant
from fxq.backends import tables
from fxq.backends.base import Backend, QuantSpec


def _needs_reduced_range() -> bool:
    # Without VNNI, fbgemm multiplies uint8 x int8 pairs into saturating int16 lanes; 7-bit
    # activations keep those sums exact. With VNNI the full 8 bits are safe and more accurate.
    return not torch.cpu._is_vnni_supported()


ACTIVATION = QuantSpec(dtype=torch.quint8, observer="histogram", reduce_range=_needs_reduced_range())
WEIGHT = QuantSpec(dtype=torch.qint8, symmetric=True, per_channel=True, observer="minmax")


def build_x86_backend_config() -> "quant.BackendConfig":
    return tables.with_fxq_patterns(quant.get_x86_backend_config(), ACTIVATION, WEIGHT)


x86 = Backend(
    name="x86",
    engine="x86",
    build_backend_config=build_x86_backend_config,
    activation=ACTIVATION,
    weight=WEIGHT,
    native_prelu=False,  # torch's quantized PReLU saturates the positive branch; see decompose_prelu
    torch_qconfig_base="x86",
    arg_checks=tables.FXQ_ARG_CHECKS,
    int8_passthrough_ops=frozenset(tables.EXTRA_SHARED_QPARAMS_OPS),
)
