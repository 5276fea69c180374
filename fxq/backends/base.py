"""A backend is one declarative object: what it quantizes, how, and which rewrites it needs.

The set of ops a backend can run in int8 is derived from its BackendConfig — the one source
of truth the float-island pass reads — never from a second hand-kept list.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxq import fused, quant
from fxq.errors import BackendError
from fxq.passes.base import is_depthwise, root_conv2d

#: An argument check: given the graph and a node whose target the backend supports, return
#: None when the call's arguments are fine, or the reason it must stay float.
ArgCheck = Callable[[fx.GraphModule, fx.Node], Optional[str]]

_OBSERVERS = {
    "minmax": quant.MinMaxObserver,
    "histogram": quant.HistogramObserver,
    "moving_average": quant.MovingAverageMinMaxObserver,
}


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor (activations or weights) is quantized."""

    dtype: torch.dtype = torch.quint8
    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    observer: str = "histogram"
    reduce_range: bool = False

    def __post_init__(self):
        if self.dtype not in (torch.quint8, torch.qint8):
            raise BackendError(f"QuantSpec dtype must be torch.quint8 or torch.qint8, got {self.dtype}")
        if not 2 <= self.bits <= 8:
            raise BackendError(f"QuantSpec bits must be in 2..8, got {self.bits}")
        if self.observer not in _OBSERVERS:
            raise BackendError(f"QuantSpec observer must be one of {sorted(_OBSERVERS)}, got {self.observer!r}")

    @property
    def effective_bits(self) -> int:
        return self.bits - 1 if self.reduce_range else self.bits

    def quant_range(self) -> tuple[int, int]:
        bits = self.effective_bits
        if self.dtype == torch.qint8:
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return 0, 2 ** bits - 1

    def qscheme(self) -> torch.qscheme:
        if self.per_channel:
            return torch.per_channel_symmetric if self.symmetric else torch.per_channel_affine
        return torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine

    def observer_factory(self):
        """An observer constructor (``with_args``) implementing this spec."""
        qmin, qmax = self.quant_range()
        if self.per_channel:
            return quant.PerChannelMinMaxObserver.with_args(
                dtype=self.dtype, qscheme=self.qscheme(), quant_min=qmin, quant_max=qmax)
        observer = _OBSERVERS[self.observer]
        if observer is quant.HistogramObserver and self.bits < 8:
            observer = quant.NBitHistogramObserver
        return observer.with_args(
            dtype=self.dtype, qscheme=self.qscheme(), quant_min=qmin, quant_max=qmax)

    def fake_quant_factory(self, averaging_constant: float):
        """A FakeQuantize constructor (``with_args``) for quantization-aware training: this
        spec's dtype, scheme and quant_min/quant_max, observed by a moving-average min/max.

        The values change as the model trains, so no observer that remembers every batch
        (min/max, histogram) fits: ``averaging_constant`` 1 follows the current tensor only
        (weights), smaller values average the recent batches' ranges (activations).

        Example::

            QuantSpec(bits=4).fake_quant_factory(0.01)()   # quint8-coded 0..15 fake quantizer
        """
        qmin, qmax = self.quant_range()
        observer = (quant.MovingAveragePerChannelMinMaxObserver if self.per_channel
                    else quant.MovingAverageMinMaxObserver)
        return quant.FakeQuantize.with_args(observer=observer, dtype=self.dtype, qscheme=self.qscheme(),
                                            quant_min=qmin, quant_max=qmax, averaging_constant=averaging_constant)


