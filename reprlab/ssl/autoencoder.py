"""Autoencoders: plain (Hinton & Salakhutdinov, 2006), denoising (Vincent et al., 2008) and masked image
modeling (SimMIM, Xie et al., 2022; MAE, He et al., 2022), on any encoder from ``create_encoder``.

One method, ``mode: plain | denoising | masked``:
- plain: encoder -> ``feature_dim`` bottleneck -> :class:`ConvDecoder` -> the image;
- denoising: the encoder sees a corrupted image (Gaussian noise or random erasing), the target is the clean
  one;
- masked: random patches are hidden (filled with zero or the image's mean colour), the loss counts hidden
  pixels only. Through the pooled bottleneck this is SimMIM-style and works with every encoder. With
  ``visible_only`` and a timm VisionTransformer it is MAE: the encoder sees only the visible patch tokens and
  a small transformer decoder fills in mask tokens (the bottleneck is then the token sequence, not the pooled
  feature).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from reprlab.contracts import Task
from reprlab.data.augment import to_float
from reprlab.data.views import FinetuneAugment
from reprlab.models.decoders import ConvDecoder
from reprlab.models.encoders import Encoder
from reprlab.ssl.reconstruction import (
    RECONSTRUCTION_LOSSES,
    normalize_patches,
    patchify,
    reconstruction_loss,
    unpatchify,
)

MODES = ("plain", "denoising", "masked")
NOISES = ("gaussian", "erase")
MASK_FILLS = ("zero", "mean")


def default_patch_size(height: int, width: int) -> int:
    """The divisor of both sides closest to an eighth of the shorter side, at least 2 (8 px -> 2, 32 -> 4)."""
    target = max(2, min(height, width) // 8)
    common = math.gcd(height, width)
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def random_patch_mask(batch: int, num_patches: int, ratio: float, device: torch.device) -> Tensor:
    """(B, L) bool, True = hidden: exactly round(ratio * L) random patches per image (at least one of each
    kind when L > 1), so that every image has the same number of visible tokens (needed by the MAE path)."""
    if not 0 < ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {ratio}")
    hidden = min(max(1, round(ratio * num_patches)), max(1, num_patches - 1))
    order = torch.rand(batch, num_patches, device=device).argsort(dim=1)  # a random permutation per image
    return order < hidden  # the positions ranked first in the permutation are hidden


def mask_to_pixels(mask: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """(B, L) patch mask -> (B, 1, H, W) pixel mask."""
    rows, cols = height // patch_size, width // patch_size
    grid = mask.view(mask.shape[0], 1, rows, cols)
    return grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def random_erase(x: Tensor, scale: tuple[float, float] = (0.02, 0.25),
                 ratio: tuple[float, float] = (0.3, 3.3)) -> Tensor:
    """Random erasing (Zhong et al., 2020): one box per image of area ~ U[scale] * H * W and log-uniform
    aspect ``ratio``, clipped to the image, filled with uniform noise."""
    batch, _, height, width = x.shape
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"erase_scale must satisfy 0 < low <= high <= 1, got {scale}")
    area = torch.empty(batch, device=x.device).uniform_(*scale) * height * width
    aspect = torch.exp(torch.empty(batch, device=x.device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    box_h = (area * aspect).sqrt().clamp(1, height)  # (B,)
    box_w = (area / aspect).sqrt().clamp(1, width)
    top = torch.rand(batch, device=x.device) * (height - box_h)
    left = torch.rand(batch, device=x.device) * (width - box_w)
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    in_rows = (rows >= top[:, None].floor()) & (rows < (top + box_h)[:, None].floor())  # (B, H)
    in_cols = (cols >= left[:, None].floor()) & (cols < (left + box_w)[:, None].floor())  # (B, W)
    box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
    return torch.where(box, torch.rand_like(x), x)


class MAEDecoder(nn.Module):
    """MAE's light decoder: visible tokens + mask tokens at the hidden positions, learned position embeddings,
    a few transformer blocks, a linear map to each patch's pixels."""

    def __init__(self, embed_dim: int, num_patches: int, patch_pixels: int, dim: int = 128, depth: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: Tensor, mask: Tensor) -> Tensor:
        """visible: (B, L_visible, E) encoder tokens in patch order; mask: (B, L), True = hidden.
        Returns (B, L, P) pixels of every patch."""
        batch, num_patches = mask.shape
        embedded = self.embed(visible)  # (B, L_visible, dim)
        tokens = self.mask_token.to(embedded.dtype).expand(batch, num_patches, -1).clone()  # (B, L, dim)
        tokens[~mask] = embedded.reshape(-1, embedded.shape[-1])  # row-major fill keeps the patch order
        return self.head(self.norm(self.blocks(tokens + self.pos_embed)))  # (B, L, P)


