"""Losses for self-supervised pretraining: NT-Xent (contrastive) and pixel reconstruction (autoencoders)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reprlab import distributed

RECONSTRUCTION_LOSSES = ("l1", "mse")


# --------------------------------------------------------------------------------------------- contrastive


def nt_xent_logits(z0: Tensor, z1: Tensor, temperature: float = 0.5,
                   gather: bool = True) -> tuple[Tensor, Tensor]:
    """Logits (2n, 2N) of every local anchor against every key, self masked, and the column of each positive.

    z0, z1: (n, D) projections of two views of the same n images on this rank (N = n * world size). Computed
    in float32 outside autocast: under bf16/fp16 the cosine of a view with itself is not exactly 1 and a 0.1
    temperature amplifies the rounding.
    """
    if z0.shape != z1.shape or z0.ndim != 2:
        raise ValueError(f"z0 and z1 must both be (n, D), got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z0.shape[0]
    with torch.autocast(z0.device.type, enabled=False):
        anchors = F.normalize(torch.cat([z0, z1]).float(), dim=1)  # (2n, D)
        if gather and distributed.world_size() > 1:
            rank, world = distributed.rank(), distributed.world_size()
            k0 = distributed.gather_with_grad(anchors[:n])  # (N, D), N = world * n
            k1 = distributed.gather_with_grad(anchors[n:])
            keys = torch.cat([k0, k1])  # (2N, D): all first views, then all second views
        else:
            rank, world, keys = 0, 1, anchors
        big_n = n * world
        local = torch.arange(n, device=z0.device) + rank * n
        self_index = torch.cat([local, local + big_n])  # (2n,) column of each anchor in `keys`
        positive = torch.cat([local + big_n, local])  # (2n,) the other view of the same image
        logits = anchors @ keys.T / temperature  # (2n, 2N)
        # mask the self-similarity: neither a positive nor a negative (never subtract a constant: pitfall 1)
        logits = logits.masked_fill(F.one_hot(self_index, 2 * big_n).bool(), float("-inf"))
    return logits, positive


def nt_xent_loss(z0: Tensor, z1: Tensor, temperature: float = 0.5, gather: bool = True) -> Tensor:
    """NT-Xent (Chen et al., 2020): each of the 2N views has one positive and 2N-2 negatives.

    z0, z1: (n, D) projections of two views of the same n images on this rank; they are L2-normalized here.
    Under DDP (and ``gather``) the keys are gathered from every rank with gradient and the loss covers this
    rank's anchors only, so DDP's averaging reproduces the single-process gradient on the global batch.

    Returns the mean over the 2N anchors. The TensorFlow reference returns ``loss_a + loss_b`` (two directions
    summed, each a mean over N), i.e. twice this value: the same for LARS (scale-invariant trust ratio), a
    factor 2 in the effective learning rate for SGD/Adam.
    """
    logits, positive = nt_xent_logits(z0, z1, temperature, gather)
    return F.cross_entropy(logits, positive)


def nt_xent_accuracy(logits: Tensor, positive: Tensor) -> Tensor:
    """Share of anchors whose most similar key is their positive (0-d tensor; a cheap progress signal)."""
    return (logits.argmax(dim=1) == positive).float().mean()


# --------------------------------------------------------------------------------------------- reconstruction


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
