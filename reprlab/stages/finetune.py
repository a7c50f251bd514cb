"""Fine-tuning stage: an encoder (pretrained run or random) + a head, trained under a freezing policy.

Small-label protocols: ``label_fraction`` (e.g. 0.01) or ``labels_per_class`` (k-shot) keep a stratified,
seeded subset of the training labels; ``seeds: [0, 1, 2]`` repeats the run (its own subset, validation split
and initialization per seed) and reports mean and std. Model selection uses the validation split (the best
epoch's weights are kept; ``early_stopping_patience`` ends the run early); the test split is read once, at the
end, with the selected weights.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reprlab import distributed, rundir
from reprlab.checkpoint import load_encoder, write_json
from reprlab.checks import check_finetune
from reprlab.config import FinetuneConfig, to_dict
from reprlab.contracts import Callback
from reprlab.data.datasets import Split, per_class_subset
from reprlab.data.stream import ordered_batches
from reprlab.engine import fit
from reprlab.finetune.classifier import Classifier, save_classifier
from reprlab.finetune.policies import build_policy
from reprlab.finetune.task import ClassificationTask
from reprlab.hardware import processor
from reprlab.optim import build_optimization
from reprlab.stages.common import (
    build_batches,
    build_dataset,
    build_encoder,
    check_batchnorm_batch,
    check_classes,
    check_labels_per_class,
    fit_options,
    seed_everything,
)

NO_TEST_SPLIT = ("none: the dataset has no test split and data.test_fraction is 0; set data.test_fraction=0.1 "
                 "to hold one out of train (stratified, seeded)")


@torch.inference_mode()
def accuracy(classifier: nn.Module, data: Split, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 of ``classifier`` (put in eval mode) on a labeled split (decoded or streamed), no augmentation."""
    classifier.eval()
    correct = seen = 0
    for batch in ordered_batches(data, batch_size):
        images = batch["images"].to(device).float() / 255  # (B, C, H, W)
        predicted = classifier(images).argmax(1).cpu()
        correct += (predicted == batch["labels"].cpu()).sum().item()
        seen += len(predicted)
    return correct / max(seen, 1)


class Validation(Callback):
    """Validation top-1 after every epoch; keeps the best weights and stops after ``patience`` epochs without
    improvement (``None``: never stops early). ``restore_best()`` loads the best epoch's weights."""

    def __init__(self, classifier: nn.Module, val: Split, device: torch.device,
                 patience: int | None) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1 (epochs) or null, got {patience}")
        self.classifier, self.val, self.device, self.patience = classifier, val, device, patience
        self.best, self.best_epoch, self.best_state, self.stop = -1.0, -1, None, False

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        top1 = accuracy(self.classifier, self.val, self.device)
        if top1 > self.best:
            self.best, self.best_epoch = top1, epoch
            self.best_state = {k: v.detach().clone() for k, v in self.classifier.state_dict().items()}
        elif self.patience is not None and epoch - self.best_epoch >= self.patience:
            self.stop = True
        return {"val_top1": top1, "best_val_top1": self.best}

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.classifier.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "stop": self.stop}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_state, self.stop = state["best_state"], state["stop"]


def source_encoder(cfg: FinetuneConfig) -> nn.Module:
    """The pretrained encoder of run ``cfg.encoder``, or an untrained ``cfg.arch`` when it is "random"."""
    return build_encoder(cfg.arch) if cfg.encoder == "random" else load_encoder(cfg.encoder)


def load_splits(cfg: FinetuneConfig, seed: int) -> tuple[Split, Split, Split | None]:
    """(labeled train subset, validation, test) for one seed: the small-label subset is stratified, seeded."""
    data = build_dataset(cfg.data, seed, progress=cfg.train.progress)
    if not data.labeled or data.val is None:
        missing = "no labels" if not data.labeled else "no validation split (set data.val_fraction > 0)"
        raise ValueError(f"fine-tuning needs a labeled dataset with a validation split; "
                         f"{cfg.data.name!r} has {missing}")
    check_classes(data.train.labels, cfg.data.name, "fine-tuning")
    train = data.train
    check_labels_per_class(train.labels, cfg.labels_per_class)
    if cfg.label_fraction is not None or cfg.labels_per_class is not None:
        keep = per_class_subset(train.labels, cfg.labels_per_class, cfg.label_fraction, seed=seed)
        train = train.subset(keep)
    return train, data.val, data.test


