"""Self-supervised pretraining methods. Each takes an encoder and maps a batch to ``{"loss": ..., ...}``.

Adding a method: one file in this folder and one line in ``METHODS``.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from torch import nn

from reprlab.config import ConfigError, build_dataclass, dataclass_in
from reprlab.contracts import Task
from reprlab.ssl.autoencoder import AutoEncoder
from reprlab.ssl.barlow_twins import BarlowTwins
from reprlab.ssl.byol import BYOL
from reprlab.ssl.dino import DINO
from reprlab.ssl.distill import Distill
from reprlab.ssl.jigsaw import Jigsaw
from reprlab.ssl.moco import MoCoV2, MoCoV3
from reprlab.ssl.relative_position import RelativePosition
from reprlab.ssl.rotation import Rotation
from reprlab.ssl.simclr import SimCLR
from reprlab.ssl.simsiam import SimSiam
from reprlab.ssl.vicreg import VICReg

METHODS: dict[str, type[Task]] = {
    "simclr": SimCLR,  # contrastive (Chen et al., 2020)
    "autoencoder": AutoEncoder,  # generative: mode plain | denoising | masked (SimMIM; MAE with visible_only)
    "rotation": Rotation,  # proxy task (Gidaris et al., 2018)
    "jigsaw": Jigsaw,  # proxy task (Noroozi & Favaro, 2016)
    "relative_position": RelativePosition,  # proxy task (Doersch et al., 2015)
    "byol": BYOL,  # momentum target + predictor (Grill et al., 2020); saves the online encoder
    "simsiam": SimSiam,  # stop-gradient + predictor (Chen & He, 2021)
    "moco_v2": MoCoV2,  # momentum keys + queue (Chen et al., 2020); saves the query encoder
    "moco_v3": MoCoV3,  # momentum keys, in-batch, predictor (Chen, Xie & He, 2021); saves the query encoder
    "dino": DINO,  # self-distillation, multi-crop, EMA teacher (Caron et al., 2021); saves the teacher's encoder
    "barlow_twins": BarlowTwins,  # redundancy reduction, global-batch cross-correlation (Zbontar et al., 2021)
    "vicreg": VICReg,  # variance-invariance-covariance, global-batch statistics (Bardes et al., 2022)
    "distill": Distill,  # a frozen teacher's embeddings, e.g. a foundation model (LightlyTrain DistillationV2)
}


def build_method(name: str, encoder: nn.Module, params: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate ``METHODS[name](encoder, **params)``, naming any unknown parameter and the valid ones.

    A mapping given for a parameter annotated with a dataclass (``augment: ViewAugment``) is built into that
    dataclass with the config loader's checks, so ``{augment: {crop_scal: ...}}`` fails naming
    ``method.params.augment.crop_scal`` and the valid keys."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    cls = METHODS[name]
    signature = inspect.signature(cls).parameters
    valid = [p for p in signature if p != "encoder"]
    params = dict(params or {})
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"method {name!r} has no parameter {unknown[0]!r}; valid parameters: {valid}")
    hints = typing.get_type_hints(cls.__init__)
    for key, value in params.items():
        section = dataclass_in(hints.get(key))
        if section is not None and isinstance(value, dict):
            default = signature[key].default  # keys left out keep the method's own default pipeline
            params[key] = build_dataclass(section, value, f"method.params.{key}", f"method {name!r}",
                                          default if isinstance(default, section) else None)
    return cls(encoder, **params)
