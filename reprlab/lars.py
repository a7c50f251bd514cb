"""LARS: the large-batch optimizer of SimCLR, as a torch Optimizer (``optim.name: lars``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD-momentum with Layer-wise Adaptive Rate Scaling (You et al., 2017), as in SimCLR (Chen et al., 2020).

    Per parameter ``p`` with gradient ``g`` in a group without ``lars_exclude``::

        g = g + weight_decay * p
        trust = trust_coefficient * ||p|| / (||g|| + eps)   if ||p|| > 0 and ||g|| > 0 else 1
        v = momentum * v + lr * trust * g
        p = p - v

    The lr sits *inside* the momentum buffer (TF SimCLR reference ordering), unlike ``torch.optim.SGD`` which
    keeps ``v = momentum * v + g`` and steps ``p -= lr * v``; the two differ whenever the lr changes
    (warmup, cosine). Groups with ``lars_exclude=True`` (biases, norm weights) get plain SGD-momentum with the
    same ordering: no weight decay and no trust ratio.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid lr {lr}; use lr >= 0")
        if momentum < 0.0:
            raise ValueError(f"invalid momentum {momentum}; use momentum >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}; use weight_decay >= 0")
        if trust_coefficient <= 0.0:
            raise ValueError(f"invalid trust_coefficient {trust_coefficient}; use a value > 0 (SimCLR: 0.001)")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients; use dense embeddings")
            grads = [p.grad for p in params]
            if group["lars_exclude"]:
                updates = torch._foreach_mul(grads, group["lr"])  # new tensors: p.grad stays untouched
            else:
                updates = self._lars_updates(params, grads, group)
            buffers = self._momentum_buffers(params)
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_sub_(params, buffers)
        return loss

    @staticmethod
    def _lars_updates(params: list[Tensor], grads: list[Tensor], group: dict[str, Any]) -> list[Tensor]:
        """lr * trust * (g + wd * p) for each parameter of a non-excluded group."""
        if group["weight_decay"] != 0.0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])  # new tensors, p.grad kept
        param_norms = torch._foreach_norm(params)
        grad_norms = torch._foreach_norm(grads)
        scales = [
            # a zero-initialised weight or a zero gradient falls back to trust 1 (no NaN, no frozen layer)
            torch.where(
                (p_norm > 0) & (g_norm > 0),
                group["trust_coefficient"] * p_norm / (g_norm + group["eps"]),
                torch.ones_like(p_norm),
            )
            * group["lr"]
            for p_norm, g_norm in zip(param_norms, grad_norms, strict=True)
        ]
        return torch._foreach_mul(grads, scales)

    def _momentum_buffers(self, params: list[Tensor]) -> list[Tensor]:
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                # zeros-init: the first step's v equals the first update, as in the reference
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
        return buffers
