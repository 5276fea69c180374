"""Observer statistics merged over torch.distributed ranks, so every rank converts the same int8 model.

Each rank calibrates (or trains, for QAT) on its own batches, so its observers know only its
share of the data. Plain DDP does not help: under ``no_grad`` it syncs no buffers, and in
training it broadcasts rank 0's buffers, observers included, before every forward, so the
other ranks' statistics are overwritten, not merged. :func:`sync_observers` merges them:

=================================  ==========================================  ==================================
observer                           merged as                                   vs. one process on all the data
=================================  ==========================================  ==================================
MinMax, PerChannelMinMax           MIN of ``min_val``, MAX of ``max_val``      identical
MovingAverage(PerChannel)MinMax    mean over ranks of the running min/max      close, equal only in special cases
Histogram (and NBitHistogram)      union range; each rank's histogram          equal up to re-binning error
                                   re-binned onto it, counts summed
BatchNorm running mean/var         mean over ranks                             (they fold into the int8 weights)
=================================  ==========================================  ==================================

Whatever the model size, that is three collective calls: an all_gather of the names (to fail
clearly when ranks hold different models), one MIN all_reduce (ranges, and whether the ranks
already agree) and one SUM all_reduce (means and histograms). docs/modes.md has the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from fxq import quant
from fxq.errors import DistributedError

MINMAX, MOVING_AVERAGE, HISTOGRAM, BATCHNORM = "minmax", "moving_average", "histogram", "batchnorm"
_SAME_MODEL = "every rank must quantize the same model with the same example_inputs and options"


@dataclass
class _Tracked:
    """One module with statistics to merge, and what the ranks agreed on for it."""

    name: str
    module: nn.Module
    kind: str
    channels: int = 1  # length of min_val once initialized (1 for a per-tensor observer)
    low: Optional[torch.Tensor] = None  # the union range over ranks
    high: Optional[torch.Tensor] = None
    ranks_agree: bool = False  # every rank already holds the same statistics: leave them


def sync_observers(module: nn.Module) -> int:
    """Merge every observer's statistics over the torch.distributed ranks; return how many.

    Call it on every rank, after calibration and before convert (``fxq.quantize`` does, and so
    do ``fxq.freeze_observers`` and ``fxq.convert`` for QAT): every rank then computes the same
    qparams. Observers inside FakeQuantize modules are merged too, and the FakeQuantize's
    scale/zero_point recomputed. Batch-norm running statistics, which each rank updates from
    its own batches and which fold into the int8 weights, are averaged. Whatever already agrees
    on every rank is left as it is, so a second call changes nothing. Without an initialized
    process group of two or more ranks it does nothing and returns 0. Raises
    :class:`fxq.DistributedError` when the ranks' models hold different observers.

    Example::

        dist.init_process_group("gloo")
        prepared = prepare_fx(model, qconfig_mapping, example_inputs)  # the same on every rank
        for batch in this_ranks_batches:
            prepared(batch)
        fxq.sync_observers(prepared)         # every rank: the ranges of all ranks' batches
    """
    if not _several_ranks():
        return 0
    tracked = _tracked_modules(module)
    _check_same_modules(tracked)
    _agree_on_ranges(tracked)
    _merge_statistics([entry for entry in tracked if not entry.ranks_agree])
    _refresh_fake_quantizers(module)
    return sum(entry.kind != BATCHNORM for entry in tracked)


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or ``model``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _kind(module: nn.Module) -> Optional[str]:
    # Moving averages first: they subclass the plain min/max observers.
    if isinstance(module, (quant.MovingAverageMinMaxObserver, quant.MovingAveragePerChannelMinMaxObserver)):
        return MOVING_AVERAGE
    if isinstance(module, (quant.MinMaxObserver, quant.PerChannelMinMaxObserver)):
        return MINMAX
    if isinstance(module, quant.HistogramObserver):
        return HISTOGRAM
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
        return BATCHNORM
    return None


def _tracked_modules(module: nn.Module) -> list[_Tracked]:
    """Observers and batch norms with statistics, by sorted name (the order every rank reduces in).

    Observers without statistics (placeholders of dynamic layers, the fixed ranges of
    sigmoid/softmax) need nothing; an unknown observer with a range is an error, not a skip.
    """
    tracked = []
    for name, child in sorted(module.named_modules(), key=lambda item: item[0]):
        kind = _kind(child)
        if kind is None and isinstance(child, quant.ObserverBase) and hasattr(child, "min_val"):
            raise DistributedError(f"fxq.sync_observers does not know how to merge observer {name!r} of type "
                                   f"{type(child).__name__} over ranks; use a MinMax, MovingAverage or "
                                   "Histogram observer")
        if kind is not None:
            tracked.append(_Tracked(name, child, kind))
    return tracked


def _length(entry: _Tracked) -> int:
    return entry.module.running_mean.numel() if entry.kind == BATCHNORM else entry.module.min_val.numel()


def _check_same_modules(tracked: list[_Tracked]) -> None:
    """Fail on every rank alike when the ranks' observers differ, naming the first difference."""
    manifest = [(entry.name, type(entry.module).__name__, _length(entry)) for entry in tracked]
    manifests: list = [None] * dist.get_world_size()
    dist.all_gather_object(manifests, manifest)
    reference = [(name, kind) for name, kind, _ in manifests[0]]
    for rank, other in enumerate(manifests[1:], start=1):
        mismatch = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b[:2]), None)
        if mismatch is not None:
            raise DistributedError(f"rank {rank} has {other[mismatch][0]!r} ({other[mismatch][1]}) where rank 0 "
                                   f"has {reference[mismatch][0]!r} ({reference[mismatch][1]}): {_SAME_MODEL}")
        if len(other) != len(reference):
            raise DistributedError(f"rank {rank} has {len(other)} observers and batch norms, rank 0 has "
                                   f"{len(reference)}: {_SAME_MODEL}")
    for index, entry in enumerate(tracked):
        lengths = {m[index][2] for m in manifests} - {0}  # 0: a per-channel observer that saw no data
        if len(lengths) > 1:
            raise DistributedError(f"{entry.name!r} has {sorted(lengths)} channels on different ranks: {_SAME_MODEL}")
        entry.channels = lengths.pop() if lengths else 1


