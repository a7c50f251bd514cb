"""DDP on CPU (gloo, 2 processes): 2 ranks x B/2 == 1 process x B for SimCLR (loss, every gradient, BatchNorm
statistics), sharded feature extraction without padding duplicates, the engine under DDP (rank-0-only files,
per-rank RNG in the checkpoint, resume on every rank, re-wrapping when a policy unfreezes layers), and a
2-process torchrun smoke run of scripts/pretrain.py.

Tolerance of the equivalence test: float32, ``rtol=1e-4, atol=1e-6`` on the loss, every gradient and the BN
running statistics (the two runs sum in different orders; a 1/world_size or missing-gather bug is off by 50%+).
The model has BatchNorm in the encoder and in the projection head, converted with
``distributed.convert_sync_batchnorm`` (CPUSyncBatchNorm on CPU): per-rank statistics would differ from the
global batch's, and a control run without the conversion shows they do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab import distributed
from reprlab.contracts import Callback, Task
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches, shard
from reprlab.engine import FitOptions, fit
from reprlab.evaluate.features import extract_features
from reprlab.models.encoders import Encoder
from reprlab.ssl.losses import nt_xent_loss
from reprlab.ssl.simclr import SimCLR
from tests.gloo import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
GLOBAL_BATCH = 8
# float32; ATOL covers parameters whose true gradient is zero (a bias followed by BatchNorm): their computed
# gradient is rounding noise of ~1e-6, while the bugs this test exists for (a missing all-reduce, a 1/world_size
# scale) move gradients by O(0.1)
RTOL, ATOL = 1e-4, 1e-5
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------- models and data


def tiny_simclr(seed: int = 0) -> SimCLR:
    """Conv-BN-ReLU encoder + SimCLR's Linear-BN-ReLU-Linear-BN projection head (BatchNorm everywhere)."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    encoder = Encoder(backbone, 8, {"name": "tiny", "kwargs": {}})
    return SimCLR(encoder, temperature=0.5, projection_dim=6, hidden_dim=10)


class FixedViews(nn.Module):
    """SimCLR's forward on given views (the random augmentation is tested elsewhere)."""

    def __init__(self, simclr: SimCLR, gather: bool = True) -> None:
        super().__init__()
        self.simclr, self.gather = simclr, gather

    def forward(self, view0: Tensor, view1: Tensor) -> Tensor:
        z = self.simclr.projector(self.simclr.encoder(torch.cat([view0, view1])))  # (2n, P)
        z0, z1 = z.chunk(2)
        return nt_xent_loss(z0, z1, self.simclr.temperature, gather=self.gather)


def fixed_views() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(GLOBAL_BATCH, 3, 6, 6, generator=generator),
            torch.rand(GLOBAL_BATCH, 3, 6, 6, generator=generator))


def bn_stats(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def grads(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def tiny_data(n: int = 48) -> ImageSet:
    generator = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 255, (n, 1, 8, 8), dtype=torch.uint8, generator=generator),
                    torch.arange(n) % 4, list("abcd"))


