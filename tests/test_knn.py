"""kNN search / classification against a pure-Python reference, on the small cases peers get wrong."""

import math

import numpy as np
import pytest
import torch

import reprlab.evaluate.knn as knn_module
from reprlab.evaluate.knn import BACKENDS, KNNResult, knn_classify, knn_search, measure_recall, select_knn


def random_features(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def naive_knn_scores(bank, bank_labels, queries, k, temperature, exclude_self=False):
    """Loops and dicts: one {label: vote mass} per query, every bank label present."""
    bank = [[float(v) for v in row] for row in bank]
    queries = [[float(v) for v in row] for row in queries]
    bank_labels = [int(label) for label in bank_labels]

    def unit(row):
        norm = math.sqrt(sum(v * v for v in row))
        return [v / norm for v in row]

    bank = [unit(row) for row in bank]
    all_scores = []
    for i, query in enumerate(queries):
        query = unit(query)
        neighbours = []
        for j, item in enumerate(bank):
            if exclude_self and i == j:
                continue
            neighbours.append((sum(a * b for a, b in zip(query, item)), j))
        neighbours.sort(key=lambda pair: -pair[0])
        scores = {label: 0.0 for label in sorted(set(bank_labels))}
        for similarity, j in neighbours[:k]:
            scores[bank_labels[j]] += math.exp(similarity / temperature)
        all_scores.append(scores)
    return all_scores


def naive_topk(all_scores, labels, k):
    correct = 0
    for scores, label in zip(all_scores, labels):
        ranked = sorted(scores, key=lambda c: (-scores[c], c))[:k]
        correct += int(label) in [c for c in ranked if scores[c] > 0]
    return correct / len(labels)


def assert_matches_naive(result: KNNResult, naive, labels):
    classes = sorted(naive[0])
    assert result.classes.tolist() == classes
    expected = torch.tensor([[scores[c] for c in classes] for scores in naive], dtype=torch.float64)
    torch.testing.assert_close(result.scores, expected, rtol=1e-4, atol=0)
    expected_predictions = [max(classes, key=lambda c: (scores[c], -c)) for scores in naive]
    assert result.predictions.tolist() == expected_predictions
    for k in (1, 5):
        assert result.topk(labels, k=k) == pytest.approx(naive_topk(naive, labels, k))


@pytest.mark.parametrize("backend", ["faiss", "faiss_heap", "torch", "auto"])
@pytest.mark.parametrize(
    "case",
    [
        # (bank size, queries, k, bank label pool, query label pool)
        dict(
            num_bank=40, num_queries=3, k=5, bank_pool=[3, 7, 100], query_pool=[3, 7]
        ),  # 3 queries, missing class
        dict(num_bank=12, num_queries=7, k=50, bank_pool=[0, 1, 2, 5], query_pool=[0, 1, 2, 5]),  # k > bank
        dict(
            num_bank=30, num_queries=9, k=2, bank_pool=[10, 20, 30, 40, 50, 60, 70], query_pool=[10, 40, 70]
        ),
        dict(
            num_bank=30, num_queries=9, k=3, bank_pool=[4, 8], query_pool=[4, 8, 99]
        ),  # < 5 classes, unseen 99
    ],
)
def test_knn_classify_matches_naive(backend, case):
    generator = np.random.default_rng(1)
    bank, queries = random_features(case["num_bank"], seed=2), random_features(case["num_queries"], seed=3)
    bank_labels = torch.as_tensor(generator.choice(case["bank_pool"], case["num_bank"]))
    bank_labels[: len(case["bank_pool"])] = torch.as_tensor(case["bank_pool"])  # every class in the bank
    query_labels = torch.as_tensor(generator.choice(case["query_pool"], case["num_queries"]))
    result = knn_classify(bank, bank_labels, queries, k=case["k"], temperature=0.1, backend=backend)
    assert result.scores.shape == (case["num_queries"], len(case["bank_pool"]))
    naive = naive_knn_scores(bank, bank_labels, queries, case["k"], 0.1)
    assert_matches_naive(result, naive, query_labels)


@pytest.mark.parametrize("backend", ["faiss", "faiss_heap", "torch", "auto"])
def test_leave_one_out_matches_naive(backend):
    bank = random_features(25, seed=4)
    labels = torch.tensor([3, 7, 100, 3, 7] * 5)
    result = knn_classify(bank, labels, bank, k=4, temperature=0.07, backend=backend, exclude_self=True)
    naive = naive_knn_scores(bank, labels, bank, 4, 0.07, exclude_self=True)
    assert_matches_naive(result, naive, labels)
    # Without leave-one-out every query finds itself first: 100% top-1 is the bug LOO prevents.
    cheating = knn_classify(bank, labels, bank, k=1, backend=backend)
    assert cheating.topk(labels) == 1.0


@pytest.mark.parametrize("backend", ["faiss", "faiss_heap", "torch", "auto"])
def test_leave_one_out_with_duplicates_drops_by_index(backend):
    base = random_features(6, seed=5)
    bank = torch.cat([base, base, base])  # every row has two exact duplicates
    sims, idx = knn_search(bank, bank, k=4, backend=backend, exclude_self=True)
    assert idx.shape == (18, 4)
    assert not (idx == torch.arange(18)[:, None]).any(), "a query returned itself"
    for i in range(18):
        duplicates = {j for j in range(18) if j % 6 == i % 6 and j != i}
        assert duplicates <= set(idx[i].tolist())  # both copies found, at similarity 1
    torch.testing.assert_close(sims[:, :2], torch.ones(18, 2))
    # More copies than k + 1: self may be ranked out of the searched list and must still never come back.
    bank = torch.cat([base[:1].repeat(10, 1), base[1:]])
    sims, idx = knn_search(bank, bank, k=2, backend=backend, exclude_self=True)
    assert idx.shape == (15, 2)
    assert not (idx == torch.arange(15)[:, None]).any(), "a query returned itself"


def test_faiss_and_torch_agree_on_random_data():
    bank, queries = random_features(500, dim=16, seed=6), random_features(150, dim=16, seed=7)
    faiss_sims, faiss_idx = knn_search(bank, queries, k=20, backend="faiss")
    torch_sims, torch_idx = knn_search(bank, queries, k=20, backend="torch", chunk_size=7)
    assert torch.equal(faiss_idx, torch_idx)
    torch.testing.assert_close(faiss_sims, torch_sims, rtol=0, atol=1e-5)
    labels = torch.arange(500) % 10
    for backend_kwargs in ({"backend": "faiss"}, {"backend": "torch"}):
        result = knn_classify(bank, labels, queries, k=20, **backend_kwargs)
        assert torch.equal(result.predictions, knn_classify(bank, labels, queries, k=20).predictions)


def test_search_normalizes_and_handles_numpy_and_tiny_sets():
    bank, queries = random_features(10, seed=8), random_features(3, seed=9)
    sims, idx = knn_search(bank.numpy() * 5.0, queries.numpy(), k=100, backend="torch")
    assert sims.shape == idx.shape == (3, 10)  # k larger than the bank: the whole bank
    expected = torch.nn.functional.normalize(queries) @ torch.nn.functional.normalize(bank).T
    torch.testing.assert_close(sims, expected.sort(dim=1, descending=True).values)
    for chunk_size in (0, 1, 1024):  # a 0 chunk (peers' N // 100) must not break the loop
        assert torch.equal(
            knn_search(bank, queries, 4, backend="torch", chunk_size=chunk_size)[1], idx[:, :4]
        )
    sims, idx = knn_search(bank[:1], bank[:1], k=5, exclude_self=True)
    assert idx.shape == (1, 0)


def test_bad_arguments_name_the_choices():
    bank = random_features(5)
    with pytest.raises(ValueError, match="unknown backend 'annoy'"):
        knn_search(bank, bank, 2, backend="annoy")
    with pytest.raises(ValueError, match="unknown index 'lsh'"):
        knn_search(bank, bank, 2, index="lsh")
    with pytest.raises(ValueError, match="exclude_self"):
        knn_search(bank, bank[:3], 2, exclude_self=True)
    with pytest.raises(ValueError, match="exact only"):
        knn_search(bank, bank, 2, backend="torch", index="ivf")


def test_top5_with_fewer_neighbours_or_classes_by_hand():
    # 2 queries, 4 classes; query 0 voted {7: 2.0, 9: 1.0}, query 1 voted {3: 0.5}.
    result = KNNResult(
        scores=torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.5, 0.0, 0.0, 0.0]], dtype=torch.float64),
        classes=torch.tensor([3, 7, 8, 9]),
    )
    assert result.predictions.tolist() == [7, 3]
    assert result.topk(torch.tensor([9, 3]), k=1) == 0.5
    assert result.topk(torch.tensor([9, 3]), k=5) == 1.0
    # class 8 got no vote: a top-5 over 4 classes must not count it as predicted
    assert result.topk(torch.tensor([8, 7]), k=5) == 0.0
    assert result.topk(torch.tensor([42, 3]), k=5) == 0.5  # label not in the bank is wrong