def _agree_on_ranges(tracked: list[_Tracked]) -> None:
    """One MIN all_reduce of (x, -x) for every statistic: its minimum and maximum over ranks.

    The minimum of min_val and the maximum of max_val are the union range; where minimum and
    maximum coincide for every statistic, the ranks already agree.
    """
    statistics = [_statistics(entry) for entry in tracked]
    probes = [torch.cat([torch.cat([s, -s]) for s in entry_statistics]) for entry_statistics in statistics]
    for entry, entry_statistics, reduced in zip(tracked, statistics, _all_reduce(probes, dist.ReduceOp.MIN)):
        # per statistic: (minimum over ranks, -maximum over ranks)
        extremes = [chunk.chunk(2) for chunk in reduced.split([2 * s.numel() for s in entry_statistics])]
        entry.low, entry.high = extremes[0][0], -extremes[1][1]
        entry.ranks_agree = all(torch.equal(smallest, -negated_largest) for smallest, negated_largest in extremes)


def _statistics(entry: _Tracked) -> list[torch.Tensor]:
    """min_val, max_val as vectors of ``channels``, and the histogram. An observer that saw no
    data has min_val +inf and max_val -inf, which neither MIN nor MAX ever picks."""
    module = entry.module
    if entry.kind == BATCHNORM:
        return [module.running_mean.detach(), module.running_var.detach()]
    if _initialized(module):
        low, high = module.min_val.detach().reshape(-1), module.max_val.detach().reshape(-1)
    else:
        low = torch.full((entry.channels,), float("inf"), device=module.min_val.device)
        high = -low
    return [low, high] + ([module.histogram.detach()] if entry.kind == HISTOGRAM else [])


