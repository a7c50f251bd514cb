"""Exports in a library's own format: the weights of the backbone, loadable by torchvision, timm or transformers
without reprlab. Normalization is the user's (mean/std in the folder's config): these are the library's models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from reprlab.export.source import Source, Written
from reprlab.models import hf

HEAD_ATTRS = ("fc", "head", "heads", "classifier")  # where torchvision models keep the classifier


def _save_state(module: nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _call(function: str, *args: str, **kwargs: Any) -> str:
    """Python source of a call: ``_call("f", '"a"', k=1)`` -> ``f("a", k=1)``."""
    return f"{function}({', '.join([*args, *(f'{k}={v!r}' for k, v in kwargs.items())])})"


NORMALIZE = """\
mean = torch.tensor({mean}).view(1, -1, 1, 1)
std = torch.tensor({std}).view(1, -1, 1, 1)
with torch.no_grad():
    features = model((torch.from_numpy(images) - mean) / std)  # {what}"""


# --- torchvision ---------------------------------------------------------------------------------------------


def _replacements(source: Source) -> dict[str, str]:
    """The module replacements that turn ``torchvision.models.<name>()`` into our backbone, as Python source."""
    backbone = source.encoder.backbone
    changes: dict[str, str] = {}
    if source.encoder.spec["kwargs"].get("cifar_stem"):
        conv = backbone.conv1
        changes["conv1"] = (f"torch.nn.Conv2d({conv.in_channels}, {conv.out_channels}, kernel_size=3, stride=1, "
                            f"padding=1, bias=False)")
        changes["maxpool"] = "torch.nn.Identity()"
    head = next(a for a in HEAD_ATTRS if isinstance(getattr(backbone, a, None), nn.Identity))
    changes[head] = "torch.nn.Identity()"
    return changes


def write_torchvision(source: Source, out: Path) -> Written:
    """``model.safetensors`` (the torchvision model, classifier replaced by Identity) + ``config.json`` (the
    constructor, the module replacements, mean/std and input size)."""
    _save_state(source.encoder.backbone, out / "model.safetensors")
    changes = _replacements(source)
    kwargs = {k: v for k, v in source.kwargs.items() if k != "cifar_stem"}
    _write_json(out / "config.json", {
        "library": "torchvision", "constructor": f"torchvision.models.{source.model_name}", "kwargs": kwargs,
        "replace_modules": changes, "stem": "cifar" if "maxpool" in changes else "default",
        "weights": "model.safetensors", "feature_dim": source.encoder.feature_dim,
        "mean": source.mean, "std": source.std, "input_size": source.shape})
    why = {"conv1": "CIFAR stem: 3x3 conv, stride 1", "maxpool": "CIFAR stem: no max-pool"}
    lines = [f"model.{name} = {module}  # {why.get(name, 'features, not logits')}" for name, module in changes.items()]
    snippet = "\n".join([
        "import torch", "import torchvision", "from safetensors.torch import load_file", "",
        f"model = {_call('torchvision.models.get_model', repr(source.model_name), **kwargs)}", *lines,
        'model.load_state_dict(load_file(f"{folder}/model.safetensors"))  # strict: every key matches',
        "model.eval()",
        NORMALIZE.format(mean=source.mean, std=source.std, what=f"(B, {source.encoder.feature_dim})")])
    head = list(changes)[-1]
    notes = ("`config.json` lists the same module replacements (`replace_modules`), the constructor and its "
             "kwargs, mean, std and input size.",)
    return Written("torchvision", snippet, f"the output of the torchvision {source.model_name} with {head} "
                                          f"replaced by Identity (its pooled features)", notes)


# --- timm ----------------------------------------------------------------------------------------------------

SOURCE_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "file", "source", "tag", "state_dict", "custom_load")


