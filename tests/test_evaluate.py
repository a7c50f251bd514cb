"""The evaluation stage: metrics.json on digits for several encoders, selection that never reads test,
feature caching."""

import json
import math

import pytest
import torch

import reprlab.evaluate.suite as suite_module
import reprlab.stages.evaluate as run_module
from reprlab.checkpoint import save_encoder
from reprlab.config import DataConfig, EncoderConfig, EvaluateConfig, KNNConfig
from reprlab.data.datasets import load_dataset
from reprlab.evaluate.knn import knn_classify
from reprlab.evaluate.retrieval import chunked_retrieval, retrieval_metrics
from reprlab.evaluate.suite import Split, choose_knn_settings, evaluate_features
from reprlab.models.encoders import create_encoder
from reprlab.stages.evaluate import evaluate

TINY_ARCH = EncoderConfig(name="timm:test_resnet")  # 0.4 M parameters, accepts 8x8 greyscale digits


def tiny_config(tmp_path, encoders, **overrides) -> EvaluateConfig:
    settings = dict(name="eval", out_dir=str(tmp_path), encoders=encoders, arch=TINY_ARCH,
                    data=DataConfig(name="digits", limit=200),
                    knn=KNNConfig(ks=[5, 20], temperatures=[0.07, 0.5]), probe_epochs=5,
                    probe_lrs=[0.01, 0.1], probe_weight_decays=[0.0, 1e-3], sklearn_cs=[0.1, 1.0],
                    sklearn_max_iter=200,
                    quality_images=64, report=False, device="cpu")
    settings.update(overrides)
    return EvaluateConfig(**settings)


