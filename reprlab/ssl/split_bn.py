"""MoCo's shuffling BatchNorm on one process (He et al., 2020, Sec. 3.3).

With plain BatchNorm a query and its positive key are normalized with statistics of the same batch, while the
queued negatives carry the statistics of earlier batches: the network can tell the positive apart by the batch
it came from instead of by its content (the paper's "cheating"). The paper shuffles the key batch across GPUs so
that each key is normalized among other images than its query. On one process the same comes from splitting
every BatchNorm2d into ``num_splits`` groups (:class:`SplitBatchNorm2d`, as the MoCo CIFAR-10 demo and lightly's
CIFAR-10 benchmark do) and shuffling the key batch before the key network (:func:`shuffled_forward`), so a query
and its key sit in different groups. Under DDP the loop converts every BatchNorm, these included, to
SyncBatchNorm (global statistics), where the shuffle is harmless.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.distributed import replace_batchnorm


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of ``num_splits`` sub-batches: images ``r, r + s, r + 2s,
    ...`` form group ``r`` (``s`` = ``num_splits``), each normalized with its own mean and variance; weight and
    bias are shared. The running statistics move by the mean of the groups' updates (by linearity, the mean of
    per-group running statistics, as lightly's collation), so the buffers, the state dict and eval mode are those
    of a plain BatchNorm2d: a saved encoder loads into the unconverted network."""

    def __init__(self, num_features: int, num_splits: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(input)
        self._check_input_dim(input)
        n, c = input.shape[:2]
        if n % s:
            raise ValueError(f"a batch of {n} does not split into {s} BatchNorm groups; use a batch size divisible "
                             f"by {s} (split_bn)")
        factor = 0.0 if self.momentum is None else self.momentum
        running_mean = running_var = None
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
            running_mean, running_var = self.running_mean.repeat(s), self.running_var.repeat(s)  # (s * C,)
        grouped = input.reshape(n // s, s * c, *input.shape[2:])  # channel block r holds images r, r + s, ...
        out = F.batch_norm(grouped, running_mean, running_var,
                           self.weight.repeat(s) if self.affine else None,
                           self.bias.repeat(s) if self.affine else None, True, factor, self.eps)
        if running_mean is not None:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(s, c).mean(0))
                self.running_var.copy_(running_var.view(s, c).mean(0))
        out = out.reshape(input.shape)
        if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Swap every BatchNorm2d in ``module`` (in place) for a :class:`SplitBatchNorm2d` of ``num_splits`` groups
    that shares its parameters and buffers; 1 leaves the module as it is."""
    if num_splits < 1:
        raise ValueError(f"split_bn must be >= 1 (1: plain BatchNorm), got {num_splits}")
    if num_splits == 1:
        return module
    return replace_batchnorm(module, SplitBatchNorm2d, source=nn.BatchNorm2d, num_splits=num_splits)


def shuffled_forward(network: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
    """``network(batch)`` computed on a random permutation of the batch and put back in the batch's order, so
    that under :class:`SplitBatchNorm2d` each image is normalized among other images than in the unshuffled
    pass. The permutation comes from torch's global generator, which checkpoints save and restore."""
    order = torch.randperm(batch.shape[0], device=batch.device)
    out = network(batch[order])
    return out[torch.argsort(order)]
