from pathlib import Path

import numpy as np
import pytest
import torch

from reprlab.data.datasets import DatasetError, load_dataset, per_class_subset, stratified_split
from reprlab.data.loader import Batches

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def test_digits_splits_are_uint8_nchw_and_disjoint():
    data = load_dataset("digits", val_fraction=0.1)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 8, 8)
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.train.images.max() == 255 and data.train.num_classes == 10
    # the validation split is stratified: every class is present in roughly the same proportion
    counts = torch.bincount(data.val.labels, minlength=10)
    assert counts.min() >= 10
    assert load_dataset("digits").val.labels.tolist() == data.val.labels.tolist()  # deterministic


def test_stratified_split_and_subsets():
    labels = torch.arange(100) % 4
    keep, held = stratified_split(labels, 100, 0.2, seed=0)
    assert len(set(keep.tolist()) & set(held.tolist())) == 0 and len(keep) + len(held) == 100
    assert torch.bincount(labels[held]).tolist() == [5, 5, 5, 5]
    sub = per_class_subset(labels, per_class=3, seed=1)
    assert torch.bincount(labels[sub]).tolist() == [3, 3, 3, 3]
    assert per_class_subset(labels, fraction=0.2, seed=1).tolist() == per_class_subset(labels, fraction=0.2,
                                                                                        seed=1).tolist()
    with pytest.raises(ValueError, match="leaves class 0 with no labeled image"):
        per_class_subset(labels, fraction=0.01)


def _write_npz(path, n, h=6, c=3, with_classes=True):
    rng = np.random.default_rng(0)
    arrays = {"images": rng.integers(0, 255, (n, h, h, c), dtype=np.uint8), "labels": np.arange(n) % 3}
    if with_classes:
        arrays["classes"] = np.array(["a", "b", "c"])
    np.savez(path, **arrays)


def test_npz_folder(tmp_path):
    _write_npz(tmp_path / "train.npz", 30)
    _write_npz(tmp_path / "test.npz", 9)
    data = load_dataset(f"npz:{tmp_path}", val_fraction=0.2)
    assert data.train.images.shape == (24, 3, 6, 6) and len(data.val) == 6 and len(data.test) == 9
    assert data.train.classes == ["a", "b", "c"]
    resized = load_dataset(f"npz:{tmp_path}", image_size=12)
    assert resized.train.images.shape[-2:] == (12, 12) and resized.test.images.shape[-1] == 12


def test_image_folder_labeled_and_flat(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "labeled" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 14, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "labeled" / cls / f"{i}.png")
    data = load_dataset(f"folder:{tmp_path / 'labeled'}", image_size=8, val_fraction=0)
    assert data.train.images.shape == (6, 3, 8, 8) and data.train.classes == ["cat", "dog"]
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "flat" / "a.jpg")
    (tmp_path / "flat" / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        flat = load_dataset(f"folder:{tmp_path / 'flat'}", image_size=4, val_fraction=0)
    assert flat.train.labels is None and len(flat.train) == 1


def test_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'missing'}")
    with pytest.raises(DatasetError, match="no train.npz"):
        load_dataset(f"npz:{tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no image files"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(DatasetError, match="download=true"):
        load_dataset("cifar10", root=str(tmp_path), download=False)


def test_batches_deterministic_sharded_and_resumable():
    data = load_dataset("digits").train
    batches = Batches(data, 32, seed=3)
    first = [b["index"] for b in batches.epoch(0)]
    assert len(first) == len(batches) == len(data) // 32
    assert torch.equal(torch.cat(first), torch.cat([b["index"] for b in batches.epoch(0)]))
    assert not torch.equal(first[0], next(iter(batches.epoch(1)))["index"])
    resumed = [b["index"] for b in batches.epoch(0, start_step=2)]
    assert all(torch.equal(a, b) for a, b in zip(first[2:], resumed))
    ranks = [Batches(data, 16, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = torch.cat([b["index"] for r in ranks for b in r.epoch(0)])
    assert len(seen) == len(set(seen.tolist()))  # no sample on two ranks
    with pytest.raises(ValueError, match="lower train.batch_size"):
        Batches(data.subset(torch.arange(10)), 32)


@pytest.mark.skipif(not (CIFAR / "train.npz").exists(), reason="CIFAR-10 npz not found at ../shared/data/cifar10")
def test_shared_cifar10_npz():
    data = load_dataset(f"npz:{CIFAR}", val_fraction=0.1)
    assert data.train.images.shape[1:] == (3, 32, 32) and len(data.test) == 10000
    assert len(data.train) == 45000 and data.train.classes[0] == "airplane"
