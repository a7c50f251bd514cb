"""Rotation prediction (RotNet, Gidaris et al., 2018): by how many quarter turns was an image rotated?

As in the paper (and mmselfsup, unlike VISSL's one random rotation per image) every image enters the batch in
all four rotations, so each batch is balanced over the four classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reprlab.contracts import Task
from reprlab.data.augment import to_float
from reprlab.data.views import FinetuneAugment
from reprlab.models.encoders import Encoder
from reprlab.models.heads import pretext_head


def rotate_batch(images: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) square images -> (4B, C, H, W) all four rotations and (4B,) labels.

    Block k (rows k*B .. k*B + B - 1) is ``torch.rot90(images, k, dims=(2, 3))``, the images turned k * 90
    degrees counter-clockwise, with label k."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square images (a 90 degree turn must keep the shape), got "
                         f"{tuple(images.shape[-2:])}; set augment.size to crop squares")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])  # (4B, C, H, W)
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])  # (4B,)
    return rotated, labels


# RotNet's light default: flips, no crop (a module constant: a frozen value, safe as a default argument)
FLIP_ONLY = FinetuneAugment(crop_scale=None)


class Rotation(Task):
    """Four-way rotation classification from the encoder's features.

    ``hidden_dim``: None for a linear head on the encoder features (the paper's classifier sits on the
    network's last block; a linear head keeps the task's signal in the features we evaluate), else an MLP with
    one hidden layer. ``augment``: light augmentation before rotating (RotNet used random crops and flips; the
    default flips only, None turns it off; in YAML a mapping of FinetuneAugment's fields, e.g.
    ``{crop_scale: [0.6, 1.0], flip_p: 0.5}``); its ``size`` also makes non-square images square.

    ``forward(batch)`` augments the uint8 batch and returns ``forward_views([images])``; call
    ``forward_views`` directly on one ready-made float view.
    """

    def __init__(self, encoder: Encoder, augment: FinetuneAugment | None = FLIP_ONLY,
                 hidden_dim: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = pretext_head(encoder.feature_dim, 4, hidden_dim)
        self.augment = augment

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = to_float(batch["images"])  # (B, C, H, W) in [0, 1]
        if self.augment is not None:
            x = self.augment(x)
        return self.forward_views([x])

    def forward_views(self, views: list[Tensor]) -> dict[str, Tensor]:
        """Loss and accuracy on one already-augmented float view (B, C, H, W), in all four rotations."""
        if len(views) != 1:
            raise ValueError(f"rotation takes one view per image, got {len(views)}")
        rotated, labels = rotate_batch(views[0])  # (4B, C, H, W), (4B,)
        logits = self.head(self.encoder(rotated))  # (4B, 4)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": F.cross_entropy(logits, labels), "acc": accuracy}
