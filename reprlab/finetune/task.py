"""The fine-tuning task: a classifier trained under a freezing policy, with the supervised recipe toolbox."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor

from reprlab.contracts import Task
from reprlab.data.mixing import cutmix, mixup
from reprlab.data.views import FinetuneAugment
from reprlab.finetune.classifier import Classifier
from reprlab.finetune.policies import Policy


class ClassificationTask(Task):
    """Augment on the device, classify, cross-entropy (soft targets under mixup/cutmix, optional label
    smoothing) plus an optional L1 penalty on trainable weight matrices and kernels (not biases or norms)."""

    sync_batchnorm = False  # per-rank BatchNorm statistics under DDP (frozen layers keep theirs in eval mode)

    def __init__(self, classifier: Classifier, policy: Policy, num_classes: int,
                 augment: FinetuneAugment | None, label_smoothing: float = 0.0, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, l1_penalty: float = 0.0) -> None:
        super().__init__()
        self.classifier, self.policy, self.num_classes = classifier, policy, num_classes
        self.augment, self.label_smoothing, self.l1_penalty = augment, label_smoothing, l1_penalty
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha

    def train(self, mode: bool = True) -> ClassificationTask:
        super().train(mode)
        if mode:  # frozen means frozen: BatchNorm statistics (and dropout) of frozen layers stay fixed
            for module in self.policy.frozen_modules():
                module.eval()
        return self

    def mix(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """mixup or cutmix (an even coin when both are on) -> (images, soft targets (B, K) summing to one);
        without either: (images, labels)."""
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            return images, labels
        # python's RNG (seeded per run): a torch draw + .item() would sync the device every step
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or random.random() < 0.5)
        if use_cutmix:
            return cutmix(images, labels, self.cutmix_alpha, num_classes=self.num_classes)
        return mixup(images, labels, self.mixup_alpha, num_classes=self.num_classes)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, labels = batch["images"], batch["labels"]
        images = self.augment(images) if self.augment is not None else images.float() / 255  # (B, C, H, W)
        images, targets = self.mix(images, labels)
        logits = self.classifier(images)  # (B, K)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if self.l1_penalty > 0:
            weights = [p for p in self.classifier.parameters() if p.requires_grad and p.ndim > 1]
            loss = loss + self.l1_penalty * torch.stack([w.abs().sum() for w in weights]).sum()
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "train_acc": acc}
