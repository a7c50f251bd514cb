"""Linear probes on cached (frozen) features, hyperparameters chosen on a validation split.

Two implementations with the same result type:
- ``train_linear_probe``: torch, every (lr, weight decay) configuration trained at once as one batched
  (D, G, C) weight tensor on the same minibatches (one GEMM per step for all of them);
- ``sklearn_linear_probe``: scikit-learn ``LogisticRegression`` (lbfgs) as a cross-check.
Select on val with ``ProbeResult.val_top1``, then read the test split once with ``ProbeResult.evaluate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.data.progress import bar as progress_bar
from reprlab.evaluate.knn import as_tensor

_STD_EPS = 1e-6


class LinearProbe(nn.Module):
    """Standardise with the train mean/std, then one linear layer; ``classes[c]`` is the label of logit c."""

    def __init__(self, mean: Tensor, std: Tensor, weight: Tensor, bias: Tensor, classes: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)  # (D,)
        self.register_buffer("std", std)  # (D,)
        self.register_buffer("classes", classes)  # (C,)
        self.linear = nn.Linear(weight.shape[0], weight.shape[1])
        with torch.no_grad():
            self.linear.weight.copy_(weight.T)  # stored (D, C) during training, nn.Linear wants (C, D)
            self.linear.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        """(N, D) features -> (N, C) logits."""
        return self.linear((x - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, x: Tensor | np.ndarray) -> Tensor:
        """(N,) predicted labels in the original label values."""
        x = as_tensor(x, torch.float32).to(self.mean.device)
        return self.classes[self(x).argmax(dim=1)]


@dataclass
class ProbeResult:
    """Best probe of a sweep: ``model`` (``LinearProbe`` or a scikit-learn pipeline), its hyperparameters,
    its val top-1 and the whole grid (one dict per configuration)."""

    model: Any
    hyperparameters: dict[str, float]
    val_top1: float
    grid: list[dict[str, float]] = field(default_factory=list)

    def predict(self, x: Tensor | np.ndarray) -> Tensor:
        """(N,) predicted labels in the original label values, on the CPU; an on-disk
        :class:`~reprlab.evaluate.cache.FeatureArray` is read chunk by chunk."""
        from reprlab.evaluate.cache import FeatureArray

        if isinstance(x, FeatureArray):
            return torch.cat([self.predict(rows) for _, _, rows in x.chunks()])
        if isinstance(self.model, nn.Module):
            return self.model.predict(x).cpu()
        features = as_tensor(x, torch.float32).cpu().numpy()
        return torch.as_tensor(np.asarray(self.model.predict(features)))

    def __call__(self, x: Tensor | np.ndarray) -> Tensor:
        return self.predict(x)

    def evaluate(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
        """Top-1 accuracy on (x, y): call it once on the test split, after selection on val."""
        labels = as_tensor(y).long().cpu()
        if labels.numel() == 0:
            raise ValueError("no samples: accuracy is undefined")
        return float((self.predict(x).long() == labels).float().mean())


def _check_split(x: Tensor, y: Tensor, name: str) -> None:
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name} must be features (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def _label_indices(classes: Tensor, labels: Tensor) -> Tensor:
    """Index of each label in ``classes``; labels unseen in training map to -1 (always wrong)."""
    position = torch.searchsorted(classes, labels).clamp(max=classes.numel() - 1)
    return torch.where(classes[position] == labels, position, torch.full_like(position, -1))


def train_linear_probe(
    train_x: Tensor | np.ndarray,
    train_y: Tensor | np.ndarray,
    val_x: Tensor | np.ndarray,
    val_y: Tensor | np.ndarray,
    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1),
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2),
    epochs: int = 100,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    seed: int = 0,
    chunk_rows: int | None = None,
    progress: bool = False,
) -> ProbeResult:
    """Multinomial logistic regression on standardised features, sweeping lr x weight decay, chosen on val.

    Optimisation: Adam, minibatches of ``batch_size`` (full batch when the train set is smaller), cosine LR
    decay to 0 over ``epochs``, zero init. ``weight_decay`` is an L2 penalty in the objective,
    ``mean CE + weight_decay / 2 * ||W||^2`` (bias not penalised), so each configuration has a well-defined
    optimum (sklearn's ``C = 1 / (weight_decay * N)``). All configurations share the minibatch order and are
    trained at once; the final-epoch model of the best val top-1 is returned (ties: first in grid order,
    lrs outer, weight decays inner). Classes are the sorted unique train labels.

    Features larger than memory: a :class:`~reprlab.evaluate.cache.FeatureArray` (an on-disk cache), or
    ``chunk_rows`` smaller than the train set, trains on ``chunk_rows`` rows at a time
    (:mod:`reprlab.evaluate.chunked_probe`: block-shuffled minibatches, the same result when one chunk holds
    every row). ``progress``: a bar per epoch (on a terminal).
    """
    from reprlab.evaluate.cache import FeatureArray

    if not lrs or not weight_decays:
        raise ValueError("lrs and weight_decays must be non-empty")
    if isinstance(train_x, FeatureArray) or (chunk_rows is not None and chunk_rows < len(train_x)):
        return _train_in_chunks(train_x, train_y, val_x, val_y, lrs, weight_decays, epochs, batch_size, device,
                                seed, chunk_rows, progress)
    train_x, val_x = as_tensor(train_x, torch.float32), as_tensor(val_x, torch.float32)
    train_y, val_y = as_tensor(train_y).long(), as_tensor(val_y).long()
    _check_split(train_x, train_y, "train")
    _check_split(val_x, val_y, "val")
    device = torch.device(device) if device is not None else train_x.device
    generator = torch.Generator().manual_seed(seed)

    classes, train_targets = torch.unique(train_y, sorted=True, return_inverse=True)
    mean = train_x.mean(dim=0)  # (D,)
    std = train_x.std(dim=0, unbiased=False) + _STD_EPS  # (D,) population std, as StandardScaler
    train_z = ((train_x - mean) / std).to(device)  # (N, D)
    val_z = ((val_x - mean) / std).to(device)  # (V, D)
    train_targets = train_targets.to(device)
    val_targets = _label_indices(classes, val_y).to(device)

    configs = [(lr, weight_decay) for lr in lrs for weight_decay in weight_decays]
    weight, bias = _train_configs(train_z, train_targets, classes.numel(), configs, epochs, batch_size,
                                  generator, progress)

    val_logits = _batched_logits(val_z, weight, bias)  # (V, G, C)
    val_top1 = (val_logits.argmax(dim=2) == val_targets[:, None]).float().mean(dim=0)  # (G,)
    grid = [
        {"lr": lr, "weight_decay": wd, "val_top1": float(top1)} for (lr, wd), top1 in zip(configs, val_top1)
    ]
    best = int(val_top1.argmax())  # first maximum = grid order
    model = LinearProbe(mean.to(device), std.to(device), weight[:, best], bias[best], classes.to(device))
    return ProbeResult(
        model=model,
        hyperparameters={
            "lr": configs[best][0],
            "weight_decay": configs[best][1],
            "epochs": epochs,
            "batch_size": batch_size,
        },
        val_top1=grid[best]["val_top1"],
        grid=grid,
    )


def _train_in_chunks(train_x: Any, train_y: Any, val_x: Any, val_y: Any, lrs: tuple[float, ...],
                     weight_decays: tuple[float, ...], epochs: int, batch_size: int,
                     device: torch.device | str | None, seed: int, chunk_rows: int | None,
                     progress: bool) -> ProbeResult:
    """``train_linear_probe`` over chunks of rows (its arguments: features may be FeatureArrays)."""
    from reprlab.evaluate.cache import FeatureArray
    from reprlab.evaluate.chunked_probe import train_chunked_probe

    train_y, val_y = as_tensor(train_y).long().cpu(), as_tensor(val_y).long().cpu()
    for x, y, name in ((train_x, train_y, "train"), (val_x, val_y, "val")):
        if len(x.shape) != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{name} must be features (N, D) and labels (N,), got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
    if not isinstance(train_x, FeatureArray):
        train_x = as_tensor(train_x, torch.float32)
    if not isinstance(val_x, FeatureArray):
        val_x = as_tensor(val_x, torch.float32).cpu()
    chunk_rows = chunk_rows or train_x.chunk_rows
    device = torch.device(device) if device is not None else torch.device("cpu")
    return train_chunked_probe(train_x, train_y, val_x, val_y, lrs, weight_decays, epochs, batch_size, device,
                               seed, chunk_rows, progress)


def _train_configs(
    train_z: Tensor,
    train_targets: Tensor,
    num_classes: int,
    configs: list[tuple[float, float]],
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Train every (lr, weight decay) of ``configs`` at once on the same minibatches (Adam, cosine decay to 0,
    zero init); returns the final (D, G, C) weights and (G, C) biases, G = len(configs)."""
    device, num_train = train_z.device, train_z.shape[0]

    def epoch_batches() -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(num_train, generator=generator).to(device)
        shuffled_z, shuffled_targets = train_z[order], train_targets[order]  # one gather per epoch
        for start in range(0, num_train, batch_size):
            yield shuffled_z[start : start + batch_size], shuffled_targets[start : start + batch_size]

    total_steps = epochs * max(1, math.ceil(num_train / batch_size))
    return train_batched(epoch_batches, train_z.shape[1], num_classes, configs, epochs, total_steps, device,
                         progress)


def train_batched(epoch_batches: Callable[[], Iterator[tuple[Tensor, Tensor]]], dim: int, num_classes: int,
                  configs: list[tuple[float, float]], epochs: int, total_steps: int, device: torch.device,
                  progress: bool = False) -> tuple[Tensor, Tensor]:
    """The optimisation of :func:`train_linear_probe`: ``epochs`` passes of ``epoch_batches()`` (standardised
    (B, D) features and (B,) class indices), every configuration at once; ``total_steps`` sets the cosine
    decay. ``progress``: a bar per epoch (on a terminal)."""
    num_configs = len(configs)
    weight = torch.zeros(dim, num_configs, num_classes, device=device, requires_grad=True)  # (D, G, C)
    bias = torch.zeros(num_configs, num_classes, device=device, requires_grad=True)  # (G, C)
    config_lrs = torch.tensor([lr for lr, _ in configs], device=device).view(-1, 1)  # (G, 1)
    config_wds = torch.tensor([wd for _, wd in configs], device=device).view(-1, 1)  # (G, 1)
    optimizer = _BatchedAdam([weight, bias])
    step = 0
    with progress_bar(epochs, f"linear probe ({num_configs} settings)", progress, unit="epoch") as bar:
        for _ in range(epochs):
            for batch_z, batch_targets in epoch_batches():
                targets = batch_targets[:, None].expand(-1, num_configs)  # (B, G)
                logits = _batched_logits(batch_z, weight, bias)  # (B, G, C)
                loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=0)  # (G,)
                weight.grad = bias.grad = None
                loss.sum().backward()  # configs are independent: the sum keeps each one's gradient
                weight.grad.add_(config_wds * weight.detach())  # gradient of the L2 penalty wd / 2 ||W||^2
                cosine = 0.5 * (1 + math.cos(math.pi * step / total_steps))
                optimizer.step(config_lrs * cosine)
                step += 1
            bar.update(1)
    return weight.detach(), bias.detach()