class AutoEncoder(Task):
    """Reconstruct images from the encoder's features; see the module docstring for the modes.

    ``image_size`` and ``channels`` size the decoder (they must match the data: 8 and 1 for digits).
    ``patch_size`` sets the masking grid and the per-patch target normalization (default: about a side / 8).
    ``loss``: mse | l1. ``normalize_target``: regress per-patch normalized pixels (MAE's norm_pix_loss).
    ``noise`` (denoising): gaussian (std ``noise_std`` on [0, 1] pixels, clamped) | erase (``erase_scale``).
    ``mask_ratio``, ``mask_fill`` (masked): share of hidden patches, and what the encoder sees there.
    ``augment``: optional light augmentation of the input, the target follows it (None: off; in YAML a
    mapping of FinetuneAugment's fields, e.g. ``{crop_scale: [0.5, 1.0], flip_p: 0.5}``).
    """

    def __init__(self, encoder: Encoder, mode: str = "plain", image_size: int = 32, channels: int = 3,
                 loss: str = "mse", normalize_target: bool = False, patch_size: int | None = None,
                 noise: str = "gaussian", noise_std: float = 0.2,
                 erase_scale: tuple[float, float] = (0.02, 0.25), mask_ratio: float = 0.5,
                 mask_fill: str = "zero", visible_only: bool = False, decoder_channels: int = 256,
                 decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 augment: FinetuneAugment | None = None) -> None:
        super().__init__()
        for name, value, valid in (("mode", mode, MODES), ("loss", loss, RECONSTRUCTION_LOSSES),
                                   ("noise", noise, NOISES), ("mask_fill", mask_fill, MASK_FILLS)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; choose from {sorted(valid)}")
        if visible_only and mode != "masked":
            raise ValueError("visible_only (MAE) needs mode: masked")
        self.encoder = encoder
        self.mode, self.loss, self.normalize_target = mode, loss, normalize_target
        self.image_size, self.channels = image_size, channels
        self.noise, self.noise_std, self.erase_scale = noise, noise_std, tuple(erase_scale)
        self.mask_ratio, self.mask_fill, self.visible_only = mask_ratio, mask_fill, visible_only
        self.augment = augment
        if visible_only:
            vit = self._vision_transformer()
            vit_patch = vit.patch_embed.patch_size[0]
            if patch_size not in (None, vit_patch):
                raise ValueError(f"visible_only uses the ViT's own patch size {vit_patch}; "
                                 f"drop patch_size={patch_size}")
            self.patch_size = vit_patch
            num_patches = (image_size // vit_patch) ** 2
            self.decoder: nn.Module = MAEDecoder(vit.embed_dim, num_patches, vit_patch**2 * channels,
                                                 decoder_dim, decoder_depth, decoder_heads)
        else:
            self.patch_size = patch_size or default_patch_size(image_size, image_size)
            self.decoder = ConvDecoder(encoder.feature_dim, channels, image_size,
                                       hidden_channels=decoder_channels)
        if image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size {image_size}")

    def _vision_transformer(self) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        vit = getattr(self.encoder, "backbone", None)
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"visible_only (MAE) needs a timm VisionTransformer encoder, got "
                             f"{type(vit).__name__}; use e.g. encoder timm:vit_tiny_patch16_224 "
                             f"or visible_only: false")
        return vit

    # ------------------------------------------------------------------------------------------- corruption

    def corrupt(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, C, H, W) clean images in [0, 1] -> (encoder input, patch mask (B, L) or None)."""
        if self.mode == "plain":
            return x, None
        if self.mode == "denoising":
            if self.noise == "gaussian":
                return (x + self.noise_std * torch.randn_like(x)).clamp(0, 1), None
            return random_erase(x, self.erase_scale), None
        height, width = x.shape[-2:]
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        mask = random_patch_mask(x.shape[0], num_patches, self.mask_ratio, x.device)  # (B, L)
        if self.mask_fill == "mean":
            fill = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        else:
            fill = torch.zeros_like(x[:, :, :1, :1])
        hidden = mask_to_pixels(mask, self.patch_size, height, width)  # (B, 1, H, W)
        return torch.where(hidden, fill, x), mask

    # ------------------------------------------------------------------------------------------- forward

    def _check_input(self, x: Tensor) -> None:
        expected = (self.channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"the autoencoder was built for images {expected} (C, H, W) but got "
                             f"{tuple(x.shape[1:])}; set method.params.image_size and channels to match "
                             f"the data")

    def _mae_predict(self, x: Tensor, mask: Tensor) -> Tensor:
        """Encode only the visible patches of x with the ViT, decode every patch -> (B, C, H, W)."""
        vit = self._vision_transformer()
        if x.shape[1] == 1 and self.encoder.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        tokens = vit._pos_embed(vit.patch_embed((x - self.encoder.mean) / self.encoder.std))  # (B, T + L, E)
        prefix = vit.num_prefix_tokens
        patches = tokens[:, prefix:]  # (B, L, E)
        # (B, L_visible, E) in patch order: every image hides the same number of patches
        visible = patches[~mask].view(patches.shape[0], -1, patches.shape[-1])
        encoded = vit.norm(vit.blocks(vit.norm_pre(torch.cat([tokens[:, :prefix], visible], dim=1))))
        predicted = self.decoder(encoded[:, prefix:], mask)  # (B, L, p * p * C)
        return unpatchify(predicted, self.patch_size, self.channels, self.image_size, self.image_size)

    def reconstruct(self, images: Tensor) -> dict[str, Tensor | None]:
        """uint8 (or [0, 1] float) images -> ``target`` (clean input), ``corrupted`` (what the encoder sees),
        ``prediction`` (decoder output, in the target's space), ``mask`` ((B, L) hidden patches or None)."""
        x = to_float(images)  # (B, C, H, W) in [0, 1]
        if self.augment is not None:
            x = self.augment(x)
        self._check_input(x)
        corrupted, mask = self.corrupt(x)
        if self.visible_only:
            prediction = self._mae_predict(x, mask)
        else:
            prediction = self.decoder(self.encoder(corrupted))  # (B, C, H, W)
        return {"target": x, "corrupted": corrupted, "prediction": prediction, "mask": mask}

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.reconstruct(batch["images"])
        loss = reconstruction_loss(out["prediction"], out["target"], self.patch_size, out["mask"], self.loss,
                                   self.normalize_target)
        return {"loss": loss}

    # ------------------------------------------------------------------------------------------- artifacts

    def to_pixels(self, prediction: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        """A prediction as viewable [0, 1] pixels: per-patch normalized predictions are mapped back with the
        target patch statistics (as MAE's visualization does) and, when masked, visible patches show the
        input."""
        height, width = target.shape[-2:]
        if self.normalize_target:
            _, mean, std = normalize_patches(patchify(target, self.patch_size))
            pixels = patchify(prediction, self.patch_size) * std + mean
            prediction = unpatchify(pixels, self.patch_size, self.channels, height, width)
        if mask is not None:
            prediction = torch.where(mask_to_pixels(mask, self.patch_size, height, width), prediction, target)
        return prediction.clamp(0, 1)

    @torch.no_grad()
    def save_artifacts(self, run_dir: str | Path, images: Tensor, count: int = 8) -> Path:
        """Write ``reconstructions.png``: titled rows of inputs, corrupted inputs and reconstructions."""
        was_training = self.training
        self.eval()
        out = self.reconstruct(images[:count])
        self.train(was_training)
        from reprlab.evaluate.plots import plot_image_rows

        reconstruction = self.to_pixels(out["prediction"].float(), out["target"], out["mask"])
        corrupted = {"plain": "input (no corruption)", "denoising": "noised input",
                     "masked": "masked input"}[self.mode]
        return plot_image_rows([out["target"], out["corrupted"], reconstruction],
                               ["input", corrupted, "reconstruction"], Path(run_dir) / "reconstructions.png")
