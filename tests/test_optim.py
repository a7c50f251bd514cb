"""Tests for reprlab.optim: LARS against hand/numpy steps, param groups, optimizer registry, schedules, resume."""

from __future__ import annotations

import copy
import io
import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from torch import nn

from reprlab.lars import LARS
from reprlab.optim import (
    ONECYCLE_DIV_FACTOR,
    OPTIMIZERS,
    SCHEDULES,
    build_optimizer,
    build_scheduler,
    param_groups,
    scale_lr,
    schedule_factor,
)

# --------------------------------------------------------------------------------------------------------------
# LARS
# --------------------------------------------------------------------------------------------------------------


def _numpy_lars_step(w, g, v, lr, momentum, weight_decay, trust_coefficient, exclude, eps=1e-8):
    """Reference LARS step (SimCLR TF ordering: lr inside the momentum buffer)."""
    if not exclude:
        g = g + weight_decay * w
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        trust = trust_coefficient * w_norm / (g_norm + eps) if w_norm > 0 and g_norm > 0 else 1.0
        g = trust * g
    v = momentum * v + lr * g
    return w - v, v


def _lars_pair(weight_decay_on_bias: float = 0.0):
    weight = nn.Parameter(torch.tensor([3.0, -4.0], dtype=torch.float64))
    bias = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    groups = [
        {"params": [weight], "weight_decay": 0.1},
        # excluded group: its weight_decay must be ignored
        {"params": [bias], "weight_decay": weight_decay_on_bias, "lars_exclude": True},
    ]
    optimizer = LARS(groups, lr=0.5, momentum=0.9, trust_coefficient=0.01)
    return weight, bias, optimizer


