"""Run directories as the unit of trust: one live run, config.yaml written after validation, resume compares the
config, state checksums, temporary files and modes, a full disk and Ctrl-C in one line."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest
import torch
import yaml

from reprlab import checkpoint, rundir
from reprlab.checkpoint import CheckpointError
from reprlab.cli import main
from reprlab.config import PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_pretrain(out_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(ROOT / "configs/pretrain/simclr_digits.yaml"), "name=run",
            f"out_dir={out_dir}", "encoder.name=timm:test_resnet", "encoder.kwargs={}", "data.limit=32",
            "train.batch_size=8", "train.epochs=1", "train.device=cpu", "train.progress=false",
            "monitor.every_epochs=0", "method.params.projection_dim=8", *extra]


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    assert main(tiny_pretrain(tmp_path)) == 0
    return tmp_path / "run"


def test_a_second_live_run_into_the_same_directory_is_refused(tmp_path, capsys):
    """Before: both exited 0, metrics.jsonl interleaved and the first run's weights were lost."""
    with rundir.claim(tmp_path / "run"):
        assert main(tiny_pretrain(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "in use by a live run" in err and f"pid {os.getpid()}" in err and socket.gethostname() in err
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert main(tiny_pretrain(tmp_path)) == 0  # the lock went with its holder


def test_a_failed_validation_leaves_the_runs_config_yaml_alone(finished_run, capsys):
    before = (finished_run / "config.yaml").read_bytes()
    assert main(tiny_pretrain(finished_run.parent, "train.resume=false", "method.params.temprature=0.2")) == 2
    assert "temprature" in capsys.readouterr().err
    assert (finished_run / "config.yaml").read_bytes() == before


@pytest.mark.parametrize("change", ["train.batch_size=16", "data.image_size=16", "optim.lr=0.01"])
def test_a_resume_refuses_a_changed_setting_and_names_the_key_and_the_fix(finished_run, capsys, change):
    assert main(tiny_pretrain(finished_run.parent, change)) == 2
    err = capsys.readouterr().err
    assert change.split("=")[0] in err and "train.resume=false" in err and "name=" in err
    assert main(tiny_pretrain(finished_run.parent, change, "train.resume=false")) == 0  # the way out works
    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    section, key = change.split("=")[0].split(".")
    assert str(saved[section][key]) == change.split("=")[1]


def test_a_resume_may_extend_the_run_and_says_so(finished_run, capsys):
    assert main(tiny_pretrain(finished_run.parent, "train.epochs=2", "train.log_every=3")) == 0
    out = capsys.readouterr().out
    assert "changed train.epochs 1 -> 2" in out and "train.log_every" in out
    assert checkpoint.load_state(finished_run / "state.pt")["epoch"] == 2


def test_config_changes_lists_dotted_keys():
    old = load_config(PretrainConfig, overrides=["train.epochs=1"])
    new = load_config(PretrainConfig, overrides=["train.epochs=2", "method.params.temperature=0.2"])
    from reprlab.config import to_dict

    changes = rundir.config_changes(to_dict(old), to_dict(new))
    assert changes == {"method.params.temperature": (None, 0.2), "train.epochs": (1, 2)}


def test_stale_temporaries_are_removed_and_files_come_out_0644(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".state.pt.k3j4h5.tmp"  # what a kill -9 during a write leaves
    stale.write_bytes(b"")
    with rundir.claim(run):
        assert not stale.exists()
    old_umask = os.umask(0o022)
    try:
        checkpoint.save_state(run / "state.pt", {"x": torch.ones(2)})
        checkpoint.write_json(run / "meta.json", {"a": 1})
    finally:
        os.umask(old_umask)
    for name in ("state.pt", "meta.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                                  "64 vs 0")])
def test_a_full_disk_says_so_and_keeps_the_previous_state(tmp_path, failure):
    path = tmp_path / "state.pt"
    checkpoint.save_state(path, {"x": torch.ones(2)})

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise failure

    with pytest.raises(CheckpointError, match="no space left") as caught:
        checkpoint.atomic_write(path, write)
    assert "previous state.pt is kept" in str(caught.value) and caught.value.__suppress_context__
    assert torch.equal(checkpoint.load_state(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_ctrl_c_ends_in_one_line(tmp_path, capsys, monkeypatch):
    import reprlab.cli as cli

    def interrupted(stage, config):  # noqa: ANN001
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert main(tiny_pretrain(tmp_path)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "resume" in err[0]
