"""Retrieval metrics against hand-computed values and a loop reference."""

import math

import pytest
import torch

from reprlab.evaluate.retrieval import retrieval_metrics


def on_circle(degrees: list[float]) -> torch.Tensor:
    """A 1-D example: points on the unit circle, so cosine ranking = ranking by angular distance."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


# Bank: angle -> label (A=0, B=1, C=2). No two distances below tie.
BANK_DEGREES = [0, 12, 20, 30, 90, 185]
BANK_LABELS = torch.tensor([0, 1, 0, 0, 1, 2])


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_hand_computed_queries(backend):
    # q0 at 1 deg (A):   ranking b0 A, b1 B, b2 A, b3 A, b4 B, b5 C -> hits 1 0 1 1 0 0, R = 3
    # q1 at 89 deg (B):  ranking b4 B, b3 A, b2 A, b1 B, b0 A, b5 C -> hits 1 0 0 1 0 0, R = 2
    # q2 at 170 deg (A): ranking b5 C, b4 B, b3 A, b2 A, b1 B, b0 A -> hits 0 0 1 1 0 1, R = 3
    # q3 at 45 deg (label 3, not in the bank): no hits, R = 0 -> excluded from map@r and r_precision
    queries = on_circle([1, 89, 170, 45])
    metrics = retrieval_metrics(
        on_circle(BANK_DEGREES),
        BANK_LABELS,
        queries,
        torch.tensor([0, 1, 0, 3]),
        ks=(1, 5, 10),
        backend=backend,
    )
    assert metrics["precision@1"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert metrics["precision@5"] == pytest.approx((3 / 5 + 2 / 5 + 2 / 5 + 0) / 4)
    assert metrics["precision@10"] == pytest.approx((3 / 6 + 2 / 6 + 3 / 6 + 0) / 4)  # only 6 items to rank
    assert metrics["recall@1"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert metrics["recall@5"] == pytest.approx((1 + 1 + 1 + 0) / 4)
    # r_precision: q0 top-3 = 1 0 1 -> 2/3; q1 top-2 = 1 0 -> 1/2; q2 top-3 = 0 0 1 -> 1/3
    assert metrics["r_precision"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 3) / 3)
    # map@r: q0 (1/1 + 2/3) / 3 = 5/9; q1 (1/1) / 2 = 1/2; q2 (1/3) / 3 = 1/9
    assert metrics["map@r"] == pytest.approx((5 / 9 + 1 / 2 + 1 / 9) / 3)
    assert metrics["map@r"] == pytest.approx(7 / 18)
    assert metrics["queries_without_relevant"] == 1


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_hand_computed_leave_one_out(backend):
    # The bank queried by itself, self removed from the ranking and from R:
    # b0 (0, A):   b1 B, b2 A, b3 A, b4 B, b5 C -> hits 0 1 1 0 0, R = 2
    # b1 (12, B):  b2 A, b0 A, b3 A, b4 B, b5 C -> hits 0 0 0 1 0, R = 1
    # b2 (20, A):  b1 B, b3 A, b0 A, b4 B, b5 C -> hits 0 1 1 0 0, R = 2
    # b3 (30, A):  b2 A, b1 B, b0 A, b4 B, b5 C -> hits 1 0 1 0 0, R = 2
    # b4 (90, B):  b3 A, b2 A, b1 B, b0 A, b5 C -> hits 0 0 1 0 0, R = 1
    # b5 (185, C): no other C, R = 0
    bank = on_circle(BANK_DEGREES)
    metrics = retrieval_metrics(
        bank, BANK_LABELS, bank, BANK_LABELS, ks=(1, 3), exclude_self=True, backend=backend
    )
    assert metrics["precision@1"] == pytest.approx(1 / 6)
    assert metrics["recall@1"] == pytest.approx(1 / 6)
    assert metrics["precision@3"] == pytest.approx((2 / 3 + 0 + 2 / 3 + 2 / 3 + 1 / 3 + 0) / 6)
    assert metrics["recall@3"] == pytest.approx(4 / 6)
    assert metrics["r_precision"] == pytest.approx((1 / 2 + 0 + 1 / 2 + 1 / 2 + 0) / 5)
    assert metrics["map@r"] == pytest.approx((1 / 4 + 0 + 1 / 4 + 1 / 2 + 0) / 5)
    assert metrics["queries_without_relevant"] == 1
    # Without leave-one-out every query retrieves itself first.
    assert retrieval_metrics(bank, BANK_LABELS, bank, BANK_LABELS, ks=(1,))["precision@1"] == 1.0


def naive_metrics(bank, bank_labels, queries, query_labels, ks):
    bank = torch.nn.functional.normalize(bank.double(), dim=1)
    queries = torch.nn.functional.normalize(queries.double(), dim=1)
    rows = []
    for query, label in zip(queries, query_labels.tolist()):
        order = sorted(range(len(bank)), key=lambda j: -float(bank[j] @ query))
        hits = [int(bank_labels[j]) == label for j in order]
        relevant = sum(int(value) == label for value in bank_labels.tolist())
        row = {f"precision@{k}": sum(hits[:k]) / k for k in ks}
        row.update({f"recall@{k}": float(any(hits[:k])) for k in ks})
        precisions = [sum(hits[: i + 1]) / (i + 1) for i in range(relevant) if hits[i]]
        row["map@r"] = sum(precisions) / relevant
        row["r_precision"] = sum(hits[:relevant]) / relevant
        rows.append(row)
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


def test_matches_loop_reference_on_random_data():
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 5, generator=generator), torch.randn(15, 5, generator=generator)
    bank_labels = torch.randint(0, 4, (60,), generator=generator) * 10 + 3  # non-contiguous labels
    query_labels = torch.randint(0, 4, (15,), generator=generator) * 10 + 3
    metrics = retrieval_metrics(bank, bank_labels, queries, query_labels, ks=(1, 4, 10))
    for key, value in naive_metrics(bank, bank_labels, queries, query_labels, (1, 4, 10)).items():
        assert metrics[key] == pytest.approx(value), key


def test_label_count_mismatch_raises():
    with pytest.raises(ValueError, match="labels do not match"):
        retrieval_metrics(torch.randn(4, 2), torch.zeros(3), torch.randn(2, 2), torch.zeros(2))
