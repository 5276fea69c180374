"""fxq's interpreters call functions with fresh copies of literal list arguments, like the
generated code does (torchvision's swin3d mutates one)."""

import torch
import torch.fx as fx
from torch import nn

from fxq.interpreters import Interpreter, ShapePropagation
from metrics import int8_sqnr_on_fresh_inputs


def shrink_window(window, size):
    """Mutates its argument, as torchvision.models.video.swin_transformer does."""
    if size < window[0]:
        window[0] = size
    return window[0]


torch.fx.wrap("shrink_window")


class WindowNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        window = shrink_window([8], x.shape[-1])
        return torch.relu(self.conv(x)) * window


def test_interpreters_run_a_function_that_mutates_a_literal_argument():
    model, x = WindowNet().eval(), torch.randn(1, 3, 4, 4)
    gm = fx.symbolic_trace(model)
    expected = model(x)
    ShapePropagation(gm).propagate(x)
    torch.testing.assert_close(Interpreter(gm).run(x), expected)
    torch.testing.assert_close(Interpreter(gm).run(x), expected)  # the graph's own list is unchanged
    assert [n.args[0] for n in gm.graph.nodes if n.target is shrink_window] == [[8]]


def test_quantize_runs_a_function_that_mutates_a_literal_argument():
    torch.manual_seed(0)
    batches = [torch.randn(2, 3, 4, 4) for _ in range(4)]
    assert int8_sqnr_on_fresh_inputs(WindowNet().eval(), batches, torch.randn(2, 3, 4, 4)) >= 25.0
