"""Up-front checks of a stage's config: everything that can be judged before any data loads or model is built.

Each stage (reprlab.stages.*) calls its check first, so the command line and the Python API fail alike: one
:class:`~reprlab.config.ConfigError` line naming the key, the bad value and the fix or the valid choices. What only
the data can tell (a batch larger than the dataset, one class, too few images of a class) is checked where it is
known (reprlab.stages.common), in the same form.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from reprlab.config import (
    ConfigError,
    DataConfig,
    EncoderConfig,
    EvaluateConfig,
    FinetuneConfig,
    OptimConfig,
    PretrainConfig,
    TrainConfig,
    build_dataclass,
    dataclass_in,
)
from reprlab.hardware import PRECISIONS

LR_SCALINGS = ("none", "linear", "sqrt")
HEAD_INITS = ("zeros", "xavier", "he", "default")
DEVICES = "auto | cpu | cuda | cuda:N | mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
MIN_IMAGE_SIZE = 8  # digits' native side; below it a ResNet's stem leaves nothing to pool
ENCODER_FORMS = ("<torchvision model> (e.g. resnet18)", "timm:<model> (any timm model, e.g. timm:resnet18)",
                 "hf:<hub id or local dir> (transformers AutoModel)")
RUN_KEYWORDS = ("random", "pixels")  # evaluate's encoders besides run directories


# --------------------------------------------------------------------------------------------- registries


def registries() -> dict[str, list[str]]:
    """Every name a config can pick, by registry: for ``reprlab list``, the stage help and the checks."""
    from reprlab.data.datasets import DATASETS
    from reprlab.finetune.policies import POLICIES
    from reprlab.loggers import LOGGERS
    from reprlab.optim import OPTIMIZERS, SCHEDULES
    from reprlab.ssl import METHODS

    return {"methods": list(METHODS), "policies": list(POLICIES), "optimizers": list(OPTIMIZERS),
            "schedules": list(SCHEDULES), "datasets": list(DATASETS), "loggers": list(LOGGERS),
            "encoders": list(ENCODER_FORMS)}


def key_choices() -> dict[str, list[str]]:
    """The valid values of every key that picks from a fixed set, by dotted key (any stage)."""
    from reprlab.evaluate.knn import BACKENDS, INDEXES
    from reprlab.evaluate.plots import MAP_METHODS

    reg = registries()
    return {"method.name": reg["methods"], "policy.name": reg["policies"], "optim.name": reg["optimizers"],
            "optim.schedule": reg["schedules"], "optim.lr_scaling": list(LR_SCALINGS),
            "train.precision": list(PRECISIONS), "train.loggers": reg["loggers"], "train.device": [DEVICES],
            "device": [DEVICES], "head.init": list(HEAD_INITS), "knn.backend": list(BACKENDS),
            "knn.index": list(INDEXES), "report_map": list(MAP_METHODS), "data.name": reg["datasets"],
            **{f"{section}.name": ["<torchvision model>", "timm:<model>", "hf:<hub id or dir>"]
               for section in ("encoder", "arch")}}


def torchvision_encoders() -> list[str]:
    """The torchvision classification models ``encoder.name`` takes as they are."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


# --------------------------------------------------------------------------------------------- building blocks


def fail(key: str, value: Any, fix: str) -> NoReturn:
    """Raise the one-line ConfigError ``key=value: fix``."""
    raise ConfigError(f"{key}={value!r}: {fix}")


def choose(key: str, value: Any, valid: Iterable[str]) -> None:
    """``value`` must be one of ``valid``; the error lists them (and the nearest spelling)."""
    valid = list(valid)
    if value in valid:
        return
    near = difflib.get_close_matches(str(value), valid, n=1)
    raise ConfigError(f"unknown {key} {value!r}; choose from {valid}" + (f" (did you mean {near[0]!r}?)" if near
                                                                         else ""))


