"""Which convolutions run in fp32 when a model runs in bf16 on a CPU: the ones oneDNN gets wrong or slow.

Two rules, both about small output maps, applied per call (the input's shape decides):

- **Correctness.** On CPU (torch 2.14.1; seen on an AMD EPYC with avx512_bf16 and on an Intel Xeon with AMX),
  a bf16 convolution whose output is one column wide, with a stride above 1 along the width, gets a wrong weight
  gradient: uninitialised memory, so values such as 1e37, inf or NaN, and sometimes plausible-looking finite
  ones. The forward pass and fp32 are correct. ResNets meet it on small images: a 3x3 stride-2 conv on a
  1-pixel-wide map (16 px images with the standard stem, the 8 px built-in digits). Every strided call with a
  one-column output runs in fp32: a superset of the failing shapes (no simple rule separates them: a 2-wide input
  is fine for a 3x3 stride-2 conv, a 3-wide one fails for a 5x5 stride-4 conv).
- **Speed.** oneDNN's bf16 kernels are slow on the smallest maps. On an Intel Xeon with AMX (oneDNN 3.12's
  ``brg_conv:avx10_1_512_amx`` kernels), a bf16 convolution with an output of at most 2x2 pixels is 1.2-4.7x
  slower than in fp32 (forward + backward; ResNet-18's last two stages on 32 px images with the standard stem;
  ``python scripts/benchmark.py convs``), enough to make the whole bf16 training step 0.7x fp32; with those calls
  in fp32 it is 1.05-1.2x fp32, and SimCLR end to end 1.2x (``python scripts/benchmark.py pretrain``, README). On
  an AMD EPYC with avx512_bf16 and no AMX (family 25, model 17) the 2x2 outputs are faster in bf16 (0.73-0.78x
  fp32's time) but the 3x3 convs from a 1x1 input to a 1x1 output are 1.1-2.2x slower; with one-pixel outputs in
  fp32, DINO's model step (its 16 px local crops reach one pixel at the third stage) ran 1.1-1.4x faster (an
  ad hoc A/B, not a repo command), and
  BYOL and DINO end to end 1.7-2.2x lightly's (README). So outputs of at most :func:`small_map` pixels run in
  fp32: 4 with AMX, 1 without.

``guard_cpu_bf16_convs`` installs both (the engine for training, ``extract_features`` for inference), quietly,
like the losses that stay in fp32; tests/test_cpu_bf16_convs.py checks the gradients against a float64 reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from reprlab.hardware import cpu_flags

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def small_map(amx: bool) -> int:
    """Output pixels at or below which a bf16 call runs in fp32 for speed: 2x2 on a CPU with AMX, 1 elsewhere."""
    return 4 if amx else 1


def output_shape(conv: nn.Module, spatial: Sequence[int]) -> tuple[int, ...]:
    """The spatial shape of ``conv``'s output for an input of spatial shape ``spatial``."""
    if conv.padding == "same":
        return tuple(spatial)
    padding = (0,) * len(spatial) if conv.padding == "valid" else conv.padding
    return tuple((size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for size, pad, dilation, kernel, stride
                 in zip(spatial, padding, conv.dilation, conv.kernel_size, conv.stride))


def runs_in_fp32(conv: nn.Module, spatial: Sequence[int], amx: bool) -> bool:
    """Whether a bf16 call of ``conv`` on an input of spatial shape ``spatial`` runs in fp32 instead, on a CPU
    with (``amx``) or without AMX."""
    out = output_shape(conv, spatial)
    one_column_strided = conv.stride[-1] > 1 and conv.kernel_size[-1] > 1 and out[-1] == 1
    return one_column_strided or math.prod(out) <= small_map(amx)


def _hooks(amx: bool) -> tuple[Callable, Callable]:
    pending: list[torch.autocast | None] = []  # one entry per call in flight: the fp32 context, or None

    def before(conv: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        images = args[0]
        hit = (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
               and runs_in_fp32(conv, images.shape[-len(conv.kernel_size):], amx))
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
    """When ``model`` runs in bf16 on a CPU, run its convolution calls that :func:`runs_in_fp32` names in fp32;
    returns the hook handles (none otherwise; remove them when done)."""
    handles: list[RemovableHandle] = []
    if precision != "bf16" or device.type != "cpu":
        return handles
    amx = "amx_bf16" in cpu_flags()
    for conv in model.modules():
        if isinstance(conv, _CONVS):  # a small enough input sends any conv to fp32
            before, after = _hooks(amx)
            handles.append(conv.register_forward_pre_hook(before))
            handles.append(conv.register_forward_hook(after, always_call=True))
    return handles
