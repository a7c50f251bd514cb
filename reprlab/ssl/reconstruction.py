"""Pixel reconstruction for the autoencoders (plain, denoising, SimMIM, MAE): patches and the masked loss."""

from __future__ import annotations

import torch
from torch import Tensor

RECONSTRUCTION_LOSSES = ("l1", "mse")


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, L, patch_size**2 * C) non-overlapping patches in row-major order (as MAE)."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch_size={patch_size}; "
                         f"choose a patch_size that divides both sides")
    rows, cols = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: Tensor, patch_size: int, channels: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, L, patch_size**2 * C) -> (B, C, H, W)."""
    batch = patches.shape[0]
    rows, cols = height // patch_size, width // patch_size
    x = patches.reshape(batch, rows, cols, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Per-patch normalized pixels (MAE's ``norm_pix_loss``): (patches - mean) / std over each patch's values.

    Returns (normalized, mean, std), mean and std (B, L, 1), so a prediction can be mapped back to pixels."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True, unbiased=False) + eps).sqrt()
    return (patches - mean) / std, mean, std


def reconstruction_loss(prediction: Tensor, target: Tensor, patch_size: int = 1, mask: Tensor | None = None,
                        loss: str = "mse", normalize_target: bool = False) -> Tensor:
    """Pixel reconstruction loss between images (B, C, H, W), averaged over patches.

    ``mask`` (B, L) with L = (H / patch_size) * (W / patch_size), True = hidden: only hidden patches count
    (SimMIM / MAE), and the mean is over hidden pixels. ``normalize_target`` compares the prediction with
    per-patch normalized target pixels (MAE); the prediction then lives in that normalized space.
    """
    if loss not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"unknown reconstruction loss {loss!r}; choose from {list(RECONSTRUCTION_LOSSES)}")
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in "
                         f"shape")
    with torch.autocast(prediction.device.type, enabled=False):
        pred_patches = patchify(prediction.float(), patch_size)  # (B, L, P)
        target_patches = patchify(target.float(), patch_size)
        if normalize_target:
            if target_patches.shape[-1] < 2:
                raise ValueError("normalize_target needs patches of at least 2 values; use patch_size >= 2")
            target_patches = normalize_patches(target_patches)[0]
        error = pred_patches - target_patches
        per_patch = (error.abs() if loss == "l1" else error.square()).mean(dim=-1)  # (B, L)
        if mask is None:
            return per_patch.mean()
        if mask.shape != per_patch.shape:
            raise ValueError(f"mask must be (B, L) = {tuple(per_patch.shape)} for patch_size={patch_size}, "
                             f"got {tuple(mask.shape)}")
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
