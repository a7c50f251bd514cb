"""Barlow Twins and VICReg as methods (reprlab.ssl.barlow_twins, reprlab.ssl.vicreg): the papers' defaults, the
projector, forward = BYOL's two views then the loss of the projections, and at method level 2 gloo ranks with
half of the batch each == 1 process with all of it (loss and every gradient, SyncBatchNorm in the encoder and
the projector), with ``gather_distributed=False`` as the control that differs. DINO joins the 2-rank run (its
teacher under SyncBatchNorm, the centre over the global batch), since the spawn is the expensive part.

float64 throughout, as tests/test_distributed_losses.py (whose loss-level tests these extend): the runs differ
only in summation order. Gradients are averaged by an all-reduce, DDP's rule, without the wrapper.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import Tensor, nn

from reprlab import distributed
from reprlab.data.views import ViewAugment
from reprlab.models.encoders import Encoder, create_encoder
from reprlab.ssl import METHODS, build_method
from reprlab.ssl.byol import BYOL_AUGMENT, BYOL_AUGMENT2
from reprlab.ssl.losses import barlow_twins_loss, vicreg_terms
from tests.gloo import run_on_ranks

WORLD = 2
GLOBAL_BATCH = 8
RTOL, ATOL = 1e-9, 1e-12
CPU = torch.device("cpu")
SMALL = {"projection_dim": 12, "hidden_dim": 10}
METHOD_NAMES = ("barlow_twins", "vicreg", "dino")


def tiny_method(name: str, seed: int = 0, **params) -> nn.Module:
    """A Conv-BN-ReLU encoder and the method's head (BatchNorm in both, except DINO's head), float64."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    encoder = Encoder(backbone, 6, {"name": "tiny", "kwargs": {}})
    if name == "dino":
        params = {"out_dim": 7, "hidden_dim": 10, "bottleneck_dim": 5, "teacher_temperature_warmup": 0.0, **params}
    else:
        params = {**SMALL, **params}
    return build_method(name, encoder, params).double().train()


def fixed_views(name: str) -> list[Tensor]:
    generator = torch.Generator().manual_seed(1)
    sizes = [6, 6, 4, 4] if name == "dino" else [6, 6]  # DINO: 2 global crops, 2 local crops
    return [torch.rand(GLOBAL_BATCH, 3, s, s, generator=generator, dtype=torch.float64) for s in sizes]


