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

from reprlab.config import PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
README_BENCHMARKS = ("quality", "pretrain", "augment", "extract", "knn", "finetune")


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
    assert all(option in options for option in ("--configs", "--compile", "--ablate", "--scaling", "--quality-check"))


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
              "--out", str(out))
    result = json.loads(out.read_text().splitlines()[-1])
    parts = {(row["framework"], row["config"], row["part"]) for row in result["results"]}
    assert {("reprlab", "any", "augment"), ("reprlab", "fp32", "model"), ("reprlab", "fp32", "e2e")} <= parts
    if importlib.util.find_spec("lightly") is not None:  # a benchmark-only extra
        assert {("lightly", "fp32", "model"), ("lightly", "workers=0", "e2e")} <= parts
        assert {"augment any", "model fp32", "e2e fp32"} <= set(result["ratios"])


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
    assert result["overrides"] == ["method.params.hidden_dim=64"]
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
