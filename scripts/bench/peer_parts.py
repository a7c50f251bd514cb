"""What every lightly twin is built from (bench.peer_methods, bench.peer_momentum): :class:`TwinSpec`, reprlab's
settings for a twin (:func:`method_settings`), and the small helpers the twins share (:func:`mlp`, :func:`features`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class TwinSpec:
    """What every builder gets: the ``backbone`` (images -> (B, ``feature_dim``) features; reprlab's encoder in
    the quality benchmark), the method's ``settings`` (its parameters with the defaults filled in:
    :func:`method_settings`), the reprlab ``reference`` built from the same parameters (its pipelines and
    derived values), the default view ``size`` (the images' side), ``normalize`` (ImageNet statistics in the
    transform: off when the encoder normalizes inside) and the run's ``total_steps``."""

    backbone: nn.Module
    feature_dim: int
    settings: dict[str, Any]
    reference: nn.Module
    size: int
    normalize: bool
    total_steps: int


def method_settings(method: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """reprlab's ``METHODS[method]`` keyword defaults overridden by ``params``."""
    from reprlab.ssl import METHODS

    signature = inspect.signature(METHODS[method]).parameters
    return {**{k: p.default for k, p in signature.items() if k != "encoder"}, **dict(params or {})}


def mlp(blocks: list[tuple[int, int, bool, nn.Module | None]]) -> nn.Module:
    """lightly's ``ProjectionHead`` from (in, out, batch norm, activation) blocks (a head lightly has no class for,
    as its CIFAR-10 benchmark builds SimSiam's 2-layer projector)."""
    from lightly.models.modules.heads import ProjectionHead

    return ProjectionHead([(i, o, nn.BatchNorm1d(o) if bn else None, act) for i, o, bn, act in blocks])



def features(backbone: nn.Module, x: Tensor) -> Tensor:
    """``backbone``'s features of ``x`` flattened to (B, D), as lightly's examples take them."""
    return backbone(x).flatten(start_dim=1)
