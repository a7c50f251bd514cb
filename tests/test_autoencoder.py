"""Tests for the autoencoder family (reprlab.ssl.autoencoder) and its decoders (reprlab.models.decoders)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reprlab.models.decoders import ConvDecoder
from reprlab.models.encoders import create_encoder
from reprlab.ssl.autoencoder import (
    AutoEncoder,
    default_patch_size,
    mask_to_pixels,
    random_erase,
    random_patch_mask,
)
from reprlab.ssl.reconstruction import patchify


@pytest.mark.parametrize("size", [1, 8, (8, 12), 28, 32, 96])
def test_conv_decoder_output_matches_any_image_size(size):
    decoder = ConvDecoder(feature_dim=16, channels=3, image_size=size, hidden_channels=32, min_channels=8)
    height, width = (size, size) if isinstance(size, int) else size
    assert decoder(torch.randn(2, 16)).shape == (2, 3, height, width)


def test_conv_decoder_stages_double_until_the_image_side():
    decoder = ConvDecoder(feature_dim=4, channels=1, image_size=32, hidden_channels=64, min_channels=8)
    transposed = [m for m in decoder.stages if isinstance(m, nn.ConvTranspose2d)]
    assert len(transposed) == 3  # 4 -> 8 -> 16 -> 32, no final resize needed
    assert [m.out_channels for m in transposed] == [32, 16, 8]


def test_default_patch_size_and_masks():
    assert [default_patch_size(s, s) for s in (8, 28, 32, 224)] == [2, 4, 4, 28]
    mask = random_patch_mask(5, 16, 0.5, torch.device("cpu"))
    assert mask.dtype == torch.bool and (mask.sum(dim=1) == 8).all()  # the same count for every image
    assert not torch.equal(mask[0], mask[1]) or not torch.equal(mask[1], mask[2])
    pixels = mask_to_pixels(mask, 2, 8, 8)  # (5, 1, 8, 8)
    # the pixel mask agrees with patchify's patch order
    assert torch.equal(patchify(pixels.float(), 2).amax(dim=2).bool(), mask)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_mask(1, 4, 1.0, torch.device("cpu"))


def test_random_erase_changes_one_box_per_image():
    torch.manual_seed(0)
    x = torch.full((16, 1, 10, 10), 2.0)  # outside [0, 1]: erased pixels are recognisable
    erased = random_erase(x, scale=(0.1, 0.2))
    changed = (erased != x).flatten(1)
    assert changed.any(dim=1).all()
    counts = changed.sum(dim=1).float()
    assert counts.max() <= 0.2 * 100 * 1.5  # rounded box of at most ~20% of the image


def test_plain_and_denoising_targets_are_clean(tiny_encoder):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    clean = images.float() / 255
    plain = AutoEncoder(tiny_encoder, mode="plain", image_size=16)
    out = plain.reconstruct(images)
    assert torch.equal(out["corrupted"], clean) and torch.equal(out["target"], clean) and out["mask"] is None
    for noise in ("gaussian", "erase"):
        denoising = AutoEncoder(tiny_encoder, mode="denoising", image_size=16, noise=noise)
        out = denoising.reconstruct(images)
        assert torch.equal(out["target"], clean) and not torch.equal(out["corrupted"], clean)
        assert out["prediction"].shape == (4, 3, 16, 16)


def test_masked_input_hides_patches_with_the_chosen_fill(tiny_encoder):
    torch.manual_seed(0)
    images = torch.randint(1, 256, (3, 3, 16, 16), dtype=torch.uint8)
    for fill in ("zero", "mean"):
        model = AutoEncoder(tiny_encoder, mode="masked", image_size=16, patch_size=4, mask_ratio=0.25,
                            mask_fill=fill)
        out = model.reconstruct(images)
        hidden = mask_to_pixels(out["mask"], 4, 16, 16).expand(-1, 3, -1, -1)
        assert (out["mask"].sum(dim=1) == 4).all()
        x = images.float() / 255
        assert torch.equal(out["corrupted"][~hidden], x[~hidden])
        expected = torch.zeros_like(x) if fill == "zero" else x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        assert torch.equal(out["corrupted"][hidden], expected[hidden])


class _Shifted(nn.Module):
    """A decoder whose output is moved by ``by`` where the pixel mask ``where`` is True."""

    def __init__(self, decoder: nn.Module, where: torch.Tensor, by: float) -> None:
        super().__init__()
        self.decoder, self.where, self.by = decoder, where, by

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.decoder(features)
        return torch.where(self.where, out + self.by, out)


def test_masked_loss_ignores_the_reconstruction_of_visible_pixels(tiny_encoder):
    """Change the decoder's output on visible pixels only (same mask, same input): the loss must not move."""
    model = AutoEncoder(tiny_encoder, mode="masked", image_size=16, patch_size=4, mask_ratio=0.5).eval()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(3)
    loss = model({"images": images})["loss"]
    torch.manual_seed(3)
    mask = model.reconstruct(images)["mask"]
    visible = ~mask_to_pixels(mask, 4, 16, 16)
    decoder = model.decoder
    model.decoder = _Shifted(decoder, where=visible, by=5.0)
    torch.manual_seed(3)
    perturbed = model({"images": images})["loss"]
    assert perturbed.item() == pytest.approx(loss.item(), rel=1e-6)
    model.decoder = _Shifted(decoder, where=~visible, by=5.0)
    torch.manual_seed(3)
    assert model({"images": images})["loss"].item() > loss.item() + 1.0  # hidden pixels do count
    model.decoder = decoder


