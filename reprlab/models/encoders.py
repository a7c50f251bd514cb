"""One encoder interface over torchvision, timm and Hugging Face transformers.

``create_encoder(name)`` returns an :class:`Encoder`: ``encoder(images) -> (B, feature_dim)`` for float images in
[0, 1] of shape (B, C, H, W). Normalization lives inside, and greyscale input is repeated to three channels, so
every caller feeds the same thing. ``encoder.layer_groups()`` lists parameter groups from input to output for
freezing policies and layer-wise learning-rate decay. ``encoder.pool_patches(PatchPooling(...))`` makes it embed
an image as the mean of its features over a grid of patches (how encoders of patch-based proxy tasks see images).

Names: ``resnet18`` (any torchvision classification model; ``cifar_stem=True`` for 32 px ResNets),
``timm:<model>`` (any timm model, classifier removed), ``hf:<hub id or local dir>`` (AutoModel; pooling,
weight checks and kwargs in :mod:`reprlab.models.hf`). A kwarg the family does not take is a
:class:`~reprlab.config.ConfigError` naming the valid ones.

Pooling: torchvision models keep their own (global average; ViT: the class token after the final norm).
timm pools with its ``global_pool`` kwarg at the model's default (ViT, DeiT, DINOv2: ``token``, the CLS token
after the final norm; convnets: ``avg``), recorded in the spec. HF: ``encoder.kwargs.pooling``, default per
family (CLS after the final norm for ViT / DeiT / DINOv2 / CLIP, the mean of the patch tokens for ViT-MAE, the
model's pooler for ConvNeXt / ResNet), recorded in the spec, so ``load_encoder`` rebuilds it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.config import ConfigError
from reprlab.data.patches import cut_patches, default_tile_size, grid_boxes, standardize_patches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PatchPooling:
    """An image's embedding as the mean of the encoder's features over a ``grid`` x ``grid`` of whole cells, each
    resized to ``size`` px (None: its own size, at least 8) and, with ``standardize``, normalized on its own.

    Encoders trained on patches (jigsaw, relative position) embed an image at the scale they were trained on, as
    in Kolesnikov et al. (2019)'s evaluation of those tasks (3x3 patches, features averaged)."""

    grid: int = 3
    size: int | None = None
    standardize: bool = False


class Encoder(nn.Module):
    """Wraps a backbone: normalizes [0, 1] images, runs it, returns pooled features (B, feature_dim).

    ``features(images)``: one feature vector per input. ``forward(images)``: the same, or with
    :meth:`pool_patches` set, the mean over a grid of patches of every image."""

    def __init__(self, backbone: nn.Module, feature_dim: int, spec: dict[str, Any],
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 groups: list[tuple[str, list[str]]] | None = None, input_size: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self._architecture = spec  # {"name": ..., "kwargs": {...}}: enough to rebuild the architecture
        self.input_size = input_size  # models with a fixed input resolution (HF ViT) get resized input
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self._groups = groups
        self.patch_pooling: PatchPooling | None = None

    def pool_patches(self, pooling: PatchPooling | None) -> Encoder:
        """Embed every image as the mean over a grid of its patches from now on (None: the whole image); part of
        ``spec``, so checkpoints rebuild it."""
        self.patch_pooling = pooling
        return self

    @property
    def spec(self) -> dict[str, Any]:
        """What checkpoints store to rebuild this encoder (:func:`encoder_from_spec`): the architecture's
        ``{"name", "kwargs"}`` and, when set, the patch pooling."""
        if self.patch_pooling is None:
            return self._architecture
        return {**self._architecture, "patch_pooling": asdict(self.patch_pooling)}

    def forward(self, images: Tensor) -> Tensor:
        pooling = self.patch_pooling
        if pooling is None:
            return self.features(images)
        batch, _, height, width = images.shape
        boxes = grid_boxes(batch, height, width, pooling.grid, gap=0.0, jitter=0.0, device=images.device)
        size = pooling.size or default_tile_size(height, width, pooling.grid, gap=0.0)
        patches = cut_patches(images, boxes, size)  # (B, T, C, s, s)
        if pooling.standardize:
            patches = standardize_patches(patches, self.mean, self.std)
        return self.features(patches.flatten(0, 1)).view(batch, patches.shape[1], -1).mean(dim=1)

    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) float images in [0, 1] -> (B, feature_dim), one vector per input."""
        if images.shape[1] == 1 and self.mean.shape[1] == 3:
            images = images.expand(-1, 3, -1, -1)
        if self.input_size is not None and images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=False)
        images = (images - self.mean) / self.std
        return self.backbone(images)

    def layer_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Parameter groups ordered from input to output: ``[(group name, [params]), ...]``.

        Every backbone parameter is in exactly one group. Freezing policies and layer-wise LR decay speak in
        these groups (ResNet: stem, layer1..4; ViT: stem, blocks; HF: embeddings, layer0.., head)."""
        named = dict(self.backbone.named_parameters())
        groups = self._groups if self._groups is not None else _trunk_groups(self.backbone)
        return [(group, [named[n] for n in names]) for group, names in groups]


