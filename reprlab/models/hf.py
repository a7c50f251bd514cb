"""Hugging Face transformers encoders (``hf:<hub id or local dir>``): explicit pooling, no silently random
weights, deterministic features in eval.

Pooling, ``encoder.kwargs.pooling``; the default depends on the family (``config.model_type``), see
``DEFAULT_POOLING`` (peers-2026.md §5):

- ``cls``: the CLS token after the final norm. Default for ViT, DeiT, DINOv2 (with registers) and CLIP / SigLIP
  vision towers (CLIP's final ``post_layernorm`` only runs inside its ``pooler_output``, so ``cls`` reads it there).
- ``mean``: the mean of the patch tokens after the final norm (CLS, register and distillation tokens left out),
  MAE's global pooling; the spatial mean of the last feature map for convnets. Default for ViT-MAE and for
  every family not in the table.
- ``cls_mean``: ``cls`` and ``mean`` concatenated (DINOv2's linear protocol): twice the hidden size.
- ``pooler``: the model's own ``pooler_output``. Default for ConvNeXt (LayerNorm of the global average) and
  ResNet (global average). Refused when the checkpoint holds no weights for it: ``ViTForImageClassification``
  checkpoints carry no ``pooler.dense``, which ``ViTModel`` would initialize at random.

Loading: ``pretrained=True`` refuses a checkpoint that leaves any weight of the model at its random init (the
missing keys are named). A pooler that the pooling does not read is not built (``add_pooling_layer=False``), so
no random weight is saved or trained either. ViT-MAE is built with ``mask_ratio=0`` and fed the identity
"noise", so it sees every patch, in order, in train and eval alike (continued MAE pretraining masks the input
itself: reprlab.ssl.autoencoder). A local directory that holds weights needs ``pretrained=True``: without it
the architecture would be built with random weights while weights lie right there, so that is an error saying
so (a folder holding only ``config.json`` builds a random model on purpose).

``encoder.kwargs``: ``pooling``, ``input_size`` (the side images are resized to; default: the checkpoint's own
resolution for ViT-style models, none for convnets) and any attribute of the model's config
(``hidden_dropout_prob``, ``drop_path_rate``, ...); anything else is a :class:`~reprlab.config.ConfigError`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reprlab.config import ConfigError

POOLINGS = ("cls", "mean", "cls_mean", "pooler")
DEFAULT_POOLING = {
    "vit": "cls", "deit": "cls", "dinov2": "cls", "dinov2_with_registers": "cls", "dinov3_vit": "cls",
    "clip_vision_model": "cls", "siglip_vision_model": "pooler",  # SigLIP has no CLS: its pooler is a MAP head
    "vit_mae": "mean",
    "convnext": "pooler", "convnextv2": "pooler", "resnet": "pooler",
}
CLS_FROM_POOLER = {"clip_vision_model"}  # the CLS token's final norm runs only inside pooler_output
VISION_TOWERS = {"clip", "siglip"}  # image-text checkpoints: load the vision tower only
INTERPOLATING = ("dinov2", "dinov3")  # model types that take any multiple of the patch size (DINOv2 trains at 224)
FIXED_SIZE = ("clip_vision_model", "siglip_vision_model")  # besides *vit* / *deit*: one input resolution
CONVNETS = ("convnext", "convnextv2", "resnet", "regnet", "efficientnet", "mobilenet_v2", "bit")  # 4-D outputs
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


class HFPooled(nn.Module):
    """An HF vision model -> (B, D) features under an explicit ``pooling`` (module docstring)."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling
        config = model.config
        self.model_type = config.model_type
        patch = getattr(config, "patch_size", None)
        self.patch = (patch if isinstance(patch, int) else patch[0]) if patch is not None else None

    def forward(self, pixel_values: Tensor) -> Tensor:
        kwargs: dict[str, Tensor] = {}
        if self.model_type == "vit_mae":  # the identity order: mask_ratio 0 keeps every patch, in place
            patches = (pixel_values.shape[-2] // self.patch) * (pixel_values.shape[-1] // self.patch)
            kwargs["noise"] = torch.arange(patches, device=pixel_values.device, dtype=torch.float32).expand(
                pixel_values.shape[0], -1)
        out = self.model(pixel_values=pixel_values, **kwargs)
        if self.pooling == "auto":  # run directories written before pooling was recorded: what they were
            pooled = getattr(out, "pooler_output", None)
            return pooled.flatten(1) if pooled is not None else _mean(out.last_hidden_state, None, None)
        if self.pooling == "pooler":
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state  # (B, T, D) tokens or (B, C, h, w) feature map
        mean = _mean(hidden, self.patch, pixel_values.shape[-2:])
        if self.pooling == "mean":
            return mean
        cls = out.pooler_output if self.model_type in CLS_FROM_POOLER else hidden[:, 0]  # (B, D)
        return cls if self.pooling == "cls" else torch.cat([cls, mean], dim=1)


def _mean(hidden: Tensor, patch: int | None, size: Any) -> Tensor:
    """Mean over the patch tokens (the trailing (H/p)(W/p) tokens) or over a feature map's positions."""
    if hidden.ndim == 4:
        return hidden.mean(dim=(2, 3))
    if patch is not None and size is not None:
        patches = (size[0] // patch) * (size[1] // patch)
        if 0 < patches < hidden.shape[1]:
            return hidden[:, -patches:].mean(dim=1)
    return hidden.mean(dim=1)


def _takes_pooling_flag(config: Any) -> bool:
    """Whether the AutoModel class of ``config`` can be built without its pooler (ViT, DeiT, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(config)]
    except KeyError:  # a config AutoModel does not map (remote code): build it as it comes
        return False
    return "add_pooling_layer" in inspect.signature(model_class.__init__).parameters


def _check_kwargs(name: str, config: Any, overrides: dict[str, Any]) -> None:
    for key in overrides:
        if not hasattr(config, key):
            hint = " (cifar_stem is for torchvision ResNets such as resnet18)" if key == "cifar_stem" else ""
            raise ConfigError(f"encoder.kwargs.{key}: {name!r} takes no {key!r}{hint}; valid kwargs: pooling, "
                              f"input_size or an attribute of {type(config).__name__} (e.g. drop_path_rate)")


def _resolve_config(model_id: str, name: str, hf_config: dict | None, overrides: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    if hf_config is not None:  # rebuilding from a run's meta.json: no hub access needed
        return AutoConfig.for_model(**hf_config)
    config = AutoConfig.from_pretrained(model_id)
    if config.model_type in VISION_TOWERS:
        config = config.vision_config
    _check_kwargs(name, config, overrides)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _missing_weights_error(name: str, missing: list[str], pooling: str) -> Exception:
    from reprlab.checkpoint import CheckpointError

    if all(k.startswith("pooler.") for k in missing) and pooling == "pooler":
        return ConfigError(f"encoder {name!r}: its checkpoint has no pooler weights ({', '.join(missing)}), so "
                           f"pooling=pooler would read a random layer; use encoder.kwargs.pooling=cls (or mean)")
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return CheckpointError(f"encoder {name!r}: the checkpoint leaves {len(missing)} weights of the model at their "
                           f"random init ({shown}); it does not hold this architecture's weights")


def build_model(model_id: str, pretrained: bool, weights: str | None, hf_config: dict | None,
                pooling: str | None, overrides: dict[str, Any]) -> tuple[nn.Module, str]:
    """The HF model (pretrained weights checked for completeness) and the resolved pooling."""
    from transformers import AutoModel

    name = f"hf:{model_id}"
    local = Path(model_id)
    if (hf_config is None and not pretrained and not weights and local.is_dir()
            and any((local / f).is_file() for f in WEIGHT_FILES)):
        raise ConfigError(f"encoder {name!r} is a local folder with weights but encoder.pretrained=false would "
                          f"ignore them; set encoder.pretrained=true (a random init: a folder with only config.json)")
    config = _resolve_config(model_id, name, hf_config, overrides)
    if config.model_type == "vit_mae":
        config.mask_ratio = 0.0  # features see every patch (the default 0.75 masks at random, even in eval)
    if pooling is None:
        pooling = "auto" if hf_config is not None else DEFAULT_POOLING.get(config.model_type, "mean")
    elif pooling not in POOLINGS:
        raise ConfigError(f"encoder.kwargs.pooling={pooling!r}; choose from {list(POOLINGS)}")
    model_kwargs: dict[str, Any] = {}
    if pooling not in ("pooler", "auto") and _takes_pooling_flag(config):
        model_kwargs["add_pooling_layer"] = False  # unread, and random in classification checkpoints
    if pretrained and hf_config is None:
        model, info = AutoModel.from_pretrained(model_id, config=config, output_loading_info=True, **model_kwargs)
        missing = sorted(info["missing_keys"])
        if missing:
            raise _missing_weights_error(name, missing, pooling)
    else:
        model = AutoModel.from_config(config, **model_kwargs)
    return model, pooling


def image_stats(model_id: str, config: Any, hf_config: dict | None, input_size: int | None,
                legacy: bool = False) -> tuple[tuple, tuple, int | None]:
    """(mean, std, input side) from the saved spec, else the checkpoint's image processor. ``legacy``: a spec
    written before pooling and input size were recorded (only ViT and DeiT were resized then)."""
    mean, std, crop = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None
    saved = (hf_config or {}).get("_reprlab", {})
    if "image_mean" in saved:
        mean, std = tuple(saved["image_mean"]), tuple(saved["image_std"])
    elif hf_config is None:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(model_id)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
            crop = _height(getattr(processor, "crop_size", None))
        except Exception:  # noqa: BLE001 - no processor saved with the model: use the common ViT convention
            pass
    if input_size is None:
        model_type = config.model_type
        if legacy:
            input_size = config.image_size if "vit" in model_type or "deit" in model_type else None
        elif model_type.startswith(INTERPOLATING):
            input_size = crop or getattr(config, "image_size", None)
        elif "vit" in model_type or "deit" in model_type or model_type in FIXED_SIZE:
            input_size = getattr(config, "image_size", None)  # fixed-size position embeddings
    return mean, std, input_size


def _height(size: Any) -> int | None:
    """The height of a processor's size: a dict (transformers 4) or a SizeDict (5)."""
    value = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    return int(value) if value else None


def feature_dim(config: Any, pooling: str) -> int:
    dim = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]
    return 2 * dim if pooling == "cls_mean" else dim


def output_code(pooled: HFPooled, size: int, output: str = "model(**inputs)") -> tuple[str, str]:
    """How to read our features off ``output`` (the transformers model's output) with transformers alone, for
    ``size`` px input: (code, words), for reprlab.export. ViT-MAE also needs ``noise=torch.arange(L).expand(B, -1)``
    passed to the model (the identity order)."""
    patches = (size // pooled.patch) ** 2 if pooled.patch else None
    tokens = f"{output}.last_hidden_state[:, -{patches}:]" if patches else f"{output}.last_hidden_state"
    cls = f"{output}.pooler_output" if pooled.model_type in CLS_FROM_POOLER else f"{output}.last_hidden_state[:, 0]"
    codes = {"pooler": (f"{output}.pooler_output.flatten(1)", "pooler_output (flattened)"),
             "cls": (cls, "CLS token after the final norm"),
             "mean": (f"{tokens}.mean(dim=1)", "mean of the patch tokens"),
             "cls_mean": (f"torch.cat([{cls}, {tokens}.mean(dim=1)], dim=1)", "CLS token and mean patch token")}
    if pooled.pooling == "mean" and pooled.model_type in CONVNETS:
        return f"{output}.last_hidden_state.mean(dim=(2, 3))", "last_hidden_state averaged over dim (2, 3)"
    return codes.get(pooled.pooling, codes["pooler"])
