"""Distillation (method ``distill``): a frozen teacher that never changes, a loss that falls, a student that
gains kNN accuracy over its untrained self; teachers from run directories, encoder names and Python."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from reprlab.checkpoint import save_encoder
from reprlab.config import ConfigError
from reprlab.data.datasets import load_dataset
from reprlab.data.views import ViewAugment
from reprlab.evaluate.knn import knn_classify
from reprlab.models.encoders import create_encoder
from reprlab.ssl import build_method

PLAIN = ViewAugment(crop_scale=(0.7, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


class Pixels(nn.Module):
    """A strong kNN representation of 8x8 digits that needs no training: the centred pixels."""

    feature_dim = 64

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) - 0.3


def _student(seed: int = 0):
    torch.manual_seed(seed)
    return create_encoder("timm:resnet18", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))


def _knn(encoder, train, val) -> float:
    encoder.eval()
    with torch.no_grad():
        bank, queries = encoder(train.images.float() / 255), encoder(val.images.float() / 255)
    return knn_classify(bank, train.labels, queries, k=20, temperature=0.07).topk(val.labels, 1)


def _steps(method, images: torch.Tensor, steps: int, lr: float = 3e-3, batch: int = 64) -> list[float]:
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr)
    generator = torch.Generator().manual_seed(0)
    losses = []
    method.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch,), generator=generator)
        out = method({"images": images[index], "index": index})
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].detach().item())
    return losses


def test_the_student_learns_the_teacher_and_gains_knn():
    data = load_dataset("digits", val_fraction=0.2, seed=0)
    student = _student()
    before = _knn(student, data.train, data.val)
    method = build_method("distill", student, {"teacher": Pixels(), "augment": PLAIN})
    losses = _steps(method, data.train.images, steps=40)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]  # 1 - cos: from about 1 down
    after = _knn(student, data.train, data.val)
    assert after > before + 0.15, (before, after)


def test_the_teacher_is_frozen_outside_the_module_tree_and_never_changes(tmp_path):
    teacher = create_encoder("timm:test_resnet")
    save_encoder(tmp_path / "teacher", teacher, {"method": "simclr"})
    method = build_method("distill", _student(), {"teacher": str(tmp_path / "teacher"), "augment": PLAIN})
    loaded = method.teacher
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))
    before = {k: v.clone() for k, v in loaded.state_dict().items()}  # BatchNorm statistics included
    method.train()
    assert not loaded.training and method.encoder.training  # train() leaves the teacher in eval mode
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = {id(p) for p in loaded.parameters()}
    assert not ids & {id(p) for p in method.parameters()}  # no optimizer can reach it
    assert not any(k.startswith(("teacher", "_teacher")) for k in method.state_dict())  # not in state.pt
    _steps(method, torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8), steps=3, batch=16)
    assert all(torch.equal(before[k], v) for k, v in loaded.state_dict().items())
    method.double()  # .to() and friends move the teacher with the task
    assert next(loaded.parameters()).dtype == torch.float64


def test_teachers_from_encoder_names_see_their_own_resolution(tmp_path):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=1,
                            embed_dim=16, num_heads=2)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "vit.safetensors")
    params = {"teacher": "timm:vit_tiny_patch16_224", "teacher_weights": str(tmp_path / "vit.safetensors"),
              "teacher_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2},
              "augment": PLAIN, "loss": "mse", "mixup": True, "projection_layers": 2, "hidden_dim": 8}
    method = build_method("distill", _student(), params)
    assert method.teacher_size == 32 and method.teacher.feature_dim == 16
    seen = []
    method.teacher.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    out = method({"images": torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)})
    assert seen == [(4, 1, 32, 32)] and torch.isfinite(out["loss"]) and "cos" in out  # 8 px views, resized


def test_teacher_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="is not a run directory .no meta.json.*hf:facebook/dinov2-small"):
        build_method("distill", _student(), {"teacher": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"loss='l2'; choose from \['cosine', 'mse'\]"):
        build_method("distill", _student(), {"teacher": Pixels(), "loss": "l2"})
    random = build_method("distill", _student(), {"teacher": "timm:test_resnet", "teacher_pretrained": False})
    again = build_method("distill", _student(), {"teacher": "timm:test_resnet", "teacher_pretrained": False})
    # a random teacher is seeded: every rank and every resume rebuild the same one
    assert all(torch.equal(a, b) for a, b in zip(random.teacher.state_dict().values(),
                                                 again.teacher.state_dict().values()))


def test_the_pretrain_stage_saves_the_student_only(tmp_path):
    from pathlib import Path

    from reprlab import checkpoint
    from reprlab.checkpoint import load_encoder
    from reprlab.config import PretrainConfig, load_config
    from reprlab.stages.pretrain import pretrain

    save_encoder(tmp_path / "teacher", create_encoder("timm:test_resnet"), {"method": "simclr"})
    config = Path(__file__).resolve().parents[1] / "configs/pretrain/distill_digits.yaml"
    cfg = load_config(PretrainConfig, config, [
        f"out_dir={tmp_path}", "name=run", f"method.params.teacher={tmp_path / 'teacher'}",
        "encoder.name=timm:test_resnet", "encoder.kwargs={}", "data.limit=64", "train.batch_size=16",
        "train.epochs=1", "train.device=cpu", "train.progress=false", "monitor.every_epochs=1"])
    run = pretrain(cfg)
    model = checkpoint.load_state(run / "state.pt")["model"]
    assert {k.split(".")[0] for k in model} == {"encoder", "projector"}  # no teacher in the resume state
    student = load_encoder(run)  # the saved encoder is the student, rebuilt from its own spec
    assert student.spec["name"] == "timm:test_resnet"
    assert all(torch.equal(v, model[f"encoder.{k}"]) for k, v in student.state_dict().items())
