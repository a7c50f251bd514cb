"""Tests for reprlab.ssl.losses (NT-Xent, MoCo v2/v3, BYOL, SimSiam, Barlow Twins, VICReg, DINO, reconstruction)
and the SimCLR projection head."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reprlab.models.heads import projection_head
from reprlab.ssl.losses import (
    barlow_twins_loss,
    cross_correlation,
    dino_loss,
    dino_teacher_temperature,
    infonce_queue_logits,
    infonce_queue_loss,
    moco_v3_logits,
    moco_v3_loss,
    negative_cosine_loss,
    normalized_mse_loss,
    nt_xent_accuracy,
    nt_xent_logits,
    nt_xent_loss,
    update_center,
    vicreg_loss,
    vicreg_terms,
)
from reprlab.ssl.queue import MemoryQueue
from reprlab.ssl.reconstruction import normalize_patches, patchify, reconstruction_loss, unpatchify

# ---------------------------------------------------------------------------------------------------- NT-Xent


def brute_force_nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """The paper's definition, one anchor and one key at a time: l(i, j) = -log(exp(s_ij / t) /
    sum_{k != i} exp(s_ik / t)), averaged over the 2N anchors, s = cosine similarity."""
    views = [*z0, *z1]
    n = len(z0)
    total = torch.zeros((), dtype=z0.dtype)
    for i, anchor in enumerate(views):
        positive = (i + n) % (2 * n)
        denominator = torch.zeros((), dtype=z0.dtype)
        for k, key in enumerate(views):
            if k != i:
                cosine = torch.dot(anchor, key) / (anchor.norm() * key.norm())
                denominator = denominator + torch.exp(cosine / temperature)
        cosine = torch.dot(anchor, views[positive]) / (anchor.norm() * views[positive].norm())
        total = total - torch.log(torch.exp(cosine / temperature) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("n, dim, temperature, seed", [(1, 3, 0.5, 0), (4, 7, 0.5, 1), (5, 3, 0.1, 2),
                                                        (3, 16, 1.0, 3)])
def test_nt_xent_matches_brute_force_values_and_gradients(n, dim, temperature, seed):
    generator = torch.Generator().manual_seed(seed)
    z0 = (torch.randn(n, dim, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    z1 = (torch.randn(n, dim, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    # nt_xent_loss works in float32 (autocast-safe); compare it in float32 against a float64 reference
    loss = nt_xent_loss(z0.float(), z1.float(), temperature)
    reference = brute_force_nt_xent(z0, z1, temperature)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    grad0, grad1 = torch.autograd.grad(loss, (z0, z1))
    ref0, ref1 = torch.autograd.grad(reference, (z0, z1))
    torch.testing.assert_close(grad0, ref0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad1, ref1, rtol=1e-4, atol=1e-6)


def test_nt_xent_has_2n_minus_2_negatives_and_masks_self():
    n = 4
    z0, z1 = torch.randn(n, 5), torch.randn(n, 5)
    logits, positive = nt_xent_logits(z0, z1, temperature=0.5)
    assert logits.shape == (2 * n, 2 * n)
    assert torch.isneginf(logits.diagonal()).all()  # self masked, not a negative
    finite = torch.isfinite(logits).sum(dim=1)
    assert (finite == 2 * n - 1).all()  # 1 positive + 2N - 2 negatives per anchor
    assert positive.tolist() == [4, 5, 6, 7, 0, 1, 2, 3]


def test_nt_xent_is_scale_invariant_and_perfect_pairs_give_low_loss():
    z0 = torch.randn(6, 8)
    loss = nt_xent_loss(z0, z0 + 1e-3, temperature=0.1)
    rescaled = nt_xent_loss(5 * z0, 0.2 * (z0 + 1e-3), temperature=0.1)
    assert rescaled.item() == pytest.approx(loss.item(), rel=1e-4)
    logits, positive = nt_xent_logits(z0, z0 + 1e-3, temperature=0.1)
    assert nt_xent_accuracy(logits, positive).item() == 1.0
    # identical views with orthogonal images: the loss is log(1 + (2N - 2) exp(-1/t)) exactly
    eye = torch.eye(3)
    expected = math.log(1 + 4 * math.exp(-1 / 0.5))
    assert nt_xent_loss(eye, eye, temperature=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="z0 and z1"):
        nt_xent_loss(torch.randn(2, 3), torch.randn(3, 3))


def test_nt_xent_under_bf16_autocast_is_computed_in_float32():
    z0, z1 = torch.randn(4, 8), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent_loss(z0, z1, temperature=0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(nt_xent_loss(z0, z1, temperature=0.1).item(), rel=1e-6)


# -------------------------------------------------------------------------------------------- projection head


def _layer_list(head: nn.Sequential) -> list[tuple]:
    out = []
    for layer in head:
        if isinstance(layer, nn.Linear):
            out.append(("Linear", layer.in_features, layer.out_features, layer.bias is not None))
        elif isinstance(layer, nn.BatchNorm1d):
            out.append(("BN", layer.num_features))
        else:
            out.append((type(layer).__name__,))
    return out


def test_projection_head_default_is_simclr_v1():
    head = projection_head(512, 2048, 128)
    assert _layer_list(head) == [("Linear", 512, 2048, False), ("BN", 2048), ("ReLU",),
                                 ("Linear", 2048, 128, False), ("BN", 128)]


def test_projection_head_variants():
    assert _layer_list(projection_head(16, 32, 8, num_layers=3)) == [
        ("Linear", 16, 32, False), ("BN", 32), ("ReLU",), ("Linear", 32, 32, False), ("BN", 32), ("ReLU",),
        ("Linear", 32, 8, False), ("BN", 8)]
    assert _layer_list(projection_head(16, 32, 8, output_bn=False)) == [
        ("Linear", 16, 32, False), ("BN", 32), ("ReLU",), ("Linear", 32, 8, True)]
    assert _layer_list(projection_head(16, 32, 8, batch_norm=False)) == [
        ("Linear", 16, 32, True), ("ReLU",), ("Linear", 32, 8, True)]
    with pytest.raises(ValueError, match="num_layers"):
        projection_head(16, 32, 8, num_layers=0)


# --------------------------------------------------------------------------------------------- reconstruction


def test_patchify_round_trip_and_layout():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    patches = patchify(images, 2)  # (2, 6, 12)
    assert patches.shape == (2, 6, 12)
    # patch 1 is rows 0-1, columns 2-3; values are (row, col, channel) ordered
    expected = images[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(patches[0, 1], expected)
    torch.testing.assert_close(unpatchify(patches, 2, 3, 4, 6), images)
    with pytest.raises(ValueError, match="divisible"):
        patchify(images, 4)


def brute_force_masked_mse(prediction, target, patch_size, mask):
    """Mean squared error over every pixel value of every hidden patch, by explicit loops."""
    total, count = 0.0, 0
    batch, channels, height, width = target.shape
    cols = width // patch_size
    for b in range(batch):
        for index in range(mask.shape[1]):
            if not mask[b, index]:
                continue
            r, c = divmod(index, cols)
            rows = slice(r * patch_size, (r + 1) * patch_size)
            columns = slice(c * patch_size, (c + 1) * patch_size)
            diff = prediction[b, :, rows, columns] - target[b, :, rows, columns]
            total += float((diff**2).sum())
            count += diff.numel()
    return total / count


def test_masked_reconstruction_loss_matches_loops_and_ignores_visible_pixels():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.rand(3, 2, 8, 8, generator=generator)
    target = torch.rand(3, 2, 8, 8, generator=generator)
    mask = torch.rand(3, 16, generator=generator) < 0.5
    mask[0, 0] = True
    loss = reconstruction_loss(prediction, target, patch_size=2, mask=mask)
    assert loss.item() == pytest.approx(brute_force_masked_mse(prediction, target, 2, mask), rel=1e-5)
    # change the prediction on visible pixels only: the loss must not move
    visible = ~mask.view(3, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
    changed = torch.where(visible, prediction + 10.0, prediction)
    assert reconstruction_loss(changed, target, patch_size=2, mask=mask).item() == pytest.approx(loss.item())
    # ... and on a hidden pixel it must
    hidden_changed = torch.where(~visible, prediction + 1.0, prediction)
    assert reconstruction_loss(hidden_changed, target, patch_size=2, mask=mask).item() > loss.item() + 0.1


def test_reconstruction_loss_l1_mse_and_normalized_target():
    prediction, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])
    assert reconstruction_loss(prediction, target, loss="l1").item() == pytest.approx(4.0)
    assert reconstruction_loss(prediction, target, loss="mse").item() == pytest.approx((1 + 9 + 25 + 49) / 4)
    # one 2x2 patch: normalized target = (x - 4) / sqrt(5), so predicting it exactly gives zero loss
    normalized = ((target - 4.0) / math.sqrt(5.0 + 1e-6))
    assert reconstruction_loss(normalized, target, patch_size=2, normalize_target=True).item() < 1e-10
    patches, mean, std = normalize_patches(patchify(target, 2))
    torch.testing.assert_close(patches * std + mean, patchify(target, 2))
    with pytest.raises(ValueError, match="unknown reconstruction loss"):
        reconstruction_loss(prediction, target, loss="huber")
    with pytest.raises(ValueError, match="patch_size >= 2"):
        reconstruction_loss(prediction, target, patch_size=1, normalize_target=True)


# ----------------------------------------------------------------- losses for MoCo, BYOL, SimSiam, Barlow, VICReg, DINO
# Each against a slow reference written from the paper's definition with explicit loops (float64), values and
# gradients (torch.autograd.grad) over a few random inputs. The 2-rank == 1-process checks of the global-batch losses
# are in test_distributed_losses.py.

TIGHT = {"rtol": 1e-7, "atol": 1e-10}  # float64 on both sides: only the summation order differs


def _random(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).requires_grad_()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a, b) / (a.norm() * b.norm())


def _assert_same_values_and_gradients(loss, reference, inputs):
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, reference, **TIGHT)
    for got, want in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(reference, inputs)):
        torch.testing.assert_close(got, want, **TIGHT)


# --- BYOL / SimSiam


def loop_negative_cosine(p, z):
    """SimSiam's D(p, stopgrad(z)) = -p/|p| . z/|z|, averaged over samples one at a time."""
    return sum(-_cos(p[i], z[i].detach()) for i in range(len(p))) / len(p)


