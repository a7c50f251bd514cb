"""Batched image augmentations that run on the training device, a whole batch at a time.

Every function takes images (B, C, H, W) with C in {1, 3}, uint8 or float in [0, 1], on any device,
and returns float32 in [0, 1] on the same device. Per-sample parameters are drawn with torch ops, from
`generator` when given (a seeded CPU run is bit-for-bit repeatable) or else from the global RNG; a
generator on another device than the images works (parameters are drawn there and copied over, so a
CPU generator reproduces CPU results on CUDA), at the cost of a small host-device copy per op. There
is no per-sample Python loop and no PIL: a SimCLR view of 256 CIFAR images costs a few milliseconds on
two CPU cores. The typed pipelines built from these ops live in reprlab.data.views; mixup and CutMix,
which mix images and labels, in reprlab.data.mixing.

Where these differ from the torchvision transforms they mirror:
- crops, resizes and rotations are one bilinear `grid_sample` without antialiasing (torchvision v2
  antialiases when it downscales); rotations fill with zeros like torchvision's default but
  interpolate bilinearly (torchvision's default is nearest);
- colour jitter applies brightness, contrast, saturation, hue in this fixed order (torchvision draws a
  random order per call) as one per-sample 3x3 matrix plus offset with a single clamp at the end
  (torchvision clamps after every step), and shifts hue by a rotation about RGB's grey axis, a linear
  stand-in for torchvision's HSV hue shift (see `adjust_color`);
- 1-channel images: saturation, hue and grayscale are no-ops (as in torchvision); brightness and
  contrast apply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma); used by grayscale, saturation and contrast.
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)


# ------------------------------------------------------------------------------------- input and RNG


def to_float(images: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1]; float images -> float32 (no copy when already float32)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}; convert them first")
    return images.float()


def _as_batch(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be (B, C, H, W) with C in {{1, 3}}, got shape {tuple(images.shape)}; "
            "add a batch dimension or move channels first"
        )
    return to_float(images)


def _draw_device(like: Tensor, generator: torch.Generator | None) -> torch.device:
    # draw where the generator lives, so a seeded CPU generator also drives CUDA runs
    return generator.device if generator is not None else like.device


def _uniform(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None,
             low: float = 0.0, high: float = 1.0) -> Tensor:
    """U[low, high) on like's device (exactly `low` everywhere when high == low)."""
    u = torch.rand(shape, generator=generator, device=_draw_device(like, generator))
    return (low + (high - low) * u).to(like.device)


