"""What every stage builds from its config the same way: seeds, the dataset and the encoder."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reprlab.config import DataConfig, EncoderConfig, TrainConfig
from reprlab.data.datasets import DatasetSplits, load_dataset
from reprlab.engine import FitOptions
from reprlab.models.encoders import Encoder, create_encoder


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (each rank passes its own seed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_dataset(cfg: DataConfig, seed: int) -> DatasetSplits:
    """The dataset named by a ``data:`` section; ``seed`` draws the validation split and the ``limit`` subset."""
    return load_dataset(cfg.name, root=cfg.root, download=cfg.download, val_fraction=cfg.val_fraction,
                        image_size=cfg.image_size, limit=cfg.limit, seed=seed)


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """The encoder named by an ``encoder:`` (or ``arch:``) section."""
    return create_encoder(cfg.name, pretrained=cfg.pretrained, weights=cfg.weights, **cfg.kwargs)


def fit_options(cfg: TrainConfig, device: torch.device, run_dir: Path, identity: dict[str, Any],
                desc: str, hparams: dict[str, Any]) -> FitOptions:
    """The training loop's options from a ``train:`` section; ``hparams``: the whole config, for the loggers."""
    return FitOptions(epochs=cfg.epochs, device=device, run_dir=run_dir, precision=cfg.precision,
                      grad_clip=cfg.grad_clip, log_every=cfg.log_every,
                      checkpoint_every_steps=cfg.checkpoint_every_steps, resume=cfg.resume, identity=identity,
                      progress=cfg.progress, desc=desc, loggers=tuple(cfg.loggers), hparams=hparams)