def clustered(num_per_class: int, labels: list[int], dim: int = 8, noise: float = 0.6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(labels), dim, generator=generator)
    y = torch.tensor(labels).repeat_interleave(num_per_class)
    x = centers.repeat_interleave(num_per_class, dim=0) + noise * torch.randn(
        len(y), dim, generator=generator
    )
    return x, y


def test_select_knn_is_the_argmax_of_its_val_grid(monkeypatch):
    bank, bank_labels = clustered(30, [1, 4, 6], noise=1.2, seed=10)
    val, val_labels = clustered(10, [1, 4, 6], noise=1.2, seed=11)
    searched = []
    real_search = knn_module.knn_search

    def recording_search(bank_arg, queries, k, *args, **kwargs):
        searched.append((queries, k))
        return real_search(bank_arg, queries, k, *args, **kwargs)

    monkeypatch.setattr(knn_module, "knn_search", recording_search)
    ks, temperatures = (1, 5, 20, 500), (0.05, 0.07, 0.5)
    choice = select_knn(bank, bank_labels, val, val_labels, ks=ks, temperatures=temperatures)
    assert len(searched) == 1 and searched[0][0] is val and searched[0][1] == 500  # one search, on val only
    monkeypatch.undo()

    assert [(row["k"], row["temperature"]) for row in choice["grid"]] == [
        (k, t) for k in ks for t in temperatures
    ]
    for row in choice["grid"]:  # every grid value equals a separate kNN run on val
        separate = knn_classify(bank, bank_labels, val, k=row["k"], temperature=row["temperature"])
        assert row["val_top1"] == separate.topk(val_labels)
    best = max(row["val_top1"] for row in choice["grid"])
    assert choice["val_top1"] == best
    first_best = min(  # ties: closest to the defaults k=20, T=0.07 in log ratio, then the smaller k
        (row for row in choice["grid"] if row["val_top1"] == best),
        key=lambda row: (abs(math.log(row["k"] / 20)) + abs(math.log(row["temperature"] / 0.07)), row["k"]),
    )
    assert (choice["k"], choice["temperature"]) == (first_best["k"], first_best["temperature"])


