"""BYOL (Grill et al., 2020): an online network predicts an EMA target network's projection of another view.

Two views per image from two pipelines (``augment``, ``augment2``: the paper's asymmetric pair), an online
encoder + projector + predictor, and a target encoder + projector that no optimizer touches: after every step
the loop calls :meth:`BYOL.after_step`, which moves the target towards the online weights with the cosine
momentum 0.996 -> 1. The saved encoder (``encoder.safetensors``) is the *online* encoder, the network the paper
evaluates; the target, projector and predictor stay in the training state (``state.pt``) only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reprlab.data.views import ViewAugment
from reprlab.models.encoders import Encoder
from reprlab.models.heads import projection_head
from reprlab.ssl.losses import normalized_mse_loss
from reprlab.ssl.momentum import cosine_momentum, momentum_copy, update_momentum
from reprlab.ssl.multiview import PairedViewTask, check_two_views

# BYOL's asymmetric pair (paper Table 6): crop 0.08-1, flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
# grayscale 0.2; blur p 1.0 / 0.1, solarize p 0 / 0.2. ViewAugment's jitter strength s gives 0.8s for brightness,
# contrast and saturation and 0.2s for hue: s = 0.5 is the closest (0.4, 0.4, 0.4, 0.1; saturation 0.4, not 0.2).
BYOL_AUGMENT = ViewAugment(jitter_strength=0.5, blur_p=1.0, solarize_p=0.0)
BYOL_AUGMENT2 = ViewAugment(jitter_strength=0.5, blur_p=0.1, solarize_p=0.2)


class BYOL(PairedViewTask):
    """Bootstrap Your Own Latent. Defaults are the paper's: projector and predictor Linear(4096)-BN-ReLU-Linear(256)
    (``hidden_dim``, ``projection_dim``), target momentum ``base_momentum`` 0.996 -> ``final_momentum`` 1 on the
    cosine schedule per global step, loss ``normalized_mse(p1, z2') + normalized_mse(p2, z1')`` (the symmetric sum,
    in [0, 8]).

    ``augment`` / ``augment2``: the pipelines of the first and second view (:class:`ViewAugment`; None = the
    paper's pair above; in YAML a mapping of its fields, keys left out keep the paper's values).

    The target is a :func:`~reprlab.ssl.momentum.momentum_copy` of the online encoder and projector: registered
    submodules (so in ``state_dict`` and the checkpoint) whose parameters never require a gradient (so in no
    optimizer group). It runs in train mode, with the batch statistics of its own input, as BYOL's does. Under DDP
    the loop converts the whole task to SyncBatchNorm, target included: both sides keep the same layer types, so
    :func:`~reprlab.ssl.momentum.update_momentum` applies unchanged, and the target normalizes over the global
    batch as the paper's cross-replica BatchNorm does.

    Each view goes through the networks on its own (BatchNorm sees one view at a time, as in the reference).
    ``forward(batch)`` makes the two views and returns ``forward_views(views)``.
    """

    def __init__(self, encoder: Encoder, augment: ViewAugment | None = BYOL_AUGMENT,
                 augment2: ViewAugment | None = BYOL_AUGMENT2, projection_dim: int = 256, hidden_dim: int = 4096,
                 base_momentum: float = 0.996, final_momentum: float = 1.0) -> None:
        super().__init__()
        if not (0.0 <= base_momentum <= 1.0 and 0.0 <= final_momentum <= 1.0):
            raise ValueError(f"base_momentum and final_momentum must be in [0, 1], got {base_momentum} and "
                             f"{final_momentum}")
        self.encoder = encoder
        self.augment = augment if augment is not None else BYOL_AUGMENT
        self.augment2 = augment2 if augment2 is not None else BYOL_AUGMENT2
        self.projector = projection_head(encoder.feature_dim, hidden_dim, projection_dim, num_layers=2,
                                         output_bn=False)
        self.predictor = projection_head(projection_dim, hidden_dim, projection_dim, num_layers=2, output_bn=False)
        self.target_encoder = momentum_copy(encoder)
        self.target_projector = momentum_copy(self.projector)
        self.base_momentum, self.final_momentum = base_momentum, final_momentum

    def forward_views(self, views: list[Tensor]) -> dict[str, Tensor]:
        """BYOL's symmetric loss of two already-augmented float views, each (B, C, H, W)."""
        check_two_views(views, "BYOL")
        p0, p1 = (self.predictor(self.projector(self.encoder(view))) for view in views)  # (B, P) each
        with torch.no_grad():
            z0, z1 = (self.target_projector(self.target_encoder(view)) for view in views)  # (B, P), constants
        return {"loss": normalized_mse_loss(p0, z1) + normalized_mse_loss(p1, z0)}

    def momentum_at(self, step: int, total_steps: int) -> float:
        """The target momentum of the update after global step ``step`` (1-based): BYOL's tau(k) with k = step - 1
        steps done before it (its code evaluates the schedule at the pre-increment step), so the first update uses
        ``base_momentum`` and the schedule reaches ``final_momentum`` at k = total_steps."""
        return cosine_momentum(step - 1, total_steps, self.base_momentum, self.final_momentum)

    def after_step(self, step: int, total_steps: int) -> None:
        """target = m * target + (1 - m) * online for the encoder and the projector (parameters; BatchNorm
        statistics stay the target's own)."""
        momentum = self.momentum_at(step, total_steps)
        update_momentum(self.encoder, self.target_encoder, momentum)
        update_momentum(self.projector, self.target_projector, momentum)
