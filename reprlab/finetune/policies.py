"""Fine-tuning policies: which encoder layer groups train, at which learning rate, and when.

A policy speaks in the encoder's layer groups (``encoder.layer_groups()``, ordered input -> output). It

- builds the optimizer's parameter groups (:meth:`Policy.attach`): the head, then one pair of groups
  (decayed / no-decay) per encoder layer group, each tagged with ``name`` and ``lr_scale``; the scheduler
  multiplies ``base lr * lr_scale`` by its factor, so per-group scales survive warmup and decay;
- sets ``requires_grad`` and is an engine callback: ``on_epoch_start(epoch)`` applies the epoch's trainable
  set (and, for phased policies, the phase's lr multiplier);
- names the frozen modules (:meth:`Policy.frozen_modules`), which the training task keeps in eval mode, so
  BatchNorm statistics and dropout of frozen layers do not change.

Optimizer state when groups join (``gradual``, ``lp_ft``): every group that will ever train is in the
optimizer from the start, with ``requires_grad=False`` until it joins. A parameter without a gradient is
skipped by every optimizer here (no step, no weight decay, no state), so a group that joins starts with fresh
state (Adam's step count at 0, empty momentum): nothing stale. Policies that never train a group
(``linear_probe``, ``partial``) leave it out of the optimizer. Policies whose trainable set changes during
training cannot run under DistributedDataParallel, which only syncs the parameters that required grad when it
wrapped the model.

Adding a policy: one subclass overriding :meth:`Policy.trainable` / :meth:`Policy.lr_scale` /
:meth:`Policy.phase_lr_scale` (or, for one that adds parameters such as ``lora``, :meth:`Policy.attach` and
:meth:`Policy.finalize`), and one line in ``POLICIES``.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn
from torch.optim import Optimizer

from reprlab import distributed
from reprlab.contracts import Callback
from reprlab.optim import param_groups


class Policy(Callback):
    """Base policy: every encoder group trains at the base learning rate, from the first epoch."""

    static = True  # the trainable set never changes: groups that never train stay out of the optimizer

    def __init__(self) -> None:
        self.classifier: nn.Module | None = None
        self.groups: list[tuple[str, list[nn.Parameter]]] = []
        self.optimizer: Optimizer | None = None
        self.scheduler: Any = None
        self._base_lrs: list[float] = []

    # --- what subclasses decide --------------------------------------------------------------------------

    def trainable(self, index: int, num_groups: int, epoch: int) -> bool:
        """Whether encoder layer group ``index`` (0 = nearest the input) trains during ``epoch`` (0-based)."""
        return True

    def lr_scale(self, index: int, num_groups: int) -> float:
        """Learning-rate multiplier of encoder layer group ``index`` (the head's is 1)."""
        return 1.0

    def phase_lr_scale(self, epoch: int) -> float:
        """Multiplier of every group's learning rate during ``epoch`` (LP-FT's smaller fine-tuning lr)."""
        return 1.0

    def check(self, num_groups: int, group_names: list[str]) -> None:
        """Raise when the policy's arguments do not fit an encoder with these layer groups."""

    # --- wiring ------------------------------------------------------------------------------------------

    def attach(self, classifier: nn.Module, weight_decay: float, exclude_bn_bias: bool = True) -> list[dict]:
        """Freeze what this policy freezes at epoch 0 and return the optimizer's parameter groups."""
        self.classifier = classifier
        self.groups = classifier.encoder.layer_groups()
        num_groups = len(self.groups)
        self.check(num_groups, [name for name, _ in self.groups])
        if not self.static and distributed.world_size() > 1:
            raise ValueError(f"policy {type(self).__name__} changes which layers train during the run, which "
                             f"DistributedDataParallel does not follow; run it on one process, or use "
                             f"'partial', 'llrd' or 'full' under torchrun")
        for p in classifier.parameters():  # param_groups skips frozen parameters: build with all trainable
            p.requires_grad_(True)
        groups = param_groups(classifier.head, weight_decay, exclude_bn_bias, name="head")
        for index, (name, params) in enumerate(self.groups):
            if self.static and not self.trainable(index, num_groups, 0):
                continue
            named = [(f"{name}.{i}", p) for i, p in enumerate(params)]
            groups += param_groups(named, weight_decay, exclude_bn_bias,
                                   lr_scale=self.lr_scale(index, num_groups), name=f"encoder.{name}")
        self.set_trainable(0)
        return groups

    def bind(self, optimizer: Optimizer, scheduler: Any = None) -> None:
        """Remember the optimizer (and its LambdaLR) so that phased policies can rescale learning rates."""
        self.optimizer, self.scheduler = optimizer, scheduler
        if scheduler is not None and not hasattr(scheduler, "lr_lambdas"):
            raise TypeError(f"policies rescale learning rates through a LambdaLR "
                            f"(reprlab.optim.build_scheduler), got {type(scheduler).__name__}")
        self._base_lrs = list(scheduler.base_lrs) if scheduler is not None else \
            [group["lr"] for group in optimizer.param_groups]

    def set_trainable(self, epoch: int) -> None:
        """Apply ``trainable(., ., epoch)`` to ``requires_grad``; the head always trains."""
        assert self.classifier is not None, "call attach() first"
        num_groups = len(self.groups)
        for p in self.classifier.encoder.parameters():
            p.requires_grad_(False)
        for index, (_, params) in enumerate(self.groups):
            if self.trainable(index, num_groups, epoch):
                for p in params:
                    p.requires_grad_(True)

    def on_epoch_start(self, epoch: int) -> None:
        self.set_trainable(epoch)
        scale = self.phase_lr_scale(epoch)
        if self.optimizer is None:
            if scale != 1.0:
                raise RuntimeError(f"{type(self).__name__} changes the learning rate at epoch {epoch}; call "
                                   f"policy.bind(optimizer, scheduler) after building them")
            return
        # idempotent (recomputed from the bound base lrs), so a resumed run lands on the same values
        scheduler = self.scheduler
        for i, group in enumerate(self.optimizer.param_groups):
            if scheduler is None:
                group["lr"] = self._base_lrs[i] * scale
            else:  # LambdaLR: lr = base_lr * factor(step); rescale its base and the lr of the next step
                scheduler.base_lrs[i] = self._base_lrs[i] * scale
                group["lr"] = scheduler.base_lrs[i] * scheduler.lr_lambdas[i](scheduler.last_epoch)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        return {"trainable_groups": len(self.trainable_group_names())}

    def trainable_group_names(self) -> list[str]:
        """Names of the encoder layer groups that train right now."""
        return [name for name, params in self.groups if any(p.requires_grad for p in params)]

    def finalize(self) -> None:
        """Called once after training, before the classifier is scored on the test split and saved: a policy
        that changed the model's structure (LoRA) makes it a plain model again."""

    def frozen_modules(self) -> list[nn.Module]:
        """The largest encoder sub-modules whose parameters are all frozen: kept in eval mode while training
        (BatchNorm statistics fixed, dropout off). The whole encoder when nothing in it trains."""
        assert self.classifier is not None, "call attach() first"

        def walk(module: nn.Module) -> list[nn.Module]:
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                return [module]
            return [frozen for child in module.children() for frozen in walk(child)]

        return walk(self.classifier.encoder)


def _check_positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_scale(value: Any, name: str) -> None:
    if not isinstance(value, (int, float)) or not 0 < value:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


class LinearProbe(Policy):
    """Encoder frozen and in eval mode; only the head trains."""

    def trainable(self, index: int, num_groups: int, epoch: int) -> bool:
        return False


class Full(Policy):
    """Everything trains; ``encoder_lr_scale`` < 1 gives the encoder a lower learning rate than the head."""

    def __init__(self, encoder_lr_scale: float = 1.0) -> None:
        super().__init__()
        _check_scale(encoder_lr_scale, "encoder_lr_scale")
        self.encoder_lr_scale = encoder_lr_scale

    def lr_scale(self, index: int, num_groups: int) -> float:
        return self.encoder_lr_scale


class Partial(Policy):
    """Freeze the first ``freeze_first`` layer groups (input side), or train only the last ``train_last``
    (neither given: the last group trains). Frozen groups stay in eval mode and out of the optimizer; trained
    groups get ``encoder_lr_scale``.
    """

    def __init__(self, freeze_first: int | None = None, train_last: int | None = None,
                 encoder_lr_scale: float = 1.0) -> None:
        super().__init__()
        if freeze_first is not None and train_last is not None:
            raise ValueError(f"policy 'partial' takes one of freeze_first and train_last, got "
                             f"freeze_first={freeze_first!r}, train_last={train_last!r}")
        if freeze_first is None and train_last is None:
            train_last = 1
        for value, name in ((freeze_first, "freeze_first"), (train_last, "train_last")):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        _check_scale(encoder_lr_scale, "encoder_lr_scale")
        self.freeze_first, self.train_last, self.encoder_lr_scale = freeze_first, train_last, encoder_lr_scale

    def check(self, num_groups: int, group_names: list[str]) -> None:
        count = self.freeze_first if self.freeze_first is not None else self.train_last
        if count > num_groups:
            key = "freeze_first" if self.freeze_first is not None else "train_last"
            raise ValueError(f"{key}={count} but the encoder has only {num_groups} layer groups "
                             f"{group_names}; use at most {num_groups}")

    def frozen_count(self, num_groups: int) -> int:
        return self.freeze_first if self.freeze_first is not None else num_groups - self.train_last

    def trainable(self, index: int, num_groups: int, epoch: int) -> bool:
        return index >= self.frozen_count(num_groups)

    def lr_scale(self, index: int, num_groups: int) -> float:
        return self.encoder_lr_scale


class Gradual(Policy):
    """Gradual unfreezing (ULMFiT, Howard & Ruder 2018): the head trains alone for ``epochs_per_group``
    epochs, then every ``epochs_per_group`` epochs one more encoder group joins, from the output side down.

    At epoch e the top ``e // epochs_per_group`` groups train; the whole encoder trains from epoch
    ``num_groups * epochs_per_group`` on. Joining groups start with fresh optimizer state (module docstring).
    Early stopping counts from the start, so a short patience can end the run before every group has joined.
    """

    static = False

    def __init__(self, epochs_per_group: int = 1, encoder_lr_scale: float = 1.0) -> None:
        super().__init__()
        _check_positive_int(epochs_per_group, "epochs_per_group")
        _check_scale(encoder_lr_scale, "encoder_lr_scale")
        self.epochs_per_group, self.encoder_lr_scale = epochs_per_group, encoder_lr_scale

    def trainable(self, index: int, num_groups: int, epoch: int) -> bool:
        return index >= num_groups - epoch // self.epochs_per_group

    def lr_scale(self, index: int, num_groups: int) -> float:
        return self.encoder_lr_scale


class LayerwiseLRDecay(Policy):
    """Layer-wise learning-rate decay (ELECTRA, Clark et al. 2020; BEiT, Bao et al. 2022): everything trains,
    encoder group ``i`` of ``n`` (0 = input side) at ``base_lr * decay ** (n - i)``, the head at ``base_lr``.

    The distance from the top counts the head as 0, so the group nearest the output gets ``decay ** 1``.
    The scales ride on the optimizer's ``lr_scale`` and the scheduler multiplies them by its factor each step.
    """

    def __init__(self, decay: float = 0.65) -> None:
        super().__init__()
        if not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay!r} (BEiT uses 0.65 for ViT-B)")
        self.decay = decay

    def lr_scale(self, index: int, num_groups: int) -> float:
        return self.decay ** (num_groups - index)


