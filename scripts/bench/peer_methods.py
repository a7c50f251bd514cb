"""lightly's twin of each reprlab pretraining method, for side-by-side benchmarks: :data:`LIGHTLY_TWINS`.

Each twin is driven through lightly 1.6.0's public API as its examples (examples/pytorch/<method>.py) and its
CIFAR-10 benchmark (docs/source/getting_started/benchmarks/cifar10_benchmark.py) do: its heads, its per-sample
transforms in DataLoader workers, ``update_momentum`` + ``cosine_schedule`` for momentum networks (before each
step's forward, as the examples), its losses. The settings come from the reprlab method built from the same
``method.params`` (its view pipelines, temperatures, queue, momentum schedule, loss weights, head widths), so
that only the implementation differs; a setting lightly cannot express is a one-line ``ValueError``, smaller
differences are listed per builder. Common to all:

- The momentum schedule is evaluated per step over the run's steps, ``cosine_schedule(step, total_steps + 1,
  base, final)``: reprlab's per-step cosine (lightly's examples evaluate it per epoch).
- The transforms (bench.peer_transforms) take reprlab's pipelines' strengths, colour jitter included.
- Each view goes through the networks on its own (BatchNorm statistics per view, as lightly's examples).
- ``optim_scale`` (bench.peers.LightlyTwin): where reprlab's loss has another scale than lightly's, the twin's
  optimizer is reprlab's rescaled by :func:`rescaled_optim` so both take the same updates (BYOL: reprlab's
  summed normalized MSE has 4x the gradient of lightly's halved negative cosine).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.peer_transforms import dino_transform, one_pipeline_transform, two_pipeline_transform
from bench.peers import LightlyTwin, PairTwin, build_lightly_simclr, lightly_transform


@dataclass(frozen=True)
class TwinSpec:
    """What every builder gets: the ``backbone`` (images -> (B, ``feature_dim``) features; reprlab's encoder in
    the quality benchmark), the method's ``settings`` (its parameters with the defaults filled in:
    :func:`method_settings`), the reprlab ``reference`` built from the same parameters (its pipelines and
    derived values), the default view ``size`` (the images' side), ``normalize`` (ImageNet statistics in the
    transform: off when the encoder normalizes inside) and the run's ``total_steps``."""

    backbone: nn.Module
    feature_dim: int
    settings: dict[str, Any]
    reference: nn.Module
    size: int
    normalize: bool
    total_steps: int