def _prefix_groups(model: nn.Module,
                   prefixes: list[tuple[str, tuple[str, ...]]]) -> list[tuple[str, list[str]]]:
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


def _trunk_groups(model: nn.Module, stem: str = "stem", head: str = "head",
                  layer_name: str | None = None) -> list[tuple[str, list[str]]]:
    """Groups around the model's trunk, for architectures without a declared grouping.

    The trunk is the ``nn.Sequential`` / ``nn.ModuleList`` with at least two parameterized children that holds
    the most parameters (ties: the most children), e.g. ViT blocks, EfficientNet/ConvNeXt ``features``, HF
    ``encoder.layer`` / ``stages``: one group per child, named ``layer_name.format(i)`` (default
    ``<trunk path>.<child>``); parameters registered before it form ``stem``, after it ``head``. Without a
    trunk: one group per top-level child.
    """
    trunk: tuple[int, int, str, list[str]] | None = None  # (parameters held, children, path, child names)
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        children = [n for n, c in module.named_children() if any(True for _ in c.parameters())]
        held = sum(p.numel() for p in module.parameters())
        if len(children) >= 2 and (trunk is None or (held, len(children)) > trunk[:2]):
            trunk = (held, len(children), path, children)
    if trunk is None:
        return _prefix_groups(model, [(n, (n + ".",)) for n, m in model.named_children()
                                      if any(True for _ in m.parameters())] or [(stem, ("",))])
    _, _, path, children = trunk
    prefix = f"{path}." if path else ""
    names = {c: (layer_name.format(i) if layer_name else f"{prefix}{c}") for i, c in enumerate(children)}
    groups: dict[str, list[str]] = {stem: [], **{names[c]: [] for c in children}, head: []}
    after_trunk = False
    for pname, _ in model.named_parameters():
        if pname.startswith(prefix) and pname[len(prefix):].split(".")[0] in names:
            groups[names[pname[len(prefix):].split(".")[0]]].append(pname)
            after_trunk = True
        else:  # registration order tells embeddings (before the trunk) from the final norm / pooler (after)
            groups[head if after_trunk else stem].append(pname)
    return [(g, group_names) for g, group_names in groups.items() if group_names]


def _group_name(index: int, names: list[str]) -> str:
    """A readable name for a timm parameter group: its module path up to the first part holding a digit
    ("blocks.3", "layer2", "stages.1"); "stem" for a leading group of loose parameters (cls token, ...)."""
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    if not common and index == 0:
        return "stem"
    source = common or parts[0]
    for depth, part in enumerate(source):
        if any(ch.isdigit() for ch in part):
            return ".".join(source[: depth + 1])
    return source[0] if source else f"group{index}"


# --- kwargs checks -------------------------------------------------------------------------------------------

KWARG_HINTS = {"cifar_stem": "cifar_stem is for torchvision ResNets such as resnet18",
               "pooling": "timm pools with its global_pool kwarg, e.g. 'token' or 'avg'"}


