"""Real data: CNNs trained on scikit-learn's digits keep their accuracy in int8."""
import pytest
import torch

import fxq
from digits import DigitsPReLUNet, DigitsReLU6Net, accuracy, load_digits_split, train
from zoo import plain_fx_int8

MAX_ACCURACY_DROP = 0.010  # 1.0 point


@pytest.fixture(scope="module")
def data():
    return load_digits_split()


def _calibration(data, batches=16, batch_size=32):
    return [data.x_train[i * batch_size:(i + 1) * batch_size] for i in range(batches)]


@pytest.mark.parametrize("net_class", [DigitsPReLUNet, DigitsReLU6Net])
def test_int8_accuracy_within_one_point(data, net_class):
    torch.manual_seed(0)
    model = train(net_class(), data=data)
    fp32 = accuracy(model, data.x_test, data.y_test)
    qmodel = fxq.quantize(model, data.x_train[:1], calibration_data=_calibration(data))
    int8 = accuracy(qmodel, data.x_test, data.y_test)
    print(f"{net_class.__name__}: fp32 {fp32:.4f} int8 {int8:.4f}")
    assert fp32 >= 0.95
    assert int8 >= fp32 - MAX_ACCURACY_DROP


def test_prelu_net_plain_fx_collapses_where_fxq_does_not(data):
    """The PReLU kernel bug fxq works around: plain FX loses most of the accuracy."""
    torch.manual_seed(0)
    model = train(DigitsPReLUNet(), data=data)
    plain = accuracy(plain_fx_int8(model, (data.x_train[:1],), [(b,) for b in _calibration(data)]),
                     data.x_test, data.y_test)
    ours = accuracy(fxq.quantize(model, data.x_train[:1], calibration_data=_calibration(data)),
                    data.x_test, data.y_test)
    print(f"digits PReLU net: plain FX int8 {plain:.4f}, fxq int8 {ours:.4f}")
    assert ours > plain + 0.2