def _coin(batch: int, p: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """(B,) bool, True with probability p (always True at p=1 since U < 1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")
    return _uniform((batch,), like, generator) < p


def _randperm(n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randperm(n, generator=generator, device=_draw_device(like, generator)).to(like.device)


# ------------------------------------------------------------------------------------------ geometry


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _crop_boxes(x: Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                generator: torch.Generator | None, attempts: int = 10) -> Tensor:
    """Per-sample integer crop boxes (B, 4) = (top, left, height, width) as in RandomResizedCrop.

    torchvision tries up to 10 (area, aspect) draws and keeps the first that fits, else falls back to a
    central crop with the aspect ratio clamped into `ratio`; here all attempts are drawn at once and the
    first valid one is picked per sample.
    """
    if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
    batch, _, height, width = x.shape
    target_area = height * width * _uniform((batch, attempts), x, generator, *scale)  # (B, attempts)
    log_ratio = _uniform((batch, attempts), x, generator, math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, attempts)
    first = valid.int().argmax(dim=1, keepdim=True)  # first valid attempt (0 when none is)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)  # (B,)
    found = valid.any(dim=1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, float(fallback_w))
    h = torch.where(found, h, float(fallback_h))
    # floor(U * (n + 1)) is randint(0, n + 1); the minimum guards float rounding as U -> 1
    top = torch.minimum(torch.floor(_uniform((batch,), x, generator) * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(_uniform((batch,), x, generator) * (width - w + 1)), width - w)
    top = torch.where(found, top, float((height - fallback_h) // 2))
    left = torch.where(found, left, float((width - fallback_w) // 2))
    return torch.stack([top, left, h, w], dim=1)  # (B, 4)


def _affine_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """F.affine_grid(theta, (B, C, height, width), align_corners=False), by broadcasting.

    F.affine_grid is a batched (H*W, 3) @ (3, 2) matmul, which costs ~10x the grid_sample on CPU.
    """
    cols = (torch.arange(width, device=theta.device) * 2 + 1) / width - 1  # (W,) output pixel centres
    rows = (torch.arange(height, device=theta.device) * 2 + 1) / height - 1  # (H,)
    t = theta[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    grid = t[:, :, 0] * cols + t[:, :, 1] * rows[:, None] + t[:, :, 2]  # (B, 2, H, W)
    return grid.permute(0, 2, 3, 1)  # (B, H, W, 2) as (x, y)


def _resized_crop(x: Tensor, boxes: Tensor, size: tuple[int, int], flip: Tensor | None = None) -> Tensor:
    """Crop boxes (B, 4) = (top, left, height, width) and resize to size: one bilinear grid_sample.

    A horizontal flip (B,) bool is folded into the sampling grid (mirrored x axis), so it is free.
    Within the box this equals torchvision's resized_crop without antialiasing; samples between a box
    edge and its outermost pixel centres blend in the pixel just outside the box, where torchvision
    repeats the edge pixel.
    """
    height, width = x.shape[-2:]
    top, left, box_h, box_w = boxes.unbind(dim=1)  # (B,) each
    # output pixel centre u in [-1, 1] reads input (2 * left + box_w * (u + 1)) / W - 1 (align_corners=False)
    scale_x = box_w / width
    if flip is not None:
        scale_x = torch.where(flip, -scale_x, scale_x)
    zeros = torch.zeros_like(scale_x)
    theta = torch.stack([
        torch.stack([scale_x, zeros, (2 * left + box_w) / width - 1], dim=1),
        torch.stack([zeros, box_h / height, (2 * top + box_h) / height - 1], dim=1),
    ], dim=1)  # (B, 2, 3)
    grid = _affine_grid(theta, *size)  # (B, h, w, 2)
    # border padding: a sample past the image edge repeats the edge, as resize does
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(x: Tensor, size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> Tensor:
    """Per-sample RandomResizedCrop (Szegedy et al., 2015) -> (B, C, *size); bilinear, no antialiasing."""
    x = _as_batch(x)
    return _resized_crop(x, _crop_boxes(x, scale, ratio, generator), _pair(size))


def random_horizontal_flip(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image left-right with probability p."""
    x = _as_batch(x)
    flip = _coin(x.shape[0], p, x, generator)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image counter-clockwise by degrees (B,) about its centre; bilinear, zero fill."""
    height, width = x.shape[-2:]
    radians = torch.deg2rad(degrees)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zeros = torch.zeros_like(cos)
    # inverse map in pixel units, rescaled to normalized coordinates (whose units differ when H != W)
    theta = torch.stack([
        torch.stack([cos, -sin * height / width, zeros], dim=1),
        torch.stack([sin * width / height, cos, zeros], dim=1),
    ], dim=1)  # (B, 2, 3)
    grid = _affine_grid(theta, height, width)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotation(x: Tensor, degrees: float, generator: torch.Generator | None = None) -> Tensor:
    """Rotate each image by an angle ~ U[-degrees, degrees] (counter-clockwise positive), zero fill."""
    x = _as_batch(x)
    if degrees < 0:
        raise ValueError(f"degrees must be >= 0 (angles are drawn from [-degrees, degrees]), got {degrees}")
    if degrees == 0:  # resampling at angle 0 is the identity only up to float rounding
        return x
    return _rotate(x, _uniform((x.shape[0],), x, generator, -degrees, degrees))


def cutout(x: Tensor, size_fraction: float = 0.5, p: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """Cutout (DeVries & Taylor, 2017): zero a (fraction H, fraction W) box with a uniform centre.

    The box is clipped at the image border, so near an edge less than the full box is erased.
    """
    x = _as_batch(x)
    if not 0.0 < size_fraction <= 1.0:
        raise ValueError(f"size_fraction must be in (0, 1], got {size_fraction}")
    batch, _, height, width = x.shape
    cut_h, cut_w = max(1, round(size_fraction * height)), max(1, round(size_fraction * width))
    top = torch.floor(_uniform((batch,), x, generator) * height) - cut_h // 2  # (B,)
    left = torch.floor(_uniform((batch,), x, generator) * width) - cut_w // 2
    apply = _coin(batch, p, x, generator)
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + cut_h)  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + cut_w)  # (B, W)
    erase = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]  # (B, H, W)
    return x.masked_fill(erase[:, None], 0.0)


# -------------------------------------------------------------------------------------------- colour


def _luma(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) with the same arithmetic as torchvision's rgb_to_grayscale."""
    r, g, b = x.unbind(dim=1)
    return r.mul(LUMA_WEIGHTS[0]).add_(g, alpha=LUMA_WEIGHTS[1]).add_(b, alpha=LUMA_WEIGHTS[2]).unsqueeze(1)


def _hue_rotation(hue: Tensor) -> Tensor:
    """(B,) hue factors -> (B, 3, 3) rotations by hue * 360 degrees about the grey axis (1, 1, 1).

    Rodrigues' formula I + sin(t) K + (1 - cos(t)) K^2, K the cross-product matrix of the unit axis:
    exactly I at t = 0, and at t = 120 degrees it maps red -> green -> blue, as HSV hue does.
    """
    angle = (2 * math.pi * hue)[:, None, None]  # (B, 1, 1)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=hue.device)
    cross = cross / math.sqrt(3)
    eye = torch.eye(3, device=hue.device)
    return eye + torch.sin(angle) * cross + (1 - torch.cos(angle)) * (cross @ cross)


def _color_transform(x: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor, hue: Tensor,
                     needs_mean: bool = True) -> tuple[Tensor, Tensor]:
    """Per-sample matrix (B, C, C) and offset (B, C, 1): jitter(x) = clamp(matrix @ x + offset, 0, 1).

    The composition of, in order, brightness x -> b x, contrast x -> k x + (1 - k) mean_grey(x),
    saturation x -> s x + (1 - s) grey(x), and a hue rotation about the grey axis: all linear in RGB
    except contrast's offset, which needs only the image's mean grey level (skipped when needs_mean is
    False, i.e. when every contrast factor is 1).
    """
    batch, channels = x.shape[:2]
    scale = (brightness * contrast)[:, None, None]  # (B, 1, 1)
    if channels == 1:
        mean_grey = x.mean(dim=(1, 2, 3)) if needs_mean else torch.zeros_like(brightness)  # (B,)
        return scale, ((1 - contrast) * brightness * mean_grey)[:, None, None]
    if needs_mean:
        mean_grey = _luma(x.mean(dim=(2, 3), keepdim=True)).flatten()  # (B,) = luma of the mean colour
    else:
        mean_grey = torch.zeros_like(brightness)
    s = saturation[:, None, None]
    eye = torch.eye(3, device=x.device)
    grey_projection = torch.tensor(LUMA_WEIGHTS, device=x.device).expand(3, 3)  # every row = luma weights
    colour = _hue_rotation(hue) @ (s * eye + (1 - s) * grey_projection)  # (B, 3, 3)
    grey_offset = ((1 - contrast) * brightness * mean_grey)[:, None, None].expand(batch, 3, 1)
    return colour * scale, colour @ grey_offset  # (B, 3, 3), (B, 3, 1)


def _apply_color_transform(x: Tensor, matrix: Tensor, offset: Tensor) -> Tensor:
    batch, channels, height, width = x.shape
    out = torch.baddbmm(offset, matrix, x.reshape(batch, channels, height * width))  # (B, C, H*W)
    return out.clamp_(0.0, 1.0).view(batch, channels, height, width)


def adjust_color(x: Tensor, brightness_factor: Tensor | float = 1.0, contrast_factor: Tensor | float = 1.0,
                 saturation_factor: Tensor | float = 1.0, hue_factor: Tensor | float = 0.0) -> Tensor:
    """Fused colour jitter with explicit factors (scalars or per-sample (B,) tensors), one clamp.

    Brightness, contrast and saturation equal torchvision's adjust_* wherever torchvision would not
    clamp between steps. hue_factor in [-0.5, 0.5] rotates colours by hue_factor * 360 degrees about the
    grey axis: like torchvision's HSV hue shift it leaves greys alone, turns the same way and moves the
    HSV hue by hue_factor on average (exactly for primaries at multiples of 1/6), but it keeps the
    channel mean where HSV keeps the max channel and saturation, so pixel values differ by a few
    percent. On saturated colours the HSV hue moved by hue_factor +- 0.004 (std) this way, against
    +- 0.015-0.04 for a rotation in YIQ's chroma plane, the other common linear choice.
    """
    x = _as_batch(x)
    factors = [torch.as_tensor(f, dtype=torch.float32, device=x.device).expand(x.shape[0])
               for f in (brightness_factor, contrast_factor, saturation_factor, hue_factor)]
    return _apply_color_transform(x, *_color_transform(x, *factors))


def color_jitter(x: Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, p: float = 0.8, generator: torch.Generator | None = None) -> Tensor:
    """RandomApply(ColorJitter, p) with per-sample factors, fused into one pass (see adjust_color).

    Factors are drawn as in torchvision: brightness, contrast, saturation ~ U[max(0, 1 - v), 1 + v],
    hue ~ U[-hue, hue]; images not selected (probability 1 - p) keep identity factors.
    """
    x = _as_batch(x)
    if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
        raise ValueError("need brightness, contrast, saturation >= 0 and hue in [0, 0.5], got "
                         f"{brightness=}, {contrast=}, {saturation=}, {hue=}")
    if p == 0 or brightness == contrast == saturation == hue == 0:
        return x
    batch = x.shape[0]
    apply = _coin(batch, p, x, generator)
    factors = [_uniform((batch,), x, generator, max(0.0, 1 - v), 1 + v)
               for v in (brightness, contrast, saturation)]
    factors.append(_uniform((batch,), x, generator, -hue, hue))
    identity = (1.0, 1.0, 1.0, 0.0)
    factors = [torch.where(apply, factor, neutral) for factor, neutral in zip(factors, identity)]
    return _apply_color_transform(x, *_color_transform(x, *factors, needs_mean=contrast > 0))


def random_grayscale(x: Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> Tensor:
    """Replace RGB images by their ITU-R 601 luma (kept as 3 channels) with probability p.

    1-channel images pass through unchanged.
    """
    x = _as_batch(x)
    apply = _coin(x.shape[0], p, x, generator)
    if x.shape[1] == 1:
        return x
    return torch.where(apply[:, None, None, None], _luma(x).expand_as(x), x)


def random_solarize(x: Tensor, p: float, threshold: float = 0.5,
                    generator: torch.Generator | None = None) -> Tensor:
    """Solarize with probability p (BYOL, Grill et al., 2020): pixels >= threshold become 1 - pixel.

    Matches torchvision's RandomSolarize on [0, 1] floats; works on any number of channels.
    """
    x = _as_batch(x)
    apply = _coin(x.shape[0], p, x, generator)
    solarized = torch.where(x >= threshold, 1.0 - x, x)
    return torch.where(apply[:, None, None, None], solarized, x)


# ---------------------------------------------------------------------------------------------- blur


def _default_kernel_size(height: int, width: int) -> int:
    """About 10% of the shorter side, odd, at least 3 (SimCLR: 23 for 224 px)."""
    size = max(3, int(0.1 * min(height, width)))
    return size if size % 2 else size + 1


def _gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """(B,) sigmas -> (B, kernel_size) normalized 1-D kernels, sampled as torchvision's gaussian_blur."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=sigma.device)  # (K,)
    pdf = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)  # (B, K)
    return pdf / pdf.sum(dim=1, keepdim=True)


def _blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Separable blur with per-sample kernels (B, K): reflect padding, two grouped convolutions."""
    batch, channels, height, width = x.shape
    kernel_size = kernels.shape[1]
    pad = kernel_size // 2
    if pad >= min(height, width):
        raise ValueError(f"kernel_size {kernel_size} is too large for {height}x{width} images; "
                         f"use at most {2 * min(height, width) - 1}")
    weight = kernels.repeat_interleave(channels, dim=0)  # (B*C, K): one group per (image, channel)
    flat = F.pad(x.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, weight[:, None, None, :], groups=batch * channels)  # (1, B*C, H + 2 pad, W)
    flat = F.conv2d(flat, weight[:, None, :, None], groups=batch * channels)  # (1, B*C, H, W)
    return flat.view(batch, channels, height, width)


def gaussian_blur(x: Tensor, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0),
                  kernel_size: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur with sigma ~ U[sigma] per sample, applied with probability p (as in SimCLR).

    kernel_size defaults to ~10% of the shorter image side (odd, >= 3); borders are reflected.
    """
    x = _as_batch(x)
    if kernel_size is None:
        kernel_size = _default_kernel_size(*x.shape[-2:])
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if not 0 < sigma[0] <= sigma[1]:
        raise ValueError(f"need 0 < sigma[0] <= sigma[1], got {sigma}")
    batch = x.shape[0]
    apply = _coin(batch, p, x, generator)
    kernels = _gaussian_kernels(_uniform((batch,), x, generator, *sigma), kernel_size)  # (B, K)
    # unselected images get a unit impulse, so one batched convolution leaves them exactly unchanged
    impulse = torch.zeros(kernel_size, device=x.device)  # (K,)
    impulse[kernel_size // 2] = 1.0
    return _blur(x, torch.where(apply[:, None], kernels, impulse))
