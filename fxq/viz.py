"""See a graph: each fx node classified, labelled, and drawn as DOT, networkx and offline HTML.

A node's *kind* says how it runs: ``quantized`` (an int8 kernel), ``float`` (an ordinary float
op), ``float_island`` (kept float on purpose; the reason comes from ``node.meta["fxq"]``, a
:class:`~fxq.float_op.FloatOp`, or the float graph the node came from), ``quantize`` /
``dequantize`` (the transitions), ``observer`` (a prepared graph's range recorder),
``constant`` and ``io``. Labels carry op/target, shape and dtype (from ``tensor_meta`` when
ShapeProp ran) and scale/zero_point where they are known.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable, Optional

import networkx as nx
import torch
import torch.fx as fx

from fxq import quant
from fxq.errors import InvalidInputError
from fxq.float_op import FloatOp
from fxq.passes.base import float_reason, get_attr_value

KINDS = ("quantized", "float", "float_island", "quantize", "dequantize", "observer", "constant", "io")
QUANTIZE_TARGETS = (torch.quantize_per_tensor, torch.quantize_per_channel, torch.quantize_per_tensor_dynamic)
QUANTIZED_DTYPES = (torch.quint8, torch.qint8, torch.qint32)


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[torch.nn.Module]:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def _is_quantized_module(module: torch.nn.Module) -> bool:
    path = type(module).__module__
    return path.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")) and \
        not path.startswith("torch.ao.nn.quantized.reference")


def node_kind(gm: fx.GraphModule, node: fx.Node, reason: Optional[str] = None) -> str:
    """How ``node`` runs: one of :data:`KINDS`."""
    module = _module(gm, node)
    if node.op in ("placeholder", "output"):
        return "io"
    if node.op == "get_attr":
        return "constant"
    if node.op == "call_function" and node.target in QUANTIZE_TARGETS:
        return "quantize"
    if (node.op == "call_method" and node.target == "dequantize") or node.target is torch.dequantize:
        return "dequantize"
    if isinstance(module, quant.ObserverBase):
        return "observer"
    if reason is not None or isinstance(module, FloatOp):
        return "float_island"
    dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
    if (module is not None and _is_quantized_module(module)) or dtype in QUANTIZED_DTYPES or \
            "quantized" in str(getattr(node.target, "__module__", "") or node.target):
        return "quantized"
    return "float"


def describe_target(gm: fx.GraphModule, node: fx.Node) -> str:
    """``op: target`` with the module type for module calls."""
    if node.op == "call_module":
        module = _module(gm, node)
        return f"{node.target} ({type(module).__name__})" if module is not None else str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", None) or str(node.target)
    return str(node.target)


def _qparams(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[float, int]]:
    """(scale, zero_point) of the node's output where the graph knows them."""
    qparams = getattr(node.meta.get("tensor_meta"), "qparams", None) or {}
    if isinstance(qparams.get("scale"), float):
        return qparams["scale"], int(qparams["zero_point"])
    if node.op == "call_function" and node.target is torch.quantize_per_tensor and len(node.args) >= 3:
        scale, zero_point = (get_attr_value(gm, a) if isinstance(a, fx.Node) else a for a in node.args[1:3])
        if scale is not None and zero_point is not None:
            return float(scale), int(zero_point)
    module = _module(gm, node)
    if isinstance(module, quant.ObserverBase) and _observed(module):
        with quant.quiet():
            scale, zero_point = module.calculate_qparams()
        if scale.numel() == 1:
            return float(scale), int(zero_point)
    return None


def _observed(observer: torch.nn.Module) -> bool:
    low = getattr(observer, "min_val", None)
    return isinstance(low, torch.Tensor) and low.numel() > 0 and bool(torch.isfinite(low).all())


