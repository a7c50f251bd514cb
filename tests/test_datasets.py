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


# ------------------------------------------------------------------------------- image-file layouts (issue 16)


def _png(path: Path, value: int = 0, size: tuple[int, int] = (10, 12)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(path)


def _classes(root: Path, counts: dict[str, int]) -> None:
    for cls, n in counts.items():
        for i in range(n):
            _png(root / cls / f"{i}.png", (20 * i + (100 if cls == "dog" else 0)) % 256)


def test_hidden_folders_and_files_are_ignored(tmp_path):
    """A .ipynb_checkpoints/ next to the class folders used to become class 0 with no images."""
    _classes(tmp_path, {"cat": 3, "dog": 3})
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _png(tmp_path / ".thumbnails" / "t.png")
    _png(tmp_path / "cat" / ".hidden.png")
    _png(tmp_path / "dog" / ".cache" / "x.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    data = load_dataset(f"folder:{tmp_path}", image_size=8, val_fraction=0)
    assert data.train.classes == ["cat", "dog"] and data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_nested_class_folders_belong_to_their_class(tmp_path):
    _classes(tmp_path, {"cat": 2, "dog": 1})
    _png(tmp_path / "dog" / "puppies" / "p.png")
    data = load_dataset(f"folder:{tmp_path}", image_size=8, val_fraction=0)
    assert data.train.classes == ["cat", "dog"] and data.train.labels.tolist() == [0, 0, 1, 1]


def test_loose_images_next_to_a_sub_folder_is_an_error_naming_both(tmp_path):
    """A flat folder with one stray backup/ used to train on backup/ only and ignore the top-level images."""
    for i in range(4):
        _png(tmp_path / f"{i}.jpg")
    _png(tmp_path / "backup" / "b.jpg")
    with pytest.raises(DatasetError, match=r"mixes 4 loose image\(s\) \(0\.jpg, 1\.jpg, 2\.jpg, \.\.\.\) with 1 "
                                           r"sub-folder\(s\) \(backup/\); for class labels move"):
        load_dataset(f"folder:{tmp_path}")


def test_split_folders_are_splits_not_classes(tmp_path):
    """train/ + val/ + test/ used to become three classes named train, val and test."""
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        _classes(tmp_path / split, {"cat": n, "dog": n})
    data = load_dataset(f"folder:{tmp_path}", image_size=8, val_fraction=0.5, test_fraction=0.5)
    assert data.train.classes == ["cat", "dog"] and (len(data.train), len(data.val), len(data.test)) == (8, 4, 4)
    assert data.val.labels.tolist() == [0, 0, 1, 1] and data.origin == {s: "the dataset's" for s in data.origin}
    flat = tmp_path / "flat"
    for split in ("train", "valid"):
        for i in range(3):
            _png(flat / split / f"{i}.png")
    data = load_dataset(f"folder:{flat}", image_size=8)
    assert data.train.labels is None and len(data.train) == 3 and len(data.val) == 3  # valid/ is val


def test_split_folder_errors(tmp_path):
    _classes(tmp_path / "a" / "train", {"cat": 2, "dog": 2})
    _classes(tmp_path / "a" / "val", {"cat": 2})
    with pytest.raises(DatasetError, match=r"classes of val/ differ from train/'s .*missing from val: \['dog'\]"):
        load_dataset(f"folder:{tmp_path / 'a'}")
    _classes(tmp_path / "b" / "train", {"cat": 2})
    _classes(tmp_path / "b" / "extra", {"cat": 2})
    with pytest.raises(DatasetError, match=r"split folder train/ next to extra/"):
        load_dataset(f"folder:{tmp_path / 'b'}")
    _classes(tmp_path / "vehicles", {"bus": 1, "car": 1, "train": 1})  # a class named train holds images
    assert load_dataset(f"folder:{tmp_path / 'vehicles'}", val_fraction=0).train.classes == ["bus", "car", "train"]
    _classes(tmp_path / "c", {"cat": 2, "empty": 0})
    (tmp_path / "c" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"class folder\(s\) empty/ hold no images"):
        load_dataset(f"folder:{tmp_path / 'c'}")


def test_file_lists_csv_and_txt(tmp_path):
    _classes(tmp_path / "img", {"cat": 3, "dog": 3})
    rows = [f"img/{c}/{i}.png,{c}" for c in ("dog", "cat") for i in range(3)]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    data = load_dataset(f"list:{tmp_path / 'list.csv'}", image_size=8, val_fraction=0)
    assert data.train.classes == ["cat", "dog"] and data.train.labels.tolist() == [1, 1, 1, 0, 0, 0]
    folder = load_dataset(f"folder:{tmp_path / 'img'}", image_size=8, val_fraction=0)
    assert torch.equal(data.train.images[:3], folder.train.images[3:])  # same files, same pixels
    (tmp_path / "sub").mkdir()  # paths are relative to the list, not to the working directory
    (tmp_path / "sub" / "l.txt").write_text("# unlabeled\n../img/cat/0.png\n\n../img/dog/1.png 7\n")
    with pytest.raises(DatasetError, match=r"'\.\./img/cat/0\.png' has no label but other rows do"):
        load_dataset(f"list:{tmp_path / 'sub' / 'l.txt'}")
    (tmp_path / "sub" / "l.txt").write_text("../img/cat/0.png 10\n../img/dog/1.png 7\n../img/dog/2.png 7\n")
    data = load_dataset(f"list:{tmp_path / 'sub' / 'l.txt'}", image_size=8, val_fraction=0)
    assert data.train.classes == ["7", "10"] and data.train.labels.tolist() == [1, 0, 0]  # integers sort as such


def test_unreadable_files_are_counted_and_named_in_the_summary(tmp_path):
    _classes(tmp_path, {"cat": 4, "dog": 4})
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    (tmp_path / "dog" / "cut.png").write_bytes((tmp_path / "dog" / "0.png").read_bytes()[:40])
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\), first: .*empty\.png, .*cut\.png"):
        data = load_dataset(f"folder:{tmp_path}", image_size=8, val_fraction=0.25)
    line = data.summary()
    assert line.startswith(f"folder:{tmp_path}: train 6 images in 2 classes, val 2 images in 2 classes (0.25 of "
                           f"train, stratified, seed 0), no test split (the dataset has none and "
                           f"data.test_fraction is 0); 2 unreadable file(s) skipped: ")
    assert "empty.png" in line and line.endswith("; in memory (0.00 GB)")


def test_test_fraction_carves_a_stratified_seeded_test_split(tmp_path):
    _classes(tmp_path, {"cat": 10, "dog": 10})
    only_val = load_dataset(f"folder:{tmp_path}", image_size=8, val_fraction=0.2, seed=3)
    both = load_dataset(f"folder:{tmp_path}", image_size=8, val_fraction=0.2, test_fraction=0.3, seed=3)
    assert torch.equal(only_val.val.images, both.val.images)  # adding a test split leaves val as it was
    assert torch.bincount(both.test.labels).tolist() == [3, 3] and len(both.train) == 10
    assert both.origin["test"] == "0.3 of train, stratified, seed 3"
    digits = load_dataset("digits", test_fraction=0.5)  # digits has a test split: nothing carved
    assert len(digits.test) == 359 and digits.origin["test"] == "20% of digits, stratified, seed 12345"


def test_a_split_that_would_lack_a_class_is_an_error(tmp_path):
    _classes(tmp_path, {"cat": 6, "dog": 2})
    data = load_dataset(f"folder:{tmp_path}", image_size=8, val_fraction=0.1)  # 1 of each class, not 0 of dog
    assert data.val.labels.tolist() == [0, 1]
    with pytest.raises(DatasetError, match=r"class 'dog' has 2 image\(s\): too few to keep one in train and hold "
                                           r"one out for each of data.val_fraction=0.1, data.test_fraction=0.1"):
        load_dataset(f"folder:{tmp_path}", image_size=8, val_fraction=0.1, test_fraction=0.1)
    flat = tmp_path / "flat"
    _png(flat / "only.png")
    with pytest.raises(DatasetError, match=r"the dataset has 1 image\(s\): too few"):
        load_dataset(f"folder:{flat}", image_size=8)