def test_select_knn_ties_go_to_the_setting_closest_to_the_defaults():
    bank, bank_labels = clustered(20, [0, 1], noise=0.01, seed=12)  # trivially separable: all configs 100%
    val, val_labels = clustered(5, [0, 1], noise=0.01, seed=12)
    ks, temperatures = (20, 10, 50), (0.5, 0.05, 0.1)
    choice = select_knn(bank, bank_labels, val, val_labels, ks=ks, temperatures=temperatures)
    assert all(row["val_top1"] == 1.0 for row in choice["grid"])
    # defaults k=20, T=0.07: k=20 exactly; 0.05 is 1.4x below 0.07, 0.1 is 1.43x above
    assert (choice["k"], choice["temperature"]) == (20, 0.05)
    moved = select_knn(bank, bank_labels, val, val_labels, ks=ks, temperatures=temperatures, default_k=40,
                       default_temperature=0.4)
    assert (moved["k"], moved["temperature"]) == (50, 0.5)  # 50 / 40 is closer than 40 / 20
    # k = 10 and 40 are equally far (a factor 2) from 20: the smaller k wins
    even = select_knn(bank, bank_labels, val, val_labels, ks=(40, 10), temperatures=(0.07,))
    assert (even["k"], even["temperature"]) == (10, 0.07)
    with pytest.raises(ValueError, match=r"every k must be >= 1, got ks=\[0, 5\]"):
        select_knn(bank, bank_labels, val, val_labels, ks=(0, 5))


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_recall_in_unit_interval(index):
    bank, queries = random_features(400, dim=16, seed=13), random_features(40, dim=16, seed=14)
    recall = measure_recall(bank, queries, k=10, index=index, **({"nprobe": 1} if index == "ivf" else {}))
    assert 0.0 <= recall <= 1.0


