"""The one training loop, shared by pretraining and fine-tuning.

``fit`` runs a *task*: any ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": ..., other scalars}``. It owns
the device, mixed precision, DDP wrapping, gradient clipping, the progress bar, ``metrics.jsonl``, and
checkpoint/resume: the state (model, optimizer, scheduler, grad scaler, RNG states, epoch and step) is written
atomically every epoch and every ``checkpoint_every_steps`` steps, and a rerun of the same command continues from it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from reprlab import checkpoint, distributed
from reprlab.data.loader import Batches

STATE_FILE = "state.pt"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class Callback(Protocol):
    """Optional hooks; every method is optional. ``stop = True`` ends training after the current epoch."""

    def on_epoch_start(self, epoch: int) -> None: ...
    def on_epoch_end(self, epoch: int) -> dict[str, float]: ...


@dataclass
class FitResult:
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per finished epoch (this process)
    resumed_from: tuple[int, int] | None = None  # (epoch, step in epoch) when resumed


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; choose from ['bf16', 'fp16', 'fp32']")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def move_batch(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    non_blocking = device.type == "cuda"
    if non_blocking:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: Path | None) -> None:
        self.path = run_dir / "metrics.jsonl" if run_dir is not None and distributed.is_main() else None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def fit(task: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None, *, epochs: int, device: torch.device,
        run_dir: str | Path | None = None, precision: str = "fp32", grad_clip: float | None = None,
        log_every: int = 20, checkpoint_every_steps: int = 0, resume: bool = True,
        callbacks: Sequence[Any] = (), identity: dict[str, Any] | None = None, progress: bool = True,
        sync_batchnorm: bool = False, desc: str = "train") -> FitResult:
    """Train ``task`` for ``epochs`` over ``batches``; see the module docstring. ``identity`` (e.g. the encoder
    spec) is stored in the checkpoint and must match on resume, so a run never continues with another model."""
    run_dir = Path(run_dir) if run_dir is not None else None
    state_path = run_dir / STATE_FILE if run_dir is not None else None
    task.to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    log = MetricsLog(run_dir)
    start_epoch, start_step, global_step = 0, 0, 0
    result = FitResult(epochs_run=0)

    if resume and state_path is not None and state_path.exists():
        state = checkpoint.load_state(state_path)
        if identity is not None and state.get("identity") not in (None, identity):
            raise checkpoint.CheckpointError(
                f"{state_path} was written for {state['identity']} but this run asks for {identity}; "
                f"use another run name or set train.resume=false to start over")
        task.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        for cb, cb_state in zip(callbacks, state.get("callbacks", [])):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        checkpoint.set_rng_state(state["rng"])
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        result.resumed_from = (start_epoch, start_step)
        if distributed.is_main() and start_epoch < epochs:
            print(f"resuming {run_dir} at epoch {start_epoch + 1}, step {start_step}")

    model: nn.Module = task
    if distributed.world_size() > 1:
        if sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=False)

    def save(epoch: int, step_in_epoch: int) -> None:
        if state_path is None or not distributed.is_main():
            return
        checkpoint.save_state(state_path, {
            "model": task.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(), "rng": checkpoint.rng_state(), "epoch": epoch,
            "step_in_epoch": step_in_epoch, "global_step": global_step, "identity": identity,
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in callbacks],
        })

    images_per_step = batches.batch_size * distributed.world_size()
    for epoch in range(start_epoch, epochs):
        for cb in callbacks:
            if hasattr(cb, "on_epoch_start"):
                cb.on_epoch_start(epoch)
        task.train()
        first = start_step if epoch == start_epoch else 0
        bar = tqdm(total=len(batches), initial=first, desc=f"{desc} {epoch + 1}/{epochs}",
                   disable=not (progress and distributed.is_main()), dynamic_ncols=True, leave=False)
        running: Tensor | None = None  # summed on the device: no host sync per step
        since_log, epoch_loss, epoch_steps = 0, 0.0, 0
        t_epoch = t_log = time.perf_counter()
        for step, batch in enumerate(batches.epoch(epoch, start_step=first), start=first):
            batch = move_batch(batch, device)
            with _autocast(device, precision):
                out = model(batch)
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(task.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            global_step += 1
            detached = {k: v.detach().float() for k, v in out.items() if isinstance(v, Tensor) and v.ndim == 0}
            running = detached if running is None else {k: running[k] + v for k, v in detached.items()}
            since_log += 1
            bar.update(1)
            last = step + 1 == len(batches)
            if since_log == log_every or last:
                means = {k: distributed.all_reduce_mean(v).item() / since_log for k, v in running.items()}
                if not all(math.isfinite(v) for v in means.values()):
                    raise NonFiniteLossError(
                        f"non-finite loss {means} at epoch {epoch + 1}, step {step + 1} (global step {global_step}); "
                        f"the last good checkpoint {state_path} is kept; lower optim.lr or set train.grad_clip")
                now = time.perf_counter()
                speed = since_log * images_per_step / max(now - t_log, 1e-9)
                lr = optimizer.param_groups[0]["lr"]
                log.write({"epoch": epoch + 1, "step": global_step, **means, "lr": lr, "images_per_s": speed})
                bar.set_postfix({**{k: f"{v:.4g}" for k, v in means.items()}, "lr": f"{lr:.3g}",
                                 "img/s": f"{speed:.0f}"})
                epoch_loss += means["loss"] * since_log
                epoch_steps += since_log
                running, since_log, t_log = None, 0, now
            if checkpoint_every_steps and global_step % checkpoint_every_steps == 0 and not last:
                if running is not None and not torch.isfinite(running["loss"]).item():
                    raise NonFiniteLossError(f"non-finite loss before step {global_step}; last good checkpoint kept")
                save(epoch, step + 1)
        bar.close()
        record: dict[str, Any] = {"epoch": epoch + 1, "event": "epoch_end", "loss": epoch_loss / max(epoch_steps, 1),
                                  "epoch_time_s": time.perf_counter() - t_epoch}
        task.eval()
        for cb in callbacks:
            if hasattr(cb, "on_epoch_end"):
                record.update(cb.on_epoch_end(epoch) or {})
        log.write(record)
        if distributed.is_main() and progress:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items() if k != "event"}
            tqdm.write(f"{desc} " + " ".join(f"{k}={v}" for k, v in shown.items()))
        result.history.append(record)
        result.epochs_run += 1
        save(epoch + 1, 0)
        if any(getattr(cb, "stop", False) for cb in callbacks):
            break
    task.eval()
    return result