def node_info(gm: fx.GraphModule, node: fx.Node, reasons: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Everything the drawings show about ``node``, as plain values."""
    module = _module(gm, node)
    reason = float_reason(node) or (reasons or {}).get(node.name) or (reasons or {}).get(str(node.target))
    if reason is None and isinstance(module, FloatOp):
        reason = module.reason
    if node.op in ("placeholder", "output", "get_attr") or isinstance(module, quant.ObserverBase):
        reason = None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    info = {
        "name": node.name, "op": node.op, "target": describe_target(gm, node),
        "kind": node_kind(gm, node, reason), "reason": reason,
        "shape": list(shape) if isinstance(shape, torch.Size) else None,
        "dtype": str(getattr(meta, "dtype", "") or "").replace("torch.", "") or None,
        "scale": None, "zero_point": None,
    }
    qparams = _qparams(gm, node)
    if qparams is not None:
        info["scale"], info["zero_point"] = qparams
    if isinstance(module, quant.ObserverBase) and _observed(module) and module.min_val.numel() == 1:
        info["range"] = (float(module.min_val), float(module.max_val))
    info["label"] = _label(info)
    return info


def _label(info: dict[str, Any]) -> list[str]:
    lines = [info["name"], f"{info['op']}: {info['target']}"]
    if info["shape"] is not None or info["dtype"]:
        shape = "x".join(str(d) for d in info["shape"]) if info["shape"] is not None else "?"
        lines.append(f"{shape} {info['dtype'] or ''}".strip())
    if "range" in info:
        lines.append(f"range [{info['range'][0]:.4g}, {info['range'][1]:.4g}]")
    if info["scale"] is not None:
        lines.append(f"scale={info['scale']:.4g} zp={info['zero_point']}")
    if info["reason"]:
        reason = info["reason"]
        lines.append("float: " + (reason if len(reason) <= 60 else reason[:57] + "..."))
    return lines


def _hidden(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Scalar constants (the scale / zero_point get_attrs of converted graphs) are not drawn:
    their values appear as ``scale=... zp=...`` on the node that uses them."""
    if node.op != "get_attr" or not node.users:
        return False
    value = get_attr_value(gm, node)
    return value is not None and value.numel() == 1


def to_networkx(gm: fx.GraphModule, changed: Iterable[str] = (),
                reasons: Optional[dict[str, str]] = None) -> nx.DiGraph:
    """The graph of ``gm`` as a networkx DiGraph: one vertex per node (named as in fx), with
    :func:`node_info` as attributes plus ``changed``; edges follow data flow.

    Example::

        g = fxq.viz.to_networkx(torch.fx.symbolic_trace(model))
        [n for n, kind in g.nodes(data="kind") if kind == "float_island"]
    """
    changed = set(changed)
    graph = nx.DiGraph()
    kept = [n for n in gm.graph.nodes if not _hidden(gm, n)]
    for index, node in enumerate(kept):
        graph.add_node(node.name, order=index, changed=node.name in changed, **node_info(gm, node, reasons))
    names = set(graph.nodes)
    for node in kept:
        for source in node.all_input_nodes:
            if source.name in names:
                graph.add_edge(source.name, node.name)
    return graph


COLOURS = {  # fill, border
    "quantized": ("#c8f0c8", "#2e7d32"), "float": ("#cfe3ff", "#1f5fbf"),
    "float_island": ("#ffd0d0", "#c62828"), "quantize": ("#ffe0b2", "#e65100"),
    "dequantize": ("#fff3b0", "#b08800"), "observer": ("#e8d5ff", "#6a1b9a"),
    "constant": ("#eeeeee", "#888888"), "io": ("#ffffff", "#333333"),
}
CHANGED_COLOUR = "#ff00aa"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: nx.DiGraph, title: str = "") -> str:
    """DOT source of a :func:`to_networkx` graph (no pydot needed); SVG ids/classes are set
    so a browser can find each node (``g.node.fxq-<kind>``)."""
    lines = [f"digraph {_dot_quote(title or 'fxq')} {{", "  rankdir=TB;",
             f"  graph [label={_dot_quote(title)}, labelloc=t, fontname=Helvetica];",
             "  node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=10];"]
    for name, data in graph.nodes(data=True):
        fill, border = COLOURS[data["kind"]]
        classes = f"fxq-{data['kind']}" + (" changed" if data["changed"] else "")
        width = 3 if data["changed"] else 1
        colour = CHANGED_COLOUR if data["changed"] else border
        lines.append(f"  {_dot_quote(name)} [label={_dot_quote(chr(10).join(data['label']))}, "
                     f"fillcolor={_dot_quote(fill)}, color={_dot_quote(colour)}, penwidth={width}, "
                     f"id={_dot_quote('node-' + name)}, class={_dot_quote(classes)}];")
    lines.extend(f"  {_dot_quote(a)} -> {_dot_quote(b)};" for a, b in graph.edges)
    lines.append("}")
    return "\n".join(lines) + "\n"


def graphviz_svg(dot_source: str, timeout: float = 60.0) -> Optional[str]:
    """SVG rendered by Graphviz's ``dot`` binary, or None when it is not installed or fails."""
    binary = shutil.which("dot")
    if binary is None:
        return None
    try:
        done = subprocess.run([binary, "-Tsvg"], input=dot_source.encode(), capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    svg = done.stdout.decode("utf-8", "replace")
    return svg[svg.find("<svg"):]


def dump_graph(gm: fx.GraphModule, path: Any, title: str = "", changed: Iterable[str] = (),
               reasons: Optional[dict[str, str]] = None, notes: Iterable[str] = (),
               links: Optional[dict[str, str]] = None, renderer: str = "auto") -> dict[str, Path]:
    """Write ``<path>.dot`` and a self-contained ``<path>.html`` (opens offline) for ``gm``.

    ``changed`` names nodes to highlight (e.g. what a pass rewrote); ``reasons`` maps node
    names or module targets to why they run in float. The HTML embeds Graphviz's SVG when
    the ``dot`` binary exists, else fxq's own layered layout (``renderer="builtin"`` forces the
    latter, ``"graphviz"`` the former). Returns the written paths.

    Example::

        gm = torch.fx.symbolic_trace(model)
        fxq.dump_graph(gm, "/tmp/model", title="traced")   # /tmp/model.dot, /tmp/model.html
    """
    from fxq import viz_html
    base = Path(path)
    if base.suffix in (".html", ".dot"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    graph = to_networkx(gm, changed, reasons)
    dot_source = to_dot(graph, title)
    if renderer not in ("auto", "graphviz", "builtin"):
        raise InvalidInputError(f"renderer must be 'auto', 'graphviz' or 'builtin', got {renderer!r}")
    svg = graphviz_svg(dot_source) if renderer != "builtin" else None
    if svg is None and renderer == "graphviz":
        raise InvalidInputError("renderer='graphviz' needs Graphviz's dot binary on PATH (apt-get install graphviz)")
    svg = svg or viz_html.layered_svg(graph)
    dot_path, html_path = base.with_suffix(".dot"), base.with_suffix(".html")
    dot_path.write_text(dot_source)
    html_path.write_text(viz_html.page(title or base.name, graph, svg, list(notes), links or {}))
    return {"dot": dot_path, "html": html_path}
