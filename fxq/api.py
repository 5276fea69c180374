"""``fxq.quantize``: the whole flow, in the order the data moves.

``rewrite`` (trace, passes, dry run) and ``finish`` (convert, check, report) are the halves
``fxq.prepare_qat`` / ``fxq.convert`` share with it; only prepare and calibrate differ.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from fxq import modes, pipeline, precision, stages, trace
from fxq.backends import Backend, get_backend
from fxq.calibrate import as_args, calibrate, calibration_batches
from fxq.distributed import sync_observers, unwrap_parallel
from fxq.dump import stage_dumper
from fxq.errors import InvalidInputError, QuantizationFailure
from fxq.fallback import Target, as_target, meet_target
from fxq.passes.base import float_reason
from fxq.requantize import split_calibration
from fxq.report import FloatNode, QuantizationReport, count_quantized_ops, count_transitions, serialized_bytes
from fxq.shape_specialize import is_trace_guard
from fxq.tensors import all_finite, clone_inputs


class QuantizedModel(nn.Module):
    """The int8 model ``fxq.quantize`` returns: called exactly like the original model."""

    def __init__(self, model: nn.Module, signature: inspect.Signature, engine: Optional[str],
                 report: QuantizationReport, bind_by_signature: bool, float_graphs: Optional[dict] = None):
        super().__init__()
        self.model = model
        self.signature = signature
        self.engine = engine
        self.report = report
        self.bind_by_signature = bind_by_signature
        #: unit path -> the float GraphModule that was quantized (after fxq's passes); fxq.compare reads it
        self.float_graphs = float_graphs or {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with stages.quantized_engine(self.engine):
            return call_traced(self.model, self.signature, self.bind_by_signature, args, kwargs, "int8 model")


def call_traced(model: nn.Module, signature: inspect.Signature, bind_by_signature: bool,
                args: tuple, kwargs: dict, kind: str) -> Any:
    """Call a model fxq traced exactly like the user's original (``kind`` names it in errors)."""
    if bind_by_signature and kwargs:
        # torch.fx may rename traced parameters (embed -> embed_1); bind by the original names.
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        args, kwargs = bound.args, bound.kwargs
    try:
        return model(*args, **kwargs)
    except AssertionError as error:
        if not is_trace_guard(error):
            raise
        raise InvalidInputError(f"this {kind} was traced for other arguments: {error}") from None


def quantize(model: nn.Module, example_inputs: Any, calibration_data: Optional[Iterable] = None,
             backend: Any = "x86", dump_dir: Optional[str] = None, mode: str = modes.DEFAULT_MODE,
             target_sqnr: Optional[float] = None, target: Optional[Target] = None) -> QuantizedModel:
    """Quantize ``model`` to int8 (post-training quantization).

    ``example_inputs`` is a tuple of positional arguments (a single tensor is accepted);
    ``calibration_data`` an iterable of batches, each a tuple of positional arguments or a
    tensor. The model itself is never modified. With ``dump_dir``, every stage (traced, each
    pass, prepared, converted) is drawn there as DOT + offline HTML, linked from index.html.
    With ``target_sqnr`` (dB) or ``target=fxq.Target(...)``, the most damaging layers are kept
    float until the output SQNR on held-out calibration batches meets it (see docs/inspect.md).
    ``mode``: "static" (every int8 range calibrated), "dynamic" (Linear and recurrent layers
    only, activation ranges measured at run time) or "auto" (per layer; see docs/modes.md).

    Example::

        model = torchvision.models.resnet18().eval()
        qmodel = fxq.quantize(model, torch.randn(1, 3, 224, 224), calibration_data=batches)
        print(fxq.report(qmodel))
        qmodel = fxq.quantize(model, example_inputs, batches, target_sqnr=30)   # fewest float layers
        seq_model = fxq.quantize(lipreader, clip, calibration_data=clips, mode="auto")  # dynamic GRU
    """
    model = unwrap_parallel(model)  # a DDP-wrapped model: quantize what it wraps
    backend, mode = get_backend(backend), modes.check_mode(mode)
    example_inputs, target = check_inputs(model, example_inputs), as_target(target_sqnr, target)
    # a target needs replayable calibration data and held-out batches to measure on
    batches, held_out = (split_calibration(calibration_data, example_inputs) if target is not None
                         else (calibration_data, None))
    if mode == "dynamic" and batches is None:
        batches = [example_inputs]  # nothing static to calibrate: no "calibrating on example_inputs" warning
    dump = stage_dumper(dump_dir)
    rewritten = rewrite(model, example_inputs, backend, mode, dump)
    candidates = precision.candidates(backend, mode)
    with _timed(rewritten.timings, "calibrate"):
        scoring, calibration = precision.hold_out(model, calibration_batches(batches, example_inputs), len(candidates))
    if len(candidates) > 1 and not scoring:
        rewritten.notes.append(precision.not_chosen(backend))
    # the backend's precision splits (x86 without VNNI has two), all calibrated in one pass,
    # when there are held-out batches to choose by
    splits = [rewritten] + [dataclasses.replace(rewritten, working=copy.deepcopy(rewritten.working), backend=other)
                            for other in (candidates[1:] if scoring else ())]
    with stages.quantized_engine(backend.engine):
        prepared = [prepare_units(split) for split in splits]
        with _timed(rewritten.timings, "calibrate"):
            fan_out = precision.CalibrationFanOut([root for _, root in prepared])
            calibrate(fan_out, calibration)
            sync_observers(fan_out)  # under torch.distributed: every rank's data, the same int8 model
            chosen = _choose_split(splits, [units for units, _ in prepared], scoring)
        dump.prepared(prepared[chosen][0], rewritten.plan.units)
    qmodel = finish(splits[chosen], splits[chosen].working, prepared[chosen][0], dump)
    if target is not None:  # keep the most damaging layers float until the target is met
        meet_target(target, model, qmodel, example_inputs, batches, held_out, splits[chosen].backend)
    return qmodel


