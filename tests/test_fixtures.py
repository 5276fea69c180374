"""The fixtures other tests lean on: seed models run, digits nets train, SQNR means what it says."""

import math
import time

import pytest
import torch
from torch import nn

from digits import DigitsPReLUNet, DigitsReLU6Net, accuracy, load_digits_split, train
from metrics import sqnr_db
from seed_models import NUM_CALIBRATION_BATCHES, SEED_MODELS, build_lipreading_net
from zoo import make_zoo_model

DIGITS_ACCURACY_FLOOR = 0.95
DIGITS_TIME_BUDGET_S = 20.0


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _has_default_statistics(norm) -> bool:
    return bool((norm.running_mean == 0).all() and (norm.running_var == 1).all())


@pytest.mark.parametrize("name", sorted(SEED_MODELS))
def test_seed_model_runs_eagerly_in_eval_mode(name):
    model, example_inputs, calibration, sample = SEED_MODELS[name]()
    assert not model.training
    with torch.no_grad():
        output = model(*example_inputs)
    assert torch.isfinite(output).all()
    assert len(calibration) == NUM_CALIBRATION_BATCHES
    for inputs in [*calibration, sample()]:
        assert [t.shape for t in inputs] == [t.shape for t in example_inputs]


@pytest.mark.parametrize("name", sorted(SEED_MODELS))
def test_seed_model_batchnorm_statistics_come_from_data(name):
    model = SEED_MODELS[name]().model
    assert not any(_has_default_statistics(norm) for norm in _batchnorms(model))


@pytest.mark.parametrize("build", [SEED_MODELS["prelu_net"], build_lipreading_net], ids=["prelu_net", "lipreading_net"])
def test_seed_model_is_deterministic(build):
    first, second = build(), build()  # lipreading_net: trained twice, uncached
    with torch.no_grad():
        torch.testing.assert_close(first.model(*first.example_inputs),
                                   second.model(*second.example_inputs), rtol=0, atol=0)


def test_static_and_dynamic_same_padding_agree():
    static, dynamic = SEED_MODELS["same_pad_static_net"](), SEED_MODELS["same_pad_dynamic_net"]()
    with torch.no_grad():
        torch.testing.assert_close(static.model(*static.example_inputs),
                                   dynamic.model(*static.example_inputs))


def test_zoo_model_has_recalibrated_batchnorm():
    model, example_inputs, calibration, _ = make_zoo_model("resnet18")
    assert not model.training and calibration
    assert not any(_has_default_statistics(norm) for norm in _batchnorms(model))
    with torch.no_grad():
        assert model(*example_inputs).shape == (2, 1000)


def test_sqnr_db_flattens_nested_outputs():
    reference = {"logits": torch.ones(4), "aux": (torch.ones(2), torch.ones(2))}
    actual = {"logits": torch.ones(4), "aux": (torch.ones(2), torch.full((2,), 1.1))}
    # signal 8, noise 2 * 0.1^2 = 0.02  ->  10 * log10(400)
    assert sqnr_db(reference, actual) == pytest.approx(10 * math.log10(400))
    assert sqnr_db(reference, reference) == math.inf


@pytest.mark.parametrize("net_class", [DigitsPReLUNet, DigitsReLU6Net])
def test_digits_net_trains_to_accuracy_floor_quickly(net_class):
    data = load_digits_split()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = train(net_class(), seed=0, data=data)
    elapsed = time.perf_counter() - start
    assert accuracy(model, data.x_test, data.y_test) >= DIGITS_ACCURACY_FLOOR
    # ~1-2 s alone; the budget leaves room for a machine shared with other test runs.
    assert elapsed < DIGITS_TIME_BUDGET_S