def grads(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------- defaults, shapes


def test_defaults_are_the_papers():
    barlow = inspect.signature(METHODS["barlow_twins"]).parameters
    assert {k: barlow[k].default for k in ("projection_dim", "hidden_dim", "num_layers", "lambda_offdiag",
                                           "loss_scale")} == {"projection_dim": 8192, "hidden_dim": 8192,
                                                              "num_layers": 3, "lambda_offdiag": 5e-3,
                                                              "loss_scale": 1.0}
    vicreg = inspect.signature(METHODS["vicreg"]).parameters
    assert {k: vicreg[k].default for k in ("projection_dim", "hidden_dim", "num_layers", "invariance_weight",
                                           "variance_weight", "covariance_weight")} == {
        "projection_dim": 8192, "hidden_dim": 8192, "num_layers": 3, "invariance_weight": 25.0,
        "variance_weight": 25.0, "covariance_weight": 1.0}
    for parameters in (barlow, vicreg):  # both papers use BYOL's asymmetric pair of pipelines
        assert parameters["augment"].default == BYOL_AUGMENT and parameters["augment2"].default == BYOL_AUGMENT2
        assert parameters["gather_distributed"].default is True


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_projector_has_batchnorm_after_the_hidden_layers_only(name):
    method = build_method(name, create_encoder("timm:test_resnet"), SMALL)
    kinds = [type(m).__name__ for m in method.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert method.projector[-1].out_features == 12 and method.projector[0].out_features == 10
    yaml_like = build_method(name, create_encoder("timm:test_resnet"), {**SMALL, "augment2": {"solarize_p": 0.5}})
    assert yaml_like.augment2 == ViewAugment(jitter_strength=0.5, blur_p=0.1, solarize_p=0.5)  # keeps BYOL's rest


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_forward_is_two_views_then_the_loss_of_their_projections(name):
    method = tiny_method(name).float()
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    out = method({"images": images})
    torch.manual_seed(3)  # the same draws: the first pipeline, then the second
    views = [method.augment(images), method.augment2(images)]
    z0, z1 = (method.projector(method.encoder(v)) for v in views)  # each view on its own
    if name == "barlow_twins":
        assert torch.allclose(out["loss"], barlow_twins_loss(z0, z1, 5e-3), rtol=1e-6)
    else:
        terms = vicreg_terms(z0, z1)
        assert all(torch.allclose(out[k], t, rtol=1e-6) for k, t in zip(("invariance", "variance", "covariance"),
                                                                         terms))
        assert torch.allclose(out["loss"], 25 * terms[0] + 25 * terms[1] + terms[2], rtol=1e-6)
    out["loss"].backward()
    assert method.encoder.backbone[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exactly 2 views per image, got 3"):
        method.forward_views(views + views[:1])


def test_errors_name_the_parameter():
    encoder = create_encoder("timm:test_resnet")
    with pytest.raises(ValueError, match="need lambda_offdiag >= 0 and loss_scale > 0"):
        build_method("barlow_twins", encoder, {**SMALL, "loss_scale": 0})
    with pytest.raises(ValueError, match="VICReg's weights must be >= 0, got variance_weight=-1"):
        build_method("vicreg", encoder, {**SMALL, "variance_weight": -1})


# --------------------------------------------------------------------------------------------- 2 ranks


def _worker(rank: int) -> dict:
    n = GLOBAL_BATCH // WORLD
    local = slice(rank * n, (rank + 1) * n)
    out: dict = {}
    for name in METHOD_NAMES:
        for gather in (True, False):
            if name == "dino" and not gather:
                continue  # DINO's loss is a per-sample mean: nothing to gather
            params = {} if name == "dino" else {"gather_distributed": gather}
            method = distributed.convert_sync_batchnorm(tiny_method(name, **params), CPU)
            result = method.forward_views([v[local] for v in fixed_views(name)])
            result["loss"].backward()
            for p in method.parameters():  # DDP's rule: every gradient becomes its mean over the ranks
                if p.grad is not None:
                    p.grad = distributed.all_reduce_mean(p.grad)
            entry = {"loss": distributed.all_reduce_mean(result["loss"].detach()), "grads": grads(method)}
            if name == "dino":
                entry["center"] = method.center.clone()
            out[f"{name}/{gather}"] = entry
    return out


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_methods")
    return run_on_ranks(_worker, out, world=WORLD)


def reference(name: str) -> dict:
    """One process, the whole batch, no SyncBatchNorm."""
    method = tiny_method(name)
    result = method.forward_views(fixed_views(name))
    result["loss"].backward()
    return {"loss": result["loss"].detach(), "grads": grads(method), "center": method.center.clone()
            if name == "dino" else None}


def close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_two_ranks_equal_one_process_loss_and_every_gradient(ddp_results, name):
    ref = reference(name)
    assert ref["grads"]["encoder.backbone.0.weight"].abs().sum() > 0
    for rank_result in ddp_results:
        got = rank_result[f"{name}/True"]
        assert close(got["loss"], ref["loss"]), (got["loss"], ref["loss"])
        assert got["grads"].keys() == ref["grads"].keys()
        for key, grad in ref["grads"].items():
            assert close(got["grads"][key], grad), (key, (got["grads"][key] - grad).abs().max())
        if name == "dino":  # the EMA of the teacher's mean over the global batch, the same on every rank
            assert close(got["center"], ref["center"])


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_the_equivalence_test_can_fail(ddp_results, name):
    """With ``gather_distributed=False`` the statistics are each rank's own: another loss, other gradients."""
    ref = reference(name)
    per_rank = ddp_results[0][f"{name}/False"]
    assert not close(per_rank["loss"], ref["loss"])
    assert not all(close(per_rank["grads"][k], g) for k, g in ref["grads"].items())
