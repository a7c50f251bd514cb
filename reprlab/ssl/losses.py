"""Losses for self-supervised pretraining.

Contrastive: NT-Xent (SimCLR), InfoNCE against a queue (MoCo v2) and in-batch (MoCo v3). Predictive: BYOL's
normalized MSE, SimSiam's negative cosine, DINO's cross-entropy to a centred, sharpened teacher. Redundancy
reduction: Barlow Twins, VICReg. (Pixel reconstruction for the autoencoders: reprlab.ssl.reconstruction.)

Every loss runs outside autocast in float32 or wider (NT-Xent always in float32, the others
keep float64 inputs in float64, which their tests use). Each is either this rank's mean of a per-sample loss
(DDP's gradient averaging then makes it the global mean), or uses statistics of the *global* batch (NT-Xent's
and MoCo v3's keys, Barlow Twins' correlation, VICReg's variance and covariance) reduced across ranks so that 2
ranks with n samples each give the loss and gradients of 1 process with 2n; ``gather=False``
computes the per-rank loss instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from reprlab import distributed

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


# --------------------------------------------------------------------------------------------- shared helpers


def _wide(x: Tensor) -> Tensor:
    """Half precision up to float32 (softmax, statistics and temperatures need it); float32/64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_pair(a: Tensor, b: Tensor, names: str = "z0 and z1") -> None:
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"{names} must both be (n, D), got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_positive(value: float, name: str) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _global_sum(tensor: Tensor, gather: bool) -> Tensor:
    """Sum over ranks with gradient (identity on one process or with ``gather=False``)."""
    return distributed.all_reduce_sum_with_grad(tensor) if gather else tensor


def _off_diagonal(matrix: Tensor) -> Tensor:
    """The d * (d - 1) off-diagonal entries of a square (d, d) matrix, flattened."""
    d = matrix.shape[0]
    return matrix.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


# ------------------------------------------------------------------------ contrastive with momentum keys (MoCo)


def infonce_queue_logits(query: Tensor, key: Tensor, queue: Tensor,
                      temperature: float = 0.2) -> tuple[Tensor, Tensor]:
    """MoCo's logits (n, 1 + K): the positive key in column 0, then the K queued negatives (He et al., 2020).

    query: (n, D) online-encoder embeddings; key: (n, D) momentum-encoder embeddings of the other view of the
    same images, detached here (keys get no gradient); queue: (K, D) negative keys, e.g.
    :attr:`reprlab.ssl.queue.MemoryQueue.queue`. All three are L2-normalized here, so what is enqueued need not
    be. The product saves a normalized *copy* of the queue for backward, so enqueueing the current keys (in place)
    between this forward and the backward is safe. No gather: each query's negatives are the (already global)
    queue, and DDP's gradient averaging turns this rank's mean into the global mean.
    Returns (logits, positive) with positive = zeros (n,), the column of each query's positive.
    """
    _check_pair(query, key, "query and key")
    if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"queue must be (K, D) with D = {query.shape[1]}, got {tuple(queue.shape)}")
    _check_positive(temperature, "temperature")
    with torch.autocast(query.device.type, enabled=False):
        q = F.normalize(_wide(query), dim=1)  # (n, D)
        k = F.normalize(_wide(key.detach()), dim=1).to(q.dtype)  # (n, D)
        negatives = F.normalize(queue.detach().to(q.dtype), dim=1)  # (K, D), a copy: the buffer may change
        positive_logit = (q * k).sum(dim=1, keepdim=True)  # (n, 1)
        logits = torch.cat([positive_logit, q @ negatives.T], dim=1) / temperature  # (n, 1 + K)
    return logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device)


