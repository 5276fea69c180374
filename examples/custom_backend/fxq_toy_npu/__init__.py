"""toy_npu: a fictitious NPU, declared as an fxq backend plugin.

What the chip does, and the line of the declaration that says it:
- int8 activations, symmetric around zero (zero point 0)        -> ACTIVATION
- int8 weights, symmetric, one scale per tensor                  -> WEIGHT
- no PReLU kernel: fxq rewrites PReLU into ReLUs and convs       -> native_prelu=False, NO_KERNEL
- no MaxPool3d kernel: it runs on the host, in float            -> NO_KERNEL
- ReLU6 / hardtanh / ReLU fused into the conv or linear before   -> fxq's fused patterns (tables.generic)
- no torch kernels: fxq produces the reference (simulated) model
  that the vendor's compiler consumes                            -> reference=True

Usage, once installed (``pip install examples/custom_backend``)::

    qmodel = fxq.quantize(model, example_inputs, calibration_data, backend="toy_npu")
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxq import Backend, QuantSpec
from fxq.backends import tables

ACTIVATION = QuantSpec(dtype=torch.qint8, symmetric=True, observer="histogram")
WEIGHT = QuantSpec(dtype=torch.qint8, symmetric=True, per_channel=False, observer="minmax")
NO_KERNEL = (nn.PReLU, F.prelu, nn.MaxPool3d, F.max_pool3d)


def build_backend_config():
    """torch's op table in this chip's dtypes, plus fxq's fused patterns, minus NO_KERNEL."""
    return tables.generic(ACTIVATION, WEIGHT, name="toy_npu", exclude=NO_KERNEL)


toy_npu = Backend(
    name="toy_npu",
    build_backend_config=build_backend_config,
    activation=ACTIVATION,
    weight=WEIGHT,
    native_prelu=False,
    reference=True,
    arg_checks=tables.FXQ_ARG_CHECKS,
)
