"""The benchmark commands the README quotes run end to end at toy sizes and write their JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reprlab.config import PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def benchmark(*args: str) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"benchmark.py {args[0]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


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