class TinyTask(Task):
    """A frozen-at-first layer, BatchNorm, and noise from the global RNG (differs per rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(64, 16)
        self.rest = nn.Sequential(nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        self.first.requires_grad_(False)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["images"].flatten(1).float() / 255
        x = x + 0.05 * torch.randn_like(x)
        return {"loss": F.cross_entropy(self.rest(self.first(x)), batch["labels"])}


class Unfreeze(Callback):
    """A policy-like callback: unfreezes ``task.first`` at epoch 1."""

    def __init__(self, task: TinyTask) -> None:
        self.task = task

    def on_epoch_start(self, epoch: int) -> None:
        if epoch >= 1:
            self.task.first.requires_grad_(True)


class CountingEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
        self.seen = 0

    def forward(self, images: Tensor) -> Tensor:
        self.seen += len(images)
        return self.net(images)


# --------------------------------------------------------------------------------------------- the workers


def _equivalence(rank: int) -> dict:
    view0, view1 = fixed_views()
    n = GLOBAL_BATCH // WORLD
    local = slice(rank * n, (rank + 1) * n)
    out: dict = {}
    for label, sync, gather in (("sync_gather", True, True), ("no_sync", False, True), ("no_gather", True, False)):
        model = FixedViews(tiny_simclr(), gather=gather)
        if sync:
            model = distributed.convert_sync_batchnorm(model, CPU)
        ddp = nn.parallel.DistributedDataParallel(model)
        loss = ddp(view0[local], view1[local])
        loss.backward()  # DDP averages the gradients over the ranks
        out[label] = {"loss": distributed.all_reduce_mean(loss.detach()), "grads": grads(model),
                      "bn": bn_stats(model)}
    return out


def _features(rank: int) -> dict:
    images = torch.rand(7, 3, 2, 2, generator=torch.Generator().manual_seed(2))  # 7: one padding duplicate
    encoder = CountingEncoder()
    sharded = extract_features(encoder, images, batch_size=2, shard=True)
    seen = encoder.seen
    return {"sharded": sharded, "seen": seen, "full": extract_features(encoder, images, batch_size=3)}


def _engine(rank: int, run_dir: str) -> dict:
    torch.manual_seed(10 + rank)  # as pretrain seeds each rank: different init, DDP broadcasts rank 0's
    task = TinyTask()
    optimizer = torch.optim.SGD([p for p in task.parameters()], lr=0.1, momentum=0.9)
    batches = Batches(tiny_data(), 4, seed=0, rank=rank, world_size=WORLD)
    result = fit(task, batches, optimizer, None,
                 FitOptions(epochs=2, device=CPU, run_dir=run_dir, log_every=2, checkpoint_every_steps=4,
                            progress=False),
                 callbacks=[Unfreeze(task)])
    params = torch.cat([p.detach().flatten() for p in task.parameters()])
    resumed = fit(task, batches, optimizer, None,
                  FitOptions(epochs=3, device=CPU, run_dir=run_dir, log_every=2, progress=False),
                  callbacks=[Unfreeze(task)])
    after = torch.cat([p.detach().flatten() for p in task.parameters()])
    return {"params": distributed.all_gather(params[None]), "after": distributed.all_gather(after[None]),
            "bn_type": type(task.rest[0]).__name__, "epochs_run": result.epochs_run,
            "resumed_from": resumed.resumed_from, "steps": len(batches)}


def _worker(rank: int, run_dir: str) -> dict:
    return {"equivalence": _equivalence(rank), "features": _features(rank), "engine": _engine(rank, run_dir)}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("ddp")
    return run_on_ranks(_worker, out, str(out / "run"), world=WORLD), out / "run"


# --------------------------------------------------------------------------------------------- tests


def reference() -> dict:
    """One process, the whole global batch, plain BatchNorm."""
    model = FixedViews(tiny_simclr())
    loss = model(*fixed_views())
    loss.backward()
    return {"loss": loss.detach(), "grads": grads(model), "bn": bn_stats(model)}


def close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def test_two_ranks_equal_one_process_loss_gradients_and_bn(ddp_results):
    results, _ = ddp_results
    ref = reference()
    for rank_result in results:
        got = rank_result["equivalence"]["sync_gather"]
        assert close(got["loss"], ref["loss"]), (got["loss"], ref["loss"])
        assert got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) == 10
        for name, grad in ref["grads"].items():
            assert close(got["grads"][name], grad), (name, (got["grads"][name] - grad).abs().max(), grad.abs().max())
        for name, stat in ref["bn"].items():
            assert close(got["bn"][name], stat), name


def test_the_equivalence_test_can_fail(ddp_results):
    """Controls: per-rank BatchNorm changes the gradients; no gather changes the loss (fewer negatives)."""
    results, _ = ddp_results
    ref = reference()
    no_sync = results[0]["equivalence"]["no_sync"]
    assert not all(close(no_sync["grads"][k], g) for k, g in ref["grads"].items())
    no_gather = results[0]["equivalence"]["no_gather"]
    assert not close(no_gather["loss"], ref["loss"])


def test_sharded_features_equal_single_process_without_duplicates(ddp_results):
    results, _ = ddp_results
    for rank_result in results:
        features = rank_result["features"]
        assert features["sharded"].shape == (7, 5)
        assert torch.allclose(features["sharded"], features["full"], atol=1e-6)
        assert features["seen"] == 4  # 7 images padded to 8, split over 2 ranks


def test_engine_under_ddp(ddp_results):
    results, run_dir = ddp_results
    engine = [r["engine"] for r in results]
    assert engine[0]["bn_type"] == "CPUSyncBatchNorm"
    params, after = engine[0]["params"], engine[0]["after"]
    # every parameter, including the layer unfrozen at epoch 1 (DDP re-wrapped), is the same on both ranks
    assert torch.equal(params[0], params[1]) and torch.equal(after[0], after[1])
    assert not torch.equal(params[0], after[0])
    assert [e["resumed_from"] for e in engine] == [(2, 0), (2, 0)]  # every rank resumed
    assert engine[0]["steps"] == 6  # 48 images / 2 ranks / 4 per rank
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r.get("event") == "epoch_end"] == [1, 2, 3]  # rank 0 alone writes
    state = torch.load(run_dir / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_shard_is_distributed_sampler_like():
    order = torch.arange(10)
    parts = [shard(order, r, 3, drop_last=True) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3] and len(set(torch.cat(parts).tolist())) == 9
    padded = [shard(order, r, 3, drop_last=False) for r in range(3)]
    assert [len(p) for p in padded] == [4, 4, 4] and set(torch.cat(padded).tolist()) == set(range(10))
    assert torch.cat(padded).tolist().count(0) == 2  # the padding repeats the first items
    assert [len(shard(torch.arange(1), r, 4, drop_last=False)) for r in range(4)] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="rank must be in"):
        shard(order, 3, 3, drop_last=True)


def test_batches_shards_cover_an_epoch_once():
    data = tiny_data(50)
    ranks = [Batches(data, 5, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    seen = torch.cat([b["index"] for r in ranks for b in r.epoch(1)])
    assert len(seen) == 50 and len(set(seen.tolist())) == 50
    assert torch.equal(ranks[0].order(1), Batches(data, 5, seed=3, rank=0, world_size=2).order(1))


@pytest.mark.slow
def test_torchrun_pretrain_smoke(tmp_path):
    """2 CPU processes under torchrun: pretrain end to end, then rerun with one more epoch (every rank resumes)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "scripts" / "pretrain.py"), "--config", str(ROOT / "configs/pretrain/simclr_digits.yaml"),
               "name=ddp", f"out_dir={tmp_path}", "encoder.name=timm:test_resnet", "encoder.kwargs={}",
               "data.limit=120", "train.batch_size=16", "train.epochs=1", "train.device=cpu",
               "train.checkpoint_every_steps=3", "train.progress=false", "monitor.every_epochs=1",
               "monitor.knn_k=5", "method.params.projection_dim=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "ddp"
    assert {"encoder.safetensors", "meta.json", "config.yaml", "metrics.jsonl", "state.pt"} <= {
        p.name for p in run.iterdir()}
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["epoch"] == 1
    second = subprocess.run([*command, "train.epochs=2"], capture_output=True, text=True, env=env, timeout=300,
                            cwd=ROOT)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("resuming") == 1  # printed by rank 0 only
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch_ends = [r for r in lines if r.get("event") == "epoch_end"]
    assert [r["epoch"] for r in epoch_ends] == [1, 2]  # one writer: no duplicated lines
    assert "knn_top1" in epoch_ends[-1]  # the rank-0-only monitor ran
