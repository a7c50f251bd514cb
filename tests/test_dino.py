"""DINO (reprlab.ssl.dino) and its crops (reprlab.data.views.MultiCrop): multi-crop shapes and per-image draws, the
head, a teacher no optimizer touches, the centre and the teacher-temperature warm-up through fit, the last layer
frozen for the first share of the run, kill-and-resume bit for bit (teacher, centre and step count included), and
the saved encoder being the teacher's."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor

from reprlab import checkpoint, distributed
from reprlab.checkpoint import load_encoder
from reprlab.config import PretrainConfig, load_config
from reprlab.contracts import Callback
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches
from reprlab.data.views import MultiCrop, ViewAugment
from reprlab.engine import FitOptions, fit
from reprlab.models.encoders import create_encoder
from reprlab.optim import param_groups
from reprlab.ssl import build_method
from reprlab.ssl.dino import DINO, DINOHead
from reprlab.ssl.losses import dino_loss, dino_teacher_temperature

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SMALL = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8,
         "augment": {"num_local": 2, "local": {"size": 8}}}  # 2 global crops of 16 px, 2 local crops of 8 px
# colour off, flips off: only the crop box differs between views
CROPS_ONLY = ViewAugment(crop_scale=(0.3, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def tiny_dino(seed: int = 0, **params) -> DINO:
    torch.manual_seed(seed)
    return build_method("dino", create_encoder("timm:test_resnet"), {**SMALL, **params})


def tiny_images(n: int = 8, size: int = 16, seed: int = 0) -> Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def tiny_data(n: int = 40) -> ImageSet:
    return ImageSet(tiny_images(n), torch.arange(n) % 4, list("abcd"))


def state(module: torch.nn.Module) -> dict:
    return {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in module.state_dict().items()}


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], Tensor) else a[k] == b[k]
                                        for k in a)


def teacher_outputs(method: DINO, views: list[Tensor]) -> tuple[Tensor, ...]:
    with torch.no_grad():
        return method.teacher_head(method.teacher_encoder(torch.cat(views[:2]))).chunk(2)


# --------------------------------------------------------------------------------------------- multi-crop


def test_multicrop_gives_two_global_then_local_crops_each_at_its_size():
    crops = MultiCrop(global1=ViewAugment(size=16), global2=ViewAugment(), local=ViewAugment(size=8), num_local=3)
    views = crops.views(torch.randint(0, 256, (5, 3, 24, 20), dtype=torch.uint8))
    assert [tuple(v.shape) for v in views] == [(5, 3, 16, 16), (5, 3, 24, 20)] + [(5, 3, 8, 8)] * 3
    assert all(v.dtype == torch.float32 and 0 <= v.min() and v.max() <= 1 for v in views)
    grey = MultiCrop(local=ViewAugment(size=4), num_local=1).views(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    assert [tuple(v.shape) for v in grey] == [(2, 1, 8, 8), (2, 1, 8, 8), (2, 1, 4, 4)]
    assert len(MultiCrop(num_local=0).views(torch.zeros(2, 3, 8, 8))) == 2
    with pytest.raises(ValueError, match="num_local must be >= 0"):
        MultiCrop(num_local=-1)


def test_multicrop_defaults_are_dinos_imagenet_recipe():
    crops = MultiCrop()
    assert crops.num_local == 8 and crops.local.size == 96 and crops.global1.size is crops.global2.size is None
    assert crops.global1.crop_scale == crops.global2.crop_scale == (0.4, 1.0) and crops.local.crop_scale == (0.05, 0.4)
    assert (crops.global1.blur_p, crops.global2.blur_p, crops.local.blur_p) == (1.0, 0.1, 0.5)
    assert (crops.global1.solarize_p, crops.global2.solarize_p, crops.local.solarize_p) == (0.0, 0.2, 0.0)
    assert {v.jitter_strength for v in (crops.global1, crops.global2, crops.local)} == {0.5}


def test_every_image_draws_its_own_crop_in_every_view():
    """One image repeated 12 times: each copy's crop differs from every other copy's in the same view (the box is
    drawn per image, not per batch), and the local crops of one image differ from each other."""
    ramp = torch.linspace(0, 255, 32)
    image = torch.stack([ramp.expand(32, 32), ramp[:, None].expand(32, 32), (ramp[:, None] + ramp) / 2]).to(torch.uint8)
    batch = image.expand(12, 3, 32, 32).contiguous()
    crops = MultiCrop(global1=CROPS_ONLY, global2=CROPS_ONLY, local=ViewAugment(size=8, flip_p=0.0, jitter_p=0.0,
                                                                                grayscale_p=0.0), num_local=4)
    views = crops.views(batch, torch.Generator().manual_seed(0))
    for view in views:
        flat = view.flatten(1)
        distinct = torch.cdist(flat, flat) > 1e-4  # (12, 12)
        assert distinct.sum() == 12 * 11, "two images got the same crop in one view"
    locals_of_first = torch.stack([v[0].flatten() for v in views[2:]])
    assert (torch.cdist(locals_of_first, locals_of_first) > 1e-4).sum() == 4 * 3
    again = crops.views(batch, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(views, again))  # a seed fixes every crop


def test_forward_is_crops_then_forward_views():
    method = tiny_dino().train()
    images = tiny_images()
    torch.manual_seed(3)
    out = method({"images": images})
    method.center.zero_()  # forward moved the centre; start forward_views from the same one
    torch.manual_seed(3)
    again = method.forward_views(method.augment.views(images))
    assert torch.equal(out["loss"], again["loss"])
    with pytest.raises(ValueError, match="2 global crops first"):
        method.forward_views(method.augment.views(images)[:1])


# --------------------------------------------------------------------------------------------- the head


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_is_an_mlp_then_a_weight_normalized_last_layer(norm_last_layer):
    torch.manual_seed(0)
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8, num_layers=3, norm_last_layer=norm_last_layer)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(20))  # rows of norm g = 1
    weight = head.last_layer.parametrizations.weight
    magnitude, direction = weight.original0, weight.original1  # g (20, 1), v (20, 8)
    assert magnitude.requires_grad is not norm_last_layer and direction.requires_grad
    x = torch.randn(5, 12)
    assert head(x).shape == (5, 20)
    head(x, freeze_last_layer=True).square().sum().backward()
    assert direction.grad is not None and not direction.grad.any()  # frozen: a zero gradient, not none
    assert head.mlp[0].weight.grad.abs().sum() > 0
    copied = copy.deepcopy(head)  # the teacher is a deep copy
    assert torch.equal(copied(x), head(x))
    with_bn = DINOHead(12, 20, 16, 8, num_layers=2, batch_norm=True)
    assert [type(m).__name__ for m in with_bn.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear"]


# --------------------------------------------------------------------------------------------- the teacher


def test_teacher_gets_no_gradient_and_is_in_no_optimizer_group():
    method = tiny_dino().train()
    teacher = list(method.teacher_encoder.parameters()) + list(method.teacher_head.parameters())
    assert teacher and not any(p.requires_grad for p in teacher)
    in_groups = {id(p) for group in param_groups(method, 1e-4) for p in group["params"]}
    assert not in_groups & {id(p) for p in teacher}
    assert {id(p) for p in method.encoder.parameters()} <= in_groups
    method({"images": tiny_images()})["loss"].backward()
    assert all(p.grad is None for p in teacher)
    assert any(k.startswith("teacher_encoder.") for k in method.state_dict())  # in the checkpoint


def test_after_step_moves_the_teacher_by_the_cosine_momentum():
    method = tiny_dino(base_momentum=0.9)
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in method.teacher_encoder.named_parameters()}
    student = dict(method.encoder.named_parameters())
    assert method.momentum_at(1, 10) == pytest.approx(0.9) and method.momentum_at(11, 10) == 1.0
    method.after_step(1, 10)
    for name, value in method.teacher_encoder.named_parameters():
        assert torch.allclose(value, 0.9 * before[name] + 0.1 * student[name], atol=1e-6), name
    assert (method.steps_done, method.total_steps) == (1, 10)


def test_sync_batchnorm_conversion_leaves_the_teacher_as_it_was():
    """The loop converts the whole task under DDP: both sides keep the same layer types, so the EMA applies, and on
    one process the converted model computes what the original does."""
    method = tiny_dino().train()
    views = method.augment.views(tiny_images(), torch.Generator().manual_seed(0))
    converted = distributed.convert_sync_batchnorm(copy.deepcopy(method), CPU)
    kinds = {type(m).__name__ for m in converted.teacher_encoder.modules()}
    assert "CPUSyncBatchNorm" in kinds and "BatchNorm2d" not in kinds
    assert torch.equal(converted.forward_views(views)["loss"], method.forward_views(views)["loss"])
    converted.after_step(1, 10)  # update_momentum checks the layers match
    assert not any(p.requires_grad for p in converted.teacher_encoder.parameters())


# --------------------------------------------------------------------------------------------- centre, temperature


def test_loss_uses_the_centre_then_forward_updates_it_in_training_only():
    method = tiny_dino(teacher_temperature_warmup=0.0).train()
    views = method.augment.views(tiny_images(), torch.Generator().manual_seed(0))
    teacher = teacher_outputs(method, views)
    with torch.no_grad():
        method.center.fill_(0.5)
    out = method.forward_views(views)
    # the student: the crops of one size through the encoder together (BatchNorm sees them together)
    features = torch.cat([method.encoder(torch.cat(views[:2])), method.encoder(torch.cat(views[2:]))])
    student = method.head(features).chunk(len(views))
    expected = dino_loss(student, teacher, torch.full((1, 32), 0.5), 0.07)
    assert torch.allclose(out["loss"], expected, rtol=1e-6)
    assert float(out["teacher_temperature"]) == pytest.approx(0.07)
    new_center = 0.9 * 0.5 + 0.1 * torch.cat(teacher).mean(dim=0, keepdim=True)
    assert torch.allclose(method.center, new_center, atol=1e-6)
    method.eval()
    method.forward_views(views)
    assert torch.allclose(method.center, new_center, atol=1e-6)  # evaluation leaves it alone


class Snapshots(Callback):
    """The head's last layer and first layer at the end of every epoch."""

    def __init__(self, method: DINO) -> None:
        self.method, self.last, self.first = method, [], []

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        self.last.append(self.method.head.last_layer.parametrizations.weight.original1.detach().clone())
        self.first.append(self.method.head.mlp[0].weight.detach().clone())
        return {}


