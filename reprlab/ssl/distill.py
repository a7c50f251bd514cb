"""Distillation from a frozen teacher: a student encoder learns to reproduce a teacher's image embeddings on
unlabeled images (knowledge distillation of representations, Hinton et al., 2015; for self-supervised
teachers, CompRess, Abbasi Koohpayegani et al., 2020).

The recipe is LightlyTrain's DistillationV2 (lightly-ai/lightly-train, ``_methods/distillationv2``), its 2026
default pretraining: one augmented view per image, seen by both networks; the student's features go through a
projection (a Linear by default) to the teacher's dimension and regress the teacher's embedding of the same
view, optionally on mixup-blended views (``mixup``: lambda ~ U(0, 1), as LightlyTrain). Two differences: we
match the pooled embedding (LightlyTrain matches the teacher's patch-token map, which needs a ViT teacher), and
the default loss is the cosine distance ``1 - cos`` (scale-free: foundation embeddings have large, uneven norms);
``loss: mse`` is LightlyTrain's plain MSE on unnormalized features. CompRess instead matches similarity
distributions over a memory bank; the direct regression is simpler and is what LightlyTrain ships.

The teacher is ``teacher``: a reprlab run directory (its ``meta.json`` + ``encoder.safetensors``) or any
``create_encoder`` name (``timm:vit_small_patch14_dinov2.lvd142m``, ``hf:facebook/dinov2-small``, ...) loaded
with ``teacher_pretrained`` / ``teacher_weights`` / ``teacher_kwargs`` (``teacher_pretrained: false`` without
weights: a random target network from a fixed seed, a baseline; BYOL, Grill et al. 2020, §3.1, reports that
even a random target teaches something). It
sees the view at its own resolution (``teacher_size``; default: what the teacher needs, see
:func:`teacher_resolution`), resized bilinearly.

Frozen means frozen: no gradients (requires_grad False), eval mode always (``train()`` is overridden), never in
the optimizer or in DDP. It is held outside the module tree, so neither ``state.pt`` nor the saved encoder
carries it (a foundation teacher would dwarf the student); ``.to()`` moves it with the task, and a resumed run
rebuilds it from ``teacher``, which is deterministic because its weights come from a file. Teacher embeddings
are computed online (no per-image cache: augmented views differ every epoch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.config import ConfigError
from reprlab.contracts import Task
from reprlab.data.views import ViewAugment
from reprlab.models.encoders import Encoder, create_encoder
from reprlab.models.heads import projection_head
from reprlab.ssl.losses import negative_cosine_loss

LOSSES = ("cosine", "mse")
RANDOM_TEACHER_SEED = 0  # teacher_pretrained=false: a random teacher, rebuilt identically on resume and per rank


def load_teacher(teacher: str, pretrained: bool = True, weights: str | None = None,
                 kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, bool]:
    """(frozen teacher in eval mode, whether it came with library weights) from a run directory or an encoder
    name (without weights: random, from a fixed seed)."""
    from reprlab.checkpoint import load_encoder

    path = Path(teacher)
    if (path / "meta.json").is_file():
        model, from_library = load_encoder(path), False
    elif not teacher.startswith(("timm:", "hf:")) and ("/" in teacher or path.exists()):
        raise ConfigError(f"method.params.teacher={teacher!r} is not a run directory (no meta.json); give the "
                          f"folder of a finished scripts/pretrain.py run or an encoder name such as "
                          f"hf:facebook/dinov2-small")
    elif not pretrained and not weights:  # a random target network (a baseline), the same on every rank and resume
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TEACHER_SEED)
            model, from_library = create_encoder(teacher, **(kwargs or {})), False
    else:
        model, from_library = create_encoder(teacher, pretrained=pretrained, weights=weights, **(kwargs or {})), True
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), from_library


def teacher_resolution(teacher: nn.Module, from_library: bool) -> int | None:
    """The side the teacher's input is resized to: None when it resizes itself (HF ViTs) or takes any size;
    a timm ViT's fixed ``img_size``; for library weights of a convnet, the resolution they were trained at
    (timm's ``pretrained_cfg``, 224 for torchvision's ImageNet weights)."""
    if getattr(teacher, "input_size", None):
        return None
    backbone = getattr(teacher, "backbone", teacher)
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) and not getattr(
            patch_embed, "dynamic_img_size", False):
        size = patch_embed.img_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    if not from_library:
        return None
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return int(cfg["input_size"][-1]) if "input_size" in cfg else 224


class Distill(Task):
    """Match a frozen teacher's embeddings (module docstring). ``projection_layers`` 1: a Linear to the
    teacher's dimension (LightlyTrain); more: an MLP with ``hidden_dim`` (default the teacher's dimension)."""

    def __init__(self, encoder: Encoder, teacher: str | nn.Module = "hf:facebook/dinov2-small",
                 teacher_pretrained: bool = True,
                 teacher_weights: str | None = None, teacher_kwargs: dict | None = None,
                 teacher_size: int | None = None, loss: str = "cosine", projection_layers: int = 1,
                 hidden_dim: int | None = None, mixup: bool = False, augment: ViewAugment | None = None) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"method.params.loss={loss!r}; choose from {list(LOSSES)}")
        if isinstance(teacher, nn.Module):  # from Python: any frozen network with a feature_dim
            model, from_library = teacher.eval().requires_grad_(False), False
        else:
            model, from_library = load_teacher(teacher, teacher_pretrained, teacher_weights, teacher_kwargs)
        object.__setattr__(self, "_teacher", model)  # outside the module tree: not in state.pt, DDP, optimizer
        self.teacher_size = teacher_size if teacher_size is not None else teacher_resolution(model, from_library)
        self.encoder = encoder
        self.augment = augment if augment is not None else ViewAugment()
        teacher_dim = model.feature_dim
        self.projector = projection_head(encoder.feature_dim, hidden_dim or teacher_dim, teacher_dim,
                                         num_layers=projection_layers, output_bn=False)
        self.loss, self.mixup = loss, mixup

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self._teacher.eval()  # always: its BatchNorm statistics and dropout never move
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> Distill:  # .to(), .cuda(), .float(): the teacher follows
        super()._apply(fn, recurse)
        self._teacher._apply(fn)
        return self

    @torch.no_grad()
    def teacher_embeddings(self, views: Tensor) -> Tensor:
        """(B, C, H, W) float views in [0, 1] -> (B, teacher dim), at the teacher's resolution."""
        size = self.teacher_size
        if size is not None and tuple(views.shape[-2:]) != (size, size):
            views = F.interpolate(views, size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=size < min(views.shape[-2:]))
        return self._teacher(views).float()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["images"]  # (B, C, H, W) uint8 on the device
        with torch.autocast(images.device.type, enabled=False):
            view = self.augment.views(images, n=1)[0]  # (B, C, H, W) float
            if self.mixup:  # LightlyTrain: one lambda per batch, images blended with a shuffled copy
                lam = torch.rand((), device=view.device)
                view = lam * view + (1 - lam) * view[torch.randperm(view.shape[0], device=view.device)]
        target = self.teacher_embeddings(view)  # (B, Dt)
        predicted = self.projector(self.encoder(view)).float()  # (B, Dt)
        cos = F.cosine_similarity(predicted, target, dim=1).mean().detach()
        if self.loss == "cosine":
            loss = 1 + negative_cosine_loss(predicted, target)  # 1 - cos, in [0, 2]
        else:
            loss = F.mse_loss(predicted, target)
        return {"loss": loss, "cos": cos}