def method_settings(method: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """reprlab's ``METHODS[method]`` keyword defaults overridden by ``params``."""
    from reprlab.ssl import METHODS

    signature = inspect.signature(METHODS[method]).parameters
    return {**{k: p.default for k, p in signature.items() if k != "encoder"}, **dict(params or {})}


def rescaled_optim(optim: Any, scale: float) -> Any:
    """reprlab's ``optim:`` section for a loss whose gradient is ``1 / scale`` of reprlab's: the same updates.
    SGD: lr x scale, weight decay / scale; LARS (its trust ratio cancels a gradient scale): weight decay / scale."""
    if scale == 1.0:
        return optim
    if optim.name == "sgd":
        return dataclasses.replace(optim, lr=optim.lr * scale, weight_decay=optim.weight_decay / scale)
    if optim.name == "lars":
        return dataclasses.replace(optim, weight_decay=optim.weight_decay / scale)
    raise ValueError(f"cannot rescale optimizer {optim.name!r} to a loss {scale}x smaller; use sgd or lars")


# --------------------------------------------------------------------------------------------- helpers


def momentum_copy(module: nn.Module) -> nn.Module:
    """lightly's momentum network: ``copy.deepcopy`` + ``deactivate_requires_grad``."""
    return frozen(copy.deepcopy(module))


def frozen(module: nn.Module) -> nn.Module:
    """``module`` after lightly's ``deactivate_requires_grad`` (DINO's separately built teacher head)."""
    from lightly.models.utils import deactivate_requires_grad

    deactivate_requires_grad(module)
    return module


def momentum_at(step: int, total_steps: int, base: float, final: float) -> float:
    """lightly's ``cosine_schedule`` at step ``step`` of reprlab's per-step cosine (module docstring)."""
    from lightly.utils.scheduler import cosine_schedule

    return cosine_schedule(step, total_steps + 1, base, final)


def mlp(blocks: list[tuple[int, int, bool, nn.Module | None]]) -> nn.Module:
    """lightly's ``ProjectionHead`` from (in, out, batch norm, activation) blocks (a head lightly has no class for,
    as its CIFAR-10 benchmark builds SimSiam's 2-layer projector)."""
    from lightly.models.modules.heads import ProjectionHead

    return ProjectionHead([(i, o, nn.BatchNorm1d(o) if bn else None, act) for i, o, bn, act in blocks])


def share_in_steps(share: float, total_steps: int) -> int:
    """Steps in ``share`` of the run, at least 1 for a share > 0 (reprlab DINO's rule)."""
    return 0 if share == 0 else max(1, round(share * total_steps))


def _features(backbone: nn.Module, x: Tensor) -> Tensor:
    return backbone(x).flatten(start_dim=1)


# --------------------------------------------------------------------------------------------- builders


def build_simclr(spec: TwinSpec) -> LightlyTwin:
    """examples/pytorch/simclr.py (bench.peers): ``SimCLRTransform``, ``SimCLRProjectionHead`` (reprlab's widths,
    ``num_layers`` and ``batch_norm``), ``NTXentLoss`` at reprlab's temperature."""
    s, ref = spec.settings, spec.reference
    if s["output_bn"] != s["batch_norm"]:
        raise ValueError(f"lightly's SimCLRProjectionHead puts BatchNorm on every layer or none; output_bn is "
                         f"{s['output_bn']} with batch_norm {s['batch_norm']}: set them equal")
    model, criterion = build_lightly_simclr(spec.backbone, spec.feature_dim, s["hidden_dim"], s["projection_dim"],
                                            ref.temperature, s["num_layers"], s["batch_norm"])
    return PairTwin(model, criterion, lightly_transform(ref.augment, ref.augment.size or spec.size, spec.normalize))


class MomentumTwin(LightlyTwin):
    """A backbone + projection head with momentum copies moved by ``update_momentum`` before each forward."""

    def __init__(self, spec: TwinSpec, projection_head: nn.Module, base: float, final: float) -> None:
        super().__init__()
        self.backbone, self.projection_head = spec.backbone, projection_head
        self.backbone_momentum = momentum_copy(self.backbone)
        self.projection_head_momentum = momentum_copy(self.projection_head)
        self.base, self.final, self.total_steps = base, final, spec.total_steps

    def before_forward(self, step: int) -> None:
        from lightly.models.utils import update_momentum

        m = momentum_at(step, self.total_steps, self.base, self.final)
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)

    def forward_momentum(self, x: Tensor) -> Tensor:
        return self.projection_head_momentum(_features(self.backbone_momentum, x)).detach()


