"""Losses for self-supervised pretraining."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reprlab import distributed


def nt_xent_loss(z0: Tensor, z1: Tensor, temperature: float = 0.5, gather: bool = True) -> Tensor:
    """NT-Xent (Chen et al., 2020): each of the 2N views has one positive and 2N-2 negatives.

    z0, z1: (n, D) projections of two views of the same n images on this rank. Under DDP (and ``gather``) the
    keys are gathered from every rank with gradient and the loss covers this rank's anchors only, so DDP's
    averaging reproduces the single-process gradient on the global batch. Returns the mean over anchors.
    """
    n = z0.shape[0]
    anchors = F.normalize(torch.cat([z0, z1]), dim=1)  # (2n, D)
    if gather and distributed.world_size() > 1:
        rank, world = distributed.rank(), distributed.world_size()
        k0 = distributed.gather_with_grad(anchors[:n])  # (N, D), N = world * n
        k1 = distributed.gather_with_grad(anchors[n:])
        keys = torch.cat([k0, k1])  # (2N, D): all first views, then all second views
    else:
        rank, world, keys = 0, 1, anchors
    big_n = n * world
    local = torch.arange(n, device=z0.device) + rank * n
    self_index = torch.cat([local, local + big_n])  # column of each anchor in `keys`
    positive = torch.cat([local + big_n, local])  # the other view of the same image
    logits = anchors @ keys.T / temperature  # (2n, 2N)
    # mask the self-similarity: it is neither a positive nor a negative (never subtract a constant, pitfall 1)
    logits = logits.masked_fill(F.one_hot(self_index, 2 * big_n).bool(), float("-inf"))
    return F.cross_entropy(logits, positive)
