"""The peer harness: lightly as its examples run it, and per-sample DataLoader pipelines, for every
side-by-side comparison (the speed, quality and kNN benchmarks drive lightly only through here).

lightly's way (examples/pytorch/simclr.py): a PIL image per sample through ``SimCLRTransform`` in DataLoader
workers, collated into two view batches; ``backbone -> flatten -> SimCLRProjectionHead``; ``NTXentLoss`` on
two separate forward passes. The augmentation strengths come from a reprlab view pipeline
(:func:`lightly_transform`), the temperature and head widths from the caller, so that only the
implementation differs.

- :func:`lightly_available`, :data:`LIGHTLY_MISSING`: lightly is a benchmark-only extra.
- :func:`torchvision_resnet18`: lightly's backbone (fc removed), optionally with the CIFAR stem.
- :class:`LightlySimCLR`, :func:`build_lightly_simclr`: the model and its loss.
- :func:`lightly_transform`: ``SimCLRTransform`` with the strengths of a reprlab view pipeline.
- :class:`PerSampleViews`, :func:`per_sample_loader`, :func:`loader_rate`: the per-sample data path.
- :class:`LightlyTwin`, :class:`PairTwin`: a lightly model, its loss and its per-step hooks, for any method
  (SimCLR's here, the other methods' in bench.peer_methods).
- :func:`twin_step`, :func:`lightly_step`, :func:`train_lightly`: its training step and loop, one for all methods.
- :func:`lightly_knn`: its kNN classifier (``knn_predict``, as its benchmark module calls it).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from reprlab.data.views import ViewAugment

LIGHTLY_MISSING = "lightly is not installed (pip install 'reprlab[bench]'): its rows are skipped"


def lightly_available() -> bool:
    return importlib.util.find_spec("lightly") is not None


def lightly_version() -> str:
    import lightly

    return lightly.__version__


# --------------------------------------------------------------------------------------------- model


def torchvision_resnet18(cifar_stem: bool = False) -> nn.Module:
    """torchvision's resnet18 with ``fc`` removed (512-d output), as lightly's examples use it; ``cifar_stem``:
    a 3x3/1 first convolution and no max-pool."""
    import torchvision

    resnet = torchvision.models.resnet18()
    if cifar_stem:
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    resnet.fc = nn.Identity()
    return resnet


class LightlySimCLR(nn.Module):
    """lightly's SimCLR model: ``backbone`` features (B, feature_dim) -> ``SimCLRProjectionHead``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int, projection_dim: int,
                 num_layers: int = 2, batch_norm: bool = True) -> None:
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(feature_dim, hidden_dim, projection_dim, num_layers, batch_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))  # (B, projection_dim)


def build_lightly_simclr(backbone: nn.Module, feature_dim: int, hidden_dim: int | None = None,
                         projection_dim: int = 128, temperature: float = 0.5, num_layers: int = 2,
                         batch_norm: bool = True) -> tuple[LightlySimCLR, nn.Module]:
    """The model (hidden width defaults to ``feature_dim``) and lightly's ``NTXentLoss``."""
    from lightly.loss import NTXentLoss

    model = LightlySimCLR(backbone, feature_dim, hidden_dim or feature_dim, projection_dim, num_layers, batch_norm)
    return model, NTXentLoss(temperature=temperature)


# --------------------------------------------------------------------------------------------- data


def lightly_transform(augment: ViewAugment, size: int, normalize: bool) -> Callable:
    """lightly's ``SimCLRTransform`` at ``size`` px with the strengths of a reprlab view pipeline.
    ``normalize``: ImageNet statistics in the transform, as lightly's examples (off when the encoder normalizes
    inside, as reprlab's do)."""
    from lightly.transforms import SimCLRTransform

    low, high = augment.crop_scale
    if high != 1.0:
        raise ValueError(f"lightly's SimCLRTransform crops up to scale 1.0 only; crop_scale is {augment.crop_scale}")
    if augment.solarize_p > 0:
        raise ValueError(f"lightly's SimCLRTransform does not solarize; solarize_p is {augment.solarize_p}")
    options = {} if normalize else {"normalize": None}
    return SimCLRTransform(input_size=size, cj_prob=augment.jitter_p, cj_strength=augment.jitter_strength,
                           min_scale=low, random_gray_scale=augment.grayscale_p, gaussian_blur=augment.blur_p,
                           hf_prob=augment.flip_p, **options)


class PerSampleViews(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) -> (views, label): one image at a time through ``transform``, as a PIL image
    (``as_pil``) or a uint8 (C, H, W) tensor. ``two_calls``: the transform makes one view, so call it twice
    (lightly's SimCLRTransform returns both)."""

    def __init__(self, images: Tensor, labels: Tensor | None, transform: Callable, as_pil: bool = True,
                 two_calls: bool = False) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C), as PIL wants
        self.labels = labels.tolist() if labels is not None else [0] * len(images)
        self.transform, self.as_pil, self.two_calls = transform, as_pil, two_calls

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.images[i]
        if self.as_pil:
            from PIL import Image

            image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        else:
            image = torch.from_numpy(image).permute(2, 0, 1)  # (C, H, W) uint8
        views = (self.transform(image), self.transform(image)) if self.two_calls else self.transform(image)
        return views, self.labels[i]


