"""SimCLR (Chen et al., 2020): two augmented views per image, an MLP projection, NT-Xent.

Evaluation uses the encoder output h, never the projection z: the head is part of this module, not of the
encoder that is saved. For large batches pair it with LARS (``optim.name: lars``, BN and biases excluded from
weight decay and adaptation) and linear or square-root learning-rate scaling; see
configs/pretrain/simclr_cifar10_gpu.yaml.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.data.augment import SimCLRAugment
from reprlab.models.encoders import Encoder
from reprlab.models.heads import projection_head
from reprlab.ssl.losses import nt_xent_accuracy, nt_xent_logits


class SimCLR(nn.Module):
    """Contrastive pretraining. ``temperature``: 0.5 suits CIFAR-scale batches (official CIFAR recipe), 0.1
    large ImageNet batches (paper Table 5). Views are made on the device from the uint8 batch.

    Projection head: ``num_layers`` Linear layers (2 = SimCLR v1, 3 = v2), hidden width ``hidden_dim``
    (default the encoder's feature_dim), output ``projection_dim``; BN after every hidden Linear and, with
    ``output_bn``, after the last one, biases off where BN follows (``batch_norm: false`` gives a plain MLP
    with biases). Augmentation: random resized crop (``crop_scale``), flip, colour jitter of strength
    ``jitter_strength`` (0.8 s brightness/contrast/saturation, 0.2 s hue) with probability ``jitter_p``,
    grayscale, optional blur. ``gather_distributed``: under DDP every rank's projections are negatives (the
    global batch of the paper). Reports ``loss`` and ``acc`` (share of views whose nearest other view is their
    positive).
    """

    def __init__(self, encoder: Encoder, temperature: float = 0.5, projection_dim: int = 128,
                 hidden_dim: int | None = None, num_layers: int = 2, output_bn: bool = True,
                 batch_norm: bool = True, image_size: int | None = None,
                 crop_scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5,
                 jitter_strength: float = 1.0, jitter_p: float = 0.8, grayscale_p: float = 0.2,
                 blur_p: float = 0.0, gather_distributed: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projection_head(encoder.feature_dim, hidden_dim or encoder.feature_dim,
                                         projection_dim, num_layers=num_layers, batch_norm=batch_norm,
                                         output_bn=output_bn)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.augment_args = dict(crop_scale=tuple(crop_scale), flip_p=flip_p, jitter_strength=jitter_strength,
                                 jitter_p=jitter_p, grayscale_p=grayscale_p, blur_p=blur_p)
        self.image_size = image_size

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["images"]  # (B, C, H, W) uint8 on the device
        augment = SimCLRAugment(size=self.image_size or images.shape[-1], **self.augment_args)
        with torch.autocast(images.device.type, enabled=False):  # elementwise ops: bf16 only slows them down
            view0, view1 = augment.views(images, n=2)
        z = self.projector(self.encoder(torch.cat([view0, view1])))  # one pass: BN sees both views
        z0, z1 = z.chunk(2)
        # (2n, 2N) logits; the column of each anchor's positive
        logits, positive = nt_xent_logits(z0, z1, self.temperature, gather=self.gather_distributed)
        return {"loss": F.cross_entropy(logits, positive), "acc": nt_xent_accuracy(logits, positive)}
