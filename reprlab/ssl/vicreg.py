"""VICReg (Bardes, Ponce & LeCun, 2022): variance, invariance and covariance terms on two views' embeddings.

Two views per image from BYOL's asymmetric pair of pipelines (the paper's augmentations), an encoder and an
expander; :func:`~reprlab.ssl.losses.vicreg_terms` takes the invariance term over this rank's samples (DDP's
average makes it the global mean) and the variance and covariance over the *global* batch, the embeddings
gathered from every rank with gradient (the reference's ``FullGatherLayer``), so 2 ranks give the loss and
gradients of one process with their joint batch. The saved encoder is the one trained, the network the paper
evaluates; the expander stays in ``state.pt``.
"""

from __future__ import annotations

from torch import Tensor

from reprlab.data.views import ViewAugment
from reprlab.models.encoders import Encoder
from reprlab.models.heads import projection_head
from reprlab.ssl.byol import BYOL_AUGMENT, BYOL_AUGMENT2
from reprlab.ssl.losses import vicreg_terms
from reprlab.ssl.multiview import PairedViewTask, check_two_views


class VICReg(PairedViewTask):
    """Variance-Invariance-Covariance Regularization. Defaults are the paper's ImageNet recipe: expander of
    ``num_layers`` 3 Linear layers, ``hidden_dim`` = ``projection_dim`` = 8192, BatchNorm + ReLU after the hidden
    ones and none at the output; weights lambda = ``invariance_weight`` 25, mu = ``variance_weight`` 25,
    nu = ``covariance_weight`` 1. Pair it with LARS (paper: batch 2048, base lr 0.2 x batch / 256, weight decay
    1e-6).

    ``augment`` / ``augment2``: the pipelines of the first and second view (:class:`ViewAugment`; None = BYOL's
    pair, blur p 1.0 / 0.1 and solarize p 0 / 0.2, the reference's; in YAML a mapping of its fields, keys left out
    keep BYOL's). ``gather_distributed``: under DDP the variance and covariance cover the global batch, as in the
    paper (false: each rank's own, a different loss). Each view goes through the networks on its own (BatchNorm
    statistics per view, as in the reference). ``forward(batch)`` makes the two views and returns
    ``forward_views(views)``: the weighted ``loss`` and its unweighted ``invariance``, ``variance`` and
    ``covariance`` terms (a variance term near 1 means collapsed dimensions).
    """

    def __init__(self, encoder: Encoder, augment: ViewAugment | None = BYOL_AUGMENT,
                 augment2: ViewAugment | None = BYOL_AUGMENT2, projection_dim: int = 8192, hidden_dim: int = 8192,
                 num_layers: int = 3, invariance_weight: float = 25.0, variance_weight: float = 25.0,
                 covariance_weight: float = 1.0, gather_distributed: bool = True) -> None:
        super().__init__()
        weights = {"invariance_weight": invariance_weight, "variance_weight": variance_weight,
                   "covariance_weight": covariance_weight}
        negative = [f"{name}={value}" for name, value in weights.items() if value < 0]
        if negative:
            raise ValueError(f"VICReg's weights must be >= 0, got {', '.join(negative)}")
        self.encoder = encoder
        self.augment = augment if augment is not None else BYOL_AUGMENT
        self.augment2 = augment2 if augment2 is not None else BYOL_AUGMENT2
        self.projector = projection_head(encoder.feature_dim, hidden_dim, projection_dim, num_layers=num_layers,
                                         output_bn=False)
        self.invariance_weight, self.variance_weight = invariance_weight, variance_weight
        self.covariance_weight, self.gather_distributed = covariance_weight, gather_distributed

    def forward_views(self, views: list[Tensor]) -> dict[str, Tensor]:
        """VICReg's loss and terms for two already-augmented float views, each (B, C, H, W)."""
        check_two_views(views, "VICReg")
        z0, z1 = (self.projector(self.encoder(view)) for view in views)  # (B, P) each
        invariance, variance, covariance = vicreg_terms(z0, z1, gather=self.gather_distributed)
        loss = (self.invariance_weight * invariance + self.variance_weight * variance
                + self.covariance_weight * covariance)
        return {"loss": loss, "invariance": invariance.detach(), "variance": variance.detach(),
                "covariance": covariance.detach()}
