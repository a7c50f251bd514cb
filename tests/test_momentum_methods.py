"""The momentum and predictor methods (BYOL, MoCo v2, MoCo v3, SimSiam) as the loop runs them: the target is frozen
and in no optimizer group, ``after_step`` moves it with the momentum of each global step (checked by hand at the
first, a middle and the last step, and through ``fit``), MoCo v2 enqueues each step's keys after using the queue,
a crashed BYOL run resumes bit for bit (target included), the checkpoint holds the target and the queue, the saved
encoder is the online one, SyncBatchNorm conversion leaves the target's update unchanged, and for MoCo v3 2 gloo
ranks with half the batch each give the loss and gradients of 1 process (its whole-batch keys)."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reprlab.ssl.byol
import reprlab.ssl.moco
from reprlab import checkpoint, distributed
from reprlab.config import OptimConfig, PretrainConfig, load_config
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches
from reprlab.engine import FitOptions, fit
from reprlab.evaluate.quality import mean_cosine
from reprlab.models.encoders import Encoder, create_encoder
from reprlab.optim import build_optimization
from reprlab.ssl import build_method
from reprlab.ssl.byol import BYOL, BYOL_AUGMENT, BYOL_AUGMENT2
from tests.gloo import run_on_ranks

CPU = torch.device("cpu")
MOMENTUM = ("byol", "moco_v2", "moco_v3")  # the methods with a target network
TARGET = {"byol": ("target_encoder", "target_projector"), "moco_v2": ("key_encoder", "key_projector"),
          "moco_v3": ("key_encoder", "key_projector")}
TINY = {"byol": {"projection_dim": 8, "hidden_dim": 16},
        "moco_v2": {"projection_dim": 8, "hidden_dim": 16, "queue_size": 40},
        "moco_v3": {"projection_dim": 8, "hidden_dim": 16},
        "simsiam": {"projection_dim": 8, "hidden_dim": 16, "predictor_hidden_dim": 4}}


def tiny_encoder(seed: int = 0) -> Encoder:
    """Conv-BN-ReLU-pool: BatchNorm in the encoder too, milliseconds per step."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    return Encoder(backbone, 8, {"name": "tiny", "kwargs": {}})


def tiny_method(name: str, seed: int = 0, **params) -> nn.Module:
    return build_method(name, tiny_encoder(seed), {**TINY[name], **params})


def tiny_data(n: int = 40) -> ImageSet:
    generator = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8, generator=generator),
                    torch.arange(n) % 4, list("abcd"))


def fixed_views(n: int = 8, seed: int = 1) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, 6, 6, generator=generator) for _ in range(2)]


def target_modules(method: nn.Module, name: str) -> list[nn.Module]:
    return [getattr(method, attr) for attr in TARGET[name]]


def online_modules(method: nn.Module) -> list[nn.Module]:
    return [method.encoder, method.projector]


def hand_momentum(name: str, step: int, total: int) -> float:
    """The papers' schedules written out: BYOL tau(k) = 1 - (1 - 0.996)(cos(pi k / K) + 1) / 2 at k = step - 1 (its
    code evaluates at the pre-increment step); MoCo v3 the same from 0.99 at k = step; MoCo v2 0.999 throughout."""
    if name == "byol":
        return 1 - (1 - 0.996) * (math.cos(math.pi * (step - 1) / total) + 1) / 2
    if name == "moco_v3":
        return 1 - (1 - 0.99) * (math.cos(math.pi * step / total) + 1) / 2
    return 0.999


def run_fit(method: nn.Module, run_dir: Path | None = None, epochs: int = 2, **options):
    optimizer, scheduler = build_optimization(OptimConfig(lr=0.05), method, 8, 5, epochs)
    options = {"log_every": 1, "progress": False, **options}
    return fit(method, Batches(tiny_data(), 8, seed=5), optimizer, scheduler,
               FitOptions(epochs=epochs, device=CPU, run_dir=run_dir, **options))


def state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- the frozen target


@pytest.mark.parametrize("name", MOMENTUM)
def test_target_is_frozen_in_state_dict_and_in_no_optimizer_group(name):
    method = tiny_method(name).train()
    targets = [p for module in target_modules(method, name) for p in module.parameters()]
    assert targets and not any(p.requires_grad for p in targets)
    online = [p for module in online_modules(method) for p in module.parameters()]
    assert all(p.requires_grad for p in online)
    keys = method.state_dict().keys()
    assert all(any(k.startswith(f"{attr}.") for k in keys) for attr in TARGET[name])  # so in state.pt
    optimizer, _ = build_optimization(OptimConfig(lr=0.05), method, 8, 1, 1)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in method.parameters() if p.requires_grad}
    assert not optimized & {id(p) for p in targets}
    before = [p.clone() for p in targets]
    method(next(iter(Batches(tiny_data(), 8, seed=0).epoch(0))))["loss"].backward()
    assert all(p.grad is None for p in targets)
    assert method.encoder.backbone[0].weight.grad.abs().sum() > 0
    optimizer.step()  # the optimizer never moves the target; only after_step does
    assert all(torch.equal(p, b) for p, b in zip(targets, before))


