"""FolderBatches: streamed uint8 batches from image files, with the order and sharding of Batches."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png
from torchvision.transforms.v2.functional import center_crop, resize

from reprlab.data.datasets import DatasetError, ImageSet, decode_file, scan_folder
from reprlab.data.loader import Batches, epoch_order
from reprlab.data.stream import FolderBatches


def _image(i: int, height: int, width: int) -> torch.Tensor:
    """A distinct uint8 (3, H, W) image per i (a gradient plus an offset), so decode/resize errors show."""
    rows = torch.arange(height)[:, None] * 7
    cols = torch.arange(width)[None, :] * 3
    base = (rows + cols + 31 * i) % 256
    return torch.stack([base, (base + 85) % 256, (255 - base)]).to(torch.uint8)


@pytest.fixture
def labeled_folder(tmp_path: Path) -> Path:
    """2 classes x 5 PNGs of mixed sizes (10 images), plus one corrupt '.png' in class b."""
    for c, name in enumerate(["a", "b"]):
        (tmp_path / name).mkdir()
        for j in range(5):
            i = 5 * c + j
            write_png(_image(i, 12 + j, 16 - j), str(tmp_path / name / f"img{j}.png"))
    (tmp_path / "b" / "zz_broken.png").write_bytes(b"not a png at all")
    return tmp_path


def _all_batches(batches: FolderBatches, epoch: int = 0, start_step: int = 0) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(batches.epoch(epoch, start_step))


def test_scan_folder_labels_from_subfolders(labeled_folder: Path) -> None:
    files, labels, classes = scan_folder(labeled_folder)
    assert classes == ["a", "b"]
    assert len(files) == 11 and labels == [0] * 5 + [1] * 6
    assert files[0].parent.name == "a" and files[-1].name == "zz_broken.png"


def test_scan_folder_flat_and_errors(tmp_path: Path) -> None:
    write_png(_image(0, 8, 8), str(tmp_path / "x.png"))
    (tmp_path / "notes.txt").write_text("ignored")
    files, labels, classes = scan_folder(tmp_path)
    assert [f.name for f in files] == ["x.png"] and labels is None and classes == []
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        scan_folder(tmp_path / "empty")


def test_decode_file_matches_resize_and_center_crop(tmp_path: Path) -> None:
    original = _image(3, 10, 20)
    write_png(original, str(tmp_path / "wide.png"))
    out = decode_file(tmp_path / "wide.png", 8)
    expected = center_crop(resize(original, 8, antialias=True), [8, 8])  # (3, 8, 16) -> central 8 x 8
    assert out.dtype == torch.uint8 and out.shape == (3, 8, 8)
    assert torch.equal(out, expected)
    grey = decode_file(tmp_path / "wide.png", 8, channels=1)
    assert grey.shape == (1, 8, 8)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_content_skip_and_warning(labeled_folder: Path, num_workers: int) -> None:
    batches = FolderBatches(labeled_folder, image_size=8, batch_size=4, shuffle=False, drop_last=False,
                            num_workers=num_workers)
    assert len(batches) == 3 and batches.batch_size == 4  # 11 files -> 4 + 4 + 3
    with pytest.warns(UserWarning, match="skipped 1 unreadable image file"):
        out = list(batches.epoch(0))
    sizes = [len(b["index"]) for b in out]
    assert sizes == [4, 4, 2]  # the broken file (last, index 10) is dropped from the last batch
    assert batches.skipped == {10}
    index = torch.cat([b["index"] for b in out])
    assert index.tolist() == list(range(10))
    for b in out:
        assert b["images"].dtype == torch.uint8 and b["images"].shape[1:] == (3, 8, 8)
        assert torch.equal(b["labels"], batches.labels[b["index"]])
        for image, i in zip(b["images"], b["index"].tolist()):
            assert torch.equal(image, decode_file(batches.files[i], 8))  # right file at the right place
    assert torch.cat([b["labels"] for b in out]).tolist() == [0] * 5 + [1] * 5


def test_order_matches_batches_for_seed_epoch_and_ranks(labeled_folder: Path) -> None:
    n = 11
    reference_data = ImageSet(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), torch.arange(n), [])
    for world_size in (1, 2, 3):
        for drop_last in (True, False):
            for rank in range(world_size):
                kwargs = dict(batch_size=2, shuffle=True, drop_last=drop_last, seed=5, rank=rank,
                              world_size=world_size)
                ours = FolderBatches(labeled_folder, image_size=4, num_workers=0, **kwargs)
                reference = Batches(reference_data, **kwargs)
                assert len(ours) == len(reference)
                for epoch in (0, 1):
                    assert torch.equal(ours.order(epoch), reference.order(epoch))
    assert not torch.equal(epoch_order(n, True, True, 5, 0, 0, 1), epoch_order(n, True, True, 5, 1, 0, 1))


def test_deterministic_sharded_and_resumable(labeled_folder: Path) -> None:
    files = scan_folder(labeled_folder)[0][:10]  # the 10 readable files

    def make(rank: int, seed: int = 1) -> FolderBatches:
        return FolderBatches(files=files, image_size=4, batch_size=2, seed=seed, rank=rank, world_size=2,
                             num_workers=0)

    first, again = _all_batches(make(0)), _all_batches(make(0))
    assert [b["index"].tolist() for b in first] == [b["index"].tolist() for b in again]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, again))
    assert "labels" not in first[0]  # files without labels: unlabeled batches
    other_rank = _all_batches(make(1))
    mine = {i for b in first for i in b["index"].tolist()}
    theirs = {i for b in other_rank for i in b["index"].tolist()}
    assert len(first) == len(other_rank) == 2 and not mine & theirs and len(mine | theirs) == 8
    resumed = _all_batches(make(0), start_step=1)
    assert [b["index"].tolist() for b in resumed] == [b["index"].tolist() for b in first[1:]]
    reseeded = _all_batches(make(0, seed=2))
    assert [b["index"].tolist() for b in reseeded] != [b["index"].tolist() for b in first]


def test_all_unreadable_batch_is_skipped_and_errors(tmp_path: Path) -> None:
    for j in range(2):
        (tmp_path / f"bad{j}.png").write_bytes(b"garbage")
    write_png(_image(0, 8, 8), str(tmp_path / "good.png"))
    batches = FolderBatches(tmp_path, image_size=4, batch_size=2, shuffle=False, drop_last=False,
                            num_workers=0)
    out = _all_batches(batches)  # [bad0, bad1] -> nothing, [good] -> one image
    assert len(out) == 1 and out[0]["images"].shape == (1, 3, 4, 4)
    assert batches.skipped == {0, 1}
    with pytest.raises(ValueError, match="no full batch"):
        FolderBatches(tmp_path, image_size=4, batch_size=8, num_workers=0)
    with pytest.raises(ValueError, match="exactly one of root"):
        FolderBatches(image_size=4, batch_size=1)
    with pytest.raises(ValueError, match="one label per file"):
        FolderBatches(files=[tmp_path / "good.png"], labels=[0, 1], image_size=4, batch_size=1)


def test_feeds_the_training_loop(labeled_folder: Path) -> None:
    """engine.fit takes FolderBatches where it takes Batches."""
    from reprlab.contracts import Task
    from reprlab.engine import FitOptions, fit

    class MeanTask(Task):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.seen = 0

        def forward(self, batch: dict) -> dict:
            assert batch["images"].dtype == torch.uint8 and batch["images"].shape[1:] == (3, 8, 8)
            self.seen += len(batch["images"])
            return {"loss": (self.scale * batch["images"].float().mean() / 255 - 0.5) ** 2}

    task = MeanTask()
    batches = FolderBatches(labeled_folder, image_size=8, batch_size=5, num_workers=0)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit(task, batches, optimizer, None, FitOptions(epochs=1, device=torch.device("cpu"), progress=False))
    assert result.epochs_run == 1 and task.seen in (9, 10)  # the broken file may land in a batch


def test_fit_places_a_stream_for_cuda_without_touching_dataset_memory(labeled_folder: Path, monkeypatch) -> None:
    """The CUDA placement branch that used to read ``batches.data.images`` (which a stream does not have): the
    source decides, a stream stays on the host with pinned batches and yields the same batches. Exercised
    without a GPU: fit is asked for CUDA placement through the source's own ``to_device``."""
    from reprlab.contracts import BatchSource, Task
    from reprlab.engine import FitOptions, fit

    stream = FolderBatches(labeled_folder, image_size=4, batch_size=2, shuffle=True, seed=3, num_workers=0)
    assert isinstance(stream, BatchSource)
    placed = stream.to_device(torch.device("cuda"))
    assert placed.pin_memory and not stream.pin_memory and placed.files is stream.files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "pin_memory ... no accelerator" on a machine without a GPU
        for a, b in zip(_all_batches(stream), _all_batches(placed)):
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["index"], b["index"])

    asked: list[torch.device] = []
    original = FolderBatches.to_device

    def to_device(self: FolderBatches, device: torch.device) -> FolderBatches:
        asked.append(device)
        return original(self, torch.device("cuda"))  # what fit gets on a CUDA device

    monkeypatch.setattr(FolderBatches, "to_device", to_device)

    class MeanTask(Task):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, batch: dict) -> dict:
            return {"loss": (self.w - batch["images"].float().mean()) ** 2}

    task = MeanTask()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit(task, stream, torch.optim.SGD(task.parameters(), lr=0.01), None,
                     FitOptions(epochs=1, device=torch.device("cpu"), progress=False))
    assert asked == [torch.device("cpu")] and result.global_step == len(stream)
    assert task.w.item() != 0  # it trained on the placed stream
