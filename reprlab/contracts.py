"""The contracts of the training loop: what ``engine.fit`` trains, what it reads batches from, and its hooks.

- :class:`Task`: an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": ..., other 0-d tensors}``. Every
  pretraining method and the fine-tuning classifier is one. The optional parts have defaults here, so the loop
  and the stages call them without asking whether they exist.
- :class:`BatchSource`: an epoch of uint8 image batches in a reproducible order, resumable mid-epoch, and able
  to say where its images should live (``to_device``). In-memory :class:`reprlab.data.loader.Batches` and
  streamed :class:`reprlab.data.stream.FolderBatches` implement it.
- :class:`Callback`: per-epoch hooks (a freezing policy, validation, the pretraining monitor), with state that
  goes into the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


class Task(nn.Module):
    """What ``fit`` trains. Subclasses implement ``forward(batch) -> {"loss": 0-d tensor, ...}``; every other
    0-d tensor in the dict is averaged and logged."""

    #: Under DDP, convert BatchNorm to SyncBatchNorm (statistics over the global batch). Off for a task whose
    #: BatchNorm must stay per-rank (or that has none worth syncing).
    sync_batchnorm: bool = True
    #: Which network ``encoder.safetensors`` holds, as meta.json says (e.g. "teacher" for DINO).
    saved_network: str = "encoder"

    def saved_encoder(self) -> nn.Module | None:
        """The network the stage saves as the run's encoder when it is not the encoder the task was built with
        (DINO evaluates its EMA teacher); None: that encoder."""
        return None

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step with the 1-based global step and the run's total step count (an
        EMA teacher updates here). Called on the task itself, never on its DDP wrapper."""

    def save_artifacts(self, run_dir: Path, images: Tensor) -> None:
        """Called once after training on rank 0 with up to 32 uint8 training images on the device (e.g. an
        autoencoder saves reconstructions)."""


@runtime_checkable
class BatchSource(Protocol):
    """Batches ``{"images": uint8 (B, C, H, W), "index": (B,), "labels": (B,) when labeled}`` of one rank."""

    batch_size: int  # per rank

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        """The batches of ``epoch`` from ``start_step`` on; the order depends only on (seed, epoch, rank)."""
        ...

    def to_device(self, device: torch.device) -> BatchSource:
        """The source to train from on ``device``: the same batches, from wherever they are fastest to serve
        (a small in-memory dataset moves to GPU memory; a stream stays on the host)."""
        ...


class Callback:
    """Per-epoch hooks; override what you need. ``stop = True`` ends training after the current epoch."""

    stop: bool = False

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based)."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """After the last step of ``epoch``, with the task in eval mode; the returned metrics are logged."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """What to restore on resume (None: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