class LPFT(Policy):
    """LP-FT (Kumar et al., 2022): linear probe for ``probe_epochs`` (encoder frozen, eval mode), then full
    fine-tuning from the probed head with every learning rate multiplied by ``ft_lr_scale``.

    One optimizer and one schedule span both phases; the encoder has no optimizer state until it joins.
    """

    static = False

    def __init__(self, probe_epochs: int = 1, ft_lr_scale: float = 0.1) -> None:
        super().__init__()
        _check_positive_int(probe_epochs, "probe_epochs")
        _check_scale(ft_lr_scale, "ft_lr_scale")
        self.probe_epochs, self.ft_lr_scale = probe_epochs, ft_lr_scale

    def trainable(self, index: int, num_groups: int, epoch: int) -> bool:
        return epoch >= self.probe_epochs

    def phase_lr_scale(self, epoch: int) -> float:
        return self.ft_lr_scale if epoch >= self.probe_epochs else 1.0


class LoRA(Policy):
    """LoRA (Hu et al., 2022): the encoder stays frozen; low-rank updates ``(alpha / rank) * B A`` of its
    ``target_modules`` train with the head, and are merged into the weights by :meth:`finalize`, so the saved
    classifier needs no peft. Through peft (:mod:`reprlab.finetune.lora`, which gives the default targets per
    family: ``qkv`` for timm ViTs, ``query`` + ``value`` for HF ViTs, conv LoRA for convnets).

    ``target_modules``: layer names or their last part (e.g. ``[qkv, proj]``). ``dropout``: on the LoRA input.
    Logs ``trainable_params`` (LoRA only) and ``trainable_fraction`` (of the encoder's own parameters).
    """

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: list[str] | None = None) -> None:
        super().__init__()
        _check_positive_int(rank, "rank")
        _check_scale(alpha, "alpha")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if target_modules is not None and (isinstance(target_modules, str) or not target_modules):
            raise ValueError(f"target_modules must be a non-empty list of layer names, got {target_modules!r}")
        self.rank, self.alpha, self.dropout, self.target_modules = rank, alpha, dropout, target_modules
        self.encoder_params = 0

    def attach(self, classifier: nn.Module, weight_decay: float, exclude_bn_bias: bool = True) -> list[dict]:
        from reprlab.finetune.lora import add_lora, resolve_targets

        self.classifier = classifier
        backbone = classifier.encoder.backbone
        self.encoder_params = sum(p.numel() for p in classifier.encoder.parameters())
        targets = resolve_targets(backbone, self.target_modules)
        lora = add_lora(backbone, self.rank, self.alpha, self.dropout, targets)
        self.groups = [("lora", lora)]
        for p in classifier.parameters():
            p.requires_grad_(True)
        groups = param_groups(classifier.head, weight_decay, exclude_bn_bias, name="head")
        groups += param_groups([(f"lora.{i}", p) for i, p in enumerate(lora)], weight_decay, exclude_bn_bias,
                               name="encoder.lora")
        self.set_trainable(0)
        return groups

    def trainable_params(self) -> int:
        """LoRA parameters (the head aside)."""
        return sum(p.numel() for _, params in self.groups for p in params)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        count = self.trainable_params()
        return {"trainable_groups": 1, "trainable_params": count,
                "trainable_fraction": count / max(self.encoder_params, 1)}

    def finalize(self) -> None:
        from reprlab.finetune.lora import merge_lora

        assert self.classifier is not None, "call attach() first"
        merge_lora(self.classifier.encoder.backbone)
        self.groups = []


POLICIES: dict[str, type[Policy]] = {
    "linear_probe": LinearProbe,
    "full": Full,
    "partial": Partial,
    "gradual": Gradual,
    "llrd": LayerwiseLRDecay,
    "lp_ft": LPFT,
    "lora": LoRA,
}


def build_policy(name: str, params: dict[str, Any] | None = None) -> Policy:
    """``build_policy("partial", {"freeze_first": 2})``; an unknown name or parameter lists the valid ones."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    valid = list(inspect.signature(POLICIES[name]).parameters)
    unknown = sorted(set(params or {}) - set(valid))
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter {unknown[0]!r}; valid parameters: {valid}")
    return POLICIES[name](**(params or {}))
