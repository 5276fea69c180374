"""End to end: each seed model from the issue, quantized by one ``fxq.quantize`` call."""
import copy
import warnings

import pytest
import torch

import fxq
from metrics import sqnr_db
from seed_models import SEED_MODELS

#: Output SQNR floors (dB), int8 vs fp32 on inputs not used for calibration.
SQNR_FLOOR = {
    "prelu_net": 20.0,
    "inplace_net": 20.0,
    "inplace_conv_net": 20.0,
    "relu6_net": 20.0,
    "control_flow_net": 20.0,
    "zeros_like_maxpool3d_net": 20.0,
    "same_pad_static_net": 20.0,
    "same_pad_dynamic_net": 20.0,
    "hf_style_net": 20.0,
    "hf_style_toplevel_net": 20.0,
    "lipreading_net": 20.0,
    # 19.0 dB until its input BatchNorm ran in float ahead of the first quantize (now 21.7)
    "standalone_bn_net": 20.0,
}


def _quantize(fixture, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        return fxq.quantize(fixture.model, fixture.example_inputs, calibration_data=fixture.calibration, **kwargs)


def _fresh_inputs(fixture):
    torch.manual_seed(1234)
    return fixture.sample()


@pytest.fixture(scope="module")
def quantized_seeds():
    results = {}
    for name, make in SEED_MODELS.items():
        fixture = make()
        results[name] = (fixture, _quantize(fixture))
    return results


@pytest.mark.parametrize("name", sorted(SQNR_FLOOR))
def test_seed_model_sqnr(quantized_seeds, name):
    fixture, qmodel = quantized_seeds[name]
    inputs = _fresh_inputs(fixture)
    with torch.no_grad():
        assert sqnr_db(fixture.model(*inputs), qmodel(*inputs)) >= SQNR_FLOOR[name]


def test_every_seed_model_is_covered():
    assert set(SEED_MODELS) == set(SQNR_FLOOR)


def test_inplace_ops_are_not_dropped(quantized_seeds):
    fixture, qmodel = quantized_seeds["inplace_net"]
    x = fixture.example_inputs[0]
    expected = (x + 1.0) * 2  # z = x + 0; z += 1.0; z.mul_(2)
    with torch.no_grad():
        assert (qmodel(x) - expected).abs().max() < 0.1 * expected.abs().max()


def test_relu6_leaves_no_activation_op(quantized_seeds):
    _, qmodel = quantized_seeds["relu6_net"]
    graph = qmodel.model.graph
    modules = dict(qmodel.model.named_modules())
    for node in graph.nodes:
        assert not (node.op == "call_module" and isinstance(modules[node.target], (torch.nn.ReLU6, torch.nn.Hardtanh)))
        assert node.target not in (torch.nn.functional.relu6, torch.nn.functional.hardtanh, "clamp", torch.clamp)


def test_control_flow_argument_is_bound_and_checked(quantized_seeds):
    fixture, qmodel = quantized_seeds["control_flow_net"]
    x = fixture.example_inputs[0]
    with torch.no_grad():
        assert qmodel(x).shape == fixture.model(x).shape
        assert qmodel(x, embed=False).shape == fixture.model(x, embed=False).shape
        with pytest.raises(Exception, match="embed"):
            qmodel(x, embed=True)


def test_untraceable_parts_are_reported(quantized_seeds):
    _, qmodel = quantized_seeds["hf_style_net"]
    report = fxq.report(qmodel)
    assert "gate" in report.float_parts and "item assignment" in report.float_parts["gate"]
    _, top = quantized_seeds["hf_style_toplevel_net"]
    top_report = fxq.report(top)
    assert "<model>" in top_report.float_parts
    assert top_report.quantized_ops > 0  # the traceable children are int8


def test_unsupported_ops_run_in_float_islands(quantized_seeds):
    _, qmodel = quantized_seeds["zeros_like_maxpool3d_net"]
    report = fxq.report(qmodel)
    assert any("zeros_like" in node.reason for node in report.float_nodes)
    assert report.quantized_ops > 0
    assert "nodes kept float" in str(report)


def test_original_model_is_bit_identical():
    fixture = SEED_MODELS["prelu_net"]()
    fixture.model.train()  # the training flag must survive too
    before = copy.deepcopy(fixture.model.state_dict())
    _quantize(fixture)
    assert fixture.model.training
    after = fixture.model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