def test_ivf_recall_is_exact_when_probing_every_list():
    bank, queries = random_features(400, dim=16, seed=15), random_features(40, dim=16, seed=16)
    assert measure_recall(bank, queries, k=10, index="ivf", nlist=16, nprobe=16) == 1.0
    assert measure_recall(bank, queries, k=10, index="ivf", nlist=16, nprobe=1) < 1.0


def test_ivf_padding_never_votes():
    bank, queries = random_features(200, seed=17), random_features(10, seed=18)
    labels = torch.arange(200) % 3
    sims, idx = knn_search(bank, queries, k=150, index="ivf", nlist=20, nprobe=1)  # lists hold ~10 items
    assert (idx == -1).any()
    assert torch.isneginf(sims[idx == -1]).all()
    result = knn_classify(bank, labels, queries, k=150, index="ivf", nlist=20, nprobe=1)
    valid_mass = torch.exp(sims.double() / 0.07).nan_to_num(0.0).sum(dim=1)
    torch.testing.assert_close(result.scores.sum(dim=1), valid_mass)


def test_auto_backend_probes_each_exact_backend_on_the_real_queries_then_runs_the_fastest(monkeypatch):
    from reprlab.evaluate import search

    generator = torch.Generator().manual_seed(5)
    bank, queries = torch.randn(3000, 16, generator=generator), torch.randn(3200, 16, generator=generator)
    monkeypatch.setattr(search, "_PROBE_MIN_PAIRS", 0)
    monkeypatch.setattr(search, "_PROBE_QUERIES", 256)
    monkeypatch.setattr(search, "_chosen", {})
    calls = []
    real = search.exact_cpu_search
    monkeypatch.setattr(search, "exact_cpu_search",
                        lambda name, b, q, *a: calls.append((name, len(b), len(q))) or real(name, b, q, *a))
    auto = knn_search(bank, queries, 7, backend="auto", chunk_size=100)
    exact = knn_search(bank, queries, 7, backend="torch")
    timed = [(name, rows) for name, size, rows in calls if size == len(bank)]
    assert timed[:3] == [(name, 256) for name in search.EXACT_CPU]  # one slice of real queries each
    (chosen,) = search.chosen_backends().values()
    assert timed[3] == (chosen, 3200 - 3 * 256)  # the fastest searches the rest
    assert torch.equal(auto[1], exact[1])  # the probe's results are kept, in order
    torch.testing.assert_close(auto[0], exact[0])
    calls.clear()
    knn_search(bank, queries, 8, backend="auto")  # same size, dim and k bucket: cached, no probe
    assert calls == [(chosen, 3000, 3200)]
    calls.clear()
    knn_search(bank, queries, 7, backend="auto", index="hnsw")  # approximate: faiss's index, never probed
    assert calls == []


def test_the_probe_keeps_faiss_unless_another_backend_beats_it_by_the_margin():
    from reprlab.evaluate.search import fastest

    assert fastest({"faiss": 1.0, "faiss_heap": 0.95, "torch": 1.2}) == "faiss"  # within the probe's noise
    assert fastest({"faiss": 1.0, "faiss_heap": 0.85, "torch": 0.88}) == "faiss_heap"
    assert fastest({"faiss": 4.4, "faiss_heap": 1.1, "torch": 1.0}) == "torch"
    assert fastest({"faiss_heap": 1.0, "torch": 0.99}) == "torch"  # no faiss to prefer


def test_every_backend_returns_the_same_neighbours():
    generator = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(3000, 48, generator=generator), torch.randn(300, 48, generator=generator)
    results = {b: knn_search(bank, queries, k=30, backend=b, chunk_size=128) for b in BACKENDS}
    reference_sims, reference_idx = results["torch"]
    for backend, (sims, idx) in results.items():
        assert torch.equal(idx, reference_idx), backend  # continuous random data: no ties
        assert torch.allclose(sims, reference_sims, atol=1e-5), backend
