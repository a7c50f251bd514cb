"""The convolutions that run in fp32 under CPU bf16 training: oneDNN's wrong weight gradient for one-column-wide
strided outputs, and its slow bf16 kernels for outputs of at most 2x2 pixels with AMX, one pixel without."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.contracts import Task
from reprlab.cpu_bf16_convs import guard_cpu_bf16_convs, output_shape, runs_in_fp32
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches
from reprlab.engine import FitOptions, fit

CPU = torch.device("cpu")


def _weight_grad(conv: nn.Conv2d, images: Tensor, upstream: Tensor, channels_last: bool) -> tuple[Tensor, Tensor]:
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(images)
    out.backward(upstream)
    return conv.weight.grad.double(), out


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("kernel", "stride", "padding", "size"),
                         [(3, 2, 1, (1, 1)), (3, 2, 1, (4, 1)), (5, 3, 2, (2, 2)), (7, 2, 3, (1, 1)),
                          (3, 2, 1, (8, 1)), (3, 2, 1, (5, 5))])  # the last: 3x3 output, stays in bf16
def test_guarded_weight_gradients_match_a_float64_reference(kernel, stride, padding, size, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, kernel, stride=stride, padding=padding, bias=False)
    handles = guard_cpu_bf16_convs(conv, "bf16", CPU)
    in_fp32 = runs_in_fp32(conv, size, amx=False)
    assert in_fp32 == runs_in_fp32(conv, size, amx=True) == (size != (5, 5))  # (8, 1): 4x1 out, fp32 for the bug
    for _ in range(4):  # the bug reads uninitialised memory, so a single try can pass by luck
        images = torch.randn(8, 16, *size)
        upstream = torch.randn(8, 32, *output_shape(conv, size))
        grad, out = _weight_grad(conv, images, upstream, channels_last)
        # fp32 for the guarded call, so the reference is exact math on the fp32 inputs; bf16 inputs otherwise
        inputs = images.double() if in_fp32 else images.bfloat16().double()
        reference = torch.nn.grad.conv2d_weight(inputs, conv.weight.shape, upstream.double(), stride=stride,
                                                padding=padding)
        assert out.dtype == (torch.float32 if in_fp32 else torch.bfloat16)
        assert (grad - reference).abs().max() <= 2e-2 * reference.abs().max()
    for handle in handles:
        handle.remove()
    assert not conv._forward_pre_hooks and not conv._forward_hooks


def test_one_column_strided_outputs_and_small_outputs_run_in_fp32():
    strided, plain = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    assert output_shape(strided, (7, 5)) == (4, 3)
    assert output_shape(nn.Conv2d(8, 8, 3, padding="same"), (5, 6)) == (5, 6)
    assert output_shape(nn.Conv2d(8, 8, 3, padding="valid"), (5, 6)) == (3, 4)
    plain_sizes, strided_sizes = [(2, 2), (4, 1), (1, 5), (3, 2), (4, 4)], [(4, 4), (6, 6), (16, 1), (16, 2), (16, 3)]
    assert [runs_in_fp32(plain, s, amx=True) for s in plain_sizes] == [True, True, False, False, False]  # <= 4 px
    assert [runs_in_fp32(strided, s, amx=True) for s in strided_sizes] == [
        True, False, True, True, False]  # outputs 2x2, 3x3, 8x1 twice (one column: the bug), 8x2
    assert [runs_in_fp32(plain, s, amx=False) for s in plain_sizes + [(1, 1)]] == [False] * 5 + [True]  # 1 px
    assert [runs_in_fp32(strided, s, amx=False) for s in strided_sizes + [(2, 2)]] == [
        False, False, True, True, False, True]  # (2, 2): a 1x1 output
    assert not runs_in_fp32(nn.Conv2d(8, 8, 1, stride=2), (32, 2), amx=True)  # a 1x1 kernel reads no padding
    conv1d = nn.Conv1d(8, 8, 3, padding=1)
    assert runs_in_fp32(conv1d, (4,), amx=True) and not runs_in_fp32(conv1d, (5,), amx=True)
    assert runs_in_fp32(conv1d, (1,), amx=False) and not runs_in_fp32(conv1d, (2,), amx=False)


@pytest.mark.parametrize("amx", [False, True])
def test_convs_are_hooked_for_cpu_bf16_only(amx, monkeypatch):
    monkeypatch.setattr("reprlab.cpu_bf16_convs.cpu_flags", lambda: frozenset({"avx512_bf16"} | ({"amx_bf16"} if amx
                                                                                                  else set())))
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    assert guard_cpu_bf16_convs(net, "fp32", CPU) == []
    assert guard_cpu_bf16_convs(net, "bf16", torch.device("meta")) == []  # a CPU rule
    handles = guard_cpu_bf16_convs(net, "bf16", CPU)
    assert len(handles) == 4  # a pre-hook and a hook per conv: a small enough input sends any of them to fp32
    small = torch.float32 if amx else torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(torch.randn(2, 3, 8, 8)).dtype == torch.bfloat16  # 4x4 maps: bf16
        assert net(torch.randn(2, 3, 4, 4)).dtype == small  # 2x2 maps: fp32 on AMX
        assert net(torch.randn(2, 3, 2, 2)).dtype == torch.float32  # 1x1 maps: fp32 everywhere
        with torch.inference_mode():  # feature extraction too
            assert net(torch.randn(2, 3, 4, 4)).dtype == small
            assert net[0](torch.randn(2, 3, 1, 1)).dtype == torch.float32  # a one-column strided output: always
    assert net(torch.randn(2, 3, 1, 1)).dtype == torch.float32  # no autocast: the hooks do nothing
    for handle in handles:
        handle.remove()


class _SmallConvnet(Task):
    """Two strided 3x3 convs that shrink 8 px images to one pixel, as ResNets do to the built-in digits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, stride=4, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(32, 4))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.net(batch["images"].float() / 255).float()
        return {"loss": F.cross_entropy(logits, batch["labels"])}


def test_bf16_training_on_cpu_stays_finite_and_leaves_no_hooks(tmp_path):
    torch.manual_seed(0)
    task = _SmallConvnet()
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    data = ImageSet(images, torch.arange(64) % 4, list("abcd"))
    result = fit(task, Batches(data, 16, seed=0), torch.optim.SGD(task.parameters(), lr=0.05), None,
                 FitOptions(epochs=3, device=CPU, run_dir=tmp_path, precision="bf16", progress=False))
    assert result.numerics["precision"] == "bf16" and result.global_step == 12
    assert all(p.isfinite().all() for p in task.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in task.modules())
