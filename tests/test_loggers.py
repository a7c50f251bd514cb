"""train.loggers: metrics.jsonl always, TensorBoard event files read back, W&B offline, CSV, clear errors."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.contracts import Task
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches
from reprlab.engine import FitOptions, fit
from reprlab.loggers import LOGGERS, check_loggers

CPU = torch.device("cpu")
HPARAMS = {"optim": {"lr": 0.1, "name": "sgd"}, "train": {"epochs": 2, "loggers": ["jsonl"]}}


class TinyTask(Task):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"loss": F.cross_entropy(self.net(batch["images"].float() / 255), batch["labels"])}


def train(run_dir: Path, loggers: tuple[str, ...], epochs: int = 2) -> None:
    torch.manual_seed(0)
    data = ImageSet(torch.randint(0, 255, (16, 1, 4, 4), dtype=torch.uint8), torch.arange(16) % 2, ["a", "b"])
    task = TinyTask()
    fit(task, Batches(data, 4, seed=0), torch.optim.SGD(task.parameters(), lr=0.1), None,
        FitOptions(epochs=epochs, device=CPU, run_dir=run_dir, log_every=2, progress=False, loggers=loggers,
                   hparams=HPARAMS))


def test_tensorboard_event_file_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path, ("tensorboard",))
    assert (tmp_path / "metrics.jsonl").exists()  # jsonl is always on
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/images_per_s", "epoch/loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]  # every log_every steps
    assert [e.step for e in events.Scalars("epoch/loss")] == [4, 8]
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in jsonl if "event" not in r)
    assert events.Scalars("train/loss")[0].value == pytest.approx(first["loss"])
    assert "config/text_summary" in events.Tags()["tensors"]  # the config as text, beside the HPARAMS data


def test_csv_has_one_row_per_scalar(tmp_path):
    train(tmp_path, ("csv",))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    losses = [r for r in rows if r["name"] == "loss" and r["event"] == "train"]
    assert [int(r["step"]) for r in losses] == [2, 4, 6, 8]
    assert {r["event"] for r in rows} == {"train", "epoch_end"}


def test_wandb_runs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional logger (pip install 'reprlab[loggers]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tmp_path, ("wandb",))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (records,) = runs[0].glob("run-*.wandb")  # what `wandb sync` uploads later: protobuf records
    expected = (b"train/loss", b"epoch/loss", b"optim")
    deadline = time.monotonic() + 60  # wandb's service process may still be flushing after finish()
    while not all(key in records.read_bytes() for key in expected) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = records.read_bytes()
    assert all(key in data for key in expected), data[:200]


def test_mlflow_logs_to_a_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is an optional logger (pip install 'reprlab[loggers]')")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train(tmp_path, ("mlflow",))
    assert list((tmp_path / "mlruns").rglob("train/loss")) or list((tmp_path / "mlruns").rglob("*loss*"))


def test_unknown_and_missing_loggers_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown logger 'tensorbaord'.*choose from"):
        check_loggers(["jsonl", "tensorbaord"])
    assert set(LOGGERS) == {"jsonl", "csv", "tensorboard", "wandb", "mlflow"}
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if name == "wandb":
            raise ImportError("No module named 'wandb'", name="wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ImportError, match=r"pip install \"reprlab\[loggers\]\""):
        train(tmp_path, ("wandb",))
