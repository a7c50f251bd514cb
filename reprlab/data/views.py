"""Typed augmentation pipelines: values a method or a config section holds, built from reprlab.data.augment.

Each pipeline is a frozen dataclass, so its fields are the one declaration of its parameter names: a YAML
section (``method.params.augment``, ``augment``, ``alignment_views``) builds it with the config loader's key
checks, and a method receives it whole instead of re-declaring the fields as keyword arguments. Calls draw
from ``generator`` when given, else the global RNG, in a fixed order: the same seed gives the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reprlab.data.augment import (
    _as_batch,
    _coin,
    _crop_boxes,
    _pair,
    _resized_crop,
    color_jitter,
    cutout,
    gaussian_blur,
    random_grayscale,
    random_rotation,
    random_solarize,
)

# RandomResizedCrop's aspect-ratio range, used by every pipeline here
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ViewAugment:
    """One random view per call (SimCLR, Chen et al., 2020): crop + flip, colour jitter, grayscale, blur,
    solarize.

    ``size``: output side (None keeps the input's height and width). Jitter strength s sets brightness =
    contrast = saturation = 0.8 s and hue = 0.2 s, applied with probability ``jitter_p``. SimCLR blurs with
    p = 0.5 on ImageNet and not at all on 32 px CIFAR (blur_p = 0, the default here). BYOL (Grill et al.,
    2020) uses two of these: blur_p 1.0 / 0.1 and solarize_p 0 / 0.2.
    """

    size: int | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    jitter_strength: float = 1.0
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = _as_batch(images)
        size = tuple(x.shape[-2:]) if self.size is None else _pair(self.size)
        flip = _coin(x.shape[0], self.flip_p, x, generator)
        boxes = _crop_boxes(x, tuple(self.crop_scale), CROP_RATIO, generator)
        x = _resized_crop(x, boxes, size, flip)  # (B, C, *size); the flip is folded into the crop
        strength = self.jitter_strength
        x = color_jitter(x, 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength,
                         p=self.jitter_p, generator=generator)
        x = random_grayscale(x, self.grayscale_p, generator)
        # optional ops draw nothing when off, so adding one leaves the other pipelines' random stream alone
        if self.blur_p > 0:
            x = gaussian_blur(x, p=self.blur_p, generator=generator)
        if self.solarize_p > 0:
            x = random_solarize(x, self.solarize_p, generator=generator)
        return x

    def views(self, images: Tensor, n: int = 2, generator: torch.Generator | None = None) -> list[Tensor]:
        """n independent views of the same batch (uint8 -> float conversion done once)."""
        x = _as_batch(images)
        return [self(x, generator) for _ in range(n)]


@dataclass(frozen=True)
class FinetuneAugment:
    """Supervised augmentation: random resized crop (or resize) + flip, rotation, jitter, cutout.

    size=None keeps the input size; crop_scale=None disables cropping (images are only resized).
    Jitter strength s is torchvision's usual ColorJitter(0.4 s, 0.4 s, 0.4 s, 0.1 s), applied to every
    image; cutout erases a box of half the image side with probability cutout_p. ``mixup_alpha`` and
    ``cutmix_alpha`` (0 = off) configure batch mixing (reprlab.data.mixing), which needs the labels: the
    fine-tuning task applies it after this per-image pipeline, and ``__call__`` ignores them.
    """

    size: int | None = None
    crop_scale: tuple[float, float] | None = (0.35, 1.0)
    flip_p: float = 0.5
    rotation_degrees: float = 0.0
    jitter_strength: float = 0.0
    cutout_p: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = _as_batch(images)
        batch, _, height, width = x.shape
        size = (height, width) if self.size is None else _pair(self.size)
        flip = _coin(batch, self.flip_p, x, generator)
        if self.crop_scale is not None:
            boxes = _crop_boxes(x, tuple(self.crop_scale), CROP_RATIO, generator)
            x = _resized_crop(x, boxes, size, flip)
        elif size != (height, width):
            whole = torch.tensor([0.0, 0.0, height, width], device=x.device).expand(batch, 4)
            x = _resized_crop(x, whole, size, flip)
        else:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.rotation_degrees > 0:
            x = random_rotation(x, self.rotation_degrees, generator)
        if self.jitter_strength > 0:
            strength = self.jitter_strength
            x = color_jitter(x, 0.4 * strength, 0.4 * strength, 0.4 * strength, 0.1 * strength,
                             p=1.0, generator=generator)
        if self.cutout_p > 0:
            x = cutout(x, 0.5, p=self.cutout_p, generator=generator)
        return x


@dataclass(frozen=True)
class MultiCrop:
    """Multi-crop views (Caron et al., 2020; DINO, Caron et al., 2021): two global crops, then ``num_local``
    small local crops, each crop a :class:`ViewAugment` with its own size, crop scale, blur and solarize
    probabilities.

    The defaults are DINO's ImageNet recipe: global crops at the input's size (224 px there) with scale (0.4, 1),
    the first always blurred, the second blurred with p 0.1 and solarized with p 0.2; 8 local crops of 96 px with
    scale (0.05, 0.4), blurred with p 0.5; flips, colour jitter with p 0.8 (strength 0.5: brightness, contrast
    and saturation 0.4, hue 0.1, where DINO's saturation is 0.2) and grayscale with p 0.2 everywhere. In YAML a
    mapping, ``{num_local: 6, local: {size: 16}}``; keys left out keep these values.

    Every image draws its own box, flip and colour parameters in every crop. The local crops are made in one
    batched pass over the batch repeated ``num_local`` times: fewer, larger ops than one pass per crop (on a
    CPU several times faster), for the memory of that repeated batch while it is cropped.
    """

    global1: ViewAugment = ViewAugment(crop_scale=(0.4, 1.0), jitter_strength=0.5, blur_p=1.0)
    global2: ViewAugment = ViewAugment(crop_scale=(0.4, 1.0), jitter_strength=0.5, blur_p=0.1, solarize_p=0.2)
    local: ViewAugment = ViewAugment(size=96, crop_scale=(0.05, 0.4), jitter_strength=0.5, blur_p=0.5)
    num_local: int = 8

    def __post_init__(self) -> None:
        if self.num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {self.num_local}")

    def views(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """[global 1, global 2, local 1, ..., local num_local], each (B, C, size, size) float."""
        x = _as_batch(images)
        views = [self.global1(x, generator), self.global2(x, generator)]
        if self.num_local:
            views += list(self.local(x.repeat(self.num_local, 1, 1, 1), generator).chunk(self.num_local))
        return views