@pytest.mark.parametrize("name", MOMENTUM)
def test_after_step_is_the_ema_with_each_steps_momentum_by_hand(name):
    method = tiny_method(name).train()
    method(next(iter(Batches(tiny_data(), 8, seed=0).epoch(0))))  # the target's BN statistics move off their start
    with torch.no_grad():  # online and target apart, so the average is visible
        for p in method.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    total = 10
    for step in (1, 5, total):  # the first, a middle and the last step
        online = {n: p.clone() for n, p in method.named_parameters() if p.requires_grad}
        before = state(method)
        method.after_step(step, total)
        after = method.state_dict()
        m = hand_momentum(name, step, total)
        for online_attr, target_attr in zip(("encoder", "projector"), TARGET[name]):
            for key, value in getattr(method, target_attr).named_parameters():
                expected = m * before[f"{target_attr}.{key}"] + (1 - m) * online[f"{online_attr}.{key}"]
                assert torch.allclose(value, expected, rtol=0, atol=1e-6), (step, key)
            for key in getattr(method, target_attr).state_dict().keys() - dict(
                    getattr(method, target_attr).named_parameters()).keys():  # BN statistics stay the target's
                assert torch.equal(after[f"{target_attr}.{key}"], before[f"{target_attr}.{key}"]), key
        assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith(TARGET[name]))
    if name != "moco_v2":
        assert hand_momentum(name, total, total) > hand_momentum(name, 5, total) > hand_momentum(name, 1, total)


@pytest.mark.parametrize("name", MOMENTUM)
def test_fit_updates_the_target_after_every_step_with_that_steps_momentum(name, monkeypatch):
    module = reprlab.ssl.byol if name == "byol" else reprlab.ssl.moco
    calls: list[float] = []
    real = module.update_momentum

    def recording(online: nn.Module, target: nn.Module, momentum: float, **kwargs) -> None:
        calls.append(momentum)
        real(online, target, momentum, **kwargs)

    monkeypatch.setattr(module, "update_momentum", recording)
    run_fit(tiny_method(name), epochs=2)  # 5 steps per epoch
    expected = [hand_momentum(name, step, 10) for step in range(1, 11) for _ in range(2)]  # encoder, projector
    assert calls == pytest.approx(expected, rel=0, abs=1e-12)
    if name == "byol":
        assert calls[0] == pytest.approx(0.996, abs=1e-15) and calls[-1] < 1.0  # BYOL: base at the first update


