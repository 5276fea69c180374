"""What happened during ``fxq.quantize``: passes, float regions and why, transitions, timing."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxq.errors import InvalidInputError


@dataclass
class PassRecord:
    name: str
    modified: bool
    changes: list[str]
    seconds: float


@dataclass
class FloatNode:
    """A node (or module) that runs in float in the quantized model, and why."""

    unit: str
    node: str
    target: str
    reason: str


@dataclass
class QuantizationReport:
    """Returned by :func:`fxq.report`; ``print`` it for a readable summary."""

    backend: str
    #: the activation x weight bits of the int8 model, e.g. "8-bit activations x 7-bit weights"
    precision: str = ""
    passes: dict[str, list[PassRecord]] = field(default_factory=dict)
    float_nodes: list[FloatNode] = field(default_factory=list)
    float_parts: dict[str, str] = field(default_factory=dict)
    quantize_ops: int = 0
    dequantize_ops: int = 0
    quantized_ops: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: size of the serialized state_dict (torch.save) of the float model and of the int8 model
    fp32_bytes: int = 0
    int8_bytes: int = 0
    #: what ``fxq.quantize(..., target_sqnr=...)`` kept float to meet its target (fxq.fallback.FallbackRecord)
    fallback: Optional[Any] = None

    @property
    def transitions(self) -> int:
        """quantize + dequantize ops executed per forward (model entry and exit included)."""
        return self.quantize_ops + self.dequantize_ops

    def __str__(self) -> str:
        precision = f", {self.precision}" if self.precision else ""
        lines = [f"fxq quantization report (backend {self.backend}{precision})"]
        lines.append(f"  int8 ops: {self.quantized_ops}   float ops: {len(self.float_nodes)}   "
                     f"Q/DQ transitions: {self.quantize_ops} quantize + {self.dequantize_ops} dequantize")
        if self.fp32_bytes and self.int8_bytes:
            lines.append(f"  model size: fp32 {_megabytes(self.fp32_bytes)} -> int8 {_megabytes(self.int8_bytes)} "
                         f"({self.fp32_bytes / self.int8_bytes:.2f}x smaller)")
        lines.append("  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.stage_seconds.items()))
        for unit, records in self.passes.items():
            prefix = f"[{unit}] " if unit else ""
            lines.append(f"  {prefix}passes:")
            for record in records:
                status = f"{len(record.changes)} change(s)" if record.modified else "no change"
                lines.append(f"    {record.name:<28} {status:<14} {record.seconds * 1000:7.1f} ms")
                lines.extend(f"      - {change}" for change in record.changes[:8])
                if len(record.changes) > 8:
                    lines.append(f"      ... {len(record.changes) - 8} more")
        if self.float_parts:
            lines.append("  parts kept float (not traceable):")
            lines.extend(f"    {path}: {reason}" for path, reason in self.float_parts.items())
        if self.float_nodes:
            lines.append("  nodes kept float:")
            lines.extend(f"    {n.unit + ':' if n.unit else ''}{n.node} ({n.target}): {n.reason}" for n in self.float_nodes)
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.fallback is not None:
            lines.append(str(self.fallback))
        return "\n".join(lines)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def serialized_bytes(module: nn.Module) -> int:
    """Bytes ``torch.save(module.state_dict())`` writes: weights (packed int8 included) and buffers."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


def count_transitions(gm: fx.GraphModule) -> tuple[int, int]:
    """(quantize, dequantize) op counts in a converted graph."""
    quantize = dequantize = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.quantize_per_tensor, torch.quantize_per_channel,
                                                          torch.quantize_per_tensor_dynamic):
            quantize += 1
        elif (node.op == "call_method" and node.target == "dequantize") or (
                node.op == "call_function" and node.target is torch.dequantize):
            dequantize += 1
    return quantize, dequantize


def count_quantized_ops(gm: fx.GraphModule) -> int:
    """Module calls whose module is a torch quantized module, plus quantized function calls."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module_path = type(gm.get_submodule(node.target)).__module__
            count += module_path.startswith("torch.ao.nn.quantized") or module_path.startswith("torch.ao.nn.intrinsic.quantized")
        elif node.op == "call_function" and "quantized" in str(getattr(node.target, "__module__", "") or node.target):
            count += 1
    return count


def report(qmodel: nn.Module) -> QuantizationReport:
    """The report of the ``fxq.quantize`` call that produced ``qmodel``.

    Example::

        qmodel = fxq.quantize(model, example_inputs)
        print(fxq.report(qmodel))
    """
    found: Optional[QuantizationReport] = getattr(qmodel, "report", None)
    if not isinstance(found, QuantizationReport):
        raise InvalidInputError(f"{type(qmodel).__name__} was not produced by fxq.quantize: it has no fxq report")
    return found
