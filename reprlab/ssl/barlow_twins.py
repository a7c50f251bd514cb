"""Barlow Twins (Zbontar et al., 2021): the cross-correlation of two views' embeddings is driven to the identity.

Two views per image from BYOL's asymmetric pair of pipelines (the paper's augmentations), an encoder and a
projector with no final BatchNorm; :func:`~reprlab.ssl.losses.barlow_twins_loss` standardizes each dimension over
the *global* batch and all-reduces the correlation with gradient, so 2 ranks give the loss and gradients of one
process with their joint batch (the reference's ``BatchNorm1d(affine=False)`` under SyncBatchNorm plus its
all-reduce, without the reference's 1 / world-size gradient). The saved encoder is the one trained, the network
the paper evaluates; the projector stays in ``state.pt``.
"""

from __future__ import annotations

from torch import Tensor

from reprlab.data.views import ViewAugment
from reprlab.models.encoders import Encoder
from reprlab.models.heads import projection_head
from reprlab.ssl.byol import BYOL_AUGMENT, BYOL_AUGMENT2
from reprlab.ssl.losses import barlow_twins_loss
from reprlab.ssl.multiview import PairedViewTask, check_two_views


class BarlowTwins(PairedViewTask):
    """Redundancy reduction. Defaults are the paper's ImageNet recipe: projector of ``num_layers`` 3 Linear
    layers, ``hidden_dim`` = ``projection_dim`` = 8192, BatchNorm + ReLU after the hidden ones and none at the
    output; ``lambda_offdiag`` 5e-3 (the paper's; its code uses 0.0051); ``loss_scale`` 1 (solo-learn's CIFAR
    recipe scales the loss by 0.1). Pair it with LARS (paper: batch 2048, lr 0.2 for weights and 0.0048 for
    biases and BatchNorm, weight decay 1.5e-6).

    ``augment`` / ``augment2``: the pipelines of the first and second view (:class:`ViewAugment`; None = BYOL's
    pair, blur p 1.0 / 0.1 and solarize p 0 / 0.2; in YAML a mapping of its fields, keys left out keep BYOL's).
    ``gather_distributed``: under DDP the correlation covers the global batch, as in the paper (false: each rank's
    own, a different loss). Each view goes through the networks on its own (BatchNorm statistics per view, as in
    the reference). ``forward(batch)`` makes the two views and returns ``forward_views(views)``.
    """

    def __init__(self, encoder: Encoder, augment: ViewAugment | None = BYOL_AUGMENT,
                 augment2: ViewAugment | None = BYOL_AUGMENT2, projection_dim: int = 8192, hidden_dim: int = 8192,
                 num_layers: int = 3, lambda_offdiag: float = 5e-3, loss_scale: float = 1.0,
                 gather_distributed: bool = True) -> None:
        super().__init__()
        if lambda_offdiag < 0 or loss_scale <= 0:
            raise ValueError(f"need lambda_offdiag >= 0 and loss_scale > 0, got {lambda_offdiag} and {loss_scale}")
        self.encoder = encoder
        self.augment = augment if augment is not None else BYOL_AUGMENT
        self.augment2 = augment2 if augment2 is not None else BYOL_AUGMENT2
        self.projector = projection_head(encoder.feature_dim, hidden_dim, projection_dim, num_layers=num_layers,
                                         output_bn=False)
        self.lambda_offdiag, self.loss_scale = lambda_offdiag, loss_scale
        self.gather_distributed = gather_distributed

    def forward_views(self, views: list[Tensor]) -> dict[str, Tensor]:
        """The Barlow Twins loss of two already-augmented float views, each (B, C, H, W)."""
        check_two_views(views, "Barlow Twins")
        z0, z1 = (self.projector(self.encoder(view)) for view in views)  # (B, P) each
        loss = barlow_twins_loss(z0, z1, self.lambda_offdiag, gather=self.gather_distributed)
        return {"loss": loss * self.loss_scale}
