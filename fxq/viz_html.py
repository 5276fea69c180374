"""The offline HTML side of :mod:`fxq.viz`: a pure-Python layered layout drawn as SVG (used
when Graphviz is absent), the page around a graph, and the index of a dump directory.

Everything is inline (no CDN, no external file), so a page opens from disk anywhere.
"""
from __future__ import annotations

import html
from typing import Any

import networkx as nx

from fxq.viz import CHANGED_COLOUR, COLOURS, KINDS

CHAR_WIDTH, LINE_HEIGHT, PAD, GAP_X, GAP_Y = 6.6, 13, 8, 18, 42
BARYCENTER_SWEEPS = 4


def _layers(graph: nx.DiGraph) -> list[list[str]]:
    """Longest-path layering in graph order, then barycenter sweeps to untangle each layer."""
    order = sorted(graph.nodes, key=lambda n: graph.nodes[n]["order"])
    depth: dict[str, int] = {}
    for name in order:
        depth[name] = 1 + max((depth[p] for p in graph.predecessors(name)), default=-1)
    for name in order:  # constants sit just above their first user, not all at the top
        if graph.nodes[name]["op"] == "get_attr" and graph.out_degree(name):
            depth[name] = max(0, min(depth[s] for s in graph.successors(name)) - 1)
    layers: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for name in order:
        layers[depth[name]].append(name)
    for sweep in range(BARYCENTER_SWEEPS):
        downward = sweep % 2 == 0
        span = range(1, len(layers)) if downward else range(len(layers) - 2, -1, -1)
        for index in span:
            neighbour_layer = layers[index - 1] if downward else layers[index + 1]
            position = {n: i for i, n in enumerate(neighbour_layer)}
            near = graph.predecessors if downward else graph.successors

            def centre(name: str, current: int, position=position, near=near) -> float:
                seen = [position[n] for n in near(name) if n in position]
                return sum(seen) / len(seen) if seen else float(current)

            layers[index] = [n for _, n in sorted(
                ((centre(n, i), n) for i, n in enumerate(layers[index])), key=lambda item: item[0])]
    return layers


def _box(data: dict[str, Any]) -> tuple[float, float]:
    width = max(len(line) for line in data["label"]) * CHAR_WIDTH + 2 * PAD
    return width, len(data["label"]) * LINE_HEIGHT + 2 * PAD


def layered_svg(graph: nx.DiGraph) -> str:
    """An SVG drawing of a :func:`fxq.viz.to_networkx` graph, top to bottom, no Graphviz needed."""
    layers = _layers(graph)
    boxes = {n: _box(graph.nodes[n]) for n in graph.nodes}
    widths = [sum(boxes[n][0] for n in layer) + GAP_X * (len(layer) - 1) for layer in layers]
    total_width = max(widths, default=0) + 2 * GAP_X
    places: dict[str, tuple[float, float, float, float]] = {}
    y = GAP_Y / 2
    for layer, width in zip(layers, widths):
        x = (total_width - width) / 2
        height = max(boxes[n][1] for n in layer)
        for name in layer:
            places[name] = (x, y, *boxes[name])
            x += boxes[name][0] + GAP_X
        y += height + GAP_Y
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_width:.0f}" height="{y:.0f}" '
             f'viewBox="0 0 {total_width:.0f} {y:.0f}" font-family="Helvetica,Arial,sans-serif" font-size="11">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>']
    for source, target in graph.edges:
        sx, sy, sw, sh = places[source]
        tx, ty, tw, _ = places[target]
        x1, y1, x2, y2 = sx + sw / 2, sy + sh, tx + tw / 2, ty
        bend = max(GAP_Y / 2, (y2 - y1) / 3)
        parts.append(f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} '
                     f'{x2:.1f},{y2:.1f}" fill="none" stroke="#777" marker-end="url(#arrow)"/>')
    for name in graph.nodes:
        parts.append(_node_svg(name, graph.nodes[name], places[name]))
    parts.append("</svg>")
    return "\n".join(parts)


def _node_svg(name: str, data: dict[str, Any], place: tuple[float, float, float, float]) -> str:
    x, y, width, height = place
    fill, border = COLOURS[data["kind"]]
    stroke, stroke_width = (CHANGED_COLOUR, 3) if data["changed"] else (border, 1.2)
    classes = f"node fxq-{data['kind']}" + (" changed" if data["changed"] else "")
    bold = ' font-weight="bold"'
    text = "".join(
        f'<text x="{x + width / 2:.1f}" y="{y + PAD + (i + 0.8) * LINE_HEIGHT:.1f}" text-anchor="middle"'
        f'{bold if i == 0 else ""}>{html.escape(line)}</text>'
        for i, line in enumerate(data["label"]))
    return (f'<g id="node-{html.escape(name, quote=True)}" class="{classes}">'
            f'<title>{html.escape(chr(10).join(data["label"]))}</title>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" rx="6" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{stroke_width}"/>{text}</g>')


