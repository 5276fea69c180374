"""Backends as declarative objects: the registry, the op tables, and each built-in backend on the
fused patterns and the seed models."""
import dataclasses
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxq
import fxq.backends as registry
from fxq import fused
from fxq.backends import tables
from fxq.backends.base import config_targets
from fxq.quant import nni
from metrics import sqnr_db
from seed_models import SEED_MODELS

BUILT_INS = ["qnnpack", "reference", "x86"]


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    registry.list_backends()  # built-ins in first, so the copy has them
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _toy_backend(name: str) -> fxq.Backend:
    return fxq.reference_backend(weight_bits=5, name=name)


# --- registry -------------------------------------------------------------------------------


def test_built_ins_are_listed_and_described_by_their_fields():
    assert set(BUILT_INS) <= set(fxq.list_backends())
    x86, qnnpack, reference = (fxq.get_backend(name) for name in ("x86", "qnnpack", "reference"))
    assert (x86.engine, qnnpack.engine, reference.engine) == ("x86", "qnnpack", None)
    assert not x86.reference and not qnnpack.reference and reference.reference
    assert not qnnpack.activation.reduce_range and qnnpack.weight.per_channel
    assert (reference.activation.bits, reference.weight.bits) == (8, 8)


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(fxq.BackendError, match="unknown backend 'tpu9'; available: .*qnnpack.*reference.*x86"):
        fxq.get_backend("tpu9")


def test_registering_a_name_twice_needs_replace(scratch_registry):
    first, second = _toy_backend("toy"), _toy_backend("toy")
    fxq.register_backend(first)
    with pytest.raises(fxq.BackendError, match="'toy' is already registered; pass replace=True"):
        fxq.register_backend(second)
    assert fxq.get_backend("toy") is first
    fxq.register_backend(second, replace=True)
    assert fxq.get_backend("toy") is second and "toy" in fxq.list_backends()


def test_a_built_in_name_cannot_be_taken_silently(scratch_registry):
    with pytest.raises(fxq.BackendError, match="'x86' is already registered"):
        fxq.register_backend(_toy_backend("x86"))


def test_backend_objects_pass_through_and_bad_arguments_are_named():
    backend = _toy_backend("unregistered")
    assert fxq.get_backend(backend) is backend
    with pytest.raises(fxq.BackendError, match="needs an fxq.Backend, got str"):
        fxq.register_backend("x86")
    with pytest.raises(fxq.BackendError, match="a name or an fxq.Backend, got int"):
        fxq.get_backend(3)


def test_a_reference_backend_cannot_claim_an_engine():
    with pytest.raises(fxq.BackendError, match="reference backend runs no quantized engine"):
        fxq.Backend(name="bad", build_backend_config=tables.generic, engine="x86", reference=True)