def loop_normalized_mse(p, z):
    """BYOL's || p/|p| - z/|z| ||^2 (the squared distance, not the 2 - 2 cos identity), one sample at a time."""
    total = 0
    for i in range(len(p)):
        target = z[i].detach()
        total = total + ((p[i] / p[i].norm() - target / target.norm()) ** 2).sum()
    return total / len(p)


@pytest.mark.parametrize("n, dim, seed", [(1, 3, 0), (5, 4, 1), (8, 16, 2)])
def test_negative_cosine_and_normalized_mse_match_loops_and_stop_the_target_gradient(n, dim, seed):
    p, z = _random(seed, n, dim, scale=3.0), _random(seed + 100, n, dim)
    _assert_same_values_and_gradients(negative_cosine_loss(p, z), loop_negative_cosine(p, z), (p,))
    _assert_same_values_and_gradients(normalized_mse_loss(p, z), loop_normalized_mse(p, z), (p,))
    # the stop-gradient is inside: z receives no gradient from either loss
    for loss_fn in (negative_cosine_loss, normalized_mse_loss):
        assert torch.autograd.grad(loss_fn(p, z), (p, z), allow_unused=True)[1] is None
    # 2 - 2 cos: BYOL's value and gradient are an affine map of SimSiam's
    torch.testing.assert_close(normalized_mse_loss(p, z), 2 + 2 * negative_cosine_loss(p, z), **TIGHT)
    torch.testing.assert_close(torch.autograd.grad(normalized_mse_loss(p, z), p)[0],
                               2 * torch.autograd.grad(negative_cosine_loss(p, z), p)[0], **TIGHT)


