"""The distill benchmark (teacher -> student vs SimCLR at equal training time) and the fine-tuning benchmark's
LoRA row, end to end at toy sizes on a synthetic npz dataset (no CIFAR-10 needed)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reprlab.checkpoint import CheckpointError, save_encoder
from reprlab.models.encoders import create_encoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_npz(tmp_path_factory) -> Path:
    """192 train / 64 test RGB 32x32 images in 4 classes (a colour per class plus noise)."""
    folder = tmp_path_factory.mktemp("toy_npz")
    rng = np.random.default_rng(0)
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]])
    for split, n in (("train", 192), ("test", 64)):
        labels = np.arange(n) % 4
        images = colours[labels][:, None, None, :] + rng.normal(0, 60, (n, 32, 32, 3))
        np.savez(folder / f"{split}.npz", images=np.clip(images, 0, 255).astype(np.uint8), labels=labels)
    return folder


def parse(monkeypatch, *argv: str):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from benchmark import build_parser

    return build_parser().parse_args(list(argv))


def test_matching_epochs_rounds_to_the_closest_budget(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench.distill import matching_epochs

    assert matching_epochs(100.0, 30.0) == 3  # 90 s is closer to 100 than 120
    assert matching_epochs(106.0, 30.0) == 4
    assert matching_epochs(5.0, 30.0) == 1  # never zero epochs
    with pytest.raises(ValueError, match="positive"):
        matching_epochs(100.0, 0.0)


def test_distill_benchmark_trains_scores_and_matches_the_budget(tmp_path, toy_npz, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # main() moves to the repo root; restored afterwards
    out = tmp_path / "results.jsonl"
    args = parse(monkeypatch, "distill", "--data", f"npz:{toy_npz}", "--teacher-encoder", "timm:test_resnet",
                 "--student", "timm:test_resnet", "--teacher-epochs", "1", "--student-epochs", "1",
                 "--batch-size", "32", "--calibration-images", "192", "--workdir", str(tmp_path / "runs"),
                 "--out", str(out), "--device", "cpu")
    from bench import distill

    assert distill.main(args) == 0
    record = json.loads(out.read_text().splitlines()[-1])
    labels = [row["label"] for row in record["rows"]]
    assert labels == ["teacher timm:test_resnet", "student timm:test_resnet, distilled",
                      "student timm:test_resnet, SimCLR", "student timm:test_resnet, random init"]
    teacher, distilled, simclr, random = record["rows"]
    assert teacher["run"]["method"] == "simclr" and distilled["run"]["method"] == "distill"
    assert simclr["run"]["method"] == "simclr" and "run" not in random
    assert record["calibration"]["budget_s"] == distilled["train_s"] > 0  # the budget is distill's training time
    assert simclr["run"]["epochs"] == record["simclr_epochs"] == record["calibration"]["epochs"] >= 1
    distill_config = (Path(distilled["run"]["run_dir"]) / "config.yaml").read_text()
    assert teacher["run"]["run_dir"] in distill_config  # the student learned from the teacher trained here
    for row in record["rows"]:
        assert 0 <= row["metrics"]["knn_top1"] <= 1 and 0 <= row["metrics"]["linear_probe_top1"] <= 1
    assert record["environment"]["processor"] == record["processor"]
    table = capsys.readouterr().out
    assert table.count("| student timm:test_resnet") == 3 and "| teacher timm:test_resnet |" in table


def test_distill_benchmark_refuses_a_teacher_that_is_not_a_run(tmp_path, toy_npz, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse(monkeypatch, "distill", "--data", f"npz:{toy_npz}", "--teacher", str(tmp_path),
                 "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out.jsonl"), "--device", "cpu")
    from bench import distill

    with pytest.raises(CheckpointError, match="not a run directory"):
        distill.main(args)
    assert not (tmp_path / "runs").exists()  # refused before any training


def test_finetune_lora_row_trains_under_5_percent_of_a_small_vit(tmp_path, toy_npz, monkeypatch):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    vit = create_encoder("timm:vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)  # embed 192
    save_encoder(tmp_path / "vit", vit, {"method": "none"})
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "finetune.jsonl"
    args = parse(monkeypatch, "finetune", "--encoder", str(tmp_path / "vit"), "--data", f"npz:{toy_npz}",
                 "--rows", "lora", "full", "linear_probe", "--fractions", "0.5", "--epochs", "1", "--seeds", "0",
                 "--batch-size", "32", "--val-fraction", "0.1", "--device", "cpu",
                 "--out-dir", str(tmp_path / "ft"), "--out", str(out), "--set", "optim.lr=2.5e-4")
    from bench import finetune

    assert finetune.main(args) == 0
    record = json.loads(out.read_text().splitlines()[-1])
    cells = {cell["row"]: cell for cell in record["cells"]}
    for row in ("lora", "full", "linear_probe"):  # --set reaches every row's config, and the record says so
        assert cells[row]["overrides"][-1] == "optim.lr=2.5e-4"
        meta = json.loads((tmp_path / "ft" / f"{row}_0.5" / "meta.json").read_text())
        assert meta["config"]["optim"]["lr"] == 2.5e-4
    encoder_params = sum(p.numel() for p in vit.parameters())
    head = 192 * 4 + 4
    lora = 2 * 8 * (192 + 3 * 192)  # rank 8 on each block's fused qkv Linear (192 -> 576): A and B
    assert cells["lora"]["trained_params"] == lora + head
    assert cells["lora"]["total_params"] == encoder_params + head
    assert record["trained_fraction"]["lora"] == pytest.approx((lora + head) / (encoder_params + head))
    assert record["trained_fraction"]["lora"] < 0.05
    assert record["trained_fraction"]["full"] == 1.0
    assert cells["linear_probe"]["trained_params"] == head
    assert "| lora | 1.4% |" in record["table"]
