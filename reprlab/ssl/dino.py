"""DINO (Caron et al., 2021): a student matches the centred, sharpened output of an EMA teacher across crops.

Multi-crop views (:class:`~reprlab.data.views.MultiCrop`: 2 global crops, then local crops at their own size);
the teacher sees the global crops only, the student every crop, and :func:`~reprlab.ssl.losses.dino_loss`
compares each student crop with each teacher crop of another view. Student and teacher are an encoder plus
:class:`DINOHead`. The teacher is a momentum copy of the student that no optimizer touches; after every step
:meth:`DINO.after_step` moves it at the cosine momentum 0.996 -> 1 of the global step. Its outputs are centred by
an EMA of their batch mean over all ranks (the ``center`` buffer) and sharpened by a temperature that warms up
from 0.04 to 0.07.

Steps, not epochs: the loop tells the method the global step and the run's total, so the paper's epoch-based
warm-ups are given as shares of the run and evaluated per step (a ramp, where the reference steps once per
epoch). ``teacher_temperature_warmup`` 0.3 is the paper's 30 of 100 epochs, ``freeze_last_layer`` 0.01 its first
epoch of 100; for the first epoch of a 200-epoch run write 0.005.

The saved network is the teacher: ``encoder.safetensors`` holds the teacher's encoder, the network the paper
evaluates (its kNN and linear results load ``--checkpoint_key teacher``), and ``meta.json`` says
``saved_network: teacher`` (:meth:`DINO.saved_encoder`). The encoder the stage built trains as the student (the
network gradients reach, and the one the per-epoch monitor measures). The student, both heads and the centre stay
in ``state.pt``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from reprlab.data.views import MultiCrop
from reprlab.models.encoders import Encoder
from reprlab.ssl.losses import dino_loss, dino_teacher_temperature, update_center
from reprlab.ssl.momentum import cosine_momentum, momentum_copy, update_momentum
from reprlab.ssl.multiview import MultiViewTask

DINO_CROPS = MultiCrop()  # DINO's ImageNet multi-crop: 2 global crops, 8 local crops of 96 px


class DINOHead(nn.Module):
    """DINO's head: an MLP of ``num_layers`` Linear layers (GELU between, BatchNorm with ``batch_norm``) to a
    ``bottleneck_dim`` embedding, L2-normalized, then a bias-free weight-normalized Linear to ``out_dim`` logits.

    The MLP's weights start from a normal with std 0.02 and zero biases, as the reference's. The last layer is
    ``weight = g * v / |v|`` per output row (``torch.nn.utils.parametrizations.weight_norm``, g starting at 1);
    ``norm_last_layer`` keeps g at 1, untrained (the reference's default, which it finds more stable).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, batch_norm: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # g, (out_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, features: Tensor, freeze_last_layer: bool = False) -> Tensor:
        """(B, in_dim) -> (B, out_dim) logits. ``freeze_last_layer``: the last layer's parameters get a zero
        gradient (a zero, not none: DDP expects a gradient for every trainable parameter in every step)."""
        x = F.normalize(self.mlp(features), dim=-1)  # (B, bottleneck_dim)
        weight = self.last_layer.weight  # (out_dim, bottleneck_dim), rows of norm g
        if freeze_last_layer:
            weight = weight.detach() + 0.0 * weight  # the same values, a zero gradient
        return F.linear(x, weight)


class DINO(MultiViewTask):
    """Self-distillation with no labels. Defaults are the paper's ViT-S/16 recipe: head ``out_dim`` 65536,
    ``hidden_dim`` 2048, ``bottleneck_dim`` 256, 3 layers, no BatchNorm, ``norm_last_layer``; the last layer
    frozen for ``freeze_last_layer`` (a share of the run's steps; 0.01 = the first of 100 epochs); student
    temperature 0.1; teacher temperature ``teacher_temperature_start`` 0.04 -> ``teacher_temperature`` 0.07,
    linear over the first ``teacher_temperature_warmup`` (share, 0.3 = 30 of 100 epochs), then constant; centre
    momentum 0.9; teacher momentum ``base_momentum`` 0.996 -> ``final_momentum`` 1 on the cosine schedule of the
    global step (the reference's value at the step's 0-based index, as BYOL here). The paper also clips gradients
    at 3.0 (``train.grad_clip: 3.0``; the reference clips each parameter's norm, the loop the global norm).

    ``augment``: the crops (:class:`~reprlab.data.views.MultiCrop`; None = DINO's above; in YAML a mapping, keys
    left out keep DINO's). A timm ViT must take every crop size: ``encoder.kwargs.dynamic_img_size: true``.

    The teacher's encoder and head are registered submodules (in ``state_dict`` and the checkpoint) whose
    parameters never require a gradient (in no optimizer group), copied from the student's encoder and head at
    construction, so both sides have the same layers; under DDP the loop converts the whole task to
    SyncBatchNorm, teacher included, so they keep the same layer types and the teacher normalizes over the global
    batch, as the reference converts both. The teacher runs in train mode (BatchNorm with its own batch
    statistics), as the reference's. The centre is updated in ``forward`` after the loss (training mode only),
    with the teacher outputs of every rank, as the reference does. The step count that drives the schedules is
    module extra state, so a resume restores it.

    Freezing the last layer zeroes its gradient in the forward pass and, after the optimizer step, puts back the
    values it had before (weight decay still moves a parameter with a zero gradient); the reference sets the
    gradient to None instead, which also keeps the optimizer's step count for it from advancing.

    ``forward(batch)`` makes the crops of the uint8 batch and returns ``forward_views(views)``: ``loss`` and the
    ``teacher_temperature`` used.
    """

    def __init__(self, encoder: Encoder, augment: MultiCrop | None = DINO_CROPS, out_dim: int = 65536,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3, batch_norm: bool = False,
                 norm_last_layer: bool = True, freeze_last_layer: float = 0.01, student_temperature: float = 0.1,
                 teacher_temperature: float = 0.07, teacher_temperature_start: float = 0.04,
                 teacher_temperature_warmup: float = 0.3, center_momentum: float = 0.9,
                 base_momentum: float = 0.996, final_momentum: float = 1.0) -> None:
        super().__init__()
        _check_share(freeze_last_layer, "freeze_last_layer", "[0, 1)", "the first of 100 epochs is 0.01")
        _check_share(teacher_temperature_warmup, "teacher_temperature_warmup", "[0, 1]", "30 of 100 epochs is 0.3")
        for value, name in ((student_temperature, "student_temperature"), (teacher_temperature, "teacher_temperature"),
                            (teacher_temperature_start, "teacher_temperature_start")):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for value, name in ((center_momentum, "center_momentum"), (base_momentum, "base_momentum"),
                            (final_momentum, "final_momentum")):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.encoder = encoder
        self.augment = augment if augment is not None else DINO_CROPS
        _check_crop_sizes(encoder, self.augment)
        self.head = DINOHead(encoder.feature_dim, out_dim, hidden_dim, bottleneck_dim, num_layers, batch_norm,
                             norm_last_layer)
        self.teacher_encoder = momentum_copy(encoder)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.freeze_last_layer, self.student_temperature = freeze_last_layer, student_temperature
        self.teacher_temperature, self.teacher_temperature_start = teacher_temperature, teacher_temperature_start
        self.teacher_temperature_warmup, self.center_momentum = teacher_temperature_warmup, center_momentum
        self.base_momentum, self.final_momentum = base_momentum, final_momentum
        # optimizer steps done and the run's total, as the loop last reported them (Python ints: no host sync)
        self.steps_done, self.total_steps = 0, 0
        self._frozen_values: list[Tensor] | None = None

    # ------------------------------------------------------------------------------------------- schedules

    def _share_in_steps(self, share: float) -> int:
        """Steps in ``share`` of the run, at least 1 for a share > 0 (so step 0 is always inside it, even before
        the loop has reported the total)."""
        return 0 if share == 0 else max(1, round(share * self.total_steps))

    def teacher_temperature_at(self, step: int) -> float:
        """The teacher temperature of the step with 0-based index ``step``: the reference's linspace warm-up
        (:func:`~reprlab.ssl.losses.dino_teacher_temperature`) over steps instead of epochs."""
        return dino_teacher_temperature(step, self._share_in_steps(self.teacher_temperature_warmup),
                                        self.teacher_temperature_start, self.teacher_temperature)

    def last_layer_frozen_at(self, step: int) -> bool:
        """Whether the step with 0-based index ``step`` leaves the head's last layer as it is."""
        return step < self._share_in_steps(self.freeze_last_layer)

    def get_extra_state(self) -> dict[str, int]:
        return {"steps_done": self.steps_done, "total_steps": self.total_steps}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.steps_done, self.total_steps = int(state["steps_done"]), int(state["total_steps"])

    # --------------------------------------------------------------------------------------------- forward

    def forward_views(self, views: list[Tensor]) -> dict[str, Tensor]:
        """DINO's loss over already-augmented float crops, each (B, C, h, w): the 2 global crops first."""
        if len(views) < 2:
            raise ValueError(f"DINO takes the 2 global crops first, then any local crops; got {len(views)} view(s)")
        frozen = self.training and self.last_layer_frozen_at(self.steps_done)
        if frozen:  # after_step puts these back once the optimizer has stepped
            self._frozen_values = [p.detach().clone() for p in self.head.last_layer.parameters()]
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_encoder(torch.cat(views[:2]))).chunk(2)  # 2 x (B, K)
        student = self._student(views, frozen)  # one (B, K) per crop
        temperature = self.teacher_temperature_at(self.steps_done)
        loss = dino_loss(student, teacher, self.center, temperature, self.student_temperature)
        if self.training:
            update_center(self.center, teacher, self.center_momentum)  # after the loss, as the reference does
        return {"loss": loss, "teacher_temperature": torch.full((), temperature, device=loss.device)}

    def _student(self, views: list[Tensor], freeze_last_layer: bool) -> tuple[Tensor, ...]:
        """The student's logits for every crop; consecutive crops of one size share an encoder pass (BatchNorm
        sees them together, as in the reference's MultiCropWrapper), the head takes all crops at once."""
        features, start = [], 0
        for end in range(1, len(views) + 1):
            if end == len(views) or views[end].shape[-2:] != views[start].shape[-2:]:
                features.append(self.encoder(torch.cat(views[start:end])))  # (crops * B, D)
                start = end
        return self.head(torch.cat(features), freeze_last_layer).chunk(len(views))

    # ------------------------------------------------------------------------------------- per-step hook

    def momentum_at(self, step: int, total_steps: int) -> float:
        """The teacher momentum of the update after global step ``step`` (1-based): the cosine schedule at the
        step's 0-based index, so the first update uses ``base_momentum``."""
        return cosine_momentum(step - 1, total_steps, self.base_momentum, self.final_momentum)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Undo the optimizer's move of a frozen last layer, then teacher = m * teacher + (1 - m) * student for the
        encoder and the head (parameters; the teacher's BatchNorm statistics stay its own)."""
        if self._frozen_values is not None:
            for parameter, value in zip(self.head.last_layer.parameters(), self._frozen_values):
                parameter.copy_(value)
            self._frozen_values = None
        momentum = self.momentum_at(step, total_steps)
        update_momentum(self.encoder, self.teacher_encoder, momentum)
        update_momentum(self.head, self.teacher_head, momentum)
        self.steps_done, self.total_steps = step, total_steps

    saved_network = "teacher"

    def saved_encoder(self) -> Encoder:
        """The teacher's encoder: the network the paper evaluates, saved as the run's encoder."""
        return self.teacher_encoder


def _check_share(value: float, name: str, interval: str, example: str) -> None:
    if not (0.0 <= value < 1.0 or (interval == "[0, 1]" and value == 1.0)):
        raise ValueError(f"{name} is a share of the run's steps in {interval} ({example}), got {value}")


def _check_crop_sizes(encoder: Encoder, crops: MultiCrop) -> None:
    """A timm ViT built for one input size refuses crops of another: say so before training starts."""
    patch_embed = getattr(encoder.backbone, "patch_embed", None)
    if patch_embed is None or not getattr(patch_embed, "strict_img_size", False):
        return
    expected = tuple(patch_embed.img_size)
    sizes = [view.size for view in (crops.global1, crops.global2) if view.size is not None]
    sizes += [crops.local.size] if crops.num_local and crops.local.size is not None else []
    wrong = sorted({size for size in sizes if (size, size) != expected})
    if wrong:
        raise ValueError(f"DINO's crops of {wrong} px do not fit this ViT, built for {expected[0]} px only; set "
                         f"encoder.kwargs.dynamic_img_size: true so it takes every crop size")