@dataclass(frozen=True)
class Backend:
    """A quantization target. See docs/backends.md for every field."""

    name: str
    build_backend_config: Callable[[], "quant.BackendConfig"]
    engine: Optional[str] = None
    activation: QuantSpec = QuantSpec()
    weight: QuantSpec = QuantSpec(dtype=torch.qint8, symmetric=True, per_channel=True, observer="minmax")
    native_prelu: bool = False
    torch_qconfig_base: str = "x86"
    arg_checks: dict = field(default_factory=dict)
    #: Shared-qparams ops beyond torch's own lists whose int8 kernels fxq may call directly
    #: (torch's lowering would otherwise wrap them in dequantize/quantize).
    int8_passthrough_ops: frozenset = frozenset()
    #: True: convert produces a reference model (quantize -> dequantize around float ops, any
    #: bit width, runs anywhere) instead of torch's int8 kernels; ``engine`` must be None.
    reference: bool = False
    #: Bits the kernels have for an activation code times a weight code, when fewer than both
    #: specs' full bits (x86 without VNNI: 15, int16 lanes). The specs must fit it; the other
    #: way to fit (the other spec giving up its bit) is in ``alternatives``, and fxq keeps
    #: whichever is closer to float on the calibration data (``fxq.precision``).
    max_product_bits: Optional[int] = None
    #: The same limit for depthwise convs only, where their kernels have fewer bits than the
    #: rest (x86 with VNNI: 15, see ``fxq.backends.x86``). A depthwise conv whose activation x
    #: weight bits exceed it gets weights one bit short (its own qconfig); nothing else changes.
    max_depthwise_product_bits: Optional[int] = None

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise BackendError("Backend.name must be a non-empty string")
        if self.max_product_bits is not None and self._product_bits(self.activation, self.weight) > self.max_product_bits:
            raise BackendError(f"backend {self.name!r}: {self.precision} needs {self._product_bits(self.activation, self.weight)} "
                               f"bits per product, the kernels have {self.max_product_bits}; set reduce_range on one spec")
        if self.reference and self.engine is not None:
            raise BackendError(f"backend {self.name!r}: a reference backend runs no quantized engine; "
                               f"drop engine={self.engine!r} or set reference=False")

    @staticmethod
    def _product_bits(activation: QuantSpec, weight: QuantSpec) -> int:
        return activation.effective_bits + weight.effective_bits

    @property
    def alternatives(self) -> tuple["Backend", ...]:
        """The other splits of ``max_product_bits`` between activations and weights: one spec
        at its full bits, the other one bit short. Empty without a product limit."""
        if self.max_product_bits is None:
            return ()
        full_activation = dataclasses.replace(self.activation, reduce_range=False)
        full_weight = dataclasses.replace(self.weight, reduce_range=False)
        splits = [(full_activation, dataclasses.replace(full_weight, reduce_range=True)),
                  (dataclasses.replace(full_activation, reduce_range=True), full_weight)]
        return tuple(dataclasses.replace(self, activation=activation, weight=weight)
                     for activation, weight in splits
                     if (activation, weight) != (self.activation, self.weight)
                     and self._product_bits(activation, weight) <= self.max_product_bits)

    @property
    def precision(self) -> str:
        """E.g. "8-bit activations x 7-bit weights"."""
        return f"{self.activation.effective_bits}-bit activations x {self.weight.effective_bits}-bit weights"

    @property
    def absorbs_clamps(self) -> bool:
        """Whether ``conv/linear -> clamp`` may be fused into one op.

        A reference model keeps the clamp inside the fused module (float math before the
        output quantize), so any activation spec works. Int8 kernels drop the clamp and rely
        on the output range saturating at it, which holds only for affine activations: a
        symmetric range around zero would keep negative values.
        """
        return self.reference or not self.activation.symmetric

    @functools.cached_property
    def backend_config(self) -> "quant.BackendConfig":
        return self.build_backend_config()

    @functools.cached_property
    def supported_targets(self) -> frozenset:
        """Every module type, function and method name some pattern of the config names."""
        targets = set()
        for config in self.backend_config.configs:
            targets.update(config_targets(config))
        return frozenset(targets)

    def qconfig_mapping(self, activation_observer: Optional[str] = None,
                        gm: Optional[fx.GraphModule] = None, qat: bool = False) -> "quant.QConfigMapping":
        """torch QConfigMapping for this backend; ``activation_observer`` overrides the observer
        (the fallback dry run uses cheap "minmax": it only needs to know which kernels run).
        With ``qat``, fake quantizers of the same specs (``QuantSpec.fake_quant_factory``).

        Transposed convs take per-tensor weights (no per-channel kernel). That is set per module
        of ``gm``, not per type: torch requires every type inside a fused module to map to the
        same qconfig, and the activation in a ``ConvTransposeAct`` has no per-type entry.
        """
        activation = self.activation
        if activation_observer is not None:
            activation = dataclasses.replace(activation, observer=activation_observer)
        per_tensor_weight = dataclasses.replace(self.weight, per_channel=False)
        qconfig = _qconfig(activation, self.weight, qat)
        transpose = _qconfig(activation, per_tensor_weight, qat)
        mapping = quant.default_mapping(qconfig, transpose, self.torch_qconfig_base, qat=qat)
        for module_type in _TRANSPOSED_CONVS:  # the global qconfig, like the ReLU6 fused with them
            mapping.object_type_qconfigs.pop(module_type, None)
        depthwise = self._depthwise_qconfig(activation, qat)
        for node in gm.graph.nodes if gm is not None else ():
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if _is_transposed_conv(module):
                mapping.set_module_name(node.target, transpose)
            elif depthwise is not None and is_depthwise(root_conv2d(module)):
                mapping.set_module_name(node.target, depthwise)
        return mapping

    def _depthwise_qconfig(self, activation: QuantSpec, qat: bool) -> Optional["quant.QConfig"]:
        """The qconfig of depthwise convs when they need fewer product bits than the rest, else None."""
        limit = self.max_depthwise_product_bits
        if limit is None or self._product_bits(activation, self.weight) <= limit:
            return None
        return _qconfig(activation, dataclasses.replace(self.weight, reduce_range=True), qat)

    def unsupported_reason(self, gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
        """None when this backend can run ``node`` in int8, else why not."""
        target = pattern_key(gm, node)
        if target is None or target not in self.supported_targets:
            return f"backend {self.name!r} has no int8 kernel for {_describe(target, node)}"
        check = self.arg_checks.get(target)
        return check(gm, node) if check is not None else None


#: QAT observers: weights quantized with their current range each step (Jacob et al. 2018),
#: activations with a moving average of recent batch ranges (torch's QAT default constant).
QAT_WEIGHT_AVERAGING = 1.0
QAT_ACTIVATION_AVERAGING = 0.01


def _qconfig(activation: QuantSpec, weight: QuantSpec, qat: bool) -> "quant.QConfig":
    if qat:
        return quant.QConfig(activation=activation.fake_quant_factory(QAT_ACTIVATION_AVERAGING),
                             weight=weight.fake_quant_factory(QAT_WEIGHT_AVERAGING))
    return quant.QConfig(activation=activation.observer_factory(), weight=weight.observer_factory())


_TRANSPOSED_CONVS = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def _is_transposed_conv(module: torch.nn.Module) -> bool:
    if type(module) in fused.FUSED_TYPES:
        module = module[0]
    return isinstance(module, _TRANSPOSED_CONVS)


def config_targets(pattern_config) -> frozenset:
    """The module types, functions and method names one ``BackendPatternConfig`` names."""
    pattern = pattern_config.pattern
    if pattern is None:
        pattern = pattern_config._pattern_complex_format
    return frozenset(_flatten_pattern(pattern))


def _flatten_pattern(pattern):
    if isinstance(pattern, tuple):
        for item in pattern:
            yield from _flatten_pattern(item)
    elif pattern is not None:
        yield pattern


def pattern_key(gm: fx.GraphModule, node: fx.Node):
    """What BackendConfig patterns match ``node`` by: its module's type, function, or method name."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        return node.target
    return None


def _describe(target, node: fx.Node) -> str:
    if isinstance(target, type):
        return f"module {target.__module__}.{target.__name__} ({node.target})"
    if isinstance(target, str):
        return f"method .{target}() (node {node.name})"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))
    module = getattr(target, "__module__", None) or "torch"
    return f"{module}.{name} (node {node.name})"
