"""Relative patch position (Doersch et al., 2015): where does a patch sit relative to the centre patch?

A 3x3 grid is laid over a random square region of each image; the centre patch and its neighbours go through
the shared encoder, each (centre, neighbour) pair of features through an MLP to an 8-way classifier of the
neighbour's position. By default one neighbour per image is drawn, as the paper's sampler did;
``all_neighbours=True`` gives all 8 pairs of every image (the centre encoded once: 8 labelled examples for 9
encoder inputs), as mmselfsup's RelativeLoc does. As in the paper a gap between patches (there: half a patch)
and a random jitter of each patch keep low-level cues (continuing edges, exact alignment) from solving the
task. Patches are cut with sub-pixel precision and resized to ``patch_size`` (at least 8 px), so 8x8 digits
work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reprlab.contracts import Task
from reprlab.data.augment import random_grayscale, to_float
from reprlab.data.patches import cut_patches, default_tile_size, grid_boxes, standardize_patches
from reprlab.models.encoders import Encoder, PatchPooling
from reprlab.models.heads import pretext_head, tile_embedding

# label -> (row, column) offset of the neighbour from the centre, reading order: 0 1 2 / 3 . 4 / 5 6 7
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# label -> index of the neighbour's cell in the row-major 3x3 grid of grid_boxes
_NEIGHBOUR_CELLS = tuple((1 + dr) * 3 + (1 + dc) for dr, dc in NEIGHBOURS)
_CENTRE_CELL = 4


class RelativePosition(Task):
    """8-way classification of a neighbour patch's position relative to the centre patch.

    ``gap`` / ``jitter``: fractions of a grid cell (the paper: 96 px patches, 48 px gaps -> gap 1/3; jitter up
    to 7 px -> 0.05). ``patch_size``: side each patch is resized to (default: its own size, at least 8).
    ``region_scale``: side of the random square region holding the grid, as a fraction of the image side.
    ``patch_dim``: width of the per-patch layer between the encoder and the pairing (the paper's fc6), None for
    none. ``hidden_dim``: the head's hidden width after the pairing (the paper's fc7), None for a linear head.
    ``all_neighbours``: all 8 (centre, neighbour) pairs of every image, else one drawn uniformly (default).
    ``grayscale_p`` / ``normalize_patches``: grayscale images and per-patch standardization, the jigsaw task's
    shortcut guards (the paper fought chromatic aberration by dropping colour channels). ``pool_patches``: the
    encoder embeds a whole image as the mean of its features over a 3x3 grid of patches resized and normalized
    as in training (:class:`PatchPooling`); False: the whole image at once.
    """

    def __init__(self, encoder: Encoder, gap: float = 1 / 3, jitter: float = 0.05,
                 patch_size: int | None = None, region_scale: tuple[float, float] = (0.85, 1.0),
                 patch_dim: int | None = None, hidden_dim: int | None = 512, all_neighbours: bool = False,
                 grayscale_p: float = 0.0, normalize_patches: bool = False, pool_patches: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.gap, self.jitter, self.patch_size = gap, jitter, patch_size
        self.region_scale = tuple(region_scale)
        self.all_neighbours = all_neighbours
        self.grayscale_p, self.normalize_patches = grayscale_p, normalize_patches
        self.register_buffer("neighbour_cells", torch.tensor(_NEIGHBOUR_CELLS), persistent=False)  # (8,)
        encoder.pool_patches(PatchPooling(3, patch_size, normalize_patches) if pool_patches else None)
        self.patch_layer = tile_embedding(encoder.feature_dim, patch_dim)
        self.head = pretext_head(2 * (patch_dim or encoder.feature_dim), len(NEIGHBOURS), hidden_dim)

    def make_patches(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 or float images (B, C, H, W) -> patches (B, 1 + K, C, s, s), the centre first, and the
        labels (B, K) of the K neighbours that follow it (K = 8 in label order, or 1 drawn uniformly)."""
        x = to_float(images)
        if self.grayscale_p > 0:
            x = random_grayscale(x, self.grayscale_p)
        batch, _, height, width = x.shape
        size = self.patch_size or default_tile_size(height, width, 3, self.gap)
        boxes = grid_boxes(batch, height, width, 3, self.gap, self.jitter, self.region_scale,
                           x.device)  # (B, 9, 4)
        if self.all_neighbours:
            labels = torch.arange(len(NEIGHBOURS), device=x.device).expand(batch, -1)  # (B, 8)
        else:
            labels = torch.randint(len(NEIGHBOURS), (batch, 1), device=x.device)  # (B, 1)
        rows = torch.arange(batch, device=x.device)[:, None]
        neighbours = boxes[rows, self.neighbour_cells[labels]]  # (B, K, 4)
        chosen = torch.cat([boxes[:, _CENTRE_CELL, None], neighbours], dim=1)  # (B, 1 + K, 4)
        patches = cut_patches(x, chosen, size)
        if self.normalize_patches:
            patches = standardize_patches(patches, self.encoder.mean, self.encoder.std)
        return patches, labels

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        patches, labels = self.make_patches(batch["images"])  # (B, 1 + K, C, s, s), (B, K)
        size, count = patches.shape[0], patches.shape[1]
        features = self.patch_layer(self.encoder.features(patches.flatten(0, 1)))  # one pass: BN sees both kinds
        features = features.view(size, count, -1)  # (B, 1 + K, D')
        centre = features[:, :1].expand(-1, count - 1, -1)  # (B, K, D')
        pair_features = torch.cat([centre, features[:, 1:]], dim=2).flatten(0, 1)  # (B * K, 2D')
        logits = self.head(pair_features)  # (B * K, 8)
        labels = labels.flatten()
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": F.cross_entropy(logits, labels), "acc": accuracy}
