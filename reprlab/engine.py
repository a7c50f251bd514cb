"""The one training loop, shared by pretraining and fine-tuning.

``fit`` trains a :class:`reprlab.contracts.Task` over a :class:`reprlab.contracts.BatchSource`. It owns the
device, mixed precision, DDP wrapping, gradient clipping, the progress bar, ``metrics.jsonl``, and
checkpoint/resume: the state (model, optimizer, scheduler, grad scaler, every rank's RNG states, epoch and step) is
written atomically every epoch and every ``checkpoint_every_steps`` steps, and a rerun of the same command
continues from it. A resumed CPU run ends bit for bit where an uninterrupted one would.

No host sync per step: metrics are summed on the device and read every ``log_every`` steps; a NaN/inf loss is
recorded on the device (its step included) and stops training at the next log or checkpoint, before anything
non-finite is saved.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from reprlab import checkpoint, distributed
from reprlab.contracts import BatchSource, Callback, Task
from reprlab.cpu_bf16_convs import guard_cpu_bf16_convs
from reprlab.hardware import resolve_numerics
from reprlab.loggers import MetricsLoggers

STATE_FILE = "state.pt"


class NonFiniteLossError(FloatingPointError):
    """The loss (or the weights) became NaN or inf; training stopped and the last good checkpoint is kept."""


@dataclass
class FitResult:
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per finished epoch (this process)
    resumed_from: tuple[int, int] | None = None  # (epoch, step in epoch) when resumed
    global_step: int = 0
    numerics: dict[str, Any] = field(default_factory=dict)  # the precision and memory format used, and why


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
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
             scheduler: Any, scaler: torch.amp.GradScaler, callbacks: Sequence[Callback],
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
        if cb_state is not None:
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




@dataclass(frozen=True)
class FitOptions:
    """The knobs of :func:`fit`. ``identity`` (e.g. the encoder spec) is stored in the checkpoint and must match
    on resume, so a run never continues with another model. ``resume=False`` starts over: the old state and
    metrics.jsonl are deleted."""

    epochs: int
    device: torch.device = torch.device("cpu")
    run_dir: Path | None = None  # state.pt and metrics.jsonl go here; None: nothing is written
    precision: str = "auto"  # auto (bf16 where native, else fp32) | fp32 | bf16 | fp16 (CUDA, grad scaler)
    grad_clip: float | None = None
    log_every: int = 20  # steps between metric lines: the only host syncs of the loop
    checkpoint_every_steps: int = 0  # 0: at the end of each epoch only
    resume: bool = True
    identity: dict[str, Any] | None = None
    progress: bool = True
    channels_last: bool = False  # model and image batches NHWC (auto precision may turn it on for convnets)
    desc: str = "train"
    loggers: tuple[str, ...] = ("jsonl",)  # reprlab.loggers.LOGGERS; jsonl is always on
    hparams: dict[str, Any] = field(default_factory=dict)  # the run's config, logged once

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        object.__setattr__(self, "device", torch.device(self.device))
        if self.run_dir is not None:
            object.__setattr__(self, "run_dir", Path(self.run_dir))


class _LogWindow:
    """Metrics of the steps since the last log line, summed on the device (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps, self.started = 0, time.perf_counter()

    def add(self, out: dict[str, Any]) -> None:
        for key, value in out.items():
            if isinstance(value, Tensor) and value.ndim == 0:
                value = value.detach().float()
                self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1

    def means(self) -> dict[str, float]:
        """The window's means over all ranks: the one host sync."""
        keys = sorted(self.sums)
        sums = distributed.all_reduce_mean(torch.stack([self.sums[k] for k in keys]))
        return dict(zip(keys, (v / self.steps for v in sums.tolist())))


class _Run:
    """The state of one :func:`fit` call: the wrapped model, the step counters and the checkpoint file."""

    def __init__(self, task: Task, source: BatchSource, optimizer: torch.optim.Optimizer,
                 scheduler: Any, options: FitOptions, callbacks: Sequence[Callback]) -> None:
        self.task, self.optimizer, self.scheduler, self.options = task, optimizer, scheduler, options
        self.callbacks, self.device = callbacks, options.device
        self.state_path = options.run_dir / STATE_FILE if options.run_dir is not None else None
        if options.run_dir is not None and distributed.is_main():
            options.run_dir.mkdir(parents=True, exist_ok=True)
        self.numerics = resolve_numerics(options.precision, options.channels_last, self.device, task)
        task.to(self.device)
        if self.numerics.channels_last:
            task.to(memory_format=torch.channels_last)
        if distributed.is_main() and options.progress:
            print(f"{options.desc}: {self.numerics.reason}; channels_last {self.numerics.channels_last}")
        self.source = source.to_device(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.numerics.precision == "fp16")
        self.steps_per_epoch = len(self.source)
        self.total_steps = options.epochs * self.steps_per_epoch
        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.resumed_from: tuple[int, int] | None = None
        self._resume_or_restart()
        if task.sync_batchnorm and distributed.world_size() > 1:
            self.task = task = distributed.convert_sync_batchnorm(task, self.device)
        self.model, self.trainable = _wrap_ddp(task, self.device), _trainable(task)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step
        self.conv_guards = guard_cpu_bf16_convs(self.task, self.numerics.precision, self.device)

    def _resume_or_restart(self) -> None:
        path, options = self.state_path, self.options
        if options.resume and path is not None and path.exists():
            state = _restore(path, self.task, self.optimizer, self.scheduler, self.scaler, self.callbacks,
                             options.identity)
            self.start_epoch, self.start_step = state["epoch"], state["step_in_epoch"]
            self.global_step, self.resumed_from = state["global_step"], (self.start_epoch, self.start_step)
            if distributed.is_main() and self.start_epoch < options.epochs:
                print(f"resuming {options.run_dir} at epoch {self.start_epoch + 1}, step {self.start_step}")
        else:
            if path is not None and distributed.is_main() and path.exists():
                path.unlink()  # resume=false: a later crash must not resume the run this one replaces
        resume_step = self.global_step if self.resumed_from is not None else None
        self.log = MetricsLoggers(options.loggers, options.run_dir, options.hparams, resume_step)
        distributed.barrier()  # every rank has read the state before any rank can overwrite it

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.close()
        for handle in self.conv_guards:
            handle.remove()

    def rewrap_if_unfrozen(self) -> None:
        """DDP only syncs the parameters that required grad when it was built: rewrap after a policy change."""
        if _trainable(self.task) != self.trainable:
            self.model, self.trainable = _wrap_ddp(self.task, self.device), _trainable(self.task)

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Forward, backward, (clip,) optimizer and scheduler step; then the task's per-step hook."""
        options, scaler, optimizer = self.options, self.scaler, self.optimizer
        batch = move_batch(batch, self.device, self.numerics.channels_last)
        with _autocast(self.device, self.numerics.precision):
            out = self.model(batch)
        loss = out["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if options.grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(self.task.parameters(), options.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        bad = (self.first_bad < 0) & ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad, self.global_step, self.first_bad)
        self.task.after_step(self.global_step, self.total_steps)
        return out

    def write_log(self, window: _LogWindow, epoch: int, bar: tqdm) -> dict[str, float]:
        """One metrics.jsonl line for ``window``; a non-finite mean stops training."""
        means = window.means()
        if not all(math.isfinite(v) for v in means.values()):
            self.ensure_finite(f"metrics {means}")
        speed = window.steps * self.source.batch_size * distributed.world_size() / max(
            time.perf_counter() - window.started, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.log({"epoch": epoch + 1, "step": self.global_step, **means, "lr": lr, "images_per_s": speed})
        bar.set_postfix({**{k: f"{v:.4g}" for k, v in means.items()}, "lr": f"{lr:.3g}", "img/s": f"{speed:.0f}"})
        return means

    def checkpoint_due(self) -> bool:
        every = self.options.checkpoint_every_steps
        return bool(every) and self.global_step % every == 0

    def ensure_finite(self, context: str) -> None:
        """Raise (on every rank) if a non-finite loss was seen or the weights are no longer finite."""
        flags = [p.detach().isfinite().all() for p in self.task.parameters()]
        weights_ok = torch.stack(flags).all() if flags else self.first_bad.new_ones((), dtype=torch.bool)
        ok = distributed.all_reduce_min(torch.stack([(self.first_bad < 0).float(), weights_ok.float()])).tolist()
        if all(ok):
            return
        bad_steps = [s for s in distributed.all_gather(self.first_bad.view(1)).tolist() if s >= 0]
        where = (f"a non-finite loss (NaN or inf) at {_step_position(min(bad_steps), self.steps_per_epoch)}"
                 if bad_steps else f"non-finite weights by global step {self.global_step}")
        path = self.state_path
        kept = (f"the last good checkpoint {path} is kept" if path is not None and path.exists()
                else "no checkpoint was written")
        raise NonFiniteLossError(f"training stopped ({context}): {where}; {kept}; lower optim.lr, set "
                                 f"train.grad_clip or use precision fp32, with train.resume=false (a plain rerun "
                                 f"resumes the diverging run as it was)")

    def save(self, epoch: int, step_in_epoch: int) -> None:
        """Collective: every rank's RNG state goes into the one file rank 0 writes. Never saves NaN/inf."""
        self.ensure_finite("before writing a checkpoint" if self.state_path is not None else "at a checkpoint")
        if self.state_path is None:
            return
        rngs = distributed.all_gather_object(checkpoint.rng_state())
        if distributed.is_main():
            checkpoint.save_state(self.state_path, {
                "model": self.task.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "rng": rngs, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": self.global_step, "world_size": distributed.world_size(),
                "identity": self.options.identity, "callbacks": [cb.state_dict() for cb in self.callbacks],
            })
        distributed.barrier()  # no rank runs ahead (or starts a resume) before the file is in place

    def end_epoch(self, epoch: int, loss_sum: float, steps: int, started: float) -> dict[str, Any]:
        """Epoch callbacks (task in eval mode) and the epoch_end line of metrics.jsonl."""
        record: dict[str, Any] = {"epoch": epoch + 1, "event": "epoch_end", "step": self.global_step,
                                  "loss": loss_sum / max(steps, 1), "epoch_time_s": time.perf_counter() - started}
        self.task.eval()
        for cb in self.callbacks:
            record.update(cb.on_epoch_end(epoch) or {})
        self.log.log(record)
        if distributed.is_main() and self.options.progress:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items() if k != "event"}
            tqdm.write(f"{self.options.desc} " + " ".join(f"{k}={v}" for k, v in shown.items()))
        return record

    def progress_bar(self, epoch: int, first: int) -> tqdm:
        options = self.options
        return tqdm(total=self.steps_per_epoch, initial=first, desc=f"{options.desc} {epoch + 1}/{options.epochs}",
                    disable=not (options.progress and distributed.is_main()), dynamic_ncols=True, leave=False)


def fit(task: Task, source: BatchSource, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None, options: FitOptions,
        callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train ``task`` for ``options.epochs`` over ``source``, resuming from ``run_dir/state.pt`` when it exists
    (see the module docstring)."""
    with _Run(task, source, optimizer, scheduler, options, callbacks) as run:
        result = FitResult(epochs_run=0, resumed_from=run.resumed_from, numerics=run.numerics.as_dict())
        for epoch in range(run.start_epoch, options.epochs):
            for cb in callbacks:
                cb.on_epoch_start(epoch)
            run.rewrap_if_unfrozen()
            run.task.train()
            first = run.start_step if epoch == run.start_epoch else 0
            bar, window, started = run.progress_bar(epoch, first), _LogWindow(), time.perf_counter()
            loss_sum, logged_steps = 0.0, 0
            for step, batch in enumerate(run.source.epoch(epoch, start_step=first), start=first):
                window.add(run.train_step(batch))
                bar.update(1)
                last = step + 1 == run.steps_per_epoch
                if window.steps == options.log_every or last:
                    loss_sum += run.write_log(window, epoch, bar)["loss"] * window.steps
                    logged_steps += window.steps
                    window = _LogWindow()
                if run.checkpoint_due() and not last:
                    run.save(epoch, step + 1)
            bar.close()
            result.history.append(run.end_epoch(epoch, loss_sum, logged_steps, started))
            result.epochs_run += 1
            run.save(epoch + 1, 0)
            if any(cb.stop for cb in callbacks):
                break
        run.task.eval()
        if run.numerics.channels_last:  # back to the standard layout for saving and evaluation
            run.task.to(memory_format=torch.contiguous_format)
        result.global_step = run.global_step
        return result
