"""Label-free representation quality: alignment, uniformity, effective rank, collapse.

Alignment and uniformity: Wang & Isola (2020), "Understanding Contrastive Representation Learning through
Alignment and Uniformity on the Hypersphere". Effective rank: RankMe, Garrido et al. (2023).
Embedding std as a collapse monitor: per-dimension std of L2-normalised embeddings (SimSiam, Chen & He 2021).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reprlab.evaluate.knn import as_tensor, normalize_features


def alignment(z1: Tensor | np.ndarray, z2: Tensor | np.ndarray, alpha: float = 2.0) -> float:
    """Mean ||f(x) - f(y)||^alpha over positive pairs (row i of z1 with row i of z2), L2-normalised; 0 is
    perfect alignment, 4 (alpha=2) antipodal."""
    z1, z2 = normalize_features(z1), normalize_features(z2)
    if z1.shape != z2.shape:
        raise ValueError(
            f"the two views must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    return float((z1 - z2).norm(dim=1).pow(alpha).mean())


def uniformity(z: Tensor | np.ndarray, t: float = 2.0) -> float:
    """log mean exp(-t ||f(x) - f(y)||^2) over distinct pairs of L2-normalised rows; lower is more uniform
    (0 for a collapsed set, about -4 for t=2 on a high-dimensional sphere). Memory: N(N-1)/2 distances."""
    z = normalize_features(z)
    if z.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 samples, got {z.shape[0]}")
    sq_dist = torch.pdist(z.double(), p=2).pow(2)  # (N(N-1)/2,) distinct pairs i < j
    return float(torch.logsumexp(-t * sq_dist, dim=0) - math.log(sq_dist.numel()))


def effective_rank(z: Tensor | np.ndarray, eps: float = 1e-7) -> float:
    """RankMe: exp of the entropy of the singular values of z (N, D) normalised to sum 1 (plus eps), in
    [1, min(N, D)]. Computed on the raw embeddings, as in the paper."""
    z = as_tensor(z)
    singular_values = torch.linalg.svdvals(z.detach().double())  # (min(N, D),)
    p = singular_values / (singular_values.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def embedding_std(z: Tensor | np.ndarray) -> float:
    """Mean over dimensions of the std of L2-normalised embeddings: 0 when collapsed to one point, about
    1 / sqrt(D) for well-spread (isotropic) embeddings."""
    z = normalize_features(z)
    if z.shape[0] < 2:
        raise ValueError(f"embedding_std needs at least 2 samples, got {z.shape[0]}")
    return float(z.std(dim=0).mean())


def mean_cosine(z: Tensor) -> Tensor:
    """Mean cosine similarity over the distinct pairs of rows of z (N, D), as a 0-dim tensor (a per-step signal
    the loop logs without a host sync): 1 when every row points the same way (collapsed to one ray, even where
    the norms differ), about 0 for well-spread rows. O(N * D): the norm of the sum of the unit rows."""
    if z.shape[0] < 2:
        raise ValueError(f"mean_cosine needs at least 2 samples, got {z.shape[0]}")
    unit = normalize_features(z.detach())
    total, n = unit.sum(dim=0), unit.shape[0]
    return (total @ total - n) / (n * (n - 1))  # sum over all pairs minus the n self-pairs of cosine 1


def quality_report(
    z: Tensor | np.ndarray,
    z_other_view: Tensor | np.ndarray | None = None,
    max_uniformity_samples: int = 4096,
    seed: int = 0,
) -> dict[str, Any]:
    """All label-free metrics of embeddings z (N, D); alignment too when a second view is given.

    Uniformity is O(N^2): it uses a fixed random subset of ``max_uniformity_samples`` rows (seeded).
    ``embedding_std_isotropic`` = 1 / sqrt(D) is the reference value for healthy embeddings.
    """
    z = as_tensor(z).detach()
    num_samples, dim = z.shape
    subset = z
    if num_samples > max_uniformity_samples:
        generator = torch.Generator().manual_seed(seed)
        subset = z[torch.randperm(num_samples, generator=generator)[:max_uniformity_samples].to(z.device)]
    report: dict[str, Any] = {
        "num_samples": num_samples,
        "dim": dim,
        "uniformity": uniformity(subset),
        "effective_rank": effective_rank(z),
        "embedding_std": embedding_std(z),
        "embedding_std_isotropic": 1.0 / math.sqrt(dim),
    }
    if z_other_view is not None:
        report["alignment"] = alignment(z, z_other_view)
    return report