def test_mae_encoder_sees_only_visible_patches():
    torch.manual_seed(0)
    encoder = create_encoder("timm:test_vit", img_size=16, patch_size=4)
    model = AutoEncoder(encoder, mode="masked", image_size=16, visible_only=True, mask_ratio=0.75,
                        decoder_dim=16, decoder_depth=1, decoder_heads=2).eval()
    assert model.patch_size == 4
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(1)
    out = model.reconstruct(images)
    hidden = mask_to_pixels(out["mask"], 4, 16, 16).expand(-1, 3, -1, -1)
    scrambled = images.clone()
    scrambled[hidden] = torch.randint(0, 256, (int(hidden.sum()),), dtype=torch.uint8)
    torch.manual_seed(1)
    again = model.reconstruct(scrambled)
    assert torch.equal(again["mask"], out["mask"])
    torch.testing.assert_close(again["prediction"], out["prediction"])  # hidden content never reached it
    torch.manual_seed(1)
    loss = model({"images": images})["loss"]
    loss.backward()
    assert torch.isfinite(loss) and encoder.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_mae_needs_a_vision_transformer(tiny_encoder):
    with pytest.raises(ValueError, match="VisionTransformer"):
        AutoEncoder(tiny_encoder, mode="masked", visible_only=True)
    with pytest.raises(ValueError, match="mode: masked"):
        AutoEncoder(tiny_encoder, mode="plain", visible_only=True)


def test_errors_name_the_bad_value(tiny_encoder):
    with pytest.raises(ValueError, match="unknown mode 'sparse'"):
        AutoEncoder(tiny_encoder, mode="sparse")
    with pytest.raises(ValueError, match="unknown loss"):
        AutoEncoder(tiny_encoder, loss="huber")
    model = AutoEncoder(tiny_encoder, image_size=16)
    with pytest.raises(ValueError, match="image_size and channels"):
        model({"images": torch.zeros(2, 1, 8, 8, dtype=torch.uint8)})


@pytest.mark.parametrize("normalize_target", [False, True])
def test_save_artifacts_writes_a_grid(tiny_encoder, tmp_path, normalize_target):
    model = AutoEncoder(tiny_encoder, mode="masked", image_size=8, channels=1,
                        normalize_target=normalize_target)
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    path = model.save_artifacts(tmp_path, images)
    assert path == tmp_path / "reconstructions.png" and path.stat().st_size > 0
    from PIL import Image

    width, height = Image.open(path).size
    assert height > width / 5 * 2  # three rows of five enlarged images
    assert model.training  # restored after the eval-mode pass