def finetune_one(cfg: FinetuneConfig, seed: int, run_dir: Path, run: rundir.RunDirectory) -> dict[str, Any]:
    """One seeded fine-tuning run into ``run_dir`` (model, meta.json, metrics.json, metrics.jsonl) of ``run``."""
    device = distributed.setup(cfg.train.device)
    seed_everything(seed + distributed.rank())
    if distributed.is_main():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    train, val, test = load_splits(cfg, seed)
    num_classes = train.num_classes or int(train.labels.max()) + 1
    classifier = Classifier(source_encoder(cfg), num_classes, dropout=cfg.head.dropout, init=cfg.head.init)
    policy = build_policy(cfg.policy.name, cfg.policy.params)
    groups = policy.attach(classifier, cfg.optim.weight_decay, cfg.optim.exclude_bn_bias)
    aug = cfg.augment  # the per-image pipeline (augment.size is null: check_finetune); mixup / cutmix in the task
    task = ClassificationTask(classifier, policy, num_classes, aug, cfg.label_smoothing, aug.mixup_alpha,
                              aug.cutmix_alpha, cfg.l1_penalty)
    world = distributed.world_size()
    batch_size = min(cfg.train.batch_size // world, len(train) // world)
    check_batchnorm_batch(classifier, groups, batch_size, cfg.train.batch_size, world)
    batches = build_batches(train, batch_size, shuffle=True, drop_last=True, seed=seed,
                            rank=distributed.rank(), world_size=world)  # streamed or in memory
    optimizer, scheduler = build_optimization(cfg.optim, task, batch_size * world, len(batches),
                                              cfg.train.epochs, groups=groups)
    policy.bind(optimizer, scheduler)
    validation = Validation(classifier, val, device, cfg.early_stopping_patience)
    identity = {"encoder": cfg.encoder, "arch": cfg.arch.name, "policy": cfg.policy.name}
    options = fit_options(cfg.train, device, run_dir, identity, "finetune", to_dict(cfg))
    run.write_config(cfg)  # everything was built from it: it describes this run's weights
    result = fit(task, batches, optimizer, scheduler, options, callbacks=[policy, validation])
    validation.restore_best()
    policy.finalize()  # LoRA merges its adapters: the saved classifier is a plain model
    metrics: dict[str, Any] = {
        "seed": seed, "val_top1": validation.best, "best_epoch": validation.best_epoch + 1,
        "epochs_run": (result.resumed_from[0] if result.resumed_from else 0) + result.epochs_run,
        "train_images": len(train),
    }
    if test is not None:  # read once, with the weights selected on validation
        metrics["test_top1"] = accuracy(classifier, test, device)
    else:  # said in metrics.json and on the console, not left for the reader to notice
        metrics["test_split"] = NO_TEST_SPLIT
        if distributed.is_main():
            print(f"{cfg.data.name}: test_top1 not reported: {NO_TEST_SPLIT}", flush=True)
    if distributed.is_main():
        save_classifier(run_dir, classifier, train.classes,
                        {"policy": cfg.policy.name, "dataset": cfg.data.name, "config": to_dict(cfg),
                         "metrics": metrics, "source_encoder": cfg.encoder, "numerics": result.numerics,
                         "processor": processor()})
        write_json(run_dir / "metrics.json", metrics)
    return metrics


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune once per seed in ``cfg.seeds``. One seed writes the run into ``out_dir/name``; several write
    ``out_dir/name/seed<k>/`` each and a ``metrics.json`` with every run and the mean and std."""
    check_finetune(cfg)  # before any data or model: a bad setting fails in one line
    seeds = list(cfg.seeds)
    with rundir.claim(Path(cfg.out_dir) / cfg.name) as run:
        if cfg.train.resume:
            run.check_resume(cfg)
        if len(seeds) == 1:
            finetune_one(cfg, seeds[0], run.path, run)
            return run.path
        runs = [finetune_one(copy.deepcopy(cfg), seed, run.path / f"seed{seed}", run) for seed in seeds]
        summary: dict[str, Any] = {"seeds": seeds, "runs": runs}
        for key in ("val_top1", "test_top1"):
            if all(key in r for r in runs):
                summary[key] = summarize([r[key] for r in runs])
        if "test_split" in runs[0]:
            summary["test_split"] = runs[0]["test_split"]
        if distributed.is_main():
            write_json(run.path / "metrics.json", summary)
            shown = {k: v for k, v in summary.items() if isinstance(v, dict)}
            print(" ".join(f"{k}={v['mean']:.4f}±{v['std']:.4f}" for k, v in shown.items()))
    return run.path
