"""build_channel_affine: x * scale[c] + shift[c] as one conv/Linear module."""
import pytest
import torch
from torch import nn

from fxq.passes.channel_affine import build_channel_affine

EXPECTED_TYPE = {2: nn.Linear, 3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("with_shift", [True, False])
def test_matches_broadcast_affine(rank, with_shift):
    generator = torch.Generator().manual_seed(rank)
    for _ in range(5):
        channels = int(torch.randint(1, 17, (1,), generator=generator))
        shape = [3, channels] + [int(torch.randint(1, 6, (1,), generator=generator)) for _ in range(rank - 2)]
        x = torch.randn(shape, generator=generator) * 10
        scale = torch.randn(channels, generator=generator) * 3
        shift = torch.randn(channels, generator=generator) if with_shift else None
        module = build_channel_affine(scale, shift, rank)
        assert type(module) is EXPECTED_TYPE[rank]
        view = [1, channels] + [1] * (rank - 2)
        product = x * scale.view(view)
        expected = product + (0 if shift is None else shift.view(view))
        # The conv may fuse product and sum (FMA): one rounding fewer, so the error is
        # relative to the terms, not to a result that may cancel. Measured: <= 6e-8 of them.
        terms = product.abs() + (0 if shift is None else shift.abs().view(view))
        assert ((module(x) - expected).abs() <= 1e-6 * terms).all()


def test_depthwise_layout():
    module = build_channel_affine(torch.tensor([2.0, -3.0]), torch.tensor([1.0, 0.5]), 4)
    assert module.groups == 2 and module.kernel_size == (1, 1)
    assert module.weight.shape == (2, 1, 1, 1)


def test_does_not_alias_inputs():
    scale = torch.ones(3)
    module = build_channel_affine(scale, None, 2)
    with torch.no_grad():
        module.weight.mul_(5)
    assert torch.equal(scale, torch.ones(3))


@pytest.mark.parametrize("rank", [0, 1, 6])
def test_rejects_unsupported_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        build_channel_affine(torch.ones(3), None, rank)


def test_rejects_non_vector_scale():
    with pytest.raises(ValueError, match="1-D"):
        build_channel_affine(torch.ones(3, 1), None, 4)
