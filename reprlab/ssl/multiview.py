"""What every method that learns from augmented views of an image shares: how the views are made.

``forward(batch)`` makes the views of the uint8 batch on the device, outside autocast (elementwise ops: reduced
precision only slows them down), then calls ``forward_views(views)``, the loss of ready float views, which is
what the speed benchmarks time. A method declares its views once: one pipeline with ``views()`` (SimCLR's two
draws of one ``ViewAugment``, DINO's ``MultiCrop``) or two pipelines, one per view (BYOL's asymmetric pair).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reprlab.contracts import Task


def check_two_views(views: list[Tensor], method: str) -> None:
    """One line naming the method when ``forward_views`` gets other than two views."""
    if len(views) != 2:
        raise ValueError(f"{method} takes exactly 2 views per image, got {len(views)}")


class MultiViewTask(Task):
    """A view-based method: subclasses set ``self.augment`` (a pipeline with ``views(images)``) and implement
    ``forward_views``."""

    def views(self, images: Tensor) -> list[Tensor]:
        """Float views of a uint8 batch (B, C, H, W), drawn from the global RNG (seed it to fix them)."""
        return self.augment.views(images)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["images"]  # (B, C, H, W) uint8 on the device
        with torch.autocast(images.device.type, enabled=False):
            views = self.views(images)
        return self.forward_views(views)

    def forward_views(self, views: list[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError


class PairedViewTask(MultiViewTask):
    """Two views from two pipelines, ``self.augment`` then ``self.augment2`` (the first draws first)."""

    def views(self, images: Tensor) -> list[Tensor]:
        return [self.augment(images), self.augment2(images)]