def test_cosine_losses_extremes_and_errors():
    z = torch.randn(4, 6)
    assert negative_cosine_loss(3 * z, z).item() == pytest.approx(-1.0, abs=1e-6)
    assert normalized_mse_loss(-z, z).item() == pytest.approx(4.0, abs=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert negative_cosine_loss(z.bfloat16(), z.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="p and z"):
        negative_cosine_loss(torch.randn(4, 6), torch.randn(4, 5))


# --- MoCo v2 (queue) and MoCo v3 (in-batch)


def loop_infonce(queries, keys, negatives_of, temperature):
    """-log(exp(s_pos / t) / (exp(s_pos / t) + sum_neg exp(s_neg / t))) per query, s = cosine, averaged."""
    total = 0
    for i, query in enumerate(queries):
        positive = torch.exp(_cos(query, keys[i].detach()) / temperature)
        denominator = positive + sum(torch.exp(_cos(query, neg) / temperature) for neg in negatives_of(i))
        total = total - torch.log(positive / denominator)
    return total / len(queries)


@pytest.mark.parametrize("n, dim, queue_size, temperature, seed", [(1, 3, 1, 0.2, 0), (4, 5, 7, 0.2, 1),
                                                                    (6, 8, 32, 0.07, 2), (3, 4, 5, 1.0, 3)])
def test_infonce_queue_matches_loops(n, dim, queue_size, temperature, seed):
    query, key, queue = _random(seed, n, dim, scale=2.0), _random(seed + 1, n, dim), _random(seed + 2, queue_size, dim)
    queue = queue.detach()
    loss = infonce_queue_loss(query, key, queue, temperature)
    reference = loop_infonce(query, key, lambda i: list(queue), temperature)
    _assert_same_values_and_gradients(loss, reference, (query,))
    assert torch.autograd.grad(infonce_queue_loss(query, key, queue), (query, key), allow_unused=True)[1] is None
    logits, positive = infonce_queue_logits(query, key, queue, temperature)
    assert logits.shape == (n, 1 + queue_size) and positive.tolist() == [0] * n


def test_infonce_queue_survives_enqueueing_before_backward():
    """MoCo's order: logits with the current queue, enqueue this step's keys, then backward."""
    queue = MemoryQueue(8, 4)
    query, key = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4)
    before = query.detach().clone()
    loss = infonce_queue_loss(query, key, queue.queue)
    expected = torch.autograd.grad(infonce_queue_loss(before.requires_grad_(), key, queue.queue.clone()), before)[0]
    queue.enqueue(key)
    loss.backward()  # would raise if the product had saved the buffer itself
    torch.testing.assert_close(query.grad, expected)


