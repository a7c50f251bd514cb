"""The benchmark commands the README quotes run end to end at toy sizes and write their JSON line."""

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from reprlab.config import PretrainConfig, load_config
from reprlab.hardware import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
README_BENCHMARKS = ("quality", "pretrain", "augment", "extract", "knn", "finetune", "convs")
LIGHTLY = importlib.util.find_spec("lightly") is not None


def benchmark(*args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"benchmark.py {args[0]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def test_help_lists_every_benchmark_with_a_description():
    listing = benchmark("--help")
    for name in README_BENCHMARKS:
        assert re.search(rf"^ +{name} +\w", listing, re.MULTILINE), f"{name} not listed with a description"
    options = benchmark("pretrain", "--help")
    assert all(option in options for option in ("--configs", "--method", "--compile", "--ablate", "--scaling",
                                                 "--quality-check"))


def test_the_auto_config_runs_as_the_engine_resolves_it(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench.speed_setup import resolved

    from reprlab import hardware
    from reprlab.models.encoders import create_encoder

    encoder, cpu = create_encoder("resnet18"), torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert resolved("auto", cpu, encoder) == ("bf16", True)
    assert resolved("fp32", cpu, encoder) == ("fp32", False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert resolved("auto", cpu, encoder) == ("fp32", False)


def test_model_step_trains_the_method_on_ready_views(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench.common import throughput
    from bench.speed_setup import build_reprlab, load_images, make_views, model_step

    args = argparse.Namespace(seed=0, encoder="resnet18", cifar_stem=False, device="cpu", batch_size=4)
    method, optimizer, scheduler = build_reprlab(args)
    data = load_images("random", limit=8, seed=0, image_size=16)
    views = make_views(method.augment, data, 4, torch.device("cpu"), seed=0)  # [(4, 3, 16, 16)] * 2
    received = []
    forward_views = method.forward_views
    monkeypatch.setattr(method, "forward_views", lambda v: received.append(v) or forward_views(v))
    monkeypatch.setattr(method, "augment", None)  # the timed step must not augment
    before = [p.detach().clone() for p in method.parameters()]
    step = model_step(method, optimizer, scheduler, views, "fp32", torch.device("cpu"))
    stats = throughput(step, 4, warmup=1, steps=1, repeats=1)
    assert stats["median"] > 0 and len(received) == 2 and all(v is views for v in received)
    assert torch.isfinite(step())
    assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters()))  # the optimizer stepped


@pytest.mark.slow
def test_pretrain_benchmark_times_each_part_on_both_sides(tmp_path):
    out = tmp_path / "pretrain.jsonl"
    benchmark("pretrain", "--data", "random", "--limit", "64", "--batch-size", "8", "--image-size", "16",
              "--warmup", "1", "--steps", "1", "--repeats", "1", "--workers", "0", "--configs", "fp32",
              "--method", "simclr", "dino", "--out", str(out))  # DINO: multi-crop and a momentum teacher
    result = json.loads(out.read_text().splitlines()[-1])
    for method in ("simclr", "dino"):
        parts = {(row["framework"], row["config"], row["part"]) for row in result["results"] if row["method"] == method}
        assert {("reprlab", "any", "augment"), ("reprlab", "fp32", "model"), ("reprlab", "fp32", "e2e")} <= parts
        if LIGHTLY:  # a benchmark-only extra
            assert {("lightly", "fp32", "model"), ("lightly", "workers=0", "e2e")} <= parts
            prefix = "" if method == "simclr" else f"{method} "  # SimCLR keeps the keys of earlier records
            assert {f"{prefix}augment any", f"{prefix}model fp32", f"{prefix}e2e fp32"} <= set(result["ratios"])


@pytest.mark.slow
def test_knn_benchmark_agrees_across_backends(tmp_path):
    out = tmp_path / "knn.jsonl"
    benchmark("knn", "--bank", "2000", "--queries", "300", "--dim", "32", "--k", "20", "--repeats", "1",
              "--methods", "reprlab", "reprlab-torch", "torch", "--out", str(out))
    result = json.loads(out.read_text().splitlines()[-1])
    methods = result["comparison"]["methods"]
    assert set(methods) == {"reprlab", "reprlab-torch", "torch"}
    for name, row in methods.items():  # faiss heaps, torch top-k and the plain reference vote alike
        assert row["agreement_vs_reprlab"] == 1.0, name


@pytest.mark.slow
@pytest.mark.skipif(not (CIFAR / "train.npz").exists(), reason=f"CIFAR-10 npz not found at {CIFAR}")
def test_quality_benchmark_uses_each_method_config_batch_and_overrides(tmp_path):
    out = tmp_path / "quality.jsonl"
    benchmark("quality", "--epochs", "1", "--limit", "600", "--eval-limit", "600", "--test-limit", "200",
              "--methods", "rotation", "relative_position", "--no-lightly", "--workdir", str(tmp_path / "runs"),
              "--out", str(out), "--set", "method.params.hidden_dim=64")
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["overrides"] == ["method.params.hidden_dim=64"] and result["precision"] == "fp32"
    rows = {row["label"]: row for row in result["rows"]}
    assert set(rows) == {"random resnet18", "pixels", "reprlab rotation", "reprlab relative_position",
                         "random resnet18, patch-pooled as relative_position"}
    pooled = rows["random resnet18, patch-pooled as relative_position"]  # untrained, embedded as relpos embeds
    assert pooled["wall_s"] is None and pooled["details"]["patch_pooling"]["grid"] == 3
    assert pooled["metrics"] != rows["random resnet18"]["metrics"]
    for method in ("rotation", "relative_position"):  # each method at its own config's batch size
        cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / f"{method}_cifar10.yaml")
        assert rows[f"reprlab {method}"]["details"]["batch_size"] == cfg.train.batch_size
        assert rows[f"reprlab {method}"]["details"]["params"]["hidden_dim"] == 64  # --set reached every method
    for row in rows.values():
        assert 0 <= row["metrics"]["knn_top1"] <= 1 and 0 <= row["metrics"]["linear_probe_top1"] <= 1


# --------------------------------------------------------------------------------------------- lightly twins

TWIN_METHODS = ("simclr", "byol", "simsiam", "moco_v2", "moco_v3", "dino", "barlow_twins", "vicreg")
SHRINK = {"hidden_dim": 32, "projection_dim": 16, "out_dim": 32, "bottleneck_dim": 8, "predictor_hidden_dim": 8,
          "queue_size": 32}  # the method parameters that set widths, at toy sizes


def build_twin(method: str, overrides: dict | None = None, total_steps: int = 4):
    """A method's CIFAR-10 config at toy widths (plus ``overrides``) -> (its config, lightly's twin of it, the
    encoder the twin trains)."""
    from bench import peer_methods, peer_parts

    from reprlab.models.encoders import create_encoder
    from reprlab.ssl import build_method

    cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / f"{method}_cifar10.yaml")
    defaults = peer_parts.method_settings(method, {})
    params = {**cfg.method.params, **{k: v for k, v in SHRINK.items() if k in defaults}, **(overrides or {})}
    torch.manual_seed(0)
    encoder = create_encoder("timm:test_resnet")
    reference = build_method(method, encoder, params)
    spec = peer_parts.TwinSpec(encoder, encoder.feature_dim, peer_parts.method_settings(method, params),
                               reference, 16, False, total_steps)
    return cfg, peer_methods.build_twin(method, spec), encoder


