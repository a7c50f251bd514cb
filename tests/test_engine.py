"""engine.fit: training, logging, host syncs, channels_last, clipping, precision, callbacks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.contracts import Callback, Task
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches
from reprlab.engine import FitOptions, fit, move_batch

CPU = torch.device("cpu")


def tiny_data(n: int = 40, seed: int = 0) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 64, (n, 1, 8, 8), dtype=torch.uint8, generator=generator)
    images[:, 0, 0, :] += (labels * 48).to(torch.uint8)[:, None]  # a learnable signal in the first row
    return ImageSet(images, labels, list("abcd"))


class TinyTask(Task):
    """A small classifier with BatchNorm and input noise from the global RNG (so RNG state matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        self.seen_formats: list[bool] = []

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["images"]
        self.seen_formats.append(images.is_contiguous(memory_format=torch.channels_last))
        x = images.float() / 255
        x = x + 0.05 * torch.randn_like(x)
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, batch["labels"]),
                "acc": (logits.argmax(1) == batch["labels"]).float().mean()}


def make(seed: int = 0, lr: float = 0.1) -> tuple[TinyTask, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    task = TinyTask()
    return task, torch.optim.SGD(task.parameters(), lr=lr, momentum=0.9)


def test_fit_trains_logs_and_reports(tmp_path):
    task, optimizer = make()
    batches = Batches(tiny_data(), 8, seed=0)  # 5 steps per epoch
    result = fit(task, batches, optimizer, None,
                 FitOptions(epochs=6, device=CPU, run_dir=tmp_path, log_every=2, progress=False))
    assert result.epochs_run == 6 and result.global_step == 30 and result.resumed_from is None
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "event" not in r]
    assert steps[:3] == [2, 4, 5]  # every log_every steps and at the end of each epoch
    assert sum(r.get("event") == "epoch_end" for r in lines) == 6
    assert {"loss", "acc", "lr", "images_per_s"} <= set(lines[0])
    assert not task.training  # handed back in eval mode


def test_no_host_sync_per_step(monkeypatch):
    """Only log steps and epoch ends read device values: .item()/.tolist()/bool() are counted during fit."""
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):  # noqa: ANN001
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    task, _ = make()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)  # plain SGD: Adam reads its CPU step counter
    # 10 steps: 2 log steps + 1 end-of-epoch finiteness check
    fit(task, Batches(tiny_data(), 4, seed=0), optimizer, None,
        FitOptions(epochs=1, device=CPU, log_every=5, progress=False))
    assert len(calls) == 3, calls


def test_channels_last_option():
    task, optimizer = make()
    data = ImageSet(torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8), torch.arange(16) % 4, list("abcd"))
    task.net[1] = nn.Linear(192, 16)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    fit(task, Batches(data, 8), optimizer, None, FitOptions(epochs=1, device=CPU, channels_last=True, progress=False))
    assert task.seen_formats == [True, True]
    batch = move_batch({"images": data.images[:2]}, CPU, channels_last=False)
    assert batch["images"].is_contiguous()


def test_grad_clip_bounds_every_update():
    task, _ = make()
    optimizer = torch.optim.SGD(task.parameters(), lr=1.0)  # no momentum: update = -lr * clipped grad
    before = [p.detach().clone() for p in task.parameters()]
    fit(task, Batches(tiny_data(), 8), optimizer, None,
        FitOptions(epochs=1, device=CPU, grad_clip=1e-3, progress=False))
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(task.parameters(), before)]).norm()
    assert 0 < moved <= 5 * 1e-3 * 1.0001  # 5 steps of norm <= 1e-3


def test_bf16_autocast_on_cpu_and_fp16_refused():
    task, optimizer = make()
    result = fit(task, Batches(tiny_data(), 8), optimizer, None,
                 FitOptions(epochs=1, device=CPU, precision="bf16", progress=False))
    assert result.history[0]["loss"] > 0
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        fit(task, Batches(tiny_data(), 8), optimizer, None,
            FitOptions(epochs=1, device=CPU, precision="fp16", progress=False))
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        fit(task, Batches(tiny_data(), 8), optimizer, None,
            FitOptions(epochs=1, device=CPU, precision="fp8", progress=False))


class Recorder(Callback):
    def __init__(self, stop_after: int) -> None:
        self.events: list[str] = []
        self.stop, self.stop_after = False, stop_after

    def on_epoch_start(self, epoch: int) -> None:
        self.events.append(f"start{epoch}")

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        self.events.append(f"end{epoch}")
        self.stop = epoch + 1 >= self.stop_after
        return {"custom": float(epoch)}


def test_callbacks_hooks_metrics_and_stop(tmp_path):
    task, optimizer = make()
    recorder = Recorder(stop_after=2)
    result = fit(task, Batches(tiny_data(), 8), optimizer, None,
                 FitOptions(epochs=5, device=CPU, run_dir=tmp_path, progress=False), callbacks=[recorder])
    assert recorder.events == ["start0", "end0", "start1", "end1"]
    assert result.epochs_run == 2 and result.history[1]["custom"] == 1.0


def test_scheduler_is_stepped_per_step():
    task, optimizer = make()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    fit(task, Batches(tiny_data(), 8), optimizer, scheduler, FitOptions(epochs=2, device=CPU, progress=False))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 11)  # 10 steps taken


def test_batches_to_same_device_is_a_no_op():
    batches = Batches(tiny_data(), 8)
    assert batches.to("cpu") is batches
    assert batches.to_device(CPU) is batches  # placement is the source's decision: a CPU run keeps it as it is


def test_sources_and_tasks_meet_the_contracts():
    from reprlab.contracts import BatchSource
    from reprlab.finetune.task import ClassificationTask
    from reprlab.ssl import METHODS

    assert isinstance(Batches(tiny_data(), 8), BatchSource)
    assert all(issubclass(cls, Task) for cls in METHODS.values()) and issubclass(ClassificationTask, Task)
    assert ClassificationTask.sync_batchnorm is False  # fine-tuning keeps per-rank BatchNorm statistics
