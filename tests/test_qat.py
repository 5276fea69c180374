"""Quantization-aware training: fxq.prepare_qat -> train -> freeze_bn -> freeze_observers -> convert.

Accuracy on the trained digits CNN (Conv-BN-PReLU twice with a residual add, tests/digits.py),
QAT fine-tuned from its fp32 weights; unit behaviour on the same net and on seed-model fixtures.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxq
from digits import BATCH_SIZE, DigitsPReLUNet, accuracy, load_digits_split, train
from fxq import pipeline, quant
from fxq.passes.base import PassResult
from metrics import sqnr_db
from seed_models import make_inplace_conv_net, make_prelu_net, make_standalone_bn_net, recalibrate_batchnorm

#: QAT recipe: Adam at 1% of the fp32 peak rate; BN frozen after the first epoch, qparams after
#: the second, so the last epoch trains against the int8 model's own scales.
QAT_EPOCHS = 3
QAT_LEARNING_RATE = 1e-4
FREEZE_BN_AFTER = 1
FREEZE_OBSERVERS_AFTER = 2
MAX_QAT_DROP = 0.005  # 0.5 point below fp32 on the 450 held-out images
W4A4 = dict(weight_bits=4, activation_bits=4)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # Ops this small gain nothing from a second thread, and on a shared 2-core machine its
    # spin-waiting made the digits training several times slower (see digits.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return load_digits_split()


@pytest.fixture(scope="module")
def fp32_model(data):
    torch.manual_seed(0)
    return train(DigitsPReLUNet(), data=data)


def _calibration(data, batches=16, batch_size=32):
    return [data.x_train[i * batch_size:(i + 1) * batch_size] for i in range(batches)]


def _train_steps(prepared, data, generator, optimizer, steps=None):
    prepared.train()
    order = torch.randperm(len(data.x_train), generator=generator).split(BATCH_SIZE)
    for batch in order[:steps]:
        optimizer.zero_grad()
        F.cross_entropy(prepared(data.x_train[batch]), data.y_train[batch]).backward()
        optimizer.step()


def _qat(model, data, backend="x86"):
    """The documented flow, seeded: prepare, train, freeze BN, freeze observers, train, convert."""
    torch.manual_seed(0)
    prepared = fxq.prepare_qat(model, data.x_train[:1], backend=backend)
    optimizer = torch.optim.Adam(prepared.parameters(), lr=QAT_LEARNING_RATE)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(QAT_EPOCHS):
        if epoch == FREEZE_BN_AFTER:
            fxq.freeze_bn(prepared)
        if epoch == FREEZE_OBSERVERS_AFTER:
            fxq.freeze_observers(prepared)
        _train_steps(prepared, data, generator, optimizer)
    return fxq.convert(prepared)


def _ptq(model, data, backend="x86"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        return fxq.quantize(model, data.x_train[:1], calibration_data=_calibration(data), backend=backend)


def _prepared_digits(fp32_model, data, backend="x86", steps=4):
    """A prepared digits net after a few training steps (observers have ranges, BN batch stats moved)."""
    torch.manual_seed(0)
    prepared = fxq.prepare_qat(fp32_model, data.x_train[:1], backend=backend)
    _train_steps(prepared, data, torch.Generator().manual_seed(0),
                 torch.optim.Adam(prepared.parameters(), lr=QAT_LEARNING_RATE), steps)
    return prepared


def _fake_quantizers(prepared):
    return [m for m in prepared.modules() if isinstance(m, quant.FakeQuantize)]


# --- accuracy ------------------------------------------------------------------------------


def test_8_bit_qat_keeps_fp32_accuracy(fp32_model, data):
    """Measured: fp32 98.44%, PTQ x86 98.44%, QAT x86 98.67%. The test machine has no VNNI: PTQ
    keeps the better of x86's two precision splits (8-bit activations x 7-bit weights here), QAT
    trains for the first (7 x 8). PTQ loses nothing here; QAT must not lose either."""
    fp32 = accuracy(fp32_model, data.x_test, data.y_test)
    ptq = accuracy(_ptq(fp32_model, data), data.x_test, data.y_test)
    qat = accuracy(_qat(fp32_model, data), data.x_test, data.y_test)
    print(f"digits 8-bit: fp32 {fp32:.4f} PTQ {ptq:.4f} QAT {qat:.4f}")
    assert qat >= ptq
    assert qat >= fp32 - MAX_QAT_DROP


def test_qat_recovers_4_bit_accuracy(fp32_model, data):
    """4-bit weights alone cost nothing on this net (PTQ w4a8 98.44% = fp32), so weights and
    activations are both 4-bit. Measured: fp32 98.44%, PTQ w4a4 95.78%, QAT w4a4 96.67%
    (over four batch-order seeds QAT ranged 96.7-97.8%)."""
    backend = fxq.reference_backend(**W4A4)
    ptq = accuracy(_ptq(fp32_model, data, backend), data.x_test, data.y_test)
    qat = accuracy(_qat(fp32_model, data, backend), data.x_test, data.y_test)
    print(f"digits w4a4: PTQ {ptq:.4f} QAT {qat:.4f}")
    assert qat > ptq


# --- prepare_qat ---------------------------------------------------------------------------


def test_prepare_qat_keeps_batchnorm_for_torch_qat_convbn(fp32_model, data):
    prepared = fxq.prepare_qat(fp32_model, data.x_train[:1])
    conv_bns = [m for m in prepared.modules() if type(m) is quant.nniqat.ConvBn2d]
    assert len(conv_bns) == 2  # conv1+bn1, conv2+bn2: folded by torch while training, not by fxq before
    assert all(m.training and not m.freeze_bn and isinstance(m.weight_fake_quant, quant.FakeQuantize)
               for m in conv_bns)
    passes = [name for name, _ in pipeline.passes_for(fxq.get_backend("x86"), qat=True)]
    assert "lower_batchnorm" not in passes and "pad_depthwise_channels" not in passes
    assert "decompose_prelu" in passes and "functionalize_inplace" in passes


class _PairingsNet(nn.Module):
    """Each conv/Linear + BatchNorm/activation pairing that QAT treats its own way."""

    def __init__(self):
        super().__init__()
        self.conv_bn_relu = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv_bn_relu6 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.up_bn = nn.Sequential(nn.ConvTranspose2d(8, 4, 2, stride=2), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 16 * 16, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.up_bn(self.conv_bn_relu6(self.conv_bn_relu(x))))


def test_conv_bn_pairings_become_torch_qat_modules_or_fall_back_cleanly():
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8),) for _ in range(6)]
    model = recalibrate_batchnorm(_PairingsNet(), batches)
    prepared = fxq.prepare_qat(model, batches[0])
    types = [type(m) for m in prepared.model.modules()]
    assert types.count(quant.nniqat.ConvBnReLU2d) == 1 and types.count(quant.nniqat.LinearBn1d) == 1
    # No QAT module for conv + BN + clamp: a ConvBn, then the ReLU6 as its own int8 op.
    assert types.count(quant.nniqat.ConvBn2d) == 1 and types.count(nn.ReLU6) == 1
    # None for a transposed conv + BN (torch's fuser raises in QAT): that BN folds before training.
    assert types.count(nn.BatchNorm2d) == 2  # the two inside the ConvBn modules
    qmodel = _frozen_and_converted(prepared, batches[:4])
    folded = [change for r in fxq.report(qmodel).passes[""] if r.name == "fold_batchnorm" for change in r.changes]
    assert folded == ["folded BatchNorm 'up_bn.1' into 'up_bn.0'"]
    with torch.no_grad():  # 21.9 dB measured: torch has no QAT transposed conv, so its weights
        # train unrounded (30.1 dB with fxq.simulation_of("x86"); exact without the transposed conv)
        assert sqnr_db(prepared(*batches[-1]), qmodel(*batches[-1])) > 20


def test_prepare_qat_checks_every_rewrite_for_float_equivalence(monkeypatch, fp32_model, data):
    def broken_pass(gm):
        conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            conv.weight.mul_(1.01)
        return PassResult(gm, True, ["scaled conv weights"])

    every_pass = pipeline.passes_for
    monkeypatch.setattr(pipeline, "passes_for", lambda *a, **k: [("broken", broken_pass), *every_pass(*a, **k)])
    with pytest.raises(fxq.RewriteError, match="pass 'broken'"):
        fxq.prepare_qat(fp32_model, data.x_train[:1])


def test_reference_backend_fake_quantizes_at_its_bit_widths(fp32_model, data):
    prepared = fxq.prepare_qat(fp32_model, data.x_train[:1], backend=fxq.reference_backend(**W4A4))
    ranges = {(m.quant_min, m.quant_max) for m in _fake_quantizers(prepared)}
    assert ranges == {(-8, 7), (0, 15)}  # int4 symmetric weights, uint4 affine activations


def test_user_model_is_never_modified(fp32_model, data):
    model = copy.deepcopy(fp32_model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    prepared = _prepared_digits(model, data)
    fxq.freeze_bn(prepared)
    fxq.freeze_observers(prepared)
    fxq.convert(prepared)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not model.training and type(model.bn1) is nn.BatchNorm2d


# --- freeze_bn / freeze_observers ----------------------------------------------------------


def test_freeze_bn_switches_to_running_statistics(fp32_model, data):
    prepared = _prepared_digits(fp32_model, data)
    fxq.freeze_observers(prepared)  # so that only BN can change the output
    x = data.x_test[:64]
    with torch.no_grad():
        batch_statistics = prepared.train()(x)
        fxq.freeze_bn(prepared)
        running_statistics = prepared.train()(x)
        evaluated = prepared.eval()(x)
    assert all(m.freeze_bn for m in prepared.modules() if isinstance(m, quant.BATCHNORM_QAT_TYPES))
    assert not torch.allclose(batch_statistics, running_statistics)
    torch.testing.assert_close(running_statistics, evaluated)  # training now normalizes like eval


def test_freeze_bn_warns_about_batchnorms_it_cannot_freeze():
    fixture = make_standalone_bn_net()
    prepared = fxq.prepare_qat(fixture.model, fixture.example_inputs)
    with pytest.warns(fxq.FxqWarning, match="no QAT conv/Linear module holds .*input_bn.*cat_bn, flat_bn"):
        fxq.freeze_bn(prepared)


def test_freeze_observers_fixes_qparams(fp32_model, data):
    prepared = _prepared_digits(fp32_model, data)
    optimizer = torch.optim.Adam(prepared.parameters(), lr=QAT_LEARNING_RATE)
    generator = torch.Generator().manual_seed(1)

    def qparams():
        return [(m.scale.clone(), m.zero_point.clone()) for m in _fake_quantizers(prepared)]

    def changed(before):
        return any(not (torch.equal(s, s2) and torch.equal(z, z2)) for (s, z), (s2, z2) in zip(before, qparams()))

    before = qparams()
    _train_steps(prepared, data, generator, optimizer, steps=2)
    assert changed(before)  # observers on: ranges follow the batches and the weights
    fxq.freeze_observers(prepared)
    before = qparams()
    _train_steps(prepared, data, generator, optimizer, steps=2)
    assert not changed(before)


# --- convert -------------------------------------------------------------------------------


def _frozen_and_converted(prepared, batches):
    with torch.no_grad():
        for batch in batches:
            prepared(*batch)
    fxq.freeze_bn(prepared)
    fxq.freeze_observers(prepared)
    qmodel = fxq.convert(prepared)
    prepared.eval()
    return qmodel


def test_convert_computes_what_the_fake_quantized_model_computed(fp32_model, data):
    prepared = _prepared_digits(fp32_model, data)
    qmodel = _frozen_and_converted(prepared, [])
    with torch.no_grad():
        assert sqnr_db(prepared(data.x_test), qmodel(data.x_test)) > 35  # measured 44 dB with x86 kernels
    simulated = _prepared_digits(fp32_model, data, backend=fxq.reference_backend(**W4A4))
    qmodel = _frozen_and_converted(simulated, [])
    with torch.no_grad():  # a reference model computes the same float math as the fake quantizers
        torch.testing.assert_close(qmodel(data.x_test), simulated(data.x_test))


def test_convert_returns_a_quantized_model_with_the_quantize_report(fp32_model, data):
    prepared = _prepared_digits(fp32_model, data)
    qmodel = _frozen_and_converted(prepared, [])
    report = fxq.report(qmodel)
    assert isinstance(qmodel, fxq.QuantizedModel) and report.backend == "x86"
    assert report.quantized_ops > 0 and report.int8_bytes < report.fp32_bytes
    modified = {record.name for record in report.passes[""] if record.modified}
    assert "decompose_prelu" in modified and "fold_batchnorm" not in modified
    assert {"trace", "passes", "prepare", "convert"} <= set(report.stage_seconds)
    assert "decompose_prelu" in str(report)
    assert not any(isinstance(m, quant.FakeQuantize) for m in qmodel.modules())


@pytest.mark.parametrize("make_fixture", [make_prelu_net, make_inplace_conv_net], ids=["prelu", "inplace"])
def test_prelu_and_inplace_models_train_and_convert(make_fixture):
    fixture = make_fixture()
    prepared = fxq.prepare_qat(fixture.model, fixture.example_inputs)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    for (x,) in fixture.calibration[:4]:
        optimizer.zero_grad()
        prepared(x).square().mean().backward()
        optimizer.step()
    assert all(p.grad is not None for p in prepared.parameters())  # every weight trains
    qmodel = _frozen_and_converted(prepared, fixture.calibration[4:8])
    x = fixture.calibration[-1]
    with torch.no_grad():
        assert sqnr_db(prepared(*x), qmodel(*x)) > 20
    assert {"decompose_prelu", "functionalize_inplace"} & {
        r.name for r in fxq.report(qmodel).passes[""] if r.modified}


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("step", [fxq.freeze_bn, fxq.freeze_observers, fxq.convert])
def test_steps_need_a_prepared_model(step, fp32_model):
    with pytest.raises(fxq.InvalidInputError, match=rf"fxq.{step.__name__} needs the model fxq.prepare_qat returned"):
        step(fp32_model)


def test_convert_says_what_to_do_with_wrapped_untrained_or_int8_models(fp32_model, data):
    prepared = fxq.prepare_qat(fp32_model, data.x_train[:1])
    with pytest.raises(fxq.InvalidInputError, match=r"not the DataParallel around it: pass its \.module"):
        fxq.convert(nn.DataParallel(prepared))
    with pytest.raises(fxq.CalibrationError, match="never saw data"):
        fxq.convert(prepared)  # not trained: every scale is still a placeholder
    tiny = nn.Sequential(nn.Conv2d(1, 2, 3)).eval()
    with pytest.raises(fxq.InvalidInputError, match="already int8"):
        fxq.convert(fxq.quantize(tiny, data.x_train[:1], calibration_data=[data.x_train[:8]]))


def test_prepare_qat_rejects_bad_input(fp32_model, data):
    with pytest.raises(fxq.InvalidInputError, match="fxq.prepare_qat needs a torch.nn.Module"):
        fxq.prepare_qat(lambda x: x, data.x_train[:1])
    with pytest.raises(fxq.InvalidInputError, match="example_inputs do not run"):
        fxq.prepare_qat(fp32_model, torch.randn(1, 3, 8, 8))
    with pytest.raises(fxq.BackendError, match="unknown backend"):
        fxq.prepare_qat(fp32_model, data.x_train[:1], backend="no_such_backend")
