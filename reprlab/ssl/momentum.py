"""Momentum (EMA) targets: BYOL's target network, MoCo's key encoder, DINO's teacher.

A target is built once with :func:`momentum_copy` (a frozen deep copy: no parameter needs a gradient, so it never
enters an optimizer and DDP's reducer ignores it) and moved after every optimizer step with
:func:`update_momentum`, at the momentum :func:`cosine_momentum` gives for the *global step* (so a resume must
restore the step; peers-2026.md). Build the target after any SyncBatchNorm conversion of the online network:
:func:`update_momentum` refuses two modules whose layer types differ.

BatchNorm buffers: BYOL (its haiku ``target_state``), MoCo v2/v3 and DINO average the *parameters* only. The target
runs in train mode, normalizing with its own batch statistics as the papers do, and its running statistics are
its own, updated by its own forward passes. So :func:`update_momentum` leaves buffers alone by default;
``copy_buffers=True`` overwrites them with the online network's instead (for a target run in eval(), whose
statistics would otherwise never move from those it was copied with).
"""

from __future__ import annotations

import copy
import math
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    return module


def momentum_copy(module: M) -> M:
    """A frozen deep copy of ``module`` to serve as a momentum target or teacher (Grill et al., 2020).

    Every parameter has ``requires_grad=False`` and no ``.grad``; buffers are copied; every submodule keeps the
    source's train/eval flag, because BYOL, MoCo and DINO run the target in train mode (BatchNorm with batch
    statistics). Calling ``.eval()`` or ``.train()`` on the copy is safe either way: nothing in it is trained, and
    :func:`update_momentum` writes only under ``torch.no_grad``. Pass the module itself, not its DDP wrapper (a
    target must not be wrapped: it has nothing to synchronize). A target that must stay in eval() needs the owning
    method to override ``train()``, since ``method.train()`` reaches every submodule.
    """
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise ValueError("momentum_copy got a DistributedDataParallel wrapper; copy the module inside it "
                         "(ddp.module) and keep the copy unwrapped")
    target = copy.deepcopy(module)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
        parameter.grad = None
    return target


def _check_same_structure(online: nn.Module, target: nn.Module) -> None:
    online_layers = [(name, type(m)) for name, m in online.named_modules()]
    target_layers = [(name, type(m)) for name, m in target.named_modules()]
    if online_layers != target_layers:
        for (name_a, type_a), (name_b, type_b) in zip(online_layers, target_layers):
            if (name_a, type_a) != (name_b, type_b):
                raise ValueError(f"online and target differ at layer {name_a!r} ({type_a.__name__}) vs {name_b!r} "
                                 f"({type_b.__name__}); build the target with momentum_copy(online) after any "
                                 f"SyncBatchNorm conversion")
        raise ValueError(f"online has {len(online_layers)} layers, target {len(target_layers)}; build the target "
                         f"with momentum_copy(online)")


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, momentum: float, copy_buffers: bool = False) -> None:
    """target = momentum * target + (1 - momentum) * online for every parameter, in place (Grill et al., 2020).

    Call after each optimizer step, with ``momentum`` from :func:`cosine_momentum` (BYOL, DINO) or a constant
    (MoCo v2: 0.999). Buffers are left alone unless ``copy_buffers`` (module docstring: the target's BatchNorm
    statistics are its own, as in BYOL, MoCo and DINO). A DDP wrapper around either module is looked through;
    the two must have the same layers (names and types) and parameter shapes.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    online, target = _unwrap(online), _unwrap(target)
    _check_same_structure(online, target)
    online_params, target_params = dict(online.named_parameters()), dict(target.named_parameters())
    for name, parameter in online_params.items():
        if target_params[name].shape != parameter.shape:
            raise ValueError(f"parameter {name!r} is {tuple(parameter.shape)} in online but "
                             f"{tuple(target_params[name].shape)} in target")
    names = list(online_params)
    # lerp: target + (1 - m) * (online - target); exact at m = 1 (target unchanged) and m = 0 (a copy)
    torch._foreach_lerp_([target_params[n] for n in names], [online_params[n].detach() for n in names],
                         1.0 - momentum)
    if copy_buffers:
        target_buffers = dict(target.named_buffers())
        for name, buffer in online.named_buffers():
            target_buffers[name].copy_(buffer)


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """BYOL's target momentum at global step k of K (Grill et al., 2020): final - (final - base)(cos(pi k/K) + 1)/2.

    ``base`` at step 0, ``(base + final) / 2`` half-way, ``final`` at step K; with final = 1 it is the paper's
    tau = 1 - (1 - base)(cos(pi k / K) + 1) / 2 (DINO: base 0.996, MoCo v3: 0.99). Steps past K stay at ``final``,
    as BYOL's code clamps k at K.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not (0.0 <= base <= 1.0 and 0.0 <= final <= 1.0):
        raise ValueError(f"base and final must be in [0, 1], got {base} and {final}")
    progress = min(step, total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