def infonce_queue_loss(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """InfoNCE against a queue of negatives, MoCo v1/v2 (He et al., 2020; Chen et al., 2020: temperature 0.2).

    Mean over this rank's n queries of -log softmax(logits)[positive], logits from :func:`infonce_queue_logits`.
    One direction; the symmetric variant (MoCo v2+, solo-learn) is the method's sum of both directions."""
    logits, positive = infonce_queue_logits(query, key, queue, temperature)
    return F.cross_entropy(logits, positive)


def moco_v3_logits(query: Tensor, key: Tensor, temperature: float = 1.0,
                   gather: bool = True) -> tuple[Tensor, Tensor]:
    """MoCo v3's logits (n, N): each local query against the keys of the global batch (Chen, Xie & He, 2021).

    query: (n, D) online embeddings (after the predictor); key: (n, D) momentum-encoder embeddings of the other
    view, detached here and gathered from every rank *without* gradient (``distributed.all_gather``; N = n * world
    size), as the reference does: the keys are constants, so only the query side needs an exact gradient.
    Returns (logits, positive), positive (n,) = rank * n + i, the column of each query's own key.
    """
    _check_pair(query, key, "query and key")
    _check_positive(temperature, "temperature")
    n = query.shape[0]
    with torch.autocast(query.device.type, enabled=False):
        q = F.normalize(_wide(query), dim=1)  # (n, D)
        k = F.normalize(_wide(key.detach()), dim=1).to(q.dtype)  # (n, D)
        rank = 0
        if gather and distributed.world_size() > 1:
            k, rank = distributed.all_gather(k), distributed.rank()  # (N, D), rank-major
        logits = q @ k.T / temperature  # (n, N)
    return logits, torch.arange(n, device=query.device) + rank * n


def moco_v3_loss(query: Tensor, key: Tensor, temperature: float = 1.0, gather: bool = True) -> Tensor:
    """MoCo v3's in-batch InfoNCE (Chen, Xie & He, 2021), scaled by 2 * temperature as the reference does.

    Cross-entropy of :func:`moco_v3_logits`, mean over this rank's queries, times ``2 * temperature`` (the
    reference's scaling, which keeps the gradient's size independent of the temperature). One direction: the
    method returns ``moco_v3_loss(q1, k2) + moco_v3_loss(q2, k1)``. ``temperature`` 1.0 is the reference's
    default (its ResNet-50 recipe); its ViT recipes use 0.2.
    """
    logits, positive = moco_v3_logits(query, key, temperature, gather)
    return F.cross_entropy(logits, positive) * (2 * temperature)


# ----------------------------------------------------------------------------------- predictive (BYOL, SimSiam)


def _cosine(p: Tensor, z: Tensor) -> Tensor:
    """(n,) cosine of each prediction with its detached target, in float32 or wider outside autocast."""
    _check_pair(p, z, "p and z")
    with torch.autocast(p.device.type, enabled=False):
        p = F.normalize(_wide(p), dim=1)
        z = F.normalize(_wide(z.detach()), dim=1).to(p.dtype)
        return (p * z).sum(dim=1)


def negative_cosine_loss(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)) (Chen & He, 2021), mean over the batch; in [-1, 1].

    p: (n, D) predictor outputs for one view; z: (n, D) projections of the other view. The stop-gradient is
    *inside*: z is detached here, so no caller can forget it (SimSiam collapses without it), and the same holds
    for :func:`normalized_mse_loss`. Symmetrizing (SimSiam: D(p1, z2) / 2 + D(p2, z1) / 2) is the method's. A
    per-sample loss: under DDP this rank's mean, averaged by DDP, is the global mean; nothing to gather.
    """
    return -_cosine(p, z).mean()


def normalized_mse_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's ||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, stopgrad(z)) (Grill et al., 2020), mean over the batch; in [0, 4].

    p: (n, D) online predictions; z: (n, D) target-network projections of the other view, detached here (as in
    :func:`negative_cosine_loss`, whose gradient this is twice). BYOL's loss is the sum of both directions,
    ``normalized_mse_loss(p1, z2) + normalized_mse_loss(p2, z1)``: that sum is the method's.
    """
    return (2 - 2 * _cosine(p, z)).mean()


# ------------------------------------------------------------------------- redundancy reduction (Barlow, VICReg)


def _standardize(z: Tensor, gather: bool, eps: float) -> tuple[Tensor, Tensor]:
    """((z - mean) / sqrt(var + eps), N): mean and biased variance per dimension over the global batch of N."""
    local = torch.cat([z.sum(dim=0), z.new_tensor([z.shape[0]])])  # (D + 1,) sums and count
    total = _global_sum(local, gather)
    count = total[-1].detach()
    centered = z - total[:-1] / count  # (n, D)
    variance = _global_sum(centered.square().sum(dim=0), gather) / count  # (D,) biased, as BatchNorm normalizes
    return centered * torch.rsqrt(variance + eps), count


