"""Arguments bound to None at trace time: fx guards them with a private function that
prepare_fx could not trace again (timm's ViTs); fxq's own guard traces and still checks."""
import warnings

import pytest
import torch
from torch import nn

import fxq
from metrics import sqnr_db


class MaskedNet(nn.Module):
    """``mask=None`` decides the control flow, as in timm's attention blocks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, mask=None):
        y = torch.relu(self.conv(x))
        if mask is not None:
            y = y * mask
        return y


def test_a_none_bound_argument_quantizes_and_stays_guarded():
    torch.manual_seed(0)
    model = MaskedNet().eval()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        qmodel = fxq.quantize(model, batches[0], calibration_data=batches)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert sqnr_db(model(x), qmodel(x)) >= 25.0
        with pytest.raises(fxq.InvalidInputError, match="traced for other arguments"):
            qmodel(x, mask=torch.ones(1))