@pytest.mark.parametrize("n, dim, temperature, seed", [(1, 3, 1.0, 0), (4, 5, 0.2, 1), (7, 8, 1.0, 2),
                                                        (3, 4, 0.5, 3)])
def test_moco_v3_matches_loops_with_the_2t_scaling(n, dim, temperature, seed):
    query, key = _random(seed, n, dim, scale=2.0), _random(seed + 1, n, dim)
    loss = moco_v3_loss(query, key, temperature)
    reference = 2 * temperature * loop_infonce(query, key, lambda i: [k for j, k in enumerate(key) if j != i],
                                               temperature)
    _assert_same_values_and_gradients(loss, reference, (query,))
    logits, positive = moco_v3_logits(query, key, temperature)
    assert logits.shape == (n, n) and positive.tolist() == list(range(n))
    assert torch.autograd.grad(moco_v3_loss(query, key), (query, key), allow_unused=True)[1] is None


def test_moco_v3_closed_form_on_orthogonal_pairs():
    # q = k = e_i: logits 1/t on the diagonal, 0 elsewhere
    eye, t = torch.eye(4, dtype=torch.float64), 0.2
    expected = 2 * t * (-1 / t + math.log(math.exp(1 / t) + 3))
    assert moco_v3_loss(eye, eye, temperature=t).item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        moco_v3_loss(eye, eye, temperature=0.0)
    with pytest.raises(ValueError, match="queue must be"):
        infonce_queue_loss(eye, eye, torch.randn(5, 3))


# --- Barlow Twins


def loop_barlow_twins(z0, z1, lambda_offdiag, eps=1e-5):
    """Standardize each dimension (batch mean, biased variance), C_ij = sum_b a_bi c_bj / N, then the loss."""
    n, dim = z0.shape

    def standardized(z):
        columns = []
        for j in range(dim):
            mean = sum(z[b, j] for b in range(n)) / n
            variance = sum((z[b, j] - mean) ** 2 for b in range(n)) / n
            columns.append([(z[b, j] - mean) / torch.sqrt(variance + eps) for b in range(n)])
        return columns

    a, c = standardized(z0), standardized(z1)
    loss = 0
    for i in range(dim):
        for j in range(dim):
            correlation = sum(a[i][b] * c[j][b] for b in range(n)) / n
            loss = loss + ((1 - correlation) ** 2 if i == j else lambda_offdiag * correlation**2)
    return loss


@pytest.mark.parametrize("n, dim, lambda_offdiag, seed", [(2, 2, 5e-3, 0), (6, 4, 5e-3, 1), (9, 3, 0.5, 2)])
def test_barlow_twins_matches_loops(n, dim, lambda_offdiag, seed):
    z0 = _random(seed, n, dim, scale=2.0)
    z1 = (z0.detach() + _random(seed + 1, n, dim, scale=0.5).detach()).requires_grad_()  # correlated views
    loss = barlow_twins_loss(z0, z1, lambda_offdiag)
    _assert_same_values_and_gradients(loss, loop_barlow_twins(z0, z1, lambda_offdiag), (z0, z1))


