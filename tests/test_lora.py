"""LoRA fine-tuning (policy ``lora``, through peft): default targets per family, only LoRA and the head train,
a small trainable share, merged before saving into a classifier that loads without peft."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from peft.tuners.lora import LoraLayer  # noqa: E402

from reprlab.config import ConfigError  # noqa: E402
from reprlab.finetune.classifier import Classifier, load_classifier, save_classifier  # noqa: E402
from reprlab.finetune.lora import default_targets  # noqa: E402
from reprlab.finetune.policies import build_policy  # noqa: E402
from reprlab.models.encoders import create_encoder  # noqa: E402
from reprlab.optim import build_optimizer  # noqa: E402

SMALL_VIT = dict(img_size=16, patch_size=8, depth=4, embed_dim=64, num_heads=2)


def _vit_classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(create_encoder("timm:vit_tiny_patch16_224", **SMALL_VIT), 3, init="xavier")


def _train(classifier: Classifier, groups: list[dict], steps: int = 5, size: int = 16) -> None:
    optimizer = build_optimizer("adamw", groups, lr=1e-2, weight_decay=0.01)
    images, labels = torch.rand(8, 3, size, size), torch.arange(8) % 3
    classifier.train()
    for _ in range(steps):
        loss = F.cross_entropy(classifier(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    classifier.eval()


def test_timm_vit_lora_trains_a_few_percent_and_merges_into_a_plain_classifier(tmp_path):
    classifier = _vit_classifier().eval()
    images = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        untouched = classifier.encoder(images)
    keys = set(classifier.state_dict())
    base = {k: v.clone() for k, v in classifier.encoder.state_dict().items()}
    policy = build_policy("lora", {"rank": 4, "alpha": 8})
    groups = policy.attach(classifier, weight_decay=0.01)
    adapted = [n for n, m in classifier.encoder.backbone.named_modules() if isinstance(m, LoraLayer)]
    assert adapted == [f"blocks.{i}.attn.qkv" for i in range(4)]  # timm's fused q, k, v projection
    fraction = policy.trainable_params() / policy.encoder_params
    assert policy.trainable_params() == 4 * 4 * (64 + 3 * 64) and fraction <= 0.05  # 4 blocks x r (in + out)
    assert policy.on_epoch_end(0)["trainable_fraction"] == pytest.approx(fraction)
    with torch.no_grad():
        assert torch.allclose(classifier.encoder(images), untouched, atol=1e-6)  # B = 0: same function at step 0
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith("head.")} and trainable
    _train(classifier, groups)
    frozen = {k: v for k, v in classifier.encoder.state_dict().items() if "lora_" not in k}
    for key, value in frozen.items():  # the encoder's own weights never moved
        assert torch.equal(value, base[key.replace(".base_layer", "")]), key
    with torch.no_grad():
        trained = classifier(images)
    policy.finalize()
    assert not any(isinstance(m, LoraLayer) for m in classifier.modules())
    assert set(classifier.state_dict()) == keys  # the original keys again: nothing of peft is saved
    with torch.no_grad():
        assert torch.allclose(classifier(images), trained, atol=1e-5)  # merged = adapted
        assert not torch.allclose(classifier.encoder(images), untouched, atol=1e-4)  # and it did learn
    save_classifier(tmp_path, classifier, ["a", "b", "c"], {"policy": "lora"})
    loaded = load_classifier(tmp_path)  # strict load into a plain timm ViT
    with torch.no_grad():
        assert torch.allclose(loaded.model(images), trained, atol=1e-5)


def test_hf_vits_adapt_query_and_value(tmp_path):
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8)
    ViTModel(ViTConfig(**vit, intermediate_size=64)).save_pretrained(tmp_path / "vit")
    Dinov2Model(Dinov2Config(**vit, mlp_ratio=2)).save_pretrained(tmp_path / "dinov2")
    for name in ("vit", "dinov2"):
        encoder = create_encoder(f"hf:{tmp_path / name}", pretrained=True)
        targets = default_targets(encoder.backbone)
        # transformers 5 names them q_proj / v_proj, 4 query / value: the paper's W_q and W_v, every layer
        assert len(targets) == 4 and {t.rsplit(".", 1)[-1] for t in targets} in ({"query", "value"},
                                                                                {"q_proj", "v_proj"})
        classifier = Classifier(encoder, 3, init="xavier")
        policy = build_policy("lora", {"rank": 2})
        groups = policy.attach(classifier, weight_decay=0.0)
        _train(classifier, groups, steps=3)
        with torch.no_grad():
            images = torch.rand(2, 3, 16, 16)
            trained = classifier(images)
            policy.finalize()
            assert torch.allclose(classifier(images), trained, atol=1e-5)
        save_classifier(tmp_path / f"{name}-run", classifier, ["a", "b", "c"], {})
        with torch.no_grad():
            assert torch.allclose(load_classifier(tmp_path / f"{name}-run").model(images), trained, atol=1e-5)


def test_convnets_get_conv_lora():
    torch.manual_seed(0)
    encoder = create_encoder("timm:resnet18", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
    classifier = Classifier(encoder, 3, init="xavier")
    policy = build_policy("lora", {"rank": 2})
    groups = policy.attach(classifier, weight_decay=0.0)
    adapted = [type(m).__name__ for m in encoder.backbone.modules() if isinstance(m, LoraLayer)]
    assert "Conv2d" in adapted and len(adapted) == sum(1 for n, _ in encoder.backbone.named_modules()
                                                      if n.endswith(("conv1", "conv2", "downsample.0")))
    _train(classifier, groups, steps=3)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        trained = classifier(images)
        policy.finalize()
        assert torch.allclose(classifier(images), trained, atol=1e-5)


def test_lora_arguments_fail_naming_the_fix():
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        build_policy("lora", {"rank": 0})
    with pytest.raises(ValueError, match="dropout must be in"):
        build_policy("lora", {"dropout": 1.5})
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        build_policy("lora", {"target_modules": "qkv"})
    with pytest.raises(ValueError, match="has no parameter 'r'"):
        build_policy("lora", {"r": 4})
    with pytest.raises(ConfigError, match=r"target_modules=\['query'\] matches no Linear or Conv2d.*'qkv'"):
        build_policy("lora", {"target_modules": ["query"]}).attach(_vit_classifier(), weight_decay=0.0)
    classifier = _vit_classifier()
    build_policy("lora", {"target_modules": ["qkv", "proj"]}).attach(classifier, weight_decay=0.0)
    names = {n for n, m in classifier.encoder.backbone.named_modules() if isinstance(m, LoraLayer)}
    assert "blocks.0.attn.proj" in names and "blocks.0.attn.qkv" in names and "blocks.0.mlp.fc1" not in names