def _choose_split(splits: list[Rewritten], prepared: list[dict[str, nn.Module]], kept: list) -> int:
    """Index of the precision split whose int8 output is closest to float on the ``kept``
    calibration batches; the choice goes into the report (see ``fxq.precision``)."""
    if len(splits) == 1:
        return 0
    scores = []
    for split, units in zip(splits, prepared):
        # convert mutates what it converts: score copies, convert the chosen one for real later
        converted = {path: stages.convert_unit(copy.deepcopy(unit), split.backend) for path, unit in units.items()}
        root = _install(copy.deepcopy(split.working), converted)
        scores.append(precision.score(root, stages.quantized_engine(split.backend.engine), kept))
    chosen = precision.pick(scores)
    splits[chosen].notes.append(precision.describe([split.backend for split in splits], scores, chosen))
    return chosen


@dataclass
class Rewritten:
    """A model traced and rewritten for int8, its float nodes settled: ready to prepare."""

    working: nn.Module  # the deep copy of the user's model that the units are installed into
    plan: trace.CapturePlan  # its units' graph modules are the rewritten float graphs
    backend: Backend
    example_inputs: tuple
    pass_records: dict
    notes: list[str]
    timings: dict[str, float]
    signature: inspect.Signature  # the user's forward, to bind keyword arguments by
    fp32_bytes: int


def rewrite(model: nn.Module, example_inputs: tuple, backend: Backend, mode: str, dump,
            qat: bool = False) -> Rewritten:
    """Trace a deep copy of ``model``, run the pass list (the QAT one with ``qat``), then the dry
    run that keeps float whatever has no working int8 kernel."""
    timings: dict[str, float] = {}
    working = copy.deepcopy(model).eval()  # the user's model is never touched
    with _timed(timings, "trace"):
        plan = trace.plan_units(working, example_inputs)
    if not plan.units:
        raise QuantizationFailure(f"nothing in {type(model).__name__} could be traced: {plan.float_parts}")
    pass_records = {}
    with _timed(timings, "passes"):
        for unit in plan.units:
            unit.graph_module, pass_records[unit.path] = pipeline.run_passes(
                unit.graph_module, unit.example_inputs, backend, on_stage=dump.pass_observer(unit.path),
                mode=mode, qat=qat)
    notes: list[str] = []
    with stages.quantized_engine(backend.engine), _timed(timings, "fallback"):
        for unit in plan.units:
            unit.graph_module, unit_notes = stages.settle_float_nodes(unit.graph_module, unit.example_inputs, backend)
            notes.extend(unit_notes)
    return Rewritten(working, plan, backend, example_inputs, pass_records, notes, timings,
                     inspect.signature(model.forward), serialized_bytes(model))


