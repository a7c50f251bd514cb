"""reprlab: self-supervised pretraining, fine-tuning and evaluation of image encoders.

Public entry points are imported lazily so that ``import reprlab`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_encoder": "reprlab.models.encoders",
    "load_encoder": "reprlab.checkpoint",
    "load_classifier": "reprlab.finetune.classifier",
    "load_config": "reprlab.config",
    "load_dataset": "reprlab.data.datasets",
    "METHODS": "reprlab.ssl",
    "POLICIES": "reprlab.finetune.policies",
    "pretrain": "reprlab.stages.pretrain",
    "finetune": "reprlab.stages.finetune",
    "evaluate": "reprlab.stages.evaluate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reprlab' has no attribute {name!r}")
