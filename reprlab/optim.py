"""Optimizers (LARS from reprlab.lars) and per-step learning-rate schedules shared by pretraining and fine-tuning.

Conventions:
- ``param_groups`` splits parameters into a decayed group and a no-decay group (biases, norm weights) and tags
  each group with ``lr_scale``; ``build_optimizer`` sets ``group["lr"] = lr * group["lr_scale"]``.
- ``build_scheduler`` returns a ``LambdaLR`` stepped once per optimizer step, after ``optimizer.step()``:
  at optimizer step ``t`` (0-based) a group's lr is ``lr * lr_scale * schedule_factor(name, t, ...)``, so
  per-group scales (layer-wise LR decay) survive warmup and decay exactly.
- Resume: build the optimizer and the scheduler as for a fresh run, then load both state dicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from reprlab.config import OptimConfig
from reprlab.lars import LARS

NamedParams = Iterable[tuple[str, nn.Parameter]]

# onecycle starts at 1/25 of the peak, like torch.optim.lr_scheduler.OneCycleLR's default div_factor
ONECYCLE_DIV_FACTOR = 25.0


# --------------------------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------------------------


def param_groups(
    model: nn.Module | NamedParams,
    weight_decay: float,
    exclude_bn_bias: bool = True,
    lr_scale: float = 1.0,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a no-decay group.

    With ``exclude_bn_bias`` every parameter with ``ndim <= 1`` (biases, BatchNorm/LayerNorm weights) goes to
    the no-decay group, which is also excluded from LARS adaptation (``"lars_exclude": True``), as in SimCLR.
    ``model`` is a module or an iterable of ``(name, param)`` pairs (one layer group for layer-wise LR decay).
    Frozen parameters (``requires_grad=False``) are skipped; empty groups are dropped.
    """
    named = model.named_parameters() if isinstance(model, nn.Module) else model
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, param in named:
        if not param.requires_grad or id(param) in seen:  # shared (tied) weights are optimized once
            continue
        seen.add(id(param))
        (no_decay if exclude_bn_bias and param.ndim <= 1 else decay).append(param)

    extra: dict[str, Any] = {"lr_scale": lr_scale} if name is None else {"lr_scale": lr_scale, "name": name}
    groups = [
        {"params": decay, "weight_decay": weight_decay, **extra},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, **extra},
    ]
    return [group for group in groups if group["params"]]


# --------------------------------------------------------------------------------------------------------------
# Optimizer factory
# --------------------------------------------------------------------------------------------------------------


def _speed_kwargs(groups: list[dict[str, Any]], has_fused: bool) -> dict[str, bool]:
    """fused kernels when every parameter lives on CUDA and torch has one, else the foreach (multi-tensor) path."""
    on_cuda = all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"])
    return {"fused": True} if has_fused and on_cuda else {"foreach": True}


def _sgd(groups: list[dict], lr: float, *, momentum: float, nesterov: bool, weight_decay: float,
         betas: tuple[float, float], eps: float, trust_coefficient: float) -> Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                           **_speed_kwargs(groups, has_fused=True))


def _adagrad(groups: list[dict], lr: float, *, momentum: float, nesterov: bool, weight_decay: float,
             betas: tuple[float, float], eps: float, trust_coefficient: float) -> Optimizer:
    return torch.optim.Adagrad(groups, lr=lr, weight_decay=weight_decay, eps=eps, foreach=True)


def _rmsprop(groups: list[dict], lr: float, *, momentum: float, nesterov: bool, weight_decay: float,
             betas: tuple[float, float], eps: float, trust_coefficient: float) -> Optimizer:
    return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, foreach=True)


def _adam(groups: list[dict], lr: float, *, momentum: float, nesterov: bool, weight_decay: float,
          betas: tuple[float, float], eps: float, trust_coefficient: float) -> Optimizer:
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            **_speed_kwargs(groups, has_fused=True))


def _adamw(groups: list[dict], lr: float, *, momentum: float, nesterov: bool, weight_decay: float,
           betas: tuple[float, float], eps: float, trust_coefficient: float) -> Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             **_speed_kwargs(groups, has_fused=True))


def _lars(groups: list[dict], lr: float, *, momentum: float, nesterov: bool, weight_decay: float,
          betas: tuple[float, float], eps: float, trust_coefficient: float) -> Optimizer:
    return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                trust_coefficient=trust_coefficient, eps=eps)


OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "sgd": _sgd,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
    "adam": _adam,
    "adamw": _adamw,
    "lars": _lars,
}


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    trust_coefficient: float = 0.001,
) -> Optimizer:
    """Build optimizer ``name`` over ``groups`` (from :func:`param_groups`).

    Each group's lr becomes ``lr * group["lr_scale"]`` (default scale 1). ``weight_decay`` is only the default
    for groups without their own ``"weight_decay"``. ``momentum`` is used by sgd, rmsprop and lars; ``betas`` by
    adam/adamw; ``nesterov`` by sgd only; ``trust_coefficient`` by lars only.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    if nesterov and name != "sgd":
        raise ValueError(f"nesterov=True is only supported by 'sgd', not {name!r}; set nesterov=False")
    if lr <= 0.0:
        raise ValueError(f"invalid lr {lr}; use lr > 0 (see scale_lr for batch-size scaling)")
    groups = [dict(group) for group in groups]  # callers may reuse their groups for another optimizer
    if not any(group["params"] for group in groups):
        raise ValueError("no trainable parameters in groups; check requires_grad / the freezing policy")
    for group in groups:
        group["params"] = list(group["params"])
        group.setdefault("lr_scale", 1.0)
        group["lr"] = lr * group["lr_scale"]
    return OPTIMIZERS[name](groups, lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                            betas=betas, eps=eps, trust_coefficient=trust_coefficient)


def scale_lr(base_lr: float, batch_size: int, rule: str = "linear") -> float:
    """Batch-size lr scaling: linear = base * B / 256 (Goyal et al., 2017), sqrt = base * sqrt(B)
    (SimCLR appendix B.1: 0.075 * sqrt(B) for small batches / short runs), none = base."""
    if batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size}; use the global batch size (>= 1)")
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; choose from ['linear', 'none', 'sqrt']")


# --------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------
# Every schedule maps (step, length) -> factor on the post-warmup clock: step counts optimizer steps since the
# end of warmup (0 <= step <= length) and length = total_steps - warmup_steps. Unused hyperparameters are ignored.


def _constant(step: int, length: int, *, min_lr_ratio: float, step_size: int | None, gamma: float,
              pct_start: float) -> float:
    return 1.0


def _step(step: int, length: int, *, min_lr_ratio: float, step_size: int | None, gamma: float,
          pct_start: float) -> float:
    if step_size is None:
        raise ValueError("the 'step' schedule needs step_size (optimizer steps between lr drops); set step_size")
    return gamma ** (step // step_size)


def _exponential(step: int, length: int, *, min_lr_ratio: float, step_size: int | None, gamma: float,
                 pct_start: float) -> float:
    # smooth decay: by gamma every step_size steps, or by gamma over the whole post-warmup run without step_size
    return gamma ** (step / (step_size if step_size is not None else length))


def _cosine_between(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _cosine(step: int, length: int, *, min_lr_ratio: float, step_size: int | None, gamma: float,
            pct_start: float) -> float:
    return _cosine_between(1.0, min_lr_ratio, step / length)


def _onecycle(step: int, length: int, *, min_lr_ratio: float, step_size: int | None, gamma: float,
              pct_start: float) -> float:
    # OneCycleLR's shape (Smith & Topin, 2019): cosine up from 1/div to 1 at pct_start, cosine down to min_lr_ratio
    peak = round(pct_start * length)
    if step < peak:
        return _cosine_between(1.0 / ONECYCLE_DIV_FACTOR, 1.0, step / peak)
    return _cosine_between(1.0, min_lr_ratio, (step - peak) / max(1, length - peak))


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": _constant,
    "step": _step,
    "exponential": _exponential,
    "cosine": _cosine,
    "onecycle": _onecycle,
}


def _check_schedule_args(name: str, total_steps: int, warmup_steps: int, min_lr_ratio: float,
                         step_size: int | None, gamma: float, pct_start: float) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {sorted(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"invalid total_steps {total_steps}; use epochs * steps_per_epoch (>= 1)")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"invalid warmup_steps {warmup_steps}; use 0 <= warmup_steps <= total_steps={total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"invalid min_lr_ratio {min_lr_ratio}; use a fraction of the peak lr in [0, 1]")
    if step_size is not None and step_size < 1:
        raise ValueError(f"invalid step_size {step_size}; use a number of optimizer steps >= 1")
    if gamma <= 0.0:
        raise ValueError(f"invalid gamma {gamma}; use a decay factor > 0 (e.g. 0.1)")
    if not 0.0 < pct_start < 1.0:
        raise ValueError(f"invalid pct_start {pct_start}; use a fraction in (0, 1) (e.g. 0.3)")


def schedule_factor(
    name: str,
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    step_size: int | None = None,
    gamma: float = 0.1,
    pct_start: float = 0.3,
) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based); pure, for LambdaLR and plotting.

    factor = warmup(step) * schedule(step - warmup_steps), where warmup rises linearly
    1/(W+1), 2/(W+1), ..., W/(W+1) and is 1 from step W on, and the schedule runs on the post-warmup clock over
    ``total_steps - warmup_steps`` steps:
    - constant: 1;
    - step: ``gamma ** (s // step_size)`` (drops by gamma every ``step_size`` steps after warmup);
    - exponential: ``gamma ** (s / step_size)`` (smooth, gamma per ``step_size`` steps), or without step_size
      ``gamma ** (s / length)`` (decays by gamma in total over the run);
    - cosine: 1 -> ``min_lr_ratio``, reached at ``step == total_steps``;
    - onecycle: cosine from 1/25 up to 1 at ``pct_start`` of the run, then cosine down to ``min_lr_ratio``
      (it has its own warm-up phase, so ``warmup_steps`` is usually 0 with it).
    Past ``total_steps`` the factor stays at its final value.
    """
    _check_schedule_args(name, total_steps, warmup_steps, min_lr_ratio, step_size, gamma, pct_start)
    if step < 0:
        raise ValueError(f"invalid step {step}; steps count from 0")
    warmup = (step + 1) / (warmup_steps + 1) if step < warmup_steps else 1.0
    length = max(1, total_steps - warmup_steps)
    since_warmup = min(max(0, step - warmup_steps), length)
    return warmup * SCHEDULES[name](since_warmup, length, min_lr_ratio=min_lr_ratio, step_size=step_size,
                                    gamma=gamma, pct_start=pct_start)