def _initialized(observer: nn.Module) -> bool:
    return observer.min_val.numel() > 0 and bool(torch.isfinite(observer.min_val).all())


def _merge_statistics(pending: list[_Tracked]) -> None:
    """Write the union range into min/max observers; one SUM all_reduce for the rest."""
    contributions = [_contribution(entry) for entry in pending]
    for entry, total in zip(pending, _all_reduce(contributions, dist.ReduceOp.SUM)):
        channels = entry.channels
        if entry.kind == BATCHNORM:
            mean_over_ranks = total / dist.get_world_size()
            entry.module.running_mean.copy_(mean_over_ranks[:channels])
            entry.module.running_var.copy_(mean_over_ranks[channels:])
        elif entry.kind == MOVING_AVERAGE:
            ranks_with_data = total[-1]
            _assign_range(entry, total[:channels] / ranks_with_data, total[channels:-1] / ranks_with_data)
        else:
            _assign_range(entry, entry.low, entry.high)
        if entry.kind == HISTOGRAM:
            entry.module.histogram.copy_(total)


def _contribution(entry: _Tracked) -> torch.Tensor:
    """This rank's share of the SUM: (min, max, 1) of a moving average, a histogram on the
    union range, (mean, var) of a batch norm; zeros where an observer saw no data, so it does
    not drag the mean to 0."""
    module = entry.module
    if entry.kind == BATCHNORM:
        return torch.cat([module.running_mean.detach(), module.running_var.detach()])
    if entry.kind == MOVING_AVERAGE:
        if not _initialized(module):
            return torch.zeros(2 * entry.channels + 1, device=module.min_val.device)
        one = torch.ones(1, device=module.min_val.device)
        return torch.cat([module.min_val.detach().reshape(-1), module.max_val.detach().reshape(-1), one])
    if entry.kind == HISTOGRAM:
        if not _initialized(module):
            return torch.zeros_like(module.histogram)
        dtype = module.min_val.dtype
        return quant.rebin_histogram(module, entry.low.reshape(()).to(dtype), entry.high.reshape(()).to(dtype))
    return torch.zeros(0, device=module.min_val.device)  # min/max: the range says it all


def _assign_range(entry: _Tracked, low: torch.Tensor, high: torch.Tensor) -> None:
    # In place: DDP keeps references to the module's buffers for its broadcasts.
    per_channel = isinstance(entry.module, quant.PerChannelMinMaxObserver)
    shape = (entry.channels,) if per_channel else ()
    entry.module.min_val.resize_(shape).copy_(low.reshape(shape))
    entry.module.max_val.resize_(shape).copy_(high.reshape(shape))


def _all_reduce(parts: list[torch.Tensor], op) -> list[torch.Tensor]:
    """All ``parts`` reduced in one collective (float64: exact for float32 values, and sums of
    fractional histogram counts stay the same on every rank)."""
    sizes = [part.numel() for part in parts]
    if sum(sizes) == 0:  # the same on every rank: the layouts were agreed on
        return [part.double() for part in parts]
    flat = torch.cat([part.reshape(-1).double() for part in parts])
    dist.all_reduce(flat, op)
    return list(flat.split(sizes))


def _refresh_fake_quantizers(module: nn.Module) -> None:
    """A FakeQuantize caches scale/zero_point from its observer's last forward: recompute them."""
    for fake_quant in module.modules():
        if not isinstance(fake_quant, quant.FakeQuantizeBase) or not hasattr(fake_quant, "scale"):
            continue
        observer = getattr(fake_quant, "activation_post_process", None)
        if observer is None or _kind(observer) not in (MINMAX, MOVING_AVERAGE, HISTOGRAM) or not _initialized(observer):
            continue
        with quant.quiet():
            scale, zero_point = fake_quant.calculate_qparams()
        fake_quant.scale.resize_(scale.shape).copy_(scale)
        fake_quant.zero_point.resize_(zero_point.shape).copy_(zero_point)
