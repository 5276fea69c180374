"""Quantization-aware training: ``prepare_qat`` -> train -> ``freeze_bn`` -> ``freeze_observers`` -> ``convert``.

``prepare_qat`` runs ``fxq.quantize``'s own first half (trace, the correctness passes, the dry
run; ``api.rewrite``) with the QAT pass list, which keeps BatchNorm; then torch's
``prepare_qat_fx`` puts fake quantizers with the backend's specs on every int8 value and turns
each conv+BN into a QAT ConvBn module that folds the BN the Jacob et al. (2018) way: batch
statistics while training, running statistics once frozen. ``convert`` is ``quantize``'s own
last half (``api.finish``), so the int8 model and its report are the ones ``quantize`` builds.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import torch
import torch.nn as nn

from fxq import quant
from fxq.api import QuantizedModel, Rewritten, call_traced, check_inputs, finish, prepare_units, rewrite
from fxq.backends import get_backend
from fxq.calibrate import FxqWarning
from fxq.distributed import sync_observers
from fxq.dump import stage_dumper
from fxq.errors import CalibrationError, InvalidInputError
from fxq.passes.channel_affine import BATCHNORM_TYPES


class QATModel(nn.Module):
    """What ``fxq.prepare_qat`` returns: the model with fake quantization, called and trained
    exactly like the original. ``model`` is the prepared module tree; ``rewritten`` what
    ``fxq.convert`` needs to finish the int8 model (the float graphs, the passes' records)."""

    def __init__(self, model: nn.Module, rewritten: Rewritten, bind_by_signature: bool):
        super().__init__()
        self.model = model
        self.rewritten = rewritten
        self.bind_by_signature = bind_by_signature

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return call_traced(self.model, self.rewritten.signature, self.bind_by_signature, args, kwargs, "QAT model")


def prepare_qat(model: nn.Module, example_inputs: Any, backend: Any = "x86") -> QATModel:
    """``model`` with fake quantization for quantization-aware training, in training mode.

    The model itself is never modified: train the returned module (an optimizer over its
    ``parameters()``), then ``fxq.freeze_bn``, ``fxq.freeze_observers`` and ``fxq.convert``.
    Weights are fake-quantized with their current range, activations with a moving average
    of recent batch ranges. A reference backend (``fxq.reference_backend(weight_bits=4)``)
    trains for its own bit widths.

    Example::

        prepared = fxq.prepare_qat(model, example_inputs)
        optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3)
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(prepared(x), y).backward()
            optimizer.step()
        fxq.freeze_bn(prepared)
        fxq.freeze_observers(prepared)
        qmodel = fxq.convert(prepared)
    """
    backend = get_backend(backend)
    example_inputs = check_inputs(model, example_inputs, caller="fxq.prepare_qat")
    rewritten = rewrite(model, example_inputs, backend, "static", stage_dumper(None), qat=True)
    prepared, root = prepare_units(rewritten, qat=True)
    rewritten = dataclasses.replace(rewritten, working=root)
    return QATModel(root, rewritten, bind_by_signature="" in prepared).train()


def freeze_bn(prepared: QATModel) -> QATModel:
    """Make every conv/linear + BatchNorm normalize with its running statistics from now on
    (and stop updating them), as the int8 model will; typically after an epoch or two of QAT.

    Example::

        fxq.freeze_bn(prepared)   # then train on: the BN statistics stay as they are
    """
    _check_prepared(prepared, "fxq.freeze_bn")
    quant.freeze_bn_stats(prepared.model)
    unfolded = _standalone_batchnorms(prepared.model)
    if unfolded:
        warnings.warn(f"fxq.freeze_bn: no QAT conv/Linear module holds {', '.join(unfolded)} (no conv or Linear "
                      "feeds only them), so they keep batch statistics in training mode; to freeze them too, call "
                      "prepared.model.get_submodule(name).eval() after each prepared.train()", FxqWarning, stacklevel=2)
    return prepared


def freeze_observers(prepared: QATModel) -> QATModel:
    """Fix every scale and zero point: fake quantization goes on with the ranges seen so far.

    Under torch.distributed, each rank's observers saw only its own batches: they are merged
    over the ranks here (``fxq.sync_observers``), before they are disabled.

    Example::

        fxq.freeze_observers(prepared)   # the last epoch trains with the int8 model's qparams
    """
    _check_prepared(prepared, "fxq.freeze_observers")
    sync_observers(prepared.model)
    quant.disable_observers(prepared.model)
    return prepared


def convert(prepared: QATModel) -> QuantizedModel:
    """The int8 model of a trained ``prepared``: the ``QuantizedModel`` (and report) that
    ``fxq.quantize`` builds. ``prepared`` is left as it was, so training may go on.

    Under torch.distributed, observers and BatchNorm statistics are merged over the ranks here
    first (``fxq.sync_observers``, on the copy), so every rank converts the same model.

    Example::

        qmodel = fxq.convert(prepared)
        print(fxq.report(qmodel))
    """
    _check_prepared(prepared, "fxq.convert")
    unobserved = _unobserved_fake_quantizers(prepared.model)
    if unobserved:
        raise CalibrationError(f"fxq.convert: {len(unobserved)} fake quantizers never saw data "
                               f"({', '.join(unobserved[:3])}), so their scales are placeholders: train the prepared "
                               "model, or at least run batches through it, before freeze_observers and convert")
    rewritten = dataclasses.replace(prepared.rewritten, timings=dict(prepared.rewritten.timings))
    working = copy.deepcopy(prepared.model).eval()  # converting mutates modules in place
    sync_observers(working)
    units = {unit.path: working.get_submodule(unit.path) for unit in rewritten.plan.units}
    # No float graphs: the rewritten ones hold the weights from before training, so
    # fxq.compare and the sensitivity tools would measure against the wrong model.
    return finish(rewritten, working, units, stage_dumper(None), keep_float_graphs=False)


def _check_prepared(prepared: Any, caller: str) -> None:
    if isinstance(prepared, QATModel):
        return
    wrapped = getattr(prepared, "module", None)
    if isinstance(wrapped, QATModel):  # DistributedDataParallel / DataParallel
        raise InvalidInputError(f"{caller} needs the QAT model itself, not the {type(prepared).__name__} "
                                f"around it: pass its .module")
    hint = ("it is already int8" if isinstance(prepared, QuantizedModel)
            else "call prepared = fxq.prepare_qat(model, example_inputs) and train that")
    raise InvalidInputError(f"{caller} needs the model fxq.prepare_qat returned, got {type(prepared).__name__}: {hint}")


def _standalone_batchnorms(model: nn.Module) -> list[str]:
    """Names of the BatchNorms no QAT conv/linear+BN module holds."""
    folded = {id(m.bn) for m in model.modules() if isinstance(m, quant.BATCHNORM_QAT_TYPES)}
    return [name for name, m in model.named_modules() if type(m) in BATCHNORM_TYPES and id(m) not in folded]


def _unobserved_fake_quantizers(model: nn.Module) -> list[str]:
    """Names of the fake quantizers whose observer has not recorded a single range."""
    names = []
    for name, module in model.named_modules():
        low = getattr(getattr(module, "activation_post_process", None), "min_val", None)
        if isinstance(module, quant.FakeQuantize) and low is not None:
            if not (low.numel() and torch.isfinite(low).all()):
                names.append(name)
    return names
