"""Checkpoint/resume: atomic writes, complete state, bit-identical resume (in process and after SIGKILL),
``resume=false``, metrics.jsonl kept consistent, and seeded CPU runs repeatable bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab import checkpoint
from reprlab.contracts import Task
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches
from reprlab.engine import FitOptions, fit

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny_data(n: int = 40) -> ImageSet:
    generator = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 255, (n, 1, 8, 8), dtype=torch.uint8, generator=generator),
                    torch.arange(n) % 4, list("abcd"))


class Crash(RuntimeError):
    pass


class TinyTask(Task):
    """BatchNorm (buffers), input noise from the global RNG, and an optional crash before step ``crash_at``.
    ``hook_calls`` records every (step, total_steps) of the per-step hook."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        self.crash_at, self.calls = crash_at, 0
        self.hook_calls: list[tuple[int, int]] = []

    def after_step(self, step: int, total_steps: int) -> None:
        self.hook_calls.append((step, total_steps))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self.calls += 1
        x = batch["images"].float() / 255
        x = x + 0.1 * torch.randn_like(x)
        if self.calls == self.crash_at:
            raise Crash(f"simulated crash in step {self.calls}")
        return {"loss": F.cross_entropy(self.net(x), batch["labels"])}


def run(run_dir: Path | None, epochs: int = 2, crash_at: int | None = None, init_seed: int = 0, **kwargs):
    """Seed, build task/Adam/scheduler, fit. Returns (task, result)."""
    torch.manual_seed(init_seed)
    task = TinyTask(crash_at)
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    kwargs = {"log_every": 1, "checkpoint_every_steps": 4, "progress": False, **kwargs}
    result = fit(task, Batches(tiny_data(), 8, seed=5), optimizer, scheduler,
                 FitOptions(epochs=epochs, device=CPU, run_dir=run_dir, **kwargs))
    return task, result


def weights(task: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in task.state_dict().items()}


def identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seeded_cpu_runs_are_bit_identical():
    first, _ = run(None)
    second, _ = run(None)
    assert identical(weights(first), weights(second))
    other_seed, _ = run(None, init_seed=1)
    assert not identical(weights(first), weights(other_seed))


def test_crash_mid_epoch_then_resume_is_bit_identical(tmp_path):
    reference, _ = run(tmp_path / "a")  # 5 steps per epoch, 10 in all
    with pytest.raises(Crash):  # checkpoints at global steps 3, 5 (epoch end), 6; dies in step 8
        run(tmp_path / "b", crash_at=8, checkpoint_every_steps=3)
    state = checkpoint.load_state(tmp_path / "b" / "state.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 6)
    # another init seed: everything must come from the state
    resumed, result = run(tmp_path / "b", init_seed=123, checkpoint_every_steps=3)
    assert result.resumed_from == (1, 1)
    assert identical(weights(resumed), weights(reference))
    # metrics.jsonl: step 7 was logged before the crash, dropped on resume and logged once again
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
             if "event" not in r]
    assert steps == list(range(1, 11))


def test_step_hook_sees_every_global_step_and_the_total_across_a_resume(tmp_path):
    """after_step runs after each optimizer step with the 1-based global step and epochs x steps_per_epoch; a
    resumed run continues the count where the checkpoint left it (steps 7 and on), not from 1."""
    crashed = TinyTask(crash_at=8)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(crashed.parameters(), lr=1e-2)
    with pytest.raises(Crash):
        fit(crashed, Batches(tiny_data(), 8, seed=5), optimizer, None,
            FitOptions(epochs=2, device=CPU, run_dir=tmp_path, checkpoint_every_steps=3, progress=False))
    assert crashed.hook_calls == [(step, 10) for step in range(1, 8)]  # died inside step 8
    resumed, result = run(tmp_path, checkpoint_every_steps=3)
    assert result.resumed_from == (1, 1)
    assert resumed.hook_calls == [(step, 10) for step in range(7, 11)]  # from the state at global step 6
    longer, _ = run(tmp_path, epochs=3)  # extending the run: the total grows, the count goes on
    assert longer.hook_calls == [(step, 15) for step in range(11, 16)]


