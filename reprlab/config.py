"""Typed run configuration: frozen dataclasses per stage, loaded from YAML and validated.

An unknown or misspelled key, or a value of the wrong type, is an error naming the key, the file and the valid
choices. Overrides use dotted paths: ``optim.lr=0.3 train.epochs=5 encoder=runs/simclr``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from reprlab.data.views import FinetuneAugment, ViewAugment


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


@dataclass(frozen=True)
class DataConfig:
    """Which images to use. ``name``: digits | npz:<dir> | folder:<dir> | list:<file.csv|.txt> |
    shards:<tar dir|glob|pattern> | cifar10 | cifar100 | stl10 | mnist | fashion_mnist."""

    name: str = "digits"
    root: str = "data"  # where torchvision datasets live (and are downloaded to when download: true)
    download: bool = False
    val_fraction: float = 0.1  # carved from train, stratified, seeded, when the dataset has no val split
    test_fraction: float = 0.0  # likewise a test split when the dataset has none (0: no test split, said so)
    image_size: int | None = None  # folder datasets are resized to this (default 64); others keep native size
    limit: int | None = None  # keep only the first N training images (stratified), for quick runs
    stream: bool | str = "auto"  # image files: auto (stream when decoded > memory_limit_gb) | true | false
    memory_limit_gb: float = 8.0  # decoded size (every split, uint8) above which stream: auto streams; per process
    workers: int | None = None  # image-decoding processes (null: CPU cores - 1, at most 8; 0: the main process)


@dataclass(frozen=True)
class EncoderConfig:
    """An encoder from torchvision (``resnet18``), timm (``timm:<model>``) or transformers (``hf:<id or dir>``)."""

    name: str = "resnet18"
    pretrained: bool = False
    weights: str | None = None  # a local weights file, or a torchvision weights name such as IMAGENET1K_V1
    kwargs: dict = field(default_factory=dict)  # e.g. {cifar_stem: true} or timm/HF model arguments


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule; the schedule is stepped once per optimizer step."""

    name: str = "sgd"  # sgd | adagrad | rmsprop | adam | adamw | lars
    lr: float = 0.06
    lr_scaling: str = "none"  # none | linear (lr * B / 256) | sqrt (lr * sqrt(B))
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    exclude_bn_bias: bool = True  # no weight decay (and no LARS adaptation) for BatchNorm and bias parameters
    betas: tuple[float, float] = (0.9, 0.999)
    trust_coefficient: float = 0.001  # LARS
    schedule: str = "cosine"  # constant | step | exponential | cosine | onecycle
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    step_epochs: float | None = None  # step schedule: decay every this many epochs
    gamma: float = 0.1  # step / exponential decay factor


@dataclass(frozen=True)
class TrainConfig:
    """The training loop shared by pretraining and fine-tuning."""

    epochs: int = 10
    batch_size: int = 256
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:1
    precision: str = "auto"  # auto (bf16 where native: CUDA, AVX512-BF16 / AMX CPUs; else fp32) | fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    grad_clip: float | None = None
    log_every: int = 20  # steps between metric lines (the only host syncs in the loop)
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    resume: bool = True  # continue from runs/<name>/state.pt when it exists
    seed: int = 0
    progress: bool = True
    loggers: list = field(default_factory=lambda: ["jsonl"])  # + tensorboard | wandb | mlflow | csv


@dataclass(frozen=True)
class MonitorConfig:
    """Signals computed during pretraining every ``every_epochs`` epochs."""

    every_epochs: int = 1  # 0 disables
    knn_k: int = 20
    knn_temperature: float = 0.07
    max_images: int = 10000  # cap the bank size used by the online kNN monitor


@dataclass(frozen=True)
class MethodConfig:
    """``name`` picks a pretraining method from reprlab.ssl.METHODS; ``params`` are its keyword arguments."""

    name: str = "simclr"
    params: dict = field(default_factory=dict)  # e.g. method.params.temperature=0.2 (the methods: `reprlab list`)


@dataclass(frozen=True)
class PretrainConfig:
    name: str = "pretrain"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


