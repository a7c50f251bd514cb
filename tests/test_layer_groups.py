"""Layer groups of every encoder family: a partition of the parameters, ordered from input to output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reprlab.models.encoders import Encoder, create_encoder


def _check_partition(encoder: Encoder) -> None:
    """Every backbone parameter sits in exactly one group, and no group is empty."""
    groups = encoder.layer_groups()
    grouped = [id(p) for _, params in groups for p in params]
    assert all(params for _, params in groups)
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in encoder.backbone.parameters()}
    names = [name for name, _ in groups]
    assert len(names) == len(set(names))


def _first_use_order(encoder: Encoder, images: torch.Tensor) -> list[int]:
    """For each group, the position (in a forward pass) of the first module that owns one of its parameters;
    groups ordered input -> output give a non-decreasing list."""
    owners: dict[int, nn.Module] = {}
    for module in encoder.backbone.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = module
    calls: dict[int, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        calls.setdefault(id(module), len(calls))

    handles = [m.register_forward_pre_hook(record) for m in {id(m): m for m in owners.values()}.values()]
    try:
        with torch.no_grad():
            encoder.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return [min(calls[id(owners[id(p)])] for p in params) for _, params in encoder.layer_groups()]


def _assert_ordered(encoder: Encoder, images: torch.Tensor) -> None:
    order = _first_use_order(encoder, images)
    assert order == sorted(order), f"groups {[n for n, _ in encoder.layer_groups()]} run in order {order}"


def test_torchvision_resnet_stem_and_stages():
    encoder = create_encoder("resnet18", cifar_stem=True)
    _check_partition(encoder)
    assert [n for n, _ in encoder.layer_groups()] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    stem = dict(encoder.layer_groups())["stem"]
    assert {id(p) for p in stem} == {
        id(p) for m in (encoder.backbone.conv1, encoder.backbone.bn1) for p in m.parameters()
    }
    _assert_ordered(encoder, torch.rand(1, 3, 8, 8))


def test_torchvision_generic_trunk():
    encoder = create_encoder("mobilenet_v3_small")
    _check_partition(encoder)
    names = [n for n, _ in encoder.layer_groups()]
    assert names[0] == "features.0" and len(names) == len(encoder.backbone.features)
    _assert_ordered(encoder, torch.rand(1, 3, 32, 32))


def test_timm_resnet_uses_group_matcher():
    encoder = create_encoder("timm:resnet18", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
    _check_partition(encoder)
    assert [n for n, _ in encoder.layer_groups()] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    _assert_ordered(encoder, torch.rand(1, 3, 16, 16))


def test_timm_vit_stem_blocks_norm():
    encoder = create_encoder(
        "timm:vit_tiny_patch16_224", img_size=16, patch_size=8, depth=3, embed_dim=16, num_heads=2
    )
    _check_partition(encoder)
    groups = encoder.layer_groups()
    assert [n for n, _ in groups] == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    named = {id(p): n for n, p in encoder.backbone.named_parameters()}
    assert {named[id(p)] for p in groups[0][1]} >= {"cls_token", "pos_embed", "patch_embed.proj.weight"}
    assert "norm.weight" in {named[id(p)] for p in groups[-1][1]}  # timm merges the final norm into the top
    _assert_ordered(encoder, torch.rand(1, 3, 16, 16))


def test_trunk_fallback_for_an_ungrouped_model():
    class Net(nn.Module):  # embedding, a Sequential trunk, a final norm: no declared grouping
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 4, 3)
            self.blocks = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1))
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.blocks(self.embed(x))).mean(dim=(2, 3))

    encoder = Encoder(Net(), 4, {"name": "custom", "kwargs": {}})
    _check_partition(encoder)
    assert [n for n, _ in encoder.layer_groups()] == ["stem", "blocks.0", "blocks.2", "blocks.3", "head"]
    _assert_ordered(encoder, torch.rand(1, 3, 12, 12))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import ConvNextConfig, ConvNextModel, ResNetConfig, ResNetModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=16,
            patch_size=8,
        )
    ).save_pretrained(root / "vit")
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(
        root / "resnet"
    )
    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)).save_pretrained(
        root / "convnext"
    )
    return root


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("vit", ["embeddings", "layer0", "layer1", "layer2", "head"]),
        ("resnet", ["embeddings", "layer0", "layer1"]),  # one group per stage, not per conv inside a stage
        ("convnext", ["embeddings", "layer0", "layer1", "head"]),
    ],
)
def test_hf_layer_modules(hf_dir, model, expected):
    encoder = create_encoder(f"hf:{hf_dir / model}", pretrained=True)
    _check_partition(encoder)
    assert [n for n, _ in encoder.layer_groups()] == expected
    _assert_ordered(encoder, torch.rand(1, 3, 16, 16))
