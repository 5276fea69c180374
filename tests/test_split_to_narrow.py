"""split_to_narrow: Before/Expected, exact numerics on random shapes, no-match, idempotence."""
import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.shape_prop import ShapeProp

from fxq.passes.split_to_narrow import split_to_narrow


class ChannelSplit(nn.Module):
    """ShuffleNet's split, plus the other spellings."""

    def forward(self, x):
        left, right = x.chunk(2, dim=1)
        a, b, c = torch.split(x[:, :6], [1, 2, 3], dim=1)
        first = x.split(2, -1)[0]
        return torch.cat([right, left], 1) * 2, a + c.sum(1, keepdim=True) - b.mean(1, keepdim=True), first


def _traced(model, x):
    gm = fx.symbolic_trace(copy.deepcopy(model))
    ShapeProp(gm).propagate(x)
    return gm


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_before_expected():
    gm = _traced(ChannelSplit(), torch.randn(2, 6, 4, 5))
    result = split_to_narrow(gm)
    assert result.modified and len(result.changes) == 3
    targets = _targets(gm)
    assert not {"chunk", "split", torch.split} & set(targets)
    assert targets.count(operator.getitem) == 1  # only the x[:, :6] slice is left
    assert targets.count(torch.narrow) == 6  # 2 + 3 + 1 used pieces
    gm.graph.lint()


@settings(max_examples=25, deadline=None)
@given(channels=st.integers(6, 9), height=st.integers(1, 5), width=st.integers(1, 7), batch=st.integers(1, 3))
def test_exact_on_random_shapes(channels, height, width, batch):
    model, x = ChannelSplit(), torch.randn(batch, channels, height, width)
    gm = _traced(model, x)
    split_to_narrow(gm)
    for got, expected in zip(gm(x), model(x)):
        assert torch.equal(got, expected)


class Pieces(nn.Module):
    def __init__(self, chunks, count):
        super().__init__()
        self.chunks, self.count = chunks, count

    def forward(self, x):
        parts = x.chunk(self.chunks, 0)
        return tuple(parts[i] for i in range(self.count))


@pytest.mark.parametrize("chunks, extent", [(3, 7), (4, 5), (2, 1)])
def test_uneven_chunks_match_torch(chunks, extent):
    x = torch.randn(extent, 3)
    model = Pieces(chunks, len(x.chunk(chunks, 0)))  # torch may return fewer pieces than asked
    gm = _traced(model, x)
    assert split_to_narrow(gm).modified
    for got, expected in zip(gm(x), model(x)):
        assert torch.equal(got, expected)


def test_no_match_when_the_tuple_escapes_or_sizes_are_computed():
    class Escapes(nn.Module):
        def forward(self, x):
            return x.chunk(2, 1)

    class ComputedSizes(nn.Module):
        def forward(self, x):
            return torch.split(x, [1, x.shape[1] - 1], dim=1)[0]

    for model in (Escapes(), ComputedSizes()):
        gm = _traced(model, torch.randn(1, 4))
        assert not split_to_narrow(gm).modified
    unknown = fx.symbolic_trace(ChannelSplit())  # no ShapeProp: sizes unknown
    assert not split_to_narrow(unknown).modified


def test_idempotent():
    gm = _traced(ChannelSplit(), torch.randn(1, 6, 2, 2))
    split_to_narrow(gm)
    assert not split_to_narrow(gm).modified