@pytest.mark.skipif(not LIGHTLY, reason="lightly (a benchmark-only extra) is not installed")
@pytest.mark.parametrize("method", TWIN_METHODS)
def test_each_lightly_twin_builds_and_takes_finite_steps(method, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench import peer_methods, peer_parts, peers

    from reprlab.optim import build_optimization

    assert set(peer_methods.LIGHTLY_TWINS) == set(TWIN_METHODS)
    local = {"augment": {"num_local": 2, "global1": {"blur_p": 0.0}, "global2": {"blur_p": 0.0},
                         "local": {"size": 8, "blur_p": 0.0}}} if method == "dino" else {}
    cfg, twin, trained = build_twin(method, local)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = peers.per_sample_loader(peers.PerSampleViews(images, None, twin.transform), 4, 0, seed=0)
    optimizer, scheduler = build_optimization(cfg.optim, twin, 4, len(loader), 1)
    step = peers.twin_step(twin, optimizer, torch.device("cpu"), scheduler)
    before = {name: p.detach().clone() for name, p in twin.named_parameters()}
    twin.train()
    batches = [views for views, _ in loader]  # 2 batches
    losses = [step(*views) for views in batches]
    assert len(losses) == 2 and all(torch.isfinite(loss) for loss in losses)
    local_crops = [(4, 3, 8, 8)] * 2 if method == "dino" else []
    assert [tuple(v.shape) for v in batches[0]] == [(4, 3, 16, 16)] * 2 + local_crops
    params = dict(twin.named_parameters())
    assert any(not torch.equal(before[n], p) for n, p in params.items() if p.requires_grad)  # the optimizer stepped
    momentum = [n for n, p in params.items() if not p.requires_grad and ("momentum" in n or "teacher" in n)]
    assert bool(momentum) == (method in ("byol", "moco_v2", "moco_v3", "dino"))
    if momentum:  # the momentum network moved towards the trained one
        assert any(not torch.equal(before[n], params[n]) for n in momentum)
    encoder = twin.evaluated_encoder().eval()
    assert encoder is (twin.teacher_backbone if method == "dino" else trained)  # DINO: the teacher, as reprlab
    assert torch.isfinite(encoder(images[:2].float() / 255)).all()


@pytest.mark.skipif(not LIGHTLY, reason="lightly (a benchmark-only extra) is not installed")
def test_moco_v2_twin_with_split_bn_uses_lightlys_split_batchnorm_and_shuffles_the_keys(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import lightly.models.utils
    from lightly.models.batchnorm import SplitBatchNorm

    _, twin, trained = build_twin("moco_v2", {"split_bn": 2})
    for network in (twin.backbone, twin.backbone_momentum):
        norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and all(type(m) is SplitBatchNorm and m.num_splits == 2 for m in norms)
    shuffles = []
    real = lightly.models.utils.batch_shuffle
    monkeypatch.setattr(lightly.models.utils, "batch_shuffle", lambda x: shuffles.append(x) or real(x))
    views = [torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)]
    twin.train()
    assert torch.isfinite(twin.training_loss(views, 0))
    assert len(shuffles) == 2  # symmetric: each key view once, the queries unshuffled
    assert twin.evaluated_encoder() is trained


@pytest.mark.skipif(not LIGHTLY, reason="lightly (a benchmark-only extra) is not installed")
def test_lightly_twins_refuse_settings_lightly_cannot_express(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    with pytest.raises(ValueError, match=r"crop_scale is \(0.2, 0.9\)"):
        build_twin("simsiam", {"augment": {"crop_scale": [0.2, 0.9], "blur_p": 0.0}})
    with pytest.raises(ValueError, match="SimSiamTransform does not solarize"):
        build_twin("simsiam", {"augment": {"solarize_p": 0.2, "blur_p": 0.0}})
    with pytest.raises(ValueError, match="solarizes only the second global crop"):
        build_twin("dino", {"augment": {"global1": {"solarize_p": 0.2}, "local": {"size": 8}}})
    with pytest.raises(ValueError, match="one grayscale_p for every crop"):
        build_twin("dino", {"augment": {"local": {"size": 8, "grayscale_p": 0.5}}})


def test_moco_v3_twin_loss_is_reprlabs_moco_v3_loss_not_nt_xent(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench.peer_momentum import moco_v3_ctr

    from reprlab.ssl.losses import moco_v3_loss, nt_xent_loss

    q, k = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0)).double().unbind()
    assert torch.allclose(moco_v3_ctr(q, k, 0.2), moco_v3_loss(q, k, 0.2, gather=False))
    nt_xent = nt_xent_loss(q, k, 0.2, gather=False) * 0.4  # SimCLR's loss also contrasts queries with queries
    assert abs(float(moco_v3_ctr(q, k, 0.2)) - float(nt_xent)) > 1e-3


def test_twin_loss_scale_gives_reprlabs_updates_under_lars_with_unadapted_bias_and_bn(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench import peers

    from reprlab.config import OptimConfig
    from reprlab.optim import build_optimization

    class Twin(peers.LightlyTwin):  # lightly's loss is 1 / scale of reprlab's
        def __init__(self, scale: float, loss_scale: float) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
            self.scale, self.loss_scale = scale, loss_scale

        def training_loss(self, views, step):
            return self.net(views[0]).pow(2).mean() / self.scale

    optim = OptimConfig(name="lars", lr=0.3, weight_decay=1e-4, warmup_epochs=0)  # excludes bias and BN
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    params = []
    for twin in (Twin(1.0, 1.0), Twin(4.0, 4.0), Twin(4.0, 1.0)):
        optimizer, scheduler = build_optimization(optim, twin, 8, 3, 1)
        step = peers.twin_step(twin, optimizer, torch.device("cpu"), scheduler)
        for _ in range(3):
            step(x)
        params.append(torch.cat([p.detach().flatten() for p in twin.parameters()]))
    reprlab, scaled, unscaled = params
    assert torch.allclose(scaled, reprlab, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(unscaled, reprlab, rtol=1e-4, atol=1e-6)  # the bias and BN steps differ without it


@pytest.mark.slow
@pytest.mark.skipif(not LIGHTLY, reason="lightly (a benchmark-only extra) is not installed")
def test_quality_benchmark_trains_the_lightly_twin_after_its_method(tmp_path):
    out = tmp_path / "quality.jsonl"  # digits (sklearn, 8 px) and a tiny encoder: half a minute
    benchmark("quality", "--methods", "simsiam", "--epochs", "1", "--limit", "64", "--eval-limit", "200",
              "--test-limit", "100", "--batch-size", "32", "--encoder", "timm:test_resnet", "--data", "digits",
              "--lightly-workers", "0", "--workdir", str(tmp_path / "runs"), "--out", str(out),
              "--set", "method.params.hidden_dim=32", "method.params.projection_dim=16",
              "method.params.predictor_hidden_dim=8")
    result = json.loads(out.read_text().splitlines()[-1])
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["random timm:test_resnet", "pixels", "reprlab simsiam", "lightly simsiam"]
    lightly = result["rows"][-1]
    assert lightly["details"]["twin"] == "LightlySimSiam" and lightly["details"]["batch_size"] == 32
    assert lightly["wall_s"] > 0 and "| lightly simsiam | 32 | 1 |" in result["table"]
    for row in result["rows"]:
        assert row["metrics"]["test_effective_rank"] >= 1 and row["metrics"]["test_embedding_std"] > 0


def test_quality_table_shows_mean_and_std_over_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench.quality_table import format_table, summarize_rows

    def row(label, seed, knn, wall):
        metrics = {"knn_top1": knn, "knn20_top1": knn, "linear_probe_top1": knn, "test_effective_rank": 10.0 * seed,
                   "test_embedding_std": 0.01}
        return {"label": label, "seed": seed, "wall_s": wall, "metrics": metrics, "details": {"batch_size": 256}}

    rows = [row("reprlab byol", 0, 0.50, 60), row("lightly byol", 0, 0.40, 120), row("reprlab byol", 1, 0.52, 180)]
    summary = {entry["label"]: entry for entry in summarize_rows(rows)}
    assert summary["reprlab byol"]["knn_top1"]["mean"] == pytest.approx(0.51)
    assert summary["reprlab byol"]["knn_top1"]["std"] == pytest.approx(0.02 / 2 ** 0.5)  # sample std
    assert summary["lightly byol"]["knn_top1"]["std"] is None
    lines = format_table(rows).splitlines()
    assert lines[2].startswith("| reprlab byol | 256 | 2 | 51.00 ± 1.41 |") and "2.0 ± 1.4 min" in lines[2]
    assert lines[3].startswith("| lightly byol | 256 | 1 | 40.00 |") and lines[3].endswith("| 2.0 min |")


def test_a_diverged_run_is_named_in_the_table_and_not_scored(monkeypatch):
    """Non-finite features (a run that diverged) give no scores instead of stopping the whole benchmark."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench.quality import score
    from bench.quality_table import format_table

    from reprlab.data.datasets import ImageSet

    class NaNEncoder(torch.nn.Module):
        def forward(self, images):
            return torch.full((images.shape[0], 4), float("nan"))

    split = ImageSet(torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.arange(8) % 2, ["a", "b"])
    splits = {"train": split, "val": split, "test": split}
    assert score(NaNEncoder(), splits, torch.device("cpu"), seed=0) == {"non_finite_features": True}
    ok = {"knn_top1": 0.5, "knn20_top1": 0.5, "linear_probe_top1": 0.5, "test_effective_rank": 2.0,
          "test_embedding_std": 0.1}
    rows = [{"label": "lightly dino", "seed": 0, "wall_s": 60, "metrics": {"non_finite_features": True}},
            {"label": "lightly dino", "seed": 1, "wall_s": 60, "metrics": ok}]
    line = format_table(rows).splitlines()[2]
    assert line.startswith("| lightly dino (diverged: non-finite features in 1 of 2 seeds) | - | 2 | 50.00 |")


def test_convs_benchmark_times_every_conv_of_the_encoder(tmp_path):
    out = tmp_path / "convs.jsonl"
    benchmark("convs", "--conv-batch", "4", "--repeats", "1", "--out", str(out))
    result = json.loads(out.read_text().splitlines()[-1])
    assert len(result["rows"]) == 20  # ResNet-18: stem, 16 in the blocks, 3 downsamples
    assert abs(sum(r["flops_share"] for r in result["rows"]) - 1) < 1e-9
    amx = "amx_bf16" in cpu_flags()
    assert [r["small_map"] for r in result["rows"]].count(True) == (10 if amx else 5)  # 32 px: stages 3-4 / 4
