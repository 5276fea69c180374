"""The ordered pass list, and the runner that proves each pass kept the float model intact.

Order matters, and each line says why it stands where it does.
"""
from __future__ import annotations

import copy
import functools
import time
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxq.backends.base import Backend
from fxq.backends.patterns import single_op_patterns
from fxq.errors import RewriteError
from fxq.interpreters import ShapePropagation
from fxq.passes.align_depthwise_padding import align_depthwise_padding
from fxq.passes.base import PassResult
from fxq.passes.canonicalize_methods import canonicalize_methods
from fxq.passes.choose_dynamic_layers import choose_dynamic_layers
from fxq.passes.decompose_prelu import decompose_prelu
from fxq.passes.decompose_silu import backend_needs_it as silu_needs_decomposing
from fxq.passes.decompose_silu import decompose_silu
from fxq.passes.drop_inference_identities import drop_inference_identities
from fxq.passes.fold_batchnorm import TRANSPOSED_CONV_TYPES, fold_batchnorm
from fxq.passes.functionalize_inplace import functionalize_inplace
from fxq.passes.lower_batchnorm import lower_batchnorm
from fxq.passes.merge_activations import merge_activations
from fxq.passes.modularize_functional_batchnorm import modularize_functional_batchnorm
from fxq.passes.modularize_functional_convs import modularize_functional_convs
from fxq.passes.pad_depthwise_channels import pad_depthwise_channels
from fxq.passes.place_float_islands import place_float_islands
from fxq.passes.protect_attention import protect_attention
from fxq.passes.requantize_wide_averages import requantize_wide_averages
from fxq.passes.split_to_narrow import split_to_narrow
from fxq.passes.unshare_called_modules import unshare_called_modules
from fxq.report import PassRecord
from fxq.tensors import clone_inputs, relative_error

Pass = tuple[str, Callable[[fx.GraphModule], PassResult]]

#: Relative L2 error a float rewrite may introduce (BN folding reassociates a few products).
REWRITE_TOLERANCE = 1e-4
#: A rewrite may move the output this many times as far as float32 rounding alone does.
ROUNDING_MARGIN = 100


def passes_for(backend: Backend, mode: str = "static", qat: bool = False) -> list[Pass]:
    """The rewrites fxq runs for ``backend`` in ``mode`` (see ``fxq.modes``), in order; with
    ``qat``, for ``fxq.prepare_qat``: BatchNorm stays for torch's QAT ConvBn modules to fold."""
    passes: list[Pass] = [
        # First: every later pattern assumes each value is written exactly once.
        ("functionalize_inplace", functionalize_inplace),
        # Stochastic depth and dropout traced in eval mode are identities with no int8 kernel.
        ("drop_inference_identities", drop_inference_identities),
        # Before any fusion: a quantized module has one output scale, so each call site gets a
        # copy. Not in QAT (copies would untie the weights) nor dynamic (no output scale).
        *([] if qat or mode == "dynamic" else [("unshare_called_modules", unshare_called_modules)]),
        # Pattern tables name torch.add, not x.add: spell methods the way backends match them.
        ("canonicalize_methods", canonicalize_methods),
        # Tuple-returning splits have no int8 pattern; their pieces as narrow views do.
        ("split_to_narrow", split_to_narrow),
        # torch's int8 PReLU is wrong (saturates the positive branch); most backends lack it.
        *([] if backend.native_prelu else [("decompose_prelu", decompose_prelu)]),
        # No SiLU kernel, but sigmoid and mul: two int8 ops instead of a float island each.
        *([("decompose_silu", decompose_silu)] if silu_needs_decomposing(backend) else []),
        # Before BN folding, so an F.conv2d followed by BatchNorm folds like an nn.Conv2d.
        ("modularize_functional_convs", modularize_functional_convs),
        # timm's BatchNormAct calls F.batch_norm in its forward: as a module it folds like any BN.
        ("modularize_functional_batchnorm", modularize_functional_batchnorm),
        # In QAT, torch's QAT ConvBn modules fold BN while training, with batch statistics;
        # it has none for a transposed conv (its fuser raises), so those fold here.
        ("fold_batchnorm", functools.partial(fold_batchnorm, producers=TRANSPOSED_CONV_TYPES) if qat
         else fold_batchnorm),
        # Only BatchNorms that could not fold are left; those the backend has no kernel for
        # become per-channel affines (its own int8 BN measured more accurate where it exists).
        *([] if qat else [("lower_batchnorm", functools.partial(
            lower_batchnorm, native=single_op_patterns(backend.backend_config)))]),
        # After folding: conv -> bn -> relu6 is conv -> relu6 by now. In QAT only ReLU fuses:
        # torch has QAT modules for conv/linear + ReLU, none for fxq's conv + clamp.
        ("merge_activations", functools.partial(merge_activations, absorb_clamps=backend.absorbs_clamps and not qat)),
        # After fusion, so conv + relu stay one op; the crop that follows commutes with the relu.
        # Neither in QAT: the crop would stand between a conv and its BatchNorm.
        *([] if qat else [("align_depthwise_padding", align_depthwise_padding),
                          # fbgemm's fast depthwise kernel also needs a multiple of 8 channels.
                          ("pad_depthwise_channels", pad_depthwise_channels)]),
        # Wide averages get their own output scale; before islands, which read the float marks.
        ("requantize_wide_averages", functools.partial(requantize_wide_averages, backend=backend)),
        *_mode_passes(backend, mode),
        # Last: decides float regions on the final graph, with the backend's op table.
        ("place_float_islands", functools.partial(place_float_islands, backend=backend)),
    ]
    return passes


