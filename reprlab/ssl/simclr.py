"""SimCLR (Chen et al., 2020): two augmented views per image, an MLP projection, NT-Xent.

Evaluation uses the encoder output h, never the projection z: the head is part of this module, not of the
encoder that is saved. For large batches pair it with LARS (``optim.name: lars``, BN and biases excluded from
weight decay and adaptation) and linear or square-root learning-rate scaling; see
configs/pretrain/simclr_cifar10_gpu.yaml.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reprlab.config import ConfigError
from reprlab.data.views import ViewAugment
from reprlab.models.encoders import Encoder
from reprlab.models.heads import projection_head
from reprlab.ssl.losses import nt_xent_accuracy, nt_xent_logits
from reprlab.ssl.multiview import MultiViewTask


class SimCLR(MultiViewTask):
    """Contrastive pretraining. ``temperature``: 0.5 suits CIFAR-scale batches (official CIFAR recipe), 0.1
    large ImageNet batches (paper Table 5).

    ``augment``: the view pipeline (:class:`~reprlab.data.views.ViewAugment`: random resized crop, flip,
    colour jitter, grayscale, optional blur and solarization; None = its defaults; in YAML a mapping of its
    fields, ``augment: {crop_scale: [0.08, 1.0], jitter_strength: 0.5}``). Projection head: ``num_layers``
    Linear layers (2 = SimCLR v1, 3 = v2), hidden width ``hidden_dim`` (default the encoder's feature_dim),
    output ``projection_dim``; BN after every hidden Linear and, with ``output_bn``, after the last one,
    biases off where BN follows (``batch_norm: false`` gives a plain MLP with biases).
    ``gather_distributed``: under DDP every rank's projections are negatives (the global batch of the paper).

    ``forward(batch)`` makes two views of the uint8 batch on its device with ``augment`` and returns
    ``forward_views(views)``: ``loss`` and ``acc`` (share of views whose nearest other view is their
    positive). Call ``forward_views`` directly to train or time the model step on ready-made views.
    """

    min_batch_size = 2  # the negatives of an image are the other images of the batch (reprlab.checks reads this)

    def __init__(self, encoder: Encoder, augment: ViewAugment | None = None, temperature: float = 0.5,
                 projection_dim: int = 128, hidden_dim: int | None = None, num_layers: int = 2,
                 output_bn: bool = True, batch_norm: bool = True, gather_distributed: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.augment = augment if augment is not None else ViewAugment()
        self.projector = projection_head(encoder.feature_dim, hidden_dim or encoder.feature_dim,
                                         projection_dim, num_layers=num_layers, batch_norm=batch_norm,
                                         output_bn=output_bn)
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward_views(self, views: list[Tensor]) -> dict[str, Tensor]:
        """NT-Xent loss and accuracy of two already-augmented float views, each (B, C, H, W)."""
        if len(views) != 2:
            raise ValueError(f"SimCLR contrasts exactly 2 views per image, got {len(views)}")
        z = self.projector(self.encoder(torch.cat(views)))  # (2B, P): one pass, BN sees both views
        z0, z1 = z.chunk(2)
        # (2n, 2N) logits; the column of each anchor's positive
        logits, positive = nt_xent_logits(z0, z1, self.temperature, gather=self.gather_distributed)
        if logits.shape[1] < 2 * self.min_batch_size:  # one image: no negative, a constant loss of 0
            raise ConfigError(f"train.batch_size: SimCLR got a batch of {logits.shape[1] // 2} image over all "
                              f"processes; it needs at least {self.min_batch_size} (the other images are the "
                              f"negatives): raise train.batch_size")
        return {"loss": F.cross_entropy(logits, positive), "acc": nt_xent_accuracy(logits, positive)}
