"""Fine-tuning entry point: an encoder (pretrained run or random) + a head, trained under a freezing policy.

Model selection uses the validation split; the test split is read once, at the end, with the selected weights.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab import distributed
from reprlab.checkpoint import load_encoder, write_json
from reprlab.config import FinetuneConfig, save_config, to_dict
from reprlab.data.augment import FinetuneAugment, cutmix, mixup
from reprlab.data.datasets import ImageSet, load_dataset, per_class_subset
from reprlab.data.loader import Batches
from reprlab.engine import fit
from reprlab.finetune.classifier import Classifier, save_classifier
from reprlab.finetune.policies import Policy, build_policy
from reprlab.models.encoders import create_encoder
from reprlab.ssl.pretrain import build_optimization, seed_everything


class ClassificationTask(nn.Module):
    """Augment on the device, classify, cross-entropy (soft targets under mixup/cutmix)."""

    def __init__(self, classifier: Classifier, policy: Policy, num_classes: int, augment: FinetuneAugment | None,
                 label_smoothing: float = 0.0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 l1_penalty: float = 0.0) -> None:
        super().__init__()
        self.classifier, self.policy, self.num_classes = classifier, policy, num_classes
        self.augment, self.label_smoothing, self.l1_penalty = augment, label_smoothing, l1_penalty
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha

    def train(self, mode: bool = True) -> ClassificationTask:
        super().train(mode)
        if mode:  # frozen means frozen: BatchNorm statistics of frozen layers stay fixed
            for module in self.policy.frozen_modules():
                module.eval()
        return self

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, labels = batch["images"], batch["labels"]
        images = self.augment(images) if self.augment is not None else images.float() / 255
        targets: Tensor = labels
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or torch.rand(()).item() < 0.5)
            if use_cutmix:
                images, targets = cutmix(images, labels, self.cutmix_alpha, num_classes=self.num_classes)
            else:
                images, targets = mixup(images, labels, self.mixup_alpha, num_classes=self.num_classes)
        logits = self.classifier(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if self.l1_penalty > 0:
            loss = loss + self.l1_penalty * sum(p.abs().sum() for p in self.classifier.parameters() if p.requires_grad)
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "train_acc": acc}


@torch.inference_mode()
def accuracy(classifier: nn.Module, data: ImageSet, device: torch.device, batch_size: int = 512) -> float:
    classifier.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(device).float() / 255
        correct += (classifier(images).argmax(1).cpu() == data.labels[start : start + batch_size]).sum().item()
    return correct / max(len(data), 1)


class Validation:
    """Validation top-1 after every epoch; keeps the best weights and stops after ``patience`` epochs without
    improvement (``None``: never stops early). ``restore_best()`` loads the best epoch's weights."""

    def __init__(self, classifier: nn.Module, val: ImageSet, device: torch.device, patience: int | None) -> None:
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
        return {"best": self.best, "best_epoch": self.best_epoch, "best_state": self.best_state, "stop": self.stop}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_state, self.stop = state["best_state"], state["stop"]


def build_encoder(cfg: FinetuneConfig) -> nn.Module:
    if cfg.encoder == "random":
        return create_encoder(cfg.arch.name, pretrained=cfg.arch.pretrained, weights=cfg.arch.weights,
                              **cfg.arch.kwargs)
    return load_encoder(cfg.encoder)