def fit_dino(run_dir: Path | None, method: DINO, epochs: int = 2, **options) -> Snapshots:
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    snapshots = Snapshots(method)
    fit(method, Batches(tiny_data(), 8, seed=5), optimizer, None,  # 5 steps per epoch
        FitOptions(epochs=epochs, device=CPU, run_dir=run_dir, progress=False, log_every=1, **options),
        callbacks=[snapshots])
    return snapshots


def test_through_fit_temperature_warms_up_per_step_and_the_last_layer_stays_frozen_for_its_share(tmp_path):
    method = tiny_dino(teacher_temperature_warmup=0.3, freeze_last_layer=0.5)  # of 10 steps: 3 and 5
    initial_last = method.head.last_layer.parametrizations.weight.original1.detach().clone()
    initial_first = method.head.mlp[0].weight.detach().clone()
    snapshots = fit_dino(tmp_path, method)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    temperatures = [r["teacher_temperature"] for r in lines if "event" not in r]
    expected = [dino_teacher_temperature(k, 3, 0.04, 0.07) for k in range(10)]  # 0.04, 0.055, 0.07, 0.07, ...
    assert temperatures == pytest.approx(expected, abs=1e-6) and expected[:3] == pytest.approx([0.04, 0.055, 0.07])
    # epoch 1 (steps 1-5): the last layer exactly as it started, despite AdamW's weight decay; the MLP moved
    assert torch.equal(snapshots.last[0], initial_last) and not torch.equal(snapshots.first[0], initial_first)
    assert not torch.equal(snapshots.last[1], initial_last)  # epoch 2 trains it
    assert method.center.abs().sum() > 0 and (method.steps_done, method.total_steps) == (10, 10)