def prepare_units(rewritten: Rewritten, qat: bool = False) -> tuple[dict[str, nn.Module], nn.Module]:
    """Each unit prepared (observers, or fake quantizers with ``qat``) and installed: (units, root)."""
    with _timed(rewritten.timings, "prepare"):
        prepared = {unit.path: stages.prepare_unit(unit.graph_module, unit.example_inputs, rewritten.backend, qat=qat)
                    for unit in rewritten.plan.units}
        return prepared, _install(rewritten.working, prepared)


def finish(rewritten: Rewritten, working: nn.Module, prepared: dict[str, nn.Module], dump,
           keep_float_graphs: bool = True) -> QuantizedModel:
    """Convert the ``prepared`` units (installed in ``working``), check the int8 output, and
    build the report and the QuantizedModel."""
    backend, plan, timings = rewritten.backend, rewritten.plan, rewritten.timings
    with stages.quantized_engine(backend.engine):
        with _timed(timings, "convert"):
            converted = {path: stages.convert_unit(p, backend) for path, p in prepared.items()}
            root = _install(working, converted)
        _check_output(root, rewritten.example_inputs)
        dump.converted(converted, plan.units)
    dump.finish()
    report = _build_report(backend.name, plan, converted, rewritten.pass_records, timings, rewritten.notes)
    report.fp32_bytes, report.int8_bytes = rewritten.fp32_bytes, serialized_bytes(root)
    report.precision = backend.precision
    float_graphs = {unit.path: unit.graph_module for unit in plan.units} if keep_float_graphs else {}
    return QuantizedModel(root, rewritten.signature, backend.engine, report, bind_by_signature="" in converted,
                          float_graphs=float_graphs)


def check_inputs(model: Any, example_inputs: Any, caller: str = "fxq.quantize") -> tuple:
    """``example_inputs`` as a tuple of positional arguments, checked to run through ``model``."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"{caller} needs a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise InvalidInputError(f"{caller} needs example_inputs: a tuple of the model's positional arguments")
    example_inputs = as_args(example_inputs)
    try:
        with torch.no_grad():
            copy.deepcopy(model).eval()(*clone_inputs(example_inputs))
    except Exception as error:
        raise InvalidInputError(f"example_inputs do not run through {type(model).__name__}: "
                                f"{type(error).__name__}: {error}. Pass the positional arguments of one forward call "
                                "as a tuple, e.g. (torch.randn(1, 3, 224, 224),)") from error
    return example_inputs


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def _install(working: nn.Module, unit_modules: dict[str, nn.Module]) -> nn.Module:
    """Put each unit's module at its path; the root unit ("") replaces the model itself."""
    if "" in unit_modules:
        return unit_modules[""]
    for path, module in unit_modules.items():
        parent_path, _, name = path.rpartition(".")
        setattr(working.get_submodule(parent_path), name, module)
    return working


def _check_output(root: nn.Module, example_inputs: tuple) -> None:
    with torch.no_grad():
        output = root(*clone_inputs(example_inputs))
    if not all_finite(output):
        raise QuantizationFailure("the int8 model produced NaN/Inf on example_inputs after calibration; "
                                  "check calibration_data for outliers, or keep the offending layers float")


def _build_report(backend_name, plan, converted, pass_records, timings, notes) -> QuantizationReport:
    notes = [f"{path}: traced for its example input shape, guarded at run time (it computes on x.shape: {error})"
             for path, error in plan.specialized.items()] + notes
    report = QuantizationReport(backend=backend_name, passes=pass_records, float_parts=dict(plan.float_parts),
                                stage_seconds=timings, notes=notes)
    for unit in plan.units:
        for node in unit.graph_module.graph.nodes:
            reason = float_reason(node)
            if reason is not None and node.op in ("call_module", "call_function", "call_method"):
                report.float_nodes.append(FloatNode(unit.path, node.name, str(node.target), reason))
    for gm in converted.values():
        q, dq = count_transitions(gm)
        report.quantize_ops += q
        report.dequantize_ops += dq
        report.quantized_ops += count_quantized_ops(gm)
    return report
