"""Saving, loading and exporting quantized models.

``torch.save`` of a converted GraphModule does not load back: GraphModule's pickle rebuilds
its graph by re-tracing its code *while* unpickling, before torch's quantized conv modules
have their state, and fails (``'ConvReLU2d' object has no attribute '_modules'``).
:func:`save` therefore stores each GraphModule as the record its own ``__reduce__`` gives
(its attributes and generated code) and :func:`load` rebuilds the GraphModules only once
everything else is loaded.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxq import quant, stages
from fxq.calibrate import as_args
from fxq.errors import FxqError, InvalidInputError
from fxq.tensors import clone_inputs

FORMAT = "fxq-quantized-model/1"


#: Module hook tables that GraphModule's own pickle drops; the packed-weight state_dict hooks
#: torch's convert registers live here, and one holds the module itself (a pickle cycle).
HOOK_TABLES = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


class _GraphRecord:
    """A GraphModule as (rebuild function, its arguments); nested GraphModules are records too."""

    def __init__(self, rebuild: Callable, body: dict, extra: tuple):
        self.rebuild, self.body, self.extra = rebuild, body, extra
        self.hooks = {table: [_portable_hook(h, body) for h in body.pop(table, {}).values()] for table in HOOK_TABLES}


class _SelfHook:
    """A hook registered ``with_module`` on the GraphModule itself."""

    def __init__(self, hook: Callable):
        self.hook = hook


def _portable_hook(hook: Any, body: dict) -> Any:
    module_ref = getattr(hook, "module", None)
    if getattr(hook, "with_module", False) and callable(module_ref):
        return _SelfHook(hook.hook)
    return hook


def _restore_hooks(gm: fx.GraphModule, hooks: dict) -> None:
    for table, entries in hooks.items():
        for hook in entries:
            if isinstance(hook, _SelfHook):
                gm.register_load_state_dict_pre_hook(hook.hook)  # public form of with_module=True
            else:
                getattr(gm, table)[len(getattr(gm, table)) + 10_000] = hook


def _has_graphs(module: nn.Module) -> bool:
    return any(isinstance(m, fx.GraphModule) for m in module.modules()) or bool(getattr(module, "float_graphs", None))


def _to_records(module: Any) -> Any:
    """A picklable stand-in for ``module``: the original objects are never changed."""
    if isinstance(module, fx.GraphModule):
        rebuild, (body, *extra) = module.__reduce__()
        body = dict(body)
        body["_tracer_cls"] = None  # rebuilt by a plain Tracer: fxq's own tracers need arguments
        body["_modules"] = OrderedDict((k, _to_records(v)) for k, v in body["_modules"].items())
        return _GraphRecord(rebuild, body, tuple(extra))
    if not isinstance(module, nn.Module) or not _has_graphs(module):
        return module
    clone = copy.copy(module)  # shallow: shares parameters, gets its own attribute dict
    clone.__dict__["_modules"] = OrderedDict((k, _to_records(v)) for k, v in module._modules.items())
    if getattr(module, "float_graphs", None):
        clone.__dict__["float_graphs"] = {k: _to_records(v) for k, v in module.float_graphs.items()}
    return clone


def _from_records(value: Any) -> Any:
    if isinstance(value, _GraphRecord):
        value.body["_modules"] = OrderedDict((k, _from_records(v)) for k, v in value.body["_modules"].items())
        gm = value.rebuild(value.body, *value.extra)
        _restore_hooks(gm, value.hooks)
        return gm
    if isinstance(value, nn.Module):
        _repair(value)
        for name, child in list(value._modules.items()):
            value._modules[name] = _from_records(child)
        if isinstance(value.__dict__.get("float_graphs"), dict):
            value.__dict__["float_graphs"] = {k: _from_records(v) for k, v in value.float_graphs.items()}
    return value


def _repair(module: nn.Module) -> None:
    """torch's quantized conv ``__setstate__`` restores its own fields but not ``_modules`` and
    friends; give such a module the (empty) tables every Module has, or traversal fails."""
    missing = [key for key in ("_modules", "_parameters", "_buffers") if key not in module.__dict__]
    if missing:
        for key, value in vars(nn.Module()).items():
            module.__dict__.setdefault(key, value)


def save(qmodel: nn.Module, path: Any) -> Path:
    """Save a model returned by ``fxq.quantize`` (weights, graphs, report) to ``path``.

    Example::

        fxq.save(qmodel, "model.fxq.pt")
        again = fxq.load("model.fxq.pt")      # same outputs, same fxq.report(again)
    """
    if not isinstance(qmodel, nn.Module):
        raise InvalidInputError(f"fxq.save needs the model fxq.quantize returned, got {type(qmodel).__name__}")
    path = Path(path)
    torch.save({"format": FORMAT, "torch": torch.__version__, "model": _to_records(qmodel)}, path)
    return path


def load(path: Any) -> nn.Module:
    """Load a model written by :func:`save`. The file is a pickle: load only files you trust.

    Example::

        qmodel = fxq.load("model.fxq.pt")
        print(fxq.report(qmodel))
    """
    try:
        with quant.quiet():  # torch.ao's deprecation chatter while quantized tensors are rebuilt
            payload = torch.load(Path(path), weights_only=False)
    except FileNotFoundError:
        raise InvalidInputError(f"fxq.load: no such file: {path}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidInputError(f"{path} was not written by fxq.save (expected format {FORMAT!r})")
    with stages.quantized_engine(getattr(payload["model"], "engine", None)):
        return _from_records(payload["model"])


def _eager_parts(qmodel: nn.Module) -> dict[str, str]:
    report = getattr(qmodel, "report", None)
    return dict(getattr(report, "float_parts", {}) or {})


def export_torchscript(qmodel: nn.Module, example_inputs: Any, path: Optional[Any] = None,
                       allow_eager_parts: bool = False) -> torch.jit.ScriptModule:
    """TorchScript (``torch.jit.trace``) of a static int8 model; saved to ``path`` when given.

    Parts fxq could not trace run as plain Python; tracing would freeze their control flow to
    the branch ``example_inputs`` take, so they are refused unless ``allow_eager_parts=True``.
    Load it with ``torch.jit.load(path)``; quantized kernels need the same engine (x86 by default).

    Example::

        scripted = fxq.export_torchscript(qmodel, (torch.randn(1, 3, 224, 224),), "model.ts")
        torch.jit.load("model.ts")(torch.randn(1, 3, 224, 224))
    """
    eager = _eager_parts(qmodel)
    if eager and not allow_eager_parts:
        details = "; ".join(f"{part}: {reason}" for part, reason in eager.items())
        raise FxqError(f"cannot export {type(qmodel).__name__} to TorchScript: these parts run as plain Python "
                       f"and tracing would freeze their control flow to one branch ({details}). Make them "
                       "traceable, or pass allow_eager_parts=True if their control flow never changes.")
    inner = getattr(qmodel, "model", qmodel)
    example_inputs = as_args(example_inputs)
    try:
        with stages.quantized_engine(getattr(qmodel, "engine", None)), torch.no_grad():
            scripted = torch.jit.trace(inner, clone_inputs(example_inputs), check_trace=False)
    except Exception as error:
        raise FxqError(f"torch.jit.trace failed on {type(inner).__name__}: {type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''}. Export needs tensor inputs and "
                       "outputs (tuples/lists/dicts of tensors).") from error
    if path is not None:
        torch.jit.save(scripted, str(path))
    return scripted