def test_the_backend_written_in_the_docs_works(scratch_registry):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "backends.md").read_text()
    section = docs[docs.index("## Writing a backend"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/backends.md", "exec"), namespace)
    backend = fxq.get_backend("toy_npu")
    assert backend is namespace["toy_npu"] and backend.reference
    assert nn.MaxPool3d not in backend.supported_targets and nn.Conv2d in backend.supported_targets
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU6(), nn.Conv2d(16, 8, 3)).eval()
    batches = [torch.randn(4, 3, 10, 10) for _ in range(4)]
    with torch.no_grad():
        assert sqnr_db(model(batches[0]), _quantize(model, batches[0], batches, "toy_npu")(batches[0])) >= 20.0


# --- op tables ------------------------------------------------------------------------------


def test_qnnpack_keeps_3d_convolutions_float_in_every_fused_form():
    targets = fxq.get_backend("qnnpack").supported_targets
    assert {nn.Conv2d, nni.ConvReLU2d, fused.ConvAct2d, nn.ConvTranspose2d} <= targets
    assert not {nn.Conv3d, nni.ConvReLU3d, fused.ConvAct3d, nn.ConvTranspose3d, fused.ConvTransposeAct3d} & targets
    assert {nn.Conv3d, fused.ConvTransposeAct3d} <= fxq.get_backend("x86").supported_targets


def test_without_drops_the_op_and_every_pattern_rooted_at_it():
    spec = fxq.get_backend("x86")
    table = tables.without(tables.generic(spec.activation, spec.weight), [nn.Linear])
    for pattern_config in table.configs:
        assert nn.Linear not in config_targets(pattern_config) and pattern_config.root_module is not nn.Linear
    names = set().union(*(config_targets(c) for c in table.configs))
    assert not {nni.LinearReLU, fused.LinearAct} & names and nn.Conv2d in names


def test_generic_table_uses_the_specs_dtypes():
    activation = fxq.QuantSpec(dtype=torch.qint8, symmetric=True)
    weight = fxq.QuantSpec(dtype=torch.qint8, symmetric=True, per_channel=False)
    table = tables.generic(activation, weight, "npu")
    dtype_configs = [d for c in table.configs for d in c.dtype_configs]
    assert dtype_configs and all(d.input_dtype == torch.qint8 and d.output_dtype == torch.qint8 and
                                 not d.is_dynamic for d in dtype_configs)


# --- fused patterns, numerically, on every built-in backend ---------------------------------

_CONVS = {
    "conv1d": (lambda i, o: nn.Conv1d(i, o, 3, padding=1), nn.BatchNorm1d, (8, 8, 12)),
    "conv2d": (lambda i, o: nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d, (4, 8, 8, 8)),
    "conv3d": (lambda i, o: nn.Conv3d(i, o, 3, padding=1), nn.BatchNorm3d, (2, 8, 4, 6, 6)),
    "conv_transpose1d": (lambda i, o: nn.ConvTranspose1d(i, o, 3, padding=1), nn.BatchNorm1d, (8, 8, 12)),
    "conv_transpose2d": (lambda i, o: nn.ConvTranspose2d(i, o, 3, padding=1), nn.BatchNorm2d, (4, 8, 8, 8)),
    "conv_transpose3d": (lambda i, o: nn.ConvTranspose3d(i, o, 3, padding=1), nn.BatchNorm3d, (2, 8, 4, 6, 6)),
    "linear": (nn.Linear, nn.BatchNorm1d, (64, 8)),  # 8 -> 32 -> 32: enough work to be worth int8
}
_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardtanh": lambda: nn.Hardtanh(0.0, 4.0)}
_ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_ACTIVATION_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.hardtanh, torch.clamp)


class Chain(nn.Module):
    """root -> BatchNorm -> activation, once per activation (linear: relu and relu6 only)."""

    def __init__(self, kind: str):
        super().__init__()
        make_root, make_norm, _ = _CONVS[kind]
        activations = ["relu", "relu6"] if kind == "linear" else list(_ACTIVATIONS)
        width = 32 if kind == "linear" else 8
        self.blocks = nn.Sequential(*(nn.Sequential(make_root(8 if i == 0 else width, width), make_norm(width),
                                                    _ACTIVATIONS[a]())
                                      for i, a in enumerate(activations)))

    def forward(self, x):
        return self.blocks(x)


class AddMulReLU(nn.Module):
    # Three convs, not two with one called twice: a module with two call sites gets one
    # output scale from torch's native convert (qnnpack: 20 dB instead of 28 dB).
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))

    def forward(self, x):
        y = F.relu(self.a(x) + self.b(x))
        return torch.relu(y * self.c(y))


def _warm_batchnorm(model: nn.Module, shape) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape))
    return model.eval()


def _quantize(model, example, batches, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        return fxq.quantize(model, example, calibration_data=batches, backend=backend)


def _activation_nodes(qmodel) -> list:
    found = []
    for gm in (m for m in qmodel.modules() if isinstance(m, fx.GraphModule)):
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _ACTIVATION_TYPES):
                found.append(node.name)
            elif node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
                found.append(node.name)
    return found


def _fused_pattern_cases():
    for backend in BUILT_INS:
        for kind in [*_CONVS, "add_mul"]:
            yield pytest.param(backend, kind, id=f"{backend}-{kind}")