def _build_checked(name: str, kwargs: dict[str, Any], build: Callable[[], nn.Module],
                   bare: Callable[[], nn.Module], extra: Iterable[str] = ()) -> nn.Module:
    """``build()``; when it fails on a kwarg the model does not take, a one-line ConfigError naming the valid
    ones (the init arguments of the class ``bare()`` builds, on the meta device: nothing is allocated)."""
    try:
        return build()
    except TypeError as err:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if not found or found.group(1) not in kwargs:
            raise
        with torch.device("meta"):
            model_class = type(bare())
        skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        valid = [*extra, *(p for p, v in inspect.signature(model_class.__init__).parameters.items()
                           if p != "self" and v.kind not in skip)]
        key = found.group(1)
        hint = f" ({KWARG_HINTS[key]})" if key in KWARG_HINTS else ""
        raise ConfigError(f"encoder.kwargs.{key}: {name!r} ({model_class.__name__}) takes no {key!r}{hint}; "
                          f"valid kwargs: {valid}") from None


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
    model = _build_checked(name, kwargs, lambda: torchvision.models.get_model(name, weights=tv_weights, **kwargs),
                           lambda: torchvision.models.get_model(name), extra=["cifar_stem"])
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
        stages = [(f"layer{i}", (f"layer{i}.",)) for i in range(1, 5)]
        groups = _prefix_groups(model, [("stem", ("conv1.", "bn1.")), *stages])
    else:  # VGG, EfficientNet, ConvNeXt, ViT, ...: around the trunk of blocks
        groups = _trunk_groups(model)
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
    model = _build_checked(f"timm:{model_name}", kwargs,
                           lambda: timm.create_model(model_name, num_classes=0, **kwargs_create, **kwargs),
                           lambda: timm.create_model(model_name, num_classes=0))
    if isinstance(getattr(model, "global_pool", None), str) and "global_pool" in inspect.signature(
            type(model).__init__).parameters:  # the pooling in the spec: rebuilt the same whatever timm's default
        kwargs = {**kwargs, "global_pool": model.global_pool}
    cfg = model.pretrained_cfg or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if hasattr(model, "group_matcher"):  # timm's own grouping (also used by its layer-decay optimizers)
        from timm.models import group_parameters

        by_id = group_parameters(model, model.group_matcher(coarse=True))
        groups, seen = [], set()
        for i, (_, names) in enumerate(sorted(by_id.items())):
            name = _group_name(i, names)
            name = name if name not in seen else f"{name}.{i}"
            seen.add(name)
            groups.append((name, names))
    else:
        groups = _trunk_groups(model)
    return Encoder(model, model.num_features, {"name": f"timm:{model_name}", "kwargs": kwargs}, mean, std, groups)


# --- Hugging Face transformers -------------------------------------------------------------------------------


def _hf_encoder(model_id: str, pretrained: bool, weights: str | None, hf_config: dict | None = None,
                pooling: str | None = None, input_size: int | None = None, **kwargs: Any) -> Encoder:
    """``hf:<hub id or local dir>``: pooling, weight checks and kwargs in :mod:`reprlab.models.hf`."""
    from reprlab.models import hf

    model, pooling = hf.build_model(model_id, pretrained, weights, hf_config, pooling, kwargs)
    config = model.config
    mean, std, input_size = hf.image_stats(model_id, config, hf_config, input_size, legacy=pooling == "auto")
    wrapper = hf.HFPooled(model, pooling)
    if weights:
        load_weights_file(model, weights)
    config_dict = config.to_dict()
    config_dict["_reprlab"] = {"image_mean": list(mean), "image_std": list(std)}
    spec_kwargs: dict[str, Any] = {"hf_config": config_dict, "input_size": input_size}
    if pooling != "auto":  # "auto": a run directory from before pooling was recorded keeps its spec as it was
        spec_kwargs["pooling"] = pooling
    spec = {"name": f"hf:{model_id}", "kwargs": spec_kwargs}
    # layers of the trunk: "model.encoder.layer.3." (ViT, transformers 4), "model.layers.3." (5),
    # "model.encoder.stages.1." (ResNet, ConvNeXt); embeddings before, final layernorm / pooler after
    groups = _trunk_groups(wrapper, stem="embeddings", head="head", layer_name="layer{}")
    return Encoder(wrapper, hf.feature_dim(config, pooling), spec, mean, std, groups, input_size)


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


def encoder_from_spec(spec: dict[str, Any]) -> Encoder:
    """Rebuild an encoder's architecture (random weights) from its ``spec``, as checkpoints store it."""
    encoder = create_encoder(spec["name"], **spec.get("kwargs", {}))
    if spec.get("patch_pooling"):
        encoder.pool_patches(PatchPooling(**spec["patch_pooling"]))
    return encoder


class PixelEncoder(nn.Module):
    """The raw-pixel baseline: flattened images as features."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = {"name": "pixels", "kwargs": {}}

    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(1)
