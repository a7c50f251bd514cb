"""Foundation encoders (hf: and timm: checkpoints saved locally, no downloads): explicit pooling, no random
weights, deterministic features, specs that rebuild them, layer-wise LR decay over ViT blocks and continued
pretraining."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from reprlab.checkpoint import CheckpointError, load_encoder, save_encoder
from reprlab.config import ConfigError
from reprlab.finetune.classifier import Classifier
from reprlab.finetune.policies import build_policy
from reprlab.models.encoders import create_encoder

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
           patch_size=8)
TIMM_VIT = dict(img_size=16, patch_size=8, depth=3, embed_dim=32, num_heads=2)
TIMM_RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints of every family, saved as their libraries save them."""
    import timm
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        ConvNextConfig,
        ConvNextModel,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTForImageClassification,
        ViTMAEConfig,
        ViTMAEModel,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("foundation")
    torch.manual_seed(0)
    # a classification checkpoint: no pooler weights, which ViTModel would draw at random on every load
    ViTForImageClassification(ViTConfig(**VIT, num_labels=3)).save_pretrained(root / "vit")
    ViTModel(ViTConfig(**VIT)).save_pretrained(root / "vit-pooler")  # a ViTModel checkpoint: pooler included
    ViTMAEModel(ViTMAEConfig(**VIT)).save_pretrained(root / "vit-mae")  # mask_ratio 0.75 in its config
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             image_size=16, patch_size=8)).save_pretrained(root / "dinov2")
    CLIPVisionModel(CLIPVisionConfig(**VIT)).save_pretrained(root / "clip")
    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)).save_pretrained(root / "convnext")
    for name, kwargs in (("vit_tiny_patch16_224", TIMM_VIT), ("resnet18", TIMM_RESNET)):
        model = timm.create_model(name, num_classes=5, **kwargs)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / f"{name}.safetensors")
    return root


def _encoder(checkpoints, family: str, **kwargs):
    """Each family loaded as a user would load its pretrained weights."""
    if family == "timm-vit":
        weights = str(checkpoints / "vit_tiny_patch16_224.safetensors")
        return create_encoder("timm:vit_tiny_patch16_224", weights=weights, **TIMM_VIT, **kwargs)
    if family == "timm-resnet":
        return create_encoder("timm:resnet18", weights=str(checkpoints / "resnet18.safetensors"), **TIMM_RESNET,
                              **kwargs)
    return create_encoder(f"hf:{checkpoints / family}", pretrained=True, **kwargs)


FAMILIES = ["vit", "vit-mae", "dinov2", "clip", "convnext", "timm-vit", "timm-resnet"]
DEFAULT_POOLING = {"vit": "cls", "vit-mae": "mean", "dinov2": "cls", "clip": "cls", "convnext": "pooler"}


@pytest.mark.parametrize("family", FAMILIES)
def test_two_loads_and_two_extractions_give_identical_features(checkpoints, family, tmp_path):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    first, second = _encoder(checkpoints, family).eval(), _encoder(checkpoints, family).eval()
    with torch.no_grad():
        features = first(images)
        assert torch.equal(first(images), features)  # two extractions (ViT-MAE masked 75% at random here)
        assert torch.equal(second(images), features)  # two loads (a random ViT pooler differed here)
    spec = first.spec["kwargs"]
    if family in DEFAULT_POOLING:
        assert spec["pooling"] == DEFAULT_POOLING[family]
    if family == "timm-vit":
        assert spec["global_pool"] == "token"  # timm's pooling, recorded
    save_encoder(tmp_path, first, {"method": "test"})
    with torch.no_grad():
        assert torch.equal(load_encoder(tmp_path)(images), features)  # the spec rebuilds the same pooling


def test_default_poolings_read_what_they_say(checkpoints):
    from transformers import CLIPVisionModel, ViTModel

    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        encoder = _encoder(checkpoints, "vit").eval()
        assert encoder.backbone.model.pooler is None  # never built: nothing random to save or train
        reference = ViTModel.from_pretrained(checkpoints / "vit", add_pooling_layer=False).eval()
        normalized = (images - encoder.mean) / encoder.std
        cls = reference(pixel_values=normalized).last_hidden_state[:, 0]  # after the final layernorm
        assert torch.allclose(encoder(images), cls, atol=1e-6)
        both = _encoder(checkpoints, "vit", pooling="cls_mean").eval()
        tokens = reference(pixel_values=normalized).last_hidden_state
        assert torch.allclose(both(images), torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1), atol=1e-6)
        assert both.feature_dim == 64
        clip = _encoder(checkpoints, "clip").eval()
        model = CLIPVisionModel.from_pretrained(checkpoints / "clip").eval()
        out = model(pixel_values=(images - clip.mean) / clip.std)
        norm = getattr(model, "vision_model", model).post_layernorm  # transformers 4 nests it, 5 does not
        expected = norm(out.last_hidden_state[:, 0])  # CLIP's final norm comes after the last hidden state
        assert torch.allclose(clip(images), expected, atol=1e-6)
        mae = _encoder(checkpoints, "vit-mae").eval()
        seen = []
        mae.backbone.model.register_forward_hook(lambda m, args, out: seen.append(out.last_hidden_state.shape))
        mae(images)
        assert seen == [torch.Size([2, 1 + 4, 32])]  # CLS + every one of the 4 patches: nothing masked


