"""What every export format starts from: a run's encoder, the images it takes, and what a format hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reprlab.checkpoint import load_encoder, read_meta
from reprlab.export import ExportError

# native image sizes of the built-in datasets, for runs whose config left data.image_size at null (native)
NATIVE_SIZES = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32, "stl10": 96}
FOLDER_SIZE = 64  # folder datasets are resized to data.image_size, 64 by default


@dataclass(frozen=True)
class Source:
    """The encoder of ``run_dir`` (eval mode) and the square ``input_size`` its exports take."""

    run_dir: Path
    encoder: Any  # reprlab.models.encoders.Encoder
    input_size: int

    @property
    def family(self) -> str:
        """"timm", "hf" or "torchvision": the library the backbone comes from."""
        name = self.encoder.spec["name"]
        return name.split(":", 1)[0] if name.startswith(("timm:", "hf:")) else "torchvision"

    @property
    def model_name(self) -> str:
        """The architecture's name in its own library (``resnet18``, ``test_resnet``, a hub id or folder)."""
        name = self.encoder.spec["name"]
        return name.split(":", 1)[1] if self.family != "torchvision" else name

    @property
    def kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the architecture (the HF config, which travels in its own file, left out)."""
        return {k: v for k, v in self.encoder.spec.get("kwargs", {}).items() if k != "hf_config"}

    @property
    def mean(self) -> list[float]:
        return [float(f"{v:.7g}") for v in self.encoder.mean.flatten().tolist()]  # float32 buffer -> 0.485

    @property
    def std(self) -> list[float]:
        return [float(f"{v:.7g}") for v in self.encoder.std.flatten().tolist()]

    @property
    def shape(self) -> list[int]:
        """(C, H, W) of one input image."""
        return [len(self.mean), self.input_size, self.input_size]

    def images(self, batch: int, seed: int = 0) -> Tensor:
        """Fixed random float images in [0, 1], (batch, C, H, W)."""
        return torch.rand(batch, *self.shape, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.encoder(images)


@dataclass(frozen=True)
class Written:
    """What a format wrote: a loading ``snippet`` (Python taking ``folder``, the export folder, and ``images``, a
    float32 numpy array (B, C, H, W) in [0, 1], to ``features``) using only its ``library``, ``output`` saying
    which output of the loaded model the features are, ``notes`` for the folder's README and ``extra`` fields for
    reprlab_export.json."""

    library: str
    snippet: str
    output: str
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_input_size(meta: dict[str, Any], encoder: Any, override: int | None) -> int:
    """The image size of the export: ``override``, else the run's ``data.image_size``, else its dataset's native
    size, else the size the encoder resizes to (HF ViT), else timm's pretrained size, else 224."""
    if override is not None:
        if override < 1:
            raise ExportError(f"input size {override} must be a positive number of pixels, e.g. --input-size 32")
        return override
    data = (meta.get("config") or {}).get("data") or {}
    dataset = str(data.get("name") or meta.get("dataset") or "")
    if data.get("image_size"):
        return int(data["image_size"])
    if dataset in NATIVE_SIZES:
        return NATIVE_SIZES[dataset]
    if dataset.startswith("folder:"):
        return FOLDER_SIZE
    if encoder.input_size is not None:
        return int(encoder.input_size)
    timm_size = (getattr(encoder.backbone, "pretrained_cfg", None) or {}).get("input_size")
    return int(timm_size[-1]) if timm_size else 224


def load_source(run_dir: str | Path, input_size: int | None = None) -> Source:
    """Load the encoder of ``run_dir`` strictly (:func:`reprlab.load_encoder`) with its export input size."""
    run_dir = Path(run_dir).resolve()
    meta = read_meta(run_dir)
    encoder = load_encoder(run_dir)
    return Source(run_dir, encoder, resolve_input_size(meta, encoder, input_size))
