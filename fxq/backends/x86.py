"""The default backend: x86 CPUs through torch's fbgemm/x86 quantized engine.

torch's native x86 pattern table plus fxq's entries (``tables.with_fxq_patterns``):
conv/conv-transpose/linear + clamp-like activations as one fused op, constant zero padding
and ``nn.Flatten`` run on int8 tensors.
"""
from __future__ import annotations

import dataclasses

import torch

from fxq import quant
from fxq.backends import tables
from fxq.backends.base import Backend, QuantSpec


ACTIVATION = QuantSpec(dtype=torch.quint8, observer="histogram")
WEIGHT = QuantSpec(dtype=torch.qint8, symmetric=True, per_channel=True, observer="minmax")


def build_x86_backend_config() -> "quant.BackendConfig":
    return tables.with_fxq_patterns(quant.get_x86_backend_config(), ACTIVATION, WEIGHT)


#: Without VNNI, fbgemm multiplies uint8 x int8 pairs into saturating int16 lanes (measured:
#: 8 x 8 bits lost 1 to 20 dB against either 15-bit split), so one spec gives up a bit. The
#: default is torch's choice, 7-bit activations; given enough calibration data to hold some out
#: (fxq.precision), 8-bit activations x 7-bit weights is tried too and the better kept.
#: ``dataclasses.replace(x86, max_product_bits=None)`` keeps torch's split always.
PRODUCT_BITS = None if torch.cpu._is_vnni_supported() else 15

x86 = Backend(
    name="x86",
    engine="x86",
    build_backend_config=build_x86_backend_config,
    activation=dataclasses.replace(ACTIVATION, reduce_range=PRODUCT_BITS is not None),
    weight=WEIGHT,
    native_prelu=False,  # torch's quantized PReLU saturates the positive branch; see decompose_prelu
    torch_qconfig_base="x86",
    arg_checks=tables.FXQ_ARG_CHECKS,
    int8_passthrough_ops=frozenset(tables.EXTRA_SHARED_QPARAMS_OPS),
    max_product_bits=PRODUCT_BITS,
)