def test_pooler_only_when_its_weights_were_loaded(checkpoints):
    from transformers import ViTModel

    with pytest.raises(ConfigError, match=r"no pooler weights \(pooler.dense.bias, pooler.dense.weight\).*"
                                          r"pooling=cls"):
        _encoder(checkpoints, "vit", pooling="pooler")
    encoder = _encoder(checkpoints, "vit-pooler", pooling="pooler").eval()
    images = torch.rand(2, 3, 16, 16)
    reference = ViTModel.from_pretrained(checkpoints / "vit-pooler").eval()
    with torch.no_grad():
        expected = reference(pixel_values=(images - encoder.mean) / encoder.std).pooler_output
        assert torch.allclose(encoder(images), expected, atol=1e-6)


def test_a_load_that_leaves_weights_random_is_refused(checkpoints):
    with pytest.raises(CheckpointError, match=r"leaves \d+ weights .*random init \(.*layers?\.2"):
        _encoder(checkpoints, "vit", num_hidden_layers=3)  # the checkpoint has 2 layers


def test_a_local_folder_is_its_weights(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match=r"local folder with weights.*set encoder.pretrained=true"):
        create_encoder(f"hf:{checkpoints / 'vit'}")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text((checkpoints / "vit" / "config.json").read_text())
    assert create_encoder(f"hf:{tmp_path / 'config-only'}").feature_dim == 32  # a random init, on purpose


@pytest.mark.parametrize("name", ["hf", "timm:resnet18", "timm:vit_tiny_patch16_224"])
def test_kwargs_a_family_does_not_take_name_the_valid_ones(checkpoints, name):
    if name == "hf":
        name = f"hf:{checkpoints / 'vit'}"
    with pytest.raises(ConfigError, match=r"encoder.kwargs.cifar_stem: .* takes no 'cifar_stem' \(cifar_stem is "
                                          r"for torchvision ResNets.*valid kwargs: .*(pooling|global_pool)"):
        create_encoder(name, pretrained=name.startswith("hf:"), cifar_stem=True)
    with pytest.raises(ConfigError, match="pooling"):
        create_encoder(name, pretrained=name.startswith("hf:"), pooling="max")


@pytest.mark.parametrize("family, blocks", [("timm-vit", ["blocks.0", "blocks.1", "blocks.2"]),
                                            ("vit", ["layer0", "layer1"])])
def test_llrd_gives_every_vit_block_its_own_lr_scale(checkpoints, family, blocks):
    encoder = _encoder(checkpoints, family)
    names = [name for name, _ in encoder.layer_groups()]
    assert names[0] in ("stem", "embeddings") and names[1:1 + len(blocks)] == blocks  # input -> output
    decay = 0.5
    groups = build_policy("llrd", {"decay": decay}).attach(Classifier(encoder, 3), weight_decay=0.05)
    scales = {g["name"]: g["lr_scale"] for g in groups}
    count = len(names)
    assert scales["head"] == 1.0
    for index, name in enumerate(names):  # block i of n at decay ** (n - i): deeper blocks learn faster
        assert scales[f"encoder.{name}"] == pytest.approx(decay ** (count - index))
    assert len({scales[f"encoder.{b}"] for b in blocks}) == len(blocks)


def test_continued_pretraining_from_pretrained_weights(checkpoints):
    """``encoder.pretrained=true`` with the existing methods: MAE on a timm ViT, SimMIM-style masking on an HF
    ViT-MAE, DINO on an HF ViT; one step each, gradients reach the pretrained weights."""
    from reprlab.data.views import MultiCrop, ViewAugment
    from reprlab.ssl import build_method

    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    runs = [("timm-vit", "autoencoder", {"mode": "masked", "visible_only": True, "image_size": 16,
                                         "mask_ratio": 0.5, "decoder_dim": 16, "decoder_depth": 1,
                                         "decoder_heads": 2}),
            ("vit-mae", "autoencoder", {"mode": "masked", "image_size": 16, "patch_size": 8,
                                        "decoder_channels": 16}),
            ("vit", "dino", {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16,
                             "augment": MultiCrop(num_local=2, local=ViewAugment(size=8, crop_scale=(0.2, 0.5)))})]
    for family, method_name, params in runs:
        encoder = _encoder(checkpoints, family)
        before = {k: v.clone() for k, v in encoder.state_dict().items()}
        assert torch.equal(before[next(iter(before))], _encoder(checkpoints, family).state_dict()[next(iter(before))])
        method = build_method(method_name, encoder, params).train()
        out = method({"images": images, "index": torch.arange(4)})
        out["loss"].backward()
        grads = [p.grad for p in encoder.parameters() if p.requires_grad]
        assert torch.isfinite(out["loss"]) and any(g is not None and g.abs().sum() > 0 for g in grads), family