@pytest.mark.parametrize("backend_name,kind", list(_fused_pattern_cases()))
def test_fused_patterns_leave_no_activation_op_and_match_float(backend_name, kind):
    shape = (4, 8, 8, 8) if kind == "add_mul" else _CONVS[kind][2]
    torch.manual_seed(0)  # the weights, whatever tests ran before (qnnpack-conv1d: 24.1 dB once)
    model = _warm_batchnorm(AddMulReLU() if kind == "add_mul" else Chain(kind), shape)
    torch.manual_seed(1)
    batches = [torch.randn(shape) for _ in range(4)]
    qmodel = _quantize(model, batches[0], batches, backend_name)
    backend = fxq.get_backend(backend_name)
    x = torch.randn(shape)
    with torch.no_grad():
        expected, actual = model(x), qmodel(x)
    assert sqnr_db(expected, actual) >= 25.0
    if not backend.reference:  # int8 kernels: the clamp lives in the output range, no op remains
        assert _activation_nodes(qmodel) == []
    float_kinds = {"conv3d", "conv_transpose3d"} if backend_name == "qnnpack" else set()
    assert (qmodel.report.quantized_ops == 0) == (kind in float_kinds)
    assert bool(qmodel.report.float_nodes) == (kind in float_kinds), qmodel.report.float_nodes
    if kind != "add_mul":  # the chain ends in hardtanh(0, 4) (linear: relu6)
        assert 0.0 <= float(actual.min()) and float(actual.max()) <= (6.0 if kind == "linear" else 4.0) + 1e-6


# --- seed models ----------------------------------------------------------------------------

#: Output SQNR floors (dB) per backend, on inputs not used for calibration. x86 has its own
#: floors in test_quantize_seed_models.py. To keep CI short, the two slowest seed models are
#: left to x86: lipreading_net (ResNet-18 per frame; measured qnnpack 12.9 dB, reference 11.4 dB)
#: and prelu_net (its PReLU pattern is covered on every backend by the digits PReLU net).
_SLOW = {"lipreading_net", "prelu_net"}
SEED_SQNR_FLOOR = {
    "qnnpack": {name: 20.0 for name in SEED_MODELS if name not in _SLOW},
    # The simulation is checked against x86 int8 step by step in test_reference_backend.py.
    "reference": dict.fromkeys(["relu6_net", "standalone_bn_net", "control_flow_net", "hf_style_net",
                                "zeros_like_maxpool3d_net", "same_pad_static_net"], 20.0),
}
#: 4-bit weights (8-bit activations). Not on the depthwise nets: per-channel min/max 4-bit
#: depthwise weights leave too few levels per 3x3 kernel (same_pad_static_net: 8.8 dB).
W4_SEED_SQNR_FLOOR = {"relu6_net": 18.0, "control_flow_net": 15.0, "hf_style_net": 15.0}


def _fresh_inputs(fixture):
    torch.manual_seed(1234)
    return fixture.sample()


@pytest.fixture(scope="module")
def seed_sqnr():
    """sqnr(name, backend): output SQNR of that seed model on that backend, each measured once."""
    fixtures, measured = {}, {}

    def measure(name: str, backend: fxq.Backend) -> float:
        if (name, backend.name) not in measured:
            fixture = fixtures.setdefault(name, SEED_MODELS[name]())
            qmodel = _quantize(fixture.model, fixture.example_inputs, fixture.calibration, backend)
            inputs = _fresh_inputs(fixture)
            with torch.no_grad():
                measured[name, backend.name] = sqnr_db(fixture.model(*inputs), qmodel(*inputs))
        return measured[name, backend.name]
    return measure


@pytest.mark.parametrize("backend", sorted(SEED_SQNR_FLOOR))
def test_seed_models_sqnr_per_backend(seed_sqnr, backend):
    measured = {name: seed_sqnr(name, fxq.get_backend(backend)) for name in SEED_SQNR_FLOOR[backend]}
    print(f"{backend}: " + ", ".join(f"{name} {db:.1f} dB" for name, db in measured.items()))
    low = {name: round(db, 1) for name, db in measured.items() if not db >= SEED_SQNR_FLOOR[backend][name]}
    assert not low, f"{backend} below its SQNR floor: {low}"


def test_seed_models_with_4_bit_weights_still_run(seed_sqnr):
    w4 = fxq.reference_backend(weight_bits=4)
    measured = {name: seed_sqnr(name, w4) for name in W4_SEED_SQNR_FLOOR}
    print("reference w4a8: " + ", ".join(f"{name} {db:.1f} dB" for name, db in measured.items()))
    for name, db in measured.items():
        assert math.isfinite(db) and db >= W4_SEED_SQNR_FLOOR[name]
        # 4-bit weights are coarser: the simulation must show it.
        assert db < seed_sqnr(name, fxq.get_backend("reference")) - 6.0