def per_sample_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int,
                      seed: int | None = None, persistent: bool = False) -> torch.utils.data.DataLoader:
    """Shuffled, ``drop_last`` batches in ``workers`` processes, as lightly's examples load."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=persistent and workers > 0,
                                       generator=generator)


def loader_rate(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, warmup: int, steps: int,
                consume: Callable[[Any], Any] | None = None) -> float:
    """Source images/s of a fresh loader (a new epoch's start) over ``steps`` batches after ``warmup``, each
    batch passed to ``consume`` (e.g. a training step) when given."""
    iterator = iter(per_sample_loader(dataset, batch_size, workers))
    for _ in range(warmup):
        batch = next(iterator)
        if consume is not None:
            consume(batch)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(iterator)
        if consume is not None:
            consume(batch)
    rate = steps * batch_size / (time.perf_counter() - start)
    del iterator  # stops the workers
    return rate


# --------------------------------------------------------------------------------------------- training


class LightlyTwin(nn.Module):
    """lightly's implementation of one method: its modules, its per-sample ``transform`` (PIL image -> list of
    view tensors) and its training step split into hooks, in the order lightly's examples run them.

    :meth:`before_forward` runs first in each step (lightly's examples move momentum networks there),
    :meth:`training_loss` maps the step's views to the loss, :meth:`after_backward` runs between backward and the
    optimizer step (DINO cancels its last layer's gradients there). ``step`` counts the optimizer steps done
    (0-based), ``total_steps`` is the run's total (the momentum schedule's horizon). ``loss_scale``: reprlab's
    loss over this loss for the same batch; :func:`twin_step` multiplies the loss by it, so that both take the
    same gradients, hence the same updates under any optimizer (LARS's unadapted bias and BN parameters too).
    :meth:`evaluated_encoder` is the network a benchmark scores."""

    transform: Callable | None = None
    loss_scale: float = 1.0
    total_steps: int = 1

    def before_forward(self, step: int) -> None:
        """Called before the forward pass of step ``step`` (0-based); nothing by default."""

    def training_loss(self, views: list[Tensor], step: int) -> Tensor:
        raise NotImplementedError

    def after_backward(self, step: int) -> None:
        """Called after backward, before the optimizer step; nothing by default."""

    def evaluated_encoder(self) -> nn.Module:
        return self.backbone


class PairTwin(LightlyTwin):
    """A model and a loss on two separately forwarded views, ``criterion(model(view0), model(view1))``: lightly's
    SimCLR (examples/pytorch/simclr.py)."""

    def __init__(self, model: nn.Module, criterion: nn.Module, transform: Callable | None = None) -> None:
        super().__init__()
        self.model, self.criterion, self.transform = model, criterion, transform

    def training_loss(self, views: list[Tensor], step: int) -> Tensor:
        view0, view1 = views
        return self.criterion(self.model(view0), self.model(view1))

    def evaluated_encoder(self) -> nn.Module:
        return self.model.backbone


def twin_step(twin: LightlyTwin, optimizer: torch.optim.Optimizer, device: torch.device, scheduler: Any = None,
              precision: str = "fp32", grad_clip: float | None = None) -> Callable[..., Tensor]:
    """lightly's training step on the views of one batch, ``step(*views)``: ``before_forward``, the loss (bf16
    autocast with ``precision="bf16"``) times the twin's ``loss_scale``, backward, ``after_backward``, gradient clipping to a global norm of
    ``grad_clip`` (when given, as reprlab's loop clips), optimizer step (and ``scheduler`` step, when given); no
    host sync. The step count the hooks see starts at 0 and advances with every call."""
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    trainable = [p for p in twin.parameters() if p.requires_grad]
    done = [0]  # optimizer steps taken

    def step(*views: Tensor) -> Tensor:
        index = done[0]
        views_on_device = [view.to(device, non_blocking=True) for view in views]
        twin.before_forward(index)
        with amp:
            loss = twin.training_loss(views_on_device, index)
            if twin.loss_scale != 1.0:
                loss = loss * twin.loss_scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        twin.after_backward(index)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        done[0] = index + 1
        return loss.detach()

    return step


def lightly_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 scheduler: Any = None, precision: str = "fp32") -> Callable[..., Tensor]:
    """lightly's SimCLR step on two view batches, ``step(view0, view1)``: two forward passes, NT-Xent, backward,
    optimizer step (and ``scheduler`` step, when given); no host sync."""
    return twin_step(PairTwin(model, criterion), optimizer, device, scheduler, precision)


def train_lightly(model: nn.Module, step: Callable[..., Tensor], loader: torch.utils.data.DataLoader,
                  epochs: int, progress: bool = False, name: str = "simclr") -> float:
    """``epochs`` passes of ``step(*views)`` over ``loader`` (batches of (views, labels)); returns the wall time
    in seconds."""
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        total, steps = 0.0, 0
        for views, _ in loader:
            total, steps = step(*views).float() + total, steps + 1  # summed on the device: no sync
        if progress:
            print(f"lightly {name} epoch {epoch + 1}/{epochs} loss {float(total) / max(steps, 1):.4f}",
                  file=sys.stderr)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------- kNN


def lightly_knn(bank: Tensor, bank_labels: Tensor, queries: Tensor, classes: int, k: int, temperature: float,
                chunk: int) -> Tensor:
    """Predicted classes (Q,) of lightly's ``knn_predict`` over L2-normalized features, ``chunk`` queries at a
    time: bank (N, D), queries (Q, D)."""
    from lightly.utils.benchmarking import knn_predict

    bank_t = bank.T.contiguous()  # (D, N), as lightly's BenchmarkModule stores it
    predictions = [knn_predict(queries[start : start + chunk], bank_t, bank_labels, classes, knn_k=k,
                               knn_t=temperature)[:, 0]  # classes ranked by vote: the first is the prediction
                   for start in range(0, queries.shape[0], chunk)]
    return torch.cat(predictions)