def test_barlow_twins_standardizes_each_dimension():
    z0, z1 = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64)
    # up to the eps in the variance (1e-5, as BatchNorm's): relative 1e-5 for unit-variance dimensions
    scale, shift = torch.tensor([1.0, 2.0, 5.0, 20.0, 3.0], dtype=torch.float64), torch.arange(5.0)
    assert barlow_twins_loss(z0 * scale + shift, z1).item() == pytest.approx(barlow_twins_loss(z0, z1).item(),
                                                                             rel=1e-4)
    c = cross_correlation(z0, z0)
    torch.testing.assert_close(c.diagonal(), torch.full((5,), 1.0, dtype=torch.float64), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="z0 and z1"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2))


# --- VICReg


def loop_vicreg(z0, z1, invariance_weight, variance_weight, covariance_weight, eps=1e-4):
    """VICReg's three terms from the paper's sums: MSE; mean hinge on the unbiased std; off-diagonal cov^2 / D."""
    n, dim = z0.shape
    invariance = sum((z0[b, j] - z1[b, j]) ** 2 for b in range(n) for j in range(dim)) / (n * dim)
    variance, covariance = 0, 0
    for z in (z0, z1):
        means = [sum(z[b, j] for b in range(n)) / n for j in range(dim)]
        for j in range(dim):
            std = torch.sqrt(sum((z[b, j] - means[j]) ** 2 for b in range(n)) / (n - 1) + eps)
            variance = variance + torch.clamp(1 - std, min=0) / dim / 2
        for i in range(dim):
            for j in range(dim):
                if i != j:
                    cov = sum((z[b, i] - means[i]) * (z[b, j] - means[j]) for b in range(n)) / (n - 1)
                    covariance = covariance + cov**2 / dim
    return invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance


@pytest.mark.parametrize("n, dim, weights, seed", [(2, 2, (25.0, 25.0, 1.0), 0), (6, 4, (25.0, 25.0, 1.0), 1),
                                                    (9, 5, (1.0, 2.0, 3.0), 2)])
def test_vicreg_matches_loops(n, dim, weights, seed):
    # per-dimension scales on both sides of 1, so the variance hinge is active for some dimensions only
    scales = torch.linspace(0.3, 3.0, dim, dtype=torch.float64)
    z0 = (_random(seed, n, dim).detach() * scales).requires_grad_()
    z1 = (_random(seed + 1, n, dim).detach() * scales).requires_grad_()
    loss = vicreg_loss(z0, z1, *weights)
    _assert_same_values_and_gradients(loss, loop_vicreg(z0, z1, *weights), (z0, z1))


def test_vicreg_terms():
    z = torch.randn(32, 4, dtype=torch.float64) * 3
    invariance, variance, covariance = vicreg_terms(z, z)
    assert invariance.item() == 0.0 and variance.item() == 0.0  # identical views, every std well above 1
    collapsed = torch.zeros(8, 4, dtype=torch.float64)
    assert vicreg_terms(collapsed, collapsed)[1].item() == pytest.approx(1 - math.sqrt(1e-4))
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(torch.randn(1, 3), torch.randn(1, 3))


# --- DINO


def loop_dino_pair(t, s, center, teacher_temp, student_temp):
    """One (teacher crop, student crop) pair: mean over samples of sum_k -P_t(k) log P_s(k), explicit exp-sums."""
    n, k = t.shape
    term = 0
    for b in range(n):
        t_exp = [torch.exp((t[b, c].detach() - center[c]) / teacher_temp) for c in range(k)]
        s_exp = [torch.exp(s[b, c] / student_temp) for c in range(k)]
        for c in range(k):
            term = term - t_exp[c] / sum(t_exp) * torch.log(s_exp[c] / sum(s_exp))
    return term / n


def loop_dino(student, teacher, center, teacher_temp, student_temp):
    """The pair loss averaged over every (teacher crop i, student crop v) with v != i."""
    pairs = [loop_dino_pair(t, s, center, teacher_temp, student_temp)
             for i, t in enumerate(teacher) for v, s in enumerate(student) if v != i]
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("crops, n, k, teacher_temp, seed", [(2, 3, 5, 0.04, 0), (4, 2, 6, 0.07, 1),
                                                             (3, 4, 3, 0.05, 2)])