def timm_pretrained_cfg(source: Source) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of the backbone with our preprocessing: mean, std, input size, no crop."""
    cfg = {k: v for k, v in dict(source.encoder.backbone.pretrained_cfg or {}).items()
           if v is not None and k not in SOURCE_KEYS}
    if list(cfg.get("input_size", []))[1:] != source.shape[1:]:
        cfg.pop("pool_size", None)  # timm's pooled grid at its own input size
    cfg.pop("test_input_size", None)
    cfg.update(architecture=source.model_name, num_classes=0, input_size=source.shape, mean=source.mean,
               std=source.std, crop_pct=1.0, crop_mode="center")  # our features: the whole image, resized
    return cfg


def write_timm(source: Source, out: Path) -> Written:
    """timm's hub layout: ``model.safetensors`` (num_classes=0) + ``config.json`` (architecture, model_args,
    pretrained_cfg with our mean/std/input size)."""
    model = source.encoder.backbone
    _save_state(model, out / "model.safetensors")
    cfg = timm_pretrained_cfg(source)
    config: dict[str, Any] = {"architecture": cfg.pop("architecture"), "num_classes": 0,
                              "num_features": source.encoder.feature_dim}
    if source.kwargs:
        config["model_args"] = source.kwargs
    _write_json(out / "config.json", {**config, "pretrained_cfg": cfg})
    model_args = "".join(f", {k}={v!r}" for k, v in source.kwargs.items())
    snippet = "\n".join([
        "import json", "", "import timm", "import torch", "",
        'pretrained_cfg = json.load(open(f"{folder}/config.json"))["pretrained_cfg"]',
        f"model = timm.create_model({source.model_name!r}, pretrained=True, num_classes=0{model_args},",
        '                          pretrained_cfg_overlay=dict(pretrained_cfg, file=f"{folder}/model.safetensors"))',
        "model.eval()",
        "data = timm.data.resolve_data_config({}, model=model)  # our mean, std and input size",
        NORMALIZE.format(mean='data["mean"]', std='data["std"]', what=f"(B, {source.encoder.feature_dim})")])
    notes = (f"The same model: `timm.create_model(f\"local-dir:{{folder}}\", pretrained=True)` (timm releases "
             f"with `local-dir:`), `timm.create_model({source.model_name!r}, num_classes=0{model_args}, "
             f"checkpoint_path=f\"{{folder}}/model.safetensors\")` (a strict load), or once uploaded "
             f"`timm.create_model(\"hf-hub:<repo id>\", pretrained=True)`. `config.json` is timm's hub layout; its "
             f"`pretrained_cfg` holds our mean, std and input size (crop_pct 1.0: the whole image).",)
    return Written("timm", snippet, "the output of the timm model created with num_classes=0 (its pooled "
                                    "features, forward_head(pre_logits=True))", notes)


# --- Hugging Face transformers -------------------------------------------------------------------------------


def write_hf(source: Source, out: Path) -> Written:
    """``save_pretrained`` of the transformers model + a ViTImageProcessor config (our mean/std, the model's
    input size), so ``AutoModel`` + ``AutoImageProcessor`` give our features."""
    from transformers import ViTImageProcessor
    from transformers.image_utils import PILImageResampling

    model = source.encoder.backbone.model
    if hasattr(model.config, "_reprlab"):  # our bookkeeping in the config: not the user's business
        delattr(model.config, "_reprlab")
    model.save_pretrained(out)
    size = source.encoder.input_size  # ViT-like models take a fixed size; the encoder resizes to it (bilinear)
    ViTImageProcessor(do_resize=size is not None, size={"height": size or 224, "width": size or 224},
                      resample=PILImageResampling.BILINEAR, do_rescale=True, rescale_factor=1 / 255,
                      do_normalize=True, image_mean=source.mean, image_std=source.std).save_pretrained(out)
    code, words = hf.output_code(source.encoder.backbone, size or source.input_size)
    snippet = "\n".join([
        "import torch", "from transformers import AutoImageProcessor, AutoModel", "",
        "model = AutoModel.from_pretrained(folder).eval()",
        "processor = AutoImageProcessor.from_pretrained(folder)",
        "# images in [0, 1]: do_rescale=False; for PIL or uint8 images leave it out",
        'inputs = processor(images=images, do_rescale=False, input_data_format="channels_first", '
        'return_tensors="pt")',
        "with torch.no_grad():",
        f"    features = {code}  # (B, {source.encoder.feature_dim})"])
    notes = () if size is None else (
        f"The processor resizes to the model's {size} px; ours is bilinear without antialiasing, so with the "
        f"processor's torchvision backend (transformers 5's default) features match ours for images of {size} px "
        f"or smaller. Its PIL backend rounds images to 8 bits (differences about 1e-3), and both antialias when "
        f"they shrink larger images.",)
    return Written("transformers", snippet, f"the transformers model's {words}", notes,
                   extra={"output": words, "processor_size": size})
