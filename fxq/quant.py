"""The one place fxq touches ``torch.ao.quantization``.

torch.ao.quantization is deprecated in favour of torchao's PT2E flow; keeping every import
of it here means a move to PT2E changes this file only. Its deprecation and
observer warnings are filtered inside :func:`quiet`, never globally, so fxq's users see
their own warnings untouched.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch

_TORCH_AO_NOISE = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
    r"must run observer before calling calculate_qparams",
    r"_aminmax is deprecated",
    r".*TypedStorage is deprecated",
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao's own deprecation chatter for the duration of the block."""
    with warnings.catch_warnings():
        for message in _TORCH_AO_NOISE:
            warnings.filterwarnings("ignore", message=message)
        yield


with quiet():
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd
    import torch.ao.nn.quantized.reference as nnqr
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase
    from torch.ao.quantization import default_dynamic_qconfig as _dynamic_qconfig
    from torch.ao.quantization import per_channel_dynamic_qconfig as _per_channel_dynamic_qconfig
    from torch.ao.quantization import get_default_qconfig_mapping as _torch_default_mapping
    from torch.ao.quantization import get_default_qat_qconfig_mapping as _torch_default_qat_mapping
    from torch.ao.quantization.backend_config import (
        BackendConfig,
        BackendPatternConfig,
        DTypeConfig,
        ObservationType,
    )
    from torch.ao.quantization.backend_config.qnnpack import get_qnnpack_backend_config
    from torch.ao.quantization.backend_config.x86 import get_x86_backend_config
    from torch.ao.quantization.fx import _lower_to_native_backend as _lowering
    from torch.ao.quantization.fake_quantize import FakeQuantize
    from torch.ao.quantization.fake_quantize import disable_observer as _disable_observer
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.observer import (
        HistogramObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        ObserverBase,
        PerChannelMinMaxObserver,
        PlaceholderObserver,
    )
    from torch.ao.quantization.quantize_fx import (
        _convert_to_reference_decomposed_fx,
        convert_fx,
        prepare_fx,
        prepare_qat_fx,
    )

__all__ = [
    "BackendConfig", "BackendPatternConfig", "DTypeConfig", "ObservationType", "FakeQuantize",
    "FakeQuantizeBase", "HistogramObserver", "MinMaxObserver", "NBitHistogramObserver", "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver", "ObserverBase", "rebin_histogram",
    "PerChannelMinMaxObserver", "PlaceholderObserver", "QConfig", "QConfigMapping",
    "get_qnnpack_backend_config", "get_x86_backend_config", "nni", "nnq", "nnqd", "nnqr",
    "prepare", "convert", "default_mapping", "register_lowering", "quiet", "dynamic_qconfig",
    "freeze_bn_stats", "disable_observers", "BATCHNORM_QAT_TYPES",
]


def default_mapping(qconfig: QConfig, transpose_qconfig: QConfig, torch_backend: str,
                    qat: bool = False) -> QConfigMapping:
    """torch's default mapping for ``torch_backend`` with fxq's qconfigs in every slot.

    Fixed-qparams ops (sigmoid, tanh, softmax...) keep torch's fixed observers (fixed fake
    quantizers with ``qat``): their output range is known a priori and a calibrated range
    would only be worse.
    """
    with quiet():
        mapping = (_torch_default_qat_mapping if qat else _torch_default_mapping)(torch_backend)
        fixed = {
            key: value for key, value in mapping.object_type_qconfigs.items()
            if isinstance(value, QConfig) and _is_fixed_qparams(value)
        }
    transposes = {
        torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d,
        torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
        torch.nn.functional.conv_transpose3d,
    }
    mapping.set_global(qconfig)
    for key in list(mapping.object_type_qconfigs):
        if key in fixed or key == "reshape":
            continue
        mapping.set_object_type(key, transpose_qconfig if key in transposes else qconfig)
    return mapping


def dynamic_qconfig(per_channel: bool) -> QConfig:
    """torch's dynamic qconfig: int8 weights, activation range measured on each batch at run time."""
    return _per_channel_dynamic_qconfig if per_channel else _dynamic_qconfig


def _is_fixed_qparams(qconfig: QConfig) -> bool:
    with quiet():
        observer = qconfig.activation()
    return type(observer).__name__.startswith("FixedQParams")