def number(key: str, value: float | None, low: float, high: float | None = None, *, open_low: bool = False,
           open_high: bool = False, none: str | None = None, what: str = "") -> None:
    """``low <= value <= high`` (strict where ``open_*``); ``none`` says what null means where null is allowed."""
    if value is None and none is not None:
        return
    if value is not None and (value > low if open_low else value >= low) and (
            high is None or (value < high if open_high else value <= high)):
        return
    rule = f"must be {'>' if open_low else '>='} {low}" if high is None else \
        f"must be in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    fail(key, value, rule + (f" ({what})" if what else "") + (f", or null ({none})" if none else ""))


def world_size() -> int:
    """Processes of this job: the process group's size, else torchrun's WORLD_SIZE (checks run before setup)."""
    from reprlab import distributed

    return distributed.world_size() if distributed.is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------------------------- sections


def check_data(cfg: DataConfig, key: str = "data") -> None:
    from reprlab.data.datasets import DATASETS

    name = cfg.name
    forms = {form.split(":")[0] + ":": form.endswith("<dir>") for form in DATASETS if ":<" in form}  # prefix: dir?
    prefix = next((p for p in forms if name.startswith(p)), None)
    if prefix is None:
        choose(f"{key}.name", name, DATASETS)
    elif prefix != "shards:":  # shards: a folder, glob or brace pattern; the scan names what it did not find
        path = Path(name[len(prefix):]).expanduser()
        if not (path.is_dir() if forms[prefix] else path.is_file()):
            fail(f"{key}.name", name, f"{'folder' if forms[prefix] else 'file'} {str(path)!r} does not exist")
    number(f"{key}.val_fraction", cfg.val_fraction, 0, 1, open_high=True, what="the share of train held out")
    number(f"{key}.test_fraction", cfg.test_fraction, 0, 1 - cfg.val_fraction, open_high=True,
           what=f"the share of train held out as test, below 1 - {key}.val_fraction")
    if cfg.stream not in (True, False, "auto"):
        fail(f"{key}.stream", cfg.stream, "choose from auto, true, false")
    number(f"{key}.memory_limit_gb", cfg.memory_limit_gb, 0, open_low=True)
    number(f"{key}.workers", cfg.workers, 0, none="CPU cores - 1, at most 8", what="0: the main process")
    number(f"{key}.test_fraction", cfg.test_fraction, 0, 1 - cfg.val_fraction, open_high=True,
           what="the share of train held out as test, with data.val_fraction")
    if not (cfg.stream == "auto" or isinstance(cfg.stream, bool)):
        fail(f"{key}.stream", cfg.stream, "choose auto (stream image files larger than data.memory_limit_gb), "
                                          "true or false")
    number(f"{key}.memory_limit_gb", cfg.memory_limit_gb, 0, open_low=True, what="decoded GB kept in memory")
    number(f"{key}.workers", cfg.workers, 0, none="CPU cores - 1, at most 8", what="image-decoding processes")
    number(f"{key}.image_size", cfg.image_size, MIN_IMAGE_SIZE, none="the dataset's own size; image folders: 64",
           what="pixels per side")
    number(f"{key}.limit", cfg.limit, 1, none="every training image")


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or Path(ref).expanduser().exists()


def check_encoder(cfg: EncoderConfig, key: str = "encoder") -> None:
    """``name`` is a torchvision model, ``timm:<model>`` timm knows or ``hf:<id or existing folder>``."""
    name = cfg.name
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            fail(f"{key}.name", name, "needs timm: pip install timm")
        model = name[5:]
        if not model.startswith("hf-hub:") and not timm.is_model(model):
            near = difflib.get_close_matches(model, timm.list_models(), n=3)
            fail(f"{key}.name", name, f"timm has no model {model!r}" + (f"; similar: {near}" if near else "")
                 + "; timm.list_models('*pattern*') lists them")
    elif name.startswith("hf:"):
        ref = name[3:]
        if _looks_like_path(ref) and not Path(ref).expanduser().is_dir():
            fail(f"{key}.name", name, f"folder {ref!r} does not exist; give a saved model folder "
                                      "(save_pretrained) or a hub id such as hf:google/vit-base-patch16-224")
        if not _looks_like_path(ref) and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", ref):
            fail(f"{key}.name", name, "not a hub id ('<org>/<name>') or a local folder")
    else:
        valid = torchvision_encoders()
        if name not in valid:
            near = difflib.get_close_matches(name, valid, n=3)
            fail(f"{key}.name", name, "not a torchvision classification model" + (f" (similar: {near})" if near
                 else "") + "; use one of `reprlab list`, timm:<model> or hf:<hub id or local dir>")
    weights = cfg.weights
    if weights and ("/" in weights or Path(weights).suffix in (".safetensors", ".pt", ".pth", ".bin")) \
            and not Path(weights).expanduser().is_file():
        fail(f"{key}.weights", weights, "no such file; give a local weights file or a torchvision weights name "
                                        "such as IMAGENET1K_V1")


