"""ARM-style CPUs through torch's QNNPACK engine (also runs on x86, which is how fxq tests it).

torch's qnnpack pattern table plus fxq's entries, like ``x86``, with what differs measured
on torch 2.14's kernels:
- uint8 activations use the full 8 bits: QNNPACK accumulates in int32, no int16 saturation;
- weights are symmetric int8 per channel for conv1d/2d/3d and linear (per-channel kernels
  beat per-tensor by 1-4 dB SQNR); transposed convs take per-tensor weights, as on x86;
- 3-D convolutions are left out and run in float: QNNPACK's ``ConvTranspose3d`` returns wrong
  values (-15 dB SQNR where fbgemm gives 34 dB), and its ``Conv3d`` packs weights it cannot
  unpack, so the int8 model could be neither saved (``state_dict``) nor copied.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxq import quant
from fxq.backends import tables
from fxq.backends.base import QuantSpec
from fxq.backends.x86 import working_transposed_conv, x86

ACTIVATION = QuantSpec(dtype=torch.quint8, observer="histogram", reduce_range=False)
WEIGHT = QuantSpec(dtype=torch.qint8, symmetric=True, per_channel=True, observer="minmax")
#: Ops whose QNNPACK kernels are wrong or unusable on this torch version (see above).
BROKEN_KERNELS = (nn.Conv3d, F.conv3d, nn.ConvTranspose3d, F.conv_transpose3d)


def build_qnnpack_backend_config() -> "quant.BackendConfig":
    config = tables.with_fxq_patterns(quant.get_qnnpack_backend_config(), ACTIVATION, WEIGHT)
    return tables.without(config, BROKEN_KERNELS)


#: Declared as x86's differences: the rest (PReLU decomposition, int8 padding) is the same.
qnnpack = dataclasses.replace(
    x86,
    name="qnnpack",
    engine="qnnpack",
    build_backend_config=build_qnnpack_backend_config,
    activation=ACTIVATION,
    weight=WEIGHT,
    torch_qconfig_base="qnnpack",
    max_product_bits=None,  # full 8 x 8 bits: qnnpack accumulates in int32
    max_depthwise_product_bits=None,
    # the transposed-conv check tests fbgemm's kernel; qnnpack's own measured 41.7 dB where fbgemm's failed
    arg_checks={target: check for target, check in x86.arg_checks.items() if check is not working_transposed_conv},
)
