"""Tar shards (shards:<dir|glob|pattern>): the scan, ShardBatches' sequential, sharded, seeded stream and its
resume replay, the errors, and a pretraining run on shards."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png

from reprlab.data.datasets import DatasetError, load_dataset
from reprlab.data.decode import decode_file
from reprlab.data.shard_stream import ShardBatches, shuffled
from reprlab.data.shards import ShardSet, expand_braces, scan_shards, shard_paths


def _image(i: int, height: int = 10, width: int = 12) -> torch.Tensor:
    """A distinct uint8 (3, H, W) image per i, so a sample in the wrong place shows."""
    rows, cols = torch.arange(height)[:, None] * 7, torch.arange(width)[None, :] * 3
    base = (rows + cols + 31 * i) % 256
    return torch.stack([base, (base + 85) % 256, 255 - base]).to(torch.uint8)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write(path: Path, samples: list[tuple[int, int | None]], label_as: str = "cls") -> Path:
    """A shard of PNG samples ``(i, label)``: key ``sample{i:04d}``, the label as .cls text or .json."""
    with tarfile.open(path, "w") as tar:
        for i, label in samples:
            _add(tar, f"sample{i:04d}.png", encode_png(_image(i)).numpy().tobytes())
            if label is not None:
                text = str(label) if label_as == "cls" else json.dumps({"label": label, "caption": "x"})
                _add(tar, f"sample{i:04d}.{label_as}", text.encode())
            _add(tar, f"sample{i:04d}.txt", b"a caption: ignored")
    return path


def _shards(root: Path, sizes: list[int], labeled: bool = True) -> Path:
    """Shards of the given sizes, samples numbered across them; labels i % 3 (cls, and .json in shard 1)."""
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for s, size in enumerate(sizes):
        samples = [(i, i % 3 if labeled else None) for i in range(start, start + size)]
        _write(root / f"part-{s:03d}.tar", samples, label_as="json" if s == 1 else "cls")
        start += size
    return root


def _epoch(batches: ShardBatches, epoch: int = 0, start_step: int = 0) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(batches.epoch(epoch, start_step))


def _indices(batches: list[dict]) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def test_scan_reads_samples_labels_and_prints_a_load_line(tmp_path: Path) -> None:
    root = _shards(tmp_path / "s", [5, 4, 3])
    split = scan_shards(str(root))["train"]
    assert isinstance(split, ShardSet) and len(split) == 12 and len(split.shards) == 3
    assert split.classes == ["0", "1", "2"] and split.labels.tolist() == [i % 3 for i in range(12)]
    assert [m.name for m in split.files[:2]] == ["sample0000.png", "sample0001.png"]
    assert torch.equal(decode_file(split.files[7], 8), decode_file(_png(tmp_path, 7), 8))  # a member decodes
    data = load_dataset(f"shards:{root}", image_size=8, val_fraction=0.25, stream=True)
    line = data.summary()
    assert line.startswith(f"shards:{root}: train 9 images in 3 classes from 3 tar shards, val 3 images in 3 "
                           f"classes (0.25 of train") and "streamed from tar shards" in line
    unlabeled = load_dataset(f"shards:{_shards(tmp_path / 'u', [3, 3], labeled=False)}", image_size=8,
                             val_fraction=0, stream=False)
    assert unlabeled.train.labels is None and unlabeled.summary().endswith("unlabeled; in memory (0.00 GB)")
    assert "train 6 images from 2 tar shards" in unlabeled.summary()


def _png(tmp_path: Path, i: int) -> Path:
    path = tmp_path / f"ref{i}.png"
    path.write_bytes(encode_png(_image(i)).numpy().tobytes())
    return path


def test_names_dir_glob_and_brace_patterns(tmp_path: Path) -> None:
    root = _shards(tmp_path, [1, 1, 1, 1])
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert [p.name for p in shard_paths(str(root))] == [f"part-{s:03d}.tar" for s in range(4)]
    assert [p.name for p in shard_paths(f"{root}/part-{{001..002}}.tar")] == ["part-001.tar", "part-002.tar"]
    assert len(shard_paths(f"{root}/*.tar")) == 4
    with pytest.raises(DatasetError, match=r"part-004\.tar' does not exist \(and 3 more\)"):
        shard_paths(f"{root}/part-{{000..007}}.tar")
    with pytest.raises(DatasetError, match="matched no shard files"):
        shard_paths(f"{root}/*.tgz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="folder holds no .tar files"):
        shard_paths(str(tmp_path / "empty"))


def test_split_shards_by_name(tmp_path: Path) -> None:
    _write(tmp_path / "train-000.tar", [(i, i % 2) for i in range(6)])
    _write(tmp_path / "val-000.tar", [(i, i % 2) for i in range(6, 10)])
    splits = scan_shards(str(tmp_path))
    assert set(splits) == {"train", "val"} and len(splits["train"]) == 6 and len(splits["val"]) == 4
    data = load_dataset(f"shards:{tmp_path}", image_size=8, stream=True)
    assert "val 4 images in 2 classes from 1 tar shard (the dataset's)," in data.summary()
    _write(tmp_path / "extra-000.tar", [(20, 0)])
    with pytest.raises(DatasetError, match="extra-000.tar name no split"):
        scan_shards(str(tmp_path))


def test_errors_name_the_shard(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.tar", [(0, 0), (1, 1)])
    no_images = tmp_path / "labels-only.tar"
    with tarfile.open(no_images, "w") as tar:
        _add(tar, "sample0000.cls", b"0")
    with pytest.raises(DatasetError, match=r"labels-only.tar' holds no images"):
        scan_shards(str(no_images))
    truncated = tmp_path / "truncated.tar"
    png = len(encode_png(_image(0)).numpy().tobytes())  # the first member's data: bytes 512 .. 512 + png
    for cut, where in ((512 + png // 2, "inside sample0000.png"), (1500, "inside a tar header at byte 1024"),
                       (1024, "after its last whole member")):
        truncated.write_bytes(good.read_bytes()[:cut])
        with pytest.raises(DatasetError, match=rf"truncated.tar' is corrupt: truncated {where}"):
            scan_shards(str(truncated))
    with tarfile.open(good) as tar:
        header = tar.getmembers()[3].offset  # sample0001.png's header, after sample0000's three members
    damaged = bytearray(good.read_bytes())
    damaged[header : header + 100] = b"x" * 100  # its name and checksum: tarfile would stop here silently
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    with pytest.raises(DatasetError, match=r"damaged.tar' is corrupt: a damaged tar header"):
        scan_shards(str(tmp_path / "damaged.tar"))
    with tarfile.open(tmp_path / "packed.tar", "w:gz") as tar:
        tar.add(good, "inner.tar")
    with pytest.raises(DatasetError, match="packed.tar' is not a readable uncompressed tar.*decompress"):
        scan_shards(str(tmp_path / "packed.tar"))
    (tmp_path / "half").mkdir()
    _write(tmp_path / "half" / "a.tar", [(0, 0), (1, None)])
    with pytest.raises(DatasetError, match=r"a.tar:sample0001.png has no label .* label every sample or none"):
        scan_shards(str(tmp_path / "half"))
    with tarfile.open(tmp_path / "two.tar", "w") as tar:
        for name in ("k.png", "k.jpg"):
            _add(tar, name, encode_png(_image(0)).numpy().tobytes())
    with pytest.raises(DatasetError, match="sample 'k' holds two images"):
        scan_shards(str(tmp_path / "two.tar"))


def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(tmp_path: Path) -> None:
    split = load_dataset(f"shards:{_shards(tmp_path, [7, 5, 6, 6])}", image_size=8, val_fraction=0,
                         stream=True).train
    for drop_last in (False, True):  # 24 samples, batches of 3: 4 per rank either way
        seen: list[int] = []
        for rank in (0, 1):
            batches = ShardBatches(split, 3, shuffle=True, drop_last=drop_last, seed=7, rank=rank, world_size=2,
                                   num_workers=2, shuffle_buffer=4)
            out = _epoch(batches)
            assert len(batches) == len(out) == 4 and all(len(b["index"]) == 3 for b in out)
            for b in out:
                seen += b["index"].tolist()
                assert torch.equal(b["labels"], split.labels[b["index"]])
                for image, i in zip(b["images"], b["index"].tolist()):
                    assert torch.equal(image, decode_file(split.files[i], 8))  # the right pixels in place
        assert sorted(seen) == list(range(24))


def test_uneven_shards_give_disjoint_equal_shares(tmp_path: Path) -> None:
    split = load_dataset(f"shards:{_shards(tmp_path, [1, 9, 2])}", image_size=8, val_fraction=0,
                         stream=True).train
    shares = [_indices(_epoch(ShardBatches(split, 2, seed=1, rank=r, world_size=3, num_workers=0)))
              for r in range(3)]
    assert [len(s) for s in shares] == [2, 2, 2]  # 12 samples, 4 per rank, whatever the shard sizes
    flat = [i for share in shares for b in share for i in b]
    assert len(flat) == len(set(flat)) == 12


def test_order_is_seeded_shuffled_and_resumes_by_replay(tmp_path: Path) -> None:
    split = load_dataset(f"shards:{_shards(tmp_path, [6, 6, 6, 6])}", image_size=8, val_fraction=0,
                         stream=True).train

    def make(seed: int = 3, **kw) -> ShardBatches:
        return ShardBatches(split, 2, seed=seed, num_workers=2, shuffle_buffer=3, **kw)

    first = _epoch(make())
    assert _indices(first) == _indices(_epoch(make()))  # the seed fixes the epoch's order
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, _epoch(make())))
    assert _indices(_epoch(make(), epoch=1)) != _indices(first) and _indices(_epoch(make(seed=4))) != _indices(first)
    assert sorted(i for b in _indices(first) for i in b) == list(range(24))
    assert _indices(first) != [[2 * k, 2 * k + 1] for k in range(12)]  # shuffled, not as stored
    for start in (1, 4, 11):  # odd and even steps: both workers' skips, and the last batch alone
        assert _indices(_epoch(make(), start_step=start)) == _indices(first)[start:]
    plain = ShardBatches(split, 2, shuffle=False, num_workers=0)
    assert _indices(_epoch(plain)) == [[2 * k, 2 * k + 1] for k in range(12)]  # unshuffled: as stored
    assert list(shuffled(range(5), 1, __import__("random").Random(0))) == [0, 1, 2, 3, 4]


def test_unreadable_image_is_skipped_and_warned(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for i in range(4):
            _add(tar, f"s{i}.png", b"not a png" if i == 2 else encode_png(_image(i)).numpy().tobytes())
    split = scan_shards(str(tmp_path))["train"]
    split.image_size = 8
    batches = ShardBatches(split, 2, shuffle=False, drop_last=False, num_workers=0)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) in epoch 0, first: .*a.tar:s2.png"):
        out = list(batches.epoch(0))
    assert _indices(out) == [[0, 1], [3]] and batches.skipped == {2}


def test_pretraining_and_fine_tuning_run_on_shards(tmp_path: Path, capsys) -> None:
    from reprlab.config import FinetuneConfig, PretrainConfig, load_config
    from reprlab.stages.finetune import finetune
    from reprlab.stages.pretrain import pretrain

    root = _shards(tmp_path / "shards", [8, 8])
    common = [f"out_dir={tmp_path}", f"data.name=shards:{root}/part-{{000..001}}.tar", "data.image_size=16",
              "data.stream=true", "data.workers=0", "train.batch_size=4", "train.epochs=1", "train.device=cpu",
              "train.progress=false"]
    config = Path(__file__).resolve().parents[1] / "configs/pretrain/simclr_digits.yaml"
    run = pretrain(load_config(PretrainConfig, config, [
        "name=p", *common, "encoder.name=timm:test_resnet", "encoder.kwargs={}", "monitor.every_epochs=1",
        "monitor.knn_k=3", "method.params.projection_dim=8"]))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (run / "encoder.safetensors").is_file() and max(r.get("step", 0) for r in records) == 3
    out = capsys.readouterr().out
    assert "train 13 images in 3 classes from 2 tar shards" in out and "streamed from tar shards" in out
    tuned = finetune(load_config(FinetuneConfig, None, [
        "name=f", *common, "data.val_fraction=0.25", "arch.name=timm:test_resnet", "arch.kwargs={}"]))
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert 0 <= metrics["val_top1"] <= 1 and metrics["train_images"] == 12


def test_ordered_passes_and_in_memory_decode_read_the_same_pixels(tmp_path: Path) -> None:
    """What evaluation and the monitor do with a streamed split (ordered batches, indexed images) reads the
    members by their byte ranges: the pixels of the split decoded in memory, in order."""
    from reprlab.data.stream import ordered_batches

    name = f"shards:{_shards(tmp_path, [4, 3])}"
    memory, streamed = (load_dataset(name, image_size=8, val_fraction=0, stream=s, workers=0) for s in (False, True))
    batches = list(ordered_batches(streamed.train, 3))
    assert [len(b["index"]) for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat([b["images"] for b in batches]), memory.train.images)
    assert torch.equal(torch.cat([b["labels"] for b in batches]), memory.train.labels)
    assert torch.equal(streamed.train.images[torch.tensor([5, 0])], memory.train.images[[5, 0]])
    held = streamed.train.subset(torch.tensor([1, 6]))
    assert isinstance(held, ShardSet) and len(held.shards) == 2 and held.labels.tolist() == [1, 0]