def prepare(gm: torch.fx.GraphModule, mapping: QConfigMapping, example_inputs: tuple,
            backend_config: BackendConfig, leaf_names: list[str],
            leaf_classes: list[type], qat: bool = False) -> torch.fx.GraphModule:
    """prepare_fx (``prepare_qat_fx`` with ``qat``: fake quantization, conv+BN as torch's QAT
    ConvBn modules) with fxq's leaves (float islands, untraceable parts) kept opaque."""
    custom = (PrepareCustomConfig()
              .set_non_traceable_module_names(list(leaf_names))
              .set_non_traceable_module_classes(list(leaf_classes)))
    with quiet():
        return (prepare_qat_fx if qat else prepare_fx)(gm, mapping, example_inputs, prepare_custom_config=custom,
                                                       backend_config=backend_config)


def convert(prepared: torch.fx.GraphModule, backend_config: BackendConfig,
            reference: bool = False) -> torch.fx.GraphModule:
    """convert_fx to int8 kernels; or, with ``reference``, to a float model with explicit
    quantize/dequantize ops that clamp to each observer's quant_min/quant_max (torch's
    non-decomposed reference ops clamp to the dtype's range, which breaks N-bit simulation)."""
    with quiet():
        if reference:
            return _convert_to_reference_decomposed_fx(prepared, backend_config=backend_config)
        return convert_fx(prepared, backend_config=backend_config)


#: torch's QAT modules that fold a BatchNorm the Jacob et al. way (batch statistics until frozen).
BATCHNORM_QAT_TYPES = (nniqat.ConvBn1d, nniqat.ConvBn2d, nniqat.ConvBn3d, nniqat.ConvBnReLU1d,
                       nniqat.ConvBnReLU2d, nniqat.ConvBnReLU3d, nniqat.LinearBn1d)


def freeze_bn_stats(module: torch.nn.Module) -> int:
    """Switch every QAT conv/linear+BN in ``module`` to its running statistics; return the count."""
    frozen = [m for m in module.modules() if isinstance(m, BATCHNORM_QAT_TYPES)]
    with quiet():
        for fused in frozen:
            fused.freeze_bn_stats()
    return len(frozen)


def disable_observers(module: torch.nn.Module) -> int:
    """Fix the qparams of every fake quantizer in ``module``; return how many there are."""
    fake_quantizers = [m for m in module.modules() if isinstance(m, FakeQuantizeBase)]
    with quiet():
        for fake_quantizer in fake_quantizers:
            _disable_observer(fake_quantizer)
    return len(fake_quantizers)


def lowered_by_pattern() -> frozenset:
    """Module types torch's lowering turns into int8 kernels wherever it sees ``dequantize ->
    module -> quantize``, whatever the module's qconfig (a float LayerNorm between int8 ops)."""
    return frozenset(_lowering.SPECIAL_PATTERN_LOWER_MODULE_MAP)


def register_lowering(fused_class: type, reference_class: type, quantized_class: type) -> None:
    """Teach torch's native lowering to turn ``fused_class`` (reference) into ``quantized_class``.

    torch keys its lowering on module type in a module-level table; fxq adds entries for
    its own fused types only, so torch's behaviour for every other type is unchanged.
    """
    _lowering.STATIC_LOWER_FUSED_MODULE_MAP[fused_class] = (reference_class, quantized_class)


class NBitHistogramObserver(HistogramObserver):
    """HistogramObserver whose range search assumes the observer's own number of levels.

    torch searches as if there were 2**8 levels whatever quant_min/quant_max say, so at 4 bits
    it picks a range tuned for 8-bit rounding error (measured: digits PReLU net at 4-bit
    activations, 93.6% -> 95.8% accuracy with the right level count).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dst_nbins = self.quant_max - self.quant_min + 1


def rebin_histogram(observer: HistogramObserver, new_min: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
    """``observer``'s histogram spread over the wider range [new_min, new_max], same bin count.

    torch's own re-binning (the one ``forward`` uses when a batch widens the range): each bin
    is split into 16 and the pieces land in the new bin holding their midpoint.
    """
    empty = torch.zeros_like(observer.histogram)
    return observer._combine_histograms(observer.histogram, observer.min_val, observer.max_val,
                                        empty, new_min, new_max)


def observer_state(module: torch.nn.Module) -> dict[str, Any]:
    """min/max of every observer in a prepared model, for tests and reports."""
    return {name: (float(m.min_val), float(m.max_val)) for name, m in module.named_modules()
            if isinstance(m, ObserverBase) and hasattr(m, "min_val") and m.min_val.numel() == 1}