def make_run_dir(path, method="simclr"):
    """A pretraining run directory as pretrain() leaves it (untrained tiny weights, a short metrics.jsonl)."""
    torch.manual_seed(1)
    encoder = create_encoder(TINY_ARCH.name)
    config = {"method": {"name": method, "params": {"augment": {"crop_scale": [0.5, 1.0], "flip_p": 0.0}}}}
    save_encoder(path, encoder, {"method": method, "dataset": "digits", "config": config, "metrics": {}})
    records = [{"epoch": 1, "step": 1, "loss": 4.8}, {"epoch": 1, "step": 2, "loss": 4.6},
               {"epoch": 1, "event": "epoch_end", "loss": 4.7, "knn_top1": 0.4, "effective_rank": 20.0},
               {"epoch": 2, "step": 3, "loss": 4.3}, {"epoch": 2, "step": 4, "loss": 4.1},
               {"epoch": 2, "event": "epoch_end", "loss": 4.2, "knn_top1": 0.55, "effective_rank": 24.0}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ENCODER_KEYS = {"knn_top1", "knn_top5", "knn_k", "knn_temperature", "knn_selected_on", "knn_val_top1",
                "knn_grid", "retrieval", "linear_probe_top1", "linear_probe_val_top1", "linear_probe_params",
                "sklearn_probe_top1", "sklearn_probe_val_top1", "sklearn_probe_params", "quality",
                "alignment", "effective_rank", "embedding_std", "feature_dim", "reported_on", "source",
                "timings_s"}


def test_random_and_pixels_on_digits_write_metrics_and_reuse_cached_features(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, ["random", "pixels"])
    summary = json.loads((evaluate(cfg) / "metrics.json").read_text())

    assert list(summary["encoders"]) == ["random timm:test_resnet", "pixels"]
    assert summary["reported_on"] == "test" and summary["settings"]["knn"]["select_on_val"] is True
    sizes = summary["num_images"]
    assert sizes["test"] == 359 and sizes["val"] == 20 and 170 < sizes["train"] <= 180  # limit=200, 10% val
    for metrics in summary["encoders"].values():
        assert ENCODER_KEYS <= set(metrics)
        assert metrics["knn_selected_on"] == "val" and metrics["reported_on"] == "test"
        assert metrics["knn_k"] in (5, 20) and metrics["knn_temperature"] in (0.07, 0.5)
        assert len(metrics["knn_grid"]) == 4
        assert {"precision@1", "recall@5", "map@r", "r_precision"} <= set(metrics["retrieval"])
        assert {"alignment", "uniformity", "effective_rank", "embedding_std"} <= set(metrics["quality"])
        for key in ("knn_top1", "knn_top5", "linear_probe_top1", "sklearn_probe_top1"):
            assert 0 < metrics[key] <= 1
        assert metrics["knn_top5"] >= metrics["knn_top1"]
    pixels = summary["encoders"]["pixels"]
    assert pixels["feature_dim"] == 64 and pixels["knn_top1"] > 0.8  # raw 8x8 digits are easy for kNN

    # The reported kNN number is the test accuracy of the chosen (k, temperature), recomputed independently.
    data = load_dataset("digits", limit=200, seed=0)
    pixels_train = data.train.images.flatten(1).float() / 255
    result = knn_classify(pixels_train, data.train.labels, data.test.images.flatten(1).float() / 255,
                          k=pixels["knn_k"], temperature=pixels["knn_temperature"])
    assert pixels["knn_top1"] == pytest.approx(result.topk(data.test.labels, 1))

    # A second run reads every split's features from the cache: extracting them again would fail here.
    monkeypatch.setattr(run_module, "extract_features", lambda *a, **k: pytest.fail("features not cached"))
    again = json.loads((evaluate(tiny_config(tmp_path, ["random", "pixels"], quality_images=0))
                        / "metrics.json").read_text())
    assert again["encoders"]["pixels"]["knn_top1"] == pixels["knn_top1"]


def test_pretrained_run_dir_with_random_and_pixels_gives_one_table(tmp_path):
    run_dir = make_run_dir(tmp_path / "runs" / "tiny")
    cfg = tiny_config(tmp_path, [str(run_dir), "random", "pixels"], arch=EncoderConfig(name="resnet50"))
    summary = json.loads((evaluate(cfg) / "metrics.json").read_text())

    # "random" takes the run's architecture, not cfg.arch (resnet50 would give 2048-d features)
    assert list(summary["encoders"]) == ["tiny", "random timm:test_resnet", "pixels"]
    assert summary["encoders"]["random timm:test_resnet"]["feature_dim"] == 96
    assert summary["encoders"]["tiny"]["source"] == str(run_dir)
    # alignment views use cfg.alignment_views (not the run's augmentation), the same for every encoder, and
    # metrics.json records the settings used
    views = summary["alignment_views"]
    assert views["crop_scale"] == [0.2, 1.0] and views["flip_p"] == 0.5 and views["images"] == 20
    assert views == summary["settings"]["alignment_views"] | {"images": 20, "split": "val"}
    for metrics in summary["encoders"].values():
        assert ENCODER_KEYS <= set(metrics)
    table = summary["table"].splitlines()
    assert len(table) == 2 + 3 and table[0].startswith("| encoder | kNN top-1")
    assert [row.split("|")[1].strip() for row in table[2:]] == list(summary["encoders"])


def clustered(n, dim=16, classes=4, seed=0, spread=1.0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    return Split(centres[labels] + spread * torch.randn(n, dim, generator=generator), labels)


def test_selection_never_reads_the_test_split(monkeypatch):
    train, val, test = clustered(120, seed=0), clustered(40, seed=1), clustered(60, seed=2, spread=2.0)
    cfg = EvaluateConfig(knn=KNNConfig(ks=[1, 5, 30], temperatures=[0.05, 0.5]), probe_epochs=5,
                         probe_lrs=[0.01, 0.1], probe_weight_decays=[0.0], sklearn_cs=[0.1, 1.0],
                         sklearn_max_iter=100, quality_max_features=100)
    seen = {"select": [], "classify_queries": []}

    def is_test(tensor):
        return isinstance(tensor, torch.Tensor) and tensor.shape == test.features.shape and \
            torch.equal(tensor, test.features)

    def spy(name, key):
        original = getattr(suite_module, name)

        def wrapped(*args, **kwargs):
            seen[key].extend(a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor))
            return original(*args, **kwargs)

        monkeypatch.setattr(suite_module, name, wrapped)

    for name in ("select_knn", "train_linear_probe", "sklearn_linear_probe"):
        spy(name, "select")
    original_classify = suite_module.knn_classify
    monkeypatch.setattr(suite_module, "knn_classify", lambda bank, labels, queries, **kw: (
        seen["classify_queries"].append(queries), original_classify(bank, labels, queries, **kw))[1])

    first = evaluate_features(train, val, test, cfg).metrics
    assert seen["select"] and not any(is_test(t) for t in seen["select"])
    assert len(seen["classify_queries"]) == 1 and is_test(seen["classify_queries"][0])  # test read once

    # Black box: a different test split changes the reported numbers, never the chosen settings.
    other = clustered(60, seed=3, spread=4.0)
    second = evaluate_features(train, val, Split(other.features, other.labels.roll(1)), cfg).metrics
    for key in ("knn_k", "knn_temperature", "knn_val_top1", "linear_probe_params", "linear_probe_val_top1",
                "sklearn_probe_params", "sklearn_probe_val_top1"):
        assert first[key] == second[key], key
    assert first["knn_top1"] != second["knn_top1"]


def test_without_test_split_nothing_is_selected_on_the_reported_split():
    train, val = clustered(80, seed=0), clustered(20, seed=1)
    metrics = evaluate_features(train, val, None, EvaluateConfig(quality_max_features=100)).metrics
    assert metrics["reported_on"] == "val"
    assert metrics["knn_selected_on"] == "defaults (no validation split)"
    assert (metrics["knn_k"], metrics["knn_temperature"]) == (20, 0.07)
    assert "linear_probe_top1" not in metrics and "knn_grid" not in metrics


def test_knn_ties_go_to_the_default_k_and_temperature():
    # Well separated clusters: every grid cell reaches 100% on val, so the configured defaults win the tie.
    train, val = clustered(200, spread=0.01), clustered(40, seed=1, spread=0.01)
    chosen = choose_knn_settings(train, val, KNNConfig(k=20, temperature=0.07))
    assert {row["val_top1"] for row in chosen["grid"]} == {1.0}
    assert (chosen["k"], chosen["temperature"], chosen["selected_on"]) == (20, 0.07, "val")
    moved = choose_knn_settings(train, val, KNNConfig(k=50, temperature=0.2))  # select_knn's rule, our defaults
    assert (moved["k"], moved["temperature"]) == (50, 0.2)
    off = choose_knn_settings(train, val, KNNConfig(k=7, temperature=0.3, select_on_val=False))
    assert (off["k"], off["temperature"]) == (7, 0.3) and "grid" not in off


def test_chunked_retrieval_equals_one_call():
    bank, queries = clustered(50, classes=5, seed=0, spread=3.0), clustered(23, classes=5, seed=1, spread=3.0)
    queries.labels[0] = 99  # a query whose class is absent from the bank (R = 0)
    whole = retrieval_metrics(bank.features, bank.labels, queries.features, queries.labels, ks=(1, 5))
    chunked = chunked_retrieval(bank.features, bank.labels, queries.features, queries.labels, (1, 5), "faiss",
                                chunk=7)
    assert set(chunked) == set(whole)
    for key, value in whole.items():
        both_nan = math.isnan(value) and math.isnan(chunked[key])
        assert both_nan or chunked[key] == pytest.approx(value, abs=1e-12), key


def test_unknown_encoder_reference_names_the_fix(tmp_path):
    with pytest.raises(Exception, match="'random' or 'pixels'"):
        run_module.resolve_encoders([str(tmp_path / "missing")], TINY_ARCH)


@pytest.mark.parametrize("override, message", [
    ({"report_map": "umap"}, "unknown report_map 'umap'"),
    ({"knn": KNNConfig(backend="annoy")}, "unknown knn.backend 'annoy'"),
    ({"knn": KNNConfig(backend="torch", index="hnsw")}, "needs knn.backend=faiss"),
])
def test_bad_settings_fail_before_any_work(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        evaluate(tiny_config(tmp_path, ["pixels"], **override))
    assert not (tmp_path / "eval").exists()


def test_few_label_evaluation_banks_only_the_labeled_subset(tmp_path, monkeypatch):
    """labels_per_class: kNN and the probes see k labels per class; quality still sees every train image."""
    import reprlab.evaluate.suite as suite

    seen: dict[str, int] = {}
    original_knn, original_quality = suite.knn_metrics, suite.quality_report

    def knn_metrics(train, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        seen["bank"] = len(train.labels)
        seen["per_class"] = int(torch.bincount(train.labels).max())
        return original_knn(train, *args, **kwargs)

    def quality_report(features, **kwargs):  # noqa: ANN001, ANN003
        seen["quality"] = len(features)
        return original_quality(features, **kwargs)

    monkeypatch.setattr(suite, "knn_metrics", knn_metrics)
    monkeypatch.setattr(suite, "quality_report", quality_report)
    cfg = tiny_config(tmp_path, ["pixels"], labels_per_class=3, sklearn_probe=False, retrieval_ks=[1])
    summary = json.loads((evaluate(cfg) / "metrics.json").read_text())
    assert seen["bank"] == 30 and seen["per_class"] == 3 and summary["labeled_train_images"] == 30
    assert seen["quality"] == summary["num_images"]["train"] > 30
    assert summary["encoders"]["pixels"]["labeled_train_images"] == 30
