"""Batch mixing for supervised training: mixup and CutMix blend pairs of images and their labels.

Unlike the per-image ops in reprlab.data.augment these mix samples, so they take the targets too and
return soft targets (B, num_classes). Randomness follows augment's contract: one draw per batch from
`generator` when given (seeded runs repeat), else from the global RNG.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reprlab.data.augment import _as_batch, _draw_device, _randperm, _uniform


def _log_gamma_sample(concentration: float, shape: tuple[int, ...], like: Tensor,
                      generator: torch.Generator | None, tries: int = 16) -> Tensor:
    """log of Gamma(concentration, 1) samples (Marsaglia & Tsang, 2000), `tries` proposals at once.

    torch.distributions takes no generator; this keeps seeded runs repeatable. A proposal is accepted
    with probability > 0.95, so all 16 failing (the first is then used) has probability < 1e-20.
    """
    boosted = concentration < 1  # Gamma(a) = Gamma(a + 1) * U^(1/a)
    a = concentration + 1 if boosted else concentration
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    device = _draw_device(like, generator)
    normal = torch.randn((*shape, tries), generator=generator, device=device)
    uniform = torch.rand((*shape, tries), generator=generator, device=device)
    v = (1 + c * normal) ** 3
    log_v = torch.log(v.clamp_min(1e-30))
    accept = (v > 0) & (torch.log(uniform) < 0.5 * normal**2 + d - d * v + d * log_v)
    first = accept.int().argmax(dim=-1, keepdim=True)
    log_sample = (math.log(d) + log_v).gather(-1, first).squeeze(-1)
    if boosted:  # log space: U^(1/a) underflows float32 for small a
        u = 1 - torch.rand(shape, generator=generator, device=device)  # in (0, 1]
        log_sample = log_sample + torch.log(u) / concentration
    return log_sample.to(like.device)


def _sample_beta(alpha: float, shape: tuple[int, ...], like: Tensor,
                 generator: torch.Generator | None) -> Tensor:
    """Beta(alpha, alpha) = G1 / (G1 + G2) = sigmoid(log G1 - log G2)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    log_g1 = _log_gamma_sample(alpha, shape, like, generator)
    log_g2 = _log_gamma_sample(alpha, shape, like, generator)
    return torch.sigmoid(log_g1 - log_g2)


def _soft_targets(targets: Tensor, num_classes: int) -> Tensor:
    """Integer labels (B,) -> one-hot (B, num_classes); soft targets (B, num_classes) pass through."""
    if targets.ndim not in (1, 2):
        raise ValueError(f"targets must be labels (B,) or soft targets (B, num_classes), "
                         f"got shape {tuple(targets.shape)}")
    if targets.ndim == 2:
        if targets.shape[1] != num_classes:
            raise ValueError(f"soft targets have {targets.shape[1]} classes but num_classes={num_classes}")
        return targets.float()
    # scatter rather than F.one_hot, which checks the label range with a host sync on CUDA
    one_hot = torch.zeros(targets.shape[0], num_classes, device=targets.device)
    return one_hot.scatter_(1, targets.long()[:, None], 1.0)


def mixup(x: Tensor, targets: Tensor, alpha: float, num_classes: int,
          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """mixup (Zhang et al., 2018): one lam ~ Beta(alpha, alpha) per batch, blended with a permutation.

    Returns (lam x + (1 - lam) x[perm], lam onehot(y) + (1 - lam) onehot(y[perm])); the soft targets
    (B, num_classes) sum to one per row. targets may be labels (B,) or soft targets (B, num_classes).
    """
    x = _as_batch(x)
    soft = _soft_targets(targets.to(x.device), num_classes)  # (B, K)
    lam = _sample_beta(alpha, (), x, generator)  # 0-d tensor: no host sync
    perm = _randperm(x.shape[0], x, generator)
    return torch.lerp(x[perm], x, lam), torch.lerp(soft[perm], soft, lam)


def cutmix(x: Tensor, targets: Tensor, alpha: float, num_classes: int,
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """CutMix (Yun et al., 2019): paste one box from a permuted batch into every image.

    The box has area ~ (1 - lam) with lam ~ Beta(alpha, alpha), a uniform centre, and is clipped at the
    border; lam is then corrected to the share of pixels actually kept, so targets match the pixels.
    """
    x = _as_batch(x)
    soft = _soft_targets(targets.to(x.device), num_classes)  # (B, K)
    height, width = x.shape[-2:]
    lam = _sample_beta(alpha, (), x, generator)
    perm = _randperm(x.shape[0], x, generator)
    cut_ratio = torch.sqrt(1 - lam)
    half_h, half_w = torch.floor(height * cut_ratio) // 2, torch.floor(width * cut_ratio) // 2
    centre_y = torch.floor(_uniform((), x, generator) * height)
    centre_x = torch.floor(_uniform((), x, generator) * width)
    top, bottom = (centre_y - half_h).clamp(0, height), (centre_y + half_h).clamp(0, height)
    left, right = (centre_x - half_w).clamp(0, width), (centre_x + half_w).clamp(0, width)
    rows = torch.arange(height, device=x.device)[:, None]  # (H, 1)
    cols = torch.arange(width, device=x.device)[None, :]  # (1, W)
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # (H, W)
    mixed = torch.where(box, x[perm], x)
    lam = 1 - (bottom - top) * (right - left) / (height * width)  # share of pixels still from x
    return mixed, torch.lerp(soft[perm], soft, lam)
