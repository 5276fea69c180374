"""Questions about a backend's pattern table that passes ask before deciding."""
from __future__ import annotations

from typing import Optional

from fxq import quant


def single_op_patterns(backend_config: "quant.BackendConfig", observation_type: Optional[object] = None) -> set:
    """Targets the backend runs on their own (a pattern of one op, not only inside a fusion),
    optionally only those observed with ``observation_type``.

    Example::

        nn.BatchNorm2d in single_op_patterns(get_backend("x86").backend_config)  # True
        nn.BatchNorm1d in single_op_patterns(get_backend("x86").backend_config)  # False: only Linear+BN1d
    """
    return {config.pattern for config in backend_config.configs
            if config.pattern is not None and not isinstance(config.pattern, tuple)
            and (observation_type is None or config.observation_type == observation_type)}