def test_lars_first_step_matches_hand_computation():
    weight, bias, optimizer = _lars_pair(weight_decay_on_bias=0.1)
    weight.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    bias.grad = torch.tensor([0.2, 0.4], dtype=torch.float64)
    optimizer.step()
    # g' = g + 0.1 w = [1.3, 1.6]; trust = 0.01 * 5 / sqrt(4.25); v = 0.5 * trust * g'
    trust = 0.01 * 5.0 / math.sqrt(4.25)
    assert trust == pytest.approx(0.0242535625)
    expected_weight = [3.0 - 0.5 * trust * 1.3, -4.0 - 0.5 * trust * 1.6]
    torch.testing.assert_close(weight.detach(), torch.tensor(expected_weight, dtype=torch.float64))
    torch.testing.assert_close(weight.detach(), torch.tensor([2.98423518, -4.01940285], dtype=torch.float64))
    # bias: plain SGD-momentum, no weight decay, no trust: v = 0.5 * [0.2, 0.4]
    torch.testing.assert_close(bias.detach(), torch.tensor([0.4, -1.2], dtype=torch.float64))
    # gradients are not modified in place by the weight decay
    torch.testing.assert_close(weight.grad, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_lars_two_steps_with_lr_change_match_numpy_reference():
    weight, bias, optimizer = _lars_pair()
    grads = [
        (np.array([1.0, 2.0]), np.array([0.2, 0.4])),
        (np.array([-0.5, 0.25]), np.array([1.0, 1.0])),
    ]
    lrs = [0.5, 0.25]  # a changing lr tells "lr inside momentum" apart from torch's SGD ordering
    w, b = np.array([3.0, -4.0]), np.array([0.5, -1.0])
    vw, vb = np.zeros(2), np.zeros(2)
    for (gw, gb), lr in zip(grads, lrs, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
        weight.grad, bias.grad = torch.from_numpy(gw), torch.from_numpy(gb)
        optimizer.step()
        w, vw = _numpy_lars_step(w, gw, vw, lr, 0.9, 0.1, 0.01, exclude=False)
        b, vb = _numpy_lars_step(b, gb, vb, lr, 0.9, 0.1, 0.01, exclude=True)
        np.testing.assert_allclose(weight.detach().numpy(), w, rtol=1e-12)
        np.testing.assert_allclose(bias.detach().numpy(), b, rtol=1e-12)
    # hand values for the excluded bias: v2 = 0.9 * [0.1, 0.2] + 0.25 * [1, 1] = [0.34, 0.43]
    np.testing.assert_allclose(bias.detach().numpy(), [0.5 - 0.1 - 0.34, -1.0 - 0.2 - 0.43], rtol=1e-12)
    np.testing.assert_allclose(optimizer.state[bias]["momentum_buffer"].numpy(), [0.34, 0.43], rtol=1e-12)


def test_lars_excluded_group_equals_torch_sgd_at_constant_lr():
    torch.manual_seed(0)
    p_lars = nn.Parameter(torch.randn(5, dtype=torch.float64))
    p_sgd = nn.Parameter(p_lars.detach().clone())
    lars = LARS([{"params": [p_lars], "lars_exclude": True}], lr=0.1, momentum=0.9, weight_decay=0.5)
    sgd = torch.optim.SGD([p_sgd], lr=0.1, momentum=0.9)
    for _ in range(4):
        grad = torch.randn(5, dtype=torch.float64)
        p_lars.grad, p_sgd.grad = grad.clone(), grad.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(p_lars.detach(), p_sgd.detach())


def test_lars_zero_weight_and_zero_grad_do_not_produce_nan():
    zero_weight = nn.Parameter(torch.zeros(3))
    zero_grad = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    both_zero = nn.Parameter(torch.zeros(2))
    optimizer = LARS([zero_weight, zero_grad, both_zero], lr=0.1, momentum=0.9, weight_decay=0.0)
    zero_weight.grad = torch.tensor([1.0, -1.0, 2.0])
    zero_grad.grad = torch.zeros(3)
    both_zero.grad = torch.zeros(2)
    optimizer.step()
    for param in (zero_weight, zero_grad, both_zero):
        assert torch.isfinite(param).all()
    # trust falls back to 1: a zero-initialised weight still learns
    torch.testing.assert_close(zero_weight.detach(), torch.tensor([-0.1, 0.1, -0.2]))
    torch.testing.assert_close(zero_grad.detach(), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(both_zero.detach(), torch.zeros(2))


def test_lars_skips_params_without_grad_and_supports_closure():
    used, unused = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = LARS([used, unused], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.item() == pytest.approx(2.0)
    assert (used.detach() < 1.0).all()
    torch.testing.assert_close(unused.detach(), torch.ones(2))
    assert unused not in optimizer.state


# --------------------------------------------------------------------------------------------------------------
# param_groups
# --------------------------------------------------------------------------------------------------------------


def _tiny_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4, 2),
        nn.LayerNorm(2),
        nn.Linear(2, 2),
    )


def _ids(group: dict) -> set[int]:
    return {id(p) for p in group["params"]}


def test_param_groups_split_biases_and_norms_and_skip_frozen():
    model = _tiny_model()
    model[5].weight.requires_grad_(False)
    model[5].bias.requires_grad_(False)
    decay, no_decay = param_groups(model, weight_decay=1e-4, lr_scale=0.5, name="backbone")
    assert _ids(decay) == {id(model[0].weight), id(model[3].weight)}
    expected_no_decay = [model[0].bias, model[1].weight, model[1].bias, model[3].bias, model[4].weight,
                         model[4].bias]
    assert _ids(no_decay) == {id(p) for p in expected_no_decay}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert no_decay["lars_exclude"] is True and "lars_exclude" not in decay
    for group in (decay, no_decay):
        assert group["lr_scale"] == 0.5 and group["name"] == "backbone"


def test_param_groups_without_exclusion_and_from_named_pairs():
    model = _tiny_model()
    (only,) = param_groups(model, weight_decay=0.1, exclude_bn_bias=False)
    assert _ids(only) == {id(p) for p in model.parameters()}
    assert "name" not in only and only["lr_scale"] == 1.0
    # an iterable of (name, param) pairs, e.g. one layer group for layer-wise LR decay; duplicates counted once
    pairs = list(model[0].named_parameters()) + list(model[0].named_parameters())
    decay, no_decay = param_groups(pairs, weight_decay=0.1, lr_scale=0.25)
    assert _ids(decay) == {id(model[0].weight)} and _ids(no_decay) == {id(model[0].bias)}
    assert param_groups(nn.Linear(2, 2, bias=False).requires_grad_(False), weight_decay=0.1) == []


# --------------------------------------------------------------------------------------------------------------
# Optimizer registry
# --------------------------------------------------------------------------------------------------------------


def _quadratic_problem():
    torch.manual_seed(0)
    inputs = torch.randn(32, 4)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.7
    model = nn.Linear(4, 1)
    return model, lambda: ((model(inputs) - targets) ** 2).mean()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_builds_and_reduces_a_quadratic(name):
    model, loss_fn = _quadratic_problem()
    groups = param_groups(model, weight_decay=1e-4, lr_scale=0.5)
    optimizer = build_optimizer(name, groups, lr=0.05, trust_coefficient=0.02)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.05 * 0.5)
    start = loss_fn().item()
    for _ in range(10):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    assert loss_fn().item() < start


def test_build_optimizer_group_settings_and_defaults():
    model, _ = _quadratic_problem()
    groups = [
        {"params": [model.weight], "lr_scale": 0.1},  # no weight_decay: takes the default
        {"params": [model.bias], "weight_decay": 0.0},  # no lr_scale: scale 1
    ]
    optimizer = build_optimizer("sgd", groups, lr=0.2, weight_decay=0.3, nesterov=True)
    first, second = optimizer.param_groups
    assert first["lr"] == pytest.approx(0.02) and first["weight_decay"] == 0.3
    assert second["lr"] == pytest.approx(0.2) and second["weight_decay"] == 0.0
    assert first["nesterov"] and first["momentum"] == 0.9
    assert "lr" not in groups[0]  # the caller's groups are not mutated
    adamw = build_optimizer("adamw", param_groups(model, weight_decay=0.05), lr=1e-3, betas=(0.8, 0.9))
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9) and adamw.param_groups[0]["weight_decay"] == 0.05
    assert adamw.param_groups[1]["weight_decay"] == 0.0
    lars = build_optimizer("lars", param_groups(model, weight_decay=1e-6), lr=1.0, trust_coefficient=0.002)
    assert lars.param_groups[0]["trust_coefficient"] == 0.002
    assert not lars.param_groups[0]["lars_exclude"] and lars.param_groups[1]["lars_exclude"]


