"""Measure one model: fp32, plain FX int8 and fxq int8, in this process.

``bench/zoo.py`` runs this once per model in a fresh subprocess (so a crash, a hang or a
leaked thread setting cannot spoil the next model)::

    python -m bench.measure resnet18 classification '{"image_size": 224}' out.json
"""
from __future__ import annotations

import collections
import io
import json
import math
import re
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

import fxq
from fxq.report import count_quantized_ops, count_transitions
from fxq.tensors import all_finite, float_tensors, sqnr_db

from bench.harness import ModelSpec, PlainFxError, parameter_count, plain_fx_int8, prepare_model, random_batches

MAX_PARAMS = 150_000_000
ERROR_CHARS = 300
REASON_CHARS = 110

# fxq.quantize's steps, by the function its failure was raised under (see fxq/api.py).
FXQ_STAGE_OF_FUNCTION = {
    "_check_inputs": "input", "plan_units": "trace", "run_passes": "passes",
    "settle_float_nodes": "fallback", "prepare_unit": "prepare", "calibrate": "calibrate",
    "convert_unit": "convert", "_check_output": "run",
}


@dataclass(frozen=True)
class Settings:
    image_size: int = 224
    threads: int = 1
    runs: int = 20               # latency samples per model (fewer if the budget runs out)
    timing_budget_s: float = 60.0
    batch_size: int = 4          # calibration and evaluation batch size (latency is at batch 1)
    calibration_batches: int = 8
    eval_batches: int = 4


def measure(spec: ModelSpec, settings: Settings) -> dict:
    """One JSON-able record: every number the benchmark reports for ``spec``."""
    torch.set_num_threads(settings.threads)
    params = parameter_count(spec)
    record = {"model": spec.name, "family": spec.family, "kind": spec.kind, "params_m": round(params / 1e6, 2),
              "input_shape": list(spec.input_shape(1, settings.image_size)), "settings": asdict(settings)}
    if params > MAX_PARAMS:
        return {**record, "status": "skipped", "reason": f"{params / 1e6:.0f}M parameters > {MAX_PARAMS // 10**6}M"}
    batch = settings.batch_size if spec.family == "classification" or spec.family == "timm" else 1
    model = prepare_model(spec, settings.image_size, batch=max(batch, 2))
    example = random_batches(spec, 1, 1, settings.image_size, seed=2)[0]
    calibration = random_batches(spec, settings.calibration_batches, batch, settings.image_size, seed=3)
    fresh = random_batches(spec, settings.eval_batches, batch, settings.image_size, seed=4)
    reference = _outputs(model, fresh)
    record["fp32_finite"] = all_finite(reference)
    plain_model, record["plain"] = _run_tool(lambda: plain_fx_int8(model, example, calibration), fresh, reference)
    fxq_model, record["fxq"] = _run_tool(lambda: fxq.quantize(model, example, calibration_data=calibration),
                                         fresh, reference)
    if fxq_model is not None:
        record["fxq"].update(_fxq_report(fxq_model))
    models = {"fp32": model, "plain": plain_model, "fxq": fxq_model}
    latency, runs = interleaved_latency({k: m for k, m in models.items() if m is not None}, example,
                                        settings.runs, settings.timing_budget_s)
    record["fp32"] = {"latency_ms": latency["fp32"] * 1e3, "size_mb": serialized_mb(model)}
    record["latency_runs"] = runs
    for tool in ("plain", "fxq"):
        if tool in latency:
            record[tool].update(latency_ms=latency[tool] * 1e3, speedup=latency["fp32"] / latency[tool],
                                size_mb=serialized_mb(models[tool]))
    return {**record, "status": "ok"}


def _outputs(model: Callable, batches: list) -> list:
    with torch.no_grad():
        return [model(*inputs) for inputs in batches]


def _run_tool(quantize: Callable[[], nn.Module], fresh: list, reference: list) -> tuple[Optional[nn.Module], dict]:
    """Quantize, then run on fresh inputs; the result says the stage that failed, or "ok"."""
    start = time.perf_counter()
    try:
        qmodel = quantize()
    except Exception as error:
        return None, {"stage": _failed_stage(error), "error": _one_line(error),
                      "quantize_s": time.perf_counter() - start}
    result = {"quantize_s": time.perf_counter() - start, **graph_summary(qmodel)}
    try:
        actual = _outputs(qmodel, fresh)
    except Exception as error:
        return None, {**result, "stage": "run", "error": _one_line(error)}
    finite = all_finite(actual)
    result.update(stage="ok" if finite else "nan", error="" if finite else "output has NaN/Inf on fresh inputs",
                  sqnr_db=_finite_or_none(sqnr_db(reference, actual)), top1_agreement=top1_agreement(reference, actual))
    return qmodel, result