def _mode_passes(backend: Backend, mode: str) -> list[Pass]:
    """Marks, not rewrites: which ops stay float or run dynamically. After every rewrite (they
    mark the final nodes), before the islands (which plan transitions around the marks)."""
    if mode == "dynamic":
        return [("choose_dynamic_layers", functools.partial(choose_dynamic_layers, backend=backend, everything=True))]
    if mode == "auto":
        # Attention first: a Linear next to a protected op is then seen to have float neighbours.
        return [("protect_attention", protect_attention),
                ("choose_dynamic_layers", functools.partial(choose_dynamic_layers, backend=backend))]
    return []


def run_passes(gm: fx.GraphModule, example_inputs: tuple, backend: Backend, on_stage: Optional[Callable] = None,
               mode: str = "static", qat: bool = False) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run every pass; after each one that changed the graph, check the float output still matches.

    The shape propagation that refreshes ``tensor_meta`` for the next pass is also the run
    whose output is compared, so each modifying pass costs one forward. ``on_stage(name, gm,
    record)``, if given, sees the traced graph (record None) and the graph after every pass.
    """
    reference = _propagate(gm, example_inputs)
    on_stage = on_stage or (lambda *_: None)
    on_stage("traced", gm, None)
    records: list[PassRecord] = []
    for name, run in passes_for(backend, mode, qat):
        start = time.perf_counter()
        result = run(gm)
        records.append(PassRecord(name, result.modified, result.changes, time.perf_counter() - start))
        gm = result.graph_module
        if result.modified:
            rewritten = _propagate(gm, example_inputs)
            _check_float_equivalence(reference, rewritten, records,
                                     lambda: _rounding_noise(gm, rewritten, example_inputs))
        on_stage(name, gm, records[-1])
    return gm, records


def _propagate(gm: fx.GraphModule, example_inputs: tuple):
    with torch.no_grad():
        return ShapePropagation(gm).propagate(*clone_inputs(example_inputs))


def _rounding_noise(gm: fx.GraphModule, output, example_inputs: tuple) -> float:
    """How far float32 rounding alone moves ``gm``'s ``output``: float32 vs float64 (inf if it
    cannot run in float64). Measured on the rewritten graph, only when a check needs it."""
    inputs = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                   for t in clone_inputs(example_inputs))
    try:
        with torch.no_grad():
            return relative_error(copy.deepcopy(gm).double()(*inputs), output)
    except Exception:
        return float("inf")


def _check_float_equivalence(reference, rewritten, records: list[PassRecord], rounding_noise: Callable[[], float]) -> None:
    """Deep random-init nets amplify float32 rounding (resnet152: 9e-4 after BN folding), so the
    bound is the larger of REWRITE_TOLERANCE and ROUNDING_MARGIN times the model's own rounding
    noise (how far its float32 output is from its float64 output)."""
    error = relative_error(reference, rewritten)
    if error <= REWRITE_TOLERANCE:
        return
    noise = rounding_noise()
    if error <= ROUNDING_MARGIN * noise:
        return
    before = ", ".join(r.name for r in records[:-1]) or "none"
    raise RewriteError(
        f"pass {records[-1].name!r} changed the float model's output (relative error {error:.2e} > "
        f"{REWRITE_TOLERANCE:.0e} and > {ROUNDING_MARGIN} x the model's float32 rounding noise {noise:.1e}); "
        f"passes before it: {before}. This is an fxq bug: please report it with the model. "
        f"Changes made: {records[-1].changes[:5]}")
