"""Exports of the whole Encoder, traced: normalization (and patch pooling) inside, float images in [0, 1] in,
features out. Tracing fixes the image size and channel count (3) and keeps the batch size free; each export is
checked against the encoder on a batch of another size before it is kept."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reprlab.export import ExportError
from reprlab.export.source import Source, Written

TRACE_BATCH, CHECK_BATCH = 2, 3  # trace with one batch size, verify with another: the batch axis is free


def _check(source: Source, run: Callable[[np.ndarray], Any], tolerance: float, what: str) -> float:
    """Max |export - encoder| on a batch of CHECK_BATCH images; over ``tolerance`` (relative to the feature
    scale) the export is refused."""
    images = source.images(CHECK_BATCH, seed=1)
    expected = source.features(images)
    got = torch.as_tensor(run(images.numpy()))
    if got.shape != expected.shape:
        raise ExportError(f"the {what} export gives features of shape {tuple(got.shape)}, the encoder "
                          f"{tuple(expected.shape)}: this encoder does not trace to a batch-independent graph")
    diff = (got - expected).abs().max().item()
    if diff > tolerance * max(1.0, expected.abs().max().item()):
        raise ExportError(f"the {what} export differs from the encoder by {diff:.2e} (more than {tolerance:g}): "
                          f"this encoder does not trace faithfully; export --format {source.family} instead")
    return diff


@contextmanager
def _quiet_trace() -> Iterator[None]:
    """Tracing warns about Python branches on shapes (greyscale, resize): expected, since the size is fixed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.trace / the legacy exporter
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def write_torchscript(source: Source, out: Path) -> Written:
    """``model.pt``: ``torch.jit.trace`` of the whole encoder, loadable with ``torch.jit.load`` alone."""
    with _quiet_trace(), torch.no_grad():
        traced = torch.jit.trace(source.encoder, (source.images(TRACE_BATCH),), check_trace=False)
        traced.save(str(out / "model.pt"))
        loaded = torch.jit.load(str(out / "model.pt"))
    with torch.no_grad():
        diff = _check(source, lambda x: loaded(torch.from_numpy(x)), 1e-5, "torchscript")
    snippet = "\n".join([
        "import torch", "",
        'model = torch.jit.load(f"{folder}/model.pt")  # normalization inside',
        "with torch.no_grad():",
        f"    features = model(torch.from_numpy(images))  # (B, {source.encoder.feature_dim})"])
    return Written("pytorch", snippet, "the traced encoder's output",
                   extra={"max_abs_diff_at_export": diff})


def write_onnx(source: Source, out: Path) -> Written:
    """``model.onnx``: input ``images`` (batch, C, H, W) float in [0, 1], output ``features`` (batch, D)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"--format onnx needs the {err.name} package: pip install 'reprlab[export]'") from None
    path = out / "model.onnx"
    with _quiet_trace():  # the TorchScript-based exporter: the dynamo one needs onnxscript, gains nothing here
        torch.onnx.export(source.encoder, (source.images(TRACE_BATCH),), str(path), dynamo=False,
                          input_names=["images"], output_names=["features"], opset_version=17,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = _check(source, lambda x: session.run(["features"], {"images": x})[0], 1e-4, "onnx")
    snippet = "\n".join([
        "import onnxruntime", "",
        'session = onnxruntime.InferenceSession(f"{folder}/model.onnx")  # normalization inside',
        f'features = session.run(["features"], {{"images": images}})[0]  # (B, {source.encoder.feature_dim})'])
    return Written("onnx", snippet, "the ONNX graph's output 'features'",
                   extra={"input_name": "images", "output_name": "features", "opset": 17,
                          "max_abs_diff_at_export": diff})