def finetune_one(cfg: FinetuneConfig, seed: int, run_dir: Path) -> dict[str, Any]:
    """One seeded fine-tuning run into ``run_dir``; returns its metrics."""
    device = distributed.setup(cfg.train.device)
    seed_everything(seed + distributed.rank())
    data = load_dataset(cfg.data.name, root=cfg.data.root, download=cfg.data.download,
                        val_fraction=cfg.data.val_fraction, image_size=cfg.data.image_size, limit=cfg.data.limit,
                        seed=seed)
    if not data.labeled or data.val is None:
        raise ValueError(f"fine-tuning needs a labeled dataset with a validation split; {cfg.data.name!r} has "
                         f"{'no labels' if not data.labeled else 'no validation split (set data.val_fraction > 0)'}")
    train = data.train
    if cfg.label_fraction is not None or cfg.labels_per_class is not None:
        train = train.subset(per_class_subset(train.labels, cfg.labels_per_class, cfg.label_fraction, seed=seed))
    num_classes = data.train.num_classes or int(data.train.labels.max()) + 1
    classifier = Classifier(build_encoder(cfg), num_classes, dropout=cfg.head.dropout, init=cfg.head.init)
    policy = build_policy(cfg.policy.name, cfg.policy.params)
    groups = policy.attach(classifier, cfg.optim.weight_decay, cfg.optim.exclude_bn_bias)
    aug = cfg.augment
    augment = FinetuneAugment(size=None, crop_scale=aug.crop_scale, flip_p=aug.flip_p,
                              rotation_degrees=aug.rotation_degrees, jitter_strength=aug.jitter_strength,
                              cutout_p=aug.cutout_p)
    task = ClassificationTask(classifier, policy, num_classes, augment, cfg.label_smoothing, aug.mixup_alpha,
                              aug.cutmix_alpha, cfg.l1_penalty)
    world = distributed.world_size()
    batch_size = min(cfg.train.batch_size // world, len(train) // world)
    batches = Batches(train, batch_size, shuffle=True, drop_last=True, seed=seed,
                      rank=distributed.rank(), world_size=world)
    optimizer, scheduler = build_optimization(cfg.optim, task, batch_size * world, len(batches), cfg.train.epochs,
                                              groups=groups)
    validation = Validation(classifier, data.val, device, cfg.early_stopping_patience)
    callbacks = [policy, validation]
    identity = {"encoder": cfg.encoder, "arch": cfg.arch.name, "policy": cfg.policy.name}
    fit(task, batches, optimizer, scheduler, epochs=cfg.train.epochs, device=device, run_dir=run_dir,
        precision=cfg.train.precision, grad_clip=cfg.train.grad_clip, log_every=cfg.train.log_every,
        checkpoint_every_steps=cfg.train.checkpoint_every_steps, resume=cfg.train.resume, callbacks=callbacks,
        identity=identity, progress=cfg.train.progress, desc="finetune")
    validation.restore_best()
    metrics: dict[str, Any] = {"seed": seed, "val_top1": validation.best, "best_epoch": validation.best_epoch + 1,
                               "train_images": len(train)}
    if data.test is not None:  # read once, with the weights selected on validation
        metrics["test_top1"] = accuracy(classifier, data.test, device)
    if distributed.is_main():
        save_classifier(run_dir, classifier, data.train.classes,
                        {"policy": cfg.policy.name, "dataset": cfg.data.name, "config": to_dict(cfg),
                         "metrics": metrics, "source_encoder": cfg.encoder})
        write_json(run_dir / "metrics.json", metrics)
    return metrics


def summarize(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune once per seed in ``cfg.seeds``; with several seeds, ``metrics.json`` reports mean and std."""
    run_dir = Path(cfg.out_dir) / cfg.name
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    seeds = list(cfg.seeds)
    if len(seeds) == 1:
        finetune_one(cfg, seeds[0], run_dir)
        return run_dir
    runs = [finetune_one(copy.deepcopy(cfg), seed, run_dir / f"seed{seed}") for seed in seeds]
    summary: dict[str, Any] = {"seeds": seeds, "runs": runs}
    for key in ("val_top1", "test_top1"):
        if all(key in r for r in runs):
            summary[key] = summarize([r[key] for r in runs])
    if distributed.is_main():
        write_json(run_dir / "metrics.json", summary)
        print(" ".join(f"{k}={v['mean']:.4f}±{v['std']:.4f}" for k, v in summary.items() if isinstance(v, dict)))
    return run_dir
