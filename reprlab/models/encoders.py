"""One encoder interface over torchvision, timm and Hugging Face transformers.

``create_encoder(name)`` returns an :class:`Encoder`: ``encoder(images) -> (B, feature_dim)`` for float images in
[0, 1] of shape (B, C, H, W). Normalization lives inside, and greyscale input is repeated to three channels, so
every caller feeds the same thing. ``encoder.layer_groups()`` lists parameter groups from input to output for
freezing policies and layer-wise learning-rate decay.

Names: ``resnet18`` (any torchvision classification model; ``cifar_stem=True`` for 32 px ResNets),
``timm:<model>`` (any timm model, classifier removed), ``hf:<hub id or local dir>`` (AutoModel, pooled output).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(nn.Module):
    """Wraps a backbone: normalizes [0, 1] images, runs it, returns pooled features (B, feature_dim)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, spec: dict[str, Any],
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 groups: list[tuple[str, list[str]]] | None = None, input_size: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.spec = spec  # {"name": ..., "kwargs": {...}}: enough to rebuild the architecture
        self.input_size = input_size  # models with a fixed input resolution (HF ViT) get resized input
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self._groups = groups

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1 and self.mean.shape[1] == 3:
            images = images.expand(-1, 3, -1, -1)
        if self.input_size is not None and images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=False)
        images = (images - self.mean) / self.std
        return self.backbone(images)

    def layer_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Parameter groups ordered from input to output: ``[(group name, [params]), ...]``."""
        named = dict(self.backbone.named_parameters())
        if self._groups is None:
            return [(name, [p]) for name, p in named.items()]
        return [(group, [named[n] for n in names]) for group, names in self._groups]


def _prefix_groups(model: nn.Module, prefixes: list[tuple[str, tuple[str, ...]]]) -> list[tuple[str, list[str]]]:
    """Assign each parameter to the first group whose prefixes match its name; unmatched ones join the nearest
    earlier group (or the first)."""
    groups: dict[str, list[str]] = {name: [] for name, _ in prefixes}
    last = prefixes[0][0]
    for pname, _ in model.named_parameters():
        for group, pre in prefixes:
            if pname.startswith(pre):
                last = group
                break
        groups[last].append(pname)
    return [(g, names) for g, names in groups.items() if names]


# --- torchvision ---------------------------------------------------------------------------------------------


def _strip_torchvision_head(model: nn.Module) -> int:
    """Replace the classifier with Identity and return the feature dimension."""
    for attr in ("fc", "head", "heads", "classifier"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if not isinstance(head, nn.Linear) else [head]
        if not linears:
            continue
        setattr(model, attr, nn.Identity())
        return linears[0].in_features
    raise ValueError(f"cannot find the classifier of {type(model).__name__} to remove; use a timm: or hf: encoder")


def _torchvision_encoder(name: str, pretrained: bool, weights: str | None, cifar_stem: bool = False,
                         **kwargs: Any) -> Encoder:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown encoder {name!r}: not a torchvision classification model; "
                         f"use e.g. resnet18, 'timm:<model>' or 'hf:<hub id or local dir>'")
    tv_weights = None
    local_file = weights if weights and Path(weights).exists() else None
    if pretrained or (weights and not local_file):
        tv_weights = weights or "DEFAULT"  # torchvision's own download path (e.g. IMAGENET1K_V1)
    model = torchvision.models.get_model(name, weights=tv_weights, **kwargs)
    feature_dim = _strip_torchvision_head(model)
    if cifar_stem:
        if not hasattr(model, "conv1") or not hasattr(model, "maxpool"):
            raise ValueError(f"cifar_stem applies to ResNet-style models (conv1 + maxpool), not {name!r}")
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if local_file:
        load_weights_file(model, local_file)
    spec = {"name": name, "kwargs": {"cifar_stem": cifar_stem, **kwargs}}
    if hasattr(model, "layer4"):  # ResNet family: stem, four stages
        groups = _prefix_groups(model, [("stem", ("conv1", "bn1")), ("layer1", ("layer1",)), ("layer2", ("layer2",)),
                                        ("layer3", ("layer3",)), ("layer4", ("layer4",))])
    else:  # generic: top-level children in definition order
        groups = _prefix_groups(model, [(n, (n + ".",)) for n, m in model.named_children()
                                        if any(True for _ in m.parameters())])
    return Encoder(model, feature_dim, spec, groups=groups)


def load_weights_file(model: nn.Module, path: str) -> None:
    """Strictly load a local safetensors (or weights-only torch) file into ``model``."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "head", "classifier"))]
    unexpected = [k for k in unexpected if not k.startswith(("fc.", "head", "classifier"))]
    if missing or unexpected:
        raise ValueError(f"weights file {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


# --- timm ----------------------------------------------------------------------------------------------------


def _timm_encoder(model_name: str, pretrained: bool, weights: str | None, **kwargs: Any) -> Encoder:
    import timm

    if weights:  # timm's own loading path, pointed at a local file instead of the hub
        kwargs_create = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(weights)}}
    else:
        kwargs_create = {"pretrained": pretrained}
    model = timm.create_model(model_name, num_classes=0, **kwargs_create, **kwargs)
    cfg = model.pretrained_cfg or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    groups = None
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        by_id = group_parameters(model, model.group_matcher(coarse=True))
        groups = [(f"group{i}", names) for i, names in sorted(by_id.items())]
    return Encoder(model, model.num_features, {"name": f"timm:{model_name}", "kwargs": kwargs}, mean, std, groups)


