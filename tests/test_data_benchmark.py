"""`python scripts/benchmark.py data`: the JPEG folder and shards it writes, its folders of the first N files, and
a toy end-to-end run that appends its JSON line (a fake CIFAR-10 npz: no shared data needed)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_cifar(tmp_path: Path) -> Path:
    """train.npz of 12 random 32 px images in 3 classes, laid out as ../shared/data/cifar10 is."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar"
    folder.mkdir()
    np.savez(folder / "train.npz", images=rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(12) % 3, classes=np.array(["cat", "dog", "owl"]))
    return folder


def test_write_repeats_images_under_distinct_names_and_shards_them(tmp_path: Path, fake_cifar: Path,
                                                                    monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench.data_files import first_files, write_jpegs, write_shards
    from PIL import Image

    from reprlab.data.shards import scan_shards

    out = tmp_path / "jpg"
    written = write_jpegs(out, fake_cifar, size=48, count=30, quality=90, procs=1, chunk=8)
    files = sorted(out.rglob("*.jpg"))
    assert written["images"] == len(files) == 30 and len({f.name for f in files}) == 30
    assert sorted(p.name for p in out.iterdir()) == ["cat", "dog", "owl"]
    assert (out / "dog" / "0000013.jpg").is_file()  # image 13 = source 1 (label 1) repeated
    with Image.open(files[0]) as image:
        assert image.size == (48, 48) and image.format == "JPEG"
    packed = write_shards(out, tmp_path / "shards", per_shard=8, procs=1)
    assert packed["shards"] == 4 and packed["samples"] == 30
    split = scan_shards(str(tmp_path / "shards"))["train"]
    assert len(split) == 30 and split.classes == ["0", "1", "2"]
    assert split.labels[:6].tolist() == [0, 1, 2, 0, 1, 2]  # index order, labels from the class folders
    subset = first_files(out, 9)
    assert subset.name == "jpg.rss-9" and sum(1 for _ in subset.rglob("*.jpg")) == 9
    assert all(len(list((subset / c).iterdir())) == 3 for c in ("cat", "dog", "owl"))  # the same share each
    assert first_files(out, 30) == out


@pytest.mark.slow
def test_data_benchmark_runs_end_to_end_and_appends_its_line(tmp_path: Path, fake_cifar: Path) -> None:
    out = tmp_path / "results.jsonl"
    folder = tmp_path / "jpg"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "data", "--write", str(folder),
                          "--cifar", str(fake_cifar), "--count", "48", "--shards", "--shard-size", "16",
                          "--procs", "1", "--workers", "1", "--batch-size", "8", "--batches", "4", "--warmup", "1",
                          "--repeats", "1", "--floor-images", "5", "--no-lightly", "--rss", "24",
                          "--rss-batches", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["bench"] == "data" and record["processor"] and record["written"]["images"] == 48
    pipelines = [row["pipeline"] for row in record["throughput"]]
    assert pipelines == ["reprlab stream (FolderBatches)", "reprlab stream (ShardBatches, tar shards)",
                         "torchvision ImageFolder + PIL + DataLoader"]
    assert all(row["images_per_s"] > 0 for row in record["throughput"] + record["floor"])
    assert [(row["pipeline"], row["files"]) for row in record["rss"]] == [("reprlab", 24), ("torchvision", 24)]
    assert all(row["main_peak_mb"] > 0 and row["images_streamed"] == 16 for row in record["rss"])
    assert "| reprlab stream (FolderBatches) | 1 |" in run.stdout
