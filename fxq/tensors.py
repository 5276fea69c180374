"""Small helpers on nested model inputs and outputs (tuples, dicts, tensors)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map


def clone_inputs(inputs: tuple) -> tuple:
    """A copy, so that a model mutating its inputs cannot change the caller's tensors."""
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, inputs)


def float_tensors(value: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [t.dequantize() if t.is_quantized else t for t in leaves
            if isinstance(t, torch.Tensor) and (t.is_quantized or t.is_floating_point())]


def relative_error(reference: Any, actual: Any) -> float:
    """||reference - actual|| / ||reference|| over every float tensor of two nested outputs."""
    ref, act = float_tensors(reference), float_tensors(actual)
    if len(ref) != len(act) or any(r.shape != a.shape for r, a in zip(ref, act)):
        return math.inf
    if not ref:
        return 0.0
    num = sum(float((r.detach().double() - a.detach().double()).pow(2).sum()) for r, a in zip(ref, act))
    den = sum(float(r.detach().double().pow(2).sum()) for r in ref)
    if num == 0.0:
        return 0.0
    return math.sqrt(num / den) if den > 0 else math.inf


def sqnr_db(reference: Any, actual: Any) -> float:
    """Signal-to-quantization-noise ratio in dB over every float tensor of two outputs."""
    error = relative_error(reference, actual)
    if error == 0.0:
        return math.inf
    return -20.0 * math.log10(error)


def all_finite(value: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in float_tensors(value))
