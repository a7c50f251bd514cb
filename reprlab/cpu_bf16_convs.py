"""Keep bf16 training on CPU correct around a oneDNN convolution bug.

On CPU (torch 2.14.1, measured on an AMD EPYC with avx512_bf16), a bf16 convolution whose output is one column
wide, with a stride above 1 along the width, gets a wrong weight gradient: uninitialised memory, so values such
as 1e37, inf or NaN, and sometimes plausible-looking finite ones. The forward pass and fp32 are correct. ResNets
meet it on small images: a 3x3 stride-2 conv on a 1-pixel-wide map (16 px images with the standard stem, the 8 px
built-in digits). ``guard_cpu_bf16_convs`` runs every strided call with a one-column output in fp32 while
training: a superset of the failing shapes (no simple rule separates them: a 2-wide input is fine for a 3x3
stride-2 conv, a 3-wide one fails for a 5x5 stride-4 conv), on maps so small that the cost was within noise for a
CIFAR-size ResNet-18 (its last stage). Quietly, like the losses that stay in fp32; tests/test_cpu_bf16_convs.py
checks the gradients against a float64 reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def output_width(conv: nn.Module, width: int) -> int:
    """The width of ``conv``'s output for an input ``width`` pixels wide."""
    kernel, stride, padding, dilation = (conv.kernel_size[-1], conv.stride[-1], conv.padding[-1],
                                         conv.dilation[-1])
    return (width + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def at_risk(conv: nn.Module) -> bool:
    """Whether some input width gives ``conv`` the one-column, strided output the bug needs."""
    return (isinstance(conv, _CONVS) and isinstance(conv.padding, tuple) and conv.stride[-1] > 1
            and conv.kernel_size[-1] > 1)


def _hooks() -> tuple[Callable, Callable]:
    pending: list[torch.autocast | None] = []  # one entry per call in flight: the fp32 context, or None

    def before(conv: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        images = args[0]
        hit = (torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
               and torch.get_autocast_dtype("cpu") == torch.bfloat16 and output_width(conv, images.shape[-1]) == 1)
        if not hit:
            pending.append(None)
            return None
        context = torch.autocast("cpu", enabled=False)
        context.__enter__()
        pending.append(context)
        return (images.float(), *args[1:])

    def after(conv: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        context = pending.pop() if pending else None
        if context is not None:
            context.__exit__(None, None, None)

    return before, after


def guard_cpu_bf16_convs(model: nn.Module, precision: str, device: torch.device) -> list[RemovableHandle]:
    """When ``model`` trains in bf16 on a CPU, run its convolutions in fp32 for the calls the oneDNN bug would get
    wrong; returns the hook handles (none otherwise; remove them when training ends)."""
    handles: list[RemovableHandle] = []
    if precision != "bf16" or device.type != "cpu":
        return handles
    for conv in model.modules():
        if at_risk(conv):
            before, after = _hooks()
            handles.append(conv.register_forward_pre_hook(before))
            handles.append(conv.register_forward_hook(after, always_call=True))
    return handles
