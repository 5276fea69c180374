"""fxq.sensitivity and fxq.quantize(target_sqnr=...): the most damaging layers, and keeping them float."""
import time
import warnings

import pytest
import torch

import fxq
from fxq.requantize import output_sqnr, split_calibration
from test_compare import PER_TENSOR_WEIGHTS, bad_layer_model
from zoo import make_zoo_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CI boxes: no oversubscription
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bad_case():
    model = bad_layer_model()
    torch.manual_seed(1)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(8)]
    return model, (batches[0][:1],), batches


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sensitivity_ranks_the_bad_layer_first(bad_case):
    model, example, batches = bad_case
    before = _state(model)
    result = fxq.sensitivity(model, example, batches, backend=PER_TENSOR_WEIGHTS, refine=2)
    assert [row["node"] for row in result.rows][0] == "c2"
    assert sorted(row["node"] for row in result.rows) == ["c1", "c2", "c3", "c4"]
    worst = result.worst(1)[0]
    assert worst["float_sqnr"] > result.output_sqnr + 15  # keeping c2 float really fixes the model
    assert worst["alone_sqnr"] < min(row["alone_sqnr"] for row in result.rows[1:]) - 15
    assert "c2" in str(result) and "all int8: output SQNR" in str(result)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_target_met_by_keeping_exactly_the_bad_layer_float(bad_case):
    model, example, batches = bad_case
    before = _state(model)
    qmodel = fxq.quantize(model, example, iter(batches), backend=PER_TENSOR_WEIGHTS, target_sqnr=30)
    record = fxq.report(qmodel).fallback
    assert record.met and record.sqnr_before < 25 and record.sqnr_after >= 30
    assert list(record.kept_float) == ["c2"] and "target output SQNR >= 30 dB" in record.kept_float["c2"]
    assert [n.target for n in fxq.report(qmodel).float_nodes] == ["c2"]
    _, held_out = split_calibration(batches, example)
    assert output_sqnr(model, qmodel, held_out) == pytest.approx(record.sqnr_after)
    assert "layers kept float for the target: 1" in str(fxq.report(qmodel))
    assert fxq.compare(model, qmodel, batches[-1]).rows[1]["runs"] == "float"  # compare sees the new graph
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_target_already_met_keeps_every_layer_int8(bad_case):
    model, example, batches = bad_case
    qmodel = fxq.quantize(model, example, batches, backend=PER_TENSOR_WEIGHTS, target_sqnr=5)
    record = fxq.report(qmodel).fallback
    assert record.met and record.trials == 0 and not record.kept_float


def test_unreachable_target_warns_and_keeps_the_best_found(bad_case):
    model, example, batches = bad_case
    start = time.perf_counter()
    with pytest.warns(fxq.FxqWarning, match="not met"):
        qmodel = fxq.quantize(model, example, batches, backend=PER_TENSOR_WEIGHTS,
                              target=fxq.Target(sqnr=200, max_float_layers=2, max_trials=3))
    record = fxq.report(qmodel).fallback
    assert not record.met and record.trials <= 3 and len(record.kept_float) <= 2
    assert record.sqnr_after > record.sqnr_before + 15 and "NOT met" in str(record)
    assert time.perf_counter() - start < 60


def test_accuracy_target_and_bad_arguments(bad_case):
    model, example, batches = bad_case
    calls = []

    def accuracy(qmodel):  # any metric the user trusts; here, SQNR on one batch
        calls.append(1)
        return output_sqnr(model, qmodel, [(batches[0],)])
    qmodel = fxq.quantize(model, example, batches, backend=PER_TENSOR_WEIGHTS,
                          target=fxq.Target(accuracy_fn=accuracy, accuracy=30))
    record = fxq.report(qmodel).fallback
    assert record.met and record.accuracy_after >= 30 > record.accuracy_before and calls
    with pytest.raises(fxq.InvalidInputError, match="accuracy_fn and accuracy together"):
        fxq.Target(accuracy_fn=accuracy)
    with pytest.raises(fxq.InvalidInputError, match="not both"):
        fxq.quantize(model, example, batches, target_sqnr=30, target=fxq.Target(sqnr=30))


@pytest.mark.slow
def test_torchvision_model_gains_6_db_with_few_float_layers():
    fixture = make_zoo_model(ZOO_MODEL)
    calibration, held_out = split_calibration(fixture.calibration, fixture.example_inputs)
    plain = fxq.quantize(fixture.model, fixture.example_inputs, calibration)
    baseline = output_sqnr(fixture.model, plain, held_out)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxq.FxqWarning)  # the target must be met
        qmodel = fxq.quantize(fixture.model, fixture.example_inputs, fixture.calibration, target_sqnr=baseline + 6)
    record = fxq.report(qmodel).fallback
    assert record.sqnr_before == pytest.approx(baseline, abs=0.01)
    assert record.met and output_sqnr(fixture.model, qmodel, held_out) >= baseline + 6
    assert 1 <= len(record.kept_float) <= MAX_FLOAT_LAYERS
    assert fxq.report(qmodel).quantized_ops > fxq.report(plain).quantized_ops // 2


ZOO_MODEL, MAX_FLOAT_LAYERS = "resnet18", 12
