"""``fxq.quantize(..., dump_dir=PATH)``: one drawing per stage, and an index linking them all.

Stages, per traced unit: ``traced``, then one per pass (its rewritten nodes highlighted),
``prepared`` (observers, with the ranges calibration recorded) and ``converted`` (the int8
graph, shapes, dtypes and scale/zero_point from one run on the example inputs).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx as fx

from fxq import viz, viz_html
from fxq.interpreters import ShapePropagation
from fxq.passes.base import float_reason
from fxq.tensors import clone_inputs


def _signature(gm: fx.GraphModule, node: fx.Node) -> str:
    """What a node computes, enough to tell that a pass rewrote it (args, target, module state)."""
    parts = [node.op, str(node.target), repr(fx.node.map_arg((node.args, node.kwargs), lambda a: f"%{a.name}"))]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        parts.append(repr(module))
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.is_quantized:
            parts.append(f"{float(weight.detach().double().sum()):.10g}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def float_reasons(gm: fx.GraphModule) -> dict[str, str]:
    """node name and module target -> why it runs in float, from a float graph's fxq meta."""
    reasons = {}
    for node in gm.graph.nodes:
        reason = float_reason(node)
        if reason is not None:
            reasons[node.name] = reason
            if node.op == "call_module":
                reasons[str(node.target)] = reason
    return reasons


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "root"


class StageDumper:
    """Writes each stage's DOT and HTML into ``directory`` and, at :meth:`finish`, index.html."""

    def __init__(self, directory: Any):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict[str, Any]] = []
        self._signatures: dict[str, dict[str, str]] = {}

    def pass_observer(self, unit: str):
        """A ``run_passes(on_stage=...)`` callback dumping ``traced`` and every pass of ``unit``."""
        def on_stage(stage: str, gm: fx.GraphModule, record: Any = None) -> None:
            summary = ""
            if record is not None:
                summary = "; ".join(record.changes[:3]) + (" ..." if len(record.changes) > 3 else "") \
                    if record.modified else "no change"
            self.stage(unit, stage, gm, summary=summary, highlight=record is not None and record.modified)
        return on_stage

    def stage(self, unit: str, stage: str, gm: fx.GraphModule, summary: str = "", highlight: bool = False,
              reasons: Optional[dict[str, str]] = None) -> None:
        """Dump one stage; with ``highlight``, nodes that differ from the unit's last dump are marked."""
        signatures = {n.name: _signature(gm, n) for n in gm.graph.nodes}
        previous = self._signatures.get(unit, {})
        changed = {name for name, sig in signatures.items() if previous.get(name) != sig} if highlight else set()
        removed = sorted(set(previous) - set(signatures)) if highlight else []
        self._signatures[unit] = signatures
        index = len(self.entries)
        base = f"{index:02d}_{_slug(unit)}_{_slug(stage)}"
        notes = [summary] if summary else []
        if removed:
            notes.append("removed: " + ", ".join(removed[:20]) + (" ..." if len(removed) > 20 else ""))
        title = f"{stage}" + (f" [{unit}]" if unit else "")
        links = {"index": "index.html"}
        if index:
            links["previous"] = self.entries[-1]["html"]
        paths = viz.dump_graph(gm, self.directory / base, title=title, changed=changed, reasons=reasons,
                               notes=notes, links=links)
        self.entries.append({"unit": unit, "stage": stage, "html": paths["html"].name, "dot": paths["dot"].name,
                             "nodes": len(gm.graph.nodes), "changed": len(changed), "summary": summary})

    def prepared(self, prepared: dict[str, fx.GraphModule], units: list) -> None:
        """Dump each calibrated prepared unit; shapes copied from the float graph it came from."""
        for unit in units:
            gm = prepared[unit.path]
            _copy_tensor_meta(unit.graph_module, gm)
            self.stage(unit.path, "prepared", gm, summary="observers show the calibrated ranges",
                       reasons=float_reasons(unit.graph_module))

    def converted(self, converted: dict[str, fx.GraphModule], units: list) -> None:
        """Dump each converted unit after one shape-propagating run on its example inputs."""
        for unit in units:
            gm = converted[unit.path]
            try:
                with torch.no_grad():
                    ShapePropagation(gm).propagate(*clone_inputs(unit.example_inputs))
            except Exception as error:  # a drawing without shapes beats no drawing
                summary = f"shapes unavailable: {type(error).__name__}: {error}"
            else:
                summary = "int8 graph: scale/zero_point measured on the example inputs"
            self.stage(unit.path, "converted", gm, summary=summary, reasons=float_reasons(unit.graph_module))

    def finish(self) -> Path:
        path = self.directory / "index.html"
        path.write_text(viz_html.index_page("fxq dump", self.entries))
        return path


def _copy_tensor_meta(source: fx.GraphModule, target: fx.GraphModule) -> None:
    by_name = {n.name: n for n in source.graph.nodes}
    by_module = {str(n.target): n for n in source.graph.nodes if n.op == "call_module"}
    for node in target.graph.nodes:
        if "tensor_meta" in node.meta:
            continue
        twin = by_module.get(str(node.target)) if node.op == "call_module" else by_name.get(node.name)
        if twin is not None and "tensor_meta" in twin.meta:
            node.meta["tensor_meta"] = twin.meta["tensor_meta"]


class _NoDump:
    """Stands in for :class:`StageDumper` when no ``dump_dir`` was given: every call does nothing."""

    def pass_observer(self, unit: str):
        return None

    def prepared(self, *args: Any) -> None:
        pass

    def converted(self, *args: Any) -> None:
        pass

    def finish(self) -> None:
        return None


def stage_dumper(directory: Any):
    """A :class:`StageDumper` for ``directory``, or one that does nothing when it is None."""
    return _NoDump() if directory is None else StageDumper(directory)
