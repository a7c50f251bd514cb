"""The one training loop, shared by pretraining and fine-tuning.

``fit`` runs a *task*: any ``nn.Module`` whose ``forward(batch) -> {"loss": ..., other 0-d tensors}``. It owns the
device, mixed precision, DDP wrapping, gradient clipping, the progress bar, ``metrics.jsonl``, and
checkpoint/resume: the state (model, optimizer, scheduler, grad scaler, every rank's RNG states, epoch and step) is
written atomically every epoch and every ``checkpoint_every_steps`` steps, and a rerun of the same command
continues from it. A resumed CPU run ends bit for bit where an uninterrupted one would.

No host sync per step: metrics are summed on the device and read every ``log_every`` steps; a NaN/inf loss is
recorded on the device (its step included) and stops training at the next log or checkpoint, before anything
non-finite is saved.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from reprlab import checkpoint, distributed
from reprlab.data.loader import Batches

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
DEVICE_DATA_LIMIT = 2**30  # bytes of uint8 images served straight from GPU memory when data_on_device is None


class NonFiniteLossError(FloatingPointError):
    """The loss (or the weights) became NaN or inf; training stopped and the last good checkpoint is kept."""


class Callback(Protocol):
    """Optional hooks; every method is optional. ``stop = True`` ends training after the current epoch."""

    def on_epoch_start(self, epoch: int) -> None: ...
    def on_epoch_end(self, epoch: int) -> dict[str, float]: ...


@dataclass
class FitResult:
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per finished epoch (this process)
    resumed_from: tuple[int, int] | None = None  # (epoch, step in epoch) when resumed
    global_step: int = 0


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; choose from ['bf16', 'fp16', 'fp32']")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def move_batch(batch: dict[str, Tensor], device: torch.device, channels_last: bool = False) -> dict[str, Tensor]:
    """Batch to ``device``: CPU tensors are pinned and copied asynchronously on CUDA; images optionally NHWC."""
    non_blocking = device.type == "cuda"
    moved = {}
    for key, value in batch.items():
        if non_blocking and value.device.type == "cpu":
            value = value.pin_memory()
        value = value.to(device, non_blocking=non_blocking)
        if channels_last and key == "images" and value.ndim == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        moved[key] = value
    return moved


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: Path | None) -> None:
        self.path = run_dir / METRICS_FILE if run_dir is not None and distributed.is_main() else None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def restart(self) -> None:
        """A fresh run: drop the lines of an earlier one."""
        if self.path is not None and self.path.exists():
            self.path.unlink()

    def truncate_after(self, global_step: int) -> None:
        """Resuming at ``global_step``: drop lines logged after it (they will be logged again), keep the rest."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the crash
                continue
            if record.get("step", 0) <= global_step:
                kept.append(line + "\n")
        checkpoint.atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(kept)))


def _trainable(task: nn.Module) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in task.parameters())