def test_dino_loss_matches_loops_and_skips_same_view_pairs(crops, n, k, teacher_temp, seed):
    student = [_random(seed + c, n, k) for c in range(crops)]
    teacher = [_random(seed + 10 + c, n, k) for c in range(2)]
    center = torch.randn(k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 0.1
    loss = dino_loss(student, teacher, center, teacher_temp, student_temp=0.1)
    reference = loop_dino(student, teacher, center, teacher_temp, 0.1)
    _assert_same_values_and_gradients(loss, reference, student)
    assert all(g is None for g in torch.autograd.grad(loss, teacher, allow_unused=True))  # the teacher is a target
    # with 2 crops there are 2 pairs (0 <- 1 and 1 <- 0), not 4: the same-view pairs are skipped
    if crops == 2:
        manual = (loop_dino_pair(teacher[0], student[1], center, teacher_temp, 0.1)
                  + loop_dino_pair(teacher[1], student[0], center, teacher_temp, 0.1)) / 2
        torch.testing.assert_close(loss, manual, **TIGHT)


def test_dino_centering_and_its_ema():
    teacher = [torch.randn(4, 6, dtype=torch.float64) for _ in range(2)]
    student = [torch.randn(4, 6, dtype=torch.float64) for _ in range(3)]
    center = torch.randn(1, 6, dtype=torch.float64)
    # a constant shift of the teacher's logits that the centre also carries changes nothing
    shifted = dino_loss(student, [t + 5.0 for t in teacher], center + 5.0, teacher_temp=0.04)
    assert shifted.item() == pytest.approx(dino_loss(student, teacher, center, teacher_temp=0.04).item(), rel=1e-10)
    # EMA by hand: momentum * center + (1 - momentum) * mean over both crops' samples
    expected = 0.9 * center + 0.1 * torch.cat(teacher).mean(dim=0, keepdim=True)
    buffer = center.clone()
    out = update_center(buffer, teacher, momentum=0.9)
    assert out is buffer  # in place (a registered buffer stays registered)
    torch.testing.assert_close(buffer, expected, **TIGHT)
    flat = torch.zeros(6, dtype=torch.float64)
    update_center(flat, torch.cat(teacher), momentum=0.0)
    torch.testing.assert_close(flat, torch.cat(teacher).mean(dim=0), **TIGHT)
    with pytest.raises(ValueError, match="momentum"):
        update_center(flat, teacher, momentum=1.5)
    with pytest.raises(ValueError, match="at least 2 crops"):
        dino_loss(student[:1], teacher[:1], center, teacher_temp=0.04)


def test_dino_teacher_temperature_is_the_references_linspace_then_constant():
    import numpy as np

    warmup, epochs = 30, 100
    reference = np.concatenate((np.linspace(0.04, 0.07, warmup), np.ones(epochs - warmup) * 0.07))
    got = [dino_teacher_temperature(e, warmup) for e in range(epochs)]
    assert got == pytest.approx(reference.tolist(), rel=1e-12)
    assert got[0] == 0.04 and got[warmup - 1] == pytest.approx(0.07) and got[-1] == 0.07
    assert dino_teacher_temperature(0, warmup_epochs=0) == 0.07
    assert dino_teacher_temperature(0, warmup_epochs=1) == 0.04 == float(np.linspace(0.04, 0.07, 1)[0])
    with pytest.raises(ValueError, match=">= 0"):
        dino_teacher_temperature(-1)


@pytest.mark.parametrize("name", ["infonce_queue", "moco_v3", "barlow_twins", "vicreg", "dino", "byol"])
def test_new_losses_under_bf16_autocast_are_computed_in_float32(name):
    generator = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(8, 6, generator=generator).bfloat16() for _ in range(3))
    compute = {"infonce_queue": lambda x, y: infonce_queue_loss(x, y, c),
               "moco_v3": moco_v3_loss, "barlow_twins": barlow_twins_loss, "vicreg": vicreg_loss,
               "dino": lambda x, y: dino_loss([x, y, c], [x, y], torch.zeros(6), teacher_temp=0.04),
               "byol": normalized_mse_loss}[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compute(a, b)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(compute(a.float(), b.float()).item(), rel=1e-5)
