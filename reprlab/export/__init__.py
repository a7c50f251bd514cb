"""Export a run's encoder so that timm, torchvision, transformers, onnxruntime or plain torch load it without
reprlab: ``export(run_dir, format) -> folder``; ``reprlab export RUN_DIR --format F`` on the command line.

Every folder holds a README.md whose snippet loads the export and computes the same features as
``reprlab.load_encoder(run_dir)(images)`` (float images in [0, 1]), and ``reprlab_export.json`` saying what those
features are. ``timm``, ``torchvision`` and ``hf`` write the backbone in that library's own format (normalization
is then the user's: mean/std are in the folder); ``onnx`` and ``torchscript`` trace the whole encoder
(normalization inside, fixed image size, any batch size) and are checked against it before they are kept.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reprlab.export.source import Source

__all__ = ["FORMATS", "ExportError", "export", "main"]

# format -> (module, writer); imported when used, so that `reprlab export --help` does not import torch
FORMATS = {
    "timm": ("reprlab.export.libraries", "write_timm"),
    "torchvision": ("reprlab.export.libraries", "write_torchvision"),
    "hf": ("reprlab.export.libraries", "write_hf"),
    "onnx": ("reprlab.export.traced", "write_onnx"),
    "torchscript": ("reprlab.export.traced", "write_torchscript"),
}
LIBRARY_FORMATS = ("timm", "torchvision", "hf")  # each takes only encoders of its own library
TRACED_FORMATS = ("onnx", "torchscript")  # any encoder; normalization inside


class ExportError(ValueError):
    """An export that cannot be made as asked: the message names the value and the fix."""


def default_out_dir(run_dir: str | Path, format: str) -> Path:
    return Path(run_dir) / "export" / format


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not a previous export (its files would be deleted)."""
    from reprlab.export.card import MANIFEST

    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a file; give a folder (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"--out {str(out)!r} already holds files that are not a reprlab export; give a new or "
                          f"empty folder")


def _check_fits(source: Source, format: str) -> None:
    family, name = source.family, source.encoder.spec["name"]
    if format in LIBRARY_FORMATS and family != format:
        raise ExportError(f"--format {format} needs a {format} encoder, but {str(source.run_dir)!r} holds {name!r} "
                          f"({family}); use --format {family}, onnx or torchscript")
    if format in LIBRARY_FORMATS and source.encoder.patch_pooling is not None:
        raise ExportError(f"the encoder of {str(source.run_dir)!r} embeds an image as the mean over a grid of its "
                          f"patches (patch_pooling), which a plain {format} model does not do; use --format onnx "
                          f"or torchscript, which keep the pooling")


def export(run_dir: str | Path, format: str, out_dir: str | Path | None = None,
           input_size: int | None = None) -> Path:
    """Export the encoder of ``run_dir`` as ``format`` (one of :data:`FORMATS`) into ``out_dir`` (default
    ``run_dir/export/<format>/``) and return that folder. ``input_size``: the square image size the export takes
    (default: the run's data.image_size or its dataset's native size). A previous export there is replaced
    whole, and only once the new one is complete."""
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose from {sorted(FORMATS)}")
    out = Path(out_dir if out_dir is not None else default_out_dir(run_dir, format)).resolve()
    _check_out(out)
    from reprlab.export.card import write_card
    from reprlab.export.source import load_source

    source = load_source(run_dir, input_size)
    _check_fits(source, format)
    module, name = FORMATS[format]
    writer = getattr(importlib.import_module(module), name)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        written = writer(source, staging)
        write_card(staging, out, source, format, written, normalized_inside=format in TRACED_FORMATS)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def main(argv: list[str] | None = None) -> int:
    """``reprlab export RUN_DIR --format F [--out DIR] [--push-to-hub REPO_ID]``; see :mod:`reprlab.export.cli`."""
    from reprlab.export.cli import main as cli_main

    return cli_main(argv)
