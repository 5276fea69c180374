"""Choosing between precision splits of one backend's kernels, by measurement.

fbgemm without VNNI multiplies uint8 activations by int8 weights in pairs summed into
saturating int16 lanes, so activation and weight bits may add up to 15, not 16: either 7-bit
activations x 8-bit weights (torch's choice) or 8-bit activations x 7-bit weights. Which
loses less depends on the model. Measured (output SQNR, 7x8 -> 8x7): trained digits CNNs
+3..4.5 dB on all six; random-init torchvision models at 96 px +0.1..2.7 dB on 10 of 14
(efficientnet_b0, mobilenet_v3_large, convnext_tiny most), but -2.3 dB on vgg11_bn and -2.7 dB
on squeezenet1_0, whose wide dense convs need the weight bit more.

So a backend may list ``alternatives``; every candidate is prepared, all of them see each
calibration batch in the same pass (one-shot iterators work), and the one whose output is
closest to float on the first calibration batches is kept.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from fxq.backends.base import Backend
from fxq.calibrate import as_args
from fxq.tensors import clone_inputs, sqnr_db

#: Calibration batches kept to score the candidates on.
SCORING_BATCHES = 2


def candidates(backend: Backend, mode: str) -> tuple[Backend, ...]:
    """The precision splits to calibrate: the backend and its alternatives. Dynamic mode has no
    calibrated activations, so its split cannot matter."""
    if mode == "dynamic":
        return (backend,)
    return (backend, *backend.alternatives)


class CalibrationFanOut(nn.Module):
    """Feeds each batch to every candidate's prepared model, keeping the first few batches and
    the float output (a prepared model still computes in float) to score the candidates on."""

    def __init__(self, prepared_models: Sequence[nn.Module], keep: Optional[int] = None):
        super().__init__()
        self.candidates = nn.ModuleList(prepared_models)
        self.keep = (SCORING_BATCHES if keep is None else keep) if len(prepared_models) > 1 else 0
        self.kept: list[tuple[tuple, Any]] = []

    def forward(self, *args: Any) -> Any:
        kept_args = clone_inputs(args) if len(self.kept) < self.keep else None
        outputs = [model(*args) for model in self.candidates]
        if kept_args is not None:
            self.kept.append((kept_args, outputs[0]))
        return outputs[0]


def hold_out(model: nn.Module, batches: Iterable, candidate_count: int) -> tuple[list, Iterable]:
    """(scoring batches with the float model's outputs, the batches left to calibrate on).

    Scores on batches the observers saw favour the split whose ranges fit them best (measured:
    mobilenet_v3_small scored +1.9 dB for 8-bit activations in-sample, -1.1 dB on fresh
    inputs). So with several candidates and a sized batch list of at least 4, the first
    ``SCORING_BATCHES`` are held out of calibration; otherwise the fan-out keeps in-sample ones.
    """
    if candidate_count < 2 or not hasattr(batches, "__len__") or len(batches) < 2 * SCORING_BATCHES:
        return [], batches
    batches = list(batches)
    reference_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        scoring = [(as_args(batch), reference_model(*clone_inputs(as_args(batch))))
                   for batch in batches[:SCORING_BATCHES]]
    return scoring, batches[SCORING_BATCHES:]


def score(converted: nn.Module, engine_context, kept: list[tuple[tuple, Any]]) -> float:
    """Output SQNR (dB) of one converted candidate on the kept batches; -inf when not finite."""
    with engine_context, torch.no_grad():
        outputs = [converted(*clone_inputs(args)) for args, _ in kept]
    value = sqnr_db([reference for _, reference in kept], outputs)
    return value if not math.isnan(value) else -math.inf


def pick(scores: list[float]) -> int:
    """Index of the best score, agreed by every rank under torch.distributed (ranks score on their
    own batches; the mean decides, so all ranks keep the same candidate)."""
    values = torch.tensor([max(s, -1e9) for s in scores], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return int(torch.argmax(values))  # first of equals: the backend's own split wins ties


def split_used(backend: Backend, report) -> Backend:
    """The split of ``backend`` a model was quantized with (named by its report), to
    re-quantize parts of it with the same bits."""
    return next((split for split in candidates(backend, "static") if split.precision == report.precision), backend)


def describe(tried: Sequence[Backend], scores: list[float], index: int) -> str:
    """The report note: which split was kept, and every split's score."""
    measured = ", ".join(f"{backend.precision} {value:.1f} dB" for backend, value in zip(tried, scores))
    return (f"precision: kept {tried[index].precision} of {len(tried)} splits the kernels allow "
            f"(output SQNR on the first calibration batches: {measured})")