@dataclass(frozen=True)
class PolicyConfig:
    """``name`` picks a fine-tuning policy from reprlab.finetune.POLICIES; ``params`` are its arguments."""

    name: str = "linear_probe"
    params: dict = field(default_factory=dict)  # e.g. policy.params.decay=0.65 for llrd


@dataclass(frozen=True)
class HeadConfig:
    dropout: float = 0.0
    init: str = "zeros"  # zeros | xavier | he | default


@dataclass(frozen=True)
class FinetuneConfig:
    name: str = "finetune"
    out_dir: str = "runs"
    encoder: str = "random"  # a pretraining run directory, or "random" (an untrained `arch`)
    arch: EncoderConfig = field(default_factory=EncoderConfig)  # used when encoder is "random"
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: FinetuneAugment = field(default_factory=FinetuneAugment)  # batched on the device, + mixup / cutmix
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=128))
    label_smoothing: float = 0.0
    l1_penalty: float = 0.0
    label_fraction: float | None = None  # keep this fraction of the training labels, stratified
    labels_per_class: int | None = None  # or exactly this many per class (k-shot)
    early_stopping_patience: int | None = None  # epochs without val improvement; restores the best weights
    seeds: list = field(default_factory=lambda: [0])


@dataclass(frozen=True)
class KNNConfig:
    """Weighted kNN (InstDisc / DINO protocol). With ``select_on_val`` (the default) k and temperature are
    chosen on the validation split from ``ks`` x ``temperatures``; ``k`` / ``temperature`` break ties (the
    closest wins) and are used as they are without a validation split or when ``select_on_val`` is false."""

    k: int = 20
    temperature: float = 0.07
    backend: str = "auto"  # auto (the fastest exact backend, timed on this machine) | faiss | faiss_heap | torch
    index: str = "flat"  # faiss index: flat (exact) | ivf | hnsw (approximate, for banks of millions)
    recall_queries: int = 1000  # ivf / hnsw: seeded queries whose recall@k against exact search is reported
    select_on_val: bool = True
    ks: list = field(default_factory=lambda: [10, 20, 50, 100, 200])
    temperatures: list = field(default_factory=lambda: [0.02, 0.05, 0.07, 0.1, 0.2, 0.5])


@dataclass(frozen=True)
class EvaluateConfig:
    """Several encoders on one labeled dataset: kNN, retrieval, linear probes, label-free quality, a report.

    Every hyperparameter is chosen on the validation split; the test split is read once per encoder."""

    name: str = "evaluate"
    out_dir: str = "runs"
    encoders: list = field(default_factory=lambda: ["random", "pixels"])  # run dirs, "random", "pixels"
    arch: EncoderConfig = field(default_factory=EncoderConfig)  # for "random" when no run dir gives one
    data: DataConfig = field(default_factory=DataConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    retrieval_ks: list = field(default_factory=lambda: [1, 5, 10])  # precision@k / recall@k; [] disables
    # few-label evaluation: the kNN bank, retrieval bank and probes see only this many labeled train images per
    # class (stratified, seeded); label-free quality still uses all train images. null: every train label
    labels_per_class: int | None = None
    linear_probe: bool = True  # torch probe on cached features, lr x weight decay chosen on val
    probe_lrs: list = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    probe_weight_decays: list = field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2])
    probe_epochs: int = 100
    probe_batch_size: int = 512
    sklearn_probe: bool = True  # scikit-learn LogisticRegression cross-check, C chosen on val
    sklearn_cs: list = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])  # inverse regularisation C
    sklearn_max_iter: int = 1000
    quality_images: int = 1000  # val images seen as two SimCLR views for alignment (0 disables alignment)
    # the views' augmentation, one setting for every encoder so their alignments compare (CIFAR-scale: no blur)
    alignment_views: ViewAugment = field(default_factory=lambda: ViewAugment(
        crop_scale=(0.2, 1.0), flip_p=0.5, jitter_strength=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.0))
    quality_max_features: int = 10000  # train features for uniformity / effective rank / std (seeded subset)
    report: bool = True  # report.md + report.html with pictures next to metrics.json
    report_map: str = "tsne"  # tsne | pca: the 2-D map of the test embeddings
    report_points: int = 2000  # test points on the 2-D map, a seeded sample (t-SNE is O(N^2))
    batch_size: int = 512
    device: str = "auto"
    cache_features: bool = True
    feature_cache_dir: str | None = None  # where features are cached (null: <run dir>/cache); share it across runs
    feature_cache_dtype: str = "float32"  # float32 | float16: the on-disk features of streamed datasets
    feature_chunk_rows: int | None = None  # rows of on-disk features read at once (kNN bank, probe); null: auto
    progress: bool = True  # bars with images/s and ETA (rank 0, on a terminal): features, kNN, probes, t-SNE
    seed: int = 0


