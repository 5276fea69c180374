"""fxq.compare: per-node SQNR, matched through the graphs, finds the layer that breaks int8."""
import dataclasses
import math

import pytest
import torch
import torch.nn as nn

import fxq
from fxq.backends import QuantSpec, get_backend
from fxq.compare import compare
from metrics import sqnr_db


class FourConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.r1 = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.c2, self.r2 = nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        self.c3, self.r3 = nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        self.c4 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.c4(self.r3(self.c3(self.r2(self.c2(self.r1(self.c1(x)))))))


def bad_layer_model() -> nn.Module:
    """c2 has one huge weight, on an input channel that is always zero: harmless in float,
    but with per-tensor weights it sets the scale of every other weight of c2 (most become 0)."""
    torch.manual_seed(0)
    model = FourConvs().eval()
    with torch.no_grad():
        model.c1.weight[0].zero_()
        model.c1.bias[0] = -1.0  # channel 0 of c1 is dead after the ReLU
        model.c2.weight[3, 0, 1, 1] = 50.0
    return model


PER_TENSOR_WEIGHTS = dataclasses.replace(
    get_backend("x86"), name="x86_per_tensor_weights",
    weight=QuantSpec(dtype=torch.qint8, symmetric=True, per_channel=False, observer="minmax"))


@pytest.fixture(scope="module")
def bad_case():
    model = bad_layer_model()
    torch.manual_seed(1)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    qmodel = fxq.quantize(model, (batches[0][:1],), batches, backend=PER_TENSOR_WEIGHTS)
    return model, qmodel, torch.randn(4, 3, 16, 16)


def test_bad_layer_has_the_lowest_sqnr(bad_case):
    model, qmodel, inputs = bad_case
    result = compare(model, qmodel, inputs)
    assert [row["node"] for row in result.rows] == ["c1", "c2", "c3", "c4"]  # graph order, fused convs matched
    assert result.worst(1)[0]["node"] == "c2"
    by_node = {row["node"]: row for row in result.rows}
    assert by_node["c2"]["layer_sqnr"] < 10 < 25 < min(by_node[n]["layer_sqnr"] for n in ("c1", "c3", "c4"))
    assert by_node["c2"]["sqnr"] < by_node["c1"]["sqnr"] - 20  # the end-to-end error jumps at c2


def test_rows_measure_the_real_activations(bad_case):
    model, qmodel, inputs = bad_case
    result = compare(model, qmodel, inputs)
    with torch.no_grad():
        assert result.output_sqnr == pytest.approx(sqnr_db(model(inputs), qmodel(inputs)))
        # c1 is fused conv+relu: compared with the float graph's relu, not the conv before it
        float_c1 = torch.relu(model.c1(inputs))
        int8_c1 = qmodel.model.c1(torch.quantize_per_tensor(inputs, *_input_qparams(qmodel), torch.quint8))
    assert result.rows[0]["sqnr"] == pytest.approx(sqnr_db(float_c1, int8_c1.dequantize()), abs=0.05)
    assert result.rows[-1]["sqnr"] == pytest.approx(result.output_sqnr, abs=0.05)


def _input_qparams(qmodel):
    (quantize,) = [n for n in qmodel.model.graph.nodes if n.target is torch.quantize_per_tensor]
    scale, zero_point = (getattr(qmodel.model, a.target) for a in quantize.args[1:3])
    return float(scale), int(zero_point)


def test_table_lists_every_row_and_the_output(bad_case):
    model, qmodel, inputs = bad_case
    text = str(compare(model, qmodel, inputs))
    assert all(name in text for name in ("c1", "c2", "c3", "c4", "ConvReLU2d", "output SQNR"))
    assert len(text.splitlines()) == 2 + 4 + 1


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.mean() > 0 else x  # data-dependent: fx cannot trace it, it stays float


def test_float_islands_appear_as_float_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Gate(), nn.Conv2d(4, 4, 1)).eval()
    qmodel = fxq.quantize(model, torch.randn(1, 3, 8, 8), [torch.randn(2, 3, 8, 8) for _ in range(2)])
    conv, gate = compare(model, qmodel, torch.randn(2, 3, 8, 8)).rows[:2]
    assert conv["node"] == "0" and conv["runs"] == "int8"
    assert gate["runs"] == "float" and "1" in gate["node"]
    # the float gate adds no error of its own: it passes on what the int8 conv before it lost
    assert gate["layer_sqnr"] == math.inf
    assert gate["sqnr"] == pytest.approx(conv["sqnr"], abs=0.5)


def test_compare_needs_an_fxq_model():
    with pytest.raises(fxq.InvalidInputError, match="not produced by fxq.quantize"):
        compare(nn.Linear(2, 2), nn.Linear(2, 2), torch.randn(1, 2))
