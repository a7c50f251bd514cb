"""Bad input gets a clear error (each message is checked): config keys and types, dataset paths, empty and
corrupt image folders, a checkpoint from another encoder, NaN/inf losses, k larger than the bank, and a label
fraction that empties a class."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from reprlab import checkpoint, contracts
from reprlab.checkpoint import CheckpointError
from reprlab.config import ConfigError, EvaluateConfig, PretrainConfig, load_config
from reprlab.data.datasets import DatasetError, ImageSet, load_dataset, per_class_subset
from reprlab.data.loader import Batches
from reprlab.engine import FitOptions, NonFiniteLossError, fit

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------- config


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_unknown_config_key_names_key_valid_keys_and_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  epoch: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(PretrainConfig, path)
    message = str(caught.value)
    assert "'train.epoch'" in message and "'epochs'" in message and str(path) in message


def test_wrong_config_type_names_key_type_and_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"'train\.epochs' must be int, got 'ten'") as caught:
        load_config(PretrainConfig, path)
    assert str(path) in str(caught.value)
    with pytest.raises(ConfigError, match=r"'optim\.lr' must be float, got True"):
        load_config(PretrainConfig, None, ["optim.lr=true"])


def test_cli_prints_config_errors_without_a_traceback(tmp_path, capsys):
    from reprlab.cli import main

    path = write_yaml(tmp_path, "optim:\n  learning_rate: 0.1\n")
    assert main(["pretrain", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'optim.learning_rate'" in err and "'lr'" in err


# --------------------------------------------------------------------------------------------- datasets


def test_missing_dataset_paths(tmp_path):
    with pytest.raises(DatasetError, match=r"image folder '.*nowhere' does not exist"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(DatasetError, match=r"npz dataset folder '.*nowhere' does not exist"):
        load_dataset(f"npz:{tmp_path / 'nowhere'}")
    with pytest.raises(DatasetError, match=r"unknown dataset 'cifar11'; choose from"):
        load_dataset("cifar11")


def test_empty_image_folder(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"holds no image files \(looked for \["):
        load_dataset(f"folder:{tmp_path}")


def write_png(path: Path, value: int) -> None:
    from torchvision.io import write_png

    write_png(torch.full((3, 6, 6), value, dtype=torch.uint8), str(path))


def test_corrupt_image_is_skipped_with_a_warning_and_a_count(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        write_png(tmp_path / cls / "good.png", 10 if cls == "a" else 200)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "b" / "fake.jpg").write_text("text with an image suffix")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\), first: .*broken\.png"):
        data = load_dataset(f"folder:{tmp_path}", image_size=4, val_fraction=0)
    assert len(data.train) == 2 and data.train.labels.tolist() == [0, 1]
    assert data.train.images.shape == (2, 3, 4, 4)


def test_folder_of_only_corrupt_images(tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match=r"no readable images among 1 file\(s\)"), pytest.warns(UserWarning):
        load_dataset(f"folder:{tmp_path}")


def test_label_fraction_that_leaves_a_class_empty():
    labels = torch.tensor([0] * 50 + [1] * 3)
    with pytest.raises(ValueError, match=r"label_fraction=0\.1 leaves class 1 with no labeled image \(3 available\)"):
        per_class_subset(labels, fraction=0.1)
    assert len(per_class_subset(labels, fraction=0.5)) == 25 + 2


# --------------------------------------------------------------------------------------------- checkpoints


class Task(contracts.Task):
    def __init__(self, width: int = 4, nan_at: int | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(4, width)
        self.nan_at, self.calls = nan_at, 0

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self.calls += 1
        loss = self.linear(batch["images"].flatten(1).float() / 255).pow(2).mean()
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss}


def batches() -> Batches:
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 255, (24, 1, 2, 2), dtype=torch.uint8, generator=generator),
                    torch.zeros(24, dtype=torch.long), ["a"])
    return Batches(data, 4, seed=0)  # 6 steps per epoch


def train(task: nn.Module, run_dir: Path | None, lr: float = 0.1, **kwargs):
    optimizer = torch.optim.SGD(task.parameters(), lr=lr)
    kwargs = {"epochs": 1, "progress": False, **kwargs}
    return fit(task, batches(), optimizer, None, FitOptions(device=CPU, run_dir=run_dir, **kwargs))


def test_resume_with_another_encoder_names_both(tmp_path):
    train(Task(), tmp_path, identity={"encoder": "resnet18", "method": "simclr"})
    with pytest.raises(CheckpointError) as caught:
        train(Task(), tmp_path, epochs=2, identity={"encoder": "timm:vit_tiny_patch16_224", "method": "simclr"})
    message = str(caught.value)
    assert "'resnet18'" in message and "'timm:vit_tiny_patch16_224'" in message and "state.pt" in message
    assert "train.resume=false" in message


def test_resume_state_that_does_not_fit_the_model(tmp_path):
    train(Task(width=4), tmp_path)
    with pytest.raises(CheckpointError, match=r"state\.pt does not fit this run's model .*size mismatch"):
        train(Task(width=5), tmp_path, epochs=2)


def test_load_encoder_with_weights_of_another_encoder_names_both(tmp_path):
    from reprlab.models.encoders import create_encoder

    checkpoint.save_encoder(tmp_path, create_encoder("resnet18"), {})  # 7x7 stem
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["encoder"]["kwargs"]["cifar_stem"] = True  # meta.json now asks for the 3x3 CIFAR stem
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load_encoder(tmp_path)
    message = str(caught.value)
    assert "encoder.safetensors" in message and "'resnet18' {'cifar_stem': True}" in message
    assert "size mismatch for backbone.conv1.weight" in message and "[64, 3, 7, 7]" in message
    assert "[64, 3, 3, 3]" in message


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    task = Task(nan_at=3)
    with pytest.raises(NonFiniteLossError) as caught:
        train(task, tmp_path, log_every=5, checkpoint_every_steps=2)
    message = str(caught.value)
    assert "epoch 1, step 3 (global step 3)" in message and "last good checkpoint" in message
    assert str(tmp_path / "state.pt") in message
    assert "lower optim.lr" in message and "train.resume=false" in message  # else a rerun resumes the divergence
    assert task.calls == 4  # stopped at the checkpoint after step 4: it was not written
    state = checkpoint.load_state(tmp_path / "state.pt")
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing non-finite was logged


def test_exploding_lr_stops_before_saving_non_finite_weights(tmp_path):
    task = Task()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(NaN or inf\) at epoch 1, step \d"):
        train(task, tmp_path, lr=1e30, log_every=1)
    assert not (tmp_path / "state.pt").exists()  # no good checkpoint existed, none was made


def test_nan_without_run_dir_is_still_caught():
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        train(Task(nan_at=6), None, log_every=100)


# --------------------------------------------------------------------------------------------- evaluation


def evaluate_pixels(tmp_path: Path, k: int) -> dict:
    from reprlab.stages.evaluate import evaluate

    cfg = load_config(EvaluateConfig, None, [
        f"out_dir={tmp_path}", f"name=k{k}", "encoders=[pixels]", "data.limit=50", f"knn.k={k}",
        "knn.select_on_val=false", "knn.backend=torch", "linear_probe=false", "sklearn_probe=false",
        "retrieval_ks=[]", "quality_images=0", "report=false", "cache_features=false", "device=cpu"])
    evaluate(cfg)
    return json.loads((tmp_path / f"k{k}" / "metrics.json").read_text())


def test_k_larger_than_the_bank_uses_the_whole_bank(tmp_path):
    huge = evaluate_pixels(tmp_path, k=100_000)
    bank_size = huge["num_images"]["train"]
    assert 0 < bank_size < 100_000
    whole = evaluate_pixels(tmp_path, k=bank_size)
    top1 = huge["encoders"]["pixels"]["knn_top1"]
    assert math.isfinite(top1) and top1 == whole["encoders"]["pixels"]["knn_top1"]


# --------------------------------------------------------------------------------------------- issue 18: one line
# Every user error: exit code 2, one line on stderr naming the key (or the file and array), no traceback. Before,
# each of these ended in a traceback, or passed silently (marked "silent").

ROOT = Path(__file__).resolve().parents[1]
FAST = ["encoder.name=timm:test_resnet", "encoder.kwargs={}", "data.limit=32", "train.batch_size=8", "train.epochs=1",
        "train.device=cpu", "train.progress=false", "monitor.every_epochs=0", "method.params.projection_dim=8"]


def pretrain_args(out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(ROOT / "configs/pretrain/simclr_digits.yaml"), "name=run", f"out_dir={out}",
            *FAST, *extra]


def finetune_args(out: Path, *extra: str) -> list[str]:
    return ["finetune", "name=run", f"out_dir={out}", "arch.name=timm:test_resnet", "data.limit=64",
            "train.batch_size=8", "train.epochs=1", "train.device=cpu", "train.progress=false", *extra]


def evaluate_args(out: Path, *extra: str) -> list[str]:
    return ["evaluate", "name=run", f"out_dir={out}", "arch.name=timm:test_resnet", "encoders=[random]",
            "data.limit=64", "device=cpu", "linear_probe=false", "sklearn_probe=false", "report=false",
            "quality_images=0", "knn.backend=torch", *extra]


def one_line_error(capsys, argv: list[str]) -> str:
    from reprlab.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


UP_FRONT = [  # stage, overrides, what the line names
    ("pretrain", "method.name=simclr_v9", "unknown method.name 'simclr_v9'; choose from ['simclr'"),
    ("finetune", "policy.name=nope", "unknown policy.name 'nope'; choose from ['linear_probe'"),
    ("pretrain", "optim.name=lamb", "unknown optim.name 'lamb'; choose from ['sgd'"),
    ("pretrain", "optim.schedule=linear", "unknown optim.schedule 'linear'; choose from ['constant'"),
    ("pretrain", "train.precision=fp8", "unknown train.precision 'fp8'; choose from ['auto'"),
    ("pretrain", "encoder.name=resnet_18", "encoder.name='resnet_18': not a torchvision classification model"),
    ("pretrain", "encoder.name=timm:no_such_net", "encoder.name='timm:no_such_net': timm has no model"),
    ("pretrain", "train.device=gpu", "train.device='gpu': not a device; choose from auto | cpu | cuda"),
    ("pretrain", "encoder.name=hf:/nonexistent/vit", "encoder.name='hf:/nonexistent/vit': folder '/nonexistent/vit' "
                                                     "does not exist"),
    ("pretrain", "train.batch_size=0", "train.batch_size=0: must be >= 1"),
    ("pretrain", "train.epochs=0", "train.epochs=0: must be >= 1"),
    ("pretrain", "data.image_size=-32", "data.image_size=-32: must be >= 8"),
    ("pretrain", "data.image_size=0", "data.image_size=0: must be >= 8"),  # silent: 64 used, config.yaml said 0
    ("pretrain", "train.batch_size=1", "train.batch_size=1: method 'simclr' needs at least 2"),  # silent: loss 0
    ("finetune", "labels_per_class=0", "labels_per_class=0: must be >= 1"),  # named label_fraction before
    ("evaluate", "encoders=[]", "encoders=[]: nothing to evaluate"),
    ("pretrain", "train.loggers=[tensorbaord]", "unknown logger 'tensorbaord' in train.loggers"),
    ("finetune", "policy.name=llrd policy.params.decay=2", "policy.params={'decay': 2}: decay must be in (0, 1]"),
]


@pytest.mark.parametrize("stage, override, message", UP_FRONT, ids=[u[1] for u in UP_FRONT])
def test_settings_checked_before_any_data_loads(tmp_path, capsys, stage, override, message):
    args = {"pretrain": pretrain_args, "finetune": finetune_args, "evaluate": evaluate_args}[stage]
    assert message in one_line_error(capsys, args(tmp_path, *override.split()))
    assert not (tmp_path / "run").exists()  # nothing was claimed, loaded or written


def test_the_python_api_gets_the_same_checks(tmp_path):
    from reprlab.stages.pretrain import pretrain

    with pytest.raises(ConfigError, match=r"^train\.epochs=0: must be >= 1"):
        pretrain(load_config(PretrainConfig, None, [f"out_dir={tmp_path}", *FAST, "train.epochs=0"]))


def write_npz(directory: Path, images_shape: tuple[int, ...], labels, classes: int | None = None) -> str:
    import numpy as np

    directory.mkdir()
    arrays = {"images": np.random.default_rng(0).integers(0, 255, images_shape, dtype=np.uint8),
              "labels": np.asarray(labels)}
    if classes is not None:
        arrays["classes"] = np.array([str(c) for c in range(classes)])
    np.savez(directory / "train.npz", **arrays)
    return f"data.name=npz:{directory}"


def test_a_batch_larger_than_the_dataset(tmp_path, capsys):
    line = one_line_error(capsys, pretrain_args(tmp_path, "train.batch_size=100000"))
    assert "train.batch_size=100000: more than the" in line and "use train.batch_size <=" in line


def test_npz_images_in_nchw(tmp_path, capsys):
    data = write_npz(tmp_path / "nchw", (40, 3, 16, 16), [0, 1] * 20)
    line = one_line_error(capsys, pretrain_args(tmp_path, data))
    assert "train.npz: 'images' has shape (40, 3, 16, 16), channels first" in line and "transpose(0, 2, 3, 1)" in line


@pytest.mark.parametrize("stage", ["finetune", "evaluate"])
def test_labels_out_of_range(tmp_path, capsys, stage):
    """Before: "Target 12 is out of bounds" mid fine-tuning; evaluation crashed after writing metrics.json."""
    data = write_npz(tmp_path / "labels", (40, 8, 8, 3), [i % 13 for i in range(40)], classes=10)
    args = finetune_args(tmp_path, data) if stage == "finetune" else evaluate_args(tmp_path, data)
    line = one_line_error(capsys, args)
    assert "train.npz: label 12 is out of range for its 10 classes" in line


@pytest.mark.parametrize("stage", ["finetune", "evaluate"])
def test_a_single_class_dataset(tmp_path, capsys, stage):
    """Silent before: fine-tuning loss 0, evaluation 100%."""
    data = write_npz(tmp_path / "one", (40, 8, 8, 3), [0] * 40)
    args = finetune_args(tmp_path, data) if stage == "finetune" else evaluate_args(tmp_path, data)
    line = one_line_error(capsys, args)
    assert "data.name='npz:" in line and "hold 1 class" in line and "needs at least 2" in line


def test_labels_per_class_above_a_class_size(tmp_path, capsys):
    """Silent before: fewer labels were taken."""
    line = one_line_error(capsys, finetune_args(tmp_path, "labels_per_class=1000"))
    assert "labels_per_class=1000: class" in line and "use labels_per_class <=" in line


def test_finetune_batch_of_one_with_batchnorm(tmp_path, capsys):
    line = one_line_error(capsys, finetune_args(tmp_path, "train.batch_size=1", "policy.name=full"))
    assert "train.batch_size=1: BatchNorm layers that train" in line


def test_simclr_batch_of_one_through_the_python_api(tiny_encoder):
    from reprlab.ssl.simclr import SimCLR

    method = SimCLR(tiny_encoder, projection_dim=4)
    with pytest.raises(ConfigError, match="train.batch_size: SimCLR got a batch of 1 image"):
        method.forward_views([torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)])


def test_under_torchrun_only_rank_0_prints_and_every_rank_exits_2(tmp_path, capsys, monkeypatch):
    """Before: 76 lines from both ranks before the one that matters."""
    from reprlab import cli

    monkeypatch.setattr(cli, "RANK_EXIT_DELAY_S", 0.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert cli.main(pretrain_args(tmp_path, "train.batch_size=9")) == 2
        err = capsys.readouterr().err
        if rank == 0:
            assert err.count("\n") == 1 and "train.batch_size=9: must be divisible by the 2 processes" in err
        else:
            assert err == ""


@pytest.mark.slow
def test_under_torchrun_the_job_prints_the_error_once(tmp_path):
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "scripts" / "pretrain.py"), *pretrain_args(tmp_path, "train.batch_size=9")[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "train.batch_size=9" in ours[0]
    assert "Traceback" not in done.stderr.split(ours[0])[0]  # torchrun's own report follows it


def test_exponents_inside_free_form_params_and_lists_are_floats():
    """YAML 1.1 reads 2e-1 as text: before, method.params.temperature became '2e-1' (a TypeError after loading)."""
    cfg = load_config(PretrainConfig, None, ["method.params.temperature=2e-1", "encoder.kwargs={drop_rate: 1e-1}"])
    assert cfg.method.params == {"temperature": 0.2} and cfg.encoder.kwargs == {"drop_rate": 0.1}
    from reprlab.config import FinetuneConfig

    assert load_config(FinetuneConfig, None, ["policy.params.decay=5e-1"]).policy.params == {"decay": 0.5}
    cfg = load_config(EvaluateConfig, None, ["probe_lrs=[1e-3, 1E+2]", "knn.temperatures=[7e-2]"])
    assert list(cfg.probe_lrs) == [1e-3, 100.0] and list(cfg.knn.temperatures) == [0.07]