T = TypeVar("T")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple and typing.get_args(annotation) and Ellipsis not in typing.get_args(annotation):
        args = typing.get_args(annotation)  # fixed length: (0.08, 1.0) for tuple[float, float]
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(_type_ok, value, args))
    if origin in (tuple, list):
        return isinstance(value, (list, tuple)) and all(
            _type_ok(v, a) for v, a in zip(value, typing.get_args(annotation) or [Any] * len(value))
        )
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, annotation)


# what YAML 1.2 reads as a float but PyYAML (YAML 1.1) leaves as text: 1e-5, 2e-1, 1.0e5 (no dot or no sign)
_EXPONENT_FLOAT = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+")


def yaml_floats(value: Any) -> Any:
    """``value`` with every ``1e-5``-style string inside it (also in nested mappings and lists) made a float:
    free-form sections (``method.params``, ``policy.params``, ``encoder.kwargs``) and lists have no type that
    would convert them, and ``temperature: 2e-1`` must not reach a method as the text '2e-1'."""
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: yaml_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(yaml_floats(v) for v in value)
    return value


def dataclass_in(annotation: Any) -> type | None:
    """The dataclass an annotation names, alone or as ``X | None``; else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return classes[0] if len(classes) == 1 else None
    return None


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def build_dataclass(cls: type[T], raw: Any, where: str, source: str, base: T | None = None) -> T:
    """A ``cls`` from a mapping, recursing into dataclass-typed fields; an unknown key or a wrong type is a
    ConfigError naming the dotted key (``where`` is its prefix, e.g. ``method.params.augment``), the valid
    keys and ``source`` (the file). Lists become tuples where a tuple is expected, and ``1e-5`` strings
    (YAML 1.1 reads them as text) become floats. Keys the mapping leaves out keep ``base``'s values (the
    default where the section sits: ``alignment_views: {flip_p: 0}`` keeps evaluation's own crop_scale),
    else the dataclass defaults."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where or 'config'}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{source}: unknown key {key!r}; valid keys here: {sorted(fields)}")
    values = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        section = dataclass_in(hint)
        if section is not None and not (value is None and _type_ok(None, hint)):
            default = getattr(base, name) if base is not None else _field_default(fields[name])
            values[name] = build_dataclass(section, value, key, source,
                                           default if isinstance(default, section) else None)
            continue
        if isinstance(value, (dict, list, tuple)):
            value = yaml_floats(value)
        if isinstance(value, str) and _type_ok(1.0, hint) and not _type_ok(value, hint):
            # YAML 1.1 reads 1e-5 (no dot) as a string; accept it where a float is expected
            try:
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, hint):
            type_name = getattr(hint, "__name__", str(hint).replace("typing.", ""))
            raise ConfigError(f"{source}: {key!r} must be {type_name}, got {value!r}")
        if typing.get_origin(hint) is tuple or (
            typing.get_origin(hint) in (typing.Union, types.UnionType) and isinstance(value, list)
        ):
            value = tuple(value)
        values[name] = value
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=0.3", "encoders=[runs/a, random]"]`` -> ``[("optim.lr", 0.3), ...]`` (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.epochs=5")
        key, text = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(text) if text else None))
    return parsed


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML) into ``cls``, apply ``key=value`` overrides, validate every key and type."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"config file {source!r} does not exist")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    if overrides:
        source += f" (with overrides {' '.join(overrides)})"
    return build_dataclass(cls, raw, "", source)


def to_dict(config: Any) -> dict:
    """A plain, YAML-safe dict (tuples become lists) of a config dataclass."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
