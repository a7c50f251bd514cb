"""FolderBatches: streamed uint8 batches from image files, with the order and sharding of Batches."""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------------------- formats, streaming from config


def test_decoder_applies_exif_and_converts_cmyk_rgba_grey_16bit_bmp_tiff(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from reprlab.data.files import read_image

    rgb = np.random.default_rng(0).integers(0, 255, (6, 9, 3), dtype=np.uint8)
    expected = torch.from_numpy(rgb).permute(2, 0, 1)
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    Image.fromarray(np.dstack([rgb, np.full((6, 9), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "x.bmp")
    Image.fromarray(rgb).save(tmp_path / "x.tif")
    for name in ("plain.png", "rgba.png", "x.bmp", "x.tif"):
        assert torch.equal(read_image(tmp_path / name), expected), name
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cmyk = read_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (3, 6, 9) and cmyk.dtype == torch.uint8
    pil = np.array(Image.open(tmp_path / "cmyk.jpg").convert("RGB"))
    assert torch.equal(cmyk, torch.from_numpy(pil).permute(2, 0, 1))
    grey16 = (np.arange(54, dtype=np.uint16).reshape(6, 9) * 1200).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == torch.uint8 and out.shape == (3, 6, 9) and torch.equal(out[0], out[2])
    assert torch.equal(out[0], torch.from_numpy(((grey16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    assert read_image(tmp_path / "grey.png").shape == (3, 6, 9)
    assert read_image(tmp_path / "grey.png", 1).shape == (1, 6, 9)
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    assert read_image(tmp_path / "rotated.jpg").shape == (3, 9, 6)  # as displayed, not as stored


def _folder(root: Path, per_class: int = 8) -> Path:
    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            write_png(_image(per_class * c + j, 12 + j % 3, 14 - j % 2), str(root / name / f"{j}.png"))
    return root


def test_stream_true_and_auto_give_file_sets_with_the_in_memory_batches(tmp_path: Path) -> None:
    from reprlab.data.datasets import load_dataset
    from reprlab.data.files import FileSet
    from reprlab.stages.common import build_batches

    root = _folder(tmp_path / "imgs")
    name = f"folder:{root}"
    memory = load_dataset(name, image_size=8, val_fraction=0.25, test_fraction=0.25, stream=False)
    streamed = load_dataset(name, image_size=8, val_fraction=0.25, test_fraction=0.25, stream=True)
    auto = load_dataset(name, image_size=8, val_fraction=0.25, stream="auto", memory_limit_gb=1e-9)
    assert isinstance(streamed.train, FileSet) and isinstance(auto.train, FileSet) and not memory.streamed
    assert "streamed from disk" in streamed.summary() and "> data.memory_limit_gb=1e-09" in auto.summary()
    assert "in memory" in load_dataset(name, image_size=8, stream="auto").summary()
    for split in ("train", "val", "test"):
        assert getattr(memory, split).labels.tolist() == getattr(streamed, split).labels.tolist()
    for world in (1, 2):
        for rank in range(world):
            kwargs = dict(shuffle=True, drop_last=True, seed=4, rank=rank, world_size=world)
            a, b = build_batches(memory.train, 2, **kwargs), build_batches(streamed.train, 2, **kwargs)
            assert len(a) == len(b)
            for epoch in (0, 1):
                for x, y in zip(a.epoch(epoch, 1), b.epoch(epoch, 1)):  # resumed at step 1
                    assert torch.equal(x["index"], y["index"]) and torch.equal(x["images"], y["images"])
                    assert torch.equal(x["labels"], y["labels"])
    with pytest.raises(DatasetError, match="data.stream=true streams image files"):
        load_dataset("digits", stream=True)


def test_ordered_batches_cover_a_split_once_in_order(tmp_path: Path) -> None:
    from reprlab.data.datasets import load_dataset
    from reprlab.data.stream import ordered_batches

    name = f"folder:{_folder(tmp_path / 'imgs', 3)}"
    memory, streamed = (load_dataset(name, image_size=8, val_fraction=0, stream=s) for s in (False, True))
    a, b = list(ordered_batches(memory.train, 4)), list(ordered_batches(streamed.train, 4))
    assert [len(x["index"]) for x in a] == [len(x["index"]) for x in b] == [4, 2]
    assert torch.equal(torch.cat([x["images"] for x in a]), torch.cat([x["images"] for x in b]))
    assert torch.cat([x["labels"] for x in b]).tolist() == [0, 0, 0, 1, 1, 1]


def test_streamed_and_in_memory_pretraining_end_with_the_same_weights(tmp_path: Path, capsys) -> None:
    """Pretraining from the stream (data.stream=true) and from memory over one small folder: the same batches
    (order and pixels, checked above), the same monitor, the same final weights and metrics on the CPU."""
    from safetensors.torch import load_file

    from reprlab.config import PretrainConfig, load_config
    from reprlab.stages.pretrain import pretrain

    root = _folder(tmp_path / "imgs")
    runs = {}
    for stream in ("false", "true"):
        cfg = load_config(PretrainConfig, Path(__file__).resolve().parents[1] / "configs/pretrain/simclr_digits.yaml", [
            f"name=s{stream}", f"out_dir={tmp_path}", f"data.name=folder:{root}", "data.image_size=16",
            f"data.stream={stream}", "data.workers=0", "encoder.name=timm:test_resnet", "encoder.kwargs={}",
            "train.batch_size=4", "train.epochs=2", "train.device=cpu", "train.progress=false",
            "monitor.every_epochs=1", "monitor.knn_k=3", "method.params.projection_dim=8"])
        runs[stream] = pretrain(cfg)
    out = capsys.readouterr().out
    assert "train 14 images in 2 classes, val 2 images in 2 classes (0.1 of train, stratified, seed 0)" in out
    assert "streamed from disk" in out and "in memory" in out
    a, b = (load_file(str(runs[s] / "encoder.safetensors")) for s in ("false", "true"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def epoch_ends(run: Path) -> list[dict]:  # loss and the monitor's kNN / collapse signals, timings left out
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records if r.get("event")]

    ends = epoch_ends(runs["false"])
    assert ends == epoch_ends(runs["true"]) and len(ends) == 2 and "knn_top1" in ends[-1]


def test_streamed_fine_tuning_matches_in_memory_and_says_there_is_no_test_split(tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    from reprlab.config import FinetuneConfig, load_config
    from reprlab.stages.finetune import finetune

    root = _folder(tmp_path / "imgs")
    runs = {}
    for stream in ("false", "true"):
        runs[stream] = finetune(load_config(FinetuneConfig, None, [
            f"name=f{stream}", f"out_dir={tmp_path}", f"data.name=folder:{root}", "data.image_size=16",
            f"data.stream={stream}", "data.workers=0", "data.val_fraction=0.25", "arch.name=timm:test_resnet",
            "arch.kwargs={}", "train.batch_size=4", "train.epochs=2", "train.device=cpu", "train.progress=false"]))
    metrics = [json.loads((runs[s] / "metrics.json").read_text()) for s in ("false", "true")]
    assert metrics[0] == metrics[1] and "test_top1" not in metrics[0]
    assert metrics[0]["test_split"].startswith("none: the dataset has no test split and data.test_fraction is 0")
    assert capsys.readouterr().out.count("test_top1 not reported: none: the dataset has no test split") == 2
    weights = [load_file(str(next(runs[s].glob("*.safetensors")))) for s in ("false", "true")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_streamed_evaluation_matches_in_memory_and_the_report_says_what_was_chosen(tmp_path: Path,
                                                                                  capsys) -> None:
    """The same metrics from the stream and from memory; with no test split the report says val is reported and
    nothing was chosen (the probes skipped, k and T as configured), where it used to say "chosen on val"."""
    from reprlab.config import EvaluateConfig, load_config
    from reprlab.stages.evaluate import evaluate

    root = _folder(tmp_path / "imgs")

    def run(name: str, *extra: str) -> Path:
        return evaluate(load_config(EvaluateConfig, None, [
            f"name={name}", f"out_dir={tmp_path}", f"data.name=folder:{root}", "data.image_size=16",
            "data.workers=0", "data.val_fraction=0.25", "encoders=[random]", "arch.name=timm:test_resnet",
            "arch.kwargs={}", "knn.k=3", "knn.ks=[1, 3]", "quality_images=4", "report_map=pca", *extra]))

    def metrics(run_dir: Path) -> dict:
        summary = json.loads((run_dir / "metrics.json").read_text())
        for encoder in summary["encoders"].values():
            encoder.pop("timings_s")
        return {k: v for k, v in summary.items() if k not in ("settings", "table")}

    memory, streamed = run("m", "data.stream=false", "data.test_fraction=0.25"), run("s", "data.stream=true",
                                                                                    "data.test_fraction=0.25")
    assert metrics(memory) == metrics(streamed)
    assert metrics(memory)["split_origin"]["test"] == "0.25 of train, stratified, seed 0"
    assert "after every choice was made on val" in (memory / "report.md").read_text()
    no_test = run("n")
    summary = json.loads((no_test / "metrics.json").read_text())
    assert summary["reported_on"] == "val"
    text = (no_test / "report.md").read_text()
    assert "after every choice was made on val" not in text and "chosen on val from" not in text
    assert ("numbers on **val**, read once per encoder; nothing was chosen, as the dataset has no test split and "
            "data.test_fraction is 0") in text
    assert "k = 3, temperature = 0.07 (as configured: nothing to choose on)" in text
    assert "Probes: skipped (val is the reported split: none is left to choose their regularisation on)" in text
    out = capsys.readouterr().out
    assert out.count("streamed from disk") == 1 and out.count("in memory") == 2


def test_report_text_without_a_val_split_says_nothing_was_chosen() -> None:
    from reprlab.evaluate.report import _settings_paragraph

    summary = {"dataset": "npz:x", "reported_on": "test", "num_images": {"train": 90, "val": 0, "test": 10},
               "split_origin": {"val": "the dataset has none and data.val_fraction is 0", "test": "the dataset's"},
               "settings": {"knn": {"select_on_val": True, "k": 20, "temperature": 0.07, "ks": [10, 20]}},
               "encoders": {"random": {"knn_selected_on": "defaults (no validation split)"}}}
    text = _settings_paragraph(summary)
    assert "val 0 (the dataset has none and data.val_fraction is 0)" in text
    assert "nothing was chosen, as there is no val split" in text and "chosen on val from" not in text
    assert "Probes: skipped (no val split to choose their regularisation on)" in text
    summary["num_images"]["val"], summary["encoders"]["random"]["knn_selected_on"] = 10, "val"
    assert "k and temperature chosen on val from k in [10, 20]" in _settings_paragraph(summary)


def _ddp_features(rank: int, root: str) -> dict:
    from reprlab.data.datasets import load_dataset
    from reprlab.stages.common import build_batches, split_features

    train = load_dataset(f"folder:{root}", image_size=8, val_fraction=0, stream=True).train  # 7 files
    features = split_features(torch.nn.Flatten(), train, 2, torch.device("cpu"), shard=True)
    seen = [b["index"] for b in build_batches(train, 1, shuffle=True, drop_last=False, seed=0, rank=rank,
                                               world_size=2).epoch(0)]
    return {"features": features, "seen": torch.cat(seen)}


def test_streamed_features_and_batches_under_ddp(tmp_path: Path) -> None:
    """2 gloo processes: each streams its share, both get every row in order; the training shards are disjoint
    and equal (7 files: the head is repeated as padding, as DistributedSampler does)."""
    from reprlab.data.datasets import load_dataset
    from reprlab.stages.common import split_features
    from tests.gloo import run_on_ranks

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(7):
        write_png(_image(i, 9, 11), str(root / f"{i}.png"))
    ranks = run_on_ranks(_ddp_features, tmp_path, str(root))
    single = split_features(torch.nn.Flatten(), load_dataset(f"folder:{root}", image_size=8, val_fraction=0,
                                                              stream=True).train, 3, torch.device("cpu"))
    assert single.shape == (7, 3 * 8 * 8)
    assert all(torch.equal(r["features"], single) for r in ranks)
    a, b = (set(r["seen"].tolist()) for r in ranks)
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 4 and a | b == set(range(7))
