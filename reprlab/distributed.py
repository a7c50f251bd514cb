"""torchrun / DDP: the only module that knows about ranks.

``torchrun --nproc_per_node=N scripts/pretrain.py ...`` sets RANK, LOCAL_RANK and WORLD_SIZE; :func:`setup`
reads them and initialises the process group (NCCL on CUDA, gloo on CPU). Without them everything is rank 0 of 1
and every function here is a no-op, so the same code runs on one process and on many.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun and return this process's device.

    Each process drives ``cuda:LOCAL_RANK``; ``device: cpu`` (or no GPU) uses gloo, so DDP also runs on CPUs."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and launched:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but CUDA is not available; use train.device=cpu")
        torch.cuda.set_device(dev)
    if launched and not is_distributed():
        if dev.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=dev)
        else:
            dist.init_process_group(backend="gloo")
    return dev


def teardown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --- collectives ---------------------------------------------------------------------------------------------


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank and returns this rank's slice.

    With the loss computed over local anchors against the gathered keys, DDP's gradient averaging then gives
    exactly the single-process gradient of the mean loss over the global batch (peers.md, SimCLR pitfall 8).
    Returning the local slice without the sum would leave gradients at 1/world_size (mmselfsup)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # noqa: ANN001 - autograd signature
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        grad = grad.clone(memory_format=torch.contiguous_format)  # never reduce autograd's buffer in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (n, ...) from all ranks into (world_size * n, ...), keeping autograd."""
    if not is_distributed() or world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; every rank's output feeds every rank's loss, so the backward is a sum over ranks too."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # noqa: ANN001
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(tensor: Tensor) -> Tensor:
    if not is_distributed() or world_size() == 1:
        return tensor
    return _AllReduceSumWithGrad.apply(tensor)


def all_reduce_mean(tensor: Tensor) -> Tensor:
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def all_reduce_min(tensor: Tensor) -> Tensor:
    """Element-wise minimum over ranks (e.g. "did every rank succeed", with 1 = yes)."""
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_gather(tensor: Tensor) -> Tensor:
    """(n, ...) from every rank -> (world_size * n, ...), rank-major, no autograd. Equal ``n`` on every rank."""
    if not is_distributed() or world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def all_gather_object(obj: Any) -> list[Any]:
    """One picklable object per rank, in rank order (small things only: RNG states, flags)."""
    if not is_distributed() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# --- SyncBatchNorm -------------------------------------------------------------------------------------------


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch of all ranks, for gloo (CPU) runs.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors; this computes the mean and the (biased) variance with two
    differentiable all-reduces per layer, so gradients equal those of one process that sees the global batch.
    Slower than NCCL's fused kernel, but CPU DDP is for tests and small runs."""

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        self._check_input_dim(input)
        if not (self.training and is_distributed() and world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.shape[1]])])  # (C + 1,) sums and count
        total = all_reduce_sum_with_grad(local)
        count = total[-1].detach()
        mean = total[:-1] / count  # (C,)
        centered = x - mean.view(shape)
        var = all_reduce_sum_with_grad(centered.square().sum(dims)) / count  # (C,) biased, as BN normalizes
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1).clamp_min(1))
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def replace_batchnorm(module: nn.Module, cls: type[nn.Module],
                      source: type[nn.Module] = nn.modules.batchnorm._BatchNorm, **kwargs: Any) -> nn.Module:
    """Swap every ``source`` layer in ``module`` (every BatchNorm*d by default) for ``cls(num_features, eps,
    momentum, affine, track_running_stats, **kwargs)``, sharing parameters and buffers (the optimizer keeps
    pointing at the same tensors); layers that already are ``cls`` stay."""
    if isinstance(module, source) and not isinstance(module, cls):
        new = cls(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                  track_running_stats=module.track_running_stats, **kwargs)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, replace_batchnorm(child, cls, source, **kwargs))
    return module


def convert_sync_batchnorm(module: M, device: torch.device) -> M:
    """BatchNorm over the global batch: ``nn.SyncBatchNorm`` on GPUs, :class:`CPUSyncBatchNorm` on CPUs."""
    if device.type == "cpu":
        return replace_batchnorm(module, CPUSyncBatchNorm)  # type: ignore[return-value]
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
