"""The default backend: x86 CPUs through torch's fbgemm/x86 quantized engine.

torch's native x86 pattern table plus fxq's entries (``tables.with_fxq_patterns``):
conv/conv-transpose/linear + clamp-like activations as one fused op, constant zero padding
and ``nn.Flatten`` run on int8 tensors.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.fx as fx

from fxq import fused, quant
from fxq.backends import tables
from fxq.backends.base import Backend, QuantSpec
from fxq.passes.base import fused_root, get_module, is_depthwise, root_conv2d
from fxq.tensors import sqnr_db


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

#: With VNNI, fbgemm's depthwise conv kernels still multiply in saturating int16 pairs: with
#: 8-bit activations x 8-bit weights, a depthwise 3x3 over 256 channels measured 22.9 dB on
#: inputs spread over the whole uint8 range (16.5 dB at zero point 128), against 39.8 dB for
#: a regular conv and 40.2 dB with 7-bit weights; above 96 channels only (AVX-512 machine).
#: So depthwise convs take 7-bit weights whatever the activations (a no-op without VNNI).
DEPTHWISE_PRODUCT_BITS = 15

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
    if not is_depthwise(conv):
        return None
    kernel, dilated = max(conv.kernel_size), max(conv.dilation) > 1
    if kernel <= MAX_FAST_DEPTHWISE_KERNEL and not (kernel > 3 and dilated):
        return None
    size = "x".join(map(str, conv.kernel_size)) + (f" dilation {max(conv.dilation)}" if dilated else "")
    return (f"depthwise {size} conv {node.target}: fbgemm has no fast int8 kernel for it "
            f"(measured 9x9: 460x, 5x5 dilation 2: 166x slower than fp32)")


_CONV2D_TYPES = (torch.nn.Conv2d, quant.nni.ConvReLU2d, fused.FUSED_FOR_ROOT[torch.nn.Conv2d])

#: fbgemm's int8 transposed convs return wrong values on some CPUs: on an AVX-512 VNNI EPYC with
#: torch 2.14, every ConvTranspose2d measured whose input and output channel counts differ gave
#: -5 to -1 dB SQNR against float on the same int8 operands (8 -> 16, 64 -> 32, 2x2 stride 2 or
#: 3x3 stride 1; at 7 or 8 bits alike), equal counts 42-44 dB; qnnpack on the same machine
#: 41.7 dB, fbgemm on an AVX2 machine 34 dB. So each layer configuration is checked once per
#: process, on this CPU, against float, and runs in float where the kernel is wrong.
TRANSPOSED_CONV_MIN_SQNR_DB = 20.0
_TRANSPOSED_CONV_ROOTS = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_TRANSPOSED_CONV_TYPES = tuple(t for root in _TRANSPOSED_CONV_ROOTS for t in (root, fused.FUSED_FOR_ROOT[root]))


@functools.lru_cache(maxsize=None)
def int8_transposed_conv_sqnr(dims: int, in_channels: int, out_channels: int, kernel: tuple, stride: tuple,
                              padding: tuple, output_padding: tuple, groups: int, dilation: tuple) -> float:
    """SQNR (dB) of fbgemm's int8 transposed conv of this configuration against float on the same
    int8 operands (random weights and inputs), on this machine."""
    float_layer = _TRANSPOSED_CONV_ROOTS[dims - 1](
        in_channels, out_channels, kernel, stride, padding, output_padding, groups, False, dilation)
    int8_layer = (quant.nnq.ConvTranspose1d, quant.nnq.ConvTranspose2d, quant.nnq.ConvTranspose3d)[dims - 1](
        in_channels, out_channels, kernel, stride, padding, output_padding, groups, False, dilation)
    generator = torch.Generator().manual_seed(0)
    size = max(4, *(k * d for k, d in zip(kernel, dilation)))
    x = torch.quantize_per_tensor(torch.rand(1, in_channels, *([size] * dims), generator=generator) * 12,
                                  0.05, 8, torch.quint8)
    weight = torch.randn(float_layer.weight.shape, generator=generator)
    weight = torch.quantize_per_tensor(weight, float(weight.abs().max()) / 127, 0, torch.qint8)
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "x86"
        with torch.no_grad():
            float_layer.weight.copy_(weight.dequantize())
            expected = float_layer(x.dequantize())
            int8_layer.set_weight_bias(weight, None)
            int8_layer.scale = max(float(expected.max() - expected.min()), 1e-6) / 255
            int8_layer.zero_point = min(255, max(0, int(round(-float(expected.min()) / int8_layer.scale))))
            return sqnr_db(expected, int8_layer(x).dequantize())
    finally:
        torch.backends.quantized.engine = previous


def working_transposed_conv(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """None unless fbgemm's int8 transposed conv computes this layer wrongly on this CPU."""
    conv = fused_root(get_module(gm, node), _TRANSPOSED_CONV_ROOTS)
    if conv is None:
        return None
    dims = _TRANSPOSED_CONV_ROOTS.index(type(conv)) + 1
    with quant.quiet():
        sqnr = int8_transposed_conv_sqnr(dims, conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
                                         tuple(conv.stride), tuple(conv.padding), tuple(conv.output_padding),
                                         conv.groups, tuple(conv.dilation))
    if sqnr >= TRANSPOSED_CONV_MIN_SQNR_DB:
        return None
    return (f"transposed conv {node.target}: fbgemm's int8 kernel computes it wrongly on this CPU "
            f"(self-check: {sqnr:.1f} dB against float)")


x86 = Backend(
    name="x86",
    engine="x86",
    build_backend_config=build_x86_backend_config,
    activation=dataclasses.replace(ACTIVATION, reduce_range=PRODUCT_BITS is not None),
    weight=WEIGHT,
    native_prelu=False,  # torch's quantized PReLU saturates the positive branch; see decompose_prelu
    torch_qconfig_base="x86",
    arg_checks={**tables.FXQ_ARG_CHECKS, **dict.fromkeys(_CONV2D_TYPES, fast_depthwise_only),
                **dict.fromkeys(_TRANSPOSED_CONV_TYPES, working_transposed_conv)},
    int8_passthrough_ops=frozenset(tables.EXTRA_SHARED_QPARAMS_OPS),
    max_product_bits=PRODUCT_BITS,
    max_depthwise_product_bits=DEPTHWISE_PRODUCT_BITS,
)