def check_optim(cfg: OptimConfig, key: str = "optim") -> None:
    reg = registries()
    choose(f"{key}.name", cfg.name, reg["optimizers"])
    choose(f"{key}.schedule", cfg.schedule, reg["schedules"])
    choose(f"{key}.lr_scaling", cfg.lr_scaling, LR_SCALINGS)
    number(f"{key}.lr", cfg.lr, 0, open_low=True)
    number(f"{key}.momentum", cfg.momentum, 0, 1, open_high=True)
    number(f"{key}.weight_decay", cfg.weight_decay, 0)
    number(f"{key}.warmup_epochs", cfg.warmup_epochs, 0)
    number(f"{key}.min_lr_ratio", cfg.min_lr_ratio, 0, 1, what="a fraction of the peak lr")
    number(f"{key}.gamma", cfg.gamma, 0, open_low=True, what="the decay factor, e.g. 0.1")
    number(f"{key}.trust_coefficient", cfg.trust_coefficient, 0, open_low=True)
    for i, beta in enumerate(cfg.betas):
        number(f"{key}.betas[{i}]", beta, 0, 1, open_high=True)
    if cfg.schedule == "step" and cfg.step_epochs is None:
        fail(f"{key}.step_epochs", None, f"{key}.schedule=step needs it: the epochs between lr drops, e.g. 30")
    number(f"{key}.step_epochs", cfg.step_epochs, 0, open_low=True, none="no step decay")
    if cfg.nesterov and cfg.name != "sgd":
        fail(f"{key}.nesterov", True, f"only sgd has Nesterov momentum, not {cfg.name!r}; set {key}.nesterov=false")