def test_sync_batchnorm_conversion_converts_the_target_too_and_keeps_its_update():
    plain = tiny_method("byol").train()
    with torch.no_grad():
        for p in plain.parameters():
            if p.requires_grad:
                p.add_(0.3)
    converted = distributed.convert_sync_batchnorm(copy.deepcopy(plain), CPU)
    target_bn = [m for m in converted.target_encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert target_bn and all(isinstance(m, distributed.CPUSyncBatchNorm) for m in target_bn)
    assert not any(p.requires_grad for p in converted.target_projector.parameters())
    plain.after_step(3, 10)
    converted.after_step(3, 10)  # update_momentum checks that both sides have the same layer types
    assert identical(state(plain), state(converted))


# ------------------------------------------------------------------------------------- MoCo v2's queue


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_v2_uses_the_queue_then_enqueues_the_steps_keys(symmetric):
    method = tiny_method("moco_v2", symmetric=symmetric).train()
    n, size = 8, method.queue.size
    for step in range(3):
        views = fixed_views(n, seed=step)
        old_queue = method.queue.queue.clone()
        start = int(method.queue.pointer)
        reference = copy.deepcopy(method)
        out = method.forward_views(views)
        key_views = [0, 1] if symmetric else [1]
        keys = torch.cat([F.normalize(reference.keys(views[k]), dim=1) for k in key_views])  # (n or 2n, P)
        rows = (torch.arange(len(keys)) + start) % size
        assert torch.allclose(method.queue.queue[rows], keys, atol=1e-6)
        untouched = torch.ones(size, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(method.queue.queue[untouched], old_queue[untouched])
        assert int(method.queue.pointer) == (start + len(keys)) % size
        if not symmetric:  # the loss was computed against the queue as it was before this step's keys went in
            query = F.normalize(reference.projector(reference.encoder(views[0])), dim=1)  # (n, P)
            positive = (query * F.normalize(reference.keys(views[1]), dim=1)).sum(dim=1, keepdim=True)  # (n, 1)
            logits = torch.cat([positive, query @ old_queue.T], dim=1) / 0.2  # (n, 1 + size)
            assert torch.allclose(out["loss"], F.cross_entropy(logits, torch.zeros(n, dtype=torch.long)), atol=1e-5)
    assert out["loss"].requires_grad and 0 <= float(out["acc"]) <= 1
    assert float(out["key_cos"]) == pytest.approx(float(mean_cosine(keys)), abs=1e-6)  # the step's keys


def test_moco_v2_queue_advances_every_step_of_fit_and_is_in_the_checkpoint(tmp_path):
    method = tiny_method("moco_v2")
    start = method.queue.queue.clone()
    run_fit(method, tmp_path, epochs=1)  # 5 steps of 8 keys into 40 rows: every row replaced, pointer back at 0
    assert int(method.queue.pointer) == 0 and not (method.queue.queue == start).all(dim=1).any()
    saved = checkpoint.load_state(tmp_path / "state.pt")["model"]
    assert torch.equal(saved["queue.queue"], method.queue.queue) and int(saved["queue.pointer"]) == 0
    assert identical({k: v for k, v in saved.items() if k.startswith("key_")},
                     {k: v for k, v in state(method).items() if k.startswith("key_")})


def test_moco_v2_queue_smaller_than_the_batch_is_one_line_naming_the_fix():
    method = tiny_method("moco_v2", queue_size=4)
    with pytest.raises(ValueError, match="queue_size of at least the global batch"):
        method.forward_views(fixed_views(8))


# ------------------------------------------------------------------------------------- resume, artifacts


class CrashingBYOL(BYOL):
    def __init__(self, *args, crash_at: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_at, self.calls = crash_at, 0

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError(f"simulated crash in step {self.calls}")
        return super().forward(batch)


def test_byol_crash_mid_epoch_then_resume_is_bit_identical_target_included(tmp_path):
    def build(seed: int, crash_at: int | None = None) -> CrashingBYOL:
        return CrashingBYOL(tiny_encoder(seed), crash_at=crash_at, **TINY["byol"])

    reference = build(0)
    run_fit(reference, tmp_path / "a", checkpoint_every_steps=3)
    with pytest.raises(RuntimeError, match="simulated crash"):  # checkpoints at steps 3, 5, 6; dies in step 8
        run_fit(build(0, crash_at=8), tmp_path / "b", checkpoint_every_steps=3)
    assert checkpoint.load_state(tmp_path / "b" / "state.pt")["global_step"] == 6
    resumed = build(123)  # another init: everything must come from the state
    result = run_fit(resumed, tmp_path / "b", checkpoint_every_steps=3)
    assert result.resumed_from == (1, 1)
    assert identical(state(resumed), state(reference))
    targets = [k for k in state(reference) if k.startswith("target_")]
    assert targets and all(torch.equal(resumed.state_dict()[k], reference.state_dict()[k]) for k in targets)
    assert not torch.equal(reference.target_projector[0].weight, reference.projector[0].weight)  # not vacuous


@pytest.mark.parametrize("name", MOMENTUM)
def test_saved_encoder_loads_and_is_the_online_network(name, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: {name}\nout_dir: {tmp_path}\ndata: {{name: digits, limit: 128}}\n"
                      f"encoder: {{name: 'timm:test_resnet'}}\nmethod: {{name: {name}, params: {TINY[name]}}}\n"
                      "train: {epochs: 1, batch_size: 32, device: cpu, progress: false}\nmonitor: {every_epochs: 0}\n")
    import reprlab

    run_dir = reprlab.pretrain(load_config(PretrainConfig, config))
    loaded = reprlab.load_encoder(run_dir).state_dict()
    saved = checkpoint.load_state(run_dir / "state.pt")["model"]
    online = {k.removeprefix("encoder."): v for k, v in saved.items() if k.startswith("encoder.")}
    target = {k.removeprefix(f"{TARGET[name][0]}."): v for k, v in saved.items() if k.startswith(TARGET[name][0])}
    assert identical(loaded, online)
    assert loaded.keys() == target.keys() and not identical(loaded, target)


# ------------------------------------------------------------------------------------- views and heads


@pytest.mark.parametrize("name", ["byol", "moco_v3", "simsiam", "moco_v2"])
def test_forward_is_augment_then_forward_views(name):
    method = tiny_method(name).train()
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    other = copy.deepcopy(method)  # MoCo v2 changes its queue on every call
    torch.manual_seed(3)
    out = method({"images": images})
    torch.manual_seed(3)
    views = other.views(images)
    again = other.forward_views(views)
    assert out.keys() == again.keys() and all(torch.equal(out[k], again[k]) for k in out)
    with pytest.raises(ValueError, match="exactly 2 views per image, got 3"):
        other.forward_views(views + views[:1])


def test_byol_views_default_to_the_papers_pair_and_yaml_keys_left_out_keep_it():
    method = build_method("byol", tiny_encoder(), {**TINY["byol"], "augment2": {"flip_p": 0.0}})
    assert method.augment == BYOL_AUGMENT and (method.augment.blur_p, method.augment.solarize_p) == (1.0, 0.0)
    assert method.augment2 == dataclasses.replace(BYOL_AUGMENT2, flip_p=0.0)
    assert (BYOL_AUGMENT2.blur_p, BYOL_AUGMENT2.solarize_p) == (0.1, 0.2)
    assert build_method("moco_v3", tiny_encoder()).augment2 == BYOL_AUGMENT2  # MoCo v3 uses BYOL's views


def test_moco_v3_vit_heads_and_architecture_errors():
    encoder = create_encoder("timm:test_vit", img_size=16, patch_size=4)
    method = build_method("moco_v3", encoder, {"architecture": "vit", **TINY["moco_v3"]})
    assert method.temperature == 0.2 and build_method("moco_v3", tiny_encoder()).temperature == 1.0
    assert sum(isinstance(m, nn.Linear) for m in method.projector) == 3
    assert isinstance(method.predictor[-1], nn.BatchNorm1d) and not method.predictor[-1].affine
    out = method({"images": torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is None for p in method.key_encoder.parameters())
    with pytest.raises(ValueError, match=r"unknown MoCo v3 architecture 'vitt'; choose from \['resnet', 'vit'\]"):
        build_method("moco_v3", tiny_encoder(), {"architecture": "vitt"})


def test_simsiam_has_no_target_and_logs_the_collapse_signal():
    method = tiny_method("simsiam").train()
    assert all(p.requires_grad for p in method.parameters())
    assert isinstance(method.projector[-1], nn.BatchNorm1d) and not method.projector[-1].affine
    out = method.forward_views(fixed_views())
    assert -1 <= float(out["loss"].detach()) <= 1 and 0 < float(out["z_std"]) <= 1


# ------------------------------------------------------------------------------------- MoCo v3 on 2 ranks

WORLD, GLOBAL_BATCH = 2, 8


def moco_v3_step(views: list[Tensor], gather: bool = True) -> dict:
    """One MoCo v3 loss and backward on the given views; a key network that has drifted from the query side."""
    method = tiny_method("moco_v3", gather_distributed=gather).train()
    with torch.no_grad():
        for p in method.key_projector.parameters():
            p.add_(0.3 * torch.randn_like(p))
    if distributed.world_size() > 1:
        method = distributed.convert_sync_batchnorm(method, CPU)
    loss = method.forward_views(views)["loss"]
    loss.backward()
    grads = {}
    for name, p in method.named_parameters():
        if p.requires_grad:  # DDP's rule: each gradient becomes its mean over the ranks
            grads[name] = distributed.all_reduce_mean(p.grad) if distributed.world_size() > 1 else p.grad
    return {"loss": distributed.all_reduce_mean(loss.detach()) if distributed.world_size() > 1 else loss.detach(),
            "grads": grads}


def _worker(rank: int) -> dict:
    n = GLOBAL_BATCH // WORLD
    local = [view[rank * n:(rank + 1) * n] for view in fixed_views(GLOBAL_BATCH)]
    return {"gather": moco_v3_step(local), "no_gather": moco_v3_step(local, gather=False)}


def test_moco_v3_two_ranks_equal_one_process_loss_and_gradients(tmp_path):
    """The method-level check (the loss alone: test_distributed_losses.py): SyncBatchNorm on both networks and
    keys gathered from every rank make 2 x 4 images the single process's 8, to float32 rounding."""
    results = run_on_ranks(_worker, tmp_path, world=WORLD)
    reference = moco_v3_step(fixed_views(GLOBAL_BATCH))
    assert len(reference["grads"]) > 10
    for result in results:
        got = result["gather"]
        assert torch.allclose(got["loss"], reference["loss"], rtol=1e-4, atol=1e-5)
        for name, grad in reference["grads"].items():
            assert torch.allclose(got["grads"][name], grad, rtol=1e-4, atol=1e-5), name
    assert not torch.allclose(results[0]["no_gather"]["loss"], reference["loss"], rtol=1e-4, atol=1e-5)