def cross_correlation(z0: Tensor, z1: Tensor, gather: bool = True, eps: float = 1e-5) -> Tensor:
    """Barlow Twins' cross-correlation C (D, D) over the global batch (Zbontar et al., 2021).

    Each dimension of z0 and z1 (n, D) is standardized with the mean and biased variance of the global batch
    (N = all ranks' samples; eps 1e-5): what the reference gets from ``BatchNorm1d(affine=False)`` in training mode
    under SyncBatchNorm. Then C = sum over the global batch of zn0_b^T zn1_b, divided by N. Every reduction is a
    sum over ranks *with* gradient; the reference all-reduces C with a plain ``dist.all_reduce``, which leaves its
    gradient at 1/world_size of the single-process one (lightly #1977), while this one matches it exactly.
    """
    _check_pair(z0, z1)
    with torch.autocast(z0.device.type, enabled=False):
        zn0, count = _standardize(_wide(z0), gather, eps)
        zn1, _ = _standardize(_wide(z1), gather, eps)
        return _global_sum(zn0.T @ zn1, gather) / count  # (D, D)


def barlow_twins_loss(z0: Tensor, z1: Tensor, lambda_offdiag: float = 5e-3, gather: bool = True) -> Tensor:
    """Barlow Twins (Zbontar et al., 2021): sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2.

    z0, z1: (n, D) projections of two views, *without* a final BatchNorm (the standardization is done here, see
    :func:`cross_correlation`). The same value on every rank (a statistic of the global batch). lambda_offdiag
    5e-3 is the paper's; the reference code's default is 0.0051.
    """
    c = cross_correlation(z0, z1, gather)
    return (torch.diagonal(c) - 1).square().sum() + lambda_offdiag * _off_diagonal(c).square().sum()


