"""The torch linear probe of :func:`reprlab.evaluate.linear_probe.train_linear_probe` on features read in chunks of
rows (an on-disk :class:`~reprlab.evaluate.cache.FeatureArray` larger than memory), never the whole array.

The same objective, optimiser, sweep and selection on val; what changes is the minibatch order. An epoch visits
the chunks in a seeded random order and shuffles the rows inside each (a block shuffle: reads stay sequential),
where the in-memory probe shuffles all rows at once. With one chunk (``chunk_rows >= N``) the two are the same
computation, step for step. The standardisation's mean and std are accumulated over the chunks in float64
(Chan et al.'s pairwise update), the val top-1 and the predictions are computed chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from reprlab.evaluate.cache import FeatureArray, row_chunks
from reprlab.evaluate.linear_probe import (
    _STD_EPS,
    LinearProbe,
    ProbeResult,
    _batched_logits,
    _label_indices,
    train_batched,
)


def moments(x: Tensor | FeatureArray, chunk_rows: int) -> tuple[Tensor, Tensor]:
    """Per-dimension float32 mean and population std (+ eps) of (N, D) ``x``, ``chunk_rows`` rows at a time;
    one chunk computes them as the in-memory probe does."""
    if len(x) <= chunk_rows:
        whole = x.load() if isinstance(x, FeatureArray) else x.float()
        return whole.mean(dim=0), whole.std(dim=0, unbiased=False) + _STD_EPS
    count, mean, m2 = 0, None, None
    for _, _, rows in row_chunks(x, chunk_rows):
        rows = rows.double()
        n, chunk_mean = rows.shape[0], rows.mean(dim=0)
        chunk_m2 = ((rows - chunk_mean) ** 2).sum(dim=0)
        if mean is None:
            count, mean, m2 = n, chunk_mean, chunk_m2
            continue
        delta, total = chunk_mean - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + chunk_m2 + delta**2 * (count * n / total)
        count = total
    return mean.float(), (m2 / count).sqrt().float() + _STD_EPS


def _chunk_bounds(n: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_rows, n)) for start in range(0, n, chunk_rows)]


def _rows(x: Tensor | FeatureArray, start: int, stop: int) -> Tensor:
    return x.rows(start, stop) if isinstance(x, FeatureArray) else x[start:stop].float()


def chunked_top1(x: Tensor | FeatureArray, targets: Tensor, mean: Tensor, std: Tensor, weight: Tensor,
                 bias: Tensor, chunk_rows: int) -> Tensor:
    """(G,) top-1 of every configuration on (x, class-index targets), chunk by chunk."""
    correct = []
    for start, stop, rows in row_chunks(x, chunk_rows):
        z = ((rows - mean) / std).to(weight.device)
        logits = _batched_logits(z, weight, bias)  # (b, G, C)
        correct.append(logits.argmax(dim=2) == targets[start:stop, None].to(weight.device))
    return torch.cat(correct).float().mean(dim=0)


def train_chunked_probe(train_x: Tensor | FeatureArray, train_y: Tensor, val_x: Tensor | FeatureArray,
                        val_y: Tensor, lrs: tuple[float, ...], weight_decays: tuple[float, ...], epochs: int,
                        batch_size: int, device: torch.device, seed: int, chunk_rows: int,
                        progress: bool = False) -> ProbeResult:
    """:func:`~reprlab.evaluate.linear_probe.train_linear_probe` over ``chunk_rows`` rows at a time (rounded
    down to whole minibatches); the same result type, hyperparameters and selection."""
    chunk_rows = max(batch_size, chunk_rows // batch_size * batch_size)  # partial batches only at the end
    generator = torch.Generator().manual_seed(seed)
    classes, train_targets = torch.unique(train_y, sorted=True, return_inverse=True)
    mean, std = moments(train_x, chunk_rows)
    bounds = _chunk_bounds(len(train_x), chunk_rows)

    def epoch_batches() -> Iterator[tuple[Tensor, Tensor]]:
        order = range(len(bounds)) if len(bounds) == 1 else torch.randperm(len(bounds), generator=generator).tolist()
        for chunk in order:
            start, stop = bounds[chunk]
            z = ((_rows(train_x, start, stop) - mean) / std).to(device)
            perm = torch.randperm(stop - start, generator=generator).to(device)
            z, targets = z[perm], train_targets[start:stop].to(device)[perm]
            for first in range(0, stop - start, batch_size):
                yield z[first : first + batch_size], targets[first : first + batch_size]

    configs = [(lr, weight_decay) for lr in lrs for weight_decay in weight_decays]
    total_steps = epochs * sum(max(1, math.ceil((stop - start) / batch_size)) for start, stop in bounds)
    weight, bias = train_batched(epoch_batches, train_x.shape[1], classes.numel(), configs, epochs, total_steps,
                                 device, progress)
    val_top1 = chunked_top1(val_x, _label_indices(classes, val_y), mean, std, weight, bias, chunk_rows)
    grid = [{"lr": lr, "weight_decay": wd, "val_top1": float(top1)} for (lr, wd), top1 in zip(configs, val_top1)]
    best = int(val_top1.argmax())  # first maximum = grid order
    model = LinearProbe(mean.to(device), std.to(device), weight[:, best], bias[best], classes.to(device))
    return ProbeResult(model=model, hyperparameters={"lr": configs[best][0], "weight_decay": configs[best][1],
                                                     "epochs": epochs, "batch_size": batch_size},
                       val_top1=grid[best]["val_top1"], grid=grid)