class DepthwiseAndRegular(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(128, 128, 3, padding=1, groups=128)
        self.grouped = nn.Conv2d(128, 128, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(128, 16, 1)

    def forward(self, x):
        return self.pw(self.grouped(torch.relu(self.dw(x))))


def _weight_code_range(qmodel, name: str) -> int:
    module = dict(qmodel.named_modules())[name]
    return int(module.weight().int_repr().abs().max())


def test_depthwise_convs_get_the_weight_bits_their_kernels_have():
    """x86 with VNNI: fbgemm's depthwise kernels multiply in int16 pairs, the others do not; a
    backend's max_depthwise_product_bits gives depthwise convs alone 7-bit weights."""
    torch.manual_seed(0)
    model = DepthwiseAndRegular().eval()
    batches = [torch.randn(2, 128, 8, 8) for _ in range(3)]
    full = registry.get_backend("x86")
    full = dataclasses.replace(full, max_product_bits=None,
                               activation=dataclasses.replace(full.activation, reduce_range=False))
    assert full.max_depthwise_product_bits == 15 and full.precision == "8-bit activations x 8-bit weights"
    unlimited = dataclasses.replace(full, max_depthwise_product_bits=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        limited_model = fxq.quantize(model, batches[0], calibration_data=batches, backend=full)
        unlimited_model = fxq.quantize(model, batches[0], calibration_data=batches, backend=unlimited)
    prefix = next(n for n, _ in limited_model.named_modules() if n.endswith("dw")).rpartition("dw")[0]
    assert _weight_code_range(limited_model, prefix + "dw") in (63, 64)     # symmetric 7-bit: [-64, 63]
    assert _weight_code_range(limited_model, prefix + "grouped") >= 127    # not depthwise: 8 bits
    assert _weight_code_range(limited_model, prefix + "pw") >= 127
    assert _weight_code_range(unlimited_model, prefix + "dw") >= 127
    # with 7-bit activations the products fit already: nothing changes
    seven_bit = dataclasses.replace(full, activation=dataclasses.replace(full.activation, reduce_range=True))
    assert seven_bit._depthwise_qconfig(seven_bit.activation, qat=False) is None


def test_x86_transposed_convs_are_int8_only_where_the_kernel_is_right_on_this_cpu():
    """fbgemm's int8 transposed conv is wrong on some CPUs (an AVX-512 EPYC: -3 dB whenever the
    channel counts differ). Each configuration is checked on the machine; the output stays
    close to float either way, and a float one says why."""
    from fxq.backends import x86 as x86_module
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(16, 8, 2, stride=2),
                          nn.ReLU(), nn.ConvTranspose2d(8, 8, 3, padding=1)).eval()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    qmodel = _quantize(model, batches[0], batches, "x86")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert sqnr_db(model(x), qmodel(x)) > 25
    reasons = " ".join(node.reason for node in qmodel.report.float_nodes)
    for layer, config in (("2", (2, 16, 8, (2, 2), (2, 2), (0, 0), (0, 0), 1, (1, 1))),
                          ("4", (2, 8, 8, (3, 3), (1, 1), (1, 1), (0, 0), 1, (1, 1)))):
        broken = x86_module.int8_transposed_conv_sqnr(*config) < x86_module.TRANSPOSED_CONV_MIN_SQNR_DB
        assert (f"transposed conv {layer}: fbgemm's int8 kernel computes it wrongly" in reasons) == broken


def test_a_transposed_conv_the_kernel_gets_wrong_runs_float_with_the_reason(monkeypatch):
    from fxq.backends import x86 as x86_module
    monkeypatch.setattr(x86_module, "int8_transposed_conv_sqnr", lambda *config: -3.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2)).eval()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    qmodel = _quantize(model, batches[0], batches, "x86")
    assert "self-check: -3.0 dB against float" in str(qmodel.report)
    with torch.no_grad():
        assert sqnr_db(model(batches[0]), qmodel(batches[0])) > 25