def vicreg_terms(z0: Tensor, z1: Tensor, gather: bool = True, eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """VICReg's (invariance, variance, covariance) terms, unweighted (Bardes, Ponce & LeCun, 2022).

    invariance: mean squared error between z0 and z1 (n, D) over this rank's samples (DDP's averaging makes it
    the global mean, as in the reference). variance and covariance are statistics of the global batch: z0 and z1
    are gathered from every rank with gradient (the reference's ``FullGatherLayer``, N = all ranks' samples):
    variance = mean_j relu(1 - sqrt(Var_j + eps)) with the unbiased variance, averaged over the two branches;
    covariance = sum_{i != j} Cov_ij^2 / D with Cov = zc^T zc / (N - 1), summed over the two branches.
    """
    _check_pair(z0, z1)
    with torch.autocast(z0.device.type, enabled=False):
        z0, z1 = _wide(z0), _wide(z1)
        invariance = F.mse_loss(z0, z1)
        variance, covariance = z0.new_zeros(()), z0.new_zeros(())
        for z in (z0, z1):
            z = distributed.gather_with_grad(z) if gather else z  # (N, D)
            if z.shape[0] < 2:
                raise ValueError(f"VICReg's variance needs a global batch of at least 2, got {z.shape[0]}")
            z = z - z.mean(dim=0)
            std = torch.sqrt(z.var(dim=0) + eps)  # (D,) unbiased
            variance = variance + F.relu(1 - std).mean() / 2
            cov = z.T @ z / (z.shape[0] - 1)  # (D, D)
            covariance = covariance + _off_diagonal(cov).square().sum() / z.shape[1]
    return invariance, variance, covariance


def vicreg_loss(z0: Tensor, z1: Tensor, invariance_weight: float = 25.0, variance_weight: float = 25.0,
                covariance_weight: float = 1.0, gather: bool = True) -> Tensor:
    """VICReg (Bardes, Ponce & LeCun, 2022): the weighted sum of :func:`vicreg_terms` (paper: 25, 25, 1)."""
    invariance, variance, covariance = vicreg_terms(z0, z1, gather)
    return invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance


# --------------------------------------------------------------------------------------------- DINO


def dino_loss(student_out: Sequence[Tensor], teacher_out: Sequence[Tensor], center: Tensor, teacher_temp: float,
              student_temp: float = 0.1) -> Tensor:
    """DINO's multi-crop cross-entropy between a centred, sharpened teacher and the student (Caron et al., 2021).

    student_out: one (n, K) tensor of head outputs (logits) per crop, the global crops first, in the same order
    as teacher_out, which holds the teacher's (n, K) outputs for the global crops only (usually 2). Every student
    crop is compared with every teacher crop except the same view: sum_k -P_t log P_s per sample, with
    P_t = softmax((teacher - center) / teacher_temp), detached (the teacher gets no gradient), and
    P_s = softmax(student / student_temp); mean over samples, then over the pairs. center: (K,) or (1, K).
    Call :func:`update_center` *after* this, with the same teacher outputs (the reference's order).
    """
    if not teacher_out or len(student_out) < len(teacher_out):
        raise ValueError(f"need teacher outputs for the global crops and student outputs for at least as many "
                         f"crops (global first), got {len(teacher_out)} teacher and {len(student_out)} student")
    if len(student_out) == 1:
        raise ValueError("one crop has no pair of different views; DINO needs at least 2 crops")
    shape = teacher_out[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in [*teacher_out, *student_out]):
        raise ValueError(f"every crop's output must be the same (n, K), got "
                         f"{[tuple(t.shape) for t in student_out]} student, {[tuple(t.shape) for t in teacher_out]} "
                         f"teacher")
    _check_positive(teacher_temp, "teacher_temp")
    _check_positive(student_temp, "student_temp")
    with torch.autocast(teacher_out[0].device.type, enabled=False):
        center = _wide(center.detach()).reshape(1, -1)  # (1, K)
        targets = [F.softmax((_wide(t.detach()) - center) / teacher_temp, dim=1) for t in teacher_out]  # (n, K)
        log_probs = [F.log_softmax(_wide(s) / student_temp, dim=1) for s in student_out]  # (n, K)
        terms = [(-target * log_probs[v]).sum(dim=1).mean()
                 for i, target in enumerate(targets) for v in range(len(log_probs)) if v != i]
    return torch.stack(terms).mean()


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor | Sequence[Tensor], momentum: float = 0.9) -> Tensor:
    """DINO's centre EMA, in place (Caron et al., 2021): center = momentum * center + (1 - momentum) * mean.

    mean: the teacher outputs' mean over the global batch (every crop in teacher_out, all ranks: the sums and
    counts are all-reduced). center: (K,) or (1, K), e.g. a registered buffer, so it is saved and resumed; it
    is updated in place and returned.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    outputs = torch.cat(list(teacher_out)) if not isinstance(teacher_out, Tensor) else teacher_out  # (B, K)
    if outputs.ndim != 2 or outputs.shape[1] != center.numel():
        raise ValueError(f"teacher outputs must be (B, K) with K = {center.numel()}, got {tuple(outputs.shape)}")
    outputs = _wide(outputs.detach())
    stats = torch.cat([outputs.sum(dim=0), outputs.new_tensor([outputs.shape[0]])])  # (K + 1,) sums and count
    stats = distributed.all_reduce_mean(stats)  # the 1 / world_size cancels in sums / count
    batch_center = (stats[:-1] / stats[-1]).to(center.dtype).view_as(center)
    return center.mul_(momentum).add_(batch_center, alpha=1 - momentum)


def dino_teacher_temperature(epoch: int, warmup_epochs: int = 30, start: float = 0.04,
                             final: float = 0.07) -> float:
    """DINO's teacher temperature at ``epoch`` (0-based; Caron et al., 2021): linear warmup, then constant.

    Exactly the reference's ``np.linspace(start, final, warmup_epochs)`` followed by ``final``: epoch e <
    warmup_epochs gets start + (final - start) * e / (warmup_epochs - 1), so the last warmup epoch already
    reaches ``final``; warmup_epochs 0 is constant ``final`` (the reference's default is 0.04 with no warmup; its
    recommended ViT recipe is 0.04 -> 0.07 over 30 epochs).
    """
    if epoch < 0 or warmup_epochs < 0:
        raise ValueError(f"epoch and warmup_epochs must be >= 0, got {epoch} and {warmup_epochs}")
    if epoch >= warmup_epochs:
        return final
    if warmup_epochs == 1:
        return start
    return start + (final - start) * epoch / (warmup_epochs - 1)
