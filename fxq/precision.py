"""Choosing between precision splits of one backend's kernels, by measurement.

fbgemm without VNNI multiplies uint8 activations by int8 weights in pairs summed into
saturating int16 lanes, so activation and weight bits may add up to 15, not 16: either 7-bit
activations x 8-bit weights (torch's choice) or 8-bit activations x 7-bit weights. Which
loses less depends on the model. Measured (output SQNR, 7x8 -> 8x7): trained digits CNNs
+3..4.5 dB on all six; random-init torchvision models at 96 px +0.1..2.7 dB on 10 of 14
(efficientnet_b0, mobilenet_v3_large, convnext_tiny most), but -2.3 dB on vgg11_bn and -2.7 dB
on squeezenet1_0, whose wide dense convs need the weight bit more.

So a backend may list ``alternatives``. When the calibration data is a sized collection of
batches from which at least ``MIN_SCORING_SAMPLES`` samples can be held out (at most
``MAX_HELD_OUT_SHARE`` of the batches), every candidate is prepared, all of them see each
remaining batch in the same pass, and the one whose output is closest to float on the held-out
batches is kept. With less data the backend's own split is used: scored on 4 held-out images the
choice was wrong on mobilenet_v3_small (14.0 vs 7.9 dB there, 8.8 vs 9.9 dB on 64 fresh ones);
on 32 it agreed with 128 fresh images on every one of 8 random-init torchvision models where the
splits differ by more than 0.1 dB (see docs/backends.md). Scores on batches the observers saw
favour 8-bit activations, so the choice is never made in-sample.
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from fxq.backends.base import Backend
from fxq.calibrate import as_args, checked_batches
from fxq.tensors import clone_inputs, sqnr_db

#: Held-out calibration samples (leading dimension of a batch's first tensor) needed to choose.
MIN_SCORING_SAMPLES = 32
#: At most this share of the calibration batches is held out of calibration to score on.
MAX_HELD_OUT_SHARE = 0.25


def candidates(backend: Backend, mode: str) -> tuple[Backend, ...]:
    """The precision splits to calibrate: the backend and its alternatives. Dynamic mode has no
    calibrated activations, so its split cannot matter."""
    if mode == "dynamic":
        return (backend,)
    return (backend, *backend.alternatives)


class CalibrationFanOut(nn.Module):
    """Feeds each calibration batch to every candidate's prepared model (a prepared model still
    computes in float: the first candidate's output is returned)."""

    def __init__(self, prepared_models: Sequence[nn.Module]):
        super().__init__()
        self.candidates = nn.ModuleList(prepared_models)

    def forward(self, *args: Any) -> Any:
        return [model(*args) for model in self.candidates][0]


class _Remaining:
    """The calibration batches after the held-out ones: lazily, with their count (for progress)."""

    def __init__(self, batches: Iterable, count: int, first_index: int = 0):
        self.batches, self.count = batches, count
        self.first_index = first_index  # of the first batch, in the user's data (for error messages)

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter(self.batches)


def _sample_count(batch: Any) -> int:
    tensor = next((t for t in as_args(batch) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return 1 if tensor is None else tensor.shape[0]


def _agreed(enough: bool) -> bool:
    """Under torch.distributed every rank must choose, or none (the choice all-reduces)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([int(enough)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())
    return enough


_END = object()


def hold_out(model: nn.Module, batches: Iterable, candidate_count: int) -> tuple[list, Iterable]:
    """(scoring batches with the float model's outputs, the batches left to calibrate on).

    The scoring list is empty, and every batch is left to calibrate on, when there is nothing
    to choose or too little data to choose by: fewer than ``MIN_SCORING_SAMPLES`` samples in
    the first ``MAX_HELD_OUT_SHARE`` of the batches, or batches with no length (a one-shot
    iterator). Batches are read lazily: a DataLoader is not loaded whole.
    """
    if candidate_count < 2:
        return [], batches
    sized = hasattr(batches, "__len__")
    limit = int(len(batches) * MAX_HELD_OUT_SHARE) if sized else 0
    iterator = iter(batches)
    head: list = []
    samples = 0
    while samples < MIN_SCORING_SAMPLES and len(head) < limit:
        batch = next(iterator, _END)
        if batch is _END:
            break
        head.append(batch)
        samples += _sample_count(batch)
    if not _agreed(samples >= MIN_SCORING_SAMPLES):  # every rank asks, so all agree
        rest = itertools.chain(head, iterator)
        return [], (_Remaining(rest, len(batches)) if sized else rest)
    reference_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        scoring = [(args, reference_model(*clone_inputs(args))) for args in checked_batches(head)]
    return scoring, _Remaining(iterator, len(batches) - len(head), first_index=len(head))


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
            f"(output SQNR on held-out calibration batches: {measured})")


def not_chosen(backend: Backend) -> str:
    """The report note when a backend with alternatives could not choose for lack of data."""
    others = ", ".join(other.precision for other in backend.alternatives)
    return (f"precision: {backend.precision}, the backend's default; {others} not tried: choosing needs a "
            f"list of calibration batches whose first {MAX_HELD_OUT_SHARE:.0%} hold at least "
            f"{MIN_SCORING_SAMPLES} samples to score on")
