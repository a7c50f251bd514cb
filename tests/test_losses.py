"""Tests for reprlab.ssl.losses (NT-Xent, reconstruction) and the SimCLR projection head."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reprlab.models.heads import projection_head
from reprlab.ssl.losses import (
    normalize_patches,
    nt_xent_accuracy,
    nt_xent_logits,
    nt_xent_loss,
    patchify,
    reconstruction_loss,
    unpatchify,
)

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