def _failed_stage(error: BaseException) -> str:
    if isinstance(error, PlainFxError):
        return error.stage
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        stage = FXQ_STAGE_OF_FUNCTION.get(frame.name)
        if stage is not None and "/fxq/" in frame.filename.replace("\\", "/"):
            return stage
    return "quantize"


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def top1_agreement(reference: list, actual: list) -> Optional[float]:
    """Share of samples (pixels, for dense outputs) whose argmax over dim 1 is unchanged."""
    agree = total = 0
    for ref, act in zip(reference, actual):
        ref_t, act_t = float_tensors(ref)[0], float_tensors(act)[0]
        if ref_t.dim() < 2:
            return None
        agree += int((ref_t.argmax(1) == act_t.argmax(1)).sum())
        total += ref_t.argmax(1).numel()
    return agree / total if total else None


def graph_summary(model: nn.Module) -> dict:
    """Q/DQ and int8 op counts, and weight modules left float, over the converted graphs."""
    quantize = dequantize = int8_ops = 0
    float_weights: collections.Counter = collections.Counter()
    for gm in _outermost_graph_modules(model):
        q, dq = count_transitions(gm)
        quantize, dequantize, int8_ops = quantize + q, dequantize + dq, int8_ops + count_quantized_ops(gm)
        for node in gm.graph.nodes:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if module is not None and _has_float_weight(module):
                float_weights[type(module).__name__] += 1
    return {"quantize_ops": quantize, "dequantize_ops": dequantize, "int8_ops": int8_ops,
            "float_weight_modules": dict(float_weights.most_common())}


def _outermost_graph_modules(model: nn.Module) -> list[fx.GraphModule]:
    found: list[tuple[str, fx.GraphModule]] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(prefix + ".") or prefix == "" for prefix, _ in found)
        if isinstance(module, fx.GraphModule) and not inside:
            found.append((name, module))
    return [gm for _, gm in found]


def _has_float_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    quantized = type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
    return isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() > 1 and not quantized


def _fxq_report(qmodel: nn.Module) -> dict:
    report = fxq.report(qmodel)
    # Grouped by reason with the numbers masked, so "averages 16 values" and "averages 256 values" count together.
    reasons = collections.Counter(re.sub(r"(?<![A-Za-z0-9])\d+", "#", n.reason)[:REASON_CHARS] for n in report.float_nodes)
    return {"report_quantize_ops": report.quantize_ops, "report_dequantize_ops": report.dequantize_ops,
            "float_nodes": len(report.float_nodes), "float_node_reasons": dict(reasons.most_common(12)),
            "float_parts": dict(report.float_parts), "notes": list(report.notes)[:8],
            "stage_seconds": {k: round(v, 3) for k, v in report.stage_seconds.items()}}


def interleaved_latency(models: dict[str, Callable], inputs: tuple, runs: int,
                        budget_s: float) -> tuple[dict[str, float], int]:
    """Median seconds per batch-1 forward of each model, timed in rotating order in one process."""
    names = list(models)
    with torch.no_grad():
        start = time.perf_counter()
        for name in names:  # warm-up: allocator, prepacking, first-call dispatch
            models[name](*inputs)
        round_s = time.perf_counter() - start
        runs = max(3, min(runs, int(budget_s / max(round_s, 1e-6))))
        samples: dict[str, list[float]] = {name: [] for name in names}
        for index in range(runs):
            for name in names[index % len(names):] + names[:index % len(names)]:
                start = time.perf_counter()
                models[name](*inputs)
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}, runs


def serialized_mb(model: nn.Module) -> Optional[float]:
    """Size of ``torch.save(state_dict)`` (or of the whole model, if that fails) in MB."""
    for payload in (lambda: model.state_dict(), lambda: model):
        buffer = io.BytesIO()
        try:
            torch.save(payload(), buffer)
        except Exception:
            continue
        return buffer.tell() / 1e6
    return None


def main(argv: list[str]) -> int:
    name, family, settings_json, out_path = argv
    record = measure(ModelSpec(name, family), Settings(**json.loads(settings_json)))
    with open(out_path, "w") as out:
        json.dump(record, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
