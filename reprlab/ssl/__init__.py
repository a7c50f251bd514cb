"""Self-supervised pretraining methods. Each takes an encoder and maps a batch to ``{"loss": ..., ...}``.

Adding a method: one file in this folder and one line in ``METHODS``.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from reprlab.ssl.autoencoder import AutoEncoder
from reprlab.ssl.jigsaw import Jigsaw
from reprlab.ssl.relative_position import RelativePosition
from reprlab.ssl.rotation import Rotation
from reprlab.ssl.simclr import SimCLR

METHODS: dict[str, type[nn.Module]] = {
    "simclr": SimCLR,  # contrastive (Chen et al., 2020)
    "autoencoder": AutoEncoder,  # generative: mode plain | denoising | masked (SimMIM; MAE with visible_only)
    "rotation": Rotation,  # proxy task (Gidaris et al., 2018)
    "jigsaw": Jigsaw,  # proxy task (Noroozi & Favaro, 2016)
    "relative_position": RelativePosition,  # proxy task (Doersch et al., 2015)
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
