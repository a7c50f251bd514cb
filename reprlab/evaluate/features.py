"""Batched feature extraction under ``torch.inference_mode``, in dataset order, optionally cached on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@torch.inference_mode()
def extract_features(encoder: nn.Module, images: Tensor, batch_size: int = 512,
                     device: torch.device | str = "cpu", precision: str = "auto") -> Tensor:
    """Features (N, D) float32 on the CPU for uint8 (or [0, 1] float) images (N, C, H, W), in input order.

    ``precision="auto"`` uses bf16 autocast on CUDA and fp32 on the CPU."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval().to(device)
    use_amp = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, non_blocking=True)
        batch = batch.float().div_(255) if batch.dtype == torch.uint8 else batch.float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            chunks.append(encoder(batch).float().cpu())
    encoder.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def cache_key(**parts: Any) -> str:
    """A short stable hash of what determines the features (encoder weights, dataset, split, preprocessing)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_features(cache_dir: str | Path | None, key: str, compute) -> Tensor:  # noqa: ANN001 - a thunk
    """Return the features stored under ``key`` in ``cache_dir`` (safetensors), computing and storing them once."""
    from safetensors.torch import load_file, save_file

    from reprlab.checkpoint import atomic_write

    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"features-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    features = compute()
    atomic_write(path, lambda tmp: save_file({"features": features.contiguous()}, tmp))
    return features
