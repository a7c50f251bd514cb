"""precision: auto: bf16 where the processor has native bf16, fp32 elsewhere; channels_last for convnets; the
choice logged and recorded; the processor recorded for benchmarks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab import hardware
from reprlab.contracts import Task
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches
from reprlab.engine import FitOptions, fit

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))


@pytest.fixture
def plain_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))


class ConvTask(Task):
    """Records the autocast state and the weight layout seen inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1), nn.Flatten(),
                                 nn.LazyLinear(2))
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        weight = self.net[1].weight  # (4, 4, 3, 3): NHWC and NCHW strides differ
        self.seen.append((torch.is_autocast_enabled("cpu"), weight.is_contiguous(memory_format=torch.channels_last)
                          and not weight.is_contiguous()))
        logits = self.net(batch["images"].float() / 255)
        return {"loss": F.cross_entropy(logits.float(), batch["labels"])}


def _fit(task: Task, precision: str = "auto", **options) -> dict:
    data = ImageSet(torch.randint(0, 255, (8, 1, 8, 8), dtype=torch.uint8), torch.arange(8) % 2, ["a", "b"])
    task(next(Batches(data, 4).epoch(0)))  # materialize the lazy layer
    task.seen.clear()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.01)
    return fit(task, Batches(data, 4), optimizer, None,
               FitOptions(epochs=1, device=CPU, precision=precision, **options)).numerics


def test_auto_is_fp32_on_a_cpu_without_native_bf16(plain_cpu, capsys):
    task = ConvTask()
    numerics = _fit(task)
    assert numerics == {"precision": "fp32", "channels_last": False,
                        "reason": "auto: no native bf16 on this cpu, so fp32"}
    assert task.seen == [(False, False)] * 2
    assert "auto: no native bf16 on this cpu, so fp32" in capsys.readouterr().out  # logged at start


def test_auto_is_bf16_and_channels_last_for_convnets_on_a_cpu_with_native_bf16(native_bf16_cpu):
    task = ConvTask()
    numerics = _fit(task, progress=False)
    assert numerics["precision"] == "bf16" and numerics["channels_last"]
    assert "avx512_bf16" in numerics["reason"]
    assert task.seen == [(True, True)] * 2
    assert task.net[1].weight.is_contiguous()  # back to the standard layout for saving


def test_explicit_precision_wins_and_non_convnets_keep_their_layout(native_bf16_cpu):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    assert hardware.resolve_numerics("fp32", False, CPU, mlp).precision == "fp32"
    auto = hardware.resolve_numerics("auto", False, CPU, mlp)
    assert auto.precision == "bf16" and not auto.channels_last
    vit_like = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8, 2))  # a patch embedding
    assert not hardware.is_convnet(vit_like)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        hardware.resolve_numerics("fp8", False, CPU, mlp)


def test_native_bf16_reads_the_flags(monkeypatch):
    for flags, expected in ((set(), False), ({"avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True)):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert hardware.native_bf16(CPU) is expected


def test_processor_names_the_cpu_and_the_flags_that_matter():
    info = hardware.processor()
    assert info["cpu"] and isinstance(info["flags"], list)
    assert set(info["flags"]) <= set(hardware.FLAGS_THAT_MATTER)
    assert info["native_bf16_cpu"] == bool({"avx512_bf16", "amx_bf16"} & hardware.cpu_flags())


def test_cpu_name_carries_the_family_and_model(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                       "model name\t: AMD EPYC\nflags\t\t: avx2\n\nprocessor\t: 1\ncpu family\t: 25\n")
    monkeypatch.setattr(hardware, "Path", lambda _: cpuinfo)
    hardware.cpu_name.cache_clear()
    try:
        assert hardware.cpu_name() == "AMD EPYC (family 26, model 2)"
    finally:
        hardware.cpu_name.cache_clear()


@pytest.mark.parametrize("convnet", [True, False])
def test_bf16_extraction_feeds_convnets_channels_last_batches(native_bf16_cpu, convnet):
    from reprlab.evaluate.features import extract_features

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)]
    encoder = nn.Sequential(*(layers if convnet else layers[:1]), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    seen: list[tuple[bool, torch.dtype]] = []
    encoder[0].register_forward_pre_hook(lambda _, args: seen.append(
        (args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous(), args[0].dtype)))
    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    auto = extract_features(encoder, images, batch_size=4)  # precision auto: bf16 on this (patched) CPU
    assert seen == [(convnet, torch.float32)] * 2  # autocast casts inside the conv; the layout is the batch's
    fp32 = extract_features(encoder, images, batch_size=4, precision="fp32")
    assert seen[2:] == [(False, torch.float32)] * 2 and auto.dtype == torch.float32
    torch.testing.assert_close(auto, fp32, atol=2e-2, rtol=2e-2)  # bf16 rounding, same features
    assert encoder[0].weight.is_contiguous()  # the user's encoder keeps its layout
