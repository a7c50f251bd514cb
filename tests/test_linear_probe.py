"""Linear probes: separable data is solved, the batched sweep equals separate runs, sklearn's objective."""

import numpy as np
import pytest
import torch

from reprlab.evaluate.linear_probe import ProbeResult, sklearn_linear_probe, train_linear_probe

LABELS = [2, 5, 9]  # non-contiguous on purpose


def blobs(num: int, spread: float, seed: int, dim: int = 6):
    """Gaussian blobs around fixed class centres (the centres do not depend on the seed)."""
    centers = 3.0 * torch.eye(dim)[: len(LABELS)]
    generator = torch.Generator().manual_seed(seed)
    index = torch.arange(num) % len(LABELS)
    x = centers[index] + spread * torch.randn(num, dim, generator=generator)
    return x, torch.tensor(LABELS)[index]


def test_separable_features_reach_100_percent():
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (blobs(90, 0.3, s) for s in (0, 1, 2))
    result = train_linear_probe(
        train_x, train_y, val_x, val_y, lrs=(1e-2, 1e-1), weight_decays=(0.0, 1e-3), epochs=30, batch_size=32
    )
    assert isinstance(result, ProbeResult)
    assert result.val_top1 == 1.0
    assert result.evaluate(test_x, test_y) == 1.0
    assert set(result.predict(test_x).tolist()) == set(LABELS)  # original label values, not indices
    assert result.evaluate(test_x.numpy(), test_y.numpy()) == 1.0

    reference = sklearn_linear_probe(train_x, train_y, val_x, val_y, Cs=(0.1, 1.0))
    assert reference.val_top1 == 1.0
    assert reference.evaluate(test_x, test_y) == 1.0
    assert torch.equal(reference.predict(test_x), result.predict(test_x))


def test_sweep_selects_the_val_argmax_and_equals_separate_runs():
    (train_x, train_y), (val_x, val_y) = blobs(120, 2.0, 3), blobs(60, 2.0, 4)
    lrs, weight_decays = (1e-3, 3e-2), (0.0, 1e-1)
    sweep = train_linear_probe(train_x, train_y, val_x, val_y, lrs, weight_decays, epochs=10, batch_size=50)
    assert [(row["lr"], row["weight_decay"]) for row in sweep.grid] == [
        (lr, wd) for lr in lrs for wd in weight_decays
    ]
    best = max(row["val_top1"] for row in sweep.grid)
    first_best = next(row for row in sweep.grid if row["val_top1"] == best)
    assert sweep.val_top1 == best
    assert (sweep.hyperparameters["lr"], sweep.hyperparameters["weight_decay"]) == (
        first_best["lr"],
        first_best["weight_decay"],
    )
    # Training all configurations at once must not couple them (shared penalty, shared Adam state...).
    for row in sweep.grid:
        alone = train_linear_probe(
            train_x, train_y, val_x, val_y, (row["lr"],), (row["weight_decay"],), epochs=10, batch_size=50
        )
        assert alone.val_top1 == pytest.approx(row["val_top1"])
        if (row["lr"], row["weight_decay"]) == (first_best["lr"], first_best["weight_decay"]):
            torch.testing.assert_close(
                alone.model.linear.weight, sweep.model.linear.weight, rtol=1e-4, atol=1e-6
            )
            torch.testing.assert_close(alone.model.linear.bias, sweep.model.linear.bias, rtol=1e-4, atol=1e-6)


def test_weight_decay_is_sklearn_l2_penalty():
    # mean CE + wd / 2 ||W||^2 has the optimum of LogisticRegression(C = 1 / (wd * N)) on scaled features.
    (train_x, train_y), (val_x, val_y) = blobs(200, 2.0, 5), blobs(100, 2.0, 6)
    weight_decay = 1e-2
    probe = train_linear_probe(
        train_x, train_y, val_x, val_y, lrs=(0.1,), weight_decays=(weight_decay,), epochs=300, batch_size=200
    )
    reference = sklearn_linear_probe(train_x, train_y, val_x, val_y, Cs=(1 / (weight_decay * 200),))
    with torch.no_grad():
        probabilities = torch.softmax(probe.model(val_x), dim=1)
    expected = torch.as_tensor(reference.model.predict_proba(val_x.numpy()), dtype=torch.float32)
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=5e-3)


def test_sklearn_ties_prefer_stronger_regularisation_and_grid_is_complete():
    (train_x, train_y), (val_x, val_y) = blobs(60, 0.1, 7), blobs(30, 0.1, 8)
    result = sklearn_linear_probe(train_x, train_y, val_x, val_y, Cs=(10.0, 0.5, 2.0))
    assert [row["C"] for row in result.grid] == [0.5, 2.0, 10.0]
    assert all(row["val_top1"] == 1.0 for row in result.grid)
    assert result.hyperparameters["C"] == 0.5


def test_val_labels_unseen_in_train_count_as_wrong():
    (train_x, train_y), (val_x, val_y) = blobs(60, 0.1, 9), blobs(30, 0.1, 10)
    val_y = val_y.clone()
    val_y[:6] = 77  # a class the probe cannot know
    result = train_linear_probe(train_x, train_y, val_x, val_y, lrs=(0.1,), weight_decays=(0.0,), epochs=30)
    assert result.val_top1 == pytest.approx(24 / 30)
    assert result.evaluate(val_x, val_y) == pytest.approx(24 / 30)


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="train must be features"):
        train_linear_probe(np.zeros((4, 2)), np.zeros(3), np.zeros((2, 2)), np.zeros(2))
