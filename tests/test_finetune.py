"""Fine-tuning end to end: every policy, the recipe toolbox, small-label protocols, outputs, selection."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reprlab
from reprlab.config import FinetuneConfig, load_config
from reprlab.contracts import Callback, Task
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches
from reprlab.engine import FitOptions, fit
from reprlab.finetune.classifier import Classifier
from reprlab.finetune.policies import POLICIES, build_policy
from reprlab.finetune.task import ClassificationTask
from reprlab.models.encoders import create_encoder
from reprlab.stages import finetune as train_module
from reprlab.stages.finetune import Validation, finetune, load_splits

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "finetune"
TINY = [
    "arch.name=timm:resnet18",
    "arch.kwargs={layers: [1, 1, 1, 1], channels: [8, 16, 32, 64]}",
    "data.limit=120",
    "train.batch_size=16",
    "train.epochs=2",
    "train.progress=false",
    "train.log_every=2",
]


def _config(tmp_path: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [f"out_dir={tmp_path}", *TINY, *overrides])


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_runs_and_saves_a_reloadable_classifier(tmp_path, policy):
    run_dir = finetune(_config(tmp_path, f"name={policy}", f"policy.name={policy}"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["epochs_run"] == 2 and 0.0 <= metrics["test_top1"] <= 1.0 and 1 <= metrics["best_epoch"] <= 2
    )
    records = _read_jsonl(run_dir / "metrics.jsonl")  # curves: step lines and one epoch_end line per epoch
    epochs = [r for r in records if r.get("event") == "epoch_end"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(
        "val_top1" in r and "trainable_groups" in r for r in epochs
    )
    assert any("lr" in r and "train_acc" in r for r in records if r.get("event") is None)
    if policy in ("gradual", "lp_ft"):  # the first epoch probes, the second trains encoder groups
        assert epochs[0]["trainable_groups"] == 0 and epochs[1]["trainable_groups"] >= 1

    loaded = reprlab.load_classifier(run_dir)
    assert loaded.classes == [str(i) for i in range(10)]
    images = torch.rand(4, 1, 8, 8)
    probabilities = loaded.predict_proba(images)
    assert probabilities.shape == (4, 10) and torch.allclose(probabilities.sum(1), torch.ones(4))
    assert loaded.predict(images) == [loaded.classes[i] for i in probabilities.argmax(1)]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["policy"] == policy and meta["metrics"]["test_top1"] == metrics["test_top1"]
    # the reloaded model is the model that was scored: its test accuracy matches metrics.json
    _, _, test = load_splits(_config(tmp_path), seed=0)
    assert train_module.accuracy(loaded.model, test, torch.device("cpu")) == metrics["test_top1"]


@pytest.mark.parametrize(
    ("optimizer", "schedule"),
    [
        ("sgd", "step"),
        ("adagrad", "exponential"),
        ("rmsprop", "constant"),
        ("adam", "onecycle"),
        ("adamw", "cosine"),
        ("lars", "cosine"),
    ],
)
def test_recipe_toolbox(tmp_path, optimizer, schedule):
    extra = ["optim.nesterov=true", "optim.step_epochs=1"] if optimizer == "sgd" else []
    run_dir = finetune(
        _config(
            tmp_path,
            "policy.name=full",
            "train.epochs=1",
            f"optim.name={optimizer}",
            f"optim.schedule={schedule}",
            "optim.warmup_epochs=0.5",
            "optim.lr=0.01",
            "optim.weight_decay=0.01",
            "l1_penalty=0.00001",
            "label_smoothing=0.1",
            "head.dropout=0.2",
            "head.init=he",
            "augment.rotation_degrees=10",
            "augment.jitter_strength=0.5",
            "augment.cutout_p=0.5",
            "augment.mixup_alpha=0.2",
            "augment.cutmix_alpha=1.0",
            *extra,
        )
    )
    records = _read_jsonl(run_dir / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_every_finetune_config_loads():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert any(p.name == "linear_probe_digits.yaml" for p in paths)
    for path in paths:
        cfg = load_config(FinetuneConfig, path)
        build_policy(cfg.policy.name, cfg.policy.params)


def test_label_subsets_are_stratified_and_seeded(tmp_path):
    k_shot, _, _ = load_splits(_config(tmp_path, "labels_per_class=3"), seed=0)
    assert torch.bincount(k_shot.labels).tolist() == [3] * 10
    full, _, _ = load_splits(_config(tmp_path), seed=0)
    tenth, _, _ = load_splits(_config(tmp_path, "label_fraction=0.1"), seed=0)
    expected = [round(n * 0.1) for n in torch.bincount(full.labels).tolist()]
    assert torch.bincount(tenth.labels, minlength=10).tolist() == expected
    again, _, _ = load_splits(_config(tmp_path, "labels_per_class=3"), seed=0)
    other, _, _ = load_splits(_config(tmp_path, "labels_per_class=3"), seed=1)
    assert torch.equal(again.images, k_shot.images) and not torch.equal(other.images, k_shot.images)


def test_seeds_report_mean_and_std_and_read_test_once(tmp_path, monkeypatch):
    test_reads = []
    accuracy = train_module.accuracy

    def counting_accuracy(classifier, data, device, batch_size=512):
        test_reads.append(len(data))
        return accuracy(classifier, data, device, batch_size)

    monkeypatch.setattr(train_module, "accuracy", counting_accuracy)
    run_dir = finetune(
        _config(tmp_path, "name=seeds", "seeds=[0, 1]", "train.epochs=2", "labels_per_class=4")
    )
    summary = json.loads((run_dir / "metrics.json").read_text())
    runs = [json.loads((run_dir / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in summary["runs"]] == [0, 1] and all(r["train_images"] == 40 for r in runs)
    values = [r["test_top1"] for r in runs]
    assert summary["test_top1"]["mean"] == pytest.approx(statistics.fmean(values))
    assert summary["test_top1"]["std"] == pytest.approx(statistics.stdev(values))
    _, val, test = load_splits(_config(tmp_path), seed=0)
    # per seed: one validation read per epoch, then exactly one test read at the end
    assert test_reads == [len(val), len(val), len(test)] * 2
    with pytest.raises(reprlab.checkpoint.CheckpointError, match="multi-seed run"):
        reprlab.load_classifier(run_dir)


def test_early_stopping_restores_the_best_epoch():
    """Each epoch moves a linear classifier's weight to a scripted value (SGD, lr 0.5, squared error): the
    validation accuracy goes 0.5, 1.0, 0, 0, 0, ...; patience 2 stops after epoch 4 and restores epoch 2."""
    targets = [0.0, 1.0, -1.0, -1.0, -1.0, -1.0]
    classifier = nn.Linear(1, 2, bias=False)
    val = ImageSet(
        torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1), torch.tensor([0, 1]), ["0", "1"]
    )

    class Scripted(Task):
        def __init__(self) -> None:
            super().__init__()
            self.classifier, self.epoch = classifier, 0

        def forward(self, batch: dict) -> dict:
            target = torch.tensor([[-targets[self.epoch]], [targets[self.epoch]]])  # class 1 iff pixel bright
            return {"loss": ((self.classifier.weight - target) ** 2).sum()}

    class Epochs(Callback):
        def on_epoch_start(self, epoch: int) -> None:
            task.epoch = epoch

    class Centered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = classifier

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.linear(images.flatten(1) - 0.5)

    task = Scripted()
    validation = Validation(Centered(), val, torch.device("cpu"), patience=2)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.5)
    result = fit(task, Batches(val, 2), optimizer, None,
                 FitOptions(epochs=len(targets), device=torch.device("cpu"), progress=False),
                 callbacks=[Epochs(), validation])
    assert [r["val_top1"] for r in result.history] == [0.5, 1.0, 0.0, 0.0]
    assert result.epochs_run == 4 and validation.best_epoch == 1
    validation.restore_best()
    assert torch.equal(classifier.weight, torch.tensor([[-1.0], [1.0]]))


def _task(mixup_alpha: float, cutmix_alpha: float) -> ClassificationTask:
    encoder = create_encoder("timm:resnet18", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
    classifier = Classifier(encoder, 5)
    policy = build_policy("linear_probe")
    policy.attach(classifier, weight_decay=0.0)
    return ClassificationTask(
        classifier, policy, 5, augment=None, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha
    )


@pytest.mark.parametrize(("mixup_alpha", "cutmix_alpha"), [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_and_cutmix_targets_sum_to_one(mixup_alpha, cutmix_alpha):
    torch.manual_seed(0)
    task = _task(mixup_alpha, cutmix_alpha)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    for _ in range(5):
        images, targets = task.mix(torch.rand(8, 3, 8, 8), labels)
        assert images.shape == (8, 3, 8, 8) and targets.shape == (8, 5)
        assert torch.allclose(targets.sum(1), torch.ones(8)) and (targets >= 0).all()
        assert ((targets > 0).sum(1) <= 2).all() and (targets[torch.arange(8), labels] > 0).all()
    loss = task({"images": torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), "labels": labels})["loss"]
    assert torch.isfinite(loss)


def test_l1_penalty_adds_the_weights_absolute_sum():
    torch.manual_seed(0)
    task = _task(0.0, 0.0)
    images, labels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
    plain = task({"images": images, "labels": labels})["loss"]
    task.l1_penalty = 0.01
    penalized = task({"images": images, "labels": labels})["loss"]
    head = task.classifier.head[0]
    logits = task.classifier(images.float() / 255)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    # linear probe: only the head trains, and only its weight matrix (not its bias) is penalized
    assert (penalized - plain).item() == pytest.approx(0.01 * head.weight.abs().sum().item(), rel=1e-5)
