"""Every built-in backend on the trained digits CNNs: accuracy at 8 bits, agreement of the
8-bit reference simulation with real x86 int8, and what 6- and 4-bit simulation costs."""
import warnings

import pytest
import torch

import fxq
from digits import DigitsPReLUNet, DigitsReLU6Net, accuracy, load_digits_split, train

NETS = [DigitsPReLUNet, DigitsReLU6Net]
MAX_INT8_DROP = 0.010  # 1.0 point, x86 and qnnpack
MIN_REFERENCE_AGREEMENT = 0.99  # reference 8-bit vs x86 int8 predictions
#: Simulated bit widths -> largest accuracy drop allowed (points / 100).
LOW_BIT_MAX_DROP = {"w6a6": 0.02, "w4a8": 0.03}
LOW_BIT = {"w6a6": (6, 6), "w4a8": (4, 8)}


@pytest.fixture(scope="module")
def data():
    return load_digits_split()


@pytest.fixture(scope="module")
def trained(data):
    """Each net trained once for the whole module."""
    models = {}
    for net_class in NETS:
        torch.manual_seed(0)
        models[net_class.__name__] = train(net_class(), data=data)
    return models


def _calibration(data, batches=16, batch_size=32):
    return [data.x_train[i * batch_size:(i + 1) * batch_size] for i in range(batches)]


def _predictions(model, data, backend=None):
    if backend is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxq.FxqWarning)
            model = fxq.quantize(model, data.x_train[:1], calibration_data=_calibration(data), backend=backend)
    with torch.no_grad():
        return model(data.x_test).argmax(dim=1)


def _accuracy(predictions, data) -> float:
    return (predictions == data.y_test).float().mean().item()


@pytest.mark.parametrize("net", [n.__name__ for n in NETS])
def test_8_bit_backends_keep_accuracy_and_reference_agrees_with_x86(trained, data, net):
    model = trained[net]
    fp32 = accuracy(model, data.x_test, data.y_test)
    predictions = {name: _predictions(model, data, name) for name in ("x86", "qnnpack", "reference")}
    scores = {name: _accuracy(p, data) for name, p in predictions.items()}
    agreement = (predictions["reference"] == predictions["x86"]).float().mean().item()
    print(f"{net}: fp32 {fp32:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in scores.items())
          + f"; reference agrees with x86 on {agreement:.2%}")
    assert fp32 >= 0.95
    assert scores["x86"] >= fp32 - MAX_INT8_DROP and scores["qnnpack"] >= fp32 - MAX_INT8_DROP
    assert agreement >= MIN_REFERENCE_AGREEMENT


@pytest.mark.parametrize("net", [n.__name__ for n in NETS])
def test_low_bit_simulation_accuracy(trained, data, net):
    model = trained[net]
    fp32 = accuracy(model, data.x_test, data.y_test)
    scores = {label: _accuracy(_predictions(model, data, fxq.reference_backend(*bits)), data)
              for label, bits in LOW_BIT.items()}
    print(f"{net}: fp32 {fp32:.4f} " + " ".join(f"reference {k} {v:.4f}" for k, v in scores.items()))
    for label, score in scores.items():
        assert score >= fp32 - LOW_BIT_MAX_DROP[label], label
