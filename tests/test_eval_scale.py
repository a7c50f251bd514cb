"""Evaluation at scale: the on-disk feature cache of streamed datasets (reuse, invalidation, atomic writes, DDP),
kNN over a bank read in chunks (= the in-memory search), approximate indexes with their measured recall, the
linear probe in mini-batches from the disk (= the in-memory probe with one chunk, close with many), and a
streamed evaluation end to end with the metrics of the in-memory one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import reprlab.evaluate.cache as cache_module
from reprlab.config import EvaluateConfig, load_config
from reprlab.data.datasets import load_dataset
from reprlab.evaluate.bank import measure_recall
from reprlab.evaluate.cache import FeatureArray, FeatureCache, dataset_fingerprint
from reprlab.evaluate.chunked_probe import moments
from reprlab.evaluate.knn import knn_classify, knn_search, select_knn
from reprlab.evaluate.linear_probe import train_linear_probe
from reprlab.evaluate.retrieval import retrieval_metrics
from reprlab.stages.evaluate import evaluate
from tests.test_stream import _folder, _image


def _array(tmp_path: Path, name: str, x: torch.Tensor, chunk_rows: int) -> FeatureArray:
    np.save(tmp_path / f"{name}.npy", x.numpy())
    return FeatureArray(tmp_path / f"{name}.npy", chunk_rows)


def _random(n: int, dim: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- the cache


def _streamed_train(root: Path):
    return load_dataset(f"folder:{root}", image_size=8, val_fraction=0, stream=True).train


def test_cache_is_reused_and_a_changed_file_list_or_file_recomputes(tmp_path: Path, monkeypatch) -> None:
    root = _folder(tmp_path / "imgs", 5)
    cache = FeatureCache(tmp_path / "cache")
    encoder, device = torch.nn.Flatten(), torch.device("cpu")

    def features(split):
        fingerprint = {"encoder": "flatten", "dataset": dataset_fingerprint(split, "train", "folder:x")}
        return cache.features(encoder, split, fingerprint, 3, device)

    split = _streamed_train(root)
    first, reused = features(split)
    assert not reused and first.shape == (10, 3 * 8 * 8) and first.dtype == "float32"
    expected = torch.cat([encoder(img[None].float() / 255) for img in split.images[torch.arange(10)]])
    assert torch.equal(first.load(), expected)  # the stream's rows, in file order
    real_extract = cache_module.extract_features
    monkeypatch.setattr(cache_module, "extract_features", lambda *a, **k: pytest.fail("the cache was not reused"))
    again, reused = features(_streamed_train(root))
    assert reused and again.path == first.path and torch.equal(again.load(), first.load())

    monkeypatch.setattr(cache_module, "extract_features", real_extract)
    from torchvision.io import write_png

    write_png(_image(99, 8, 8), str(root / "a" / "new.png"))  # one more file: another key
    grown, reused = features(_streamed_train(root))
    assert not reused and grown.path != first.path and len(grown) == 11
    stat = os.stat(root / "b" / "0.png")
    os.utime(root / "b" / "0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a file touched
    _, reused = features(_streamed_train(root))
    assert not reused
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(list((tmp_path / "cache").glob("*.json"))) == 3


def test_a_killed_write_leaves_no_trusted_cache(tmp_path: Path) -> None:
    split = _streamed_train(_folder(tmp_path / "imgs", 5))
    cache = FeatureCache(tmp_path / "cache")
    fingerprint = {"encoder": "boom", "dataset": dataset_fingerprint(split, "train", "folder:x")}
    calls = []

    class Dies(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            if len(calls) == 2:
                raise KeyboardInterrupt  # killed after the first batch was written
            return x.flatten(1)

    with pytest.raises(KeyboardInterrupt):
        cache.features(Dies(), split, fingerprint, 4, torch.device("cpu"))
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary array is gone, nothing renamed
    array, reused = cache.features(torch.nn.Flatten(), split, fingerprint, 4, torch.device("cpu"))
    assert not reused
    array.path.with_suffix(".json").unlink()  # an array without its sidecar (killed between the renames)
    key = array.path.stem[len("features-"):]
    assert cache.lookup(key) is None and cache.features(torch.nn.Flatten(), split, fingerprint, 4, "cpu")[1] is False
    (tmp_path / "cache" / ".features-x.npy.abc.tmp").write_bytes(b"half")
    cache.sweep()
    assert not list((tmp_path / "cache").glob(".*"))


def test_float16_cache_holds_the_float32_features_rounded(tmp_path: Path) -> None:
    split = _streamed_train(_folder(tmp_path / "imgs", 4))
    fingerprint = {"encoder": "flatten", "dataset": dataset_fingerprint(split, "train", "folder:x")}
    full, _ = FeatureCache(tmp_path / "c", "float32").features(torch.nn.Flatten(), split, fingerprint, 3, "cpu")
    half, _ = FeatureCache(tmp_path / "c", "float16").features(torch.nn.Flatten(), split, fingerprint, 3, "cpu")
    assert half.dtype == "float16" and half.path != full.path
    assert torch.equal(half.load(), full.load().half().float())
    assert half.path.stat().st_size < 0.6 * full.path.stat().st_size


def _ddp_cache(rank: int, root: str, cache_dir: str) -> dict:
    split = load_dataset(f"folder:{root}", image_size=8, val_fraction=0, stream=True).train
    fingerprint = {"encoder": "flatten", "dataset": dataset_fingerprint(split, "train", "folder:x")}
    out = {}
    for attempt in ("first", "again"):  # the second call finds the cache rank 0 wrote
        array, reused = FeatureCache(Path(cache_dir)).features(torch.nn.Flatten(), split, fingerprint, 2, "cpu")
        out[attempt] = array.load() if array is not None else torch.empty(0)
        out[f"{attempt}_reused"] = torch.tensor(reused)
        out[f"{attempt}_leftovers"] = torch.tensor(len(list(Path(cache_dir).glob(".*"))))
    return out


def test_ddp_ranks_each_stream_a_share_and_rank_0_writes_the_cache(tmp_path: Path) -> None:
    from torchvision.io import write_png

    from tests.gloo import run_on_ranks

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(7):  # 7 files over 2 ranks: the padding repeats the first file
        write_png(_image(i, 9, 11), str(root / f"{i}.png"))
    ranks = run_on_ranks(_ddp_cache, tmp_path, str(root), str(tmp_path / "cache"))
    single = torch.nn.Flatten()(_streamed_train(root).images[torch.arange(7)].float() / 255)
    assert torch.equal(ranks[0]["first"], single) and ranks[1]["first"].numel() == 0  # rank 0 holds the array
    assert not any(bool(r["first_reused"]) for r in ranks) and all(bool(r["again_reused"]) for r in ranks)
    assert torch.equal(ranks[0]["again"], single)
    assert int(ranks[0]["again_leftovers"]) == 0  # the rank parts were removed


# ------------------------------------------------------------------------------------------- kNN


@pytest.mark.parametrize("backend", ["auto", "faiss", "faiss_heap", "torch"])
def test_chunked_search_equals_the_in_memory_search(tmp_path: Path, backend: str) -> None:
    bank, queries = _random(300), _random(45, seed=1)
    expected = knn_search(bank, queries, 10, backend=backend)
    for chunked in (knn_search(bank, queries, 10, backend=backend, bank_chunk=7),
                    knn_search(_array(tmp_path, "b", bank, 11), _array(tmp_path, "q", queries, 4), 10,
                               backend=backend)):
        assert torch.equal(chunked[1], expected[1])
        torch.testing.assert_close(chunked[0], expected[0], rtol=0, atol=1e-6)
    whole = knn_search(bank, queries, 500, backend=backend, bank_chunk=64)  # k > bank: the whole bank
    assert whole[1].shape == (45, 300) and torch.equal(whole[1], knn_search(bank, queries, 500, backend=backend)[1])
    leave_one_out = knn_search(_array(tmp_path, "b", bank, 13), _array(tmp_path, "b", bank, 13), 5, backend=backend,
                               exclude_self=True)
    assert torch.equal(leave_one_out[1], knn_search(bank, bank, 5, backend=backend, exclude_self=True)[1])


def test_classify_select_and_retrieval_read_an_on_disk_bank_as_memory(tmp_path: Path) -> None:
    bank, queries = _random(200), _random(60, seed=1)
    labels, query_labels = torch.arange(200) % 4, torch.arange(60) % 4
    disk_bank, disk_queries = _array(tmp_path, "b", bank, 17), _array(tmp_path, "q", queries, 9)
    a = knn_classify(bank, labels, queries, k=7, temperature=0.1)
    b = knn_classify(disk_bank, labels, disk_queries, k=7, temperature=0.1)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=0)
    assert torch.equal(a.predictions, b.predictions)
    grid = dict(ks=(3, 10), temperatures=(0.05, 0.2))
    assert select_knn(bank, labels, queries, query_labels, **grid) == select_knn(disk_bank, labels, disk_queries,
                                                                                 query_labels, **grid)
    assert retrieval_metrics(bank, labels, queries, query_labels) == retrieval_metrics(disk_bank, labels,
                                                                                      disk_queries, query_labels)


def test_approximate_indexes_over_an_on_disk_bank_report_their_recall(tmp_path: Path) -> None:
    bank, queries = _random(400, 8), _random(50, 8, seed=1)
    disk = _array(tmp_path, "b", bank, 64)
    exact = measure_recall(disk, queries, 10, "ivf", nlist=8, nprobe=8)  # every list probed: exact
    assert exact == {"recall": 1.0, "k": 10, "queries": 50, "index": "ivf"}
    hnsw = measure_recall(disk, queries, 10, "hnsw", sample=20)
    assert 0.5 <= hnsw["recall"] <= 1.0 and hnsw["queries"] == 20
    sims, idx = knn_search(disk, queries, 10, backend="faiss", index="hnsw")
    assert idx.shape == (50, 10) and bool((sims[:, :-1] >= sims[:, 1:]).all())
    with pytest.raises(ValueError, match="exact"):
        measure_recall(disk, queries, 10, "flat")


# ------------------------------------------------------------------------------------------- probe


def _clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 2
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    return centers[labels] + 1.5 * torch.randn(n, 16, generator=generator) + 3, labels


def test_probe_in_mini_batches_from_the_disk_equals_or_approaches_the_in_memory_probe(tmp_path: Path) -> None:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (_clusters(n, s) for n, s in ((700, 1), (200, 2),
                                                                                          (300, 3)))
    settings = dict(lrs=(1e-2, 1e-1), weight_decays=(0.0, 1e-3), epochs=15, batch_size=64, seed=0)
    memory = train_linear_probe(train_x, train_y, val_x, val_y, **settings)
    one_chunk = train_linear_probe(_array(tmp_path, "t", train_x, 10_000), train_y,
                                   _array(tmp_path, "v", val_x, 10_000), val_y, **settings)
    assert torch.equal(one_chunk.model.linear.weight, memory.model.linear.weight)
    assert one_chunk.grid == memory.grid and one_chunk.hyperparameters == memory.hyperparameters
    many = train_linear_probe(_array(tmp_path, "t", train_x, 128), train_y, _array(tmp_path, "v", val_x, 50),
                              val_y, **settings)  # 6 block-shuffled chunks of 128 rows, val in 4 chunks
    weights = memory.model.linear.weight, many.model.linear.weight
    assert torch.nn.functional.cosine_similarity(weights[0].flatten(), weights[1].flatten(), dim=0) > 0.98
    top1 = memory.evaluate(test_x, test_y)
    assert abs(many.evaluate(_array(tmp_path, "q", test_x, 7), test_y) - top1) <= 0.02
    assert many.evaluate(test_x, test_y) == many.evaluate(_array(tmp_path, "q", test_x, 7), test_y)


def test_chunked_moments_match_the_whole_array(tmp_path: Path) -> None:
    x = _clusters(1000, 5)[0] * 100 + 1e4  # a large mean: the naive sum of squares would lose the std
    mean, std = moments(_array(tmp_path, "x", x, 10_000), 10_000)
    assert torch.equal(mean, x.mean(0)) and torch.equal(std, x.std(0, unbiased=False) + 1e-6)
    chunked = moments(_array(tmp_path, "x", x, 10_000), 97)
    torch.testing.assert_close(chunked[0], x.double().mean(0).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked[1], x.double().std(0, unbiased=False).float() + 1e-6, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------- end to end


def _evaluate(tmp_path: Path, root: Path, name: str, *extra: str) -> Path:
    return evaluate(load_config(EvaluateConfig, None, [
        f"name={name}", f"out_dir={tmp_path}/runs", f"data.name=folder:{root}", "data.image_size=16",
        "data.workers=0", "data.val_fraction=0.25", "data.test_fraction=0.25", "encoders=[random, pixels]",
        "arch.name=timm:test_resnet", "arch.kwargs={}", "knn.k=3", "knn.ks=[1, 3]", "quality_images=4",
        "report_map=pca", "probe_epochs=20", "probe_batch_size=4", *extra]))


def _metrics(run: Path) -> dict:
    summary = json.loads((run / "metrics.json").read_text())
    for encoder in summary["encoders"].values():
        encoder.pop("timings_s")
    return {k: v for k, v in summary.items() if k not in ("settings", "table")}


def test_streamed_evaluation_equals_in_memory_and_keeps_large_features_on_disk(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "imgs", 12)
    memory = _metrics(_evaluate(tmp_path, root, "m", "data.stream=false"))
    streamed = _evaluate(tmp_path, root, "s", "data.stream=true")
    assert _metrics(streamed) == memory
    out = capsys.readouterr().out
    assert out.count("float32 features in") == 2 and "computed: train, val, test" in out and "read into memory" in out
    assert _metrics(_evaluate(tmp_path, root, "s", "data.stream=true", "report=false")) == memory
    assert capsys.readouterr().out.count("(reused from the cache: train, val, test)") == 2

    # Larger than the memory limit: every metric reads the features from the disk, in chunks of 5 rows.
    disk = _metrics(_evaluate(tmp_path, root, "d", "data.stream=true", "data.memory_limit_gb=1e-9",
                              "feature_chunk_rows=5"))
    assert "kept on disk, read 5 rows at a time" in capsys.readouterr().out
    for label, expected in memory["encoders"].items():
        got = disk["encoders"][label]
        for key in ("knn_top1", "knn_top5", "knn_k", "knn_temperature", "knn_grid", "retrieval"):
            _assert_close(got[key], expected[key], key)
        assert abs(got["linear_probe_top1"] - expected["linear_probe_top1"]) <= 1 / 6 + 1e-6  # 6 test images
        assert "sklearn_probe_top1" not in got and "scikit-learn needs them in memory" in got["sklearn_probe_skipped"]
        assert got["quality"] == pytest.approx(expected["quality"], rel=1e-4)
    report = (tmp_path / "runs" / "d" / "report.md").read_text()
    assert "scikit-learn probe skipped" in report and "PCA of the 6 test embeddings" in report


def test_the_report_says_its_map_is_a_sample_and_an_approximate_index_its_recall(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", 12)
    run = _evaluate(tmp_path, root, "a", "data.stream=true", "report_points=4", "knn.index=hnsw", "sklearn_probe=false",
                    "encoders=[pixels]")
    metrics = json.loads((run / "metrics.json").read_text())["encoders"]["pixels"]
    assert metrics["knn_recall"] == {"recall": 1.0, "k": 3, "queries": 6, "index": "hnsw",
                                     "against": "exact search", "split": "reported"}
    report = (run / "report.md").read_text()
    assert "PCA of a seeded sample of 4 of the 6 test embeddings (report_points)" in report
    assert "kNN index hnsw is approximate: its recall@3 against exact search on 6 seeded test queries: pixels 1.000" \
        in report


def test_bad_scale_settings_fail_in_one_line(tmp_path: Path) -> None:
    from reprlab.checks import ConfigError

    for override, message in (("feature_cache_dtype=bfloat16", "feature_cache_dtype"),
                              ("feature_chunk_rows=0", "feature_chunk_rows=0"),
                              ("knn.recall_queries=-1", "knn.recall_queries=-1")):
        with pytest.raises(ConfigError, match=message):
            _evaluate(tmp_path, tmp_path, "x", override)


def _assert_close(got, expected, where: str) -> None:
    """Equal structure, numbers within pytest.approx's default tolerance (approx itself refuses nesting)."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            _assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_close(g, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected), where
    else:
        assert got == expected, where