# --- Hugging Face transformers -------------------------------------------------------------------------------


class _HFPooled(nn.Module):
    """pooler_output when the model has one, else the mean of the last hidden state over tokens/positions."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.model(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = out.last_hidden_state
            pooled = hidden.mean(dim=1) if hidden.ndim == 3 else hidden.mean(dim=(2, 3))
        return pooled.flatten(1)


def _hf_encoder(model_id: str, pretrained: bool, weights: str | None, hf_config: dict | None = None,
                **kwargs: Any) -> Encoder:
    from transformers import AutoConfig, AutoModel

    if hf_config is not None:  # rebuilding from a run's meta.json: no hub access needed
        config = AutoConfig.for_model(**hf_config)
        model = AutoModel.from_config(config)
    elif pretrained:
        model = AutoModel.from_pretrained(model_id, **kwargs)
    else:
        model = AutoModel.from_config(AutoConfig.from_pretrained(model_id, **kwargs))
    config = model.config
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if hf_config is None:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(model_id)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        except Exception:  # noqa: BLE001 - no processor saved with the model: use the common ViT convention
            pass
    if hf_config is not None and "image_mean" in hf_config.get("_reprlab", {}):
        mean, std = tuple(hf_config["_reprlab"]["image_mean"]), tuple(hf_config["_reprlab"]["image_std"])
    feature_dim = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]
    input_size = getattr(config, "image_size", None) if "vit" in config.model_type or "deit" in config.model_type \
        else None
    wrapper = _HFPooled(model)
    if weights:
        load_weights_file(model, weights)
    config_dict = config.to_dict()
    config_dict["_reprlab"] = {"image_mean": list(mean), "image_std": list(std)}
    spec = {"name": f"hf:{model_id}", "kwargs": {"hf_config": config_dict}}
    # transformer / stage layers: "model.encoder.layer.3." (transformers 4), "model.layers.3." (5), ...
    layer_re = re.compile(r"^(model\.(?:.*\.)?(?:layer|layers|stages|blocks)\.)(\d+)\.")
    found = [m for n, _ in wrapper.named_parameters() if (m := layer_re.match(n))]
    prefixes = [("embeddings", ("model.embeddings",))]
    if found:
        layer_prefix = found[0].group(1)
        n_layers = len({m.group(2) for m in found if m.group(1) == layer_prefix})
        prefixes += [(f"layer{i}", (f"{layer_prefix}{i}.",)) for i in range(n_layers)]
    prefixes += [("head", ("model.layernorm", "model.pooler", "model.norm"))]
    return Encoder(wrapper, feature_dim, spec, mean, std, _prefix_groups(wrapper, prefixes), input_size)


# --- factory -------------------------------------------------------------------------------------------------


def create_encoder(name: str, pretrained: bool = False, weights: str | None = None, **kwargs: Any) -> Encoder:
    """Build an encoder by name: ``resnet18`` (torchvision), ``timm:<model>`` or ``hf:<hub id or local dir>``.

    ``pretrained`` loads the library's own weights (downloads them on first use); ``weights`` is a local file
    (safetensors / weights-only torch; for torchvision also a weights name such as ``IMAGENET1K_V1``).
    """
    if name.startswith("timm:"):
        return _timm_encoder(name[5:], pretrained, weights, **kwargs)
    if name.startswith("hf:"):
        return _hf_encoder(name[3:], pretrained, weights, **kwargs)
    return _torchvision_encoder(name, pretrained, weights, **kwargs)


class PixelEncoder(nn.Module):
    """The raw-pixel baseline: flattened images as features."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = {"name": "pixels", "kwargs": {}}

    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(1)
