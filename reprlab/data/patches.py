"""Patch geometry shared by the patch-based proxy tasks and by encoders that embed an image patch by patch.

``grid_boxes`` lays a grid of square tiles (with a gap and jitter) over a random region of every image,
``cut_patches`` cuts boxes out with sub-pixel precision and resizes them, ``standardize_patches`` normalizes
every patch on its own. All batched, on the images' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_TILE_SIZE = 8  # smallest side a tile is resized to (torchvision ResNets run on 8 px input)


def grid_boxes(batch: int, height: int, width: int, grid: int = 3, gap: float = 0.15, jitter: float = 0.075,
               region_scale: tuple[float, float] = (1.0, 1.0), device: torch.device | str = "cpu") -> Tensor:
    """(B, grid * grid, 4) boxes (x1, y1, x2, y2) in pixels of the tiles of a grid x grid puzzle, row-major.

    Per image, a square region of side ~ U[region_scale] * min(H, W) is placed uniformly; it is split into
    cells; each tile has side ``(1 - gap) * cell`` and sits at the cell centre moved by U[-jitter, jitter] *
    cell on each axis (``jitter <= gap / 2`` keeps tiles inside their cells).

    With ``jitter=0`` and a fixed region scale (low == high) nothing is random: the region is centred and no
    random number is drawn, so evaluation (an encoder pooling over patches) gives the same boxes on every call,
    non-square images included, and leaves the global RNG alone."""
    if not 0 <= gap < 1 or not 0 <= jitter <= gap / 2 + 1e-9:
        raise ValueError(f"need 0 <= gap < 1 and 0 <= jitter <= gap / 2, got gap={gap}, jitter={jitter}")
    if not 0 < region_scale[0] <= region_scale[1] <= 1:
        raise ValueError(f"region_scale must satisfy 0 < low <= high <= 1, got {region_scale}")
    low, high = region_scale
    if jitter == 0 and low == high:  # deterministic: centred region, tiles at the cell centres
        side = torch.full((batch, 1), low * min(height, width), device=device)  # (B, 1)
        top, left = (height - side) / 2, (width - side) / 2
        shift = torch.zeros(batch, grid * grid, 2, device=device)
    else:  # the draws, in this order, as training runs have always made them
        side = (low + (high - low) * torch.rand(batch, 1, device=device)) * min(height, width)  # (B, 1)
        top = torch.rand(batch, 1, device=device) * (height - side)  # (B, 1)
        left = torch.rand(batch, 1, device=device) * (width - side)
        unit = (2 * torch.rand(batch, grid * grid, 2, device=device) - 1)  # (B, T, 2)
        shift = unit * jitter * (side / grid)[..., None]
    cell = side / grid  # (B, 1)
    tile = (1 - gap) * cell
    index = torch.arange(grid * grid, device=device)
    rows, cols = (index // grid).float(), (index % grid).float()  # (T,)
    y1 = top + rows * cell + (cell - tile) / 2 + shift[..., 0]  # (B, T)
    x1 = left + cols * cell + (cell - tile) / 2 + shift[..., 1]
    return torch.stack([x1, y1, x1 + tile, y1 + tile], dim=-1)  # (B, T, 4)


def cut_patches(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Cut boxes (B, T, 4) = (x1, y1, x2, y2) from float images (B, C, H, W), each resized to size x size.

    ``roi_align`` (aligned, adaptive sampling): bilinear sampling at the output pixel centres, averaged over
    several samples per output pixel when a patch is shrunk; a box on whole pixels at its own size is an exact
    copy. Returns (B, T, C, size, size)."""
    from torchvision.ops import roi_align

    batch, tiles = boxes.shape[:2]
    owner = torch.arange(batch, device=boxes.device, dtype=boxes.dtype).repeat_interleave(tiles)  # (B*T,)
    rois = torch.cat([owner[:, None], boxes.reshape(-1, 4)], dim=1)  # (B*T, 5)
    patches = roi_align(images, rois.to(images.dtype), output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                        aligned=True)  # (B*T, C, size, size)
    return patches.view(batch, tiles, *patches.shape[1:])


def standardize_patches(patches: Tensor, mean: Tensor, std: Tensor, eps: float = 1 / 255) -> Tensor:
    """Patches (..., C, s, s) in [0, 1] -> patches the encoder sees with zero mean and unit std per patch and
    channel, once it applies its own ``(x - mean) / std`` (``mean``/``std``: the encoder's buffers).

    Noroozi & Favaro normalize every tile independently so that low-level statistics (brightness, contrast,
    colour cast) cannot tell neighbours apart; a near-flat patch's std is floored at ``eps``."""
    centred = patches - patches.mean(dim=(-2, -1), keepdim=True)
    scale = patches.std(dim=(-2, -1), keepdim=True).clamp_min(eps)
    return centred / scale * std + mean


def default_tile_size(height: int, width: int, grid: int, gap: float) -> int:
    """The tile's own pixel size at full region scale, at least MIN_TILE_SIZE."""
    return max(MIN_TILE_SIZE, round((1 - gap) * min(height, width) / grid))
