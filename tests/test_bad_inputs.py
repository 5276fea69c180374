"""Bad input gets a clear fxq error, never a raw torch.fx trace or a silently wrong model."""
import math

import pytest
import torch
import torch.nn as nn

import fxq
from seed_models import make_same_pad_dynamic_net


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()


def test_not_a_module():
    with pytest.raises(fxq.InvalidInputError, match="nn.Module"):
        fxq.quantize(lambda x: x, (torch.randn(1, 3, 8, 8),))


def test_example_inputs_that_do_not_run():
    with pytest.raises(fxq.InvalidInputError, match="example_inputs do not run"):
        fxq.quantize(_net(), (torch.randn(1, 5, 8, 8),))


def test_empty_calibration_data():
    with pytest.raises(fxq.CalibrationError, match="empty"):
        fxq.quantize(_net(), torch.randn(1, 3, 8, 8), calibration_data=[])


def test_calibration_batch_with_nan():
    bad = torch.randn(2, 3, 8, 8)
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(fxq.CalibrationError, match="batch 1 has NaN"):
        fxq.quantize(_net(), torch.randn(1, 3, 8, 8), calibration_data=[torch.randn(2, 3, 8, 8), bad])


def test_calibration_batches_of_another_shape_than_a_shape_specialized_part():
    """A part traced for its example shape (TF "same" padding computed from x.shape) cannot
    calibrate on batches of another shape: an fxq error says so, not a bare AssertionError."""
    fixture = make_same_pad_dynamic_net()
    example = fixture.example_inputs[0]
    other = torch.randn(example.shape[0], example.shape[1], example.shape[2] + 2, example.shape[3] + 2)
    with pytest.raises(fxq.CalibrationError, match="calibration batch 1 does not fit what the model was traced"):
        fxq.quantize(fixture.model, fixture.example_inputs, calibration_data=[example, other])


def test_missing_calibration_data_warns():
    with pytest.warns(fxq.FxqWarning, match="calibration_data"):
        fxq.quantize(_net(), torch.randn(1, 3, 8, 8))


def test_unknown_backend_lists_available():
    with pytest.raises(fxq.BackendError, match="available: .*x86"):
        fxq.quantize(_net(), torch.randn(1, 3, 8, 8), backend="no-such-npu")


def test_report_of_a_plain_module():
    with pytest.raises(fxq.InvalidInputError, match="not produced by fxq.quantize"):
        fxq.report(_net())


def test_all_errors_are_fxq_errors():
    for error in (fxq.InvalidInputError, fxq.CalibrationError, fxq.BackendError, fxq.QuantizationFailure,
                  fxq.RewriteError, fxq.TraceFailure):
        assert issubclass(error, fxq.FxqError)