def _wrap_ddp(task: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the parameters that are trainable now (rewrap when a policy unfreezes more: DDP only syncs the
    parameters that required grad when it was built)."""
    if distributed.world_size() == 1 or not any(_trainable(task)):
        return task
    return nn.parallel.DistributedDataParallel(
        task, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=False)


def _step_position(global_step: int, steps_per_epoch: int) -> str:
    """'epoch E, step S (global step G)' for a 1-based global step."""
    epoch, step = divmod(global_step - 1, steps_per_epoch)
    return f"epoch {epoch + 1}, step {step + 1} (global step {global_step})"


def _restore(state_path: Path, task: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, scaler: torch.amp.GradScaler, callbacks: Sequence[Any],
             identity: dict[str, Any] | None) -> dict[str, Any]:
    """Load ``state_path`` into everything that trains; errors name the file and the way out."""
    state = checkpoint.load_state(state_path)
    fix = "use another run name, or set train.resume=false to start over (the old state is then deleted)"
    if identity is not None and state.get("identity") not in (None, identity):
        raise checkpoint.CheckpointError(
            f"{state_path} was written for {state['identity']} but this run asks for {identity}; {fix}")
    try:
        task.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as err:
        # torch's message: a header line, then one line per problem ("size mismatch for ...", "Missing key(s)")
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
        problems = [line for line in lines if not line.startswith("Error(s) in loading")] or lines
        raise checkpoint.CheckpointError(
            f"{state_path} does not fit this run's model or optimizer ({' '.join(problems[:2])[:400]}); "
            f"{fix}") from None
    for cb, cb_state in zip(callbacks, state.get("callbacks", [])):
        if cb_state is not None and hasattr(cb, "load_state_dict"):
            cb.load_state_dict(cb_state)
    _restore_rng(state, state_path)
    return state


def _restore_rng(state: dict[str, Any], state_path: Path) -> None:
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    rank, world = distributed.rank(), distributed.world_size()
    if len(rngs) == world:
        checkpoint.set_rng_state(rngs[rank])
        return
    if distributed.is_main():
        warnings.warn(f"{state_path} was written by {len(rngs)} process(es), this run has {world}: the random "
                      f"augmentations from here on differ from an uninterrupted run", stacklevel=3)
    checkpoint.set_rng_state(rngs[0])
    if rank > 0:  # distinct, reproducible streams per rank
        seed = int(torch.randint(2**31, (1,))) + 7919 * rank
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)


def fit(task: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None, *, epochs: int, device: torch.device,
        run_dir: str | Path | None = None, precision: str = "fp32", grad_clip: float | None = None,
        log_every: int = 20, checkpoint_every_steps: int = 0, resume: bool = True,
        callbacks: Sequence[Any] = (), identity: dict[str, Any] | None = None, progress: bool = True,
        sync_batchnorm: bool = False, channels_last: bool = False, data_on_device: bool | None = None,
        desc: str = "train") -> FitResult:
    """Train ``task`` for ``epochs`` over ``batches``; see the module docstring.

    ``identity`` (e.g. the encoder spec) is stored in the checkpoint and must match on resume, so a run never
    continues with another model. ``resume=False`` starts over: the old state and metrics.jsonl are deleted.
    ``sync_batchnorm``: BatchNorm statistics over the global batch under DDP. ``data_on_device``: serve the whole
    uint8 dataset from GPU memory (None: when it takes at most 1 GiB)."""
    run_dir = Path(run_dir) if run_dir is not None else None
    state_path = run_dir / STATE_FILE if run_dir is not None else None
    if run_dir is not None and distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    task.to(device)
    if device.type == "cuda" and (data_on_device or (
            data_on_device is None and batches.data.images.nbytes <= DEVICE_DATA_LIMIT)):
        batches = batches.to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    log = MetricsLog(run_dir)
    start_epoch, start_step, global_step = 0, 0, 0
    result = FitResult(epochs_run=0)

    if resume and state_path is not None and state_path.exists():
        state = _restore(state_path, task, optimizer, scheduler, scaler, callbacks, identity)
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        result.resumed_from = (start_epoch, start_step)
        log.truncate_after(global_step)
        if distributed.is_main() and start_epoch < epochs:
            print(f"resuming {run_dir} at epoch {start_epoch + 1}, step {start_step}")
    else:
        if state_path is not None and distributed.is_main() and state_path.exists():
            state_path.unlink()  # resume=false: a later crash must not resume the run this one replaces
        log.restart()
    distributed.barrier()  # every rank has read the state before any rank can overwrite it

    if sync_batchnorm and distributed.world_size() > 1:
        task = distributed.convert_sync_batchnorm(task, device)
    model, trainable = _wrap_ddp(task, device), _trainable(task)
    steps_per_epoch = len(batches)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first global step with a non-finite loss

    def ensure_finite(context: str) -> None:
        """Raise (on every rank) if a non-finite loss was seen or the weights are no longer finite."""
        flags = [p.detach().isfinite().all() for p in task.parameters()]
        weights_ok = torch.stack(flags).all() if flags else first_bad.new_ones((), dtype=torch.bool)
        ok = torch.stack([(first_bad < 0).float(), weights_ok.float()])
        ok = distributed.all_reduce_min(ok).tolist()
        if all(ok):
            return
        bad_steps = [s for s in distributed.all_gather(first_bad.view(1)).tolist() if s >= 0]
        where = (f"a non-finite loss (NaN or inf) at {_step_position(min(bad_steps), steps_per_epoch)}"
                 if bad_steps else f"non-finite weights by global step {global_step}")
        kept = (f"the last good checkpoint {state_path} is kept" if state_path is not None and state_path.exists()
                else "no checkpoint was written")
        raise NonFiniteLossError(f"training stopped ({context}): {where}; {kept}; lower optim.lr, set "
                                 f"train.grad_clip or use precision fp32")

    def save(epoch: int, step_in_epoch: int) -> None:
        """Collective: every rank's RNG state goes into the one file rank 0 writes. Never saves NaN/inf."""
        ensure_finite("before writing a checkpoint" if state_path is not None else "at a checkpoint step")
        if state_path is None:
            return
        rngs = distributed.all_gather_object(checkpoint.rng_state())
        if distributed.is_main():
            checkpoint.save_state(state_path, {
                "model": task.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(), "rng": rngs, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": global_step, "world_size": distributed.world_size(), "identity": identity,
                "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in callbacks],
            })
        distributed.barrier()  # no rank runs ahead (or starts a resume) before the file is in place

    images_per_step = batches.batch_size * distributed.world_size()
    for epoch in range(start_epoch, epochs):
        for cb in callbacks:
            if hasattr(cb, "on_epoch_start"):
                cb.on_epoch_start(epoch)
        if _trainable(task) != trainable:  # a policy (un)froze layers
            model, trainable = _wrap_ddp(task, device), _trainable(task)
        task.train()
        first = start_step if epoch == start_epoch else 0
        bar = tqdm(total=steps_per_epoch, initial=first, desc=f"{desc} {epoch + 1}/{epochs}",
                   disable=not (progress and distributed.is_main()), dynamic_ncols=True, leave=False)
        running: dict[str, Tensor] | None = None  # summed on the device: no host sync per step
        since_log, epoch_loss, epoch_steps = 0, 0.0, 0
        t_epoch = t_log = time.perf_counter()
        for step, batch in enumerate(batches.epoch(epoch, start_step=first), start=first):
            batch = move_batch(batch, device, channels_last)
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
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), global_step, first_bad)
            detached = {k: v.detach().float() for k, v in out.items() if isinstance(v, Tensor) and v.ndim == 0}
            running = detached if running is None else {k: running[k] + v for k, v in detached.items()}
            since_log += 1
            bar.update(1)
            last = step + 1 == steps_per_epoch
            if since_log == log_every or last:
                keys = sorted(running)
                sums = distributed.all_reduce_mean(torch.stack([running[k] for k in keys]))
                means = dict(zip(keys, (v / since_log for v in sums.tolist())))  # the one host sync
                if not all(math.isfinite(v) for v in means.values()):
                    ensure_finite(f"metrics {means}")
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
                save(epoch, step + 1)
        bar.close()
        record: dict[str, Any] = {"epoch": epoch + 1, "event": "epoch_end", "step": global_step,
                                  "loss": epoch_loss / max(epoch_steps, 1),
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
    result.global_step = global_step
    return result
