"""Encoders from torchvision, timm and transformers behind one interface; weights only from local files."""

import pytest
import torch
from safetensors.torch import save_file

from reprlab.checkpoint import CheckpointError, load_encoder, save_encoder
from reprlab.config import ConfigError
from reprlab.data.patches import grid_boxes
from reprlab.models.encoders import PatchPooling, PixelEncoder, create_encoder


def test_torchvision_resnet_cifar_stem_and_greyscale():
    encoder = create_encoder("resnet18", cifar_stem=True).eval()
    assert encoder.feature_dim == 512
    assert encoder.backbone.conv1.kernel_size == (3, 3) and encoder.backbone.conv1.stride == (1, 1)
    assert isinstance(encoder.backbone.maxpool, torch.nn.Identity)
    grey = torch.rand(2, 1, 8, 8)
    out = encoder(grey)
    assert out.shape == (2, 512)
    assert torch.allclose(out, encoder(grey.expand(-1, 3, -1, -1)))  # greyscale == repeated channels
    assert [name for name, _ in encoder.layer_groups()] == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_normalization_lives_inside():
    encoder = create_encoder("resnet18").eval()
    x = torch.rand(1, 3, 32, 32)
    manual = encoder.backbone((x - encoder.mean) / encoder.std)
    assert torch.allclose(encoder(x), manual)


def test_torchvision_local_weights_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(num_classes=7).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "r18.safetensors")
    encoder = create_encoder("resnet18", weights=str(tmp_path / "r18.safetensors")).eval()
    assert torch.equal(encoder.backbone.conv1.weight, reference.conv1.weight)


def test_unknown_name_is_clear():
    with pytest.raises(ValueError, match="timm:"):
        create_encoder("resnet_nonexistent")


def test_timm_local_checkpoint(tmp_path):
    import timm

    reference = timm.create_model("resnet10t", num_classes=5).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "r10t.safetensors")
    encoder = create_encoder("timm:resnet10t", weights=str(tmp_path / "r10t.safetensors")).eval()
    x = torch.rand(2, 3, 32, 32)
    reference.reset_classifier(0)
    assert encoder.feature_dim == reference.num_features
    assert torch.allclose(encoder(x), reference((x - encoder.mean) / encoder.std), atol=1e-6)
    assert len(encoder.layer_groups()) >= 2


@pytest.fixture
def tiny_hf_vit(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8)
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(tmp_path / "tiny-vit")
    return tmp_path / "tiny-vit"


def test_hf_local_dir_pretrained_and_rebuild(tiny_hf_vit, tmp_path):
    encoder = create_encoder(f"hf:{tiny_hf_vit}", pretrained=True).eval()
    assert encoder.feature_dim == 32
    out = encoder(torch.rand(3, 1, 32, 32))  # resized to the model's 16 px, greyscale repeated
    assert out.shape == (3, 32)
    names = [name for name, _ in encoder.layer_groups()]
    assert names[0] == "embeddings" and "layer1" in names
    # a run directory rebuilds it without the hub: the HF config travels in meta.json
    save_encoder(tmp_path / "run", encoder, {"method": "test"})
    again = load_encoder(tmp_path / "run")
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(again(x), encoder(x), atol=1e-6)


def test_run_dir_round_trip_and_strict_load(tmp_path):
    encoder = create_encoder("resnet18", cifar_stem=True).eval()
    save_encoder(tmp_path / "run", encoder, {"method": "simclr"})
    again = load_encoder(tmp_path / "run")
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(again(x), encoder(x))
    other = create_encoder("resnet34")
    save_encoder(tmp_path / "bad", other, {})
    meta = (tmp_path / "bad" / "meta.json").read_text().replace("resnet34", "resnet18")
    (tmp_path / "bad" / "meta.json").write_text(meta)
    with pytest.raises(CheckpointError, match="does not fit the encoder .resnet18"):
        load_encoder(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_encoder(tmp_path)


@pytest.mark.parametrize("standardize", [False, True])
def test_patch_pooling_averages_the_features_of_the_grid_cells(standardize, tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder("timm:test_resnet").eval().pool_patches(PatchPooling(3, 8, standardize))
    images = torch.rand(2, 3, 24, 24)
    cells = [images[:, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] for r in range(3) for c in range(3)]  # whole 8 px cells
    if standardize:  # each cell on its own: zero mean, unit std per channel once the encoder normalizes it
        cells = [(x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True) * encoder.std + encoder.mean
                 for x in cells]
    expected = torch.stack([encoder.features(x) for x in cells]).mean(dim=0)
    assert torch.allclose(encoder(images), expected, atol=1e-5)
    assert not torch.allclose(encoder(images), encoder.features(images), atol=1e-3)
    save_encoder(tmp_path, encoder, {})
    again = load_encoder(tmp_path)  # the pooling is part of the spec a checkpoint stores
    assert again.patch_pooling == PatchPooling(3, 8, standardize)
    assert torch.allclose(again(images), encoder(images), atol=1e-6)
    assert "patch_pooling" not in encoder.pool_patches(None).spec


def test_grid_boxes_at_jitter_zero_draw_no_random_numbers():
    state = torch.get_rng_state()
    boxes = grid_boxes(2, 12, 20, grid=3, gap=0.0, jitter=0.0)  # a non-square image: the region could move
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn: evaluation leaves training's RNG alone
    assert torch.equal(boxes, grid_boxes(2, 12, 20, grid=3, gap=0.0, jitter=0.0))
    # the 12 px square region centred in the 20 px width, cut into 4 px cells
    assert boxes[0, 0].tolist() == [4.0, 0.0, 8.0, 4.0] and boxes[1, -1].tolist() == [12.0, 8.0, 16.0, 12.0]
    torch.manual_seed(0)
    jittered = grid_boxes(2, 12, 20, grid=3, gap=0.2, jitter=0.1)  # training still draws region and jitter
    assert not torch.equal(jittered, grid_boxes(2, 12, 20, grid=3, gap=0.2, jitter=0.1))


def test_patch_pooled_features_are_deterministic_on_non_square_images():
    encoder = create_encoder("timm:test_resnet").eval().pool_patches(PatchPooling(3, 8))
    images = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(encoder(images), encoder(images))


def test_kwargs_an_encoder_does_not_take_are_a_config_error():
    with pytest.raises(ConfigError, match=r"encoder.kwargs.widht: 'resnet18' \(ResNet\) takes no 'widht'; valid "
                                          r"kwargs: \['cifar_stem', .*'width_per_group'"):
        create_encoder("resnet18", widht=4)


def test_pixels_baseline():
    assert PixelEncoder()(torch.rand(4, 3, 5, 5)).shape == (4, 75)