def test_state_holds_everything_needed(tmp_path):
    run(tmp_path, epochs=1)
    state = checkpoint.load_state(tmp_path / "state.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step_in_epoch", "global_step",
            "world_size", "identity", "callbacks"} <= set(state)
    assert {"torch", "numpy", "python"} <= set(state["rng"][0])
    assert state["optimizer"]["state"]  # Adam moments, not just hyperparameters
    assert state["scheduler"]["last_epoch"] == 5 and (state["epoch"], state["step_in_epoch"]) == (1, 0)


def test_rerunning_a_finished_run_changes_nothing(tmp_path):
    task, _ = run(tmp_path)
    again, result = run(tmp_path, init_seed=9)
    assert result.epochs_run == 0 and result.resumed_from == (2, 0)
    assert identical(weights(task), weights(again))


def test_resume_false_starts_clean(tmp_path):
    with pytest.raises(Crash):
        run(tmp_path, crash_at=8)
    assert (tmp_path / "state.pt").exists()
    fresh, result = run(tmp_path, resume=False)
    assert result.resumed_from is None
    reference, _ = run(tmp_path / "ref")
    assert identical(weights(fresh), weights(reference))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "event" not in r] == list(range(1, 11))  # the old lines are gone


def test_resume_false_deletes_the_stale_state_even_if_the_new_run_dies_early(tmp_path):
    run(tmp_path, epochs=1)
    with pytest.raises(Crash):
        run(tmp_path, crash_at=1, resume=False)
    assert not (tmp_path / "state.pt").exists()


def test_rng_state_round_trip():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn(3)  # a cached gaussian in numpy's state
    state = checkpoint.rng_state()
    expected = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    checkpoint.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2:] == got[2:]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save_state(path, {"x": torch.ones(3)})

    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a checkpo")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(path, broken)
    assert torch.equal(checkpoint.load_state(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind


# --------------------------------------------------------------------------------------------- SIGKILL


# The killed run sleeps before each step so the kill surely lands mid-epoch, not after the run has ended;
# the sleep changes no numbers.
SLOW_CLI = ("import sys, time; import reprlab.engine as engine; move = engine.move_batch; "
            "engine.move_batch = lambda *a, **k: (time.sleep(0.3), move(*a, **k))[1]; "
            "from reprlab.cli import main; sys.exit(main(sys.argv[1:]))")


def pretrain_args(out_dir: Path) -> list[str]:
    return ["pretrain", "--config", str(ROOT / "configs/pretrain/simclr_digits.yaml"), "name=run",
            f"out_dir={out_dir}", "encoder.name=timm:test_resnet", "encoder.kwargs={}", "data.limit=64",
            "train.batch_size=8", "train.epochs=2", "train.device=cpu", "train.checkpoint_every_steps=3",
            "train.log_every=2", "train.progress=false", "monitor.every_epochs=0",
            "method.params.projection_dim=16"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-c", "import sys; from reprlab.cli import main; sys.exit(main(sys.argv[1:]))"]
    uninterrupted = subprocess.Popen([*cli, *pretrain_args(tmp_path / "a")], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *pretrain_args(tmp_path / "b")], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_path = tmp_path / "b" / "run" / "state.pt"
    deadline = time.monotonic() + 240
    while not state_path.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(30) == -signal.SIGKILL, "the run ended before it could be killed"
    state = checkpoint.load_state(state_path)
    assert state["epoch"] == 0 and state["step_in_epoch"] > 0, "the checkpoint seen is not a mid-epoch one"

    resumed = subprocess.run([*cli, *pretrain_args(tmp_path / "b")], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"at epoch 1, step {state['step_in_epoch']}" in resumed.stdout
    output, _ = uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0, output[-3000:]
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert (a / "encoder.safetensors").read_bytes() == (b / "encoder.safetensors").read_bytes()
    final_a, final_b = checkpoint.load_state(a / "state.pt"), checkpoint.load_state(b / "state.pt")
    assert identical(final_a["model"], final_b["model"])
    assert all(torch.equal(x, y) for x, y in zip(final_a["rng"][0].values(), final_b["rng"][0].values())
               if isinstance(x, Tensor))
