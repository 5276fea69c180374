"""``fxq.quantize(..., target_sqnr=DB)``: keep the most damaging layers float until the target is met.

1. Rank the int8 layers by ``fxq.sensitivity``'s cheap measure: the output SQNR when the layer
   alone is int8 (one ``fxq.compare`` run plus one float forward per layer).
2. Grow: keep the k worst float, k first predicted from those numbers (their noise powers
   add up), re-quantize (prepare -> calibrate -> convert; fxq's passes do not re-run) and
   measure on held-out batches; grow k until the target is met or the limits are reached.
3. Prune: put each chosen layer back to int8, least damaging first, where the target still holds.

Every trial is bounded (``Target.max_trials``, ``Target.max_float_layers``): when the target
cannot be met, the best model found is kept and an ``fxq.FxqWarning`` says so.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from fxq.calibrate import FxqWarning
from fxq.errors import InvalidInputError
from fxq.passes.base import float_reason
from fxq.report import FloatNode, count_quantized_ops, count_transitions, serialized_bytes
from fxq.requantize import Requantizer, output_sqnr
from fxq.sensitivity import rank_layers, row_nodes
from fxq.tensors import clone_inputs


@dataclass(frozen=True)
class Target:
    """What ``fxq.quantize(..., target=...)`` must reach: an output SQNR (dB) on held-out
    batches, and/or ``accuracy_fn(qmodel) >= accuracy``; within these limits.

    Example::

        fxq.quantize(model, example_inputs, batches, target=fxq.Target(sqnr=30, max_float_layers=4))
        fxq.quantize(model, example_inputs, batches,
                     target=fxq.Target(accuracy_fn=lambda q: top1(q, val_loader), accuracy=0.70))
    """

    sqnr: Optional[float] = None
    accuracy_fn: Optional[Callable[[nn.Module], float]] = None
    accuracy: Optional[float] = None
    max_float_layers: int = 16
    max_trials: int = 16

    def __post_init__(self):
        if self.sqnr is None and self.accuracy_fn is None:
            raise InvalidInputError("fxq.Target needs sqnr=DB, or accuracy_fn= with accuracy=")
        if (self.accuracy_fn is None) != (self.accuracy is None):
            raise InvalidInputError("fxq.Target: give accuracy_fn and accuracy together (accuracy_fn(qmodel) "
                                    "must reach accuracy)")
        if self.max_float_layers < 1 or self.max_trials < 1:
            raise InvalidInputError("fxq.Target: max_float_layers and max_trials must be at least 1")

    def describe(self) -> str:
        parts = [f"output SQNR >= {self.sqnr:g} dB"] if self.sqnr is not None else []
        return " and ".join(parts + ([f"accuracy_fn >= {self.accuracy:g}"] if self.accuracy_fn else []))


def as_target(target_sqnr: Optional[float], target: Optional[Target]) -> Optional[Target]:
    if target_sqnr is not None and target is not None:
        raise InvalidInputError("fxq.quantize: give target_sqnr or target=fxq.Target(...), not both")
    return Target(sqnr=float(target_sqnr)) if target_sqnr is not None else target


@dataclass
class FallbackRecord:
    """What the auto-fallback did; ``fxq.report(qmodel).fallback``."""

    target: str
    met: bool = False
    sqnr_before: float = math.nan
    sqnr_after: float = math.nan
    accuracy_before: Optional[float] = None
    accuracy_after: Optional[float] = None
    #: layer ("unit:node", as fxq.compare names it) -> why it was kept float
    kept_float: dict[str, str] = field(default_factory=dict)
    trials: int = 0
    held_out_batches: int = 0
    #: median latency (s) on example_inputs: fp32, int8 before and after the fallback
    latency_fp32: float = math.nan
    latency_before: float = math.nan
    latency_after: float = math.nan

    def __str__(self) -> str:
        status = "met" if self.met else "NOT met (best model found kept)"
        lines = [f"  target {self.target}: {status} after {self.trials} re-quantization(s)",
                 f"    output SQNR on {self.held_out_batches} held-out batch(es): {self.sqnr_before:.1f} dB -> "
                 f"{self.sqnr_after:.1f} dB"]
        if self.accuracy_before is not None:
            lines.append(f"    accuracy_fn: {self.accuracy_before:.4g} -> {self.accuracy_after:.4g}")
        lines.append(f"    speed vs fp32: {self.latency_fp32 / self.latency_before:.2f}x -> "
                     f"{self.latency_fp32 / self.latency_after:.2f}x")
        lines.append(f"    layers kept float for the target: {len(self.kept_float)}")
        lines.extend(f"      {node}: {reason}" for node, reason in self.kept_float.items())
        return "\n".join(lines)


def meet_target(target: Target, model: nn.Module, qmodel: nn.Module, example_inputs: tuple, batches: list,
                held_out: list, backend) -> FallbackRecord:
    """Re-quantize ``qmodel`` (in place) with the fewest layers float that meet ``target``.

    ``batches`` (a list: it is replayed for every trial) calibrate, ``held_out`` measure.
    """
    start = time.perf_counter()
    record = FallbackRecord(target.describe(), held_out_batches=len(held_out))
    search = _Search(target, model, qmodel, Requantizer(model, qmodel, example_inputs, batches, backend), held_out)
    before = search.baseline
    record.latency_before = median_latency(qmodel, example_inputs)
    best = before if search.met(before) else search.prune(search.grow())
    search.requantizer.install(best.graphs, best.converted)
    record.met, record.trials = search.met(best), search.trials
    record.sqnr_before, record.sqnr_after = before.sqnr, best.sqnr
    record.accuracy_before, record.accuracy_after = before.accuracy, best.accuracy
    record.kept_float = {search.label(index): next(iter(search.floats(index).values())) for index in best.chosen}
    record.latency_fp32, record.latency_after = median_latency(model, example_inputs), median_latency(qmodel, example_inputs)
    if not record.met:
        warnings.warn(f"fxq.quantize: target {record.target} not met: best {best.sqnr:.1f} dB output SQNR with "
                      f"{len(best.chosen)} layer(s) float after {search.trials} trial(s); keeping that model. Raise "
                      "fxq.Target(max_float_layers=..., max_trials=...) or lower the target", FxqWarning, stacklevel=3)
    _refresh_report(qmodel, best.converted, record, time.perf_counter() - start)
    return record


@dataclass
class _Trial:
    chosen: tuple[int, ...]  # indices into the ranking
    graphs: dict
    converted: dict
    sqnr: float
    accuracy: Optional[float]


class _Search:
    """Trials of float sets (prefixes of the ranking and their subsets), cached and counted."""

    def __init__(self, target: Target, model: nn.Module, qmodel: nn.Module, requantizer: Requantizer, held_out: list):
        self.target, self.model, self.qmodel, self.requantizer = target, model, qmodel, requantizer
        self.held_out, self.trials, self.ranking = held_out, 0, None
        with torch.no_grad():
            self.reference = [model(*clone_inputs(batch)) for batch in held_out]
        converted = {path: qmodel.model if path == "" else qmodel.model.get_submodule(path)
                     for path in qmodel.float_graphs}
        self.baseline = self._measured((), dict(qmodel.float_graphs), converted)
        self.cache = {(): self.baseline}

    def met(self, trial: _Trial) -> bool:
        sqnr_ok = self.target.sqnr is None or trial.sqnr >= self.target.sqnr
        return sqnr_ok and (self.target.accuracy_fn is None or trial.accuracy >= self.target.accuracy)

    def _key(self, trial: _Trial) -> tuple:
        return self.met(trial), trial.accuracy if trial.accuracy is not None else 0.0, trial.sqnr, -len(trial.chosen)

    def floats(self, index: int) -> dict:
        row = self.ranking[index]
        reason = (f"target {self.target.describe()}: the output SQNR is {row['alone_sqnr']:.1f} dB with only this "
                  f"layer int8 (damage rank {index + 1})")
        return {key: reason for key in self.keys[index]}

    def label(self, index: int) -> str:
        row = self.ranking[index]
        return f"{row['unit'] + ':' if row['unit'] else ''}{row['node']}"

    def trial(self, chosen: tuple[int, ...]) -> _Trial:
        if chosen not in self.cache:
            floats = {key: reason for index in chosen for key, reason in self.floats(index).items()}
            graphs, converted = self.requantizer.build(floats)
            self.trials += 1
            self.cache[chosen] = self._measured(chosen, graphs, converted)
        return self.cache[chosen]

    def _measured(self, chosen: tuple, graphs: dict, converted: dict) -> _Trial:
        self.requantizer.install(graphs, converted)
        sqnr = output_sqnr(self.model, self.qmodel, self.held_out, self.reference)
        accuracy = self.target.accuracy_fn(self.qmodel) if self.target.accuracy_fn else None
        return _Trial(chosen, graphs, converted, sqnr, accuracy)

    def grow(self) -> _Trial:
        """Keep the k most damaging layers float, k growing by half until the target is met."""
        self.ranking = rank_layers(self.model, self.qmodel, self.held_out[0])
        self.keys = [row_nodes(self.qmodel, row) for row in self.ranking]
        limit = min(self.target.max_float_layers, len(self.ranking))
        best, count = self.baseline, min(self._predicted_count(), limit)
        while count and self.trials < self.target.max_trials:
            trial = self.trial(tuple(range(count)))
            best = max(best, trial, key=self._key)
            if self.met(trial) or count >= limit:
                break
            count = min(limit, count + max(1, count // 2))
        return best

    def _predicted_count(self) -> int:
        """How many of the worst layers must go float if their noise powers simply added up."""
        if self.target.sqnr is None:
            return 1
        noise = 10 ** (-self.baseline.sqnr / 10)
        for count, row in enumerate(self.ranking, start=1):
            noise -= 10 ** (-row["alone_sqnr"] / 10) if not math.isnan(row["alone_sqnr"]) else 0.0
            if noise <= 10 ** (-self.target.sqnr / 10):
                return count
        return len(self.ranking)

    def prune(self, best: _Trial) -> _Trial:
        """Put chosen layers back to int8, least damaging first, where the target still holds."""
        if not self.met(best):
            return best
        for index in reversed(best.chosen):
            if self.trials >= self.target.max_trials:
                break
            trial = self.trial(tuple(i for i in best.chosen if i != index))
            if self.met(trial):
                best = trial
        return best


def median_latency(model: nn.Module, inputs: tuple, runs: int = 10) -> float:
    """Median seconds per call of ``model(*inputs)`` after one warm-up call."""
    with torch.no_grad():
        model(*inputs)
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            model(*inputs)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _refresh_report(qmodel: nn.Module, converted: dict, record: FallbackRecord, seconds: float) -> None:
    """The report describes the model the fallback chose: float nodes, transitions, size."""
    report = qmodel.report
    report.float_nodes = [FloatNode(path, node.name, str(node.target), float_reason(node))
                          for path, gm in qmodel.float_graphs.items() for node in gm.graph.nodes
                          if float_reason(node) is not None and node.op.startswith("call_")]
    transitions = [count_transitions(gm) for gm in converted.values()]
    report.quantize_ops, report.dequantize_ops = sum(q for q, _ in transitions), sum(d for _, d in transitions)
    report.quantized_ops = sum(count_quantized_ops(gm) for gm in converted.values())
    report.int8_bytes = serialized_bytes(qmodel.model)
    report.stage_seconds["target"] = seconds
    report.fallback = record
