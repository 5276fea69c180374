"""The default backend: x86 CPUs through torch's fbgemm/x86 quantized engine.

torch's native x86 pattern table plus fxq's entries (``tables.with_fxq_patterns``):
conv/conv-transpose/linear + clamp-like activations as one fused op, constant zero padding
and ``nn.Flatten`` run on int8 tensors.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from fxq import fused, quant
from fxq.backends import tables
from fxq.backends.base import Backend, QuantSpec
from fxq.passes.base import get_module, root_conv2d


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

#: fbgemm's fast int8 depthwise kernels stop at 7x7, and above 3x3 at dilation 1; other
#: depthwise convs take a generic path measured hundreds of times slower than fp32 (one thread:
#: 48 channels at 32x32, 9x9 128.8 ms int8 vs 0.28 ms fp32 and 11x11 185.6 vs 8.0 ms; 480
#: channels at 8x8, 5x5 at dilation 2 28.3 vs 0.17 ms; 3x3 at dilations 1-4, strides 1-3, 5x5,
#: 7x7 and 1x5 at dilation 1 within 1.6x of fp32, except 7x7 on 480 channels at 6x, left int8:
#: ConvNeXt's 7x7 convs measured faster int8 at model level). MixNet's 9x9 convs made timm
#: mixnet_s 0.38x fp32, LR-ASPP's dilated 5x5 ones lraspp_mobilenet_v3_large 0.17x. Such convs
#: run in float.
MAX_FAST_DEPTHWISE_KERNEL = 7


def fast_depthwise_only(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """None unless ``node`` is a depthwise Conv2d that fbgemm has no fast int8 kernel for."""
    conv = root_conv2d(get_module(gm, node))
    if conv is None or conv.groups == 1 or conv.groups != conv.in_channels:
        return None
    kernel, dilated = max(conv.kernel_size), max(conv.dilation) > 1
    if kernel <= MAX_FAST_DEPTHWISE_KERNEL and not (kernel > 3 and dilated):
        return None
    size = "x".join(map(str, conv.kernel_size)) + (f" dilation {max(conv.dilation)}" if dilated else "")
    return (f"depthwise {size} conv {node.target}: fbgemm has no fast int8 kernel for it "
            f"(measured 9x9: 460x, 5x5 dilation 2: 166x slower than fp32)")


_CONV2D_TYPES = (torch.nn.Conv2d, quant.nni.ConvReLU2d, fused.FUSED_FOR_ROOT[torch.nn.Conv2d])

x86 = Backend(
    name="x86",
    engine="x86",
    build_backend_config=build_x86_backend_config,
    activation=dataclasses.replace(ACTIVATION, reduce_range=PRODUCT_BITS is not None),
    weight=WEIGHT,
    native_prelu=False,  # torch's quantized PReLU saturates the positive branch; see decompose_prelu
    torch_qconfig_base="x86",
    arg_checks={**tables.FXQ_ARG_CHECKS, **dict.fromkeys(_CONV2D_TYPES, fast_depthwise_only)},
    int8_passthrough_ops=frozenset(tables.EXTRA_SHARED_QPARAMS_OPS),
    max_product_bits=PRODUCT_BITS,
)
