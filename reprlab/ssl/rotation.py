"""Rotation prediction (RotNet, Gidaris et al., 2018): by how many quarter turns was an image rotated?

As in the paper (and mmselfsup, unlike VISSL's one random rotation per image) every image enters the batch in
all four rotations, so each batch is balanced over the four classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.data.augment import FinetuneAugment, to_float
from reprlab.models.encoders import Encoder
from reprlab.models.heads import pretext_head


def rotate_batch(images: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) square images -> (4B, C, H, W) all four rotations and (4B,) labels.

    Block k (rows k*B .. k*B + B - 1) is ``torch.rot90(images, k, dims=(2, 3))``, the images turned k * 90
    degrees counter-clockwise, with label k."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square images (a 90 degree turn must keep the shape), got "
                         f"{tuple(images.shape[-2:])}; set crop_size to crop squares")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])  # (4B, C, H, W)
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])  # (4B,)
    return rotated, labels


class Rotation(nn.Module):
    """Four-way rotation classification from the encoder's features.

    ``hidden_dim``: None for a linear head on the encoder features (the paper's classifier sits on the
    network's last block; a linear head keeps the task's signal in the features we evaluate), else an MLP with
    one hidden layer. ``crop_scale`` / ``flip_p`` / ``crop_size``: light augmentation before rotating (RotNet
    used random crops and flips); ``crop_size`` also makes non-square images square.
    """

    def __init__(self, encoder: Encoder, hidden_dim: int | None = None,
                 crop_scale: tuple[float, float] | None = None, flip_p: float = 0.5,
                 crop_size: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = pretext_head(encoder.feature_dim, 4, hidden_dim)
        needs_augment = crop_scale is not None or flip_p > 0 or crop_size is not None
        self.augment = FinetuneAugment(size=crop_size, crop_scale=tuple(crop_scale) if crop_scale else None,
                                       flip_p=flip_p) if needs_augment else None

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = to_float(batch["images"])  # (B, C, H, W) in [0, 1]
        if self.augment is not None:
            x = self.augment(x)
        rotated, labels = rotate_batch(x)  # (4B, C, H, W), (4B,)
        logits = self.head(self.encoder(rotated))  # (4B, 4)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": F.cross_entropy(logits, labels), "acc": accuracy}