class LightlyBYOL(MomentumTwin):
    """examples/pytorch/byol.py: ``BYOLProjectionHead`` / ``BYOLPredictionHead`` (reprlab's ``hidden_dim``,
    ``projection_dim``), momentum copies of backbone and projector, ``BYOLTransform`` with reprlab's two
    pipelines, loss ``0.5 * (NCS(p0, z1) + NCS(p1, z0))`` (``optim_scale`` 4: module docstring)."""

    optim_scale = 4.0

    def __init__(self, spec: TwinSpec) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        s, ref = spec.settings, spec.reference
        super().__init__(spec, BYOLProjectionHead(spec.feature_dim, s["hidden_dim"], s["projection_dim"]),
                         ref.base_momentum, ref.final_momentum)
        self.prediction_head = BYOLPredictionHead(s["projection_dim"], s["hidden_dim"], s["projection_dim"])
        self.criterion = NegativeCosineSimilarity()
        self.transform = two_pipeline_transform(ref.augment, ref.augment2, spec.size, spec.normalize)

    def training_loss(self, views: list[Tensor], step: int) -> Tensor:
        x0, x1 = views
        p0, p1 = (self.prediction_head(self.projection_head(_features(self.backbone, x))) for x in (x0, x1))
        z0, z1 = self.forward_momentum(x0), self.forward_momentum(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class LightlySimSiam(LightlyTwin):
    """examples/pytorch/simsiam.py and the CIFAR-10 benchmark: ``SimSiamProjectionHead`` (3 layers) or, for
    reprlab's ``projector_layers: 2``, the benchmark's 2-layer ``ProjectionHead`` (its output BatchNorm without
    affine parameters, as SimSiamProjectionHead's and reprlab's; the benchmark's has them);
    ``SimSiamPredictionHead``; ``SimSiamTransform``; loss ``0.5 * (NCS(z0, p1) + NCS(z1, p0))``, z detached."""

    def __init__(self, spec: TwinSpec) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
        from lightly.models.modules.heads import ProjectionHead
        from lightly.transforms import SimSiamTransform

        s, d = spec.settings, spec.feature_dim
        super().__init__()
        self.backbone = spec.backbone
        if s["projector_layers"] == 3:
            self.projection_head = SimSiamProjectionHead(d, s["hidden_dim"], s["projection_dim"])
        elif s["projector_layers"] == 2:
            self.projection_head = ProjectionHead([
                (d, s["hidden_dim"], nn.BatchNorm1d(s["hidden_dim"]), nn.ReLU()),
                (s["hidden_dim"], s["projection_dim"], nn.BatchNorm1d(s["projection_dim"], affine=False), None)])
        else:
            raise ValueError(f"lightly's SimSiam heads have 2 or 3 layers; projector_layers is {s['projector_layers']}")
        self.prediction_head = SimSiamPredictionHead(s["projection_dim"], s["predictor_hidden_dim"],
                                                     s["projection_dim"])
        self.criterion = NegativeCosineSimilarity()
        self.transform = one_pipeline_transform(SimSiamTransform, spec.reference.augment, spec.size, spec.normalize)

    def training_loss(self, views: list[Tensor], step: int) -> Tensor:
        z0, z1 = (self.projection_head(_features(self.backbone, x)) for x in views)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        return 0.5 * (self.criterion(z0.detach(), p1) + self.criterion(z1.detach(), p0))


class LightlyMoCoV2(MomentumTwin):
    """examples/pytorch/moco.py and the CIFAR-10 benchmark's MocoModel: ``MoCoProjectionHead`` (no BatchNorm),
    momentum copies, ``NTXentLoss(temperature, memory_bank_size=(queue_size, projection_dim))``, ``MoCoV2Transform``;
    with reprlab's ``symmetric`` the benchmark's ``0.5 * (loss(q0, k1) + loss(q1, k0))``; with ``split_bn`` > 1 the
    benchmark's one-GPU shuffling BN: every BatchNorm2d of the backbone a lightly ``SplitBatchNorm`` of that many
    groups, the key batch through ``batch_shuffle`` / ``batch_unshuffle``. Differences: lightly's memory bank
    enqueues the first direction's keys before the second direction reads it (reprlab reads the queue as it was for
    both), and at a wrap it drops the keys past the end of the bank when ``queue_size`` is not a multiple of the
    batch."""

    def __init__(self, spec: TwinSpec) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead
        from lightly.transforms import MoCoV2Transform

        s, ref = spec.settings, spec.reference
        if s["split_bn"] > 1:  # before the momentum copy, so both sides split alike
            _lightly_split_batchnorm(spec.backbone, s["split_bn"])
        super().__init__(spec, MoCoProjectionHead(spec.feature_dim, s["hidden_dim"], s["projection_dim"]),
                         ref.base_momentum, ref.final_momentum)
        self.split_bn = s["split_bn"]
        self.criterion = NTXentLoss(temperature=ref.temperature,
                                    memory_bank_size=(ref.queue.size, s["projection_dim"]))
        self.symmetric = ref.symmetric
        self.transform = one_pipeline_transform(MoCoV2Transform, ref.augment, spec.size, spec.normalize)

    def keys(self, x: Tensor) -> Tensor:
        """The momentum network's keys of ``x``, its batch shuffled and put back under split BN (the benchmark's)."""
        if self.split_bn == 1:
            return self.forward_momentum(x)
        from lightly.models.utils import batch_shuffle, batch_unshuffle

        shuffled, order = batch_shuffle(x)
        return batch_unshuffle(self.forward_momentum(shuffled), order)

    def training_loss(self, views: list[Tensor], step: int) -> Tensor:
        x0, x1 = views
        query = self.projection_head(_features(self.backbone, x0))
        loss = self.criterion(query, self.keys(x1))
        if not self.symmetric:
            return loss
        query1 = self.projection_head(_features(self.backbone, x1))
        return 0.5 * (loss + self.criterion(query1, self.keys(x0)))


def _lightly_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """``module`` with every BatchNorm2d (reprlab's split ones included) replaced by lightly's ``SplitBatchNorm``
    (fresh statistics, the affine parameters copied), in place."""
    from lightly.models.batchnorm import SplitBatchNorm

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm):
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.weight.data.copy_(child.weight.data)
            split.bias.data.copy_(child.bias.data)
            module.add_module(name, split)
        else:
            _lightly_split_batchnorm(child, num_splits)
    return module