def test_build_optimizer_errors():
    model, _ = _quadratic_problem()
    with pytest.raises(ValueError, match=r"unknown optimizer 'lamb'; choose from \['adagrad'"):
        build_optimizer("lamb", param_groups(model, 0.0), lr=0.1)
    with pytest.raises(ValueError, match="nesterov"):
        build_optimizer("adam", param_groups(model, 0.0), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer("sgd", [{"params": []}], lr=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused kernels need CUDA")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_step_on_cuda(name):
    model = nn.Linear(4, 1).cuda()
    optimizer = build_optimizer(name, param_groups(model, 1e-4), lr=0.01)
    model(torch.randn(8, 4, device="cuda")).pow(2).mean().backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scale_lr():
    assert scale_lr(0.3, 512) == pytest.approx(0.6)
    assert scale_lr(0.3, 4096, rule="linear") == pytest.approx(4.8)
    assert scale_lr(0.075, 4096, rule="sqrt") == pytest.approx(4.8)
    assert scale_lr(0.075, 256, rule="sqrt") == pytest.approx(1.2)
    assert scale_lr(0.1, 1024, rule="none") == 0.1
    with pytest.raises(ValueError, match="unknown lr scaling rule 'log'"):
        scale_lr(0.1, 256, rule="log")
    with pytest.raises(ValueError, match="batch_size"):
        scale_lr(0.1, 0)


# --------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------

SCHEDULE_KWARGS = {"step_size": 20, "gamma": 0.5, "min_lr_ratio": 0.1}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_warms_up_linearly_from_near_zero(name):
    total, warmup = 100, 10
    factors = [schedule_factor(name, t, total, warmup_steps=warmup, **SCHEDULE_KWARGS) for t in range(total + 1)]
    at_warmup_end = schedule_factor(name, warmup, total, **{"warmup_steps": warmup, **SCHEDULE_KWARGS})
    start = 1.0 / ONECYCLE_DIV_FACTOR if name == "onecycle" else 1.0  # schedule value at its own step 0
    assert factors[0] == pytest.approx(start / (warmup + 1)) and factors[0] < 0.1
    assert at_warmup_end == pytest.approx(start)
    np.testing.assert_allclose(factors[:warmup], start * np.arange(1, warmup + 1) / (warmup + 1))
    assert all(0.0 < f <= 1.0 + 1e-12 for f in factors)


def test_constant_schedule_stays_one():
    assert all(schedule_factor("constant", t, 50) == 1.0 for t in range(60))


def test_cosine_schedule_matches_closed_form_and_torch():
    total, warmup, min_ratio = 110, 10, 0.2
    factors = [schedule_factor("cosine", t, total, warmup, min_lr_ratio=min_ratio) for t in range(total + 5)]
    assert factors[warmup] == pytest.approx(1.0)
    assert factors[warmup + 50] == pytest.approx((1.0 + min_ratio) / 2)  # halfway through the decay
    assert factors[total] == pytest.approx(min_ratio) and factors[-1] == pytest.approx(min_ratio)
    assert all(a >= b for a, b in pairwise(factors[warmup:total + 1]))
    # without warmup, the same curve as torch's CosineAnnealingLR (eta_min = min_ratio * lr)
    param = nn.Parameter(torch.zeros(1))
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(
        torch.optim.SGD([param], lr=2.0), T_max=100, eta_min=2.0 * min_ratio
    )
    for t in range(100):
        assert reference.get_last_lr()[0] == pytest.approx(2.0 * schedule_factor("cosine", t, 100, 0, min_ratio))
        reference.optimizer.step()
        reference.step()


def test_step_schedule_drops_by_gamma_at_step_size():
    kwargs = {"step_size": 30, "gamma": 0.1}
    assert schedule_factor("step", 29, 100, **kwargs) == pytest.approx(1.0)
    assert schedule_factor("step", 30, 100, **kwargs) == pytest.approx(0.1)
    assert schedule_factor("step", 59, 100, **kwargs) == pytest.approx(0.1)
    assert schedule_factor("step", 60, 100, **kwargs) == pytest.approx(0.01)
    # with warmup the step clock starts at the end of warmup
    assert schedule_factor("step", 34, 100, warmup_steps=5, **kwargs) == pytest.approx(1.0)
    assert schedule_factor("step", 35, 100, warmup_steps=5, **kwargs) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="step_size"):
        schedule_factor("step", 0, 100)


def test_exponential_schedule_whole_run_or_per_step_size():
    assert schedule_factor("exponential", 0, 200, gamma=0.01) == pytest.approx(1.0)
    assert schedule_factor("exponential", 100, 200, gamma=0.01) == pytest.approx(0.1)
    assert schedule_factor("exponential", 200, 200, gamma=0.01) == pytest.approx(0.01)
    assert schedule_factor("exponential", 50, 1000, step_size=50, gamma=0.5) == pytest.approx(0.5)
    assert schedule_factor("exponential", 75, 1000, step_size=50, gamma=0.5) == pytest.approx(0.5**1.5)


def test_onecycle_peaks_at_pct_start():
    total, pct_start, min_ratio = 100, 0.3, 0.01
    factors = [schedule_factor("onecycle", t, total, min_lr_ratio=min_ratio, pct_start=pct_start)
               for t in range(total + 1)]
    peak = int(pct_start * total)
    assert factors[0] == pytest.approx(1.0 / ONECYCLE_DIV_FACTOR)
    assert factors[peak] == pytest.approx(1.0) and max(factors) == pytest.approx(1.0)
    assert factors[peak // 2] == pytest.approx((1.0 + 1.0 / ONECYCLE_DIV_FACTOR) / 2)
    assert factors[total] == pytest.approx(min_ratio)
    assert all(a < b for a, b in pairwise(factors[:peak + 1]))
    assert all(a > b for a, b in pairwise(factors[peak:]))


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"unknown schedule 'linear'; choose from \['constant'"):
        schedule_factor("linear", 0, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        schedule_factor("cosine", 0, 10, warmup_steps=11)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), "cosine", total_steps=0)


