"""Tests for reprlab.ssl.momentum (EMA targets and BYOL's cosine schedule) and reprlab.ssl.queue (MoCo's queue)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from reprlab import distributed
from reprlab.ssl.momentum import cosine_momentum, momentum_copy, update_momentum
from reprlab.ssl.queue import MemoryQueue


def tiny_net(seed: int = 0) -> nn.Sequential:
    """Linear-BN-ReLU and DINO's weight-normalized last layer (a parametrization, which deep-copies)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(),
                         weight_norm(nn.Linear(4, 2, bias=False))).double()


# ------------------------------------------------------------------------------------------------ momentum_copy


def test_momentum_copy_is_frozen_deep_and_keeps_the_mode():
    online = tiny_net()
    online(torch.randn(5, 3, dtype=torch.float64)).sum().backward()  # online has grads and moved BN statistics
    target = momentum_copy(online)
    assert all(not p.requires_grad and p.grad is None for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())  # the source is untouched
    for (name, a), (_, b) in zip(online.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name  # parameters and BN buffers copied ...
        assert a.data_ptr() != b.data_ptr(), name  # ... not shared
    assert target.training and target[1].training  # BYOL/MoCo/DINO targets normalize with batch statistics
    online.eval()
    assert not momentum_copy(online)[1].training
    # a forward and backward through online + target trains only the online network
    x = torch.randn(6, 3, dtype=torch.float64)
    online.zero_grad()
    (online(x) * target(x)).sum().backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in online.parameters())


# ------------------------------------------------------------------------------------------------ cosine schedule


def test_cosine_momentum_by_hand():
    total = 1000
    assert cosine_momentum(0, total) == pytest.approx(0.996, abs=1e-15)  # first step: base
    assert cosine_momentum(500, total) == pytest.approx(0.998, abs=1e-15)  # half-way: (base + final) / 2
    assert cosine_momentum(total, total) == 1.0  # last: final
    assert cosine_momentum(total + 7, total) == 1.0  # clamped, as BYOL's code
    assert cosine_momentum(250, total) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-15)
    assert cosine_momentum(250, total, base=0.99, final=0.999) == pytest.approx(
        0.999 - 0.009 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-15)
    values = [cosine_momentum(k, total) for k in range(total + 1)]
    assert all(a <= b for a, b in zip(values, values[1:]))  # increases monotonically
    for bad in ({"step": -1, "total_steps": 10}, {"step": 0, "total_steps": 0},
                {"step": 0, "total_steps": 10, "base": 1.5}):
        with pytest.raises(ValueError):
            cosine_momentum(**bad)


# ------------------------------------------------------------------------------------------------ update_momentum


def test_update_momentum_follows_the_cosine_schedule_by_hand():
    """K = 4 optimizer steps; at each global step k the target moves by tau_k = cosine_momentum(k, K), checked
    element by element against tau * target + (1 - tau) * online, at the first (tau = base), the middle and the
    last step (tau = 1: the target stops)."""
    online, total = tiny_net(), 4
    target = momentum_copy(online)
    generator = torch.Generator().manual_seed(1)
    for step in range(total + 1):
        with torch.no_grad():  # what an optimizer step would do: the online network moves
            for p in online.parameters():
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
        tau = cosine_momentum(step, total)
        before = {n: p.clone() for n, p in target.named_parameters()}
        update_momentum(online, target, tau)
        for name, p in online.named_parameters():
            flat_target, flat_online, got = before[name].flatten(), p.flatten(), dict(target.named_parameters())[name]
            expected = torch.stack([tau * flat_target[i] + (1 - tau) * flat_online[i] for i in range(len(flat_online))])
            torch.testing.assert_close(got.flatten(), expected, rtol=1e-12, atol=1e-14)
        if step == 0:
            assert tau == pytest.approx(0.996)
        if step == total:
            assert tau == 1.0 and all(torch.equal(before[n], p) for n, p in target.named_parameters())


def test_update_momentum_buffers_and_extremes():
    online = tiny_net()
    target = momentum_copy(online)
    online(torch.randn(8, 3, dtype=torch.float64) * 5 + 2)  # online BN statistics move, the target's do not
    target_stats = target[1].running_mean.clone()
    update_momentum(online, target, 0.5)
    assert torch.equal(target[1].running_mean, target_stats)  # default: the target's statistics are its own
    update_momentum(online, target, 0.5, copy_buffers=True)
    assert torch.equal(target[1].running_mean, online[1].running_mean)
    assert torch.equal(target[1].num_batches_tracked, online[1].num_batches_tracked)
    update_momentum(online, target, 0.0)  # momentum 0: an exact copy
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters()))
    assert not any(p.requires_grad for p in target.parameters())  # the update keeps it frozen
    with pytest.raises(ValueError, match="momentum"):
        update_momentum(online, target, 1.1)


def test_update_momentum_refuses_a_target_copied_before_syncbn_conversion():
    online = tiny_net()
    target = momentum_copy(online)
    distributed.convert_sync_batchnorm(online, torch.device("cpu"))  # the pitfall: convert after copying
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        update_momentum(online, target, 0.99)
    with pytest.raises(ValueError, match="layers"):
        update_momentum(tiny_net(), nn.Sequential(nn.Linear(3, 4)), 0.99)


# ------------------------------------------------------------------------------------------------ MemoryQueue


def keys(start: int, n: int, dim: int = 2) -> torch.Tensor:
    """n identifiable keys: row i is filled with start + i."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)


def test_queue_is_fifo_and_wraps_around():
    queue = MemoryQueue(size=5, dim=2)
    initial = queue.queue.clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(5))  # random unit vectors, as MoCo
    assert torch.equal(MemoryQueue(5, 2).queue, initial)  # fixed seed: every rank starts the same
    queue.enqueue(keys(10, 2))
    assert int(queue.pointer) == 2
    assert torch.equal(queue.queue[:2], keys(10, 2)) and torch.equal(queue.queue[2:], initial[2:])
    queue.enqueue(keys(20, 2))
    assert int(queue.pointer) == 4
    queue.enqueue(keys(30, 2))  # wraps: row 4, then row 0 (the oldest key, 10, goes first)
    assert int(queue.pointer) == 1
    assert queue.queue[:, 0].tolist() == [31, 11, 20, 21, 30]
    assert queue.ordered()[:, 0].tolist() == [11, 20, 21, 30, 31]  # oldest to newest
    queue.enqueue(keys(40, 5))  # a batch the size of the queue replaces everything, in order
    assert int(queue.pointer) == 1 and queue.ordered()[:, 0].tolist() == [40, 41, 42, 43, 44]
    with pytest.raises(ValueError, match="do not fit"):
        queue.enqueue(keys(0, 6))
    with pytest.raises(ValueError, match="keys must be"):
        queue.enqueue(torch.zeros(2, 3))


def test_queue_lives_in_the_state_dict_and_holds_no_gradient():
    queue = MemoryQueue(size=4, dim=3)
    key = torch.randn(3, 3, requires_grad=True)
    queue.enqueue(key * 2)
    assert not queue.queue.requires_grad
    state = queue.state_dict()
    assert set(state) == {"queue", "pointer"} and state["pointer"].dtype == torch.long
    resumed = MemoryQueue(size=4, dim=3, seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.queue, queue.queue) and int(resumed.pointer) == 3
    resumed.enqueue(keys(7, 2, dim=3))  # resumes where it stopped: rows 3 and 0
    assert resumed.queue[3, 0].item() == 7 and resumed.queue[0, 0].item() == 8
