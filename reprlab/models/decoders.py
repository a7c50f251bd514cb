"""Decoders that map an encoder's (B, D) bottleneck back to images, for the autoencoder family."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class ConvDecoder(nn.Module):
    """(B, feature_dim) -> (B, channels, H, W): a linear map to a ``start_size`` grid, then upsampling stages.

    Each stage doubles the resolution with a ConvTranspose2d(4, stride 2) - BN - ReLU and halves the width
    (down to ``min_channels``); stages are added until the grid reaches the image side, and a final bilinear
    resize fixes sides that are not ``start_size * 2**k`` (224: 4 * 2**6 = 256 -> 224). Any size from 1 px.
    The output is linear (no sigmoid): targets may be per-patch normalized pixels.
    """

    def __init__(self, feature_dim: int, channels: int, image_size: int | tuple[int, int],
                 hidden_channels: int = 256, min_channels: int = 32, start_size: int = 4) -> None:
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if min(height, width) < 1 or channels < 1 or feature_dim < 1:
            raise ValueError(f"need positive feature_dim, channels and image size, got {feature_dim=}, "
                             f"{channels=}, {image_size=}")
        self.image_size = (height, width)
        self.start = min(start_size, height, width)
        num_stages = max(0, math.ceil(math.log2(max(height, width) / self.start)))
        widths = [max(min_channels, hidden_channels // 2**i) for i in range(num_stages + 1)]
        self.project = nn.Sequential(
            nn.Linear(feature_dim, widths[0] * self.start * self.start, bias=False),
            nn.BatchNorm1d(widths[0] * self.start * self.start), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            stages += [nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.stages = nn.Sequential(*stages)
        self.output = nn.Conv2d(widths[-1], channels, kernel_size=3, padding=1)

    def forward(self, features: Tensor) -> Tensor:
        x = self.project(features).view(features.shape[0], -1, self.start, self.start)  # (B, C0, s, s)
        x = self.stages(x)  # (B, C_k, s * 2**k, s * 2**k)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.output(x)  # (B, channels, H, W)
