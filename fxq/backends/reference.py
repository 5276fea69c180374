"""Simulated quantization at any bit width: a reference model that runs anywhere.

Convert produces float math with explicit quantize -> dequantize steps (torch's decomposed
reference representation): each activation is rounded and clamped to its N-bit range, each
weight is quantize-dequantized with its observer's range. No quantized engine is involved,
so 2..8-bit weights and activations, symmetric or affine, per-channel or per-tensor all run
on any device - for studying accuracy (DoReFa-style low-bit weights, a target's numerics)
before a real kernel exists.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from fxq.backends import tables
from fxq.backends.base import Backend, QuantSpec


def reference_backend(weight_bits: int = 8, activation_bits: int = 8, *,
                      symmetric_weights: bool = True, per_channel_weights: bool = True,
                      symmetric_activations: bool = False, activation_observer: str = "histogram",
                      name: Optional[str] = None) -> Backend:
    """A simulated backend with N-bit weights and activations.

    Activations are uint8-coded affine (``symmetric_activations=False``) or int8-coded
    symmetric; weights int8-coded, symmetric or affine, per output channel or per tensor.

    Example::

        w4a8 = fxq.reference_backend(weight_bits=4)
        qmodel = fxq.quantize(model, example_inputs, calibration_data, backend=w4a8)
    """
    activation = QuantSpec(dtype=torch.qint8 if symmetric_activations else torch.quint8, bits=activation_bits,
                           symmetric=symmetric_activations, observer=activation_observer)
    weight = QuantSpec(dtype=torch.qint8, bits=weight_bits, symmetric=symmetric_weights,
                       per_channel=per_channel_weights, observer="minmax")
    if name is None:
        name = "reference" if (weight_bits, activation_bits) == (8, 8) else f"reference_w{weight_bits}a{activation_bits}"

    def build() -> "tables.quant.BackendConfig":
        return tables.generic(activation, weight, name)

    return Backend(name=name, build_backend_config=build, activation=activation, weight=weight,
                   reference=True, torch_qconfig_base="x86", arg_checks=tables.FXQ_ARG_CHECKS)


def simulation_of(backend: Union[Backend, str], name: Optional[str] = None) -> Backend:
    """``backend``'s exact op table and quantization specs, converted to a reference model.

    What the int8 model computes, in float: for debugging a backend's numerics or
    running its accuracy study where its kernels are not available.

    Example::

        sim = fxq.simulation_of("x86")
        fxq.quantize(model, example_inputs, calibration_data, backend=sim)
    """
    from fxq.backends import get_backend
    backend = get_backend(backend)
    return dataclasses.replace(backend, name=name or f"{backend.name}_simulated", engine=None,
                               reference=True, int8_passthrough_ops=frozenset())


reference = reference_backend()
