"""SimSiam (Chen & He, 2021): a predictor and a stop-gradient, no negatives and no momentum network.

The saved encoder is the one network there is; the projector and predictor stay in the training state only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.data.views import ViewAugment
from reprlab.models.encoders import Encoder
from reprlab.models.heads import projection_head
from reprlab.ssl.losses import negative_cosine_loss
from reprlab.ssl.multiview import MultiViewTask, check_two_views

# SimSiam's views (the MoCo v2 pipeline, paper Sec. 4): crop 0.2-1, flip, colour jitter (0.4, 0.4, 0.4, 0.1) with
# p 0.8 (jitter strength 0.5 here), grayscale 0.2, blur p 0.5 (set blur_p 0 for 32 px images, as on CIFAR)
SIMSIAM_AUGMENT = ViewAugment(crop_scale=(0.2, 1.0), jitter_strength=0.5, blur_p=0.5)


class SimSiam(MultiViewTask):
    """Simple Siamese learning: loss D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2 with D the negative cosine
    (in [-1, 1]); the stop-gradient is inside :func:`~reprlab.ssl.losses.negative_cosine_loss`.

    Defaults are the paper's ImageNet ones: projector of ``projector_layers`` = 3 Linear layers, ``hidden_dim``
    2048 wide, output ``projection_dim`` 2048, BatchNorm after every layer (the output's without affine
    parameters, as in the reference); predictor Linear(``predictor_hidden_dim`` 512)-BN-ReLU-Linear(2048), the
    bottleneck that keeps it from being an identity. The paper's CIFAR experiments use a 2-layer projector
    (``projector_layers: 2``). ``augment``: both views' pipeline (None = the paper's, above).

    Logged besides the loss: ``z_std``, the per-dimension std of the L2-normalized projections averaged over
    dimensions: about 1/sqrt(projection_dim) when healthy and 0 at collapse (the paper's Fig. 2 signal).

    The paper keeps the predictor's learning rate constant (no decay); here it follows the run's schedule like
    every other parameter (the stage builds one schedule for all groups).
    """

    def __init__(self, encoder: Encoder, augment: ViewAugment | None = SIMSIAM_AUGMENT, projection_dim: int = 2048,
                 hidden_dim: int = 2048, projector_layers: int = 3, predictor_hidden_dim: int = 512) -> None:
        super().__init__()
        self.encoder = encoder
        self.augment = augment if augment is not None else SIMSIAM_AUGMENT
        self.projector = projection_head(encoder.feature_dim, hidden_dim, projection_dim,
                                         num_layers=projector_layers, output_bn=True)
        self.projector[-1] = nn.BatchNorm1d(projection_dim, affine=False)  # the reference's output BN
        self.predictor = projection_head(projection_dim, predictor_hidden_dim, projection_dim, num_layers=2,
                                         output_bn=False)

    def forward_views(self, views: list[Tensor]) -> dict[str, Tensor]:
        """SimSiam's symmetric loss of two already-augmented float views, each (B, C, H, W)."""
        check_two_views(views, "SimSiam")
        z0, z1 = (self.projector(self.encoder(view)) for view in views)  # (B, P); one view per pass, as the paper
        p0, p1 = self.predictor(z0), self.predictor(z1)
        loss = negative_cosine_loss(p0, z1) / 2 + negative_cosine_loss(p1, z0) / 2
        with torch.no_grad():
            z_std = F.normalize(z0.detach().float(), dim=1).std(dim=0).mean()
        return {"loss": loss, "z_std": z_std}
