"""A run directory is the unit of trust: one live run at a time, its config.yaml always that of its weights.

:func:`claim` locks ``run_dir`` for the life of the run (a second live run into it is refused, naming the
holder's pid and host; the lock dies with its process, even under ``kill -9``), removes temporary files left by
a killed write, and, when the run will resume, compares the new config with the saved ``config.yaml``: what may
change between a run and its resume (more or fewer epochs, logging, the device) is allowed and logged; anything
else is refused, naming the keys and the way out. ``config.yaml`` is written by :meth:`RunDirectory.write_config`
once everything was built from the config, so a command that fails validation leaves the old run as it was.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reprlab import distributed
from reprlab.checkpoint import CheckpointError
from reprlab.config import save_config, to_dict

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
# Keys a resume may change: they do not alter what the saved state means.
RESUMABLE = ("train.epochs", "train.log_every", "train.progress", "train.checkpoint_every_steps", "train.resume",
             "train.device", "monitor.", "early_stopping_patience")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose value differs between two config dicts: ``{key: (saved, new)}``."""
    old, now = _flatten(saved), _flatten(new)
    return {k: (old.get(k), now.get(k)) for k in sorted(old.keys() | now.keys()) if old.get(k) != now.get(k)}


def _resumable(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE)


@dataclass
class RunDirectory:
    path: Path

    def write_config(self, config: Any) -> None:
        """Write config.yaml (rank 0): call once the run's data, model and task were built from ``config``."""
        if distributed.is_main():
            save_config(config, self.path / CONFIG_FILE)

    def check_resume(self, config: Any) -> None:
        """Refuse to resume a saved state (``state.pt`` here or in a per-seed sub-folder) under a config that
        changes what that state means."""
        saved_path = self.path / CONFIG_FILE
        if not saved_path.exists() or not any(self.path.rglob("state.pt")):
            return
        saved = yaml.safe_load(saved_path.read_text()) or {}
        changes = config_changes(saved, to_dict(config))
        refused = {k: v for k, v in changes.items() if not _resumable(k)}
        if refused:
            shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in list(refused.items())[:4])
            more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
            raise CheckpointError(
                f"{self.path} holds a run with another config ({shown}{more}); resuming would continue the old "
                f"run's state under the new settings. Set train.resume=false to start this run over in that "
                f"directory (its state is then replaced), or give it a new name=...")
        if changes and distributed.is_main():
            print(f"{self.path}: continuing the saved run with changed " + ", ".join(
                f"{k} {o!r} -> {n!r}" for k, (o, n) in changes.items()))


def _lock(path: Path) -> int:
    """An exclusive, non-blocking flock on ``path/.lock`` holding our pid and host; raises if another has it."""
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise CheckpointError(f"{path} is in use by a live run ({holder}); wait for it to finish, stop it, or "
                              f"give this run another name=...") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    return fd


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of atomic writes killed mid-way (``.<name>.<random>.tmp``): safe to drop under the lock."""
    for tmp in path.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


@contextmanager
def claim(path: str | Path) -> Iterator[RunDirectory]:
    """Hold ``path`` for one run (rank 0 takes the lock; every rank gets the RunDirectory)."""
    path = Path(path)
    fd = None
    if distributed.is_main():
        path.mkdir(parents=True, exist_ok=True)
        fd = _lock(path)
        _remove_stale_temporaries(path)
    try:
        yield RunDirectory(path)
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
