"""SimCLR (Chen et al., 2020): two augmented views per image, an MLP projection, NT-Xent."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reprlab.data.augment import SimCLRAugment
from reprlab.models.encoders import Encoder
from reprlab.models.heads import projection_head
from reprlab.ssl.losses import nt_xent_loss


class SimCLR(nn.Module):
    """Contrastive pretraining. ``temperature``: 0.5 suits CIFAR-scale batches (official CIFAR recipe), 0.1 large
    ImageNet batches (paper Table 5). Views are made on the device from the uint8 batch."""

    def __init__(self, encoder: Encoder, temperature: float = 0.5, projection_dim: int = 128,
                 hidden_dim: int | None = None, num_layers: int = 2, output_bn: bool = True,
                 image_size: int | None = None, crop_scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5,
                 jitter_strength: float = 1.0, jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_p: float = 0.0,
                 gather_distributed: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projection_head(encoder.feature_dim, hidden_dim or encoder.feature_dim, projection_dim,
                                         num_layers=num_layers, output_bn=output_bn)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.augment_args = dict(crop_scale=tuple(crop_scale), flip_p=flip_p, jitter_strength=jitter_strength,
                                 jitter_p=jitter_p, grayscale_p=grayscale_p, blur_p=blur_p)
        self.image_size = image_size

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["images"]  # (B, C, H, W) uint8 on the device
        augment = SimCLRAugment(size=self.image_size or images.shape[-1], **self.augment_args)
        view0, view1 = augment.views(images, n=2)
        z = self.projector(self.encoder(torch.cat([view0, view1])))  # one pass: BN sees both views
        z0, z1 = z.chunk(2)
        return {"loss": nt_xent_loss(z0, z1, self.temperature, gather=self.gather_distributed)}