def build_scheduler(
    optimizer: Optimizer,
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    step_size: int | None = None,
    gamma: float = 0.1,
    pct_start: float = 0.3,
) -> LambdaLR:
    """Per-step LambdaLR: group lr at step t = initial group lr (lr * lr_scale) * schedule_factor(name, t, ...).

    Call ``scheduler.step()`` once after each ``optimizer.step()``. See :func:`schedule_factor` for the shapes.
    """
    _check_schedule_args(name, total_steps, warmup_steps, min_lr_ratio, step_size, gamma, pct_start)
    # partial (not a lambda or an object with state) keeps the scheduler state_dict free of hyperparameters:
    # on resume the schedule comes from the config, the position from the state dict
    factor = partial(schedule_factor, name, total_steps=total_steps, warmup_steps=warmup_steps,
                     min_lr_ratio=min_lr_ratio, step_size=step_size, gamma=gamma, pct_start=pct_start)
    return LambdaLR(optimizer, lr_lambda=factor)


def build_optimization(cfg: OptimConfig, model: nn.Module, batch_size: int, steps_per_epoch: int, epochs: int,
                       groups: list[dict[str, Any]] | None = None) -> tuple[Optimizer, LambdaLR]:
    """Optimizer and per-step scheduler from an ``optim:`` section (``groups``: a policy's parameter groups;
    default: all parameters, BatchNorm and biases without weight decay when ``exclude_bn_bias``)."""
    lr = scale_lr(cfg.lr, batch_size, cfg.lr_scaling)
    if groups is None:
        groups = param_groups(model, cfg.weight_decay, exclude_bn_bias=cfg.exclude_bn_bias)
    optimizer = build_optimizer(cfg.name, groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                                trust_coefficient=cfg.trust_coefficient)
    step_size = round(cfg.step_epochs * steps_per_epoch) if cfg.step_epochs else None
    total_steps = epochs * steps_per_epoch
    # a run shorter than its warmup (a quick smoke test) warms up over the whole run instead of failing
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=total_steps, warmup_steps=warmup_steps,
                                min_lr_ratio=cfg.min_lr_ratio, step_size=step_size, gamma=cfg.gamma)
    return optimizer, scheduler