# --------------------------------------------------------------------------------------------- resume, saving


class CrashingDINO(DINO):
    def __init__(self, *args, crash_at: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_at, self.calls = crash_at, 0

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().forward(batch)


def crashing_dino(seed: int, crash_at: int | None = None) -> CrashingDINO:
    torch.manual_seed(seed)
    return CrashingDINO(create_encoder("timm:test_resnet"), MultiCrop(local=ViewAugment(size=8), num_local=2),
                        out_dim=32, hidden_dim=16, bottleneck_dim=8, freeze_last_layer=0.7, crash_at=crash_at)


def test_crash_mid_run_then_resume_is_bit_identical_teacher_centre_and_step_count_included(tmp_path):
    reference = crashing_dino(0)
    fit_dino(tmp_path / "a", reference)
    with pytest.raises(RuntimeError, match="simulated crash"):  # checkpoints at steps 3, 5, 6; dies in step 8
        fit_dino(tmp_path / "b", crashing_dino(0, crash_at=8), checkpoint_every_steps=3)
    resumed = crashing_dino(123)  # another init: everything must come from state.pt
    fit_dino(tmp_path / "b", resumed, checkpoint_every_steps=3)
    assert identical(state(resumed), state(reference))
    assert resumed.state_dict()["_extra_state"] == {"steps_done": 10, "total_steps": 10}
    assert not torch.equal(reference.teacher_encoder.backbone.conv1[0].weight,
                           reference.encoder.backbone.conv1[0].weight)  # the teacher is its own network


def test_the_saved_encoder_is_the_teacher(tmp_path):
    from reprlab.stages.pretrain import pretrain

    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/dino_digits.yaml", [
        f"out_dir={tmp_path}", "name=run", "encoder.name=timm:test_resnet", "encoder.kwargs={}", "data.limit=64",
        "train.batch_size=16", "train.epochs=1", "train.device=cpu", "train.progress=false",
        "monitor.every_epochs=0", "method.params.out_dim=32", "method.params.hidden_dim=16"])
    run = pretrain(cfg)
    model = checkpoint.load_state(run / "state.pt")["model"]
    saved = load_encoder(run).state_dict()
    teacher = {k.removeprefix("teacher_encoder."): v for k, v in model.items() if k.startswith("teacher_encoder.")}
    student = {k.removeprefix("encoder."): v for k, v in model.items() if k.startswith("encoder.")}
    assert saved.keys() == teacher.keys() and all(torch.equal(saved[k], teacher[k]) for k in saved)
    assert not all(torch.equal(saved[k], student[k]) for k in saved)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["saved_network"] == "teacher" and meta["method"] == "dino" and meta["config"]["name"] == "run"


