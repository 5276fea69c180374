"""fxq.save / fxq.load and TorchScript export round trips on the seed models."""
import warnings

import pytest
import torch

import fxq
from fxq.serialize import export_torchscript, load, save
from seed_models import SEED_MODELS

#: Seed models with parts fxq runs as plain Python: export must refuse them, naming the part.
EAGER_PARTS = {"hf_style_net": "gate", "hf_style_toplevel_net": "<model>"}


@pytest.fixture(scope="module")
def quantized_seeds():
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FxqWarning)
        for name, make in SEED_MODELS.items():
            fixture = make()
            results[name] = (fixture, fxq.quantize(fixture.model, fixture.example_inputs, fixture.calibration[:2]))
    return results


def _fresh(fixture):
    torch.manual_seed(7)
    return fixture.sample()


@pytest.mark.parametrize("name", sorted(SEED_MODELS))
def test_save_load_gives_identical_outputs(quantized_seeds, tmp_path, name):
    fixture, qmodel = quantized_seeds[name]
    path = save(qmodel, tmp_path / f"{name}.pt")
    loaded = load(path)
    inputs = _fresh(fixture)
    with torch.no_grad():
        assert torch.equal(qmodel(*inputs), loaded(*inputs))
    assert str(fxq.report(loaded)) == str(fxq.report(qmodel))
    assert loaded.float_graphs.keys() == qmodel.float_graphs.keys()
    assert loaded.state_dict().keys() == qmodel.state_dict().keys()


@pytest.mark.parametrize("name", sorted(set(SEED_MODELS) - set(EAGER_PARTS)))
def test_torchscript_export_runs_after_reload(quantized_seeds, tmp_path, name):
    fixture, qmodel = quantized_seeds[name]
    path = tmp_path / f"{name}.ts"
    export_torchscript(qmodel, fixture.example_inputs, path)
    reloaded = torch.jit.load(str(path))
    inputs = _fresh(fixture)
    with torch.no_grad():
        assert torch.equal(qmodel(*inputs), reloaded(*inputs))


@pytest.mark.parametrize("name", sorted(EAGER_PARTS))
def test_export_refuses_eager_parts_and_names_them(quantized_seeds, tmp_path, name):
    fixture, qmodel = quantized_seeds[name]
    with pytest.raises(fxq.FxqError, match="run as plain Python") as error:
        export_torchscript(qmodel, fixture.example_inputs, tmp_path / "model.ts")
    assert EAGER_PARTS[name] in str(error.value)
    assert not (tmp_path / "model.ts").exists()


def test_load_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(fxq.InvalidInputError, match="not written by fxq.save"):
        load(tmp_path / "plain.pt")
    with pytest.raises(fxq.InvalidInputError, match="no such file"):
        load(tmp_path / "missing.pt")


def test_save_leaves_the_model_usable(quantized_seeds, tmp_path):
    fixture, qmodel = quantized_seeds["relu6_net"]
    inputs = _fresh(fixture)
    with torch.no_grad():
        before = qmodel(*inputs)
        save(qmodel, tmp_path / "a.pt")
        assert torch.equal(before, qmodel(*inputs))
    assert isinstance(qmodel.model, torch.fx.GraphModule)