class LightlyMoCoV3(MomentumTwin):
    """MoCo v3 from lightly's parts (lightly ships no MoCo v3 model or loss): ``MoCoProjectionHead`` with
    ``batch_norm=True`` (2 layers for ResNets, 3 for ViTs, as its docstring's MoCo v3), ``BYOLPredictionHead``
    (ResNet; a 2-layer BN ``MoCoProjectionHead`` for ViTs), momentum copies, ``BYOLTransform`` with reprlab's
    two pipelines, and MoCo v3's loss as the paper's Algorithm 1 writes it (:func:`moco_v3_ctr` per direction),
    which lightly lacks: its ``NTXentLoss`` also contrasts each query with the other queries (SimCLR's loss, more
    negatives than MoCo v3 has), so a twin built on it is another method. The difference that remains: lightly's
    output BatchNorm has affine parameters (MoCo v3's none)."""

    def __init__(self, spec: TwinSpec) -> None:
        from lightly.models.modules import BYOLPredictionHead, MoCoProjectionHead

        s, ref = spec.settings, spec.reference
        hidden, out, vit = s["hidden_dim"], s["projection_dim"], ref.architecture == "vit"
        super().__init__(spec, MoCoProjectionHead(spec.feature_dim, hidden, out, 3 if vit else 2, batch_norm=True),
                         ref.base_momentum, ref.final_momentum)
        self.prediction_head = (MoCoProjectionHead(out, hidden, out, 2, batch_norm=True) if vit
                                else BYOLPredictionHead(out, hidden, out))
        self.temperature = ref.temperature
        self.transform = two_pipeline_transform(ref.augment, ref.augment2, spec.size, spec.normalize)

    def training_loss(self, views: list[Tensor], step: int) -> Tensor:
        x0, x1 = views
        q0, q1 = (self.prediction_head(self.projection_head(_features(self.backbone, x))) for x in (x0, x1))
        k0, k1 = self.forward_momentum(x0), self.forward_momentum(x1)
        return moco_v3_ctr(q0, k1, self.temperature) + moco_v3_ctr(q1, k0, self.temperature)


