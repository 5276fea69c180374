"""fxq.precision: a backend's alternative precision splits, calibrated together, the best kept."""
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import fxq
from fxq import precision
from fxq.backends.x86 import PRODUCT_BITS, x86
from fxq.tensors import sqnr_db
from seed_models import make_standalone_bn_net


def _quantize(model, example_inputs, batches, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        return fxq.quantize(model, example_inputs, calibration_data=batches, **kwargs)


def test_x86_uses_torchs_split_and_offers_the_other_without_vnni():
    assert x86.max_product_bits == PRODUCT_BITS
    assert dataclasses.replace(x86, max_product_bits=None).alternatives == ()  # torch's split, always
    splits = (x86, *x86.alternatives)
    if torch.cpu._is_vnni_supported():
        assert [b.precision for b in splits] == ["8-bit activations x 8-bit weights"]
    else:
        assert [b.precision for b in splits] == ["7-bit activations x 8-bit weights",
                                                 "8-bit activations x 7-bit weights"]
    assert all(b.name == "x86" and b.engine == "x86" for b in splits)


def test_simulation_of_a_backend_simulates_its_alternatives_too():
    simulated = fxq.simulation_of(x86)
    assert [b.precision for b in simulated.alternatives] == [b.precision for b in x86.alternatives]
    assert all(b.reference and b.engine is None for b in simulated.alternatives)


def _limited(activation_bits: int, weight_bits: int, product_bits: int, reduce: str) -> fxq.Backend:
    backend = fxq.reference_backend(weight_bits, activation_bits, name=f"limited_{reduce}")
    spec = getattr(backend, reduce)
    return dataclasses.replace(backend, **{reduce: dataclasses.replace(spec, reduce_range=True)},
                               max_product_bits=product_bits)


def test_alternatives_are_the_other_split_of_the_product_bits():
    backend = _limited(8, 8, 15, "activation")
    assert backend.precision == "7-bit activations x 8-bit weights"
    assert [b.precision for b in backend.alternatives] == ["8-bit activations x 7-bit weights"]
    # derived from the backend's own specs: a replaced weight spec shows up in the alternative
    per_tensor = dataclasses.replace(backend, weight=dataclasses.replace(backend.weight, per_channel=False))
    assert [b.weight.per_channel for b in per_tensor.alternatives] == [False]
    assert fxq.reference_backend().alternatives == ()  # no product limit, nothing to trade


def test_specs_that_do_not_fit_the_product_bits_are_refused():
    with pytest.raises(fxq.BackendError, match="16 bits per product, the kernels have 15"):
        dataclasses.replace(fxq.reference_backend(), max_product_bits=15)


def test_pick_takes_the_best_score_and_the_first_of_equals():
    assert precision.pick([10.0, 12.5, 11.0]) == 1
    assert precision.pick([12.5, 12.5]) == 0
    assert precision.pick([float("-inf"), 3.0]) == 1


def test_dynamic_mode_has_nothing_to_choose():
    backend = _limited(8, 8, 15, "activation")
    assert precision.candidates(backend, "dynamic") == (backend,)
    assert len(precision.candidates(backend, "static")) == 2


class _Counter(nn.Module):
    def __init__(self, offset):
        super().__init__()
        self.offset, self.calls = offset, 0

    def forward(self, x):
        self.calls += 1
        return x + self.offset


def test_fan_out_feeds_every_candidate_every_batch():
    first, second = _Counter(1.0), _Counter(2.0)
    fan_out = precision.CalibrationFanOut([first, second])
    for i in range(5):
        torch.testing.assert_close(fan_out(torch.full((2,), float(i))), torch.full((2,), i + 1.0))  # the first's
    assert first.calls == second.calls == 5


class _Loader:
    """A sized, lazily read batch source (like a DataLoader) that counts the batches read."""

    def __init__(self, batches):
        self.batches, self.read = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.read += 1
            yield batch


def _batches(count, size):
    return [torch.full((size, 3), float(i)) for i in range(count)]


def test_hold_out_takes_enough_samples_from_the_first_quarter_and_reads_lazily():
    loader = _Loader(_batches(16, 8))  # 16 x 8 samples: the first 4 batches hold the 32 needed
    scoring, rest = precision.hold_out(_Counter(0.5), loader, candidate_count=2)
    assert [args[0][0, 0].item() for args, _ in scoring] == [0, 1, 2, 3]
    torch.testing.assert_close(scoring[0][1], scoring[0][0][0] + 0.5)  # the float model's output
    assert loader.read == 4 and len(rest) == 12  # the rest is not read yet
    assert [batch[0, 0].item() for batch in rest] == list(range(4, 16))


def test_hold_out_leaves_every_batch_to_calibration_without_enough_data():
    for batches, candidates, count in [(_batches(16, 4), 2, 16),           # 4 batches of 4: 16 samples < 32
                                       (iter(_batches(40, 8)), 2, 40),     # one-shot: no length to budget by
                                       (_batches(40, 8), 1, 40)]:          # nothing to choose
        scoring, rest = precision.hold_out(_Counter(0.0), batches, candidate_count=candidates)
        assert scoring == []
        assert [batch[0, 0].item() for batch in rest] == list(range(count))


def test_nan_batches_are_refused_held_out_or_not():
    for bad in (1, 9):
        batches = _batches(16, 8)
        batches[bad][0, 0] = float("nan")
        with pytest.raises(fxq.CalibrationError, match=f"calibration batch {bad} has NaN"):
            _quantize(_conv_net_1d(), (torch.randn(1, 3),), batches, backend=_limited(3, 8, 10, "activation"))


def _conv_net_1d():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()


def test_quantize_keeps_the_more_accurate_split_and_says_so():
    # 2-bit activations x 8-bit weights listed first; its alternative, 3 x 7, is far better.
    backend = _limited(3, 8, 10, "activation")
    better = backend.alternatives[0]
    assert (backend.precision, better.precision) == ("2-bit activations x 8-bit weights",
                                                     "3-bit activations x 7-bit weights")
    model = _conv_net()
    batches = [torch.randn(8, 3, 12, 12) for _ in range(16)]  # 4 batches (32 samples) held out to score on
    qmodel = _quantize(model, (torch.randn(1, 3, 12, 12),), batches, backend=backend)
    notes = [note for note in fxq.report(qmodel).notes if note.startswith("precision:")]
    assert len(notes) == 1 and f"kept {better.precision}" in notes[0]
    one_shot = _quantize(model, (torch.randn(1, 3, 12, 12),), iter(batches), backend=backend)
    notes = [note for note in fxq.report(one_shot).notes if note.startswith("precision:")]
    assert len(notes) == 1 and f"{backend.precision}, the backend's default" in notes[0] and "not tried" in notes[0]
    assert fxq.report(one_shot).precision == backend.precision
    only_better = dataclasses.replace(better, max_product_bits=None)
    only_worse = dataclasses.replace(backend, max_product_bits=None)
    calibration = [torch.randn(4, 3, 12, 12) for _ in range(6)]
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        chosen_db = sqnr_db(model(x), qmodel(x))
        better_db = sqnr_db(model(x), _quantize(model, x[:1], calibration, backend=only_better)(x))
        worse_db = sqnr_db(model(x), _quantize(model, x[:1], calibration, backend=only_worse)(x))
    assert better_db > worse_db + 3.0
    assert abs(chosen_db - better_db) < 1.5


def test_a_backend_without_alternatives_adds_no_precision_note():
    model = _conv_net()
    qmodel = _quantize(model, (torch.randn(1, 3, 12, 12),), [torch.randn(4, 3, 12, 12)], backend="qnnpack")
    assert not [note for note in fxq.report(qmodel).notes if note.startswith("precision:")]


@pytest.mark.skipif(torch.cpu._is_vnni_supported(), reason="with VNNI x86 has one split; nothing is chosen")
def test_x86_without_vnni_reports_its_choice_on_a_seed_model():
    fixture = make_standalone_bn_net()
    torch.manual_seed(0)
    batches = [torch.cat([fixture.sample()[0] for _ in range(2)]) for _ in range(16)]  # 16 x 8 samples
    qmodel = _quantize(fixture.model, fixture.example_inputs, batches, backend=x86)
    notes = [note for note in fxq.report(qmodel).notes if note.startswith("precision:")]
    assert len(notes) == 1
    assert all(split.precision in notes[0] for split in (x86, *x86.alternatives))
    used = precision.split_used(x86, qmodel.report)  # what sensitivity/fallback re-quantize with
    assert used.precision == qmodel.report.precision and f"kept {used.precision}" in notes[0]
