"""Feeding calibration batches through an observed model, with checks a user can act on."""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from fxq.errors import CalibrationError
from fxq.shape_specialize import is_trace_guard
from fxq.tensors import float_tensors


class FxqWarning(UserWarning):
    """Something fxq could do, but not well; the message says how to do better."""


def as_args(batch: Any) -> tuple:
    """A batch as positional arguments: a tensor becomes a 1-tuple, a list a tuple."""
    if isinstance(batch, tuple):
        return batch
    if isinstance(batch, list):
        return tuple(batch)
    return (batch,)


def calibration_batches(calibration_data: Optional[Iterable], example_inputs: tuple) -> Iterable:
    if calibration_data is None:
        warnings.warn("fxq.quantize: no calibration_data given, calibrating on example_inputs only; "
                      "activation ranges (and int8 accuracy) will be poor. Pass a few hundred "
                      "representative samples as calibration_data.", FxqWarning, stacklevel=3)
        return [example_inputs]
    if isinstance(calibration_data, torch.Tensor):
        raise CalibrationError("calibration_data must be an iterable of batches (e.g. a list of tensors "
                               "or a DataLoader), not a single tensor: wrap it as [tensor]")
    return calibration_data


def checked_batches(batches: Iterable, first_index: int = 0) -> Iterator[tuple]:
    """Each batch as a tuple of positional arguments; CalibrationError on NaN/Inf or no batch."""
    count = 0
    for index, batch in enumerate(batches, first_index):
        args = as_args(batch)
        for position, tensor in enumerate(float_tensors(args)):
            if not bool(torch.isfinite(tensor).all()):
                raise CalibrationError(f"calibration batch {index} has NaN or Inf values (tensor {position}); "
                                       "clean the data: observers would produce meaningless scales")
        count += 1
        yield args
    if count == 0:
        raise CalibrationError("calibration_data is empty: give at least one batch")


def calibrate(model: nn.Module, batches: Iterable, progress: Optional[bool] = None) -> int:
    """Run every batch through ``model`` (observers record ranges); return the batch count."""
    total = len(batches) if hasattr(batches, "__len__") else None
    iterator = checked_batches(batches, getattr(batches, "first_index", 0))
    show = progress if progress is not None else (total is None or total > 8)
    if show:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, total=total, desc="fxq calibrate", unit="batch", leave=False, disable=None)
    count = 0
    with torch.no_grad():
        for args in iterator:
            try:
                model(*args)
            except AssertionError as error:
                if not is_trace_guard(error):
                    raise
                index = getattr(batches, "first_index", 0) + count
                raise CalibrationError(f"calibration batch {index} does not fit what the model was traced for: "
                                       f"{error}. Calibrate on batches shaped like example_inputs (batch size "
                                       "included), or pass example_inputs shaped like the batches") from None
            count += 1
    return count
