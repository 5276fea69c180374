"""fxq's fused float modules: a conv / conv-transpose / linear followed by a clamp-like
activation (ReLU6, hardtanh(lo, hi) with lo <= 0 <= hi, clamp, and ReLU where torch has
no fused kernel).

In float they compute exactly ``activation(root(x))``. After conversion the activation is
gone: the output observer saw the clamped values, so the int8 output range is a subset of
``[lo, hi]`` and requantization itself saturates there — what TFLite does when it merges
ReLU6 into Conv2D. That is only valid for affine (asymmetric) activation quantization,
which is why ``merge_activations`` asks the backend before fusing.
"""
from __future__ import annotations

import torch.nn as nn

from fxq import quant
from fxq.quant import nnq, nnqr

_FusedBase = quant.nni._FusedModule


class _ActivationFused(_FusedBase):
    """``Sequential(root, activation)`` recognised as one pattern by fxq's BackendConfig."""

    root_type: type = nn.Module

    def __init__(self, root: nn.Module, activation: nn.Module):
        if type(root) is not self.root_type:
            raise TypeError(f"{type(self).__name__} needs a {self.root_type.__name__}, got {type(root).__name__}")
        super().__init__(root, activation)


def _make_fused(name: str, root_type: type) -> type:
    return type(name, (_ActivationFused,), {"root_type": root_type, "__module__": __name__})


class _AbsorbedActivationLowering:
    """Lowering target: the quantized root module, with the activation absorbed by the
    output quantization range (see module docstring)."""

    quantized_root: type = nn.Module

    @classmethod
    def from_reference(cls, fused_reference, output_scale, output_zero_point):
        return cls.quantized_root.from_reference(fused_reference[0], output_scale, output_zero_point)


def _make_lowering(name: str, quantized_root: type) -> type:
    return type(name, (_AbsorbedActivationLowering,), {"quantized_root": quantized_root, "__module__": __name__})


ConvAct1d = _make_fused("ConvAct1d", nn.Conv1d)
ConvAct2d = _make_fused("ConvAct2d", nn.Conv2d)
ConvAct3d = _make_fused("ConvAct3d", nn.Conv3d)
ConvTransposeAct1d = _make_fused("ConvTransposeAct1d", nn.ConvTranspose1d)
ConvTransposeAct2d = _make_fused("ConvTransposeAct2d", nn.ConvTranspose2d)
ConvTransposeAct3d = _make_fused("ConvTransposeAct3d", nn.ConvTranspose3d)
LinearAct = _make_fused("LinearAct", nn.Linear)

#: fused type -> (float root type, reference root type, quantized root type)
FUSED_TYPES: dict[type, tuple[type, type, type]] = {
    ConvAct1d: (nn.Conv1d, nnqr.Conv1d, nnq.Conv1d),
    ConvAct2d: (nn.Conv2d, nnqr.Conv2d, nnq.Conv2d),
    ConvAct3d: (nn.Conv3d, nnqr.Conv3d, nnq.Conv3d),
    ConvTransposeAct1d: (nn.ConvTranspose1d, nnqr.ConvTranspose1d, nnq.ConvTranspose1d),
    ConvTransposeAct2d: (nn.ConvTranspose2d, nnqr.ConvTranspose2d, nnq.ConvTranspose2d),
    ConvTransposeAct3d: (nn.ConvTranspose3d, nnqr.ConvTranspose3d, nnq.ConvTranspose3d),
    LinearAct: (nn.Linear, nnqr.Linear, nnq.Linear),
}

FUSED_FOR_ROOT: dict[type, type] = {root: fused for fused, (root, _, _) in FUSED_TYPES.items()}


def _register_lowerings() -> None:
    for fused, (_, reference, quantized) in FUSED_TYPES.items():
        lowering = _make_lowering(f"Quantized{fused.__name__}", quantized)
        quant.register_lowering(fused, reference, lowering)


_register_lowerings()