_STYLE = """
body{font-family:Helvetica,Arial,sans-serif;margin:0;color:#222}
header{padding:10px 16px;background:#f4f4f4;border-bottom:1px solid #ccc;position:sticky;top:0;z-index:2}
h1{font-size:18px;margin:0 0 6px 0} .legend span{display:inline-block;padding:2px 8px;margin:2px;border-radius:5px;
border:1px solid #888;font-size:12px} nav a{margin-right:12px} #graph{padding:12px;overflow:auto}
#graph svg{max-width:none} ul.notes{margin:4px 0;font-size:12px} g.node{cursor:pointer}
g.node.selected rect,g.node.selected polygon,g.node.selected path{stroke:#000;stroke-width:4}
table{border-collapse:collapse;font-size:12px;margin:12px} td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
"""

_SCRIPT = """
(function(){
  var nodes=document.querySelectorAll('#graph g.node');
  var rendered=0; nodes.forEach(function(n){var b=n.getBBox(); if(b.width>0&&b.height>0) rendered++;});
  document.body.dataset.nodes=nodes.length; document.body.dataset.rendered=rendered;
  document.getElementById('count').textContent=nodes.length+' nodes';
  document.getElementById('search').addEventListener('input',function(e){
    var q=e.target.value.toLowerCase(); var first=null;
    nodes.forEach(function(n){var hit=q&&n.textContent.toLowerCase().indexOf(q)>=0;
      n.classList.toggle('selected',hit); if(hit&&!first) first=n;});
    if(first) first.scrollIntoView({block:'center',inline:'center'});
  });
})();
"""


def _legend() -> str:
    spans = [f'<span class="fxq-{kind}" style="background:{COLOURS[kind][0]};border-color:{COLOURS[kind][1]}">'
             f'{kind.replace("_", " ")}</span>' for kind in KINDS]
    spans.append(f'<span style="border:3px solid {CHANGED_COLOUR}">changed by this stage</span>')
    return '<div class="legend">' + "".join(spans) + "</div>"


def page(title: str, graph: nx.DiGraph, svg: str, notes: list[str], links: dict[str, str]) -> str:
    """A whole HTML page: header (title, counts, legend, links), the drawing, and a node table."""
    counts = {}
    for _, kind in graph.nodes(data="kind"):
        counts[kind] = counts.get(kind, 0) + 1
    summary = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(counts.items()))
    nav = " ".join(f'<a href="{html.escape(href)}">{html.escape(text)}</a>' for text, href in links.items())
    note_items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    rows = "".join(_row(name, data) for name, data in graph.nodes(data=True))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body><header><h1>{html.escape(title)}</h1><nav>{nav}</nav>
<div><b id="count">{graph.number_of_nodes()} nodes</b> &mdash; {html.escape(summary)}
 &nbsp; <input id="search" placeholder="find node..." size="24"></div>{_legend()}
<ul class="notes">{note_items}</ul></header>
<div id="graph">{svg}</div>
<table><tr><th>node</th><th>kind</th><th>target</th><th>shape</th><th>dtype</th><th>scale / zp</th>
<th>float reason</th><th>changed</th></tr>{rows}</table>
<script>{_SCRIPT}</script></body></html>
"""


def _row(name: str, data: dict[str, Any]) -> str:
    shape = " x ".join(map(str, data["shape"])) if data["shape"] else ""
    qparams = "" if data["scale"] is None else f"{data['scale']:.5g} / {data['zero_point']}"
    cells = [name, data["kind"], data["target"], shape, data["dtype"] or "", qparams, data["reason"] or "",
             "yes" if data["changed"] else ""]
    return f"<tr class='fxq-{data['kind']}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def index_page(title: str, entries: list[dict[str, Any]]) -> str:
    """The dump directory's index.html: one row per stage with links and counts."""
    rows = "".join(
        f"<tr><td>{i}</td><td>{html.escape(e['unit'] or '(root)')}</td>"
        f"<td><a href='{html.escape(e['html'])}'>{html.escape(e['stage'])}</a></td>"
        f"<td><a href='{html.escape(e['dot'])}'>dot</a></td><td>{e['nodes']}</td><td>{e['changed']}</td>"
        f"<td>{html.escape(e.get('summary', ''))}</td></tr>"
        for i, e in enumerate(entries))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body><header><h1>{html.escape(title)}</h1>{_legend()}</header>
<table><tr><th>#</th><th>unit</th><th>stage</th><th>source</th><th>nodes</th><th>changed</th><th>what changed</th></tr>
{rows}</table></body></html>
"""
