"""lightly's twins of reprlab's momentum methods (BYOL, MoCo v2, MoCo v3, DINO), registered in
bench.peer_methods' :data:`~bench.peer_methods.LIGHTLY_TWINS`, whose module docstring lists what all twins share.
The momentum networks move by lightly's ``update_momentum`` before each step's forward, on reprlab's per-step
cosine schedule (:func:`momentum_at`)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.peer_parts import TwinSpec, features, mlp
from bench.peer_transforms import dino_transform, one_pipeline_transform, two_pipeline_transform
from bench.peers import LightlyTwin


def momentum_copy(module: nn.Module) -> nn.Module:
    """lightly's momentum network: ``copy.deepcopy`` + ``deactivate_requires_grad``."""
    return frozen(copy.deepcopy(module))


def frozen(module: nn.Module) -> nn.Module:
    """``module`` after lightly's ``deactivate_requires_grad`` (DINO's separately built teacher head)."""
    from lightly.models.utils import deactivate_requires_grad

    deactivate_requires_grad(module)
    return module


def momentum_at(step: int, total_steps: int, base: float, final: float) -> float:
    """lightly's ``cosine_schedule`` at step ``step`` of reprlab's per-step cosine (bench.peer_methods' docstring)."""
    from lightly.utils.scheduler import cosine_schedule

    return cosine_schedule(step, total_steps + 1, base, final)


def share_in_steps(share: float, total_steps: int) -> int:
    """Steps in ``share`` of the run, at least 1 for a share > 0 (reprlab DINO's rule)."""
    return 0 if share == 0 else max(1, round(share * total_steps))


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
        return self.projection_head_momentum(features(self.backbone_momentum, x)).detach()


class LightlyBYOL(MomentumTwin):
    """examples/pytorch/byol.py: ``BYOLProjectionHead`` / ``BYOLPredictionHead`` (reprlab's ``hidden_dim``,
    ``projection_dim``), momentum copies of backbone and projector, ``BYOLTransform`` with reprlab's two
    pipelines, loss ``0.5 * (NCS(p0, z1) + NCS(p1, z0))`` (``loss_scale`` 4: bench.peer_methods' docstring)."""

    loss_scale = 4.0

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
        p0, p1 = (self.prediction_head(self.projection_head(features(self.backbone, x))) for x in (x0, x1))
        z0, z1 = self.forward_momentum(x0), self.forward_momentum(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))



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
        query = self.projection_head(features(self.backbone, x0))
        loss = self.criterion(query, self.keys(x1))
        if not self.symmetric:
            return loss
        query1 = self.projection_head(features(self.backbone, x1))
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
        q0, q1 = (self.prediction_head(self.projection_head(features(self.backbone, x))) for x in (x0, x1))
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
        teacher_out = [self.teacher_head(features(self.teacher_backbone, view)) for view in views[:2]]
        student_out = [self.head(features(self.backbone, view)) for view in views]
        return self.criterion(teacher_out, student_out, epoch=step)

    def after_backward(self, step: int) -> None:
        self.head.cancel_last_layer_gradients(current_epoch=step)

    def evaluated_encoder(self) -> nn.Module:
        return self.teacher_backbone
