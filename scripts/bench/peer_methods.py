"""lightly's twin of each reprlab pretraining method, for side-by-side benchmarks: :data:`LIGHTLY_TWINS`. The
momentum methods' twins are in bench.peer_momentum, the parts every twin is built from in bench.peer_parts.

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
- ``loss_scale`` (bench.peers.LightlyTwin): where reprlab's loss has another scale than lightly's, the twin's
  loss is multiplied by the ratio, so both take the same gradients and, with reprlab's optimizer, the same updates
  (BYOL: reprlab's summed normalized MSE is 4x lightly's halved negative cosine, up to a constant; Barlow Twins:
  reprlab's ``loss_scale``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from bench.peer_momentum import LightlyBYOL, LightlyDINO, LightlyMoCoV2, LightlyMoCoV3
from bench.peer_parts import TwinSpec, features, mlp
from bench.peer_transforms import one_pipeline_transform, two_pipeline_transform
from bench.peers import LightlyTwin, PairTwin, build_lightly_simclr, lightly_transform


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
        z0, z1 = (self.projection_head(features(self.backbone, x)) for x in views)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        return 0.5 * (self.criterion(z0.detach(), p1) + self.criterion(z1.detach(), p0))



class LightlyPair(LightlyTwin):
    """A backbone + projection head and a loss on the two views' projections (Barlow Twins, VICReg)."""

    def __init__(self, spec: TwinSpec, projection_head: nn.Module, criterion: nn.Module,
                 loss_scale: float = 1.0) -> None:
        super().__init__()
        self.backbone, self.projection_head, self.criterion = spec.backbone, projection_head, criterion
        self.loss_scale = loss_scale
        ref = spec.reference
        self.transform = two_pipeline_transform(ref.augment, ref.augment2, spec.size, spec.normalize)

    def training_loss(self, views: list[Tensor], step: int) -> Tensor:
        z0, z1 = (self.projection_head(features(self.backbone, x)) for x in views)
        return self.criterion(z0, z1)


def build_barlow_twins(spec: TwinSpec) -> LightlyTwin:
    """examples/pytorch/barlowtwins.py: ``BarlowTwinsProjectionHead`` (3 layers; another ``num_layers`` as a
    ``ProjectionHead`` of the same blocks), ``BarlowTwinsLoss(lambda_param)``, ``BYOLTransform`` with reprlab's
    pipelines; reprlab's ``loss_scale`` as the twin's."""
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead

    s, ref = spec.settings, spec.reference
    if s["num_layers"] == 3:
        head = BarlowTwinsProjectionHead(spec.feature_dim, s["hidden_dim"], s["projection_dim"])
    else:
        dims = [spec.feature_dim] + [s["hidden_dim"]] * (s["num_layers"] - 1)
        head = mlp([*[(i, o, True, nn.ReLU()) for i, o in zip(dims, dims[1:])],
                    (dims[-1], s["projection_dim"], False, None)])
    return LightlyPair(spec, head, BarlowTwinsLoss(lambda_param=ref.lambda_offdiag), loss_scale=ref.loss_scale)


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