# --------------------------------------------------------------------------------------------- ViTs, errors


def test_a_vit_takes_global_and_local_crops_of_two_sizes():
    torch.manual_seed(0)
    vit = create_encoder("timm:test_vit", img_size=16, patch_size=4)  # dynamic image size
    method = build_method("dino", vit, SMALL).train()
    out = method({"images": tiny_images()})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and vit.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    strict = create_encoder("timm:test_vit", img_size=16, patch_size=4, dynamic_img_size=False)
    with pytest.raises(ValueError, match=r"crops of \[8\] px .* set encoder.kwargs.dynamic_img_size: true"):
        build_method("dino", strict, SMALL)


@pytest.mark.parametrize("key, value, message", [
    ("freeze_last_layer", 1, r"freeze_last_layer is a share of the run's steps in \[0, 1\) \(the first of 100"),
    ("teacher_temperature_warmup", 30, r"teacher_temperature_warmup is a share .* in \[0, 1\]"),
    ("student_temperature", 0.0, "student_temperature must be > 0"),
    ("base_momentum", 1.5, r"base_momentum must be in \[0, 1\]"),
])
def test_errors_name_the_parameter(key, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_dino(**{key: value})


# --------------------------------------------------------------------------------------------- SIGKILL


SLOW_CLI = ("import sys, time; import reprlab.engine as engine; move = engine.move_batch; "
            "engine.move_batch = lambda *a, **k: (time.sleep(0.3), move(*a, **k))[1]; "
            "from reprlab.cli import main; sys.exit(main(sys.argv[1:]))")


def pretrain_args(out_dir: Path) -> list[str]:
    return ["pretrain", "--config", str(ROOT / "configs/pretrain/dino_digits.yaml"), "name=run",
            f"out_dir={out_dir}", "encoder.name=timm:test_resnet", "encoder.kwargs={}", "data.limit=64",
            "train.batch_size=8", "train.epochs=2", "train.device=cpu", "train.checkpoint_every_steps=3",
            "train.log_every=2", "train.progress=false", "monitor.every_epochs=0", "method.params.out_dim=32",
            "method.params.hidden_dim=16", "method.params.freeze_last_layer=0.5"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-c", "import sys; from reprlab.cli import main; sys.exit(main(sys.argv[1:]))"]
    uninterrupted = subprocess.Popen([*cli, *pretrain_args(tmp_path / "a")], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *pretrain_args(tmp_path / "b")], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_path = tmp_path / "b" / "run" / "state.pt"
    deadline = time.monotonic() + 240
    while not state_path.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(30) == -signal.SIGKILL, "the run ended before it could be killed"
    assert checkpoint.load_state(state_path)["step_in_epoch"] > 0, "the checkpoint seen is not a mid-epoch one"
    resumed = subprocess.run([*cli, *pretrain_args(tmp_path / "b")], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    output, _ = uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0, output[-3000:]
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert (a / "encoder.safetensors").read_bytes() == (b / "encoder.safetensors").read_bytes()  # the teacher
    assert identical(checkpoint.load_state(a / "state.pt")["model"], checkpoint.load_state(b / "state.pt")["model"])
