"""The three stages chained through files on disk, run as a user would run them (scripts + YAML)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.limit=300", "train.epochs=1", "train.batch_size=64", "train.progress=false"]


def run(script, *args, cwd=ROOT):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"{script} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.mark.slow
def test_pretrain_finetune_evaluate_on_digits(tmp_path):
    runs = tmp_path / "runs"
    run("pretrain.py", "--config", "configs/pretrain/simclr_digits.yaml", f"out_dir={runs}", "name=ssl",
        "monitor.every_epochs=1", *TINY)
    ssl_dir = runs / "ssl"
    for name in ("config.yaml", "encoder.safetensors", "meta.json", "metrics.jsonl", "state.pt"):
        assert (ssl_dir / name).is_file(), name
    meta = json.loads((ssl_dir / "meta.json").read_text())
    assert meta["method"] == "simclr" and meta["feature_dim"] == 512 and "torch" in meta["versions"]
    epoch_end = [json.loads(line) for line in (ssl_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"knn_top1", "embedding_std", "effective_rank"} <= set(epoch_end)

    run("finetune.py", "--config", "configs/finetune/linear_probe_digits.yaml", f"encoder={ssl_dir}",
        f"out_dir={runs}", "name=probe", *TINY)
    metrics = json.loads((runs / "probe" / "metrics.json").read_text())
    assert 0 <= metrics["test_top1"] <= 1 and 0 <= metrics["val_top1"] <= 1

    import reprlab

    classifier = reprlab.load_classifier(runs / "probe")
    probs = classifier.predict_proba(torch.rand(4, 1, 8, 8))
    assert probs.shape == (4, 10) and torch.allclose(probs.sum(1), torch.ones(4))
    assert classifier.classes == [str(i) for i in range(10)]

    run("evaluate.py", "--config", "configs/eval/digits.yaml", f"encoders=[{ssl_dir}, random, pixels]",
        f"out_dir={runs}", "name=eval", "data.limit=300")
    results = json.loads((runs / "eval" / "metrics.json").read_text())["encoders"]
    assert set(results) == {"ssl", "random resnet18", "pixels"}
    for metrics in results.values():
        assert 0 < metrics["knn_top1"] <= 1 and 0 < metrics["linear_probe_top1"] <= 1


def test_bad_config_key_exits_with_a_message(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"), "optim.learnin_rate=1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown key 'optim.learnin_rate'" in out.stderr and "'lr'" in out.stderr