def moco_v3_ctr(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """``ctr`` of MoCo v3's Algorithm 1 (one process): each query's key is the positive, the batch's other keys the
    negatives, cross-entropy scaled by ``2 * temperature``."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / temperature
    return 2 * temperature * F.cross_entropy(logits, torch.arange(len(q), device=q.device))


class LightlyDINO(LightlyTwin):
    """examples/pytorch/dino.py and the CIFAR-10 benchmark's DINOModel: ``DINOProjectionHead`` (3 layers; other
    ``num_layers`` by replacing its ``layers`` with a ``ProjectionHead``, as the benchmark does for 2, which
    leaves those layers at PyTorch's default init), a teacher backbone deep-copied from the student and a
    teacher head built on its own (lightly's examples: it starts from other weights than the student's head),
    ``DINOLoss`` (teacher temperature warm-up and centre), ``DINOTransform`` with reprlab's crops, the last
    layer's gradients cancelled by ``cancel_last_layer_gradients``. Epoch arguments are given in steps, so the
    warm-up and the frozen last layer cover reprlab's shares of the run's steps. The evaluated network is the
    teacher's backbone, as reprlab saves (lightly's benchmark scores the student). The teacher sees each global
    crop on its own (reprlab: both in one pass)."""

    def __init__(self, spec: TwinSpec) -> None:
        from lightly.loss import DINOLoss

        s, ref, total = spec.settings, spec.reference, spec.total_steps
        super().__init__()
        self.backbone = spec.backbone
        self.head = self._head(spec, share_in_steps(ref.freeze_last_layer, total))
        self.teacher_backbone = momentum_copy(self.backbone)
        self.teacher_head = frozen(self._head(spec, -1))
        self.criterion = DINOLoss(output_dim=s["out_dim"], warmup_teacher_temp=ref.teacher_temperature_start,
                                  teacher_temp=ref.teacher_temperature,
                                  warmup_teacher_temp_epochs=share_in_steps(ref.teacher_temperature_warmup, total),
                                  student_temp=ref.student_temperature, center_momentum=ref.center_momentum)
        self.base, self.final, self.total_steps = ref.base_momentum, ref.final_momentum, total
        self.transform = dino_transform(ref.augment, spec.size, spec.normalize)

    @staticmethod
    def _head(spec: TwinSpec, freeze_steps: int) -> nn.Module:
        from lightly.models.modules import DINOProjectionHead

        s = spec.settings
        head = DINOProjectionHead(spec.feature_dim, s["hidden_dim"], s["bottleneck_dim"], s["out_dim"],
                                  batch_norm=s["batch_norm"], freeze_last_layer=freeze_steps,
                                  norm_last_layer=s["norm_last_layer"])
        if s["num_layers"] != 3:
            dims = [spec.feature_dim] + [s["hidden_dim"]] * (s["num_layers"] - 1)
            blocks = [(i, o, s["batch_norm"], nn.GELU()) for i, o in zip(dims, dims[1:])]
            head.layers = mlp([*blocks, (dims[-1], s["bottleneck_dim"], False, None)]).layers
        return head

    def before_forward(self, step: int) -> None:
        from lightly.models.utils import update_momentum

        m = momentum_at(step, self.total_steps, self.base, self.final)
        update_momentum(self.backbone, self.teacher_backbone, m=m)
        update_momentum(self.head, self.teacher_head, m=m)

    def training_loss(self, views: list[Tensor], step: int) -> Tensor:
        teacher_out = [self.teacher_head(_features(self.teacher_backbone, view)) for view in views[:2]]
        student_out = [self.head(_features(self.backbone, view)) for view in views]
        return self.criterion(teacher_out, student_out, epoch=step)

    def after_backward(self, step: int) -> None:
        self.head.cancel_last_layer_gradients(current_epoch=step)

    def evaluated_encoder(self) -> nn.Module:
        return self.teacher_backbone


class LightlyPair(LightlyTwin):
    """A backbone + projection head and a loss on the two views' projections (Barlow Twins, VICReg)."""

    def __init__(self, spec: TwinSpec, projection_head: nn.Module, criterion: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.backbone, self.projection_head, self.criterion = spec.backbone, projection_head, criterion
        self.optim_scale = scale
        ref = spec.reference
        self.transform = two_pipeline_transform(ref.augment, ref.augment2, spec.size, spec.normalize)

    def training_loss(self, views: list[Tensor], step: int) -> Tensor:
        z0, z1 = (self.projection_head(_features(self.backbone, x)) for x in views)
        return self.criterion(z0, z1)


def build_barlow_twins(spec: TwinSpec) -> LightlyTwin:
    """examples/pytorch/barlowtwins.py: ``BarlowTwinsProjectionHead`` (3 layers; another ``num_layers`` as a
    ``ProjectionHead`` of the same blocks), ``BarlowTwinsLoss(lambda_param)``, ``BYOLTransform`` with reprlab's
    pipelines; reprlab's ``loss_scale`` becomes ``optim_scale``."""
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead

    s, ref = spec.settings, spec.reference
    if s["num_layers"] == 3:
        head = BarlowTwinsProjectionHead(spec.feature_dim, s["hidden_dim"], s["projection_dim"])
    else:
        dims = [spec.feature_dim] + [s["hidden_dim"]] * (s["num_layers"] - 1)
        head = mlp([*[(i, o, True, nn.ReLU()) for i, o in zip(dims, dims[1:])],
                    (dims[-1], s["projection_dim"], False, None)])
    return LightlyPair(spec, head, BarlowTwinsLoss(lambda_param=ref.lambda_offdiag), scale=ref.loss_scale)


def build_vicreg(spec: TwinSpec) -> LightlyTwin:
    """examples/pytorch/vicreg.py: ``VICRegProjectionHead(num_layers)``, ``VICRegLoss(lambda, mu, nu)`` with
    reprlab's weights, ``BYOLTransform`` with reprlab's two pipelines (module docstring)."""
    from lightly.loss import VICRegLoss
    from lightly.models.modules.heads import VICRegProjectionHead

    s, ref = spec.settings, spec.reference
    head = VICRegProjectionHead(spec.feature_dim, s["hidden_dim"], s["projection_dim"], num_layers=s["num_layers"])
    criterion = VICRegLoss(lambda_param=ref.invariance_weight, mu_param=ref.variance_weight,
                           nu_param=ref.covariance_weight)
    return LightlyPair(spec, head, criterion)


LIGHTLY_TWINS: dict[str, Callable[[TwinSpec], LightlyTwin]] = {
    "simclr": build_simclr,
    "byol": LightlyBYOL,
    "simsiam": LightlySimSiam,
    "moco_v2": LightlyMoCoV2,
    "moco_v3": LightlyMoCoV3,
    "dino": LightlyDINO,
    "barlow_twins": build_barlow_twins,
    "vicreg": build_vicreg,
}


def build_twin(method: str, spec: TwinSpec) -> LightlyTwin:
    """lightly's twin of reprlab's ``method`` (:data:`LIGHTLY_TWINS`)."""
    if method not in LIGHTLY_TWINS:
        raise ValueError(f"no lightly twin for method {method!r}; lightly twins: {sorted(LIGHTLY_TWINS)}")
    return LIGHTLY_TWINS[method](spec)
