"""Self-supervised pretraining methods. Each takes an encoder and maps a batch to ``{"loss": ..., ...}``.

Adding a method: one file in this folder and one line in ``METHODS``.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from reprlab.ssl.simclr import SimCLR

METHODS: dict[str, type[nn.Module]] = {
    "simclr": SimCLR,
}


def build_method(name: str, encoder: nn.Module, params: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate ``METHODS[name](encoder, **params)``, naming any unknown parameter and the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    cls = METHODS[name]
    valid = [p for p in inspect.signature(cls).parameters if p != "encoder"]
    unknown = sorted(set(params or {}) - set(valid))
    if unknown:
        raise ValueError(f"method {name!r} has no parameter {unknown[0]!r}; valid parameters: {valid}")
    return cls(encoder, **(params or {}))