def test_scheduler_preserves_per_group_lr_scale():
    model = _tiny_model()
    groups = param_groups(model[:3], weight_decay=0.0, lr_scale=0.1) + param_groups(model[3:], weight_decay=0.0)
    optimizer = build_optimizer("sgd", groups, lr=0.4)
    kwargs = {"total_steps": 20, "warmup_steps": 4, "min_lr_ratio": 0.05}
    scheduler = build_scheduler(optimizer, "cosine", **kwargs)
    scales = [0.1, 0.1, 1.0, 1.0]
    for t in range(25):
        for group, scale in zip(optimizer.param_groups, scales, strict=True):
            assert group["lr"] == pytest.approx(0.4 * scale * schedule_factor("cosine", t, **kwargs))
        optimizer.step()  # no grads: a no-op step keeps torch's "step order" check quiet
        scheduler.step()


@pytest.mark.parametrize("name", ["lars", "adamw"])
def test_optimizer_and_scheduler_state_dict_round_trip(name):
    def build(model):
        optimizer = build_optimizer(name, param_groups(model, weight_decay=0.01), lr=0.1)
        return optimizer, build_scheduler(optimizer, "cosine", total_steps=12, warmup_steps=3)

    def train(model, optimizer, scheduler, steps, seed):
        generator = torch.Generator().manual_seed(seed)
        lrs = []
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(4, 3, generator=generator)).pow(2).mean().backward()
            optimizer.step()
            scheduler.step()
            lrs.append([group["lr"] for group in optimizer.param_groups])
        return lrs

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer, scheduler = build(model)
    train(model, optimizer, scheduler, steps=5, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    expected_lrs = train(model, optimizer, scheduler, steps=5, seed=2)
    expected_params = copy.deepcopy(model.state_dict())

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = nn.Linear(3, 2)
    resumed.load_state_dict(checkpoint["model"])
    optimizer, scheduler = build(resumed)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    assert train(resumed, optimizer, scheduler, steps=5, seed=2) == expected_lrs
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected_params[key], rtol=0, atol=0)
