"""Graph dumps: a page per stage, DOT that Graphviz parses, HTML that a real browser renders."""
import html
import json
import re
import shutil
import subprocess
import warnings

import pytest
import torch
import torch.nn as nn

import fxq
from fxq import viz
from fxq.backends import get_backend
from fxq.dump import float_reasons
from fxq.pipeline import passes_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOT = shutil.which("dot")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                                    "(apt-get install chromium; .ci/run installs it where apt works)")


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.mean() > 0 else x  # data-dependent: fx cannot trace it, it stays float


class IslandNet(nn.Module):
    """conv -> bn -> relu (folded and fused), an untraceable gate (kept float), a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.gate = Gate()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.gate(self.relu(self.bn(self.conv(x)))).amax((2, 3)))


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    torch.manual_seed(0)
    model = IslandNet().eval()
    directory = tmp_path_factory.mktemp("dump")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        qmodel = fxq.quantize(model, (torch.randn(1, 3, 16, 16),), [torch.randn(2, 3, 16, 16)] * 2,
                              dump_dir=directory)
    return directory, qmodel


def _stage_file(directory, stage, suffix=".html"):
    (match,) = directory.glob(f"*_root_{stage}{suffix}")
    return match


def _converted_graph(qmodel):
    return viz.to_networkx(qmodel.model, reasons=float_reasons(qmodel.float_graphs[""]))


def test_every_stage_is_dumped_and_indexed(dumped):
    directory, _ = dumped
    stages = ["traced", *(name for name, _ in passes_for(get_backend("x86"))), "prepared", "converted"]
    index = (directory / "index.html").read_text()
    for position, stage in enumerate(stages):
        html_path = directory / f"{position:02d}_root_{stage}.html"
        assert html_path.exists() and html_path.with_suffix(".dot").exists(), stage
        assert html_path.name in index
        assert "<script src" not in html_path.read_text()  # self-contained: nothing fetched


def test_pass_pages_highlight_what_the_pass_changed(dumped):
    directory, _ = dumped
    # html.unescape: Graphviz writes "-" in ids and classes as "&#45;"
    folded = html.unescape(_stage_file(directory, "fold_batchnorm").read_text())
    untouched = html.unescape(_stage_file(directory, "decompose_prelu").read_text())
    assert re.search(r'<g id="node-conv" class="node [^"]*changed"', folded)
    assert "removed: bn" in folded
    assert re.findall(r'class="(node [^"]*)"', untouched) and "changed" not in " ".join(
        re.findall(r'class="(node [^"]*)"', untouched))


@pytest.mark.skipif(DOT is None, reason="Graphviz's dot binary not installed")
def test_dot_files_parse_with_graphviz(dumped):
    directory, qmodel = dumped
    dot_source = _stage_file(directory, "converted", ".dot").read_text()
    done = subprocess.run([DOT, "-Tjson"], input=dot_source.encode(), capture_output=True, check=True)
    parsed = json.loads(done.stdout)
    graph = _converted_graph(qmodel)
    assert len(parsed["objects"]) == graph.number_of_nodes()
    assert len(parsed["edges"]) == graph.number_of_edges()


def test_networkx_graph_marks_kinds_and_reasons(dumped):
    _, qmodel = dumped
    graph = _converted_graph(qmodel)
    kinds = [kind for _, kind in graph.nodes(data="kind")]
    assert kinds.count("quantize") >= 1 and kinds.count("dequantize") >= 1
    islands = [data for _, data in graph.nodes(data=True) if data["kind"] == "float_island"]
    assert any("gate" in island["name"] and "could not be traced" in island["reason"] for island in islands)
    assert graph.nodes["conv"]["kind"] == "quantized"
    assert list(graph.successors("x")) == ["quantize_per_tensor"]


def test_builtin_layout_draws_every_node_once(tmp_path):
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten()))
    paths = viz.dump_graph(gm, tmp_path / "traced", title="traced", renderer="builtin")
    page = paths["html"].read_text()
    assert len(re.findall(r'<g id="node-[^"]+" class="node fxq-', page)) == len(gm.graph.nodes)
    assert 'class="edge"' in page


def _chromium(*args, user_data_dir, timeout=120):
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={user_data_dir}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@needs_chromium
@pytest.mark.parametrize("renderer", ["auto", "builtin"])
def test_browser_renders_nodes_islands_and_transitions(dumped, tmp_path, renderer):
    _, qmodel = dumped
    paths = viz.dump_graph(qmodel.model, tmp_path / "converted", title="converted", renderer=renderer)
    url = paths["html"].as_uri()
    dom = _chromium("--dump-dom", url, user_data_dir=tmp_path / "profile").stdout
    expected = _converted_graph(qmodel).number_of_nodes()
    assert re.search(rf'data-nodes="{expected}"', dom), dom[:500]
    assert re.search(rf'data-rendered="{expected}"', dom)  # every node has a non-empty box on screen
    for kind in ("float_island", "quantize", "dequantize", "quantized"):
        assert re.search(rf'<g id="node-[^"]+" class="node fxq-{kind}', dom), kind
    screenshot = tmp_path / f"converted-{renderer}.png"
    _chromium("--window-size=1100,900", f"--screenshot={screenshot}", url, user_data_dir=tmp_path / "profile")
    assert screenshot.exists() and screenshot.stat().st_size > 10_000
    print(f"screenshot artifact: {screenshot}")
