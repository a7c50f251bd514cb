"""An encoder plus a linear head, saved as safetensors + meta.json and reloadable for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reprlab.checkpoint import (
    CheckpointError,
    library_versions,
    load_weights,
    read_meta,
    save_weights,
    write_json,
)
from reprlab.models.heads import classifier_head


class Classifier(nn.Module):
    """``encoder`` features -> (dropout) -> linear head. Input: float images in [0, 1], (B, C, H, W)."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.0,
                 init: str = "zeros") -> None:
        super().__init__()
        self.encoder = encoder
        self.head = classifier_head(encoder.feature_dim, num_classes, dropout=dropout, init=init)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images))  # (B, num_classes) logits


def save_classifier(run_dir: str | Path, classifier: Classifier, classes: list[str],
                    meta: dict[str, Any]) -> None:
    """Write ``model.safetensors`` (encoder + head) and ``meta.json`` (enough to rebuild it offline)."""
    run_dir = Path(run_dir)
    save_weights(run_dir / "model.safetensors", classifier)
    head = [m for m in classifier.head.modules() if isinstance(m, nn.Linear)][0]
    dropout = next((m.p for m in classifier.head.modules() if isinstance(m, nn.Dropout)), 0.0)
    write_json(run_dir / "meta.json", {
        "encoder": classifier.encoder.spec, "feature_dim": classifier.encoder.feature_dim,
        "num_classes": head.out_features, "classes": classes, "head": {"dropout": dropout},
        "versions": library_versions(), **meta,
    })


class LoadedClassifier:
    """Inference wrapper: ``predict_proba(images) -> (B, num_classes)``, ``predict(images) -> names``."""

    def __init__(self, model: Classifier, classes: list[str], meta: dict[str, Any]) -> None:
        self.model, self.classes, self.meta = model.eval(), classes, meta

    def to(self, device: str | torch.device) -> LoadedClassifier:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def predict_proba(self, images: Tensor) -> Tensor:
        """Class probabilities for images in [0, 1] (float) or uint8, shape (B, C, H, W)."""
        device = next(self.model.parameters()).device
        images = images.to(device)
        images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return self.model(images).softmax(dim=1)  # (B, num_classes)

    def predict(self, images: Tensor) -> list[str]:
        """The most probable class name per image."""
        return [self.classes[i] for i in self.predict_proba(images).argmax(dim=1).tolist()]


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Rebuild a fine-tuned classifier from its run directory (``meta.json`` + ``model.safetensors``),
    strictly: every weight must match."""
    from reprlab.models.encoders import encoder_from_spec

    run_dir = Path(path)
    seed_dirs = sorted(p.name for p in run_dir.glob("seed*") if (p / "meta.json").is_file())
    if not (run_dir / "meta.json").is_file() and seed_dirs:
        raise CheckpointError(f"{run_dir} holds a multi-seed run; load one of its seeds, e.g. "
                              f"{run_dir / seed_dirs[0]}")
    meta = read_meta(run_dir)
    if "num_classes" not in meta:
        raise ValueError(f"{run_dir} holds an encoder, not a fine-tuned classifier; use reprlab.load_encoder")
    spec = meta["encoder"]
    model = Classifier(encoder_from_spec(spec), meta["num_classes"],
                       dropout=meta["head"]["dropout"], init="default")
    load_weights(run_dir / "model.safetensors", model)
    return LoadedClassifier(model, meta["classes"], meta)