def _batched_logits(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(N, D) features, (D, G, C) weights, (G, C) biases -> (N, G, C) logits of every configuration."""
    dim, num_configs, num_classes = weight.shape
    logits = z @ weight.reshape(dim, num_configs * num_classes)  # (N, G * C): one GEMM, 3x faster than bmm
    return logits.view(-1, num_configs, num_classes) + bias


class _BatchedAdam:
    """Adam (Kingma & Ba, 2015) with one learning rate per configuration (the G axis of the weights):
    ``torch.optim.Adam`` takes one lr per parameter group, and we keep all configs in one tensor."""

    def __init__(self, params: list[Tensor], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.betas, self.eps, self.step_count = params, betas, eps, 0
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, lr: Tensor) -> None:
        """lr: (G, 1) learning rate of each configuration, broadcast over (D, G, C) and (G, C)."""
        beta1, beta2 = self.betas
        self.step_count += 1
        correction1, correction2 = 1 - beta1**self.step_count, 1 - beta2**self.step_count
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            exp_avg.lerp_(param.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            denom = (exp_avg_sq / correction2).sqrt_().add_(self.eps)
            param.sub_(lr * (exp_avg / correction1) / denom)


def sklearn_linear_probe(
    train_x: Tensor | np.ndarray,
    train_y: Tensor | np.ndarray,
    val_x: Tensor | np.ndarray,
    val_y: Tensor | np.ndarray,
    Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0),  # scikit-learn's name: inverse regularisation
    max_iter: int = 1000,
) -> ProbeResult:
    """scikit-learn cross-check: ``StandardScaler`` + ``LogisticRegression`` (lbfgs, multinomial), C chosen on
    val top-1 (ties: the smaller C, i.e. the stronger regularisation)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, val_x = as_tensor(train_x, torch.float32).cpu(), as_tensor(val_x, torch.float32).cpu()
    train_y, val_y = as_tensor(train_y).long().cpu(), as_tensor(val_y).long().cpu()
    _check_split(train_x, train_y, "train")
    _check_split(val_x, val_y, "val")
    if not Cs:
        raise ValueError("Cs must be non-empty")
    grid, models = [], []
    for inverse_regularisation in sorted(Cs):
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=inverse_regularisation, max_iter=max_iter)
        )
        model.fit(train_x.numpy(), train_y.numpy())
        top1 = float((model.predict(val_x.numpy()) == val_y.numpy()).mean())
        grid.append({"C": inverse_regularisation, "val_top1": top1})
        models.append(model)
    best = max(range(len(grid)), key=lambda i: (grid[i]["val_top1"], -i))
    return ProbeResult(
        model=models[best],
        hyperparameters={"C": grid[best]["C"], "max_iter": max_iter},
        val_top1=grid[best]["val_top1"],
        grid=grid,
    )
