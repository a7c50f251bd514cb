"""What the processor does natively, and the numeric settings that follow from it.

``precision: auto`` (the default of every stage) means bf16 autocast where the hardware computes in bf16
natively (CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX) and fp32 elsewhere: on a CPU without native bf16,
bf16 matmuls are emulated and slower than fp32. Convnets then also run channels_last, which the oneDNN / cuDNN
bf16 convolutions prefer. Losses stay in fp32 whatever is chosen (each loss disables autocast itself).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# CPU flags (as /proc/cpuinfo names them) that change which precision and kernels are fast.
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; elsewhere what torch's CPU capability implies)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    capability = torch.backends.cpu.get_cpu_capability().lower()  # e.g. "avx2", "avx512"
    return frozenset({"avx2"} | ({"avx512f"} if "avx512" in capability else set()))


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The model name, with the x86 family and model numbers where /proc/cpuinfo has them: virtual machines
    often report one name ("AMD EPYC") for processor generations that differ in speed and flags."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        fields: dict[str, str] = {}
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the end of the first processor's block
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            generation = (f" (family {fields['cpu family']}, model {fields['model']})"
                          if "cpu family" in fields and "model" in fields else "")
            return fields["model name"] + generation
    return platform.processor() or platform.machine()


def processor() -> dict[str, object]:
    """The processor a figure was measured on: model name, the flags that matter, threads (benchmarks record
    it in every JSON line so results from different machines are never compared as one)."""
    flags = cpu_flags()
    info: dict[str, object] = {"cpu": cpu_name(), "flags": [f for f in FLAGS_THAT_MATTER if f in flags],
                               "native_bf16_cpu": native_bf16(torch.device("cpu")),
                               "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls and convolutions natively (not by emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return False


@dataclass(frozen=True)
class Numerics:
    """The resolved precision and memory format of a run, and why (logged at start, kept in meta.json)."""

    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"precision": self.precision, "channels_last": self.channels_last, "reason": self.reason}


def is_convnet(model: nn.Module) -> bool:
    """More than a patch embedding's worth of 2-D convolutions (a ViT has one)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 2


def resolve_numerics(precision: str, channels_last: bool, device: torch.device, model: nn.Module) -> Numerics:
    """``precision`` (auto | fp32 | bf16 | fp16) and the configured ``channels_last`` for ``model`` on
    ``device``: auto picks bf16 (+ channels_last for convnets) where bf16 is native, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if precision != "auto":
        return Numerics(precision, channels_last, f"precision {precision} as configured")
    if native_bf16(device):
        where = "this GPU" if device.type == "cuda" else "this CPU (" + ", ".join(
            sorted({"avx512_bf16", "amx_bf16"} & cpu_flags())) + ")"
        return Numerics("bf16", channels_last or is_convnet(model), f"auto: native bf16 on {where}")
    return Numerics("fp32", channels_last, f"auto: no native bf16 on this {device.type}, so fp32")
