"""Heads that sit on an encoder's (B, D) features."""

from __future__ import annotations

from torch import nn


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = True,
                    output_bn: bool = True) -> nn.Sequential:
    """SimCLR MLP projection: Linear-BN-ReLU repeated, then Linear(-BN); biases off where BN follows.

    Default (2 layers, BN on the output) is the SimCLR v1 reference head; ``num_layers=3`` is SimCLR v2."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not (batch_norm and output_bn)))
    if batch_norm and output_bn:
        layers.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*layers)


def pretext_head(in_dim: int, num_classes: int, hidden_dim: int | None = None) -> nn.Sequential:
    """A proxy task's classifier: Linear, or Linear-BN-ReLU-Linear with a ``hidden_dim`` hidden layer.

    A linear head keeps what the task needs linearly readable in the encoder features we evaluate; an MLP
    head can absorb task-specific computation instead."""
    layers = 1 if hidden_dim is None else 2
    return projection_head(in_dim, hidden_dim or in_dim, num_classes, num_layers=layers, output_bn=False)


def tile_embedding(in_dim: int, out_dim: int | None) -> nn.Module:
    """A patch task's per-tile layer, Linear-BN-ReLU shared by every tile before their features are combined
    (the fc6 of Doersch et al. and Noroozi & Favaro); Identity for ``out_dim=None``.

    It keeps task-specific per-tile computation out of the encoder whose features are evaluated."""
    if out_dim is None:
        return nn.Identity()
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True))


def classifier_head(in_dim: int, num_classes: int, dropout: float = 0.0, init: str = "zeros") -> nn.Sequential:
    """Dropout + Linear classifier; ``init``: zeros | xavier | he | default (PyTorch's)."""
    linear = nn.Linear(in_dim, num_classes)
    if init == "zeros":
        nn.init.zeros_(linear.weight)
    elif init == "xavier":
        nn.init.xavier_uniform_(linear.weight)
    elif init == "he":
        nn.init.kaiming_normal_(linear.weight, nonlinearity="linear")
    elif init != "default":
        raise ValueError(f"unknown head init {init!r}; choose from ['default', 'he', 'xavier', 'zeros']")
    if init != "default":
        nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else nn.Sequential(linear)
