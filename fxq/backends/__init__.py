"""Backend registry: built-ins, explicit registration, and the ``fxq.backends`` entry points.

Third-party backends are discovered lazily, on the first name fxq does not know, so a broken
plugin can never break ``import fxq``.
"""
from __future__ import annotations

from importlib import metadata

from fxq.backends.base import Backend, QuantSpec
from fxq.backends.reference import reference_backend, simulation_of
from fxq.errors import BackendError

__all__ = ["Backend", "QuantSpec", "get_backend", "list_backends", "reference_backend", "register_backend",
           "simulation_of"]

ENTRY_POINT_GROUP = "fxq.backends"
_REGISTRY: dict[str, Backend] = {}
_BUILTINS_LOADED: list[bool] = []  # non-empty once the built-ins are in _REGISTRY


def register_backend(backend: Backend, replace: bool = False) -> Backend:
    """Make ``backend`` available by name.

    Example::

        fxq.register_backend(Backend(name="my_npu", build_backend_config=...))
        fxq.quantize(model, example_inputs, backend="my_npu")
    """
    if not isinstance(backend, Backend):
        raise BackendError(f"register_backend needs an fxq.Backend, got {type(backend).__name__}")
    _ensure_builtins()
    if backend.name in _REGISTRY and not replace:
        raise BackendError(f"a backend named {backend.name!r} is already registered; "
                           "pass replace=True to replace it")
    _REGISTRY[backend.name] = backend
    return backend


def list_backends() -> list[str]:
    """Names of the registered backends (built-ins and plugins found so far)."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_backend(name_or_backend) -> Backend:
    """The backend registered as ``name``; a Backend object passes through unchanged."""
    if isinstance(name_or_backend, Backend):
        return name_or_backend
    _ensure_builtins()
    name = name_or_backend
    if not isinstance(name, str):
        raise BackendError(f"backend must be a name or an fxq.Backend, got {type(name).__name__}")
    if name not in _REGISTRY:
        _load_plugin(name)
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(list_backends())}. "
                           f"Third-party backends register through the {ENTRY_POINT_GROUP!r} entry-point group.")
    return _REGISTRY[name]


def _ensure_builtins() -> None:
    if _BUILTINS_LOADED:
        return
    from fxq.backends.qnnpack import qnnpack
    from fxq.backends.reference import reference
    from fxq.backends.x86 import x86
    for backend in (x86, qnnpack, reference):
        _REGISTRY.setdefault(backend.name, backend)
    _BUILTINS_LOADED.append(True)


def _load_plugin(name: str) -> None:
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name != name:
            continue
        try:
            loaded = entry_point.load()
            backend = loaded() if callable(loaded) and not isinstance(loaded, Backend) else loaded
        except Exception as error:  # a plugin's bug must surface as a clear fxq error
            raise BackendError(f"backend plugin {name!r} ({entry_point.value}) failed to load: "
                               f"{type(error).__name__}: {error}") from error
        if not isinstance(backend, Backend) or backend.name != name:
            raise BackendError(f"backend plugin {name!r} ({entry_point.value}) must provide an "
                               f"fxq.Backend named {name!r}, got {backend!r}")
        register_backend(backend, replace=True)
