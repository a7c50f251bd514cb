"""MoCo v2 (Chen, Fan, Girshick & He, 2020) and MoCo v3 (Chen, Xie & He, 2021): a query network against the keys of
a momentum (EMA) key network.

v2: the keys of the other view are positives, a queue of past keys the negatives. v3: no queue; each query's
negatives are the other images' keys in the (global) batch, a predictor sits on the query side, the loss is
symmetric. In both the key network (encoder + projector) is a frozen :func:`~reprlab.ssl.momentum.momentum_copy`
that the loop's per-step hook (:meth:`after_step`) moves towards the query network; no optimizer touches it. The
saved encoder (``encoder.safetensors``) is the *query* encoder, the one both papers evaluate (their linear-probe
scripts load ``encoder_q`` / ``base_encoder``).

Momentum: the references update the key network at the start of every forward, with the momentum of that
iteration; :meth:`after_step` does the same update one call earlier, so the update after global step k (1-based)
uses ``cosine_momentum(k, total_steps, base_momentum, final_momentum)`` (constant when the two are equal, MoCo v2).

BatchNorm: the key network runs in train mode on its own batch, as in the references. Under DDP the loop converts
the whole task to SyncBatchNorm, key network included (the same layer types on both sides, so
:func:`~reprlab.ssl.momentum.update_momentum` applies unchanged): MoCo v3 does exactly that, and for MoCo v2 global
batch statistics take the place of its shuffling BN, which exists to keep a key from seeing its query's
sub-batch statistics. On one process MoCo v2's ``split_bn`` (:mod:`reprlab.ssl.split_bn`) stands in for the
shuffle, as the MoCo CIFAR-10 demo and lightly's CIFAR-10 benchmark (8 groups); ``split_bn: 1`` (the default) is
plain BatchNorm, as solo-learn's one-GPU CIFAR runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.contracts import Task
from reprlab.data.views import ViewAugment
from reprlab.evaluate.knn import normalize_features
from reprlab.evaluate.quality import mean_cosine
from reprlab.models.encoders import Encoder
from reprlab.models.heads import projection_head
from reprlab.ssl.byol import BYOL_AUGMENT, BYOL_AUGMENT2
from reprlab.ssl.losses import infonce_queue_logits, moco_v3_logits, nt_xent_accuracy
from reprlab.ssl.momentum import cosine_momentum, momentum_copy, update_momentum
from reprlab.ssl.multiview import MultiViewTask, PairedViewTask, check_two_views
from reprlab.ssl.queue import MemoryQueue
from reprlab.ssl.split_bn import convert_split_batchnorm, shuffled_forward

# MoCo v2's "aug+" (both views): crop 0.2-1, flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8 (strength 0.5
# here), grayscale 0.2, blur p 0.5 (set blur_p 0 on 32 px images)
MOCO_V2_AUGMENT = ViewAugment(crop_scale=(0.2, 1.0), jitter_strength=0.5, blur_p=0.5)

# MoCo v3's heads (its _build_mlp): hidden layers Linear-BN-ReLU, last Linear then BN without affine parameters
MOCO_V3_HEADS = {"resnet": (2, False), "vit": (3, True)}  # projector layers, BN on the predictor's output


def _check_momentum(base: float, final: float) -> None:
    if not (0.0 <= base <= 1.0 and 0.0 <= final <= 1.0):
        raise ValueError(f"base_momentum and final_momentum must be in [0, 1], got {base} and {final}")


class _MomentumKeys(Task):
    """The part MoCo v2 and v3 share: ``encoder`` + ``projector`` (the query side), their momentum copies
    ``key_encoder`` + ``key_projector``, and the per-step EMA update."""

    def __init__(self, encoder: Encoder, projector: nn.Module, base_momentum: float, final_momentum: float) -> None:
        super().__init__()
        _check_momentum(base_momentum, final_momentum)
        self.encoder, self.projector = encoder, projector
        self.key_encoder, self.key_projector = momentum_copy(encoder), momentum_copy(projector)
        self.base_momentum, self.final_momentum = base_momentum, final_momentum

    @torch.no_grad()
    def keys(self, view: Tensor) -> Tensor:
        """(B, P) key-network embeddings of one view (no gradient)."""
        return self.key_projector(self.key_encoder(view))

    def momentum_at(self, step: int, total_steps: int) -> float:
        """The key-network momentum of the update after global step ``step`` (1-based; module docstring)."""
        return cosine_momentum(step, total_steps, self.base_momentum, self.final_momentum)

    def after_step(self, step: int, total_steps: int) -> None:
        """key = m * key + (1 - m) * query for the encoder and the projector (parameters only)."""
        momentum = self.momentum_at(step, total_steps)
        update_momentum(self.encoder, self.key_encoder, momentum)
        update_momentum(self.projector, self.key_projector, momentum)


class MoCoV2(_MomentumKeys, MultiViewTask):
    """MoCo v2. Defaults are the paper's: projector Linear(``hidden_dim`` 2048)-ReLU-Linear(``projection_dim``
    128) without BatchNorm, InfoNCE at ``temperature`` 0.2 against a queue of ``queue_size`` 65536 keys, key
    momentum 0.999 throughout (``base_momentum`` = ``final_momentum``; different values give a cosine ramp, as
    solo-learn's MoCo v2+ 0.99 -> 0.999). ``augment``: both views' pipeline (None = "aug+", above).

    Per step: queries of the first view, keys of the second (no gradient), the loss against the queue as it was,
    then the L2-normalized keys are enqueued, gathered from every rank first (``gather_distributed``) so every
    rank holds the same queue (:class:`~reprlab.ssl.queue.MemoryQueue`, a buffer: saved and resumed). With
    ``symmetric`` (the MoCo CIFAR-10 demo, lightly, solo-learn's v2+) both views serve as queries, the loss is the
    mean of the two directions, and both views' keys are enqueued (first view's, then second's), 2 per image.
    ``split_bn`` > 1: every BatchNorm2d of the encoder (and so of the key encoder) normalizes ``split_bn`` groups
    of the batch on its own, and the key network sees the batch shuffled (:mod:`reprlab.ssl.split_bn`), which
    stops the BatchNorm shortcut on one process; the batch size must divide by it. Logged: ``loss``, ``acc``
    (share of queries whose positive beats every queued negative) and ``key_cos``, the mean cosine between the
    step's keys: it rises to 1 when the keys collapse onto one ray, a state the loss (then at its chance value
    log(1 + queue_size)) gives no gradient to leave. On short runs that happens in the first steps unless the
    learning rate warms up (moco_v2_cifar10.yaml warms up for an epoch; README, MoCo v2).
    """

    def __init__(self, encoder: Encoder, augment: ViewAugment | None = MOCO_V2_AUGMENT, temperature: float = 0.2,
                 queue_size: int = 65536, projection_dim: int = 128, hidden_dim: int = 2048,
                 base_momentum: float = 0.999, final_momentum: float = 0.999, symmetric: bool = False,
                 split_bn: int = 1, gather_distributed: bool = True) -> None:
        projector = projection_head(encoder.feature_dim, hidden_dim, projection_dim, num_layers=2, batch_norm=False)
        convert_split_batchnorm(encoder, split_bn)  # before the key copy, so both sides split alike
        super().__init__(encoder, projector, base_momentum, final_momentum)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.augment = augment if augment is not None else MOCO_V2_AUGMENT
        self.queue = MemoryQueue(queue_size, projection_dim)
        self.temperature, self.symmetric, self.gather_distributed = temperature, symmetric, gather_distributed
        self.split_bn = split_bn

    def forward_views(self, views: list[Tensor]) -> dict[str, Tensor]:
        """InfoNCE against the queue for two already-augmented float views, each (B, C, H, W); enqueues the keys."""
        check_two_views(views, "MoCo v2")
        directions = [(0, 1), (1, 0)] if self.symmetric else [(0, 1)]  # (query view, key view)
        keys = {k: shuffled_forward(self.keys, views[k]) if self.split_bn > 1 else self.keys(views[k])
                for _, k in directions}  # (B, P) each
        losses, hits = [], []
        for q, k in directions:
            query = self.projector(self.encoder(views[q]))  # (B, P)
            logits, positive = infonce_queue_logits(query, keys[k], self.queue.queue, self.temperature)  # (B, 1+K)
            losses.append(F.cross_entropy(logits, positive))
            hits.append(nt_xent_accuracy(logits, positive))
        # after the loss: the logits hold a copy of the queue, so the in-place write leaves backward intact
        unit_keys = normalize_features(torch.cat([keys[k] for k in sorted(keys)]))  # float32 unit rows
        self.queue.enqueue(unit_keys, gather=self.gather_distributed)
        return {"loss": torch.stack(losses).mean(), "acc": torch.stack(hits).mean(), "key_cos": mean_cosine(unit_keys)}


class MoCoV3(_MomentumKeys, PairedViewTask):
    """MoCo v3. Defaults are the paper's ResNet-50 recipe: projector of 2 layers, predictor of 2 layers, both
    ``hidden_dim`` 4096 wide with output ``projection_dim`` 256, ``temperature`` 1.0, key momentum cosine from
    ``base_momentum`` 0.99 to ``final_momentum`` 1. ``architecture: vit`` gives its ViT heads (a 3-layer projector,
    BN on the predictor's output) and temperature 0.2 (``temperature`` None = the architecture's). The loss is
    ``ctr(q1, k2) + ctr(q2, k1)``, each the in-batch InfoNCE times 2 * temperature
    (:func:`~reprlab.ssl.losses.moco_v3_loss`), whose keys are the global batch's under DDP
    (``gather_distributed``). ``augment`` / ``augment2``: BYOL's asymmetric pair, as the paper uses (None = those).
    Logged: ``loss`` and ``acc`` (share of queries whose own key is their nearest). The ViT recipe's frozen random
    patch projection is not applied here.
    """

    def __init__(self, encoder: Encoder, augment: ViewAugment | None = BYOL_AUGMENT,
                 augment2: ViewAugment | None = BYOL_AUGMENT2, architecture: str = "resnet",
                 temperature: float | None = None, projection_dim: int = 256, hidden_dim: int = 4096,
                 base_momentum: float = 0.99, final_momentum: float = 1.0, gather_distributed: bool = True) -> None:
        if architecture not in MOCO_V3_HEADS:
            raise ValueError(f"unknown MoCo v3 architecture {architecture!r}; choose from {sorted(MOCO_V3_HEADS)}")
        projector_layers, predictor_bn = MOCO_V3_HEADS[architecture]
        super().__init__(encoder, _mlp(encoder.feature_dim, hidden_dim, projection_dim, projector_layers, True),
                         base_momentum, final_momentum)
        self.predictor = _mlp(projection_dim, hidden_dim, projection_dim, 2, predictor_bn)
        self.temperature = temperature if temperature is not None else (1.0 if architecture == "resnet" else 0.2)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.augment = augment if augment is not None else BYOL_AUGMENT
        self.augment2 = augment2 if augment2 is not None else BYOL_AUGMENT2
        self.architecture, self.gather_distributed = architecture, gather_distributed

    def forward_views(self, views: list[Tensor]) -> dict[str, Tensor]:
        """MoCo v3's symmetric loss of two already-augmented float views, each (B, C, H, W)."""
        check_two_views(views, "MoCo v3")
        q0, q1 = (self.predictor(self.projector(self.encoder(view))) for view in views)  # (B, P) each
        k0, k1 = self.keys(views[0]), self.keys(views[1])
        loss, hits = [], []
        for query, key in ((q0, k1), (q1, k0)):
            logits, positive = moco_v3_logits(query, key, self.temperature, gather=self.gather_distributed)
            loss.append(F.cross_entropy(logits, positive) * (2 * self.temperature))  # as moco_v3_loss scales it
            hits.append(nt_xent_accuracy(logits, positive))
        return {"loss": loss[0] + loss[1], "acc": (hits[0] + hits[1]) / 2}


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, output_bn: bool) -> nn.Sequential:
    """MoCo v3's MLP: Linear-BN-ReLU hidden layers, a last Linear, and with ``output_bn`` a BatchNorm without
    affine parameters (no biases where BN follows, as the reference)."""
    head = projection_head(in_dim, hidden_dim, out_dim, num_layers=num_layers, output_bn=output_bn)
    if output_bn:
        head[-1] = nn.BatchNorm1d(out_dim, affine=False)
    return head
