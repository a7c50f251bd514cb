"""Freezing policies: which encoder layer groups train, at which learning rate, and when.

A policy turns a :class:`Classifier` into optimizer parameter groups, keeps frozen parts in eval mode (BatchNorm
statistics fixed) and may change what trains at the start of an epoch. Adding a policy: one class + one line in
``POLICIES``.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from reprlab.optim import param_groups


class Policy:
    """Base: everything trains. Subclasses override :meth:`trainable_groups` or the hooks."""

    def __init__(self) -> None:
        self.classifier: nn.Module | None = None

    def attach(self, classifier: nn.Module, weight_decay: float, exclude_bn_bias: bool = True) -> list[dict]:
        """Freeze what this policy freezes and return the optimizer's parameter groups."""
        self.classifier = classifier
        self.weight_decay, self.exclude_bn_bias = weight_decay, exclude_bn_bias
        for p in classifier.encoder.parameters():
            p.requires_grad_(False)
        groups = param_groups(classifier.head, weight_decay, exclude_bn_bias, name="head")
        for group_name, params, lr_scale in self.trainable_groups(classifier.encoder):
            for p in params:
                p.requires_grad_(True)
            groups += param_groups([(f"{group_name}.{i}", p) for i, p in enumerate(params)], weight_decay,
                                   exclude_bn_bias, lr_scale=lr_scale, name=group_name)
        return groups

    def trainable_groups(self, encoder: nn.Module) -> list[tuple[str, list[nn.Parameter], float]]:
        return [(name, params, 1.0) for name, params in encoder.layer_groups()]

    def frozen_modules(self) -> list[nn.Module]:
        """Encoder sub-modules whose parameters are all frozen: kept in eval mode while training."""
        assert self.classifier is not None
        return [m for m in self.classifier.encoder.modules()
                if not any(True for _ in m.children())
                and any(True for _ in m.parameters(recurse=False))
                and not any(p.requires_grad for p in m.parameters(recurse=False))]


class LinearProbe(Policy):
    """Encoder frozen and in eval mode; only the head trains."""

    def trainable_groups(self, encoder: nn.Module) -> list[tuple[str, list[nn.Parameter], float]]:
        return []

    def frozen_modules(self) -> list[nn.Module]:
        assert self.classifier is not None
        return [self.classifier.encoder]


class Full(Policy):
    """Everything trains; ``encoder_lr_scale`` < 1 gives the encoder a lower learning rate than the head."""

    def __init__(self, encoder_lr_scale: float = 1.0) -> None:
        super().__init__()
        self.encoder_lr_scale = encoder_lr_scale

    def trainable_groups(self, encoder: nn.Module) -> list[tuple[str, list[nn.Parameter], float]]:
        return [(name, params, self.encoder_lr_scale) for name, params in encoder.layer_groups()]


POLICIES: dict[str, type[Policy]] = {
    "linear_probe": LinearProbe,
    "full": Full,
}


def build_policy(name: str, params: dict[str, Any] | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    valid = list(inspect.signature(POLICIES[name]).parameters)
    unknown = sorted(set(params or {}) - set(valid))
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter {unknown[0]!r}; valid parameters: {valid}")
    return POLICIES[name](**(params or {}))
