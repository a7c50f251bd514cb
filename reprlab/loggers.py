"""Where the training loop's metrics go: ``metrics.jsonl`` always, plus TensorBoard, W&B, MLflow or CSV.

``train.loggers: [jsonl, tensorboard]`` picks them. Each gets every log line (``{"epoch", "step", "loss", ...,
"lr", "images_per_s"}``), every epoch's line (``"event": "epoch_end"`` with the callbacks' metrics) and, once,
the run's config as hyperparameters. Only rank 0 logs. TensorBoard, W&B and MLflow are optional extras
(``pip install "reprlab[loggers]"``); W&B honours ``WANDB_MODE=offline``, MLflow ``MLFLOW_TRACKING_URI``
(default: ``<run_dir>/mlruns``).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from reprlab import checkpoint, distributed

METRICS_FILE = "metrics.jsonl"


class Logger:
    """A destination for metrics; every method is optional."""

    def log(self, record: dict[str, Any]) -> None:
        """One line: a log window (``step`` and means) or an epoch end (``"event": "epoch_end"``)."""

    def close(self) -> None:
        """Flush and release files or connections."""


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in ("epoch", "step", "event") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``; lists become strings (hyperparameter tables)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class JsonlLogger(Logger):
    """``metrics.jsonl``: kept consistent across a resume (lines after the resumed step are dropped)."""

    def __init__(self, run_dir: Path, hparams: dict[str, Any], resume_step: int | None) -> None:
        self.path = run_dir / METRICS_FILE
        if resume_step is None:
            self.path.unlink(missing_ok=True)  # a fresh run: drop the lines of an earlier one
        elif self.path.exists():
            self._truncate_after(resume_step)

    def _truncate_after(self, global_step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the crash
                continue
            if record.get("step", 0) <= global_step:
                kept.append(line + "\n")
        checkpoint.atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(kept)))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class CsvLogger(Logger):
    """``metrics.csv`` in long form (``step, epoch, event, name, value``): one row per scalar, so log lines and
    epoch lines with different metrics share one file a spreadsheet opens."""

    def __init__(self, run_dir: Path, hparams: dict[str, Any], resume_step: int | None) -> None:
        self.path = run_dir / "metrics.csv"
        if resume_step is None or not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "epoch", "event", "name", "value"])

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for name, value in _scalars(record).items():
                writer.writerow([record.get("step"), record.get("epoch"), record.get("event", "train"), name, value])


class TensorBoardLogger(Logger):
    """Event files under ``<run_dir>/tensorboard``: ``train/<metric>`` per log line, ``epoch/<metric>`` per
    epoch, the config in the HPARAMS tab and as text."""

    def __init__(self, run_dir: Path, hparams: dict[str, Any], resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams as hparams_summary
        except ImportError as err:
            raise _missing("tensorboard", err) from None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        flat = flatten(hparams)
        for summary in hparams_summary(flat, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat.items()))

    def log(self, record: dict[str, Any]) -> None:
        group = "epoch" if record.get("event") == "epoch_end" else "train"
        for name, value in _scalars(record).items():
            self.writer.add_scalar(f"{group}/{name}", value, record.get("step", 0))

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """A W&B run named after the run directory, its files under it; ``WANDB_MODE=offline`` needs no account."""

    def __init__(self, run_dir: Path, hparams: dict[str, Any], resume_step: int | None) -> None:
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb", err) from None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "reprlab"), name=run_dir.name,
                              dir=str(run_dir), config=hparams, reinit="finish_previous")

    def log(self, record: dict[str, Any]) -> None:
        group = "epoch" if record.get("event") == "epoch_end" else "train"
        self.run.log({f"{group}/{k}": v for k, v in _scalars(record).items()}, step=record.get("step"))

    def close(self) -> None:
        self.run.finish()


class MlflowLogger(Logger):
    """An MLflow run (tracking URI from ``MLFLOW_TRACKING_URI``, default ``<run_dir>/mlruns``)."""

    def __init__(self, run_dir: Path, hparams: dict[str, Any], resume_step: int | None) -> None:
        try:
            import mlflow
        except ImportError as err:
            raise _missing("mlflow", err) from None
        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(hparams).items()})

    def log(self, record: dict[str, Any]) -> None:
        group = "epoch" if record.get("event") == "epoch_end" else "train"
        self.mlflow.log_metrics({f"{group}/{k}": v for k, v in _scalars(record).items()}, step=record.get("step"))

    def close(self) -> None:
        self.mlflow.end_run()


LOGGERS: dict[str, type[Logger]] = {
    "jsonl": JsonlLogger,
    "csv": CsvLogger,
    "tensorboard": TensorBoardLogger,
    "wandb": WandbLogger,
    "mlflow": MlflowLogger,
}


def _missing(name: str, err: ImportError) -> ImportError:
    return ImportError(f"train.loggers includes {name!r} but {err.name or name} is not installed: "
                       f"pip install \"reprlab[loggers]\" (or pip install {name}), or remove it from train.loggers")


def check_loggers(names: list[str] | tuple[str, ...]) -> None:
    """Raise ValueError naming an unknown logger and the valid ones."""
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"unknown logger {unknown[0]!r} in train.loggers; choose from {sorted(LOGGERS)}")


class MetricsLoggers(Logger):
    """The loggers of one run (rank 0; none without a run directory). ``jsonl`` is always among them."""

    def __init__(self, names: tuple[str, ...], run_dir: Path | None, hparams: dict[str, Any],
                 resume_step: int | None) -> None:
        check_loggers(names)
        self.loggers: list[Logger] = []
        if run_dir is None or not distributed.is_main():
            return
        for name in dict.fromkeys(("jsonl", *names)):  # ordered, without repeats
            self.loggers.append(LOGGERS[name](run_dir, hparams, resume_step))

    def log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
