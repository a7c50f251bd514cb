"""DDP on CPU (gloo, 2 processes) for the losses that use the whole batch: 2 ranks with half of the batch each give
the loss and every gradient of 1 process on the full batch, for MoCo v3 (keys gathered), Barlow Twins (the global
cross-correlation and standardization) and VICReg (the global variance and covariance); MoCo's queue holds every
rank's keys in rank order, the same on both ranks; DINO's centre is the global batch mean.

Controls: with ``gather=False`` each loss is the per-rank loss, and it differs from the global one (so the
equivalence is not vacuous). float64 throughout: the two runs differ only in summation order. The gradients are
averaged over the ranks by an all-reduce, DDP's rule, without the wrapper itself: constructing the first
DistributedDataParallel imports about 900 modules (6 s per process on a quiet machine); test_distributed.py
covers DDP with these same collectives.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from reprlab import distributed
from reprlab.ssl.losses import barlow_twins_loss, moco_v3_loss, update_center, vicreg_loss
from reprlab.ssl.momentum import momentum_copy
from reprlab.ssl.queue import MemoryQueue
from tests.gloo import run_on_ranks

WORLD = 2
GLOBAL_BATCH = 8
LOSSES = ("moco_v3", "barlow_twins", "vicreg")
RTOL, ATOL = 1e-9, 1e-12


class TwoViews(nn.Module):
    """A linear projector on two fixed views, then one of the global-batch losses (MoCo v3: symmetric, keys from a
    frozen momentum copy that has drifted from the projector)."""

    def __init__(self, loss: str, gather: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.projector = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
        self.target = momentum_copy(self.projector)
        with torch.no_grad():
            for p in self.target.parameters():
                p.add_(0.3 * torch.randn_like(p))
        self.loss, self.gather = loss, gather

    def forward(self, view0: Tensor, view1: Tensor) -> Tensor:
        z0, z1 = self.projector(view0), self.projector(view1)  # (n, 4)
        if self.loss == "moco_v3":
            k0, k1 = self.target(view0), self.target(view1)
            return (moco_v3_loss(z0, k1, temperature=0.2, gather=self.gather)
                    + moco_v3_loss(z1, k0, temperature=0.2, gather=self.gather))
        if self.loss == "barlow_twins":
            return barlow_twins_loss(z0, z1, lambda_offdiag=0.1, gather=self.gather)
        return vicreg_loss(z0, z1, gather=self.gather)


def fixed_views() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    view0 = torch.randn(GLOBAL_BATCH, 5, generator=generator, dtype=torch.float64)
    return view0, view0 + 0.5 * torch.randn(GLOBAL_BATCH, 5, generator=generator, dtype=torch.float64)


def teacher_outputs() -> list[Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(GLOBAL_BATCH, 3, generator=generator, dtype=torch.float64) for _ in range(2)]


def grads(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------- the worker


def average_gradients(module: nn.Module) -> None:
    """What DDP does after backward: every gradient becomes its mean over the ranks."""
    for p in module.parameters():
        if p.grad is not None:
            p.grad = distributed.all_reduce_mean(p.grad)


def _worker(rank: int) -> dict:
    n = GLOBAL_BATCH // WORLD
    local = slice(rank * n, (rank + 1) * n)
    view0, view1 = fixed_views()
    out: dict = {}
    for loss in LOSSES:
        for gather in (True, False):
            model = TwoViews(loss, gather)
            value = model(view0[local], view1[local])
            value.backward()
            average_gradients(model)
            out[f"{loss}/{gather}"] = {"loss": distributed.all_reduce_mean(value.detach()), "grads": grads(model)}
    queue = MemoryQueue(size=6, dim=2)
    for step in range(2):  # rank r's keys at step s are filled with 100 * s + 10 * r + i
        keys = (100 * step + 10 * rank + torch.arange(n - 1.0))[:, None].repeat(1, 2)  # 3 keys per rank
        queue.enqueue(keys)
    out["queue"] = {"queue": queue.queue.clone(), "pointer": queue.pointer.clone()}
    center = torch.ones(3, dtype=torch.float64)
    update_center(center, [t[local] for t in teacher_outputs()], momentum=0.9)
    out["center"] = center
    return out


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_losses")
    return run_on_ranks(_worker, out, world=WORLD)


# --------------------------------------------------------------------------------------------- tests


def reference(loss: str) -> dict:
    """One process, the whole batch."""
    model = TwoViews(loss, gather=True)
    value = model(*fixed_views())
    value.backward()
    return {"loss": value.detach(), "grads": grads(model)}


def close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss", LOSSES)
def test_two_ranks_equal_one_process_loss_and_gradients(ddp_results, loss):
    ref = reference(loss)
    assert len(ref["grads"]) == 4  # the projector's; the momentum copy has none
    for rank_result in ddp_results:
        got = rank_result[f"{loss}/True"]
        assert close(got["loss"], ref["loss"]), (got["loss"], ref["loss"])
        assert got["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            assert close(got["grads"][name], grad), (name, (got["grads"][name] - grad).abs().max())


@pytest.mark.parametrize("loss", LOSSES)
def test_the_equivalence_test_can_fail(ddp_results, loss):
    """Without the cross-rank reduction the loss is the per-rank one: a different value and gradient."""
    ref = reference(loss)
    per_rank = ddp_results[0][f"{loss}/False"]
    assert not close(per_rank["loss"], ref["loss"])
    assert not all(close(per_rank["grads"][k], g) for k, g in ref["grads"].items())


def test_queue_holds_every_ranks_keys_in_rank_order(ddp_results):
    queue = MemoryQueue(size=6, dim=2)
    for step in range(2):  # one process enqueueing the global batch: rank 0's keys, then rank 1's
        queue.enqueue(torch.cat([(100 * step + 10 * r + torch.arange(3.0))[:, None].repeat(1, 2) for r in range(2)]))
    for rank_result in ddp_results:
        assert torch.equal(rank_result["queue"]["queue"], queue.queue)
        assert int(rank_result["queue"]["pointer"]) == int(queue.pointer) == 0  # 12 keys through 6 rows
    assert queue.queue[:, 0].tolist() == [100, 101, 102, 110, 111, 112]


def test_dino_center_is_the_global_batch_mean(ddp_results):
    center = torch.ones(3, dtype=torch.float64)
    update_center(center, teacher_outputs(), momentum=0.9)
    for rank_result in ddp_results:
        assert close(rank_result["center"], center)