def check_device(key: str, device: str, precision: str | None = None, precision_key: str = "") -> None:
    """``device`` is auto | cpu | cuda | cuda:N | mps and present here; fp16 needs CUDA."""
    if not _DEVICE.fullmatch(device):
        fail(key, device, f"not a device; choose from {DEVICES}")
    import torch

    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device[5:]) if ":" in device else 0
        if index >= count:
            fail(key, device, f"this machine has {count} CUDA device(s); use {key}=cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        fail(key, device, f"MPS is not available here; use {key}=cpu or auto")
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if precision == "fp16" and not on_cuda:
        fail(precision_key, precision, "fp16 needs CUDA (a grad scaler); use bf16 or fp32 on this device")


def check_train(cfg: TrainConfig, key: str = "train") -> None:
    from reprlab.loggers import check_loggers

    number(f"{key}.epochs", cfg.epochs, 1, what="passes over the training set")
    number(f"{key}.batch_size", cfg.batch_size, 1, what="images per optimizer step, over all processes")
    choose(f"{key}.precision", cfg.precision, PRECISIONS)
    check_device(f"{key}.device", cfg.device, cfg.precision, f"{key}.precision")
    number(f"{key}.grad_clip", cfg.grad_clip, 0, open_low=True, none="no clipping")
    number(f"{key}.log_every", cfg.log_every, 1, what="steps between metric lines")
    number(f"{key}.checkpoint_every_steps", cfg.checkpoint_every_steps, 0, what="0: at the end of each epoch")
    try:
        check_loggers(list(cfg.loggers))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    world = world_size()
    if cfg.batch_size % world:
        fail(f"{key}.batch_size", cfg.batch_size, f"must be divisible by the {world} processes of this job "
                                                  f"(each takes an equal share); use e.g. "
                                                  f"{key}.batch_size={max(world, cfg.batch_size // world * world)}")


def check_augment(aug: Any, key: str) -> None:
    """Probabilities in [0, 1], a crop scale 0 < lo <= hi <= 1, non-negative strengths (ViewAugment,
    FinetuneAugment)."""
    for name, value in vars(aug).items():
        if name.endswith("_p"):
            number(f"{key}.{name}", value, 0, 1, what="a probability")
        elif name == "crop_scale" and value is not None:
            if not 0 < value[0] <= value[1] <= 1:
                fail(f"{key}.crop_scale", list(value), "give [low, high] with 0 < low <= high <= 1 (the share of "
                                                       "the image a crop keeps)")
        elif name == "size":
            number(f"{key}.size", value, 1, none="the input's size")
        elif name.endswith(("_alpha", "_strength", "_degrees")):
            number(f"{key}.{name}", value, 0)


def check_method(name: str, params: dict[str, Any], batch_size: int) -> None:
    """A known method, parameters it takes (mapping-valued ones built with the config checks) and a batch large
    enough for its loss (a method's ``min_batch_size``)."""
    from reprlab.ssl import METHODS

    choose("method.name", name, METHODS)
    cls = METHODS[name]
    signature = inspect.signature(cls).parameters
    valid = [p for p in signature if p != "encoder"]
    for key in params:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            fail(f"method.params.{key}", params[key], f"method {name!r} has no such parameter"
                 + (f" (did you mean {near[0]!r}?)" if near else "") + f"; valid parameters: {valid}")
    missing = [p for p in valid if signature[p].default is inspect.Parameter.empty and p not in params
               and signature[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if missing:
        fail(f"method.params.{missing[0]}", None, f"method {name!r} needs it; set method.params.{missing[0]}=...")
    hints = typing.get_type_hints(cls.__init__)
    for key, value in params.items():
        section = dataclass_in(hints.get(key))
        if section is not None and isinstance(value, dict):
            default = signature[key].default
            built = build_dataclass(section, value, f"method.params.{key}", f"method {name!r}",
                                    default if isinstance(default, section) else None)
            check_augment(built, f"method.params.{key}")
    need = getattr(cls, "min_batch_size", 1)
    if batch_size < need:
        fail("train.batch_size", batch_size, f"method {name!r} needs at least {need} images per batch (its loss "
                                             f"compares the images of a batch); use train.batch_size >= {need}")


def check_policy(name: str, params: dict[str, Any]) -> None:
    from reprlab.finetune.policies import POLICIES, build_policy

    choose("policy.name", name, POLICIES)
    try:
        build_policy(name, params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"policy.params={params!r}: {err}") from None


def check_run_dir(key: str, ref: str) -> None:
    if not (Path(ref) / "encoder.safetensors").is_file():
        what = "does not exist" if not Path(ref).exists() else "holds no encoder.safetensors"
        fail(key, ref, f"not a pretraining run directory ({what}); give runs/<name> of a finished pretraining "
                       f"run, or {'random' if key == 'encoder' else 'random or pixels'}")


# --------------------------------------------------------------------------------------------- stages


def check_pretrain(cfg: PretrainConfig) -> None:
    """Every setting of a pretraining run that can be judged before data loads; raises ConfigError."""
    check_data(cfg.data)
    check_encoder(cfg.encoder)
    check_train(cfg.train)
    check_optim(cfg.optim)
    check_method(cfg.method.name, dict(cfg.method.params), cfg.train.batch_size)
    number("monitor.every_epochs", cfg.monitor.every_epochs, 0, what="0 disables the monitor")
    number("monitor.knn_k", cfg.monitor.knn_k, 1)
    number("monitor.knn_temperature", cfg.monitor.knn_temperature, 0, open_low=True)
    number("monitor.max_images", cfg.monitor.max_images, 1)


def check_finetune(cfg: FinetuneConfig) -> None:
    """Every setting of a fine-tuning run that can be judged before data loads; raises ConfigError."""
    if cfg.encoder == "random":
        check_encoder(cfg.arch, "arch")
    else:
        check_run_dir("encoder", cfg.encoder)
    check_data(cfg.data)
    check_train(cfg.train)
    check_optim(cfg.optim)
    check_policy(cfg.policy.name, dict(cfg.policy.params))
    number("head.dropout", cfg.head.dropout, 0, 1, open_high=True)
    choose("head.init", cfg.head.init, HEAD_INITS)
    check_augment(cfg.augment, "augment")
    if cfg.augment.size is not None:  # validation and test read images at the data's size: train at that size
        fail("augment.size", cfg.augment.size, "fine-tuning trains and evaluates at the data's own size; set "
                                               "data.image_size instead and leave augment.size null")
    number("label_smoothing", cfg.label_smoothing, 0, 1, open_high=True)
    number("l1_penalty", cfg.l1_penalty, 0)
    number("label_fraction", cfg.label_fraction, 0, 1, open_low=True, none="every label")
    number("labels_per_class", cfg.labels_per_class, 1, none="every label", what="labeled images per class")
    if cfg.label_fraction is not None and cfg.labels_per_class is not None:
        fail("labels_per_class", cfg.labels_per_class, f"give either it or label_fraction "
                                                       f"(={cfg.label_fraction}), not both")
    number("early_stopping_patience", cfg.early_stopping_patience, 1, none="never stop early", what="epochs")
    if not cfg.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in cfg.seeds):
        fail("seeds", list(cfg.seeds), "give a list of integer seeds, e.g. seeds=[0] or seeds=[0,1,2]")


def check_evaluate(cfg: EvaluateConfig) -> None:
    """Every setting of an evaluation that can be judged before data loads; raises ConfigError."""
    from reprlab.evaluate.knn import BACKENDS, INDEXES
    from reprlab.evaluate.plots import MAP_METHODS

    if not cfg.encoders:
        fail("encoders", list(cfg.encoders), "nothing to evaluate; give e.g. encoders=[runs/<name>,random,pixels]")
    for i, ref in enumerate(cfg.encoders):
        if not isinstance(ref, str):
            fail(f"encoders[{i}]", ref, "give a run directory, random or pixels")
        if ref not in RUN_KEYWORDS:
            check_run_dir(f"encoders[{i}]", ref)
    if "random" in cfg.encoders and all(ref in RUN_KEYWORDS for ref in cfg.encoders):
        check_encoder(cfg.arch, "arch")  # the architecture of 'random' when no run directory gives one
    check_data(cfg.data)
    check_device("device", cfg.device)
    choose("knn.backend", cfg.knn.backend, BACKENDS)
    choose("knn.index", cfg.knn.index, INDEXES)
    choose("report_map", cfg.report_map, MAP_METHODS)
    if cfg.knn.backend == "torch" and cfg.knn.index != "flat":
        fail("knn.index", cfg.knn.index, "needs knn.backend=faiss (the torch backend is exact: knn.index=flat)")
    if cfg.knn.select_on_val and (not cfg.knn.ks or not cfg.knn.temperatures):
        fail("knn.select_on_val", True, "needs non-empty knn.ks and knn.temperatures, or knn.select_on_val=false")
    number("knn.k", cfg.knn.k, 1)
    number("knn.temperature", cfg.knn.temperature, 0, open_low=True)
    lists = {"knn.ks": (cfg.knn.ks, 1, False), "knn.temperatures": (cfg.knn.temperatures, 0, True),
             "retrieval_ks": (cfg.retrieval_ks, 1, False), "probe_lrs": (cfg.probe_lrs, 0, True),
             "sklearn_cs": (cfg.sklearn_cs, 0, True), "probe_weight_decays": (cfg.probe_weight_decays, 0, False)}
    for key, (values, low, open_low) in lists.items():
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(f"{key}[{i}]", value, "must be a number")
            number(f"{key}[{i}]", value, low, open_low=open_low)
    number("labels_per_class", getattr(cfg, "labels_per_class", None), 1, none="every train label")
    for key in ("probe_epochs", "probe_batch_size", "batch_size", "sklearn_max_iter", "report_points",
                "quality_max_features"):
        number(key, getattr(cfg, key), 1)
    number("quality_images", cfg.quality_images, 0, what="0 disables alignment")
    check_augment(cfg.alignment_views, "alignment_views")
