"""examples/custom_backend, discovered the way pip would install it: its package on sys.path
and a dist-info carrying the entry points its pyproject.toml declares."""
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxq
import fxq.backends as registry
from fxq import fused
from fxq.quant import nnqr
from metrics import sqnr_db

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_backend"
QDQ = torch.ops.quantized_decomposed


def _write_dist_info(site: Path, name: str, entry_points: dict[str, str]) -> None:
    """What ``pip install`` leaves for importlib.metadata to find."""
    dist_info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}")


@pytest.fixture
def scratch_registry(monkeypatch):
    registry.list_backends()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.fixture
def toy_npu_installed(tmp_path, monkeypatch, scratch_registry):
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    _write_dist_info(tmp_path, project["name"], project["entry-points"][registry.ENTRY_POINT_GROUP])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    sys.modules.pop("fxq_toy_npu", None)


@pytest.fixture
def broken_plugins_installed(tmp_path, monkeypatch, scratch_registry):
    _write_dist_info(tmp_path, "fxq-broken-plugins", {
        "missing_npu": "fxq_no_such_module_anywhere:backend",
        "not_a_backend": "math:pi",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


class NpuNet(nn.Module):
    """Conv3d-BN-PReLU, MaxPool3d, Conv3d-ReLU6, pool, Linear: every constraint of the NPU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(8)
        self.prelu = nn.PReLU(8)
        self.pool = nn.MaxPool3d(2)
        self.conv2 = nn.Conv3d(8, 8, 3, padding=1)
        self.relu6 = nn.ReLU6()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.pool(self.prelu(self.bn1(self.conv1(x))))
        x = self.relu6(self.conv2(x))
        return self.head(x.mean((2, 3, 4)))


@pytest.fixture(scope="module")
def npu_net():
    torch.manual_seed(0)
    model = NpuNet()
    with torch.no_grad():
        model.prelu.weight.uniform_(0.05, 0.5)
    batches = [torch.randn(2, 3, 4, 8, 8) for _ in range(6)]
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return model.eval(), batches


def _nodes(qmodel):
    return [(gm, node) for gm in qmodel.modules() if isinstance(gm, fx.GraphModule) for node in gm.graph.nodes]


def test_plugin_is_found_through_its_entry_point(toy_npu_installed):
    assert "toy_npu" not in registry._REGISTRY  # nothing imported it: discovery is lazy
    backend = fxq.get_backend("toy_npu")
    assert type(backend) is fxq.Backend and backend.name == "toy_npu" and backend.reference
    assert "toy_npu" in fxq.list_backends()
    assert nn.MaxPool3d not in backend.supported_targets and nn.PReLU not in backend.supported_targets
    assert nn.MaxPool3d in fxq.get_backend("x86").supported_targets


def test_quantize_with_the_plugin_honours_every_declared_constraint(toy_npu_installed, npu_net):
    model, batches = npu_net
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        qmodel = fxq.quantize(model, batches[0], calibration_data=batches, backend="toy_npu")
    report = qmodel.report
    assert report.backend == "toy_npu"
    # No PReLU kernel: decomposed before quantization, none left.
    assert any(record.name == "decompose_prelu" and record.modified for record in report.passes[""])
    assert not any(isinstance(m, nn.PReLU) for m in qmodel.modules())
    # No MaxPool3d kernel: a float island, with the reason.
    no_kernel = [f.reason for f in report.float_nodes if "no int8 kernel" in f.reason]
    assert len(no_kernel) == 1 and "torch.nn.modules.pooling.MaxPool3d" in no_kernel[0], report.float_nodes
    # Weights: int8, one scale per tensor, zero point 0 (torch stores symmetric as affine, zp 0).
    weighted = [m for m in qmodel.modules() if isinstance(m, (nnqr.Conv3d, nnqr.Linear))]
    assert len(weighted) >= 3  # conv1, conv2 and the PReLU decomposition's convs
    for module in weighted:
        assert module.weight_qscheme == torch.per_tensor_affine and module.weight_dtype == torch.qint8
        assert module.weight_scale.numel() == 1 and int(module.weight_zero_point) == 0
    # Activations: int8, symmetric.
    quantizers = [n for _, n in _nodes(qmodel) if n.op == "call_function" and n.target is QDQ.quantize_per_tensor.default]
    assert quantizers and all(n.args[2] == 0 and n.args[5] == torch.int8 for n in quantizers)
    # ReLU6 fused into conv2: it lives inside the fused op, applied before the output quantizer.
    fused_conv2 = qmodel.model.get_submodule("conv2")
    assert isinstance(fused_conv2, fused.ConvAct3d) and isinstance(fused_conv2[0], nnqr.Conv3d)
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU6) for gm, n in _nodes(qmodel))
    x = torch.randn(2, 3, 4, 8, 8)
    with torch.no_grad():
        assert sqnr_db(model(x), qmodel(x)) >= 20.0


def test_a_broken_plugin_fails_by_name_and_only_when_asked_for(broken_plugins_installed):
    with pytest.raises(fxq.BackendError, match=r"backend plugin 'missing_npu' \(fxq_no_such_module_anywhere:backend\) "
                                               r"failed to load: ModuleNotFoundError"):
        fxq.get_backend("missing_npu")
    with pytest.raises(fxq.BackendError, match="backend plugin 'not_a_backend' .* must provide an fxq.Backend"):
        fxq.get_backend("not_a_backend")
    assert fxq.get_backend("x86").name == "x86"  # the others still work


def test_a_broken_plugin_never_breaks_import_fxq(broken_plugins_installed):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(broken_plugins_installed), *sys.path]))
    code = "import fxq; print(','.join(fxq.list_backends()))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split(",") == fxq.list_backends()
