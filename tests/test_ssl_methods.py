"""Every registered pretraining method: one CPU step on a tiny encoder, the registry's errors, the configs."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

import reprlab.config
from reprlab.config import ConfigError, PretrainConfig, load_config
from reprlab.data.views import FinetuneAugment, ViewAugment
from reprlab.models.encoders import PatchPooling, create_encoder
from reprlab.ssl import METHODS, build_method

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "pretrain").glob("*.yaml"))

# the few parameters a method needs to fit 16 px images and stay tiny; a new method runs with its defaults
TINY_PARAMS = {
    "autoencoder": {"image_size": 16, "decoder_channels": 32},
    "jigsaw": {"num_permutations": 8, "hidden_dim": 32},
    "relative_position": {"hidden_dim": 32},
    "simclr": {"projection_dim": 16, "hidden_dim": 32},
    "distill": {"teacher": "timm:test_resnet", "teacher_pretrained": False},  # offline: a random teacher
    # the papers' 8192-wide projectors and 65536-way DINO head cost ~20 s a test here: the maths is the same
    "barlow_twins": {"projection_dim": 16, "hidden_dim": 32},
    "vicreg": {"projection_dim": 16, "hidden_dim": 32},
    "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "augment": {"num_local": 2, "local": {"size": 8}}},
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # jigsaw's permutation file cache stays in tmp


def _tiny_encoder():
    torch.manual_seed(0)
    return create_encoder("timm:test_resnet")


def _one_step(method: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    method.train()
    out = method({"images": images, "labels": torch.zeros(len(images), dtype=torch.long),
                  "index": torch.arange(len(images))})
    out["loss"].backward()
    return out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_runs_one_step_with_gradients_into_the_encoder(name):
    encoder = _tiny_encoder()
    method = build_method(name, encoder, TINY_PARAMS.get(name, {}))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    out = _one_step(method, images)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "some encoder parameters received no gradient"
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert grads[0].abs().sum() > 0  # the first layer: gradients flow through the whole encoder
    if "acc" in out:
        assert 0.0 <= float(out["acc"]) <= 1.0
    torch.optim.SGD(method.parameters(), lr=0.01).step()  # every parameter is a leaf an optimizer takes


@pytest.mark.parametrize("mode", ["plain", "denoising", "masked"])
def test_autoencoder_modes_on_grey_digit_sized_images(mode):
    encoder = _tiny_encoder()
    params = {"mode": mode, "image_size": 8, "channels": 1, "decoder_channels": 32,
              "normalize_target": mode == "masked"}
    method = build_method("autoencoder", encoder, params)
    out = _one_step(method, torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8))
    assert torch.isfinite(out["loss"])
    assert encoder.backbone.conv1[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["rotation", "jigsaw", "relative_position"])
def test_proxy_tasks_on_grey_digit_sized_images(name):
    method = build_method(name, _tiny_encoder(), TINY_PARAMS.get(name, {}))
    out = _one_step(method, torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8))
    assert torch.isfinite(out["loss"]) and "acc" in out


@pytest.mark.parametrize("name", ["rotation", "jigsaw", "relative_position"])
@pytest.mark.parametrize("hidden_dim, linear_layers", [(None, 1), (16, 2)])
def test_proxy_task_heads_are_linear_or_one_hidden_layer(name, hidden_dim, linear_layers):
    params = {**TINY_PARAMS.get(name, {}), "hidden_dim": hidden_dim}
    method = build_method(name, _tiny_encoder(), params)
    linears = [m for m in method.head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == linear_layers
    assert torch.isfinite(_one_step(method, torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))["loss"])


@pytest.mark.parametrize("name, key, tiles", [("jigsaw", "tile_dim", 9), ("relative_position", "patch_dim", 2)])
def test_patch_tasks_per_tile_layer_sits_between_encoder_and_head(name, key, tiles):
    method = build_method(name, _tiny_encoder(), {**TINY_PARAMS[name], key: 12})
    layer = method.tile_layer if name == "jigsaw" else method.patch_layer
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append((args[0].shape, out.shape)))
    _one_step(method, torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
    (rows, dim), (out_rows, out_dim) = seen[0]
    assert rows == out_rows == 8 * tiles and dim == method.encoder.feature_dim and out_dim == 12  # every tile
    assert next(m for m in method.head.modules() if isinstance(m, torch.nn.Linear)).in_features == tiles * 12
    assert layer[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, size, normalize", [("jigsaw", "tile_size", "normalize_tiles"),
                                                  ("relative_position", "patch_size", "normalize_patches")])
def test_patch_tasks_make_the_encoder_embed_images_as_it_was_trained(name, size, normalize):
    params = {**TINY_PARAMS[name], size: 8, normalize: True}
    encoder = _tiny_encoder()
    build_method(name, encoder, params)
    assert encoder.patch_pooling == PatchPooling(3, 8, True) and encoder.spec["patch_pooling"]["size"] == 8
    whole = _tiny_encoder()
    build_method(name, whole, {**params, "pool_patches": False})
    assert whole.patch_pooling is None and "patch_pooling" not in whole.spec


def test_registry_errors_list_the_valid_choices():
    encoder = _tiny_encoder()
    with pytest.raises(ValueError, match=r"unknown method 'simclr_v9'; choose from \['autoencoder'"):
        build_method("simclr_v9", encoder)
    with pytest.raises(ValueError, match="has no parameter 'temprature'"):
        build_method("simclr", encoder, {"temprature": 0.5})
    assert set(METHODS) >= {"simclr", "autoencoder", "rotation", "jigsaw", "relative_position"}


def test_build_method_builds_a_nested_augment_mapping():
    params = {**TINY_PARAMS["simclr"], "augment": {"crop_scale": [0.2, 1.0], "jitter_strength": "5e-1"}}
    method = build_method("simclr", _tiny_encoder(), params)
    # a list becomes the tuple the field declares, YAML 1.1's "5e-1" string a float
    assert method.augment == ViewAugment(crop_scale=(0.2, 1.0), jitter_strength=0.5)
    ready = ViewAugment(flip_p=0.0)
    assert build_method("simclr", _tiny_encoder(), {"augment": ready}).augment is ready  # a value passes as is
    assert build_method("simclr", _tiny_encoder()).augment == ViewAugment()
    rotation = build_method("rotation", _tiny_encoder(), {"augment": {"crop_scale": [0.6, 1.0], "size": 12}})
    assert rotation.augment == FinetuneAugment(size=12, crop_scale=(0.6, 1.0))
    assert build_method("rotation", _tiny_encoder()).augment == FinetuneAugment(crop_scale=None)  # flips only
    assert build_method("rotation", _tiny_encoder(), {"augment": None}).augment is None
    autoencoder = build_method("autoencoder", _tiny_encoder(), {**TINY_PARAMS["autoencoder"],
                                                                 "augment": {"flip_p": 0.5}})
    assert autoencoder.augment == FinetuneAugment(flip_p=0.5)


def test_nested_augment_errors_name_the_dotted_key_and_the_valid_ones():
    encoder = _tiny_encoder()
    with pytest.raises(ConfigError, match=r"'method.params.augment.crop_scal'; valid keys here: \['blur_p', "
                                          r"'crop_scale', 'flip_p'"):
        build_method("simclr", encoder, {"augment": {"crop_scal": [0.2, 1.0]}})
    with pytest.raises(ConfigError, match="'method.params.augment.flip_p' must be float"):
        build_method("simclr", encoder, {"augment": {"flip_p": "often"}})
    with pytest.raises(ConfigError, match="'method.params.augment.crop_scale' must be"):
        build_method("rotation", encoder, {"augment": {"crop_scale": [0.5]}})  # a pair, not one number


@pytest.mark.parametrize("name, num_views", [("simclr", 2), ("rotation", 1)])
def test_forward_is_augment_then_forward_views(name, num_views):
    method = build_method(name, _tiny_encoder(), {**TINY_PARAMS.get(name, {}),
                                                  "augment": {"crop_scale": [0.5, 1.0]}}).train()
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    out = method({"images": images})
    torch.manual_seed(3)  # the same RNG state: forward_views sees the very views forward made
    views = method.augment.views(images, n=num_views) if num_views > 1 else [method.augment(images)]
    again = method.forward_views(views)
    assert out.keys() == again.keys() and all(torch.equal(out[k], again[k]) for k in out)
    with pytest.raises(ValueError, match=rf"view.*got {3 * num_views}"):
        method.forward_views(views * 3)


def test_augmentation_parameters_are_declared_once():
    """A pipeline's fields live in its dataclass only: methods take the pipeline whole, and no other config
    section re-declares them (SimCLR once had crop_scale, flip_p, ... as keyword arguments)."""
    view_fields = {f.name for f in dataclasses.fields(ViewAugment)}
    pipeline_fields = view_fields | {f.name for f in dataclasses.fields(FinetuneAugment)}
    for name in ("simclr", "rotation", "autoencoder"):
        params = set(inspect.signature(METHODS[name]).parameters)
        assert "augment" in params and not params & pipeline_fields, name
    sections = [cls for cls in vars(reprlab.config).values()
                if dataclasses.is_dataclass(cls) and cls.__module__ == "reprlab.config"]
    assert len(sections) > 5
    for cls in sections:
        assert not {f.name for f in dataclasses.fields(cls)} & (view_fields - {"size"}), cls.__name__


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_pretrain_configs_load_and_name_valid_parameters(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.method.name in METHODS
    if cfg.encoder.name.startswith("timm:vit") or cfg.method.params.get("visible_only"):
        size = cfg.method.params.get("image_size", 32)
        encoder = create_encoder("timm:test_vit", img_size=size, patch_size=4)
    else:
        encoder = _tiny_encoder()
    params = cfg.method.params
    if cfg.method.name == "distill":  # the configs' teachers download: a local one, the other parameters as given
        params = {**params, **TINY_PARAMS["distill"]}
    build_method(cfg.method.name, encoder, params)  # raises on a misspelled parameter
